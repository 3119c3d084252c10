//! Operator sessions: created at login, validated on every request, revoked on logout, password change,
//! operator disable/delete, or idleness.
//!
//! SQL holds every session and is the source of truth for revocation. When Redis is up it caches live sessions
//! (`sess:{jti}`, carrying last activity) and holds revocation tombstones (`revoked:{jti}`) so that a cache entry
//! written by a racing request can never outlive a revocation. Idle activity slides inside the absolute 24 h limit.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::jwt::{Claims, JwtError, JwtKeys, AUDIENCE, ISSUER, TOKEN_LIFETIME_SECS};
use crate::clock::Clock;
use crate::redis::Redis;
use crate::store::{new_id, NewSession, Operator, SessionRow, Store, StoreError};

/// How long a Redis-cached session is trusted before SQL is asked again (revocation, disabled operator), and
/// how stale SQL's `last_activity_at` may get meanwhile, in milliseconds.
const SQL_TOUCH_INTERVAL_MS: i64 = 30_000;
/// Without Redis, activity is written at most this often per session, in milliseconds.
const SQL_ONLY_TOUCH_INTERVAL_MS: i64 = 10_000;

/// A live, validated session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub operator_id: String,
    pub username: String,
    /// Unix milliseconds, UTC.
    pub expires_at: i64,
    pub last_activity_at: i64,
    /// When SQL last heard of this session's activity (Redis path only).
    #[serde(default)]
    sql_touched_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Jwt(#[from] JwtError),
}

#[derive(Clone)]
pub struct Sessions {
    store: Store,
    redis: Option<Redis>,
    clock: Arc<dyn Clock>,
    keys: JwtKeys,
    idle_ms: i64,
}

/// A freshly issued token and its session.
pub struct Issued {
    pub token: String,
    pub session: Session,
}

impl Sessions {
    pub fn new(
        store: Store,
        redis: Option<Redis>,
        clock: Arc<dyn Clock>,
        keys: JwtKeys,
        idle: std::time::Duration,
    ) -> Self {
        Sessions {
            store,
            redis,
            clock,
            keys,
            idle_ms: i64::try_from(idle.as_millis()).unwrap_or(i64::MAX),
        }
    }

    pub fn idle_ms(&self) -> i64 {
        self.idle_ms
    }

