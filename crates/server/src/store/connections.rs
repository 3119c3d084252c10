//! Proxy connections and their usage. Operator-facing reads and writes always go through the owning operator's id;
//! the proxy directory loads every connection once at startup ([`Store::all_connections`]) and writes usage back in
//! batches ([`Store::flush_usage`]).

use super::{conflict_or, new_id, Backend, Store, StoreError};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConnectionRow {
    pub id: String,
    pub operator_id: String,
    pub device_id: Option<String>,
    pub name: String,
    pub username: String,
    /// bcrypt, cost 12. `None` only for a row that cannot authenticate (never written by this server).
    pub password_hash: Option<String>,
    pub limit_bytes: Option<i64>,
    pub used_bytes: i64,
    pub disabled_at: Option<i64>,
    /// Comma-separated CIDRs, normalised; empty for none.
    pub allow_cidrs: String,
    pub dedicated_port: Option<i64>,
    /// Unix milliseconds, UTC.
    pub created_at: i64,
    pub updated_at: i64,
}

const COLUMNS: &str =
    "id, operator_id, device_id, name, username, password_hash, limit_bytes, used_bytes, \
                       disabled_at, allow_cidrs, dedicated_port, created_at, updated_at";

/// The settings an operator chooses for a connection (everything but the credentials and the meter).
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    pub name: String,
    pub device_id: Option<String>,
    pub limit_bytes: Option<i64>,
    pub disabled_at: Option<i64>,
    pub allow_cidrs: String,
    pub dedicated_port: Option<i64>,
}

/// One hour's usage of one connection through one device.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageBucket {
    pub connection_id: String,
    pub device_id: String,
    pub operator_id: String,
    /// Start of the UTC hour, Unix milliseconds.
    pub hour: i64,
    pub bytes_up: i64,
    pub bytes_down: i64,
}

/// Usage of one hour, summed over whatever the query groups.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HourUsage {
    pub hour: i64,
    pub bytes_up: i64,
    pub bytes_down: i64,
}

