//! Login brute-force limits: failures counted per username and per client IP, with growing lockouts.
//!
//! In Redis when it is up (so that several server processes share the counts), in process memory otherwise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;
use crate::redis::Redis;

/// Thresholds and durations of the lockout rule.
#[derive(Debug, Clone, Copy)]
pub struct LimitPolicy {
    /// Failures allowed per username before the first lockout.
    pub per_user: u32,
    /// Failures allowed per client IP before the first lockout (higher: many operators may share a NAT).
    pub per_ip: u32,
    /// First lockout, in milliseconds; each further failure doubles it.
    pub base_lock_ms: i64,
    /// Longest lockout, in milliseconds.
    pub max_lock_ms: i64,
    /// Failures are forgotten after this long without a new one, in milliseconds.
    pub window_ms: i64,
}

impl Default for LimitPolicy {
    fn default() -> Self {
        LimitPolicy {
            per_user: 5,
            per_ip: 20,
            base_lock_ms: 30_000,
            max_lock_ms: 15 * 60_000,
            window_ms: 60 * 60_000,
        }
    }
}

impl LimitPolicy {
    /// Lockout after the `failures`-th failure when `free` are allowed; 0 when none.
    pub fn lock_ms(&self, failures: u32, free: u32) -> i64 {
        if failures < free {
            return 0;
        }
        let doublings = (failures - free).min(20);
        (self.base_lock_ms.saturating_mul(1 << doublings)).min(self.max_lock_ms)
    }
}

/// Most keys kept in memory; past this, entries that are not locked are evicted first.
const MAX_LOCAL_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    failures: u32,
    last_failure_ms: i64,
    locked_until_ms: i64,
}

#[derive(Clone)]
pub struct LoginLimiter {
    policy: LimitPolicy,
    redis: Option<Redis>,
    clock: Arc<dyn Clock>,
    local: Arc<Mutex<HashMap<String, Entry>>>,
}

/// The two counters a login attempt touches.
pub struct LimitKeys {
    user: String,
    ip: String,
}

impl LimitKeys {
    pub fn new(username: &str, ip: &str) -> Self {
        let user: String = username.chars().take(64).collect::<String>().to_lowercase();
        LimitKeys {
            user: format!("user:{user}"),
            ip: format!("ip:{ip}"),
        }
    }
}

