//! The proxy directory: every connection in memory, with its meter, its flows' kill switch and its verified
//! credential, so that a flow's admission and a byte's accounting never touch the store.
//!
//! The store stays the truth for settings (the API writes there first, then here). Usage is the exception: it lives
//! here and is flushed on an interval (see [`Directory::flush`]); a crash loses at most one interval.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::auth::limiter::{LimitKeys, LoginLimiter};
use crate::auth::password::Hasher;
use crate::clock::Clock;
use crate::store::{ConnectionRow, Store, StoreError, UsageBucket};

const HOUR_MS: i64 = 3_600_000;

/// Why a connection takes no new flows (and why its open flows were closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Exhausted,
    Disabled,
    NoDevice,
    /// Its device was revoked: it will not carry traffic again until the connection is given another device.
    DeviceRevoked,
    Deleted,
}

impl Refusal {
    /// Why a connection in this state refuses new flows, if it does (one rule for the meter and for a row read
    /// from the store).
    pub fn of(
        enabled: bool,
        used: u64,
        limit: Option<u64>,
        has_device: bool,
        device_revoked: bool,
    ) -> Option<Refusal> {
        if !enabled {
            Some(Refusal::Disabled)
        } else if limit.is_some_and(|l| used >= l) {
            Some(Refusal::Exhausted)
        } else if !has_device {
            Some(Refusal::NoDevice)
        } else if device_revoked {
            Some(Refusal::DeviceRevoked)
        } else {
            None
        }
    }

    /// What the customer is told.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Exhausted => "bandwidth limit reached",
            Refusal::Disabled => "connection disabled",
            Refusal::NoDevice => "connection has no device",
            Refusal::DeviceRevoked => "the connection's device was revoked",
            Refusal::Deleted => "connection deleted",
        }
    }
}

/// Direction of a byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Customer to target.
    Up,
    /// Target to customer.
    Down,
}

#[derive(Debug)]
struct Pending {
    device: Arc<str>,
    hour: i64,
    up: u64,
    down: u64,
}

/// How long a password check waits for the client address's allowance while it is only in use by other checks
/// (a customer's backend opening many connections' first flows at once), before the flow gets `429`.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many wrong passwords per connection are remembered as such ([`State::refused`]): enough for the stale
/// clients of one customer, too few to matter as memory.
const REFUSED_KEPT: usize = 8;

#[derive(Debug)]
struct State {
    device_id: Option<Arc<str>>,
    /// `device_id` names a revoked device.
    device_revoked: bool,
    password_hash: Option<Arc<str>>,
    /// Keyed digest of the password last verified against `password_hash` (never the password itself).
    verified: Option<[u8; 32]>,
    /// Keyed digests of passwords already found wrong against `password_hash`, the newest last (at most
    /// [`REFUSED_KEPT`]). A client that repeats one (a stale configuration, an old password after a regenerate) is
    /// answered without bcrypt and without counting toward the username's lockout, which it would otherwise hold
    /// shut for every client with the right password. A new guess still costs bcrypt and counts.
    refused: Vec<[u8; 32]>,
    limit: Option<u64>,
    used: u64,
    enabled: bool,
    deleted: bool,
    allow: Vec<IpNet>,
    dedicated_port: Option<u16>,
    /// Usage changed since the last flush.
    dirty: bool,
    pending: Vec<Pending>,
    /// Cancelled to close every open flow; replaced when flows may run again. A child of `shutdown`, so that one
    /// token per flow says both "this connection stops" and "the server stops".
    flows: CancellationToken,
    shutdown: CancellationToken,
    /// Cancelled (and replaced) when the password changes: sessions that logged in with the old one end (the VPN
    /// door's sessions; proxy flows are per request and keep running).
    credential: CancellationToken,
}

impl State {
    fn refusal(&self) -> Option<Refusal> {
        if self.deleted {
            Some(Refusal::Deleted)
        } else {
            Refusal::of(
                self.enabled,
                self.used,
                self.limit,
                self.device_id.is_some(),
                self.device_revoked,
            )
        }
    }

    /// Whether the connection still has `hash` (the same one, not an equal one: a new password is a new string).
    fn has_hash(&self, hash: &Option<Arc<str>>) -> bool {
        self.password_hash.as_ref().map(|h| h.as_ptr()) == hash.as_ref().map(|h| h.as_ptr())
    }

    /// Close every open flow now; new flows get a fresh switch once the connection admits them again.
    fn close_flows(&mut self) {
        self.flows.cancel();
    }

    /// After any change: a refusing connection has no open flows; an admitting one has a live switch.
    fn settle(&mut self) {
        if self.refusal().is_some() {
            self.flows.cancel();
        } else if self.flows.is_cancelled() {
            self.flows = self.shutdown.child_token();
        }
    }
}

/// One connection as the data plane sees it.
#[derive(Debug)]
pub struct Entry {
    pub id: String,
    pub operator_id: String,
    pub username: String,
    state: Mutex<State>,
    /// One bcrypt verification per connection at a time: flows that miss the cache together wait for it.
    verify: tokio::sync::Mutex<()>,
    /// Flows of this connection open now (see `relay::FlowSlot`).
    pub(crate) open_flows: std::sync::atomic::AtomicUsize,
    sink: QuotaSink,
}

/// What the entry already knows of the password whose digest is `d`: `Some(true)` verified, `Some(false)` found
/// wrong, `None` not checked yet.
fn known(entry: &Entry, d: &[u8; 32]) -> Option<bool> {
    let s = lock(&entry.state);
    if s.verified.as_ref() == Some(d) {
        Some(true)
    } else if s.refused.contains(d) {
        Some(false)
    } else {
        None
    }
}

/// What an admitted flow needs.
#[derive(Debug, Clone)]
pub struct Admission {
    pub device_id: Arc<str>,
    /// Cancelled when the flow must end (cut-off, disable, delete, device change or revocation, server shutdown).
    pub stop: CancellationToken,
}

