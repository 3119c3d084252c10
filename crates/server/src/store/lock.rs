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
use std::time::{Duration, Instant};

use sqlx::any::AnyConnectOptions;
use sqlx::{AnyConnection, Connection, Executor};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::lock_file::{lock_file, lock_file_held, lock_path};
use super::{Backend, Store, StoreError};

/// PostgreSQL's advisory key for the lock: the bytes of "pf-plane".
const PG_KEY: i64 = 0x7066_2d70_6c61_6e65;
/// MySQL's named lock: this prefix and the MD5 of the database's name (54 characters, under the limit of 64).
const MYSQL_LOCK: &str = "CONCAT('proxyfleet data plane ', MD5(DATABASE()))";
/// How long the database server keeps the lock's session when it hears nothing from it, s: a holder whose
/// machine died or was cut off frees the lock after this, not after hours of TCP defaults. Longer than
/// [`LockTiming::lease`], so that a holder cut off from its database has stopped serving before the database
/// lets anyone else take the lock.
const SESSION_GIVE_UP_SECS: u32 = 90;
/// How long one attempt to open a session and take the lock may take.
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a lost session is opened again while the database is unreachable.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// How long freeing the lock at shutdown may take before the session is simply closed.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// How the holder watches its lock.
#[derive(Debug, Clone, Copy)]
pub struct LockTiming {
    /// How often the lock's session is checked.
    pub check_every: Duration,
    /// How long a check may take before the session counts as gone.
    pub check_timeout: Duration,
    /// How long the holder goes on serving without being able to confirm that it holds the lock; after that it
    /// stops, because its session may have ended and another process may hold the lock.
    pub lease: Duration,
}

impl Default for LockTiming {
    fn default() -> Self {
        LockTiming {
            check_every: Duration::from_secs(5),
            check_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(60),
        }
    }
}

/// Held while this process serves the data plane; dropping it frees the lock.
#[derive(Clone)]
pub struct DataPlaneLock {
    held: Arc<Mutex<Held>>,
    backend: Backend,
    options: AnyConnectOptions,
    /// The tags of the sessions this process opened to hold the lock (see [`take`]).
    mine: Arc<std::sync::Mutex<Vec<i64>>>,
    /// When the lock was last known to be held (taken, or its session answered).
    confirmed: Arc<std::sync::Mutex<Instant>>,
}

enum Held {
    /// SQLite: the open lock file carries the `flock`.
    File(#[allow(dead_code)] std::fs::File),
    /// The session holding the lock on a database server; `None` while it is being opened again.
    Session(Option<AnyConnection>),
    /// An in-memory SQLite database.
    Nothing,
}

/// How many session tags are remembered (one per session opened; a few per lost session at most).
const TAGS_KEPT: usize = 32;

/// Why a holder stopped holding the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockLost {
    #[error(
        "the database connection holding the data-plane lock was lost, and another process has taken the lock since"
    )]
    Taken,
    #[error(
        "the data-plane lock could not be confirmed for {} s (the database is unreachable), so another process may \
         hold it by now",
        .0.as_secs()
    )]
    Unconfirmed(Duration),
}

/// The outcome of one attempt to take the lock.
enum Attempt {
    Took(AnyConnection),
    /// A session of another process holds it.
    Taken,
    /// It was held a moment ago and is free, or about to be, now: try again.
    Again,
}

