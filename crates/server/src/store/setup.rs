//! One-time setup tokens that let the first operator choose their own password.

use super::{new_id, Store, StoreError};

impl Store {
    /// Replace any previous setup token with this one (stored only as a hash).
    pub async fn put_setup_token(
        &self,
        token_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM setup_tokens")
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.sql(
            "INSERT INTO setup_tokens (id, token_hash, created_at, expires_at) VALUES (?, ?, ?, ?)",
        ))
        .bind(new_id())
        .bind(token_hash)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

impl Store {
    /// True when `token_hash` names an unexpired setup token. A cheap check before any password hashing.
    pub async fn setup_token_valid(&self, token_hash: &str, now: i64) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(
            &self.sql("SELECT COUNT(*) FROM setup_tokens WHERE token_hash = ? AND expires_at > ?"),
        )
        .bind(token_hash)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }
}
