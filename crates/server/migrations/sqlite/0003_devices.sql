-- Devices: an operator's proxy exits. A device is created with a one-time pairing code (stored as SHA-256) and
-- enrolled by presenting it with a CSR; from then on its client certificate (by SHA-256 fingerprint) identifies it.
CREATE TABLE devices (
    id                 VARCHAR(36)   NOT NULL PRIMARY KEY,
    operator_id        VARCHAR(36)   NOT NULL REFERENCES operators(id) ON DELETE CASCADE,
    name               VARCHAR(100)  NOT NULL,
    description        VARCHAR(1000) NOT NULL,
    created_at         BIGINT        NOT NULL,
    updated_at         BIGINT        NOT NULL,
    pairing_code_hash  VARCHAR(64)   NULL UNIQUE,
    pairing_expires_at BIGINT        NULL,
    cert_fingerprint   VARCHAR(64)   NULL UNIQUE,
    enrolled_at        BIGINT        NULL,
    revoked_at         BIGINT        NULL,
    last_seen_at       BIGINT        NULL,
    last_public_ip     VARCHAR(64)   NULL
);
CREATE INDEX devices_operator ON devices (operator_id, created_at);
