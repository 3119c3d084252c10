//! Operator sessions. SQL is the source of truth for revocation; Redis (when configured) only caches.

use super::{Store, StoreError};

/// A session row joined with its operator's username and account state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub id: String,
    pub jti: String,
    pub operator_id: String,
    pub username: String,
    /// Unix milliseconds, UTC.
    pub created_at: i64,
    pub expires_at: i64,
    pub last_activity_at: i64,
    pub ip: String,
    pub user_agent: String,
    pub revoked_at: Option<i64>,
    pub operator_disabled_at: Option<i64>,
}

pub struct NewSession<'a> {
    pub id: &'a str,
    pub jti: &'a str,
    pub operator_id: &'a str,
    pub created_at: i64,
    pub expires_at: i64,
    pub ip: &'a str,
    pub user_agent: &'a str,
}

const SELECT: &str = "SELECT s.id, s.jti, s.operator_id, o.username, s.created_at, s.expires_at, \
     s.last_activity_at, s.ip, s.user_agent, s.revoked_at, o.disabled_at AS operator_disabled_at \
     FROM sessions s JOIN operators o ON o.id = s.operator_id";

impl Store {
    pub async fn insert_session(&self, new: NewSession<'_>) -> Result<(), StoreError> {
        let q = "INSERT INTO sessions (id, jti, operator_id, created_at, expires_at, last_activity_at, ip, \
                 user_agent, revoked_at, revoke_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)";
        sqlx::query(&self.sql(q))
            .bind(new.id)
            .bind(new.jti)
            .bind(new.operator_id)
            .bind(new.created_at)
            .bind(new.expires_at)
            .bind(new.created_at)
            .bind(new.ip)
            .bind(new.user_agent)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn session_by_jti(&self, jti: &str) -> Result<Option<SessionRow>, StoreError> {
        let q = format!("{SELECT} WHERE s.jti = ?");
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(jti)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Sessions of one operator that are neither revoked, expired nor idle past `idle_cutoff`.
    pub async fn active_sessions(
        &self,
        operator_id: &str,
        now: i64,
        idle_cutoff: i64,
    ) -> Result<Vec<SessionRow>, StoreError> {
        let q = format!(
            "{SELECT} WHERE s.operator_id = ? AND s.revoked_at IS NULL AND s.expires_at > ? \
             AND s.last_activity_at > ? ORDER BY s.created_at DESC, s.id"
        );
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(operator_id)
            .bind(now)
            .bind(idle_cutoff)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Record activity. Only moves forward, so a late write never rewinds a newer one.
    pub async fn touch_session(&self, id: &str, at: i64) -> Result<(), StoreError> {
        sqlx::query(
            &self.sql(
                "UPDATE sessions SET last_activity_at = ? WHERE id = ? AND last_activity_at < ?",
            ),
        )
        .bind(at)
        .bind(id)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Revoke one session of `operator_id`. Returns its jti if a live session was revoked; `None` when no such
    /// session belongs to this operator (another operator's session id is indistinguishable from a missing one).
    pub async fn revoke_session(
        &self,
        operator_id: &str,
        session_id: &str,
        now: i64,
        reason: &str,
    ) -> Result<Option<String>, StoreError> {
        let jti: Option<String> = sqlx::query_scalar(&self.sql(
            "SELECT jti FROM sessions WHERE id = ? AND operator_id = ? AND revoked_at IS NULL",
        ))
        .bind(session_id)
        .bind(operator_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(jti) = jti else { return Ok(None) };
        let done = sqlx::query(&self.sql(
            "UPDATE sessions SET revoked_at = ?, revoke_reason = ? WHERE id = ? AND operator_id = ? \
             AND revoked_at IS NULL",
        ))
        .bind(now)
        .bind(reason)
        .bind(session_id)
        .bind(operator_id)
        .execute(&self.pool)
        .await?;
        Ok((done.rows_affected() == 1).then_some(jti))
    }

    /// Revoke every live session of an operator except `keep` (a session id). Returns the revoked jtis.
    pub async fn revoke_operator_sessions(
        &self,
        operator_id: &str,
        keep: Option<&str>,
        now: i64,
        reason: &str,
    ) -> Result<Vec<String>, StoreError> {
        let keep = keep.unwrap_or("");
        // Update first, then read back what this update revoked, so that a session created in between is
        // either revoked and listed or not touched at all.
        sqlx::query(&self.sql(
            "UPDATE sessions SET revoked_at = ?, revoke_reason = ? WHERE operator_id = ? AND id <> ? \
             AND revoked_at IS NULL",
        ))
        .bind(now)
        .bind(reason)
        .bind(operator_id)
        .bind(keep)
        .execute(&self.pool)
        .await?;
        let jtis: Vec<String> = sqlx::query_scalar(&self.sql(
            "SELECT jti FROM sessions WHERE operator_id = ? AND revoked_at = ? AND revoke_reason = ?",
        ))
        .bind(operator_id)
        .bind(now)
        .bind(reason)
        .fetch_all(&self.pool)
        .await?;
        Ok(jtis)
    }

    /// Forget sessions that ended more than `older_than` ago (they can no longer validate anyway).
    pub async fn prune_sessions(&self, older_than: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(&self.sql("DELETE FROM sessions WHERE expires_at < ?"))
            .bind(older_than)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
