//! Optional Redis: the fast path for sessions and login limits, never the source of truth.
//!
//! Every command runs under a short timeout. The first failure marks Redis down; callers then fall back to SQL
//! and in-process state, and a background task reconnects. Before Redis is used again, every cached session key is
//! deleted: revocations made while Redis was unreachable live only in SQL, so stale cache entries must not
//! resurrect them. Sessions re-enter the cache from SQL on their next request.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;

/// How long one Redis command may take before Redis counts as down.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(300);
/// Pause between reconnection attempts.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    prefix: String,
    conn: Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
    recovering: AtomicBool,
    /// Bumped each time Redis comes back (after the cache flush). A cache write prepared under an older
    /// generation is dropped: it may carry state read before a revocation that only SQL saw.
    generation: AtomicU64,
    cancel: CancellationToken,
    up_gauge: prometheus::IntGauge,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL")]
pub struct RedisUrlError(#[source] redis::RedisError);

impl Redis {
    /// Does not wait for Redis: connecting happens in the background, so a dead Redis never delays startup.
    pub fn start(
        url: &Secret,
        prefix: &str,
        cancel: CancellationToken,
        up_gauge: prometheus::IntGauge,
    ) -> Result<Self, RedisUrlError> {
        let client = redis::Client::open(url.expose()).map_err(RedisUrlError)?;
        let redis = Redis {
            inner: Arc::new(Inner {
                client,
                prefix: prefix.to_owned(),
                conn: Mutex::new(None),
                up: AtomicBool::new(false),
                recovering: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                cancel,
                up_gauge,
            }),
        };
        redis.spawn_recovery();
        Ok(redis)
    }

    /// Full key for `suffix`, under this deployment's prefix.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.inner.prefix)
    }

    /// See [`Inner::generation`]; read it before reading the state you intend to cache.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// Run `f` on a connection. `None` when Redis is down or the command fails or times out (which marks it down).
    pub async fn run<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        let conn = self.inner.conn.lock().ok()?.clone()?;
        match tokio::time::timeout(COMMAND_TIMEOUT, f(conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis command failed; falling back to SQL until it recovers");
                self.mark_down();
                None
            }
            Err(_) => {
                tracing::warn!("redis command timed out; falling back to SQL until it recovers");
                self.mark_down();
                None
            }
        }
    }

    /// Mark Redis unusable and start reconnecting (once).
    pub fn mark_down(&self) {
        self.inner.up.store(false, Ordering::Release);
        self.inner.up_gauge.set(0);
        if let Ok(mut c) = self.inner.conn.lock() {
            *c = None;
        }
        self.spawn_recovery();
    }

    fn spawn_recovery(&self) {
        if self.inner.recovering.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            // The first failed attempt of an outage is a warning (a mistyped address shows at startup); the
            // retries every few seconds after it are debug lines.
            let mut warned = false;
            loop {
                if this.inner.cancel.is_cancelled() {
                    break;
                }
                match this.try_reconnect().await {
                    Ok(conn) => {
                        if let Ok(mut c) = this.inner.conn.lock() {
                            *c = Some(conn);
                        }
                        this.inner.generation.fetch_add(1, Ordering::AcqRel);
                        // Clear the flag before going up: a failure right after must be able to start a new
                        // recovery task, or Redis would stay marked down for good.
                        this.inner.recovering.store(false, Ordering::Release);
                        this.inner.up.store(true, Ordering::Release);
                        this.inner.up_gauge.set(1);
                        tracing::info!("redis is reachable; using it for sessions and rate limits");
                        return;
                    }
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(error = %e, "redis is unreachable; sessions and rate limits use SQL and memory until it is");
                    }
                    Err(e) => tracing::debug!(error = %e, "redis still unreachable"),
                }
                tokio::select! {
                    _ = this.inner.cancel.cancelled() => break,
                    _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
                }
            }
            this.inner.recovering.store(false, Ordering::Release);
        });
    }

    async fn try_reconnect(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let mut conn = self
            .inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        // Drop every cached session: see the module comment.
        let pattern = format!("{}sess:*", glob_escape(&self.inner.prefix));
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<i64>(&mut conn)
                    .await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(conn)
    }
}

/// Escape Redis glob characters so that a key prefix matches only itself in `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob_escape_makes_prefixes_literal() {
        assert_eq!(super::glob_escape("pf[1]:*?"), "pf\\[1\\]:\\*\\?");
        assert_eq!(super::glob_escape("proxyfleet:"), "proxyfleet:");
    }
}
