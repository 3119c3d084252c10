//! Devices, always read and written through the owning operator's id (except enrollment and tunnel login,
//! which find a device by its pairing code or certificate).

use super::{new_id, Store, StoreError};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeviceRow {
    pub id: String,
    pub operator_id: String,
    pub name: String,
    pub description: String,
    /// Unix milliseconds, UTC.
    pub created_at: i64,
    pub updated_at: i64,
    pub pairing_expires_at: Option<i64>,
    pub enrolled_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_seen_at: Option<i64>,
    pub last_public_ip: Option<String>,
}

const COLUMNS: &str =
    "id, operator_id, name, description, created_at, updated_at, pairing_expires_at, \
                       enrolled_at, revoked_at, last_seen_at, last_public_ip";

pub struct NewDevice<'a> {
    pub operator_id: &'a str,
    pub name: &'a str,
    pub description: &'a str,
    pub pairing_code_hash: &'a str,
    pub pairing_expires_at: i64,
    pub now: i64,
}

impl Store {
    pub async fn create_device(&self, new: NewDevice<'_>) -> Result<DeviceRow, StoreError> {
        let id = new_id();
        sqlx::query(&self.sql(
            "INSERT INTO devices (id, operator_id, name, description, created_at, updated_at, pairing_code_hash, \
             pairing_expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(&id)
        .bind(new.operator_id)
        .bind(new.name)
        .bind(new.description)
        .bind(new.now)
        .bind(new.now)
        .bind(new.pairing_code_hash)
        .bind(new.pairing_expires_at)
        .execute(&self.pool)
        .await?;
        self.device(new.operator_id, &id)
            .await?
            .ok_or(StoreError::Query(sqlx::Error::RowNotFound))
    }

    pub async fn device(
        &self,
        operator_id: &str,
        id: &str,
    ) -> Result<Option<DeviceRow>, StoreError> {
        let q = format!("SELECT {COLUMNS} FROM devices WHERE operator_id = ? AND id = ?");
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(operator_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn devices(&self, operator_id: &str) -> Result<Vec<DeviceRow>, StoreError> {
        let q =
            format!("SELECT {COLUMNS} FROM devices WHERE operator_id = ? ORDER BY created_at, id");
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(operator_id)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Rename or describe; `None` leaves a field as it is. False when the operator has no such device.
    pub async fn update_device(
        &self,
        operator_id: &str,
        id: &str,
        name: Option<&str>,
        description: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let Some(current) = self.device(operator_id, id).await? else {
            return Ok(false);
        };
        let done = sqlx::query(&self.sql(
            "UPDATE devices SET name = ?, description = ?, updated_at = ? WHERE operator_id = ? AND id = ?",
        ))
        .bind(name.unwrap_or(&current.name))
        .bind(description.unwrap_or(&current.description))
        .bind(now)
        .bind(operator_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Revoke: the certificate stops working and any unused pairing code is voided.
    pub async fn revoke_device(
        &self,
        operator_id: &str,
        id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE devices SET revoked_at = ?, pairing_code_hash = NULL, pairing_expires_at = NULL, updated_at = ? \
             WHERE operator_id = ? AND id = ? AND revoked_at IS NULL",
        ))
        .bind(now)
        .bind(now)
        .bind(operator_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn delete_device(&self, operator_id: &str, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql("DELETE FROM devices WHERE operator_id = ? AND id = ?"))
            .bind(operator_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The device an unexpired, unused pairing code belongs to.
    pub async fn device_by_pairing_code(
        &self,
        code_hash: &str,
        now: i64,
    ) -> Result<Option<DeviceRow>, StoreError> {
        let q = format!(
            "SELECT {COLUMNS} FROM devices WHERE pairing_code_hash = ? AND pairing_expires_at > ? AND revoked_at IS NULL"
        );
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(code_hash)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Consume the pairing code and bind the certificate. False when the code was used meanwhile.
    pub async fn complete_enrollment(
        &self,
        id: &str,
        code_hash: &str,
        fingerprint: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE devices SET cert_fingerprint = ?, enrolled_at = ?, pairing_code_hash = NULL, \
             pairing_expires_at = NULL, updated_at = ? WHERE id = ? AND pairing_code_hash = ? AND revoked_at IS NULL",
        ))
        .bind(fingerprint)
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(code_hash)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The live (enrolled, not revoked, operator enabled) device holding the certificate with this fingerprint.
    pub async fn device_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<DeviceRow>, StoreError> {
        // A disabled operator's devices are refused too: nobody may be served through them.
        let q = format!(
            "SELECT {COLUMNS} FROM devices WHERE cert_fingerprint = ? AND revoked_at IS NULL \
             AND operator_id IN (SELECT id FROM operators WHERE disabled_at IS NULL)"
        );
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(fingerprint)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Whether the unrevoked device with this certificate fingerprint belongs to a disabled operator: such a device
    /// is refused only until its operator is enabled again.
    pub async fn device_suspended(&self, fingerprint: &str) -> Result<bool, StoreError> {
        let q = "SELECT COUNT(*) FROM devices WHERE cert_fingerprint = ? AND revoked_at IS NULL \
                 AND operator_id IN (SELECT id FROM operators WHERE disabled_at IS NOT NULL)";
        let n: i64 = sqlx::query_scalar(&self.sql(q))
            .bind(fingerprint)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Persist last-seen times and addresses for many devices in one transaction.
    pub async fn record_seen(&self, seen: &[(String, i64, String)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (id, at, ip) in seen {
            sqlx::query(&self.sql(
                "UPDATE devices SET last_seen_at = ?, last_public_ip = ? WHERE id = ? \
                 AND (last_seen_at IS NULL OR last_seen_at < ?)",
            ))
            .bind(*at)
            .bind(ip)
            .bind(id)
            .bind(*at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

impl Store {
    /// Create many enrolled devices in one transaction (benchmarks and fleet imports). Returns their ids.
    pub async fn create_enrolled_devices(
        &self,
        operator_id: &str,
        names: &[String],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(names.len());
        let q = self.sql(
            "INSERT INTO devices (id, operator_id, name, description, created_at, updated_at, enrolled_at) \
             VALUES (?, ?, ?, '', ?, ?, ?)",
        );
        for name in names {
            let id = new_id();
            sqlx::query(&q)
                .bind(&id)
                .bind(operator_id)
                .bind(name)
                .bind(now)
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Ids of every device of an operator (to close their tunnels when the operator goes away).
    pub async fn device_ids(&self, operator_id: &str) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar(&self.sql("SELECT id FROM devices WHERE operator_id = ?"))
                .bind(operator_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}
