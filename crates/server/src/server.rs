//! `proxyfleet serve`: assemble the components, bind, run until cancelled, shut down gracefully.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppInner, AppState};
use crate::auth::jwt::JwtKeys;
use crate::auth::limiter::{LimitPolicy, LoginLimiter};
use crate::auth::password::Hasher;
use crate::auth::sessions::Sessions;
use crate::auth::{self as authn, Auth};
use crate::clock::{Clock, SystemClock};
use crate::config::{Secret, ServeConfig};
use crate::metrics::Metrics;
use crate::redis::Redis;
use crate::store::Store;

/// Options that are not configuration: injected collaborators (tests replace the clock).
#[derive(Clone)]
pub struct ServeOptions {
    pub clock: Arc<dyn Clock>,
    /// How the data-plane lock is watched (tests shorten it).
    pub lock_timing: crate::store::LockTiming,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            clock: Arc::new(SystemClock),
            lock_timing: crate::store::LockTiming::default(),
        }
    }
}

/// A started server. Dropping it does not stop it; call [`RunningServer::shutdown`] or cancel the token.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The one-time setup token, when no operator existed at startup.
    pub setup_token: Option<Secret>,
    pub store: Store,
    pub state: AppState,
    /// Where devices connect (UDP), when the tunnel is enabled.
    pub tunnel_addr: Option<SocketAddr>,
    /// The shared proxy ports, when enabled.
    pub http_proxy_addr: Option<SocketAddr>,
    pub socks5_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    http: JoinHandle<std::io::Result<()>>,
    shutdown_timeout: std::time::Duration,
    /// Held while this process serves the data plane; freed after the last usage is written.
    lock: Option<crate::store::DataPlaneLock>,
    /// Why the server stopped on its own, when it did (the lock went to another process).
    failed: Arc<std::sync::OnceLock<crate::store::LockLost>>,
}

impl RunningServer {
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stop accepting, let in-flight requests finish (up to the shutdown timeout), stop background tasks, close
    /// the store.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.wait().await;
    }

    /// Wait until the server has stopped (after the token is cancelled); an error when it stopped on its own.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        self.cancel.cancelled().await;
        let grace = self.shutdown_timeout;
        match tokio::time::timeout(grace, &mut self.http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "HTTP server stopped with an error"),
            Ok(Err(e)) => tracing::error!(error = %e, "HTTP server task failed"),
            Err(_) => {
                tracing::warn!(
                    "HTTP connections still open at the shutdown deadline; dropping them"
                );
                self.http.abort();
            }
        }
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tracker.len(),
                "background tasks still running at the shutdown deadline"
            );
        }
        let dir = &self.state.proxy.ctx.dir;
        if self.failed.get().is_some() {
            dir.hand_over_totals();
        }
        // Every flow has ended (or was abandoned at the deadline): the meters hold their final counts. Each step
        // is bounded, so an unreachable database cannot hold the process (what is not written is lost, as in a
        // crash: at most one flush interval).
        match tokio::time::timeout(grace, dir.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not write usage at shutdown"),
            Err(_) => tracing::error!("writing usage at shutdown timed out"),
        }
        dir.save_verified().await;
        if tokio::time::timeout(grace, self.store.close())
            .await
            .is_err()
        {
            tracing::warn!("the store's connections did not close by the shutdown deadline");
        }
        // Only now may another process take over: everything this one metered is written.
        if let Some(lock) = self.lock {
            lock.release().await;
        }
        tracing::info!("shut down");
        match self.failed.get() {
            Some(lost) => Err(anyhow::anyhow!("{lost}")),
            None => Ok(()),
        }
    }
}

