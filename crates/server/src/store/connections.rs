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
    /// When the connection's device was revoked, if it was (read from the device; revocation is final).
    pub device_revoked_at: Option<i64>,
}

const COLUMNS: &str =
    "id, operator_id, device_id, name, username, password_hash, limit_bytes, used_bytes, \
                       disabled_at, allow_cidrs, dedicated_port, created_at, updated_at, \
                       (SELECT d.revoked_at FROM devices d WHERE d.id = connections.device_id) AS device_revoked_at";

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
            "UPDATE connections SET password_hash = ?, password_plain = NULL, updated_at = ? \
             WHERE operator_id = ? AND id = ?",
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

    /// Whether any hourly usage of this operator names the connection or (with `device`) the device: a deleted
    /// one's history stays readable.
    pub async fn has_usage(
        &self,
        operator_id: &str,
        id: &str,
        device: bool,
    ) -> Result<bool, StoreError> {
        let column = if device { "device_id" } else { "connection_id" };
        let q =
            format!("SELECT 1 FROM usage_hourly WHERE operator_id = ? AND {column} = ? LIMIT 1");
        Ok(sqlx::query(&self.sql(&q))
            .bind(operator_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
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
        // An hour belongs to the window that holds its start (`from <= hour < to`), so that back-to-back windows
        // split the hours exactly: a window starting mid-hour leaves that hour to the window before it.
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(operator_id)
            .bind(id)
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await?)
    }
}

/// A connection as a legacy export describes it, validated, ready to insert.
#[derive(Clone)]
pub struct LegacyConnection {
    pub name: String,
    pub device_id: Option<String>,
    pub username: String,
    pub password: String,
    pub limit_bytes: Option<i64>,
    pub used_bytes: i64,
    pub enabled: bool,
}

impl std::fmt::Debug for LegacyConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyConnection")
            .field("name", &self.name)
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportCounts {
    pub created: usize,
    /// Rows whose username this operator already has (a re-run of the same import): left untouched.
    pub already_present: usize,
}

impl Store {
    /// The connection with this username, with the operator's enabled state (for a directory that meets a username
    /// it has not loaded, for example one imported while the server runs).
    pub async fn connection_by_username(
        &self,
        username: &str,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let q = format!(
            "SELECT {COLUMNS} FROM connections WHERE username = ? \
             AND operator_id IN (SELECT id FROM operators WHERE disabled_at IS NULL)"
        );
        Ok(sqlx::query_as(&self.sql(&q))
            .bind(username)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Which of these operator ids still exist.
    pub async fn existing_operators(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let rows: Vec<(String,)> = self
            .select_in("SELECT id FROM operators WHERE id", ids)
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Which of these usernames exist, and whose they are: `(username, operator_id)`.
    pub async fn username_owners(
        &self,
        usernames: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.select_in(
            "SELECT username, operator_id FROM connections WHERE username",
            usernames,
        )
        .await
    }

    /// The rows of `select` (ending in the column compared) `IN` `values`, asked in bounded lists: every backend
    /// takes 500 parameters comfortably.
    async fn select_in<T>(&self, select: &str, values: &[String]) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
    {
        let mut out = Vec::new();
        for chunk in values.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let q = format!("{select} IN ({marks})");
            let sql = self.sql(&q);
            let mut query = sqlx::query_as::<_, T>(&sql);
            for v in chunk {
                query = query.bind(v);
            }
            out.extend(query.fetch_all(&self.pool).await?);
        }
        Ok(out)
    }

    /// Insert legacy connections with their plaintext passwords, all in one transaction. A username the operator
    /// already has is skipped (so re-running an import is harmless); the caller has refused usernames that belong
    /// to someone else.
    pub async fn import_legacy(
        &self,
        operator_id: &str,
        rows: &[LegacyConnection],
        now: i64,
    ) -> Result<ImportCounts, StoreError> {
        let mut counts = ImportCounts::default();
        let mut tx = self.pool.begin().await?;
        let exists = self.sql("SELECT operator_id FROM connections WHERE username = ?");
        let insert = self.sql(
            "INSERT INTO connections (id, operator_id, device_id, name, username, password_hash, password_plain, \
             limit_bytes, used_bytes, disabled_at, allow_cidrs, dedicated_port, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, '', NULL, ?, ?)",
        );
        for r in rows {
            let owner: Option<String> = sqlx::query_scalar(&exists)
                .bind(&r.username)
                .fetch_optional(&mut *tx)
                .await?;
            match owner {
                Some(o) if o == operator_id => {
                    counts.already_present += 1;
                    continue;
                }
                Some(_) => return Err(StoreError::Conflict("username")),
                None => {}
            }
            sqlx::query(&insert)
                .bind(new_id())
                .bind(operator_id)
                .bind(r.device_id.as_deref())
                .bind(&r.name)
                .bind(&r.username)
                .bind(&r.password)
                .bind(r.limit_bytes)
                .bind(r.used_bytes)
                .bind((!r.enabled).then_some(now))
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| conflict_or(e, "username"))?;
            counts.created += 1;
        }
        tx.commit().await?;
        Ok(counts)
    }

    /// The next `limit` rows holding a plaintext password, by id after `after` (keyset pagination, so a row that
    /// failed is not fetched again in the same run).
    pub async fn plaintext_batch(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        Ok(sqlx::query_as(&self.sql(
            "SELECT id, username, password_plain FROM connections \
             WHERE password_plain IS NOT NULL AND id > ? ORDER BY id LIMIT ?",
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The plaintext password of one row, if it still has one.
    pub async fn plaintext_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(&self.sql(
            "SELECT password_plain FROM connections WHERE id = ? AND password_plain IS NOT NULL",
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Replace plaintexts by hashes in one transaction. Each update only applies while the row still holds the
    /// plaintext that was hashed, so a row is never hashed twice and a password changed meanwhile is not
    /// overwritten. Returns how many rows changed.
    pub async fn store_hashes(&self, done: &[(String, String, String)]) -> Result<u64, StoreError> {
        let update = self.sql(
            "UPDATE connections SET password_hash = ?, password_plain = NULL \
             WHERE id = ? AND password_plain = ?",
        );
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        for (id, hash, plain) in done {
            n += sqlx::query(&update)
                .bind(hash)
                .bind(id)
                .bind(plain)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    /// `(rows with a plaintext password, rows with a hash and no plaintext, rows with neither)`.
    pub async fn credential_counts(&self) -> Result<(i64, i64, i64), StoreError> {
        let count = |cond: &'static str| {
            let q = format!("SELECT COUNT(*) FROM connections WHERE {cond}");
            async move {
                sqlx::query_scalar::<_, i64>(&self.sql(&q))
                    .fetch_one(&self.pool)
                    .await
            }
        };
        Ok((
            count("password_plain IS NOT NULL").await?,
            count("password_plain IS NULL AND password_hash IS NOT NULL").await?,
            count("password_plain IS NULL AND password_hash IS NULL").await?,
        ))
    }
}