/// A usage threshold a connection crossed (each is reported once per crossing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaEvent {
    /// `connection.usage_80`, `connection.exhausted` or `connection.reset`.
    pub kind: &'static str,
    pub connection_id: String,
    pub operator_id: String,
    pub username: String,
    pub used: u64,
    pub limit: Option<u64>,
    pub at_ms: i64,
}

/// What every entry of a directory reports to: quota events (once the server has its outbox writer) and cut-offs
/// (the usage flush writes those at once instead of at its next tick, so that a crash soon after cannot reopen an
/// exhausted connection).
#[derive(Default)]
pub struct Reports {
    events: std::sync::OnceLock<tokio::sync::mpsc::Sender<QuotaEvent>>,
    flush_soon: tokio::sync::Notify,
}

impl std::fmt::Debug for Reports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reports").finish_non_exhaustive()
    }
}

pub type QuotaSink = Arc<Reports>;

/// A connection's numbers and state, as the API shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used: u64,
    pub limit: Option<u64>,
    pub refusal: Option<Refusal>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the counters half-written (every update is a few assignments),
    // so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Entry {
    fn from_row(row: &ConnectionRow, sink: QuotaSink, shutdown: &CancellationToken) -> Entry {
        let mut state = State {
            device_id: row.device_id.as_deref().map(Arc::from),
            device_revoked: row.device_revoked_at.is_some(),
            password_hash: row.password_hash.as_deref().map(Arc::from),
            verified: None,
            refused: Vec::new(),
            limit: row.limit_bytes.and_then(|l| u64::try_from(l).ok()),
            used: u64::try_from(row.used_bytes).unwrap_or(0),
            enabled: row.disabled_at.is_none(),
            deleted: false,
            allow: parse_cidrs(&row.allow_cidrs),
            dedicated_port: row.dedicated_port.and_then(|p| u16::try_from(p).ok()),
            dirty: false,
            pending: Vec::new(),
            flows: shutdown.child_token(),
            shutdown: shutdown.clone(),
            credential: CancellationToken::new(),
        };
        state.settle();
        Entry {
            id: row.id.clone(),
            operator_id: row.operator_id.clone(),
            username: row.username.clone(),
            state: Mutex::new(state),
            verify: tokio::sync::Mutex::new(()),
            open_flows: std::sync::atomic::AtomicUsize::new(0),
            sink,
        }
    }

    fn report(&self, kind: &'static str, used: u64, limit: Option<u64>, at_ms: i64) {
        if let Some(tx) = self.sink.events.get() {
            let e = QuotaEvent {
                kind,
                connection_id: self.id.clone(),
                operator_id: self.operator_id.clone(),
                username: self.username.clone(),
                used,
                limit,
                at_ms,
            };
            if tx.try_send(e).is_err() {
                tracing::warn!(connection = %self.id, kind, "quota event dropped: the outbox writer is behind");
            }
        }
    }

    /// Admit a new flow, or say why not.
    pub fn admit(&self) -> Result<Admission, Refusal> {
        let s = lock(&self.state);
        if let Some(r) = s.refusal() {
            return Err(r);
        }
        Ok(Admission {
            device_id: s.device_id.clone().ok_or(Refusal::NoDevice)?,
            stop: s.flows.clone(),
        })
    }

    /// Count `n` bytes about to be forwarded and return how many may be: all of them, or only what is left under
    /// the limit. When the limit is reached every open flow of the connection is closed at once.
    pub fn charge(&self, n: usize, dir: Dir, device: &Arc<str>, now_ms: i64) -> usize {
        let mut s = lock(&self.state);
        if s.flows.is_cancelled() || s.refusal().is_some() {
            return 0;
        }
        let n64 = n as u64;
        let before = s.used;
        let grant = match s.limit {
            Some(l) => n64.min(l.saturating_sub(s.used)),
            None => n64,
        };
        if grant > 0 {
            s.used += grant;
            s.dirty = true;
            let hour = now_ms - now_ms.rem_euclid(HOUR_MS);
            let p = match s
                .pending
                .iter()
                .position(|p| p.hour == hour && Arc::ptr_eq(&p.device, device))
            {
                Some(i) => &mut s.pending[i],
                None => {
                    s.pending.push(Pending {
                        device: device.clone(),
                        hour,
                        up: 0,
                        down: 0,
                    });
                    let last = s.pending.len() - 1;
                    &mut s.pending[last]
                }
            };
            match dir {
                Dir::Up => p.up += grant,
                Dir::Down => p.down += grant,
            }
        }
        if s.limit.is_some_and(|l| s.used >= l) {
            s.close_flows();
        }
        if let Some(l) = s.limit {
            // 80 %: used * 5 >= limit * 4, in 128 bits so that nothing overflows.
            let past80 = |u: u64| u128::from(u) * 5 >= u128::from(l) * 4;
            let (used, limit) = (s.used, s.limit);
            drop(s);
            if past80(used) && !past80(before) {
                self.report("connection.usage_80", used, limit, now_ms);
            }
            if used >= l && before < l {
                self.sink.flush_soon.notify_one();
                self.report("connection.exhausted", used, limit, now_ms);
            }
        }
        // `grant <= n`, so this fits.
        usize::try_from(grant).unwrap_or(0)
    }

    /// Count a datagram only if it fits whole (a datagram cannot be cut); false means drop it.
    pub fn charge_whole(&self, n: usize, dir: Dir, device: &Arc<str>, now_ms: i64) -> bool {
        {
            let s = lock(&self.state);
            if s.limit.is_some_and(|l| s.used.saturating_add(n as u64) > l) {
                return false;
            }
        }
        // Between the check and the charge another flow may take bytes; then the datagram gets a short grant and is
        // dropped, and the bytes it was granted are the last ones before the cut-off: still never past the limit.
        self.charge(n, dir, device, now_ms) == n
    }

    pub fn usage(&self) -> Usage {
        let s = lock(&self.state);
        Usage {
            used: s.used,
            limit: s.limit,
            refusal: s.refusal(),
        }
    }

    pub fn dedicated_port(&self) -> Option<u16> {
        lock(&self.state).dedicated_port
    }

    /// Cancelled when this connection's password changes.
    pub fn credential_token(&self) -> CancellationToken {
        lock(&self.state).credential.clone()
    }

    /// Whether `ip` may use the dedicated port without credentials.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        lock(&self.state).allow.iter().any(|n| n.contains(&ip))
    }

    /// Take new settings from the store's row. Open flows are closed when the connection stops admitting, moves
    /// to another device, loses an address from its allow-list or moves its dedicated port (a client let in by
    /// what was taken away must not keep its flows); they are kept when only the name, the limit (still above
    /// usage) or an added allow-list entry changed.
    fn apply(&self, row: &ConnectionRow) {
        let mut s = lock(&self.state);
        let device: Option<Arc<str>> = row.device_id.as_deref().map(Arc::from);
        // Revocation is final: a row read before the device was revoked must not clear it.
        let revoked = row.device_revoked_at.is_some();
        if s.device_id.as_deref() != device.as_deref() {
            s.close_flows();
            s.device_id = device;
            s.device_revoked = revoked;
        } else {
            s.device_revoked |= revoked;
        }
        s.limit = row.limit_bytes.and_then(|l| u64::try_from(l).ok());
        s.enabled = row.disabled_at.is_none();
        if !s.enabled {
            // A disabled connection forgets its verified password: re-enabling costs one bcrypt check.
            s.verified = None;
        }
        let allow = parse_cidrs(&row.allow_cidrs);
        let port = row.dedicated_port.and_then(|p| u16::try_from(p).ok());
        if s.allow.iter().any(|n| !allow.contains(n)) || s.dedicated_port != port {
            s.close_flows();
        }
        s.allow = allow;
        s.dedicated_port = port;
        s.settle();
    }
}

