//! Offline-alert state per device and the webhook outbox. Every alert transition is a conditional update (only one
//! of several server processes wins it) written in the same transaction as its outbox event.

use super::{Store, StoreError};

/// A device's alert state with what the detector needs to judge it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AlertRow {
    pub device_id: String,
    pub operator_id: String,
    pub device_name: String,
    pub last_seen_at: Option<i64>,
    pub offline_since: Option<i64>,
    pub incident_id: Option<String>,
    pub alerted_at: Option<i64>,
    pub last_alert_at: Option<i64>,
    pub suppressed: i64,
    pub seq: i64,
}

/// An event to put in the outbox together with a state change.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: String,
    pub operator_id: String,
    pub event_type: String,
    pub payload: String,
}

/// A state change of one device, with the condition under which it applies.
#[derive(Debug, Clone)]
pub enum AlertChange {
    /// Online → offline. `alert`: the offline alert goes out now (else it is suppressed by the cooldown).
    Offline {
        offline_since: i64,
        incident_id: String,
        alert: bool,
        now: i64,
    },
    /// Offline → online.
    Recovered { offline_since: i64, now: i64 },
    /// The cooldown ended with the device still offline: the deferred alert goes out.
    Deferred {
        suppressed: i64,
        last_alert_at: i64,
        now: i64,
    },
    /// The cooldown ended with the device online: forget the suppressed transitions.
    ClearSuppressed { suppressed: i64, now: i64 },
}

const ALERT_COLUMNS: &str =
    "a.device_id, a.operator_id, d.name AS device_name, d.last_seen_at, a.offline_since, \
    a.incident_id, a.alerted_at, a.last_alert_at, a.suppressed, a.seq";