    /// Start a session for `op` and sign its token.
    pub async fn create(
        &self,
        op: &Operator,
        ip: &str,
        user_agent: &str,
    ) -> Result<Issued, SessionError> {
        let now = self.clock.now_ms();
        let iat = now / 1000;
        let exp = iat + TOKEN_LIFETIME_SECS;
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let id = new_id();
        let ua: String = user_agent.chars().take(512).collect();
        self.store
            .insert_session(NewSession {
                id: &id,
                jti: &jti,
                operator_id: &op.id,
                created_at: now,
                expires_at: exp * 1000,
                ip,
                user_agent: &ua,
            })
            .await?;
        let token = self.keys.sign(&Claims {
            sub: op.id.clone(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat,
            exp,
            jti,
        })?;
        Ok(Issued {
            token,
            session: Session {
                id,
                operator_id: op.id.clone(),
                username: op.username.clone(),
                expires_at: exp * 1000,
                last_activity_at: now,
                sql_touched_at: now,
            },
        })
    }

    /// Check a bearer token. `Ok(None)` for anything that is not a live session; records activity.
    pub async fn validate(&self, token: &str) -> Result<Option<Session>, SessionError> {
        let Ok(claims) = self.keys.verify(token) else {
            return Ok(None);
        };
        let now = self.clock.now_ms();
        if let Some(redis) = &self.redis {
            let generation = redis.generation();
            match self.validate_cached(redis, &claims, now, generation).await {
                Cached::Valid(s) => return Ok(Some(s)),
                Cached::Invalid => return Ok(None),
                Cached::Unknown => {}
            }
        }
        let generation = self.redis.as_ref().map_or(0, Redis::generation);
        self.validate_sql(&claims, now, generation).await
    }

    async fn validate_cached(
        &self,
        redis: &Redis,
        claims: &Claims,
        now: i64,
        generation: u64,
    ) -> Cached {
        let sess_key = redis.key(&format!("sess:{}", claims.jti));
        let tomb_key = redis.key(&format!("revoked:{}", claims.jti));
        let k = sess_key.clone();
        let Some((entry, tomb)): Option<(Option<String>, Option<String>)> = redis
            .run(|mut c| async move {
                redis::cmd("MGET")
                    .arg(&k)
                    .arg(&tomb_key)
                    .query_async(&mut c)
                    .await
            })
            .await
        else {
            return Cached::Unknown;
        };
        if tomb.is_some() {
            return Cached::Invalid;
        }
        let Some(mut s) = entry.and_then(|e| serde_json::from_str::<Session>(&e).ok()) else {
            return Cached::Unknown;
        };
        if s.operator_id != claims.sub || now >= s.expires_at {
            return Cached::Invalid;
        }
        if now - s.last_activity_at > self.idle_ms
            || now - s.sql_touched_at >= SQL_TOUCH_INTERVAL_MS
        {
            // Idle (let SQL record it), or time to re-check SQL: a revocation made by a node that could not reach
            // Redis, or an operator disabled meanwhile, is seen within this interval on every node.
            return Cached::Unknown;
        }
        s.last_activity_at = now;
        self.cache(redis, &claims.jti, &s, now, generation).await;
        Cached::Valid(s)
    }

    async fn validate_sql(
        &self,
        claims: &Claims,
        now: i64,
        generation: u64,
    ) -> Result<Option<Session>, SessionError> {
        let Some(row) = self.store.session_by_jti(&claims.jti).await? else {
            return Ok(None);
        };
        if row.operator_id != claims.sub
            || row.revoked_at.is_some()
            || row.operator_disabled_at.is_some()
            || now >= row.expires_at
        {
            return Ok(None);
        }
        if now - row.last_activity_at > self.idle_ms {
            self.revoke_row(&row, now, "idle").await?;
            return Ok(None);
        }
        let mut touched = row.last_activity_at;
        let interval = if self.redis.is_some() {
            0
        } else {
            SQL_ONLY_TOUCH_INTERVAL_MS
        };
        if now - row.last_activity_at >= interval {
            self.store.touch_session(&row.id, now).await?;
            touched = now;
        }
        let s = Session {
            id: row.id,
            operator_id: row.operator_id,
            username: row.username,
            expires_at: row.expires_at,
            last_activity_at: now,
            sql_touched_at: touched,
        };
        if let Some(redis) = &self.redis {
            self.cache(redis, &claims.jti, &s, now, generation).await;
        }
        Ok(Some(s))
    }

    async fn cache(&self, redis: &Redis, jti: &str, s: &Session, now: i64, generation: u64) {
        if redis.generation() != generation {
            // Redis went away and came back since `s` was read; `s` may predate a revocation only SQL saw.
            return;
        }
        let ttl = self.idle_ms.min(s.expires_at - now).max(1);
        let Ok(value) = serde_json::to_string(s) else {
            return;
        };
        let key = redis.key(&format!("sess:{jti}"));
        let _ = redis
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .arg("PX")
                    .arg(ttl)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
    }

    async fn revoke_row(
        &self,
        row: &SessionRow,
        now: i64,
        reason: &str,
    ) -> Result<(), SessionError> {
        self.store
            .revoke_session(&row.operator_id, &row.id, now, reason)
            .await?;
        self.forget(std::slice::from_ref(&row.jti), row.expires_at - now)
            .await;
        Ok(())
    }

    /// Revoke one of `operator_id`'s sessions. False when the operator has no such live session.
    pub async fn revoke(
        &self,
        operator_id: &str,
        session_id: &str,
        reason: &str,
    ) -> Result<bool, SessionError> {
        let now = self.clock.now_ms();
        match self
            .store
            .revoke_session(operator_id, session_id, now, reason)
            .await?
        {
            Some(jti) => {
                self.forget(&[jti], TOKEN_LIFETIME_SECS * 1000).await;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Revoke every session of an operator except `keep`.
    pub async fn revoke_all(
        &self,
        operator_id: &str,
        keep: Option<&str>,
        reason: &str,
    ) -> Result<usize, SessionError> {
        let now = self.clock.now_ms();
        let jtis = self
            .store
            .revoke_operator_sessions(operator_id, keep, now, reason)
            .await?;
        self.forget(&jtis, TOKEN_LIFETIME_SECS * 1000).await;
        Ok(jtis.len())
    }

    /// Tombstone and uncache revoked sessions in Redis. If Redis is down this does nothing, and the cache is
    /// flushed before Redis is used again (see `crate::redis`).
    async fn forget(&self, jtis: &[String], ttl_ms: i64) {
        let Some(redis) = &self.redis else { return };
        if jtis.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for jti in jtis {
            pipe.cmd("SET")
                .arg(redis.key(&format!("revoked:{jti}")))
                .arg(1)
                .arg("PX")
                .arg(ttl_ms.max(1))
                .ignore();
            pipe.cmd("DEL")
                .arg(redis.key(&format!("sess:{jti}")))
                .ignore();
        }
        let _ = redis
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await;
    }

    /// The operator's live sessions, with last activity from Redis where it is fresher than SQL.
    pub async fn list(&self, operator_id: &str) -> Result<Vec<SessionRow>, SessionError> {
        let now = self.clock.now_ms();
        let mut rows = self
            .store
            .active_sessions(operator_id, now, now - self.idle_ms - SQL_TOUCH_INTERVAL_MS)
            .await?;
        if let (Some(redis), false) = (&self.redis, rows.is_empty()) {
            let keys: Vec<String> = rows
                .iter()
                .map(|r| redis.key(&format!("sess:{}", r.jti)))
                .collect();
            if let Some(values) = redis
                .run(|mut c| async move {
                    redis::cmd("MGET")
                        .arg(&keys)
                        .query_async::<Vec<Option<String>>>(&mut c)
                        .await
                })
                .await
            {
                for (row, v) in rows.iter_mut().zip(values) {
                    if let Some(s) = v.and_then(|v| serde_json::from_str::<Session>(&v).ok()) {
                        row.last_activity_at = row.last_activity_at.max(s.last_activity_at);
                    }
                }
            }
        }
        rows.retain(|r| now - r.last_activity_at <= self.idle_ms);
        Ok(rows)
    }
}

enum Cached {
    Valid(Session),
    Invalid,
    Unknown,
}
