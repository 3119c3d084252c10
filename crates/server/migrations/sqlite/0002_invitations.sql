-- One-time invitations: an admin creates an operator without a password; the operator chooses it.
CREATE TABLE invitations (
    id          VARCHAR(36) NOT NULL PRIMARY KEY,
    operator_id VARCHAR(36) NOT NULL UNIQUE REFERENCES operators(id) ON DELETE CASCADE,
    token_hash  VARCHAR(64) NOT NULL UNIQUE,
    created_at  BIGINT      NOT NULL,
    expires_at  BIGINT      NOT NULL
);
