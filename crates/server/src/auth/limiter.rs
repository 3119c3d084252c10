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

/// Most keys kept in memory; past this, entries that are neither locked nor busy are evicted first.
const MAX_LOCAL_ENTRIES: usize = 100_000;
/// Safety expiry of a Redis in-flight counter, in milliseconds (a crashed process cannot hold a slot longer).
const BUSY_TTL_MS: i64 = 60_000;
/// `Retry-After` for an attempt refused because the allowance is taken by attempts still being verified.
const BUSY_RETRY_MS: i64 = 1_000;
/// How often [`LoginLimiter::begin_waiting`] asks again while the allowance is in use.
const BUSY_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    failures: u32,
    busy: u32,
    last_failure_ms: i64,
    locked_until_ms: i64,
}

/// Login limits. An attempt is counted *before* its password is verified ([`LoginLimiter::begin`]), so a burst of
/// parallel guesses gets no more verifications than the allowance: while a key has `n` failures, at most
/// `max(free - n, 1)` attempts may be in flight for it.
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
        Self::namespaced("", username, ip)
    }

    /// Keys in their own namespace, so that another kind of login (proxy customers) never shares counts with
    /// operator logins.
    pub fn namespaced(ns: &str, username: &str, ip: &str) -> Self {
        let user: String = username.chars().take(64).collect::<String>().to_lowercase();
        LimitKeys {
            user: format!("{ns}user:{user}"),
            ip: format!("{ns}ip:{}", ip_bucket(ip)),
        }
    }
}

/// IPv6 clients are counted per /64 (one subscriber's usual allocation); IPv4 per address.
fn ip_bucket(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        _ => ip.to_owned(),
    }
}

/// An admitted attempt; finish it with [`LoginLimiter::failed`] or [`LoginLimiter::succeeded`].
#[must_use]
pub struct Attempt {
    on_redis: bool,
}

/// BEGIN: refuse when locked (returns the lock's remaining ms) or when the in-flight allowance is taken (returns
/// -1); otherwise take a slot and return 0. KEYS: user fail, user busy, user lock, ip fail, ip busy, ip lock.
/// ARGV: user free, ip free, busy ttl.
const BEGIN_LUA: &str = r#"
local t = math.max(redis.call('PTTL', KEYS[3]), redis.call('PTTL', KEYS[6]))
if t > 0 then return t end
local function admit(fail, busy, free)
  local f = tonumber(redis.call('GET', fail) or '0')
  local b = redis.call('INCR', busy)
  redis.call('PEXPIRE', busy, ARGV[3])
  return b <= math.max(free - f, 1)
end
local u = admit(KEYS[1], KEYS[2], tonumber(ARGV[1]))
local i = admit(KEYS[4], KEYS[5], tonumber(ARGV[2]))
if u and i then return 0 end
redis.call('DECR', KEYS[2])
redis.call('DECR', KEYS[5])
return -1
"#;

/// FAILED: release the slots, count the failure, lock when over the allowance. KEYS as BEGIN.
/// ARGV: user free, ip free, window ms, base lock ms, max lock ms.
const FAILED_LUA: &str = r#"
local function fail(failk, busyk, lockk, free)
  if tonumber(redis.call('DECR', busyk)) < 0 then redis.call('SET', busyk, 0) end
  local f = redis.call('INCR', failk)
  redis.call('PEXPIRE', failk, ARGV[3])
  if f >= free then
    local ms = math.min(tonumber(ARGV[4]) * 2 ^ math.min(f - free, 20), tonumber(ARGV[5]))
    redis.call('SET', lockk, 1, 'PX', math.floor(ms))
  end
