//! The registry of connected devices: who is online, since when, over which transport, with what metrics.
//!
//! In memory; `last_seen` and the public address reach the store in batches (see [`Registry::flush`]), never as
//! a write per heartbeat.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use proxyfleet_proto::DeviceMetrics;
use tokio_util::sync::CancellationToken;

/// One live tunnel session of a device.
#[derive(Clone)]
pub struct LiveDevice {
    pub session: u64,
    pub operator_id: String,
    /// The tunnel itself: flows are opened through it.
    pub link: std::sync::Arc<dyn super::link::Link>,
    pub agent_version: String,
    /// What the agent announced it can do ([`proxyfleet_proto::control::caps`]).
    pub capabilities: u32,
    /// Unix milliseconds, UTC.
    pub connected_since: i64,
    pub last_heartbeat: Option<i64>,
    pub public_ip: String,
    pub metrics: DeviceMetrics,
    /// Cancelling it closes this session's tunnel.
    pub kick: CancellationToken,
    /// Why the session was ended (a `close` code), recorded before `kick` is cancelled so that the control loop
    /// tells the agent the truth; 0 while it runs.
    pub ended: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Commands for this session's control loop.
    pub commands: tokio::sync::mpsc::Sender<super::DeviceCommand>,
}

/// How long a kicked session's control loop gets to tell the agent why before the link is closed regardless.
const KICK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Ask the session's control loop to end (it tells the agent why), and close the link after a grace period even
/// if the loop is stuck, for example on an agent that stopped reading.
fn end_session(l: &LiveDevice, code: u32) {
    l.ended.store(code, std::sync::atomic::Ordering::SeqCst);
    l.kick.cancel();
    let link = l.link.clone();
    tokio::spawn(async move {
        tokio::time::sleep(KICK_GRACE).await;
        link.close(code, b"session ended");
    });
}

#[derive(Default)]
pub struct Registry {
    live: Mutex<HashMap<String, LiveDevice>>,
    dirty: Mutex<HashSet<String>>,
    departed: Mutex<Vec<(String, i64, String)>>,
    next_session: std::sync::atomic::AtomicU64,
    /// Devices the offline detector considers offline: hearing from one wakes it at once (recovery alerts).
    offline: Mutex<HashSet<String>>,
    /// Notified when a device in `offline` is heard from.
    pub recovered: std::sync::Arc<tokio::sync::Notify>,
}

impl Registry {
    pub fn new_session_id(&self) -> u64 {
        self.next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// Register a session. An older session of the same device is kicked at once: a reconnecting device (new NAT
    /// mapping, reboot) must never wait for its stale session to time out.
    pub fn register(&self, device_id: &str, live: LiveDevice) {
        let old = self
            .live
            .lock()
            .ok()
            .and_then(|mut m| m.insert(device_id.to_owned(), live));
        if let Some(old) = old {
            end_session(&old, super::close::REPLACED);
        }
        self.mark_dirty(device_id);
    }

    /// Remove a session, unless a newer one has replaced it.
    /// The session ended. True when it was the device's live one (false: a newer session had replaced it, and the
    /// device is still online through that).
    pub fn unregister(&self, device_id: &str, session: u64) -> bool {
        let gone = self.live.lock().ok().and_then(|mut m| {
            if m.get(device_id).is_some_and(|l| l.session == session) {
                m.remove(device_id)
            } else {
                None
            }
        });
        let was_live = gone.is_some();
        // Its last heartbeat still reaches the store with the next flush.
        if let (Some(l), Ok(mut d)) = (gone, self.departed.lock()) {
            d.push((
                device_id.to_owned(),
                l.last_heartbeat.unwrap_or(l.connected_since),
                l.public_ip,
            ));
        }
        was_live
    }

    pub fn heartbeat(
        &self,
        device_id: &str,
        session: u64,
        at: i64,
        metrics: DeviceMetrics,
        public_ip: &str,
    ) {
        if let Ok(mut m) = self.live.lock() {
            if let Some(l) = m.get_mut(device_id).filter(|l| l.session == session) {
                l.last_heartbeat = Some(at);
                l.metrics = metrics;
                public_ip.clone_into(&mut l.public_ip);
            }
        }
        self.mark_dirty(device_id);
    }

    /// Close the device's tunnel, if it has one, for good (revoked or deleted: the agent stops).
    pub fn kick(&self, device_id: &str) -> bool {
        self.end(device_id, super::close::REVOKED)
    }

    /// Close the device's tunnel, if it has one, until its operator is enabled again (the agent keeps retrying).
    pub fn suspend(&self, device_id: &str) -> bool {
        self.end(device_id, super::close::SUSPENDED)
    }

    fn end(&self, device_id: &str, code: u32) -> bool {
        let live = self.live.lock().ok().and_then(|mut m| m.remove(device_id));
        match live {
            Some(l) => {
                end_session(&l, code);
                true
            }
            None => false,
        }
    }

    pub fn get(&self, device_id: &str) -> Option<LiveDevice> {
        self.live
            .lock()
            .ok()
            .and_then(|m| m.get(device_id).cloned())
    }

    pub fn online_count(&self) -> usize {
        self.live.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn mark_dirty(&self, device_id: &str) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(device_id.to_owned());
        }
        if self.offline.lock().is_ok_and(|o| o.contains(device_id)) {
            self.recovered.notify_one();
        }
    }

    /// The devices now offline, as the detector sees them.
    pub fn watch_offline(&self, ids: Vec<String>) {
        if let Ok(mut o) = self.offline.lock() {
            *o = ids.into_iter().collect();
        }
    }

    /// Take the devices seen since the last call, as `(id, last seen, public ip)` rows for the store.
    pub fn take_seen(&self, now: i64) -> Vec<(String, i64, String)> {
        let dirty: Vec<String> = self
            .dirty
            .lock()
            .map(|mut d| d.drain().collect())
            .unwrap_or_default();
        let mut rows: Vec<(String, i64, String)> = self
            .departed
            .lock()
            .map(|mut d| d.drain(..).collect())
            .unwrap_or_default();
        let Ok(live) = self.live.lock() else {
            return rows;
        };
        rows.extend(dirty.into_iter().filter_map(|id| {
            let l = live.get(&id)?;
            Some((
                id,
                l.last_heartbeat.unwrap_or(now).max(l.connected_since),
                l.public_ip.clone(),
            ))
        }));
        rows
    }
}
