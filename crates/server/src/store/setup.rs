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

/// Stored in place of a password hash for an invited operator: no bcrypt hash has this form, so no password
/// verifies against it until the invitation is accepted.
pub const NO_PASSWORD: &str = "!invited";

impl Store {
    /// Create an operator without a usable password, plus its invitation (stored as a hash), in one transaction.
    pub async fn create_invited_operator(
        &self,
        username: &str,
        role: super::Role,
        token_hash: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<super::Operator, StoreError> {
        let mut tx = self.pool.begin().await?;
        let new = super::NewOperator {
            username,
            password_hash: NO_PASSWORD,
            role,
            now,
        };
        let id = self.insert_operator(&mut tx, &new).await?;
        sqlx::query(&self.sql(
            "INSERT INTO invitations (id, operator_id, token_hash, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
        ))
        .bind(new_id())
        .bind(&id)
        .bind(token_hash)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.operator_by_id(&id)
            .await?
            .ok_or(StoreError::Query(sqlx::Error::RowNotFound))
    }

    /// The operator an unexpired invitation is for.
    pub async fn invitation_operator(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<Option<super::Operator>, StoreError> {
        let id: Option<String> = sqlx::query_scalar(
            &self
                .sql("SELECT operator_id FROM invitations WHERE token_hash = ? AND expires_at > ?"),
        )
        .bind(token_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        match id {
            Some(id) => self.operator_by_id(&id).await,
            None => Ok(None),
        }
    }

    /// Consume the invitation and set the password, atomically. False when the invitation was already used.
    pub async fn accept_invitation(
        &self,
        token_hash: &str,
        operator_id: &str,
        hash: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let used = sqlx::query(&self.sql(
            "DELETE FROM invitations WHERE token_hash = ? AND operator_id = ? AND expires_at > ?",
        ))
        .bind(token_hash)
        .bind(operator_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if used != 1 {
            return Ok(false);
        }
        sqlx::query(&self.sql(
            "UPDATE operators SET password_hash = ?, password_changed_at = ?, updated_at = ? WHERE id = ?",
        ))
        .bind(hash)
        .bind(now)
        .bind(now)
        .bind(operator_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}