/// Start everything and return once the listener is bound.
pub async fn start(config: ServeConfig, opts: ServeOptions) -> anyhow::Result<RunningServer> {
    let cancel = CancellationToken::new();
    // A start that fails part-way stops what it had started (listeners included), rather than leaving a data
    // plane running without its lock.
    let started = cancel.clone().drop_guard();
    let tracker = TaskTracker::new();
    ensure_data_dir(&config.data_dir)?;
    let jwt_secret = match &config.jwt_secret {
        Some(s) => s.clone(),
        None => load_or_generate_secret(&config.data_dir.join("jwt_secret"))?,
    };
    let failed = Arc::new(std::sync::OnceLock::new());
    let (store, lock) = if config.serves_data_plane() {
        let (store, lock) =
            Store::open_locked(config.database_url.expose(), config.db_max_connections)
                .await
                .context("opening the store")?;
        // Watched from now on, migrations included; a start that fails cancels the watch and so frees the lock.
        tracker.spawn(keep_lock(
            lock.clone(),
            opts.lock_timing,
            failed.clone(),
            cancel.clone(),
        ));
        store.migrate().await.context("opening the store")?;
        (store, Some(lock))
    } else {
        let store = Store::connect(config.database_url.expose(), config.db_max_connections)
            .await
            .context("opening the store")?;
        (store, None)
    };
    tracing::info!(
        backend = store.backend().name(),
        data_plane = lock.is_some(),
        "store ready"
    );

    let metrics = Metrics::new().context("registering metrics")?;
    let redis = match &config.redis_url {
        Some(url) => Some(Redis::start(
            url,
            &config.redis_prefix,
            cancel.child_token(),
            metrics.redis_up.clone(),
        )?),
        None => None,
    };
    let hasher = Hasher::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .await
        .context("preparing the password hasher")?;
    let clock = opts.clock;
    let sessions = Sessions::new(
        store.clone(),
        redis.clone(),
        clock.clone(),
        JwtKeys::new(jwt_secret.expose().as_bytes()),
        config.session_idle_timeout,
    );
    let auth = Auth {
        store: store.clone(),
        hasher: hasher.clone(),
        sessions,
        limiter: LoginLimiter::new(LimitPolicy::default(), redis.clone(), clock.clone()),
        clock: clock.clone(),
        composition_rule: config.password_composition_rule,
    };
    let setup_token = authn::issue_setup_token_if_needed(&store, clock.as_ref())
        .await
        .context("checking for a first operator")?
        .map(Secret::new);
    let pki = Arc::new(
        crate::pki::Pki::load_or_create(&config.data_dir).context("loading the platform PKI")?,
    );
    let registry = Arc::new(crate::tunnel::Registry::default());
    let tunnel_addr = match config.tunnel_listen {
        Some(addr) => Some(
            crate::tunnel::start(
                addr,
                crate::tunnel::TunnelContext {
                    quic: config.tunnel_quic,
                    store: store.clone(),
                    pki: pki.clone(),
                    registry: registry.clone(),
                    clock: clock.clone(),
                    heartbeat_interval: config.tunnel_heartbeat,
                    cancel: cancel.child_token(),
                    tracker: tracker.clone(),
                },
            )
            .await?,
        ),
        None => None,
    };
    if let Some(addr) = tunnel_addr {
        let transports = if config.tunnel_quic {
            "QUIC on UDP, TLS fallback on TCP"
        } else {
            "TLS on TCP only"
        };
        tracing::info!(%addr, transports, "device tunnel listening");
    }
    tracker.spawn(crate::tunnel::flush_seen(
        store.clone(),
        registry.clone(),
        clock.clone(),
        std::time::Duration::from_secs(10),
        cancel.child_token(),
    ));
    let proxy = start_proxy(
        &metrics,
        &config,
        &store,
        // Customers' checks queue apart from operators' logins (`Hasher::own_lane`).
        hasher.own_lane(),
        redis.clone(),
        &clock,
        &registry,
        &pki,
        &cancel,
        &tracker,
    )
    .await?;
    let webhooks = start_alerting(&config, &store, &clock, &registry, &cancel, &tracker)?;
    tracker.spawn(quota_events(
        store.clone(),
        proxy.ctx.dir.clone(),
        webhooks.wake.clone(),
        cancel.child_token(),
    ));
    let state = AppState(Arc::new(AppInner {
        webhooks,
        proxy: proxy.clone(),
        pki,
        registry,
        pairing_ttl: config.pairing_ttl,
        tunnel_addr,
        auth,
        store: store.clone(),
        metrics,
        redis,
        trusted_proxies: config.trusted_proxies.clone(),
        public_url: config.public_url.clone(),
        data_plane: lock.is_some(),
    }));
    let (router, _) = api::router(state.clone());
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the API listener on {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "API and dashboard listening");
    let shutdown = cancel.clone();
    let http = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    });
    tracker.spawn(migrate_on_start(store.clone(), cancel.child_token()));
    tracker.spawn(housekeeping(
        store.clone(),
        clock.clone(),
        cancel.child_token(),
    ));
    started.disarm();
    Ok(RunningServer {
        addr,
        setup_token,
        store,
        state,
        tunnel_addr,
        http_proxy_addr: proxy.http_addr,
        socks5_addr: proxy.socks5_addr,
        cancel,
        tracker,
        http,
        shutdown_timeout: config.shutdown_timeout,
        lock,
        failed,
    })
}

