-- Operators, their sessions, and the one-time setup token for the first operator.
-- Ids are UUIDv7 strings made by the application; timestamps are BIGINT Unix milliseconds, UTC.
CREATE TABLE operators (
    id                  VARCHAR(36)  NOT NULL PRIMARY KEY,
    username            VARCHAR(64)  NOT NULL UNIQUE,
    password_hash       VARCHAR(100) NOT NULL,
    role                VARCHAR(16)  NOT NULL,
    created_at          BIGINT       NOT NULL,
    updated_at          BIGINT       NOT NULL,
    password_changed_at BIGINT       NOT NULL,
    disabled_at         BIGINT       NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE sessions (
    id               VARCHAR(36)  NOT NULL PRIMARY KEY,
    jti              VARCHAR(64)  NOT NULL UNIQUE,
    operator_id      VARCHAR(36)  NOT NULL,
    created_at       BIGINT       NOT NULL,
    expires_at       BIGINT       NOT NULL,
    last_activity_at BIGINT       NOT NULL,
    ip               VARCHAR(64)  NOT NULL,
    user_agent       VARCHAR(512) NOT NULL,
    revoked_at       BIGINT       NULL,
    revoke_reason    VARCHAR(32)  NULL,
    CONSTRAINT sessions_operator_fk FOREIGN KEY (operator_id) REFERENCES operators(id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX sessions_operator ON sessions (operator_id, expires_at);

CREATE TABLE setup_tokens (
    id          VARCHAR(36) NOT NULL PRIMARY KEY,
    token_hash  VARCHAR(64) NOT NULL UNIQUE,
    created_at  BIGINT      NOT NULL,
    expires_at  BIGINT      NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