impl Store {
    pub async fn create_connection(
        &self,
        operator_id: &str,
        username: &str,
        password_hash: &str,
        settings: &ConnectionSettings,
        now: i64,
    ) -> Result<ConnectionRow, StoreError> {
        let id = new_id();
        sqlx::query(&self.sql(
            "INSERT INTO connections (id, operator_id, device_id, name, username, password_hash, limit_bytes, \
             used_bytes, disabled_at, allow_cidrs, dedicated_port, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
        ))
        .bind(&id)
        .bind(operator_id)
        .bind(settings.device_id.as_deref())
        .bind(&settings.name)
        .bind(username)
        .bind(password_hash)
        .bind(settings.limit_bytes)
        .bind(settings.disabled_at)
        .bind(&settings.allow_cidrs)
        .bind(settings.dedicated_port)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_or(e, "username or dedicated port"))?;
        self.connection(operator_id, &id)
            .await?
            .ok_or(StoreError::Query(sqlx::Error::RowNotFound))
    }

    pub async fn connection(
        &self,
        operator_id: &str,
        id: &str,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let q = format!("SELECT {COLUMNS} FROM connections WHERE operator_id = ? AND id = ?");
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(operator_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn connections(&self, operator_id: &str) -> Result<Vec<ConnectionRow>, StoreError> {
        let q = format!(
            "SELECT {COLUMNS} FROM connections WHERE operator_id = ? ORDER BY created_at, id"
        );
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(operator_id)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Every connection of every enabled operator: the proxy directory's starting point.
    pub async fn all_connections(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        let q = format!(
            "SELECT {COLUMNS} FROM connections \
             WHERE operator_id IN (SELECT id FROM operators WHERE disabled_at IS NULL)"
        );
        Ok(sqlx::query_as(&self.sql(&q)).fetch_all(&self.pool).await?)
    }

    /// Replace the operator-chosen settings. False when the operator has no such connection.
    pub async fn update_connection(
        &self,
        operator_id: &str,
        id: &str,
        settings: &ConnectionSettings,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE connections SET name = ?, device_id = ?, limit_bytes = ?, disabled_at = ?, allow_cidrs = ?, \
             dedicated_port = ?, updated_at = ? WHERE operator_id = ? AND id = ?",
        ))
        .bind(&settings.name)
        .bind(settings.device_id.as_deref())
        .bind(settings.limit_bytes)
        .bind(settings.disabled_at)
        .bind(&settings.allow_cidrs)
        .bind(settings.dedicated_port)
        .bind(now)
        .bind(operator_id)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_or(e, "dedicated port"))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn set_connection_password(
        &self,
        operator_id: &str,
        id: &str,
        password_hash: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE connections SET password_hash = ?, updated_at = ? WHERE operator_id = ? AND id = ?",
        ))
        .bind(password_hash)
        .bind(now)
        .bind(operator_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Usage back to zero (the hourly history is kept: it is what was used).
    pub async fn reset_connection_usage(
        &self,
        operator_id: &str,
        id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql(
            "UPDATE connections SET used_bytes = 0, updated_at = ? WHERE operator_id = ? AND id = ?",
        ))
        .bind(now)
        .bind(operator_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn delete_connection(&self, operator_id: &str, id: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query(&self.sql("DELETE FROM connections WHERE operator_id = ? AND id = ?"))
                .bind(operator_id)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Write meters (absolute totals) and add hourly buckets, all in one transaction: after a crash the store holds
    /// either the whole flush or none of it.
    pub async fn flush_usage(
        &self,
        used: &[(String, i64)],
        buckets: &[UsageBucket],
    ) -> Result<(), StoreError> {
        if used.is_empty() && buckets.is_empty() {
            return Ok(());
        }
        let upsert = match self.backend {
            Backend::MySql => {
                "INSERT INTO usage_hourly (connection_id, device_id, operator_id, hour, bytes_up, bytes_down) \
                 VALUES (?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE bytes_up = bytes_up + VALUES(bytes_up), \
                 bytes_down = bytes_down + VALUES(bytes_down)"
            }
            Backend::Sqlite | Backend::Postgres => {
                "INSERT INTO usage_hourly (connection_id, device_id, operator_id, hour, bytes_up, bytes_down) \
                 VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (connection_id, device_id, hour) DO UPDATE SET \
                 bytes_up = usage_hourly.bytes_up + excluded.bytes_up, \
                 bytes_down = usage_hourly.bytes_down + excluded.bytes_down"
            }
        };
        let upsert = self.sql(upsert);
        let update = self.sql("UPDATE connections SET used_bytes = ? WHERE id = ?");
        let mut tx = self.pool.begin().await?;
        for (id, used) in used {
            sqlx::query(&update)
                .bind(*used)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        for b in buckets {
            sqlx::query(&upsert)
                .bind(&b.connection_id)
                .bind(&b.device_id)
                .bind(&b.operator_id)
                .bind(b.hour)
                .bind(b.bytes_up)
                .bind(b.bytes_down)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Hourly usage of one connection (any device) in `[from, to)`, oldest first.
    pub async fn connection_usage(
        &self,
        operator_id: &str,
        connection_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<HourUsage>, StoreError> {
        self.hourly("connection_id", operator_id, connection_id, from, to)
            .await
    }

    /// Hourly usage through one device (any connection) in `[from, to)`, oldest first.
    pub async fn device_usage(
        &self,
        operator_id: &str,
        device_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<HourUsage>, StoreError> {
        self.hourly("device_id", operator_id, device_id, from, to)
            .await
    }

    async fn hourly(
        &self,
        column: &'static str,
        operator_id: &str,
        id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<HourUsage>, StoreError> {
        // SUM widens to a decimal on PostgreSQL and MySQL; cast it back to a 64-bit integer.
        let int = match self.backend {
            Backend::MySql => "SIGNED",
            Backend::Sqlite | Backend::Postgres => "BIGINT",
        };
        let q = format!(
            "SELECT hour, CAST(SUM(bytes_up) AS {int}) AS bytes_up, CAST(SUM(bytes_down) AS {int}) AS bytes_down \
             FROM usage_hourly WHERE operator_id = ? AND {column} = ? AND hour >= ? AND hour < ? \
             GROUP BY hour ORDER BY hour"
        );
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(operator_id)
            .bind(id)
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await?)
    }
}