/// Parse the store's comma-separated CIDR list (written by the API, so already valid).
pub fn parse_cidrs(s: &str) -> Vec<IpNet> {
    s.split(',')
        .filter_map(|c| c.trim().parse::<IpNet>().ok())
        .collect()
}

#[derive(Debug, Default)]
struct Orphans {
    used: Vec<(String, i64)>,
    buckets: Vec<UsageBucket>,
    /// Operators deleted while the server runs. Their history went with them, and an hourly row cannot be written
    /// without its operator: one left in a flush would fail that flush and every one after it.
    deleted_operators: HashSet<String>,
}

/// Why a credential check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Unknown username or wrong password (the customer cannot tell which).
    Invalid,
    /// Too many failures for this username or address.
    Limited(std::time::Duration),
    /// The password could not be checked (hasher overloaded).
    Unavailable,
}

pub struct Directory {
    entries: RwLock<HashMap<String, Arc<Entry>>>,
    by_username: RwLock<HashMap<String, Arc<Entry>>>,
    /// Where entries report quota crossings.
    sink: QuotaSink,
    /// Key of the verified-credential digests (the same across restarts, see [`super::verified`]).
    key: [u8; 32],
    /// Where verified credentials are kept across restarts; `None`: not kept.
    verified_file: Option<std::path::PathBuf>,
    /// A password was verified since the file was last written.
    verified_changed: std::sync::atomic::AtomicBool,
    hasher: Hasher,
    limiter: LoginLimiter,
    clock: Arc<dyn Clock>,
    store: Store,
    /// Serialises flushes with usage resets, so a flush never writes a total from before a reset after it.
    flush_lock: tokio::sync::Mutex<()>,
    /// Totals and hourly usage of removed connections, still to be written.
    orphans: Mutex<Orphans>,
    /// Cancelled at shutdown: every flow ends.
    shutdown: CancellationToken,
    /// Another process serves the data plane now (decision 79): its totals are the ones that count, so flushes
    /// add this process's hourly usage but no longer write totals.
    totals_handed_over: std::sync::atomic::AtomicBool,
}