/// Keep the data-plane lock; once it may have gone to another process, stop serving (that process meters the
/// doors now). [`RunningServer::wait`] then leaves the usage totals to it.
async fn keep_lock(
    lock: crate::store::DataPlaneLock,
    timing: crate::store::LockTiming,
    failed: Arc<std::sync::OnceLock<crate::store::LockLost>>,
    cancel: CancellationToken,
) {
    if let Err(lost) = lock.keep(timing, cancel.child_token()).await {
        tracing::error!(error = %lost, "stopping: this process may no longer serve the data plane");
        let _ = failed.set(lost);
        cancel.cancel();
    }
}

/// Write the proxy directory's quota crossings (80 %, exhausted, reset) to the webhook outbox.
async fn quota_events(
    store: Store,
    dir: Arc<crate::proxy::Directory>,
    wake: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    dir.set_quota_sink(tx);
    loop {
        let e = tokio::select! {
            _ = cancel.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let percent = e
            .limit
            .filter(|l| *l > 0)
            .map(|l| u128::from(e.used) * 100 / u128::from(l));
        let data = serde_json::json!({
            "connection": {"id": e.connection_id, "username": e.username},
            "used_bytes": e.used,
            "limit_bytes": e.limit,
            "percent": percent,
        });
        let event = crate::webhooks::event(&e.operator_id, e.kind, e.at_ms, data);
        match store.enqueue_event(&event, e.at_ms).await {
            Ok(true) => wake.notify_one(),
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(error = %err, kind = e.kind, "could not write a quota event")
            }
        }
    }
}

