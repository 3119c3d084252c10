-- The OpenVPN door's stable address per connection: `host_index` counts from the subnet's first customer address,
-- so that a changed subnet keeps every connection's place. Assigned on a connection's first VPN login.
CREATE TABLE vpn_addresses (
    connection_id VARCHAR(36) NOT NULL PRIMARY KEY REFERENCES connections(id) ON DELETE CASCADE,
    host_index    BIGINT      NOT NULL UNIQUE
);