impl Store {
    /// Take the data-plane lock for this store's database, or fail with [`StoreError::DataPlaneLocked`] when
    /// another process holds it.
    pub async fn lock_data_plane(&self) -> Result<DataPlaneLock, StoreError> {
        let mine = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = match self.backend {
            Backend::Sqlite => match &self.sqlite_file {
                Some(path) => Held::File(lock_file(&lock_path(path)).await?),
                None => Held::Nothing,
            },
            Backend::Postgres | Backend::MySql => {
                let mut tries = 0;
                loop {
                    tries += 1;
                    let attempt = tokio::time::timeout(
                        TAKE_TIMEOUT,
                        take(&self.options, self.backend, &mine),
                    )
                    .await
                    .unwrap_or(Err(sqlx::Error::PoolTimedOut));
                    match attempt {
                        Ok(Attempt::Took(conn)) => break Held::Session(Some(conn)),
                        Ok(Attempt::Again) if tries < 3 => {}
                        Ok(Attempt::Taken | Attempt::Again) => {
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
                    }
                }
            }
        };
        Ok(DataPlaneLock {
            held: Arc::new(Mutex::new(held)),
            backend: self.backend,
            options: (*self.options).clone(),
            mine,
            confirmed: Arc::new(std::sync::Mutex::new(Instant::now())),
        })
    }

    /// True when some process holds the data-plane lock of this store's database; asks without taking it.
    pub async fn data_plane_locked(&self) -> Result<bool, StoreError> {
        match self.backend {
            Backend::Sqlite => match &self.sqlite_file {
                Some(path) => lock_file_held(&lock_path(path)),
                None => Ok(false),
            },
            _ => Ok(self.data_plane_session().await?.is_some()),
        }
    }

    /// The database session that holds the data-plane lock (`pg_backend_pid()`, `CONNECTION_ID()`); always
    /// `None` on SQLite, whose lock is a file's.
    pub async fn data_plane_session(&self) -> Result<Option<i64>, StoreError> {
        if self.backend == Backend::Sqlite {
            return Ok(None);
        }
        let mut conn = self.pool.acquire().await?;
        Ok(holder(&mut conn, self.backend, Name::Plane).await?)
    }
}

impl DataPlaneLock {
    /// Watch the lock until `stop` is cancelled. A session that is gone (the database restarted, the connection
    /// broke or stalled) is replaced: a new one takes the lock again, after ending this process's old session if
    /// the database still keeps it. This returns [`LockLost`], and the caller must stop serving, when another
    /// process has taken the lock meanwhile, or when the lock could not be confirmed for `timing.lease`. Between
    /// the loss and that moment another process may already serve (decision 79).
    pub async fn keep(&self, timing: LockTiming, stop: CancellationToken) -> Result<(), LockLost> {
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(timing.check_every) => {}
            }
            {
                let mut held = self.held.lock().await;
                let Held::Session(slot) = &mut *held else {
                    return Ok(());
                };
                let Some(conn) = slot else {
                    return Ok(());
                };
                let ping = tokio::time::timeout(timing.check_timeout, conn.ping()).await;
                if matches!(ping, Ok(Ok(()))) {
                    self.confirm();
                    continue;
                }
                tracing::warn!("the database connection holding the data-plane lock is gone; taking the lock again");
                // Dropping it closes only our end: the database may keep the session, and the lock, a while.
                *slot = None;
            }
            loop {
                let left = timing.lease.saturating_sub(self.since_confirmed());
                let attempt = tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    a = tokio::time::timeout(
                        TAKE_TIMEOUT.min(left),
                        take(&self.options, self.backend, &self.mine),
                    ) => a,
                };
                match attempt {
                    Ok(Ok(Attempt::Took(conn))) => {
                        if let Held::Session(slot) = &mut *self.held.lock().await {
                            *slot = Some(conn);
                        }
                        self.confirm();
                        tracing::info!("data-plane lock taken again");
                        break;
                    }
                    Ok(Ok(Attempt::Again)) => {}
                    Ok(Ok(Attempt::Taken)) => return Err(LockLost::Taken),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not take the data-plane lock again; retrying")
                    }
                    Err(_) => {
                        tracing::warn!("taking the data-plane lock again timed out; retrying")
                    }
                }
                if self.since_confirmed() >= timing.lease {
                    return Err(LockLost::Unconfirmed(timing.lease));
                }
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(RETRY_EVERY) => {}
                }
            }
        }
    }

    fn confirm(&self) {
        if let Ok(mut c) = self.confirmed.lock() {
            *c = Instant::now();
        }
    }

    fn since_confirmed(&self) -> Duration {
        self.confirmed.lock().map_or(Duration::MAX, |c| c.elapsed())
    }

    /// Free the lock now (it is freed on drop too, when the last clone goes).
    pub async fn release(self) {
        let Ok(mut held) = tokio::time::timeout(RELEASE_TIMEOUT, self.held.lock()).await else {
            tracing::warn!("the data-plane lock is busy; it goes with its session");
            return;
        };
        if let Held::Session(Some(mut conn)) = std::mem::replace(&mut *held, Held::Nothing) {
            // Closing the session would free the lock too, but only once the server has ended the session; a
            // process started right after this one returns could still find it held.
            let unlock = Name::Plane.unlock(self.backend);
            match tokio::time::timeout(RELEASE_TIMEOUT, conn.execute(unlock.as_str())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not free the data-plane lock; it goes with the session")
                }
                Err(_) => tracing::warn!(
                    "freeing the data-plane lock timed out; it goes with the session"
                ),
            }
            let _ = tokio::time::timeout(RELEASE_TIMEOUT, conn.close()).await;
        }
    }
}

