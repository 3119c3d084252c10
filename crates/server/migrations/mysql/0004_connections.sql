-- Proxy connections: what a customer gets. The password exists only as a bcrypt hash; `used_bytes` is the meter as
-- last flushed from memory. `device_id` becomes NULL when the device is deleted (the connection then refuses flows).
CREATE TABLE connections (
    id             VARCHAR(36)   NOT NULL PRIMARY KEY,
    operator_id    VARCHAR(36)   NOT NULL,
    device_id      VARCHAR(36)   NULL,
    name           VARCHAR(100)  NOT NULL,
    username       VARCHAR(64)   NOT NULL UNIQUE,
    password_hash  VARCHAR(100)  NULL,
    limit_bytes    BIGINT        NULL,
    used_bytes     BIGINT        NOT NULL,
    disabled_at    BIGINT        NULL,
    allow_cidrs    VARCHAR(2000) NOT NULL,
    dedicated_port BIGINT        NULL UNIQUE,
    created_at     BIGINT        NOT NULL,
    updated_at     BIGINT        NOT NULL,
    CONSTRAINT connections_operator_fk FOREIGN KEY (operator_id) REFERENCES operators(id) ON DELETE CASCADE,
    CONSTRAINT connections_device_fk FOREIGN KEY (device_id) REFERENCES devices(id) ON DELETE SET NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX connections_operator ON connections (operator_id, created_at);
CREATE INDEX connections_device ON connections (device_id);

-- Hourly usage per connection and device, for charts and billing. `hour` is the UTC hour's start in Unix
-- milliseconds. No foreign key to connections: history outlives a deleted connection (not its operator).
CREATE TABLE usage_hourly (
    connection_id VARCHAR(36) NOT NULL,
    device_id     VARCHAR(36) NOT NULL,
    operator_id   VARCHAR(36) NOT NULL,
    hour          BIGINT      NOT NULL,
    bytes_up      BIGINT      NOT NULL,
    bytes_down    BIGINT      NOT NULL,
    PRIMARY KEY (connection_id, device_id, hour),
    CONSTRAINT usage_hourly_operator_fk FOREIGN KEY (operator_id) REFERENCES operators(id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX usage_hourly_device ON usage_hourly (device_id, hour);
CREATE INDEX usage_hourly_operator ON usage_hourly (operator_id, hour);
