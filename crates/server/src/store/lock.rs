//! The data-plane lock: one process per database serves devices and proxy doors (decision 79).
//!
//! Meters and verified credentials live in the memory of the process that serves the doors, so a second such
//! process on the same database would meter apart from the first: together they could deliver up to twice a
//! connection's limit, and each would write its own usage totals over the other's. The lock makes that a clear
//! startup error instead. It is held by a session of its own and freed when that session ends, so a crashed
//! process never leaves it behind:
//!
//! - PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`; advisory keys are per database);
//! - MySQL/MariaDB: a named lock (`GET_LOCK`, server-wide, so the name carries a digest of the database's name);
//! - SQLite: an exclusive `flock` on `<database file>.lock` beside the database (an in-memory database has
//!   nobody to share it with).

use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyConnectOptions;
use sqlx::{AnyConnection, Connection, Executor};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Backend, Store, StoreError};

/// PostgreSQL's advisory key for the lock: the bytes of "pf-plane".
const PG_KEY: i64 = 0x7066_2d70_6c61_6e65;
/// How `pg_locks` shows that key: its high and low 32 bits (`classid`, `objid`; `objsubid` 1 marks a 64-bit key).
const PG_KEY_HALVES: (i64, i64) = (PG_KEY >> 32, PG_KEY & 0xffff_ffff);
/// MySQL's named lock: this prefix and the MD5 of the database's name (54 characters, under the limit of 64).
const MYSQL_LOCK: &str = "CONCAT('proxyfleet data plane ', MD5(DATABASE()))";
/// How long a check of the lock's session may take before the session counts as gone.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a lost session is opened again while the database is unreachable.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// How long the database server keeps the lock's session when it hears nothing from it: a holder whose machine
/// died without closing its connection frees the lock after this, not after hours of TCP keep-alive defaults.
/// The holder checks its session every few seconds, well inside it.
const SESSION_IDLE_SECS: u32 = 30;

/// Held while this process serves the data plane; dropping it frees the lock.
#[derive(Clone)]
pub struct DataPlaneLock {
    held: Arc<Mutex<Held>>,
    backend: Backend,
    options: AnyConnectOptions,
}

enum Held {
    /// SQLite: the open lock file carries the `flock`.
    File(#[allow(dead_code)] std::fs::File),
    /// The session holding the lock on a database server; `None` while it is being opened again.
    Session(Option<AnyConnection>),
    /// An in-memory SQLite database.
    Nothing,
}

/// The lock went to another process while this one's session was gone.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database connection holding the data-plane lock was lost, and another process has taken the lock since"
)]
pub struct LockLost;

impl Store {
    /// Take the data-plane lock for this store's database, or fail with [`StoreError::DataPlaneLocked`] when
    /// another process holds it.
    pub async fn lock_data_plane(&self) -> Result<DataPlaneLock, StoreError> {
        let held = match self.backend {
            Backend::Sqlite => match &self.sqlite_file {
                Some(path) => Held::File(lock_file(&format!("{path}.lock")).await?),
                None => Held::Nothing,
            },
            Backend::Postgres | Backend::MySql => match take(&self.options, self.backend).await {
                Ok(Some(conn)) => Held::Session(Some(conn)),
                Ok(None) => {
                    return Err(StoreError::DataPlaneLocked {
                        held_by: "a session of another process on this database".into(),
                    })
                }
                Err(source) => {
                    return Err(StoreError::Connect {
                        backend: self.backend.name(),
                        source,
                    })
                }
            },
        };
        Ok(DataPlaneLock {
            held: Arc::new(Mutex::new(held)),
            backend: self.backend,
            options: (*self.options).clone(),
        })
    }
}

impl Store {
    /// True when some process holds the data-plane lock of this store's database; asks without taking it.
    pub async fn data_plane_locked(&self) -> Result<bool, StoreError> {
        let held = match self.backend {
            Backend::Sqlite => match &self.sqlite_file {
                Some(path) => lock_file_held(&format!("{path}.lock"))?,
                None => false,
            },
            Backend::Postgres => {
                let (class, obj) = PG_KEY_HALVES;
                sqlx::query_scalar::<_, bool>(&format!(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                     AND classid = {class} AND objid = {obj} AND objsubid = 1)"
                ))
                .fetch_one(&self.pool)
                .await?
            }
            Backend::MySql => {
                let used: i64 = sqlx::query_scalar(&format!(
                    "SELECT CAST(IS_USED_LOCK({MYSQL_LOCK}) IS NOT NULL AS SIGNED)"
                ))
                .fetch_one(&self.pool)
                .await?;
                used == 1
            }
        };
        Ok(held)
    }
}

