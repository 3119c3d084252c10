-- Offline alerting state per device (persisted so a restart neither loses nor repeats an alert), per-operator
-- webhook endpoints, the event outbox and the log of delivery attempts.
CREATE TABLE device_alerts (
    device_id     VARCHAR(36) NOT NULL PRIMARY KEY,
    operator_id   VARCHAR(36) NOT NULL,
    -- NULL while online; else the last-seen time at which the device went silent.
    offline_since BIGINT      NULL,
    incident_id   VARCHAR(36) NULL,
    -- When the current incident's offline alert went out; NULL while it has not (or the device is online).
    alerted_at    BIGINT      NULL,
    -- The last offline alert of this device: the cooldown runs from here.
    last_alert_at BIGINT      NULL,
    -- Offline transitions suppressed by the running cooldown.
    suppressed    BIGINT      NOT NULL,
    -- Events sent about this device so far.
    seq           BIGINT      NOT NULL,
    updated_at    BIGINT      NOT NULL,
    CONSTRAINT device_alerts_device_id_fk FOREIGN KEY (device_id) REFERENCES devices(id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE webhook_endpoints (
    operator_id     VARCHAR(36)   NOT NULL PRIMARY KEY,
    url             VARCHAR(2000) NOT NULL,
    -- The signing secret, encrypted with the server's data key (never stored in the clear).
    secret_enc      VARCHAR(200)  NOT NULL,
    disabled_at     BIGINT        NULL,
    disabled_reason VARCHAR(200)  NULL,
    created_at      BIGINT        NOT NULL,
    updated_at      BIGINT        NOT NULL,
    CONSTRAINT webhook_endpoints_operator_id_fk FOREIGN KEY (operator_id) REFERENCES operators(id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE webhook_events (
    id              VARCHAR(40)  NOT NULL PRIMARY KEY,
    operator_id     VARCHAR(36)  NOT NULL,
    event_type      VARCHAR(40)  NOT NULL,
    -- VARCHAR, not TEXT: MySQL reports TEXT as a blob, which the store reads as bytes. Payloads stay under 16 KB.
    payload         VARCHAR(16000) NOT NULL,
    created_at      BIGINT       NOT NULL,
    -- pending, delivered, failed
    status          VARCHAR(16)  NOT NULL,
    attempts        BIGINT       NOT NULL,
    next_attempt_at BIGINT       NOT NULL,
    -- A worker holds the event until then (several server processes share the outbox).
    claimed_until   BIGINT       NULL,
    updated_at      BIGINT       NOT NULL,
    CONSTRAINT webhook_events_operator_id_fk FOREIGN KEY (operator_id) REFERENCES operators(id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX webhook_events_due ON webhook_events (status, next_attempt_at);
CREATE INDEX webhook_events_operator ON webhook_events (operator_id, created_at);

CREATE TABLE webhook_attempts (
    id            VARCHAR(36)   NOT NULL PRIMARY KEY,
    event_id      VARCHAR(40)   NOT NULL,
    operator_id   VARCHAR(36)   NOT NULL,
    attempted_at  BIGINT        NOT NULL,
    status_code   BIGINT        NULL,
    latency_ms    BIGINT        NOT NULL,
    error         VARCHAR(500)  NULL,
    response_head VARCHAR(1024) NULL,
    CONSTRAINT webhook_attempts_event_id_fk FOREIGN KEY (event_id) REFERENCES webhook_events(id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX webhook_attempts_operator ON webhook_attempts (operator_id, attempted_at);
