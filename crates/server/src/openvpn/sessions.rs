//! Who is on the VPN: each connection's stable address (from the store's address book) and the live OpenVPN
//! sessions, by client id and by address. The data path asks [`Sessions::by_ip`] which connection a packet's
//! source address belongs to; an address without a live session belongs to nobody and its packets are dropped.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use tokio_util::sync::CancellationToken;

use crate::proxy::directory::Entry;
use crate::store::{Store, StoreError};

/// Host numbers below this are the server's (`.1`, its tun address) and the pushed DNS address's (`.2`) and spare.
pub const FIRST_CUSTOMER_HOST: u32 = 16;

/// One live OpenVPN session.
#[derive(Debug, Clone)]
pub struct Session {
    pub cid: u64,
    pub entry: Arc<Entry>,
    pub ip: Ipv4Addr,
    /// Cancelled when the session ends, whoever ends it.
    pub ended: CancellationToken,
}

#[derive(Debug, Default)]
struct Table {
    by_cid: HashMap<u64, Session>,
    /// connection id → client id of its one live session.
    by_conn: HashMap<String, u64>,
    by_ip: HashMap<Ipv4Addr, u64>,
    /// connection id → host index.
    index_of: HashMap<String, u32>,
    taken: std::collections::HashSet<u32>,
}

/// Addresses and sessions of the OpenVPN door.
pub struct Sessions {
    subnet: Ipv4Net,
    table: Mutex<Table>,
    store: Store,
    /// One assignment at a time, so two first logins never pick the same index.
    assign: tokio::sync::Mutex<()>,
}

fn lock(m: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    // Every update is a few map operations; a panic cannot leave them half done in a harmful way.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sessions {
    pub async fn load(store: Store, subnet: Ipv4Net) -> Result<Sessions, StoreError> {
        let s = Sessions {
            subnet,
            table: Mutex::default(),
            store,
            assign: tokio::sync::Mutex::new(()),
        };
        s.reload().await?;
        Ok(s)
    }

    async fn reload(&self) -> Result<(), StoreError> {
        let rows = self.store.vpn_addresses().await?;
        let mut t = lock(&self.table);
        t.index_of.clear();
        t.taken.clear();
        for (id, idx) in rows {
            if let Ok(i) = u32::try_from(idx) {
                t.index_of.insert(id, i);
                t.taken.insert(i);
            }
        }
        Ok(())
    }

    /// How many customer addresses the subnet has.
    pub fn capacity(&self) -> u32 {
        let hosts = 1u64 << (32 - u32::from(self.subnet.prefix_len()));
        // Minus the network's first hosts and its broadcast address.
        u32::try_from(hosts.saturating_sub(u64::from(FIRST_CUSTOMER_HOST) + 1)).unwrap_or(0)
    }

    fn ip_of(&self, index: u32) -> Option<Ipv4Addr> {
        (index < self.capacity())
            .then(|| Ipv4Addr::from(u32::from(self.subnet.network()) + FIRST_CUSTOMER_HOST + index))
    }

    /// The connection's stable address, assigned (and stored) on first use. `None`: the subnet is full.
    pub async fn address(&self, connection_id: &str) -> Result<Option<Ipv4Addr>, StoreError> {
        if let Some(i) = lock(&self.table).index_of.get(connection_id).copied() {
            return Ok(self.ip_of(i));
        }
        let _one = self.assign.lock().await;
        for _ in 0..3 {
            let free = {
                let t = lock(&self.table);
                if let Some(i) = t.index_of.get(connection_id).copied() {
                    return Ok(self.ip_of(i));
                }
                (0..self.capacity()).find(|i| !t.taken.contains(i))
            };
            let Some(i) = free else { return Ok(None) };
            if self
                .store
                .assign_vpn_address(connection_id, i64::from(i))
                .await?
            {
                let mut t = lock(&self.table);
                t.index_of.insert(connection_id.to_owned(), i);
                t.taken.insert(i);
                return Ok(self.ip_of(i));
            }
            // Someone else took it (or the connection is gone): look again.
            self.reload().await?;
        }
        Ok(None)
    }

    /// Forget a deleted connection's address (its row went with the connection).
    pub fn forget_address(&self, connection_id: &str) {
        let mut t = lock(&self.table);
        if let Some(i) = t.index_of.remove(connection_id) {
            t.taken.remove(&i);
        }
    }

    /// Record a live session. Returns the session it replaces (same connection, other client id), if any: the
    /// caller kills that one.
    pub fn insert(&self, s: Session) -> Option<Session> {
        let mut t = lock(&self.table);
        let old = t
            .by_conn
            .insert(s.entry.id.clone(), s.cid)
            .filter(|c| *c != s.cid)
            .and_then(|c| t.by_cid.remove(&c));
        if let Some(o) = &old {
            o.ended.cancel();
            if t.by_ip.get(&o.ip) == Some(&o.cid) {
                t.by_ip.remove(&o.ip);
            }
        }
        t.by_ip.insert(s.ip, s.cid);
        if let Some(prev) = t.by_cid.insert(s.cid, s) {
            prev.ended.cancel();
        }
        old
    }

    /// A session ended (DISCONNECT, or proxyfleet killed it). Unknown ids are ignored.
    pub fn remove(&self, cid: u64) -> Option<Session> {
        let mut t = lock(&self.table);
        let s = t.by_cid.remove(&cid)?;
        s.ended.cancel();
        if t.by_conn.get(&s.entry.id) == Some(&cid) {
            t.by_conn.remove(&s.entry.id);
        }
        if t.by_ip.get(&s.ip) == Some(&cid) {
            t.by_ip.remove(&s.ip);
        }
        Some(s)
    }

    pub fn get(&self, cid: u64) -> Option<Session> {
        lock(&self.table).by_cid.get(&cid).cloned()
    }

    /// The connection a packet from `ip` belongs to, if a session holds that address.
    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<Arc<Entry>> {
        let t = lock(&self.table);
        let cid = t.by_ip.get(&ip)?;
        t.by_cid.get(cid).map(|s| s.entry.clone())
    }

    /// Every live session (for a resync and for shutdown).
    pub fn all(&self) -> Vec<Session> {
        lock(&self.table).by_cid.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        lock(&self.table).by_cid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
