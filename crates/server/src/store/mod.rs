//! The store: every durable fact, behind one query layer over SQLite, PostgreSQL and MySQL/MariaDB.
//!
//! Queries are written once in the common SQL subset with `?` placeholders; [`Store::sql`] rewrites them to
//! `$1, $2, …` for PostgreSQL. Each backend has its own migration directory because DDL differs (engine and
//! collation on MySQL, foreign keys inline elsewhere). Ids are UUIDv7 strings made here, so no query needs
//! `RETURNING`; timestamps are `BIGINT` Unix milliseconds in UTC, so no query depends on a backend's date type.

mod alerts;
mod connections;
mod devices;
mod lock;
mod lock_file;
mod operators;
mod sessions;
mod setup;
mod vpn;
mod webhooks;

pub use alerts::{AlertChange, AlertRow, NewEvent};
pub use connections::{
    ConnectionRow, ConnectionSettings, HourUsage, ImportCounts, LegacyConnection, UsageBucket,
};
pub use devices::{DeviceRow, NewDevice};
pub use lock::{DataPlaneLock, LockLost, LockTiming};
pub use operators::{NewOperator, Operator, Role};
pub use sessions::{NewSession, SessionRow};
pub use setup::NO_PASSWORD;
pub use webhooks::{AttemptRow, EndpointRow, EventOutcome, EventRow};

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

/// Which database server the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    /// The backend a `DATABASE_URL` names by its scheme.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "mysql" | "mariadb" => Ok(Self::MySql),
            _ => Err(StoreError::UnsupportedUrl(scheme.to_owned())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::MySql => "mysql",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL scheme {0:?} (use sqlite:, postgres: or mysql:)")]
    UnsupportedUrl(String),
    #[error("could not connect to the {backend} database")]
    Connect {
        backend: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("a row with the same {0} already exists")]
    Conflict(&'static str),
    #[error("database query failed")]
    Query(#[source] sqlx::Error),
    #[error(
        "another proxyfleet server already serves devices and proxy doors on this database (the lock is held by \
         {held_by}); only one may, because meters live in its memory. Stop it first, or start this one without \
         tunnel_listen, http_proxy_listen, socks5_listen, proxy_dedicated_ports and openvpn_listen to serve the API \
         only"
    )]
    DataPlaneLocked { held_by: String },
    #[error("could not lock {path}")]
    LockFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Query(e)
    }
}

impl StoreError {
    /// A deadlock or serialization failure: another process touched the same rows at the same moment. The work is
    /// safe to skip and redo later.
    pub fn is_contention(&self) -> bool {
        match self {
            StoreError::Query(sqlx::Error::Database(e)) => {
                matches!(
                    e.code().as_deref(),
                    Some("40001" | "40P01" | "5" | "6" | "1213" | "1205")
                )
            }
            _ => false,
        }
    }
}

/// Map a unique-constraint violation to [`StoreError::Conflict`]; every other error stays a query error.
pub(crate) fn conflict_or(e: sqlx::Error, what: &'static str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what),
        _ => StoreError::Query(e),
    }
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// How to open a connection outside the pool (the data-plane lock holds one of its own).
    options: std::sync::Arc<AnyConnectOptions>,
    /// The SQLite database's file, when it has one.
    sqlite_file: Option<String>,
}

impl Store {
    /// Connect and run the migrations. For SQLite the file is created if missing and put in WAL mode.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let store = Self::open(url, max_connections).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connect and take the data-plane lock, without migrating: the caller watches the lock (so that its
    /// session is kept alive and the lease counted from the start) and then calls [`Store::migrate`]. A process
    /// that may not serve changes nothing, and two data-plane servers starting at once on a fresh database never
    /// migrate it together.
    pub async fn open_locked(
        url: &str,
        max_connections: u32,
    ) -> Result<(Self, DataPlaneLock), StoreError> {
        let store = Self::open(url, max_connections).await?;
        match store.lock_data_plane().await {
            Ok(lock) => Ok((store, lock)),
            Err(e) => {
                store.close().await;
                Err(e)
            }
        }
    }

    async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                Cow::Owned(format!("{url}{sep}mode=rwc"))
            }
            Backend::MySql if url.starts_with("mariadb:") => {
                Cow::Owned(format!("mysql:{}", &url["mariadb:".len()..]))
            }
            _ => Cow::Borrowed(url),
        };
        let sqlite_file = match backend {
            Backend::Sqlite => sqlite_path(&url).map(str::to_owned),
            _ => None,
        };
        if let Some(path) = &sqlite_file {
            create_private_file(path);
        }
        let mut options =
            AnyConnectOptions::from_str(&url).map_err(|source| StoreError::Connect {
                backend: backend.name(),
                source,
            })?;
        options.log_settings.statements_level = tracing::log::LevelFilter::Trace;
        let session = options.clone();
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    match backend {
                        Backend::Sqlite => {
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            conn.execute("PRAGMA busy_timeout = 5000").await?;
                        }
                        Backend::MySql => {
                            conn.execute("SET time_zone = '+00:00'").await?;
                        }
                        Backend::Postgres => {
                            conn.execute("SET TIME ZONE 'UTC'").await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect {
                backend: backend.name(),
                source,
            })?;
        if backend == Backend::Sqlite {
            // WAL lets readers run beside the single writer; the setting is kept in the file.
            pool.execute("PRAGMA journal_mode = WAL").await?;
        }
        Ok(Store {
            pool,
            backend,
            options: std::sync::Arc::new(session),
            sqlite_file,
        })
    }

    /// Run the migrations that have not run yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("migrations/postgres"),
            Backend::MySql => sqlx::migrate!("migrations/mysql"),
        };
        migrator.run(&self.pool).await.map_err(StoreError::Migrate)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Rewrite `?` placeholders for the backend. Queries in this crate never contain a literal `?`.
    pub fn sql<'a>(&self, query: &'a str) -> Cow<'a, str> {
        if self.backend != Backend::Postgres {
            return Cow::Borrowed(query);
        }
        let mut out = String::with_capacity(query.len() + 8);
        let mut n = 0;
        for c in query.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        Cow::Owned(out)
    }

    /// True when a trivial query succeeds within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&self.pool)).await,
            Ok(Ok(_))
        )
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The file a SQLite URL names; `None` for an in-memory database.
fn sqlite_path(url: &str) -> Option<&str> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:" && !url.contains("mode=memory")).then_some(path)
}

/// Create the SQLite file readable by its owner only (SQLite gives its -wal and -shm files the same mode).
fn create_private_file(path: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
}

/// A new time-ordered id (UUIDv7 as text).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_url_schemes() {
        let cases = [
            ("sqlite://data/x.db", Some(Backend::Sqlite)),
            ("postgres://u@h/db", Some(Backend::Postgres)),
            ("postgresql://u@h/db", Some(Backend::Postgres)),
            ("mysql://root@h/db", Some(Backend::MySql)),
            ("mariadb://root@h/db", Some(Backend::MySql)),
            ("redis://h", None),
            ("", None),
        ];
        for (url, want) in cases {
            assert_eq!(Backend::from_url(url).ok(), want, "{url}");
        }
    }
}