impl Directory {
    /// Stop writing usage totals: another process holds the data-plane lock and writes its own.
    pub fn hand_over_totals(&self) {
        self.totals_handed_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub async fn load(
        store: Store,
        hasher: Hasher,
        limiter: LoginLimiter,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
        (key, verified_file): ([u8; 32], Option<std::path::PathBuf>),
    ) -> Result<Directory, StoreError> {
        let d = Directory {
            entries: RwLock::default(),
            by_username: RwLock::default(),
            key,
            verified_file,
            verified_changed: std::sync::atomic::AtomicBool::new(false),
            hasher,
            limiter,
            clock,
            store,
            flush_lock: tokio::sync::Mutex::new(()),
            orphans: Mutex::default(),
            shutdown,
            totals_handed_over: std::sync::atomic::AtomicBool::new(false),
            sink: QuotaSink::default(),
        };
        for row in d.store.all_connections().await? {
            d.upsert(&row);
        }
        if let Some(path) = &d.verified_file {
            let path = path.clone();
            let records = tokio::task::spawn_blocking(move || super::verified::load(&path))
                .await
                .unwrap_or_default();
            let restored = d.restore_verified(&records);
            tracing::info!(restored, "verified proxy credentials restored");
        }
        Ok(d)
    }

    /// Take back credentials verified before a restart: each only while its connection is enabled and still has
    /// the hash it was verified against. The count taken.
    fn restore_verified(&self, records: &[super::verified::Record]) -> usize {
        let mut restored = 0;
        for r in records {
            let Some(e) = self.get(&r.connection_id) else {
                continue;
            };
            let mut s = lock(&e.state);
            let same = s
                .password_hash
                .as_deref()
                .is_some_and(|h| super::verified::fingerprint(h) == r.hash_fingerprint);
            if same && s.enabled && !s.deleted {
                s.verified = Some(r.digest);
                restored += 1;
            }
        }
        restored
    }

    /// Write the verified credentials to their file if one was verified since the last write (a flush calls
    /// this; a crash loses at most the verifications of one flush interval, which cost a bcrypt check again).
    pub async fn save_verified(&self) {
        use std::sync::atomic::Ordering::AcqRel;
        let Some(path) = self.verified_file.clone() else {
            return;
        };
        if !self.verified_changed.swap(false, AcqRel) {
            return;
        }
        let entries: Vec<Arc<Entry>> = self
            .entries
            .read()
            .map_or_else(|_| Vec::new(), |m| m.values().cloned().collect());
        let records: Vec<super::verified::Record> = entries
            .iter()
            .filter_map(|e| {
                let s = lock(&e.state);
                Some(super::verified::Record {
                    connection_id: e.id.clone(),
                    hash_fingerprint: super::verified::fingerprint(s.password_hash.as_deref()?),
                    digest: s.verified?,
                })
            })
            .collect();
        let saved =
            tokio::task::spawn_blocking(move || super::verified::save(&path, &records)).await;
        if !matches!(saved, Ok(Ok(()))) {
            tracing::warn!(error = ?saved, "could not write the verified-credential file; will retry");
            self.verified_changed
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Send quota crossings (80 %, exhausted, reset) to `tx` from now on.
    pub fn set_quota_sink(&self, tx: tokio::sync::mpsc::Sender<QuotaEvent>) {
        let _ = self.sink.events.set(tx);
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// Add a connection or take its new settings.
    pub fn upsert(&self, row: &ConnectionRow) -> Arc<Entry> {
        if let Some(e) = self.get(&row.id) {
            e.apply(row);
            return e;
        }
        let e = Arc::new(Entry::from_row(row, self.sink.clone(), &self.shutdown));
        if let Ok(mut m) = self.entries.write() {
            m.insert(e.id.clone(), e.clone());
        }
        if let Ok(mut m) = self.by_username.write() {
            m.insert(e.username.clone(), e.clone());
        }
        e
    }

    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.entries.read().ok()?.get(id).cloned()
    }

    pub fn by_username(&self, username: &str) -> Option<Arc<Entry>> {
        self.by_username.read().ok()?.get(username).cloned()
    }

    /// Every entry with a dedicated port.
    pub fn dedicated(&self) -> Vec<Arc<Entry>> {
        self.entries.read().map_or_else(
            |_| Vec::new(),
            |m| {
                m.values()
                    .filter(|e| e.dedicated_port().is_some())
                    .cloned()
                    .collect()
            },
        )
    }

    /// A deleted connection: flows closed, gone from the directory; its unflushed history is kept for the flush.
    pub fn remove(&self, id: &str) {
        let Some(e) = self.entries.write().ok().and_then(|mut m| m.remove(id)) else {
            return;
        };
        if let Ok(mut m) = self.by_username.write() {
            m.remove(&e.username);
        }
        let (pending, used) = {
            let mut s = lock(&e.state);
            s.deleted = true;
            s.close_flows();
            (std::mem::take(&mut s.pending), s.dirty.then_some(s.used))
        };
        if let Ok(mut o) = self.orphans.lock() {
            o.buckets.extend(pending.into_iter().map(|p| bucket(&e, p)));
            // A connection removed with its operator (not deleted) keeps its count for when it comes back.
            if let Some(u) = used {
                o.used
                    .push((e.id.clone(), i64::try_from(u).unwrap_or(i64::MAX)));
            }
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every connection of an operator goes (operator disabled or deleted). Returns their ids. A deleted operator's
    /// unwritten history goes too (the store dropped theirs).
    pub fn remove_operator(&self, operator_id: &str, deleted: bool) -> Vec<String> {
        let ids: Vec<String> = self.entries.read().map_or_else(
            |_| Vec::new(),
            |m| {
                m.values()
                    .filter(|e| e.operator_id == operator_id)
                    .map(|e| e.id.clone())
                    .collect()
            },
        );
        for id in &ids {
            self.remove(id);
        }
        if deleted {
            if let Ok(mut o) = self.orphans.lock() {
                o.buckets.retain(|b| b.operator_id != operator_id);
                o.used.retain(|(id, _)| !ids.contains(id));
                // A flush under way may hold some of their usage still, and bring it back if it fails.
                o.deleted_operators.insert(operator_id.to_owned());
            }
        }
        ids
    }

    /// A device was revoked or deleted: close the flows of every connection using it. A deleted device also leaves
    /// its connections without a device (the store did the same with `ON DELETE SET NULL`).
    pub fn device_gone(&self, device_id: &str, deleted: bool) {
        let entries: Vec<Arc<Entry>> = self
            .entries
            .read()
            .map_or_else(|_| Vec::new(), |m| m.values().cloned().collect());
        for e in entries {
            let mut s = lock(&e.state);
            if s.device_id.as_deref() == Some(device_id) {
                s.close_flows();
                if deleted {
                    s.device_id = None;
                } else {
                    s.device_revoked = true;
                }
                s.settle();
            }
        }
    }

    /// New password: the cached verification is forgotten, so the old password fails for every new flow.
    pub fn set_password(&self, id: &str, hash: &str) {
        if let Some(e) = self.get(id) {
            let mut s = lock(&e.state);
            s.password_hash = Some(Arc::from(hash));
            s.verified = None;
            s.refused.clear();
            s.credential.cancel();
            s.credential = CancellationToken::new();
        }
    }

    /// Usage back to zero in memory and in the store, atomically with respect to flushes.
    pub async fn reset_usage(&self, operator_id: &str, id: &str) -> Result<bool, StoreError> {
        let _flush = self.flush_lock.lock().await;
        let now = self.clock.now_ms();
        if !self
            .store
            .reset_connection_usage(operator_id, id, now)
            .await?
        {
            return Ok(false);
        }
        if let Some(e) = self.get(id) {
            let limit = {
                let mut s = lock(&e.state);
                s.used = 0;
                s.dirty = false;
                s.settle();
                s.limit
            };
            e.report("connection.reset", 0, limit, now);
        }
        Ok(true)
    }

    fn digest(&self, entry: &Entry, password: &str) -> [u8; 32] {
        // The key is 32 bytes; HMAC takes any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(entry.id.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The cheap path: true when this password is the one last verified for the entry.
    pub fn check_cached(&self, entry: &Entry, password: &str) -> bool {
        known(entry, &self.digest(entry, password)) == Some(true)
    }

    /// Check a customer's credentials. A password verified before costs one keyed hash; otherwise bcrypt runs
    /// (rate-limited per username and client address, one at a time per connection). A password found wrong
    /// before is refused after the time a check takes, without one and without counting as another failure.
    pub async fn authenticate(
        &self,
        username: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<Arc<Entry>, AuthFailure> {
        let entry = self.by_username(username);
        let digest = entry.as_ref().map(|e| self.digest(e, password));
        if let (Some(e), Some(d)) = (&entry, &digest) {
            match known(e, d) {
                Some(true) => return Ok(e.clone()),
                Some(false) => {
                    // As slow as a check, so that a repeat tells nothing a first try did not.
                    self.hasher.pause_like_verify().await;
                    return Err(AuthFailure::Invalid);
                }
                None => {}
            }
        }
        let keys = LimitKeys::namespaced("proxy", username, &client.to_canonical().to_string());
        let entry = match entry {
            Some(e) => e,
            None => {
                // Not loaded: perhaps imported while this server runs. Counted first, so that guessing
                // usernames costs the guesser, not the store. A name that does not exist is answered after about
                // a bcrypt's time, like a wrong password, but without computing one: a dummy bcrypt per made-up
                // name let a flood of them, from many addresses, take every password check from real customers
                // and operators.
                let attempt = self
                    .limiter
                    .begin(&keys)
                    .await
                    .map_err(AuthFailure::Limited)?;
                match self.store.connection_by_username(username).await {
                    Ok(Some(row)) => {
                        self.limiter.release(&keys, attempt).await;
                        self.upsert(&row)
                    }
                    _ => {
                        self.hasher.pause_like_verify().await;
                        self.limiter.failed(&keys, attempt).await;
                        return Err(AuthFailure::Invalid);
                    }
                }
            }
        };
        let d = digest.unwrap_or_else(|| self.digest(&entry, password));
        let single = entry.clone();
        let _one = single.verify.lock().await;
        if known(&entry, &d) == Some(true) {
            return Ok(entry);
        }
        let mut hash = lock(&entry.state).password_hash.clone();
        if hash.is_none() {
            hash = self.refresh_hash(&entry).await;
        }
        let attempt = self
            .limiter
            .begin_waiting(&keys, BUSY_WAIT)
            .await
            .map_err(AuthFailure::Limited)?;
        let ok = match &hash {
            Some(h) => self.hasher.verify(password, h).await,
            None => {
                self.hasher.verify_dummy().await;
                Ok(false)
            }
        };
        match ok {
            Ok(true) => {
                {
                    let mut s = lock(&entry.state);
                    // Only if the password did not change while bcrypt ran.
                    if s.has_hash(&hash) {
                        s.verified = Some(d);
                        self.verified_changed
                            .store(true, std::sync::atomic::Ordering::Release);
                    }
                }
                self.limiter.succeeded(&keys, attempt).await;
                Ok(entry)
            }
            Ok(false) => {
                {
                    let mut s = lock(&entry.state);
                    // Only a password checked against the connection's hash as it still is (not the dummy).
                    if hash.is_some() && s.has_hash(&hash) {
                        if s.refused.len() >= REFUSED_KEPT {
                            s.refused.remove(0);
                        }
                        s.refused.push(d);
                    }
                }
                self.limiter.failed(&keys, attempt).await;
                Err(AuthFailure::Invalid)
            }
            Err(_) => {
                self.limiter.release(&keys, attempt).await;
                Err(AuthFailure::Unavailable)
            }
        }
    }

    /// An entry without a hash: an imported connection. Take its hash from the store (the migration may have written
    /// it since), or migrate the row now, so that a customer never fails because the batch has not reached them.
    async fn refresh_hash(&self, entry: &Entry) -> Option<Arc<str>> {
        let read = || async {
            self.store
                .connection(&entry.operator_id, &entry.id)
                .await
                .ok()
                .flatten()
                .and_then(|r| r.password_hash)
        };
        let mut hash = read().await;
        if hash.is_none()
            && crate::legacy::migrate_one(&self.store, &self.hasher, &entry.id)
                .await
                .unwrap_or(false)
        {
            hash = read().await;
        }
        let hash: Arc<str> = Arc::from(hash?);
        let mut s = lock(&entry.state);
        if s.password_hash.is_none() {
            s.password_hash = Some(hash.clone());
        }
        s.password_hash.clone()
    }

    /// Write every changed meter and the hourly buckets. On failure everything is kept for the next try.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _flush = self.flush_lock.lock().await;
        let entries: Vec<Arc<Entry>> = self
            .entries
            .read()
            .map_or_else(|_| Vec::new(), |m| m.values().cloned().collect());
        let (mut used, mut buckets) = self
            .orphans
            .lock()
            .map(|mut o| (std::mem::take(&mut o.used), std::mem::take(&mut o.buckets)))
            .unwrap_or_default();
        let mut taken = Vec::new();
        for e in &entries {
            let mut s = lock(&e.state);
            if !s.dirty {
                continue;
            }
            s.dirty = false;
            used.push((e.id.clone(), i64::try_from(s.used).unwrap_or(i64::MAX)));
            let pending = std::mem::take(&mut s.pending);
            drop(s);
            buckets.extend(pending.into_iter().map(|p| bucket(e, p)));
            taken.push(e.clone());
        }
        if let Ok(o) = self.orphans.lock() {
            if !o.deleted_operators.is_empty() {
                buckets.retain(|b| !o.deleted_operators.contains(&b.operator_id));
            }
        }
        if self
            .totals_handed_over
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Hourly rows are added to, so they stay right; a total of ours would overwrite the new holder's.
            used.clear();
        }
        if let Err(err) = self.store.flush_usage(&used, &buckets).await {
            // Put it all back: totals are absolute (just mark dirty), buckets are added to what came meanwhile.
            for e in taken {
                lock(&e.state).dirty = true;
            }
            // Except the rows of operators deleted meanwhile (here or by anyone on the same database): an hourly
            // row needs its operator, so one of theirs would fail this flush again, and every one after it.
            let mut ops: Vec<String> = buckets.iter().map(|b| b.operator_id.clone()).collect();
            ops.sort_unstable();
            ops.dedup();
            if let Ok(live) = self.store.existing_operators(&ops).await {
                if let Ok(mut o) = self.orphans.lock() {
                    o.deleted_operators
                        .extend(ops.into_iter().filter(|id| !live.contains(id)));
                }
            }
            self.put_back(buckets);
            if let Ok(mut o) = self.orphans.lock() {
                // Removed connections' totals (the live ones are re-marked dirty above).
                o.used
                    .extend(used.into_iter().filter(|(id, _)| self.get(id).is_none()));
            }
            return Err(err);
        }
        Ok(())
    }

    /// Hourly usage a failed flush did not write, kept for the next one; except an operator's deleted meanwhile:
    /// their rows would fail every flush from then on.
    fn put_back(&self, buckets: Vec<UsageBucket>) {
        if let Ok(mut o) = self.orphans.lock() {
            let o = &mut *o;
            let gone = &o.deleted_operators;
            o.buckets.extend(
                buckets
                    .into_iter()
                    .filter(|b| !gone.contains(&b.operator_id)),
            );
        }
    }
}

fn bucket(e: &Entry, p: Pending) -> UsageBucket {
    UsageBucket {
        connection_id: e.id.clone(),
        device_id: p.device.to_string(),
        operator_id: e.operator_id.clone(),
        hour: p.hour,
        bytes_up: i64::try_from(p.up).unwrap_or(i64::MAX),
        bytes_down: i64::try_from(p.down).unwrap_or(i64::MAX),
    }
}

/// Flush usage every `interval`, and at once when a connection is cut off, until cancelled (the server flushes
/// once more after every flow has ended).
pub async fn flush_loop(
    dir: Arc<Directory>,
    interval: std::time::Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = dir.sink.flush_soon.notified() => {}
            _ = cancel.cancelled() => break,
        }
        if let Err(e) = dir.flush().await {
            tracing::warn!(error = %e, "could not flush usage; will retry");
        }
        dir.save_verified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(limit: Option<i64>) -> ConnectionRow {
        ConnectionRow {
            id: "c1".into(),
            operator_id: "o1".into(),
            device_id: Some("d1".into()),
            name: "n".into(),
            username: "pfx".into(),
            password_hash: None,
            limit_bytes: limit,
            used_bytes: 0,
            disabled_at: None,
            allow_cidrs: "10.0.0.0/8,::1/128".into(),
            dedicated_port: None,
            device_revoked_at: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    /// A store on SQLite with an operator, a device and a connection (username `pf` + name, password `pw-` +
    /// name, cost-4 hash) per name, and a directory over it: the directory, the store, (operator, device,
    /// connection) ids per name, and the store's directory (keep it while the test runs).
    async fn directory_with(
        names: &[&str],
    ) -> (
        Directory,
        Store,
        Vec<(String, String, String)>,
        tempfile::TempDir,
    ) {
        use crate::store::{ConnectionSettings, NewDevice, NewOperator};
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", tmp.path().join("t.db").display());
        let store = Store::connect(&url, 2).await.unwrap();
        let clock = crate::clock::ManualClock::default();
        let now = clock.now_ms();
        let hasher = Hasher::with_cost(1, 4).await.unwrap();
        let mut conns = Vec::new();
        for &name in names {
            let op = store
                .create_operator(NewOperator {
                    username: name,
                    password_hash: "!",
                    role: crate::store::Role::Operator,
                    now,
                })
                .await
                .unwrap();
            let dev = store
                .create_device(NewDevice {
                    operator_id: &op.id,
                    name: "d",
                    description: "",
                    pairing_code_hash: name,
                    pairing_expires_at: now,
                    now,
                })
                .await
                .unwrap();
            let settings = ConnectionSettings {
                name: "c".into(),
                device_id: Some(dev.id.clone()),
                limit_bytes: None,
                disabled_at: None,
                allow_cidrs: String::new(),
                dedicated_port: None,
            };
            let hash = hasher.hash(&format!("pw-{name}")).await.unwrap();
            let c = store
                .create_connection(&op.id, &format!("pf{name}"), &hash, &settings, now)
                .await
                .unwrap();
            conns.push((op.id, dev.id, c.id));
        }
        let dir = Directory::load(
            store.clone(),
            hasher,
            LoginLimiter::new(Default::default(), None, Arc::new(clock.clone())),
            Arc::new(clock.clone()),
            CancellationToken::new(),
            (rand::random(), None),
        )
        .await
        .unwrap();
        (dir, store, conns, tmp)
    }

    /// An operator deleted while a flush holds some of their usage (or by another process on the same database):
    /// that flush fails, as their hourly rows need them, but it must not bring those rows back, or every flush after
    /// it fails too and nobody's usage is written again.
    #[tokio::test]
    async fn a_deleted_operators_usage_does_not_block_the_flushes_after() {
        let (dir, store, conns, _tmp) = directory_with(&["gone", "stays"]).await;
        let now = dir.clock().now_ms();
        let charge = |i: usize, n: usize| {
            let (_, dev, id) = &conns[i];
            dir.get(id)
                .unwrap()
                .charge(n, Dir::Down, &Arc::from(dev.as_str()), now);
        };
        charge(0, 100);
        charge(1, 200);
        // Deleted behind the directory's back: its connection is still loaded, with usage to write.
        assert!(store.delete_operator(&conns[0].0).await.unwrap());
        assert!(
            dir.flush().await.is_err(),
            "the deleted operator's row fails"
        );
        // Their connection may still be charged by flows that had not ended yet.
        charge(0, 10);
        charge(1, 50);
        dir.flush().await.expect("the next flush writes");
        let stays = &conns[1];
        let hours = store
            .connection_usage(&stays.0, &stays.2, 0, i64::MAX)
            .await
            .unwrap();
        assert_eq!(hours.iter().map(|h| h.bytes_down).sum::<i64>(), 250);
    }

    /// Once another process holds the data-plane lock, flushes still add the hourly usage but leave the total to
    /// that process: ours would overwrite its own.
    #[tokio::test]
    async fn handed_over_totals_are_not_written() {
        let (dir, store, conns, _tmp) = directory_with(&["a"]).await;
        let now = dir.clock().now_ms();
        let (op, dev, id) = &conns[0];
        let charge = |n: usize| {
            dir.get(id)
                .unwrap()
                .charge(n, Dir::Down, &Arc::from(dev.as_str()), now);
        };
        let total = |store: &Store| {
            let (store, op, id) = (store.clone(), op.clone(), id.clone());
            async move {
                store
                    .connection(&op, &id)
                    .await
                    .unwrap()
                    .unwrap()
                    .used_bytes
            }
        };
        charge(100);
        dir.flush().await.unwrap();
        assert_eq!(total(&store).await, 100);
        // The new holder has written its own total meanwhile.
        store.flush_usage(&[(id.clone(), 7)], &[]).await.unwrap();
        charge(50);
        dir.hand_over_totals();
        dir.flush().await.unwrap();
        assert_eq!(total(&store).await, 7, "the new holder's total stands");
        let hours = store.connection_usage(op, id, 0, i64::MAX).await.unwrap();
        assert_eq!(hours.iter().map(|h| h.bytes_down).sum::<i64>(), 150);
    }

    /// A made-up username costs no bcrypt (a flood of them from many addresses took every password check from real
    /// customers); a wrong password for a real one does, once, and then the right one is cached.
    #[tokio::test]
    async fn made_up_usernames_cost_no_password_check() {
        let (dir, _store, _conns, _tmp) = directory_with(&["real"]).await;
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let runs = dir.hasher.runs();
        for i in 0..5 {
            let r = dir.authenticate(&format!("pfmadeup{i}"), "x", client).await;
            assert_eq!(r.err(), Some(AuthFailure::Invalid));
        }
        assert_eq!(dir.hasher.runs(), runs, "bcrypt ran for made-up usernames");
        let r = dir.authenticate("pfreal", "wrong", client).await;
        assert_eq!(r.err(), Some(AuthFailure::Invalid));
        assert_eq!(dir.hasher.runs(), runs + 1);
        assert!(dir.authenticate("pfreal", "pw-real", client).await.is_ok());
        assert!(dir.authenticate("pfreal", "pw-real", client).await.is_ok());
        assert_eq!(
            dir.hasher.runs(),
            runs + 2,
            "the verified password is cached"
        );
    }

    /// A client repeating a wrong password (a stale configuration) costs one bcrypt and one failure, however often
    /// it tries, so the right password still works from anywhere; new guesses still count and lock the username.
    #[tokio::test]
    async fn a_repeated_wrong_password_does_not_lock_out_the_right_one() {
        let (dir, _store, conns, _tmp) = directory_with(&["real"]).await;
        let stale: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "198.51.100.9".parse().unwrap();
        let runs = dir.hasher.runs();
        for _ in 0..25 {
            let r = dir.authenticate("pfreal", "old-password", stale).await;
            assert_eq!(r.err(), Some(AuthFailure::Invalid));
        }
        assert_eq!(
            dir.hasher.runs(),
            runs + 1,
            "one bcrypt for one wrong password"
        );
        assert!(dir.authenticate("pfreal", "pw-real", other).await.is_ok());
        // A new password forgets what was wrong for the old one.
        dir.set_password(&conns[0].2, &dir.hasher.hash("old-password").await.unwrap());
        assert!(dir
            .authenticate("pfreal", "old-password", stale)
            .await
            .is_ok());
        // Distinct guesses are each checked and counted: the username locks (10 failures for proxy logins).
        let mut limited = false;
        for i in 0..12 {
            match dir
                .authenticate("pfreal", &format!("guess-{i}"), stale)
                .await
            {
                Err(AuthFailure::Limited(_)) => limited = true,
                r => assert_eq!(r.err(), Some(AuthFailure::Invalid)),
            }
        }
        assert!(
            limited,
            "twelve different wrong passwords never locked the username"
        );
    }

    /// A password verified before a restart is taken back from the file (no bcrypt for it after the restart),
    /// but only for the hash it was verified against and while its connection is enabled.
    #[tokio::test]
    async fn verified_credentials_are_kept_across_a_restart() {
        let (first, store, conns, tmp) = directory_with(&["kept", "changed", "off"]).await;
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let key: [u8; 32] = rand::random();
        let file = tmp.path().join("verified");
        let restart = || async {
            Directory::load(
                store.clone(),
                first.hasher.clone(),
                LoginLimiter::new(Default::default(), None, first.clock.clone()),
                first.clock.clone(),
                CancellationToken::new(),
                (key, Some(file.clone())),
            )
            .await
            .unwrap()
        };
        let before = restart().await;
        for name in ["kept", "changed", "off"] {
            let pw = format!("pw-{name}");
            assert!(before
                .authenticate(&format!("pf{name}"), &pw, client)
                .await
                .is_ok());
        }
        before.save_verified().await;
        // Meanwhile (another process, or while this one was down): a new password, a disabled connection.
        let new_hash = before.hasher.hash("pw-new").await.unwrap();
        let (op, _, id) = &conns[1];
        assert!(store
            .set_connection_password(op, id, &new_hash, 0)
            .await
            .unwrap());
        let (op, dev, id) = &conns[2];
        let off = crate::store::ConnectionSettings {
            name: "c".into(),
            device_id: Some(dev.clone()),
            limit_bytes: None,
            disabled_at: Some(1),
            allow_cidrs: String::new(),
            dedicated_port: None,
        };
        assert!(store.update_connection(op, id, &off, 0).await.unwrap());

        let after = restart().await;
        let runs = after.hasher.runs();
        let e = after.by_username("pfkept").unwrap();
        assert!(
            after.check_cached(&e, "pw-kept"),
            "the verified password came back"
        );
        assert!(after
            .authenticate("pfkept", "pw-kept", client)
            .await
            .is_ok());
        assert_eq!(after.hasher.runs(), runs, "no bcrypt for it");
        let changed = after.by_username("pfchanged").unwrap();
        assert!(
            !after.check_cached(&changed, "pw-changed"),
            "a password since replaced"
        );
        let off = after.by_username("pfoff").unwrap();
        assert!(
            !after.check_cached(&off, "pw-off"),
            "a connection since disabled"
        );
        // Another key (another data directory) makes nothing of the file.
        let other = Directory::load(
            store.clone(),
            first.hasher.clone(),
            LoginLimiter::new(Default::default(), None, first.clock.clone()),
            first.clock.clone(),
            CancellationToken::new(),
            (rand::random(), Some(file.clone())),
        )
        .await
        .unwrap();
        assert!(!other.check_cached(&other.by_username("pfkept").unwrap(), "pw-kept"));
    }

    #[test]
    fn charges_stop_exactly_at_the_limit_and_close_flows() {
        let e = Entry::from_row(
            &row(Some(100)),
            QuotaSink::default(),
            &CancellationToken::new(),
        );
        let dev: Arc<str> = Arc::from("d1");
        let adm = e.admit().unwrap();
        assert_eq!(e.charge(60, Dir::Up, &dev, 0), 60);
        assert!(!adm.stop.is_cancelled());
        assert_eq!(e.charge(60, Dir::Down, &dev, 0), 40, "only what is left");
        assert!(adm.stop.is_cancelled(), "every flow is told to stop");
        assert_eq!(e.charge(1, Dir::Down, &dev, 0), 0);
        assert_eq!(e.admit().unwrap_err(), Refusal::Exhausted);
        assert_eq!(e.usage().used, 100);
        let s = lock(&e.state);
        assert_eq!(
            (s.pending.len(), s.pending[0].up, s.pending[0].down),
            (1, 60, 40)
        );
    }

    #[test]
    fn datagrams_are_charged_whole_or_not_at_all() {
        let e = Entry::from_row(
            &row(Some(100)),
            QuotaSink::default(),
            &CancellationToken::new(),
        );
        let dev: Arc<str> = Arc::from("d1");
        assert!(e.charge_whole(70, Dir::Up, &dev, 0));
        assert!(!e.charge_whole(31, Dir::Up, &dev, 0));
        assert_eq!(e.usage().used, 70);
        assert!(e.charge_whole(30, Dir::Up, &dev, 0));
        assert_eq!(e.usage().refusal, Some(Refusal::Exhausted));
    }

    /// Revocation is final: a row read before it (an edit racing the revoke) does not clear it; only another
    /// device does.
    #[test]
    fn a_revoked_device_stays_revoked_until_the_connection_moves() {
        let mut revoked = row(None);
        revoked.device_revoked_at = Some(1);
        let e = Entry::from_row(&revoked, QuotaSink::default(), &CancellationToken::new());
        assert_eq!(e.admit().unwrap_err(), Refusal::DeviceRevoked);
        e.apply(&row(None));
        assert_eq!(e.admit().unwrap_err(), Refusal::DeviceRevoked);
        let mut moved = row(None);
        moved.device_id = Some("d2".into());
        e.apply(&moved);
        assert_eq!(&*e.admit().unwrap().device_id, "d2");
    }

    #[test]
    fn settings_changes_close_or_reopen_flows() {
        let e = Entry::from_row(
            &row(Some(100)),
            QuotaSink::default(),
            &CancellationToken::new(),
        );
        let dev: Arc<str> = Arc::from("d1");
        let first = e.admit().unwrap();
        // Raising the limit keeps open flows.
        e.apply(&row(Some(1000)));
        assert!(!first.stop.is_cancelled());
        e.charge(500, Dir::Up, &dev, 0);
        // Lowering it below the usage cuts them off.
        e.apply(&row(Some(400)));
        assert!(first.stop.is_cancelled());
        // Raising it again admits new flows with a fresh switch.
        e.apply(&row(None));
        let second = e.admit().unwrap();
        assert!(!second.stop.is_cancelled());
        // Moving to another device closes the flows through the old one.
        let mut moved = row(None);
        moved.device_id = Some("d2".into());
        e.apply(&moved);
        assert!(second.stop.is_cancelled());
        assert_eq!(&*e.admit().unwrap().device_id, "d2");
        let mut off = moved.clone();
        off.disabled_at = Some(1);
        e.apply(&off);
        assert_eq!(e.admit().unwrap_err(), Refusal::Disabled);
    }

    #[test]
    fn quota_crossings_are_reported_once_each() {
        let sink = QuotaSink::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        sink.events.set(tx).unwrap();
        let e = Entry::from_row(&row(Some(1000)), sink, &CancellationToken::new());
        let dev: Arc<str> = Arc::from("d1");
        e.charge(799, Dir::Down, &dev, 5);
        assert!(rx.try_recv().is_err(), "79.9 % is not 80 %");
        e.charge(1, Dir::Down, &dev, 6);
        let ev = rx.try_recv().unwrap();
        assert_eq!(
            (ev.kind, ev.used, ev.limit, ev.at_ms),
            ("connection.usage_80", 800, Some(1000), 6)
        );
        e.charge(100, Dir::Up, &dev, 7);
        assert!(rx.try_recv().is_err(), "no second 80 % event");
        e.charge(500, Dir::Up, &dev, 8);
        let ev = rx.try_recv().unwrap();
        assert_eq!((ev.kind, ev.used), ("connection.exhausted", 1000));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn allow_lists_match_canonical_addresses() {
        let e = Entry::from_row(&row(None), QuotaSink::default(), &CancellationToken::new());
        assert!(e.allows("10.2.3.4".parse().unwrap()));
        assert!(e.allows("::ffff:10.2.3.4".parse().unwrap()));
        assert!(e.allows("::1".parse().unwrap()));
        assert!(!e.allows("11.0.0.1".parse().unwrap()));
    }
}