impl Store {
    /// Give every enrolled device seen at least once an alert row (online). Returns how many were added.
    pub async fn ensure_alert_rows(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(&self.sql(
            "INSERT INTO device_alerts (device_id, operator_id, offline_since, incident_id, alerted_at, \
             last_alert_at, suppressed, seq, updated_at) \
             SELECT d.id, d.operator_id, NULL, NULL, NULL, NULL, 0, 0, ? FROM devices d \
             WHERE d.last_seen_at IS NOT NULL AND d.revoked_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM device_alerts a WHERE a.device_id = d.id)",
        ))
        .bind(now)
        .execute(&self.pool)
        .await;
        match done {
            Ok(d) => Ok(d.rows_affected()),
            // Another process added the same rows at the same moment: they exist, which is all this wants.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Devices for which something may happen now: silent since `silent_before` while online (only when
    /// `offline_possible`), seen again while offline, or with a cooldown that ended by `cooldown_before`.
    pub async fn alert_candidates(
        &self,
        silent_before: i64,
        offline_possible: bool,
        cooldown_before: i64,
    ) -> Result<Vec<AlertRow>, StoreError> {
        let q = format!(
            "SELECT {ALERT_COLUMNS} FROM device_alerts a JOIN devices d ON d.id = a.device_id \
             WHERE d.revoked_at IS NULL AND ( \
               (a.offline_since IS NULL AND d.last_seen_at <= ? AND ? = 1) \
               OR (a.offline_since IS NOT NULL AND d.last_seen_at > a.offline_since) \
               OR (a.suppressed > 0 AND a.last_alert_at <= ?))"
        );
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(silent_before)
            .bind(i64::from(offline_possible))
            .bind(cooldown_before)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Ids of devices currently offline (for the recovery fast path).
    pub async fn offline_device_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            &self.sql("SELECT device_id FROM device_alerts WHERE offline_since IS NOT NULL"),
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn alert_state(&self, device_id: &str) -> Result<Option<AlertRow>, StoreError> {
        let q = format!(
            "SELECT {ALERT_COLUMNS} FROM device_alerts a JOIN devices d ON d.id = a.device_id WHERE a.device_id = ?"
        );
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Apply `change` to the device if its state is still the one it was judged on, and put `event` (if any) in the
    /// outbox in the same transaction. False when another process got there first.
    pub async fn apply_alert_change(
        &self,
        device_id: &str,
        change: &AlertChange,
        event: Option<&NewEvent>,
    ) -> Result<bool, StoreError> {
        let seq = i64::from(event.is_some());
        let mut tx = self.pool.begin().await?;
        let done = match change {
            AlertChange::Offline {
                offline_since,
                incident_id,
                alert,
                now,
            } => {
                let q = if *alert {
                    "UPDATE device_alerts SET offline_since = ?, incident_id = ?, alerted_at = ?, last_alert_at = ?, \
                     suppressed = 0, seq = seq + ?, updated_at = ? WHERE device_id = ? AND offline_since IS NULL"
                } else {
                    "UPDATE device_alerts SET offline_since = ?, incident_id = ?, alerted_at = NULL, \
                     suppressed = suppressed + 1, seq = seq + ?, updated_at = ? \
                     WHERE device_id = ? AND offline_since IS NULL"
                };
                let sql = self.sql(q);
                let mut query = sqlx::query(&sql)
                    .bind(*offline_since)
                    .bind(incident_id);
                if *alert {
                    query = query.bind(*now).bind(*now);
                }
                query
                    .bind(seq)
                    .bind(*now)
                    .bind(device_id)
                    .execute(&mut *tx)
                    .await?
            }
            AlertChange::Recovered { offline_since, now } => {
                sqlx::query(&self.sql(
                    "UPDATE device_alerts SET offline_since = NULL, alerted_at = NULL, seq = seq + ?, updated_at = ? \
                     WHERE device_id = ? AND offline_since = ?",
                ))
                .bind(seq)
                .bind(*now)
                .bind(device_id)
                .bind(*offline_since)
                .execute(&mut *tx)
                .await?
            }
            AlertChange::Deferred {
                suppressed,
                last_alert_at,
                now,
            } => {
                sqlx::query(&self.sql(
                    "UPDATE device_alerts SET alerted_at = ?, last_alert_at = ?, suppressed = 0, seq = seq + ?, \
                     updated_at = ? WHERE device_id = ? AND offline_since IS NOT NULL AND alerted_at IS NULL \
                     AND suppressed = ? AND last_alert_at = ?",
                ))
                .bind(*now)
                .bind(*now)
                .bind(seq)
                .bind(*now)
                .bind(device_id)
                .bind(*suppressed)
                .bind(*last_alert_at)
                .execute(&mut *tx)
                .await?
            }
            AlertChange::ClearSuppressed { suppressed, now } => {
                sqlx::query(&self.sql(
                    "UPDATE device_alerts SET suppressed = 0, updated_at = ? \
                     WHERE device_id = ? AND offline_since IS NULL AND suppressed = ?",
                ))
                .bind(*now)
                .bind(device_id)
                .bind(*suppressed)
                .execute(&mut *tx)
                .await?
            }
        };
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        if let Some(e) = event {
            self.insert_event(&mut tx, e, now_of(change)).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Put an event in the outbox (inside the caller's transaction) if its operator has an enabled endpoint. One
    /// statement, so that on SQLite the transaction never has to upgrade a read to a write (which fails at once
    /// under concurrent writers instead of waiting).
    pub async fn insert_event(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        e: &NewEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "INSERT INTO webhook_events (id, operator_id, event_type, payload, created_at, status, attempts, \
             next_attempt_at, claimed_until, updated_at) \
             SELECT ?, ?, ?, ?, ?, 'pending', 0, ?, NULL, ? FROM webhook_endpoints \
             WHERE operator_id = ? AND disabled_at IS NULL",
        ))
        .bind(&e.id)
        .bind(&e.operator_id)
        .bind(&e.event_type)
        .bind(&e.payload)
        .bind(now)
        .bind(now)
        .bind(now)
        .bind(&e.operator_id)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Put an event in the outbox on its own (events without a state row, such as usage crossings).
    pub async fn enqueue_event(&self, e: &NewEvent, now: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let put = self.insert_event(&mut tx, e, now).await?;
        tx.commit().await?;
        Ok(put)
    }
}

fn now_of(c: &AlertChange) -> i64 {
    match c {
        AlertChange::Offline { now, .. }
        | AlertChange::Recovered { now, .. }
        | AlertChange::Deferred { now, .. }
        | AlertChange::ClearSuppressed { now, .. } => *now,
    }
}
