//! The OpenVPN door: customers connect with a `.ovpn` profile; the real `openvpn` binary runs as a supervised child
//! and asks proxyfleet (over its management interface) whether each login may pass; customer packets are routed
//! into proxyfleet's own tun, terminated by a userspace TCP/IP stack, and every TCP and UDP flow goes through the
//! same relay, meter and device as the HTTP and SOCKS5 doors.
//!
//! Pieces: [`keys`] (CA, server certificate, tls-crypt key, profiles), [`child`] (server config, supervisor),
//! [`net`] (tun devices, policy route, nftables), [`manager`] (management client: auth, sessions, kills),
//! [`sessions`] (stable addresses, live sessions), [`engine`] (packets to flows), [`flows`] (flows to the relay).

pub mod child;
pub mod engine;
mod flows;
pub mod keys;
pub mod manager;
pub mod net;
pub mod sessions;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use sessions::FIRST_CUSTOMER_HOST;

use crate::config::OpenVpnSettings;
use crate::proxy::ProxyContext;
use keys::{Keys, ProfileTarget};

/// A running OpenVPN door.
pub struct Door {
    pub keys: Keys,
    pub settings: OpenVpnSettings,
    /// Host name customers' profiles connect to.
    pub public_host: String,
    pub sessions: Arc<sessions::Sessions>,
    pub manager: Arc<manager::Manager>,
    pid: tokio::sync::watch::Receiver<u32>,
    /// Stops the packet engine (see [`Door::stop_data_path`]).
    data_path: CancellationToken,
}

impl Door {
    /// A customer's profile; with `password`, the credentials are inline.
    pub fn profile(&self, username: &str, password: Option<&str>) -> String {
        keys::profile(
            &self.keys,
            &ProfileTarget {
                host: &self.public_host,
                port: self.settings.listen.port(),
                proto: self.settings.proto,
            },
            username,
            password,
        )
    }

    /// Process id of the running `openvpn` child, 0 while none runs.
    pub fn openvpn_pid(&self) -> u32 {
        *self.pid.borrow()
    }

    /// Wait until an `openvpn` child other than `not` runs; its pid.
    pub async fn wait_for_openvpn(&self, not: u32) -> u32 {
        let mut rx = self.pid.clone();
        loop {
            let p = *rx.borrow_and_update();
            if p != 0 && p != not {
                return p;
            }
            if rx.changed().await.is_err() {
                return 0;
            }
        }
    }

    /// Stop the packet engine as if proxyfleet's data path had died: its tun and its TCP listener go away, the
    /// kernel rules stay. Customers' packets then meet the blackhole (tests of the fail-closed promise use this).
    pub fn stop_data_path(&self) {
        self.data_path.cancel();
    }

    /// Drop the management connection (it comes back at once and resyncs); established customers stay.
    pub fn reconnect_management(&self) {
        self.manager.reconnect();
    }
}

/// Start the OpenVPN door, or say clearly why it is off and return `None` (the rest of the server runs on).
pub async fn start(
    settings: &OpenVpnSettings,
    data_dir: &Path,
    public_host: &str,
    ctx: &Arc<ProxyContext>,
    tracker: &TaskTracker,
) -> anyhow::Result<Option<Arc<Door>>> {
    let off = |reason: String| {
        tracing::error!("the OpenVPN door is OFF: {reason}");
        Ok(None)
    };
    let version = match child::probe(&settings.binary).await {
        Ok(v) => v,
        Err(e) => {
            return off(format!(
                "{e} (install it: apt-get install openvpn, or set openvpn_binary)"
            ))
        }
    };
    if let Err(e) = net::check_prerequisites() {
        return off(e);
    }
    let dir = data_dir.join("openvpn");
    let keys = Keys::load_or_create(&dir).context("preparing the OpenVPN keys")?;
    let sessions = Arc::new(
        sessions::Sessions::load(ctx.dir.store().clone(), settings.subnet)
            .await
            .context("loading VPN addresses")?,
    );
    let paths = child::Paths::new(&dir);
    child::kill_stale(&paths.pid).await;
    let _ = std::fs::remove_file(&paths.mgmt);
    let tcp = match engine::transparent_listener() {
        Ok(l) => l,
        Err(e) => {
            return off(format!(
                "cannot open its transparent TCP listener (it needs CAP_NET_ADMIN): {e}"
            ))
        }
    };
    let tproxy_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
    let gateway = std::net::Ipv4Addr::from(u32::from(settings.subnet.network()) + 1);
    if let Err(e) = net::setup(tproxy_port, gateway).await {
        net::teardown().await;
        return off(format!(
            "cannot set up its network (it needs root or CAP_NET_ADMIN): {e}"
        ));
    }
    let tun = match engine::open_tun(net::STACK_DEV) {
        Ok(t) => t,
        Err(e) => {
            net::teardown().await;
            return off(format!("cannot create the {} tun: {e}", net::STACK_DEV));
        }
    };
    if let Err(e) = net::attach_stack().await {
        net::teardown().await;
        return off(format!("cannot route into {}: {e}", net::STACK_DEV));
    }
    // OpenVPN exits when it cannot put an IPv6 address on its tun: where this host has IPv6 off, the door runs
    // without the IPv6 lines (there is then no IPv6 of the server's to leak to either).
    let ipv6 = net::enable_ipv6();
    if !ipv6 {
        tracing::warn!("IPv6 is off on this host: VPN clients' IPv6 is not routed into the tunnel (block-ipv6 needs it)");
    }
    let conf = child::server_config(settings, &keys, &paths, ipv6);
    let _ = std::fs::remove_file(&paths.config);
    crate::pki::write(&paths.config, &conf, 0o600).context("writing the OpenVPN config")?;

    let manager = Arc::new(manager::Manager {
        ctx: ctx.clone(),
        sessions: sessions.clone(),
        socket: paths.mgmt.clone(),
        netmask: settings.subnet.netmask(),
        ipv6,
        drop_socket: std::sync::Mutex::new(CancellationToken::new()),
        kills: std::sync::Mutex::new(None),
    });
    let (pid_tx, pid) = tokio::sync::watch::channel(0u32);
    let shutdown = ctx.shutdown.clone();
    let (binary, config) = (settings.binary.clone(), paths.config.clone());
    tracker.spawn(async move {
        child::supervise(binary, config, shutdown, pid_tx).await;
        net::teardown().await;
    });
    tracker.spawn(manager::run(manager.clone()));
    let data_path = ctx.shutdown.child_token();
    tracker.spawn(flows::serve(
        ctx.clone(),
        sessions.clone(),
        settings.dns,
        settings.subnet.contains(&settings.dns),
        Box::new(engine::TproxyEngine::new(
            tcp,
            engine::StackEngine::new(tun),
        )),
        data_path.clone(),
    ));
    tracing::info!(
        listen = %settings.listen,
        proto = settings.proto,
        subnet = %settings.subnet,
        dns = %settings.dns,
        %version,
        "OpenVPN door listening"
    );
    Ok(Some(Arc::new(Door {
        keys,
        settings: settings.clone(),
        public_host: public_host.to_owned(),
        sessions,
        manager,
        pid,
        data_path,
    })))
}