/// The offline detector and the webhook worker.
fn start_alerting(
    config: &ServeConfig,
    store: &Store,
    clock: &Arc<dyn Clock>,
    registry: &Arc<crate::tunnel::Registry>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<crate::api::WebhookState> {
    use crate::webhooks::{DataKey, Sender};
    let key = DataKey::load_or_create(&config.data_dir).context("loading the data key")?;
    let sender =
        Sender::new(config.webhook_allow_private).context("building the webhook client")?;
    let wake = Arc::new(tokio::sync::Notify::new());
    let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let rules = crate::monitor::Rules {
        offline_after: ms(config.offline_after),
        cooldown: ms(config.alert_cooldown),
        startup_grace: ms(config.offline_after),
    };
    let detector =
        crate::monitor::Detector::new(store.clone(), clock.clone(), rules, Some(registry.clone()));
    tracker.spawn(crate::monitor::run(
        detector,
        config.monitor_scan,
        registry.recovered.clone(),
        wake.clone(),
        cancel.child_token(),
    ));
    tracker.spawn(crate::webhooks::worker(
        store.clone(),
        clock.clone(),
        key.clone(),
        sender.clone(),
        wake.clone(),
        cancel.child_token(),
    ));
    Ok(crate::api::WebhookState {
        key,
        sender,
        wake,
        last_test: std::sync::Mutex::default(),
    })
}

/// The proxy side: directory, shared doors, dedicated ports, usage flushing.
pub struct Proxy {
    pub ctx: Arc<crate::proxy::ProxyContext>,
    pub dedicated: crate::proxy::Dedicated,
    pub http_addr: Option<SocketAddr>,
    pub socks5_addr: Option<SocketAddr>,
    /// Host name for customers' proxy URLs.
    pub public_host: String,
    /// The OpenVPN door, when configured and able to run.
    pub openvpn: Option<Arc<crate::openvpn::Door>>,
}

/// The data directory's file of verified proxy credentials ([`crate::proxy::verified`]).
pub const VERIFIED_FILE: &str = "proxy-verified";

#[allow(clippy::too_many_arguments)]
async fn start_proxy(
    metrics: &Metrics,
    config: &ServeConfig,
    store: &Store,
    hasher: Hasher,
    redis: Option<Redis>,
    clock: &Arc<dyn Clock>,
    registry: &Arc<crate::tunnel::Registry>,
    pki: &crate::pki::Pki,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Arc<Proxy>> {
    use crate::proxy::{Dedicated, Directory, Door, ProxyContext};
    // Customers' wrong passwords: a little more room than operators get (many clients retry on their own), and
    // shorter lockouts.
    let policy = LimitPolicy {
        per_user: 10,
        per_ip: 30,
        base_lock_ms: 10_000,
        max_lock_ms: 5 * 60_000,
        window_ms: 60 * 60_000,
    };
    let shutdown = cancel.child_token();
    let dir = Directory::load(
        store.clone(),
        hasher,
        LoginLimiter::new(policy, redis, clock.clone()),
        clock.clone(),
        shutdown.clone(),
        (
            pki.derived_secret("proxy verified credentials"),
            Some(config.data_dir.join(VERIFIED_FILE)),
        ),
    )
    .await
    .context("loading proxy connections")?;
    let ctx = Arc::new(ProxyContext {
        dir: Arc::new(dir),
        handshake_timeout: config.proxy_handshake_timeout,
        half_closed_timeout: config.proxy_half_closed_timeout,
        keep_alive_timeout: config.proxy_keep_alive_timeout,
        max_flows_per_connection: config.proxy_max_flows_per_connection,
        metrics: metrics.clone(),
        registry: registry.clone(),
        shutdown,
        tracker: tracker.clone(),
    });
    let mut bound = [None, None];
    for (i, (addr, door, what)) in [
        (config.http_proxy_listen, Door::Http, "HTTP proxy"),
        (config.socks5_listen, Door::Socks5, "SOCKS5"),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(addr) = addr else { continue };
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {what} listener on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "{what} door listening");
        bound[i] = Some(local);
        tracker.spawn(crate::proxy::serve(
            ctx.clone(),
            listener,
            door,
            CancellationToken::new(),
        ));
    }
    let dedicated = Dedicated::new(
        config.proxy_dedicated_ip,
        config.proxy_dedicated_ports.clone(),
    );
    dedicated.start_all(&ctx).await;
    tracker.spawn(crate::proxy::directory::flush_loop(
        ctx.dir.clone(),
        config.usage_flush,
        cancel.child_token(),
    ));
    let openvpn = match &config.openvpn {
        Some(s) => {
            crate::openvpn::start(
                s,
                &config.data_dir,
                &config.proxy_public_host,
                &ctx,
                tracker,
            )
            .await?
        }
        None => {
            tracing::info!("the OpenVPN door is off (openvpn_listen is not set)");
            None
        }
    };
    Ok(Arc::new(Proxy {
        ctx,
        dedicated,
        http_addr: bound[0],
        socks5_addr: bound[1],
        public_host: config.proxy_public_host.clone(),
        openvpn,
    }))
}

impl Proxy {
    /// An operator was disabled or deleted: their connections stop at once.
    pub fn forget_operator(&self, operator_id: &str, deleted: bool) {
        for e in self.ctx.dir.remove_operator(operator_id, deleted) {
            self.dedicated.stop(&e);
        }
    }

    /// An operator was enabled again: their connections come back.
    pub async fn load_operator(&self, operator_id: &str) -> Result<(), crate::store::StoreError> {
        for row in self.ctx.dir.store().connections(operator_id).await? {
            let e = self.ctx.dir.upsert(&row);
            if let Some(port) = e.dedicated_port() {
                match self.dedicated.reserve(&e.id, port).await {
                    Ok(Some(l)) => self.dedicated.start(&self.ctx, &e.id, l),
                    Ok(None) => {}
                    Err(err) => {
                        tracing::error!(connection = %e.id, port, error = %err, "cannot listen on dedicated port")
                    }
                }
            }
        }
        Ok(())
    }
}

/// Replace plaintext proxy passwords (from an import) by bcrypt hashes in the background, with one core fewer than
/// the machine has so that logins and proxy checks keep theirs. Until its row is reached, a customer's first
/// authentication migrates that row on the spot (see `Directory::authenticate`), so nobody fails meanwhile.
async fn migrate_on_start(store: Store, cancel: CancellationToken) {
    let plain = match store.credential_counts().await {
        Ok((plain, _, _)) if plain > 0 => plain,
        Ok(_) => return,
        Err(e) => {
            tracing::error!(error = %e, "cannot count plaintext passwords");
            return;
        }
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let Ok(hasher) = Hasher::new(cores.saturating_sub(1).max(1)).await else {
        return;
    };
    tracing::info!(
        rows = plain,
        "migrating plaintext proxy passwords to bcrypt in the background"
    );
    let mut next_log = plain / 10;
    let run = crate::legacy::migrate_passwords(
        &store,
        &hasher,
        crate::legacy::DEFAULT_BATCH,
        false,
        &cancel,
        |done, total| {
            if i64::try_from(done).unwrap_or(i64::MAX) >= next_log {
                tracing::info!(done, total, "password migration progress");
                next_log += (total / 10).max(1);
            }
        },
    )
    .await;
    match run {
        Ok(r) if r.failed.is_empty() => {
            tracing::info!(migrated = r.migrated, "password migration finished")
        }
        Ok(r) => tracing::error!(
            migrated = r.migrated,
            failed = r.failed.len(),
            "password migration finished; some connections keep a plaintext password bcrypt cannot take \
             (see `proxyfleet migrate-passwords`; regenerate their passwords)"
        ),
        Err(e) => tracing::error!(error = %e, "password migration stopped; it resumes at the next start"),
    }
}

/// Hourly: forget sessions that expired more than a day ago.
async fn housekeeping(store: Store, clock: Arc<dyn Clock>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                let cutoff = clock.now_ms() - 24 * 3600 * 1000;
                match store.prune_sessions(cutoff).await {
                    Ok(n) if n > 0 => tracing::debug!(pruned = n, "pruned expired sessions"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = ?e, "pruning sessions failed"),
                }
            }
        }
    }
}

