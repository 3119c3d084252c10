//! Webhook endpoints (one per operator), outbox events and delivery attempts. Operator-facing reads are scoped by
//! operator id; the delivery worker claims events with a conditional update so several processes share the outbox.

use super::{new_id, Store, StoreError};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndpointRow {
    pub operator_id: String,
    pub url: String,
    pub secret_enc: String,
    pub disabled_at: Option<i64>,
    pub disabled_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub id: String,
    pub operator_id: String,
    pub event_type: String,
    pub payload: String,
    pub created_at: i64,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    pub event_status: String,
    pub attempted_at: i64,
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub response_head: Option<String>,
}

/// What became of an attempt.
#[derive(Debug, Clone)]
pub enum EventOutcome {
    Delivered,
    /// Try again at this time.
    Retry(i64),
    /// Give up (retries exhausted, or the endpoint is gone).
    Failed,
}

impl Store {
    pub async fn webhook_endpoint(
        &self,
        operator_id: &str,
    ) -> Result<Option<EndpointRow>, StoreError> {
        Ok(sqlx::query_as(&self.sql(
            "SELECT operator_id, url, secret_enc, disabled_at, disabled_reason, created_at, updated_at \
             FROM webhook_endpoints WHERE operator_id = ?",
        ))
        .bind(operator_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Set the URL (and enable the endpoint again); `secret_enc` is stored only when the endpoint is new or when
    /// given (rotation).
    pub async fn put_webhook_endpoint(
        &self,
        operator_id: &str,
        url: Option<&str>,
        secret_enc: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<String> = sqlx::query_scalar(
            &self.sql("SELECT operator_id FROM webhook_endpoints WHERE operator_id = ?"),
        )
        .bind(operator_id)
        .fetch_optional(&mut *tx)
        .await?;
        if exists.is_some() {
            if let Some(url) = url {
                sqlx::query(&self.sql(
                    "UPDATE webhook_endpoints SET url = ?, disabled_at = NULL, disabled_reason = NULL, \
                     updated_at = ? WHERE operator_id = ?",
                ))
                .bind(url)
                .bind(now)
                .bind(operator_id)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(secret) = secret_enc {
                sqlx::query(&self.sql(
                    "UPDATE webhook_endpoints SET secret_enc = ?, updated_at = ? WHERE operator_id = ?",
                ))
                .bind(secret)
                .bind(now)
                .bind(operator_id)
                .execute(&mut *tx)
                .await?;
            }
        } else {
            let (Some(url), Some(secret)) = (url, secret_enc) else {
                return Err(StoreError::Query(sqlx::Error::RowNotFound));
            };
            sqlx::query(&self.sql(
                "INSERT INTO webhook_endpoints (operator_id, url, secret_enc, disabled_at, disabled_reason, \
                 created_at, updated_at) VALUES (?, ?, ?, NULL, NULL, ?, ?)",
            ))
            .bind(operator_id)
            .bind(url)
            .bind(secret)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn disable_webhook_endpoint(
        &self,
        operator_id: &str,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.sql(
            "UPDATE webhook_endpoints SET disabled_at = ?, disabled_reason = ?, updated_at = ? WHERE operator_id = ?",
        ))
        .bind(now)
        .bind(reason)
        .bind(now)
        .bind(operator_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ids of pending events due by `now` and not held by a worker.
    pub async fn due_events(&self, now: i64, limit: i64) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(&self.sql(
            "SELECT id FROM webhook_events WHERE status = 'pending' AND next_attempt_at <= ? \
             AND (claimed_until IS NULL OR claimed_until < ?) ORDER BY next_attempt_at, id LIMIT ?",
        ))
        .bind(now)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Take an event for delivery until `until`. False when another worker holds it.
    pub async fn claim_event(
        &self,
        id: &str,
        now: i64,
        until: i64,
    ) -> Result<Option<EventRow>, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE webhook_events SET claimed_until = ? WHERE id = ? AND status = 'pending' \
             AND next_attempt_at <= ? AND (claimed_until IS NULL OR claimed_until < ?)",
        ))
        .bind(until)
        .bind(id)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        Ok(sqlx::query_as(&self.sql(
            "SELECT id, operator_id, event_type, payload, created_at, status, attempts, next_attempt_at \
             FROM webhook_events WHERE id = ?",
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Record an attempt and what it means for the event, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_attempt(
        &self,
        event: &EventRow,
        at: i64,
        status_code: Option<u16>,
        latency_ms: i64,
        error: Option<&str>,
        response_head: Option<&str>,
        outcome: &EventOutcome,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&self.sql(
            "INSERT INTO webhook_attempts (id, event_id, operator_id, attempted_at, status_code, latency_ms, error, \
             response_head) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(new_id())
        .bind(&event.id)
        .bind(&event.operator_id)
        .bind(at)
        .bind(status_code.map(i64::from))
        .bind(latency_ms)
        .bind(error)
        .bind(response_head)
        .execute(&mut *tx)
        .await?;
        let (status, next) = match outcome {
            EventOutcome::Delivered => ("delivered", event.next_attempt_at),
            EventOutcome::Retry(at) => ("pending", *at),
            EventOutcome::Failed => ("failed", event.next_attempt_at),
        };
        sqlx::query(&self.sql(
            "UPDATE webhook_events SET status = ?, attempts = attempts + 1, next_attempt_at = ?, \
             claimed_until = NULL, updated_at = ? WHERE id = ?",
        ))
        .bind(status)
        .bind(next)
        .bind(at)
        .bind(&event.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The operator's most recent delivery attempts, newest first.
    pub async fn webhook_attempts(
        &self,
        operator_id: &str,
        limit: i64,
    ) -> Result<Vec<AttemptRow>, StoreError> {
        Ok(sqlx::query_as(&self.sql(
            "SELECT t.id, t.event_id, e.event_type, e.status AS event_status, t.attempted_at, t.status_code, \
             t.latency_ms, t.error, t.response_head FROM webhook_attempts t \
             JOIN webhook_events e ON e.id = t.event_id \
             WHERE t.operator_id = ? ORDER BY t.attempted_at DESC, t.id DESC LIMIT ?",
        ))
        .bind(operator_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deliver an event of the operator's again now (same id). False when they have no such event.
    pub async fn resend_event(
        &self,
        operator_id: &str,
        id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE webhook_events SET status = 'pending', next_attempt_at = ?, claimed_until = NULL, updated_at = ? \
             WHERE operator_id = ? AND id = ?",
        ))
        .bind(now)
        .bind(now)
        .bind(operator_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Events of an operator, newest first (for tests and the dashboard).
    pub async fn webhook_events(
        &self,
        operator_id: &str,
        limit: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        Ok(sqlx::query_as(&self.sql(
            "SELECT id, operator_id, event_type, payload, created_at, status, attempts, next_attempt_at \
             FROM webhook_events WHERE operator_id = ? ORDER BY created_at DESC, id DESC LIMIT ?",
        ))
        .bind(operator_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}