impl LoginLimiter {
    pub fn new(policy: LimitPolicy, redis: Option<Redis>, clock: Arc<dyn Clock>) -> Self {
        LoginLimiter {
            policy,
            redis,
            clock,
            local: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// `Some(retry_after)` when either key is locked out now.
    pub async fn check(&self, keys: &LimitKeys) -> Option<Duration> {
        let remaining_ms = match self.redis_check(keys).await {
            Some(ms) => ms,
            None => self.local_check(keys),
        };
        (remaining_ms > 0).then(|| Duration::from_millis(u64::try_from(remaining_ms).unwrap_or(0)))
    }

    /// Count a failed attempt against both keys.
    pub async fn record_failure(&self, keys: &LimitKeys) {
        if self.redis_failure(keys).await.is_none() {
            self.local_failure(keys);
        }
    }

    /// A successful login clears the username's count (not the IP's: one valid account must not reset the
    /// counter an attacker is spending on others).
    pub async fn record_success(&self, keys: &LimitKeys) {
        if let Some(redis) = &self.redis {
            let (cnt, lock) = (
                redis.key(&format!("login:cnt:{}", keys.user)),
                redis.key(&format!("login:lock:{}", keys.user)),
            );
            let _ = redis
                .run(|mut c| async move {
                    redis::cmd("DEL")
                        .arg(&cnt)
                        .arg(&lock)
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await;
        }
        if let Ok(mut map) = self.local.lock() {
            map.remove(&keys.user);
        }
    }

    async fn redis_check(&self, keys: &LimitKeys) -> Option<i64> {
        let redis = self.redis.as_ref()?;
        let a = redis.key(&format!("login:lock:{}", keys.user));
        let b = redis.key(&format!("login:lock:{}", keys.ip));
        let (ta, tb): (i64, i64) = redis
            .run(|mut c| async move {
                redis::pipe()
                    .cmd("PTTL")
                    .arg(&a)
                    .cmd("PTTL")
                    .arg(&b)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Some(ta.max(tb).max(0))
    }

    async fn redis_failure(&self, keys: &LimitKeys) -> Option<()> {
        let redis = self.redis.as_ref()?;
        for (key, free) in [
            (&keys.user, self.policy.per_user),
            (&keys.ip, self.policy.per_ip),
        ] {
            let cnt = redis.key(&format!("login:cnt:{key}"));
            let lock = redis.key(&format!("login:lock:{key}"));
            let window = self.policy.window_ms;
            let (n,): (u32,) = redis
                .run(|mut c| async move {
                    redis::pipe()
                        .cmd("INCR")
                        .arg(&cnt)
                        .cmd("PEXPIRE")
                        .arg(&cnt)
                        .arg(window)
                        .ignore()
                        .query_async(&mut c)
                        .await
                })
                .await?;
            let lock_ms = self.policy.lock_ms(n, free);
            if lock_ms > 0 {
                redis
                    .run(|mut c| async move {
                        redis::cmd("SET")
                            .arg(&lock)
                            .arg(1)
                            .arg("PX")
                            .arg(lock_ms)
                            .query_async::<()>(&mut c)
                            .await
                    })
                    .await?;
            }
        }
        Some(())
    }

    fn local_check(&self, keys: &LimitKeys) -> i64 {
        let now = self.clock.now_ms();
        let Ok(map) = self.local.lock() else { return 0 };
        [&keys.user, &keys.ip]
            .iter()
            .filter_map(|k| map.get(*k))
            .map(|e| e.locked_until_ms - now)
            .max()
            .unwrap_or(0)
            .max(0)
    }

    fn local_failure(&self, keys: &LimitKeys) {
        let now = self.clock.now_ms();
        let Ok(mut map) = self.local.lock() else {
            return;
        };
        if map.len() >= MAX_LOCAL_ENTRIES {
            let window = self.policy.window_ms;
            map.retain(|_, e| now - e.last_failure_ms < window);
            if map.len() >= MAX_LOCAL_ENTRIES {
                map.retain(|_, e| e.locked_until_ms > now);
            }
        }
        for (key, free) in [
            (&keys.user, self.policy.per_user),
            (&keys.ip, self.policy.per_ip),
        ] {
            let e = map.entry(key.clone()).or_default();
            if now - e.last_failure_ms >= self.policy.window_ms {
                e.failures = 0;
            }
            e.failures = e.failures.saturating_add(1);
            e.last_failure_ms = now;
            let lock = self.policy.lock_ms(e.failures, free);
            if lock > 0 {
                e.locked_until_ms = now + lock;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn lockouts_start_at_the_threshold_and_grow_to_a_cap() {
        let p = LimitPolicy::default();
        assert_eq!(p.lock_ms(4, 5), 0);
        assert_eq!(p.lock_ms(5, 5), 30_000);
        assert_eq!(p.lock_ms(6, 5), 60_000);
        assert_eq!(p.lock_ms(7, 5), 120_000);
        assert_eq!(p.lock_ms(40, 5), 15 * 60_000);
    }

    #[tokio::test]
    async fn in_process_lockout_grows_and_expires() {
        let clock = ManualClock::default();
        let lim = LoginLimiter::new(LimitPolicy::default(), None, Arc::new(clock.clone()));
        let keys = LimitKeys::new("Alice", "192.0.2.1");
        for _ in 0..4 {
            lim.record_failure(&keys).await;
            assert_eq!(lim.check(&keys).await, None);
        }
        lim.record_failure(&keys).await;
        assert_eq!(lim.check(&keys).await, Some(Duration::from_secs(30)));
        // Same username in other case shares the counter.
        assert!(lim
            .check(&LimitKeys::new("alice", "198.51.100.9"))
            .await
            .is_some());
        clock.advance(Duration::from_secs(31));
        assert_eq!(lim.check(&keys).await, None);
        lim.record_failure(&keys).await;
        assert_eq!(lim.check(&keys).await, Some(Duration::from_secs(60)));
        // Another user from another IP is untouched.
        assert_eq!(
            lim.check(&LimitKeys::new("bob", "198.51.100.9")).await,
            None
        );
        // Success clears the username but not the IP count.
        clock.advance(Duration::from_secs(61));
        lim.record_success(&keys).await;
        lim.record_failure(&keys).await;
        assert_eq!(lim.check(&keys).await, None);
    }

    #[tokio::test]
    async fn ip_counter_locks_many_usernames_from_one_address() {
        let clock = ManualClock::default();
        let lim = LoginLimiter::new(LimitPolicy::default(), None, Arc::new(clock));
        for i in 0..20 {
            lim.record_failure(&LimitKeys::new(&format!("user{i}"), "203.0.113.5"))
                .await;
        }
        assert!(lim
            .check(&LimitKeys::new("fresh_user", "203.0.113.5"))
            .await
            .is_some());
        assert!(lim
            .check(&LimitKeys::new("fresh_user", "203.0.113.6"))
            .await
            .is_none());
    }
}