/// Create the data directory, readable only by its owner.
pub fn ensure_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating data directory {}", dir.display()))?;
    }
    Ok(())
}

/// Read a secret from `path`, or generate 48 random bytes (base64) into it with mode 0600 on first run.
pub fn load_or_generate_secret(path: &Path) -> anyhow::Result<Secret> {
    use base64::Engine;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= crate::config::MIN_JWT_SECRET_BYTES => {
            return Ok(Secret::new(s.trim()))
        }
        Ok(_) => anyhow::bail!(
            "{} is shorter than {} bytes; delete it to generate a new one",
            path.display(),
            crate::config::MIN_JWT_SECRET_BYTES
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let bytes: [u8; 48] = rand::random();
    let secret = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()?;
    tracing::info!(path = %path.display(), "generated a new JWT signing secret");
    Ok(Secret::new(secret))
}

/// Open (and migrate) the store for a command-line tool.
pub async fn open_store(config: &ServeConfig) -> anyhow::Result<Store> {
    ensure_data_dir(&config.data_dir)?;
    Store::connect(config.database_url.expose(), 4)
        .await
        .context("opening the store")
}

/// `proxyfleet operator create`: open the store and create an operator. The first operator is always an admin.
pub async fn create_operator(
    config: &ServeConfig,
    username: &str,
    password: &str,
    role: crate::store::Role,
) -> anyhow::Result<crate::store::Operator> {
    use crate::auth::password::{check_password, normalize_username};
    use crate::store::{NewOperator, Role, StoreError};
    ensure_data_dir(&config.data_dir)?;
    let store = Store::connect(config.database_url.expose(), 2)
        .await
        .context("opening the store")?;
    let name = normalize_username(username).map_err(|m| anyhow::anyhow!("{m}"))?;
    check_password(&name, password, config.password_composition_rule)?;
    let hash = Hasher::new(1).await?.hash(password).await?;
    let role = if store.count_operators().await? == 0 {
        Role::Admin
    } else {
        role
    };
    let op = store
        .create_operator(NewOperator {
            username: &name,
            password_hash: &hash,
            role,
            now: SystemClock.now_ms(),
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => anyhow::anyhow!("an operator named {name} already exists"),
            other => anyhow::Error::new(other),
        })?;
    store.close().await;
    Ok(op)
}