end
fail(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
fail(KEYS[4], KEYS[5], KEYS[6], tonumber(ARGV[2]))
return 0
"#;

/// SUCCEEDED: release the slots; clear the username's failures and lock (not the IP's). KEYS as BEGIN.
const SUCCEEDED_LUA: &str = r#"
if tonumber(redis.call('DECR', KEYS[2])) < 0 then redis.call('SET', KEYS[2], 0) end
if tonumber(redis.call('DECR', KEYS[5])) < 0 then redis.call('SET', KEYS[5], 0) end
redis.call('DEL', KEYS[1], KEYS[3])
return 0
"#;

/// RELEASE: give the slots back without counting anything (the attempt ended in an internal error).
const RELEASE_LUA: &str = r#"
if tonumber(redis.call('DECR', KEYS[2])) < 0 then redis.call('SET', KEYS[2], 0) end
if tonumber(redis.call('DECR', KEYS[5])) < 0 then redis.call('SET', KEYS[5], 0) end
return 0
"#;

impl LoginLimiter {
    pub fn new(policy: LimitPolicy, redis: Option<Redis>, clock: Arc<dyn Clock>) -> Self {
        LoginLimiter {
            policy,
            redis,
            clock,
            local: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn redis_keys(redis: &Redis, keys: &LimitKeys) -> Vec<String> {
        let mut out = Vec::with_capacity(6);
        for k in [&keys.user, &keys.ip] {
            for kind in ["fail", "busy", "lock"] {
                out.push(redis.key(&format!("login:{kind}:{k}")));
            }
        }
        out
    }

    async fn script(&self, code: &'static str, keys: &LimitKeys, args: &[i64]) -> Option<i64> {
        let redis = self.redis.as_ref()?;
        let script = redis::Script::new(code);
        let mut inv = script.prepare_invoke();
        for k in Self::redis_keys(redis, keys) {
            inv.key(k);
        }
        for a in args {
            inv.arg(*a);
        }
        redis
            .run(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await
    }

    /// Admit an attempt, or `Err(retry_after)` when the keys are locked out or their allowance is in use.
    pub async fn begin(&self, keys: &LimitKeys) -> Result<Attempt, Duration> {
        self.begin_waiting(keys, Duration::ZERO).await
    }

    /// [`Self::begin`], but while the keys' allowance is only in use by attempts still being checked (not locked
    /// out), wait up to `most` for one of them to end instead of refusing at once. Many right passwords arriving
    /// together from one address (a customer's backend using its connections for the first time) are then checked
    /// in turn; never more than the allowance are in flight, so guessing gains nothing.
    pub async fn begin_waiting(
        &self,
        keys: &LimitKeys,
        most: Duration,
    ) -> Result<Attempt, Duration> {
        let p = &self.policy;
        let args = [i64::from(p.per_user), i64::from(p.per_ip), BUSY_TTL_MS];
        let until = tokio::time::Instant::now() + most;
        loop {
            let (verdict, on_redis) = match self.script(BEGIN_LUA, keys, &args).await {
                Some(v) => (v, true),
                None => (self.local_begin(keys), false),
            };
            match verdict {
                0 => return Ok(Attempt { on_redis }),
                v if v < 0 && tokio::time::Instant::now() < until => {
                    // Jittered, so that waiters do not all ask again at the same moment.
                    let pause = BUSY_POLL.mul_f64(0.5 + rand::random::<f64>());
                    tokio::time::sleep(pause).await;
                }
                v if v < 0 => return Err(ms(BUSY_RETRY_MS)),
                v => return Err(ms(v)),
            }
        }
    }

    /// The attempt's password was wrong (or the account unusable).
    pub async fn failed(&self, keys: &LimitKeys, attempt: Attempt) {
        let p = &self.policy;
        let args = [
            i64::from(p.per_user),
            i64::from(p.per_ip),
            p.window_ms,
            p.base_lock_ms,
            p.max_lock_ms,
        ];
        if attempt.on_redis && self.script(FAILED_LUA, keys, &args).await.is_some() {
            return;
        }
        self.local_end(keys, false);
    }

    /// The attempt succeeded: the username's count is cleared (not the IP's: one valid account must not reset
    /// the counter an attacker is spending on others).
    pub async fn succeeded(&self, keys: &LimitKeys, attempt: Attempt) {
        if attempt.on_redis && self.script(SUCCEEDED_LUA, keys, &[]).await.is_some() {
            return;
        }
        self.local_end(keys, true);
    }

    /// The attempt could not be judged (store or hasher error): free its slot, count nothing.
    pub async fn release(&self, keys: &LimitKeys, attempt: Attempt) {
        if attempt.on_redis && self.script(RELEASE_LUA, keys, &[]).await.is_some() {
            return;
        }
        if let Ok(mut map) = self.local.lock() {
            for k in [&keys.user, &keys.ip] {
                if let Some(e) = map.get_mut(k) {
                    e.busy = e.busy.saturating_sub(1);
                }
            }
        }
    }

    fn local_begin(&self, keys: &LimitKeys) -> i64 {
        let now = self.clock.now_ms();
        let Ok(mut map) = self.local.lock() else {
            return 0;
        };
        let locked = [&keys.user, &keys.ip]
            .iter()
            .filter_map(|k| map.get(*k))
            .map(|e| e.locked_until_ms - now)
            .max()
            .unwrap_or(0);
        if locked > 0 {
            return locked;
        }
        if map.len() >= MAX_LOCAL_ENTRIES {
            let window = self.policy.window_ms;
            map.retain(|_, e| e.busy > 0 || now - e.last_failure_ms < window);
            if map.len() >= MAX_LOCAL_ENTRIES {
                map.retain(|_, e| e.busy > 0 || e.locked_until_ms > now);
            }
        }
        let window = self.policy.window_ms;
        let admits = |e: &Entry, free: u32| {
            let failures = if now - e.last_failure_ms >= window {
                0
            } else {
                e.failures
            };
            e.busy < free.saturating_sub(failures).max(1)
        };
        let user = map.get(&keys.user).copied().unwrap_or_default();
        let ip = map.get(&keys.ip).copied().unwrap_or_default();
        if !(admits(&user, self.policy.per_user) && admits(&ip, self.policy.per_ip)) {
            return -1;
        }
        for k in [&keys.user, &keys.ip] {
            map.entry(k.clone()).or_default().busy += 1;
        }
        0
    }

    fn local_end(&self, keys: &LimitKeys, success: bool) {
        let now = self.clock.now_ms();
        let Ok(mut map) = self.local.lock() else {
            return;
        };
        for (key, free) in [
            (&keys.user, self.policy.per_user),
            (&keys.ip, self.policy.per_ip),
        ] {
            let e = map.entry(key.clone()).or_default();
            e.busy = e.busy.saturating_sub(1);
            if success {
                continue;
            }
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
        if success {
            map.remove(&keys.user);
        }
    }
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v).unwrap_or(0))
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

    async fn fail(lim: &LoginLimiter, keys: &LimitKeys) {
        let a = lim.begin(keys).await.expect("admitted");
        lim.failed(keys, a).await;
    }

    #[tokio::test]
    async fn in_process_lockout_grows_and_expires() {
        let clock = ManualClock::default();
        let lim = LoginLimiter::new(LimitPolicy::default(), None, Arc::new(clock.clone()));
        let keys = LimitKeys::new("Alice", "192.0.2.1");
        for _ in 0..5 {
            fail(&lim, &keys).await;
        }
        assert_eq!(lim.begin(&keys).await.err(), Some(Duration::from_secs(30)));
        // Same username in other case shares the counter.
        assert!(lim
            .begin(&LimitKeys::new("alice", "198.51.100.9"))
            .await
            .is_err());
        clock.advance(Duration::from_secs(31));
        fail(&lim, &keys).await;
        assert_eq!(lim.begin(&keys).await.err(), Some(Duration::from_secs(60)));
        // Another user from another IP is untouched.
        let bob = LimitKeys::new("bob", "198.51.100.9");
        let a = lim.begin(&bob).await.expect("bob admitted");
        lim.succeeded(&bob, a).await;
        // Success clears the username but not the IP count.
        clock.advance(Duration::from_secs(61));
        let a = lim.begin(&keys).await.expect("admitted after the lock");
        lim.succeeded(&keys, a).await;
        fail(&lim, &keys).await;
        assert!(
            lim.begin(&keys).await.is_ok(),
            "one failure after a success does not lock"
        );
    }

    #[tokio::test]
    async fn parallel_attempts_get_no_more_than_the_allowance() {
        let lim = LoginLimiter::new(
            LimitPolicy::default(),
            None,
            Arc::new(ManualClock::default()),
        );
        let keys = LimitKeys::new("target", "192.0.2.7");
        // A burst: only 5 attempts may be in flight for a fresh username; the rest are refused.
        let mut admitted = Vec::new();
        for _ in 0..50 {
            if let Ok(a) = lim.begin(&keys).await {
                admitted.push(a);
            }
        }
        assert_eq!(admitted.len(), 5);
        assert_eq!(lim.begin(&keys).await.err(), Some(Duration::from_secs(1)));
        for a in admitted {
            lim.failed(&keys, a).await;
        }
        assert_eq!(
            lim.begin(&keys).await.err(),
            Some(Duration::from_secs(30)),
            "then the lockout"
        );
    }

    /// Right passwords arriving together from one address wait for the allowance instead of being refused; a
    /// lockout is still answered at once.
    #[tokio::test]
    async fn a_busy_allowance_is_waited_for_and_a_lockout_is_not() {
        let lim = LoginLimiter::new(
            LimitPolicy::default(),
            None,
            Arc::new(ManualClock::default()),
        );
        let keys = LimitKeys::new("shared", "192.0.2.9");
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(lim.begin(&keys).await.expect("admitted"));
        }
        assert!(lim.begin(&keys).await.is_err(), "the allowance is in use");
        let (waited, ()) = tokio::join!(lim.begin_waiting(&keys, Duration::from_secs(5)), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(a) = held.pop() {
                lim.succeeded(&keys, a).await;
            }
        });
        assert!(waited.is_ok(), "admitted once an attempt in flight ended");

        let locked = LimitKeys::new("locked", "192.0.2.10");
        for _ in 0..5 {
            fail(&lim, &locked).await;
        }
        let t = std::time::Instant::now();
        assert_eq!(
            lim.begin_waiting(&locked, Duration::from_secs(5))
                .await
                .err(),
            Some(Duration::from_secs(30))
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a lockout is not waited out"
        );
    }

    #[tokio::test]
    async fn released_attempts_count_nothing() {
        let lim = LoginLimiter::new(
            LimitPolicy::default(),
            None,
            Arc::new(ManualClock::default()),
        );
        let keys = LimitKeys::new("carol", "192.0.2.8");
        for _ in 0..20 {
            let a = lim.begin(&keys).await.expect("admitted");
            lim.release(&keys, a).await;
        }
        assert!(lim.begin(&keys).await.is_ok());
    }

    #[tokio::test]
    async fn ip_counter_locks_many_usernames_from_one_address() {
        let lim = LoginLimiter::new(
            LimitPolicy::default(),
            None,
            Arc::new(ManualClock::default()),
        );
        for i in 0..20 {
            fail(&lim, &LimitKeys::new(&format!("user{i}"), "203.0.113.5")).await;
        }
        assert!(lim
            .begin(&LimitKeys::new("fresh_user", "203.0.113.5"))
            .await
            .is_err());
        assert!(lim
            .begin(&LimitKeys::new("fresh_user", "203.0.113.6"))
            .await
            .is_ok());
        // IPv6 addresses in one /64 share a counter.
        for i in 0..20 {
            fail(
                &lim,
                &LimitKeys::new(&format!("user{i}"), &format!("2001:db8:1:2::{i:x}")),
            )
            .await;
        }
        assert!(lim
            .begin(&LimitKeys::new("fresh_user", "2001:db8:1:2:ffff::1"))
            .await
            .is_err());
        assert!(lim
            .begin(&LimitKeys::new("fresh_user", "2001:db8:1:3::1"))
            .await
            .is_ok());
    }
}