impl DataPlaneLock {
    /// Check the lock's session every `every` until `stop` is cancelled. A session that is gone (the database
    /// restarted, the connection broke) is opened again and takes the lock again; if another process took it
    /// meanwhile, this returns [`LockLost`] and the caller must stop serving. Between the loss and the next
    /// check another process may already serve: at most `every` plus a reconnect.
    pub async fn keep(&self, every: Duration, stop: CancellationToken) -> Result<(), LockLost> {
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
            let mut held = self.held.lock().await;
            let Held::Session(session) = &mut *held else {
                return Ok(());
            };
            if let Some(conn) = session {
                if matches!(
                    tokio::time::timeout(CHECK_TIMEOUT, conn.ping()).await,
                    Ok(Ok(()))
                ) {
                    continue;
                }
                tracing::warn!("the database connection holding the data-plane lock is gone; taking the lock again");
            }
            // Dropping a broken session only closes its socket: the server has ended it, or will.
            *session = None;
            loop {
                match take(&self.options, self.backend).await {
                    Ok(Some(conn)) => {
                        *session = Some(conn);
                        tracing::info!("data-plane lock taken again");
                        break;
                    }
                    Ok(None) => return Err(LockLost),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not take the data-plane lock again; retrying")
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(RETRY_EVERY) => {}
                }
            }
        }
    }

    /// Free the lock now (it is freed on drop too, when the last clone goes).
    pub async fn release(self) {
        let mut held = self.held.lock().await;
        if let Held::Session(Some(mut conn)) = std::mem::replace(&mut *held, Held::Nothing) {
            // Closing the session would free the lock too, but only once the server has ended the session; a
            // process started right after this one returns could still find it held.
            let unlock = match self.backend {
                Backend::Postgres => format!("SELECT pg_advisory_unlock({PG_KEY})"),
                _ => format!("SELECT RELEASE_LOCK({MYSQL_LOCK})"),
            };
            if let Err(e) = sqlx::query(&unlock).execute(&mut conn).await {
                tracing::warn!(error = %e, "could not free the data-plane lock; it goes with the session");
            }
            let _ = conn.close().await;
        }
    }
}

/// A new session on a database server holding the lock; `None` when another process holds it.
async fn take(
    options: &AnyConnectOptions,
    backend: Backend,
) -> Result<Option<AnyConnection>, sqlx::Error> {
    let mut conn = AnyConnection::connect_with(options).await?;
    let took = match backend {
        Backend::Postgres => {
            for set in [
                format!("SET tcp_keepalives_idle = {}", SESSION_IDLE_SECS / 3),
                format!("SET tcp_keepalives_interval = {}", SESSION_IDLE_SECS / 6),
                "SET tcp_keepalives_count = 3".to_owned(),
            ] {
                conn.execute(set.as_str()).await?;
            }
            sqlx::query_scalar::<_, bool>(&format!("SELECT pg_try_advisory_lock({PG_KEY})"))
                .fetch_one(&mut conn)
                .await?
        }
        _ => {
            conn.execute(format!("SET SESSION wait_timeout = {SESSION_IDLE_SECS}").as_str())
                .await?;
            // 1: taken; 0: held by another session; NULL: an error (e.g. no database selected).
            let got: Option<i64> =
                sqlx::query_scalar(&format!("SELECT CAST(GET_LOCK({MYSQL_LOCK}, 0) AS SIGNED)"))
                    .fetch_one(&mut conn)
                    .await?;
            got == Some(1)
        }
    };
    if took {
        Ok(Some(conn))
    } else {
        let _ = conn.close().await;
        Ok(None)
    }
}

/// How long taking the SQLite lock file keeps trying: another process's check (`lock_file_held`) holds a shared
/// lock for a moment.
const FILE_LOCK_PATIENCE: Duration = Duration::from_millis(500);

/// Open (creating it readable by its owner only) and `flock` the SQLite lock file.
async fn lock_file(path: &str) -> Result<std::fs::File, StoreError> {
    let file = open_lock_file(path)?;
    let deadline = std::time::Instant::now() + FILE_LOCK_PATIENCE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::DataPlaneLocked {
                    held_by: format!("another process, through the lock file {path}"),
                })
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StoreError::LockFile {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// True when another process holds the SQLite lock file: a shared lock cannot be had beside it.
fn lock_file_held(path: &str) -> Result<bool, StoreError> {
    let file = open_lock_file(path)?;
    match file.try_lock_shared() {
        // Dropping the file frees the shared lock at once.
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::LockFile {
            path: path.to_owned(),
            source,
        }),
    }
}

fn open_lock_file(path: &str) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| StoreError::LockFile {
            path: path.to_owned(),
            source,
        })
}