/// Open a session on a database server and take the lock without waiting.
///
/// Each session first takes a lock of its own, a tag (a random advisory key; a named lock on MySQL), and
/// records it in `mine` before it asks for the data-plane lock, so that a session of this process that it lost
/// (a broken connection, an attempt that timed out after the database had granted it) is known as ours when the
/// database still keeps it: it holds one of our tags. Such a session is ended (any role may end its own) and the
/// lock taken. A session id alone would not do: ids repeat after a database restart.
async fn take(
    options: &AnyConnectOptions,
    backend: Backend,
    mine: &std::sync::Mutex<Vec<i64>>,
) -> Result<Attempt, sqlx::Error> {
    let mut conn = AnyConnection::connect_with(options).await?;
    let tag: i64 = rand::random();
    match backend {
        Backend::Postgres => {
            // The server gives up a silent session after idle + interval × count (keep-alives), or when data it
            // sent stays unacknowledged (user timeout); any role may set these for its own session.
            for set in [
                format!("SET tcp_keepalives_idle = {}", SESSION_GIVE_UP_SECS / 3),
                format!("SET tcp_keepalives_interval = {}", SESSION_GIVE_UP_SECS / 9),
                "SET tcp_keepalives_count = 6".to_owned(),
                format!("SET tcp_user_timeout = {}", SESSION_GIVE_UP_SECS * 1000),
            ] {
                conn.execute(set.as_str()).await?;
            }
        }
        _ => {
            conn.execute(format!("SET SESSION wait_timeout = {SESSION_GIVE_UP_SECS}").as_str())
                .await?;
        }
    }
    if !try_lock(&mut conn, backend, Name::Tag(tag)).await? {
        // (A random key already in use: astronomically unlikely, and the next attempt draws another.)
        let _ = conn.close().await;
        return Ok(Attempt::Again);
    }
    if let Ok(mut m) = mine.lock() {
        m.push(tag);
        if m.len() > TAGS_KEPT {
            m.remove(0);
        }
    }
    if try_lock(&mut conn, backend, Name::Plane).await? {
        return Ok(Attempt::Took(conn));
    }
    let Some(by) = holder(&mut conn, backend, Name::Plane).await? else {
        let _ = conn.close().await;
        return Ok(Attempt::Again);
    };
    let tags: Vec<i64> = mine.lock().map(|m| m.clone()).unwrap_or_default();
    let mut ours = false;
    for t in tags.into_iter().filter(|t| *t != tag) {
        if holder(&mut conn, backend, Name::Tag(t)).await? == Some(by) {
            ours = true;
            break;
        }
    }
    if !ours {
        let _ = conn.close().await;
        return Ok(Attempt::Taken);
    }
    let end = match backend {
        Backend::Postgres => format!("SELECT pg_terminate_backend({by})"),
        _ => format!("KILL {by}"),
    };
    conn.execute(end.as_str()).await?;
    // The server lets the ended session go in a moment.
    let deadline = Instant::now() + RETRY_EVERY;
    while Instant::now() < deadline {
        if try_lock(&mut conn, backend, Name::Plane).await? {
            return Ok(Attempt::Took(conn));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = conn.close().await;
    Ok(Attempt::Again)
}

/// A lock on the database server: the data-plane lock, or a session's tag.
#[derive(Clone, Copy)]
enum Name {
    Plane,
    Tag(i64),
}

impl Name {
    /// The PostgreSQL advisory key.
    fn pg_key(self) -> i64 {
        match self {
            Name::Plane => PG_KEY,
            Name::Tag(t) => t,
        }
    }

    /// The MySQL lock name, as an SQL expression.
    fn mysql(self) -> String {
        match self {
            Name::Plane => MYSQL_LOCK.to_owned(),
            Name::Tag(t) => format!("'proxyfleet session {t}'"),
        }
    }

    /// The statement that frees it.
    fn unlock(self, backend: Backend) -> String {
        match backend {
            Backend::Postgres => format!("SELECT pg_advisory_unlock({})", self.pg_key()),
            _ => format!("SELECT RELEASE_LOCK({})", self.mysql()),
        }
    }
}

/// Ask for lock `name` on `conn` without waiting.
async fn try_lock(
    conn: &mut AnyConnection,
    backend: Backend,
    name: Name,
) -> Result<bool, sqlx::Error> {
    match backend {
        Backend::Postgres => {
            sqlx::query_scalar::<_, bool>(&format!(
                "SELECT pg_try_advisory_lock({})",
                name.pg_key()
            ))
            .fetch_one(conn)
            .await
        }
        _ => {
            // 1: taken; 0: held by another session; NULL: an error (no database selected, say).
            let got: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT CAST(GET_LOCK({}, 0) AS SIGNED)",
                name.mysql()
            ))
            .fetch_one(conn)
            .await?;
            got.map(|g| g == 1).ok_or_else(|| {
                sqlx::Error::Protocol(
                    "GET_LOCK answered NULL: the database URL must name a database".into(),
                )
            })
        }
    }
}

/// The session holding lock `name`, as the database server names it; `None` when nobody holds it.
async fn holder(
    conn: &mut AnyConnection,
    backend: Backend,
    name: Name,
) -> Result<Option<i64>, sqlx::Error> {
    let sql = match backend {
        // `pg_locks` shows a 64-bit advisory key as its high and low halves (unsigned), with `objsubid` 1.
        Backend::Postgres => {
            let bits = name.pg_key() as u64;
            format!(
                "SELECT CAST(pid AS BIGINT) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND classid = {} AND objid = {} AND objsubid = 1",
                bits >> 32,
                bits & 0xffff_ffff
            )
        }
        _ => format!("SELECT CAST(IS_USED_LOCK({}) AS SIGNED)", name.mysql()),
    };
    let id: Option<Option<i64>> = sqlx::query_scalar(&sql).fetch_optional(conn).await?;
    Ok(id.flatten())
}
