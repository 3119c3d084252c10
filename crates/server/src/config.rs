//! Server configuration: one typed struct, assembled from defaults < TOML file < environment < CLI flags.
//!
//! The binary turns its flags and `PROXYFLEET_*` variables into a [`RawConfig`]; this module adds the file and the
//! seed's variable names (`JWT_SECRET`, `DB_*`, `REDIS_*`, `DATABASE_URL`), then validates everything once in
//! [`ServeConfig::resolve`] with errors that name the setting.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

/// Minimum length of a configured JWT secret, in bytes (HS256 wants at least its 256-bit output size).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format {s:?} (use text or json)")),
        }
    }
}

/// Every setting, each optional, as one source gives them. Also the schema of the TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub database_url: Option<Secret>,
    pub db_driver: Option<String>,
    pub db_host: Option<String>,
    pub db_port: Option<u16>,
    pub db_user: Option<String>,
    pub db_pass: Option<Secret>,
    pub db_name: Option<String>,
    pub db_max_connections: Option<u32>,
    pub jwt_secret: Option<Secret>,
    /// May be a full URL with a password, hence secret.
    pub redis_addr: Option<Secret>,
    pub redis_password: Option<Secret>,
    pub redis_prefix: Option<String>,
    pub session_idle_timeout_secs: Option<u64>,
    pub password_composition_rule: Option<bool>,
    pub trusted_proxies: Option<Vec<IpNet>>,
    pub public_url: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub shutdown_timeout_secs: Option<u64>,
    pub tunnel_listen: Option<SocketAddr>,
    pub tunnel_quic: Option<bool>,
    pub tunnel_heartbeat_secs: Option<u64>,
    pub pairing_ttl_secs: Option<u64>,
    pub http_proxy_listen: Option<SocketAddr>,
    pub socks5_listen: Option<SocketAddr>,
    pub proxy_dedicated_ports: Option<String>,
    pub proxy_dedicated_ip: Option<IpAddr>,
    pub proxy_public_host: Option<String>,
    pub usage_flush_secs: Option<u64>,
    pub proxy_handshake_timeout_secs: Option<u64>,
    pub proxy_half_closed_timeout_secs: Option<u64>,
    pub proxy_keep_alive_timeout_secs: Option<u64>,
    pub proxy_max_flows_per_connection: Option<u64>,
    pub offline_after_secs: Option<u64>,
    pub alert_cooldown_secs: Option<u64>,
    pub monitor_scan_secs: Option<u64>,
    pub webhook_allow_private: Option<bool>,
    pub openvpn_listen: Option<SocketAddr>,
    pub openvpn_proto: Option<String>,
    pub openvpn_subnet: Option<ipnet::Ipv4Net>,
    pub openvpn_dns: Option<std::net::Ipv4Addr>,
    pub openvpn_binary: Option<PathBuf>,
    pub openvpn_keepalive_secs: Option<u64>,
}

macro_rules! overlay_fields {
    ($low:ident, $high:ident, $($f:ident),* $(,)?) => {
        RawConfig { $($f: $high.$f.or($low.$f)),* }
    };
}

impl RawConfig {
    /// Settings from `higher` win; the rest come from `self`.
    pub fn overlay(self, higher: RawConfig) -> RawConfig {
        let low = self;
        overlay_fields!(
            low,
            higher,
            data_dir,
            listen,
            database_url,
            db_driver,
            db_host,
            db_port,
            db_user,
            db_pass,
            db_name,
            db_max_connections,
            jwt_secret,
            redis_addr,
            redis_password,
            redis_prefix,
            session_idle_timeout_secs,
            password_composition_rule,
            trusted_proxies,
            public_url,
            log_format,
            log_level,
            shutdown_timeout_secs,
            tunnel_listen,
            tunnel_quic,
            tunnel_heartbeat_secs,
            pairing_ttl_secs,
            http_proxy_listen,
            socks5_listen,
            proxy_dedicated_ports,
            proxy_dedicated_ip,
            proxy_public_host,
            usage_flush_secs,
            proxy_handshake_timeout_secs,
            proxy_half_closed_timeout_secs,
            proxy_keep_alive_timeout_secs,
            proxy_max_flows_per_connection,
            offline_after_secs,
            alert_cooldown_secs,
            monitor_scan_secs,
            webhook_allow_private,
            openvpn_listen,
            openvpn_proto,
            openvpn_subnet,
            openvpn_dns,
            openvpn_binary,
            openvpn_keepalive_secs,
        )
    }

    /// Parse a TOML configuration file. Unknown keys are errors, so a typo never goes unnoticed.
    pub fn from_toml_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The seed's environment variable names (`JWT_SECRET`, `DATABASE_URL`, `DB_HOST`, …), read through `var`.
    pub fn from_seed_env(var: impl Fn(&str) -> Option<String>) -> Result<RawConfig, ConfigError> {
        let db_port = match var("DB_PORT") {
            Some(p) => Some(p.parse().map_err(|_| ConfigError::Invalid {
                setting: "DB_PORT",
                message: format!("{p:?} is not a port number"),
            })?),
            None => None,
        };
        Ok(RawConfig {
            jwt_secret: var("JWT_SECRET").map(Secret),
            database_url: var("DATABASE_URL").map(Secret),
            db_driver: var("DB_DRIVER"),
            db_host: var("DB_HOST"),
            db_port,
            db_user: var("DB_USER"),
            db_pass: var("DB_PASS").map(Secret),
            db_name: var("DB_NAME"),
            redis_addr: var("REDIS_ADDR").map(Secret),
            redis_password: var("REDIS_PASSWORD").map(Secret),
            ..RawConfig::default()
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("setting {setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

/// A log level or a `RUST_LOG`-style filter. A bare word must be a level: `verbose` would otherwise be read as a
/// target name and silence every log line.
fn log_filter(filter: String) -> Result<String, ConfigError> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |w: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(w.trim()));
    let mut any = false;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        any = true;
        let level_ok = match directive.rsplit_once('=') {
            Some((target, level)) => !target.trim().is_empty() && is_level(level),
            None => is_level(directive),
        };
        if !level_ok
            || tracing_subscriber::EnvFilter::builder()
                .parse(directive)
                .is_err()
        {
            return Err(invalid(
                "log_level",
                format!(
                    "`{directive}` is not a level (off, error, warn, info, debug, trace) or TARGET=LEVEL"
                ),
            ));
        }
    }
    if !any {
        return Err(invalid("log_level", "is empty"));
    }
    Ok(filter)
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

/// The validated settings of `proxyfleet serve` (and of the commands that only need the store).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub database_url: Secret,
    pub db_max_connections: u32,
    /// `None`: generate one into the data directory on first run.
    pub jwt_secret: Option<Secret>,
    /// Full `redis://` URL (password included, hence secret); `None` means sessions and limits stay in SQL and memory.
    pub redis_url: Option<Secret>,
    /// Prefix of every Redis key this server writes, so deployments (and tests) can share one Redis.
    pub redis_prefix: String,
    pub session_idle_timeout: Duration,
    pub password_composition_rule: bool,
    pub trusted_proxies: Vec<IpNet>,
    /// Base URL printed in the setup link.
    pub public_url: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub shutdown_timeout: Duration,
    /// UDP address of the device tunnel (QUIC); `None` serves no devices.
    pub tunnel_listen: Option<SocketAddr>,
    /// Serve QUIC on the tunnel port (the TCP fallback is always served). Off only for UDP-hostile setups and tests.
    pub tunnel_quic: bool,
    /// Heartbeat interval told to agents.
    pub tunnel_heartbeat: Duration,
    /// Lifetime of a device pairing code.
    pub pairing_ttl: Duration,
    /// The shared HTTP proxy port; `None`: no HTTP proxy door.
    pub http_proxy_listen: Option<SocketAddr>,
    /// The shared SOCKS5 port; `None`: no SOCKS5 door.
    pub socks5_listen: Option<SocketAddr>,
    /// Ports operators may give connections as their own; `None`: no dedicated ports.
    pub proxy_dedicated_ports: Option<std::ops::RangeInclusive<u16>>,
    /// Address the dedicated ports listen on.
    pub proxy_dedicated_ip: IpAddr,
    /// Host name customers use in proxy URLs.
    pub proxy_public_host: String,
    /// How often usage counters are written to the store (at most this much is lost in a crash).
    pub usage_flush: Duration,
    /// A proxy client must finish its handshake (SOCKS5 negotiation, HTTP request head) within this.
    pub proxy_handshake_timeout: Duration,
    /// A flow one side has closed ends when the other side sends nothing for this long.
    pub proxy_half_closed_timeout: Duration,
    /// An HTTP proxy client's persistent connection closes when no next request begins within this.
    pub proxy_keep_alive_timeout: Duration,
    /// At most this many flows of one connection open at once (a device carries 4096).
    pub proxy_max_flows_per_connection: usize,
    /// A device is offline after this long without a heartbeat (also the grace after startup).
    pub offline_after: Duration,
    /// After an offline alert, no other for the same device for this long.
    pub alert_cooldown: Duration,
    /// How often the offline detector looks at every device.
    pub monitor_scan: Duration,
    /// Let webhooks go to private and loopback addresses (labs and tests only).
    pub webhook_allow_private: bool,
    /// The OpenVPN door; `None`: off.
    pub openvpn: Option<OpenVpnSettings>,
}

/// Settings of the OpenVPN door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenVpnSettings {
    /// Where OpenVPN listens (UDP, or TCP with `proto = "tcp"`); its port also goes into profiles.
    pub listen: SocketAddr,
    /// `udp` (default) or `tcp`.
    pub proto: &'static str,
    /// Customers' addresses; `.1` is the server, `.2` the default DNS address, customers from `.16`.
    pub subnet: ipnet::Ipv4Net,
    /// The DNS address pushed to customers; lookups to it are answered by the device's resolver.
    pub dns: std::net::Ipv4Addr,
    /// The `openvpn` program.
    pub binary: PathBuf,
    /// Ping interval pushed to clients; a side that hears nothing for three intervals restarts the session.
    pub keepalive: Duration,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "data";

impl ServeConfig {
    /// True when this process serves devices or customers (the tunnel, a proxy door, dedicated ports or the
    /// OpenVPN door), and so must hold the database's data-plane lock (decision 79).
    pub fn serves_data_plane(&self) -> bool {
        self.tunnel_listen.is_some()
            || self.http_proxy_listen.is_some()
            || self.socks5_listen.is_some()
            || self.proxy_dedicated_ports.is_some()
            || self.openvpn.is_some()
    }

    pub fn resolve(raw: RawConfig) -> Result<ServeConfig, ConfigError> {
        let raw_vpn = RawVpn {
            listen: raw.openvpn_listen,
            proto: raw.openvpn_proto.clone(),
            subnet: raw.openvpn_subnet,
            dns: raw.openvpn_dns,
            binary: raw.openvpn_binary.clone(),
            keepalive_secs: raw.openvpn_keepalive_secs,
        };
        let data_dir = raw
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let listen = match raw.listen {
            Some(l) => l,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|_| invalid("listen", "bad default"))?,
        };
        let database_url = database_url(&raw, &data_dir)?;
        crate::store::Backend::from_url(database_url.expose())
            .map_err(|e| invalid("database_url", e.to_string()))?;

        if let Some(secret) = &raw.jwt_secret {
            if secret.expose().len() < MIN_JWT_SECRET_BYTES {
                return Err(invalid(
                    "JWT_SECRET",
                    format!(
                        "is {} bytes; it must be at least {MIN_JWT_SECRET_BYTES} bytes (or leave it unset to \
                         generate one in the data directory)",
                        secret.expose().len()
                    ),
                ));
            }
        }
        let redis_url = redis_url(
            raw.redis_addr.as_ref().map(Secret::expose),
            raw.redis_password.as_ref(),
        )?;
        let idle = raw.session_idle_timeout_secs.unwrap_or(3600);
        if idle == 0 || idle > 24 * 3600 {
            return Err(invalid(
                "session_idle_timeout_secs",
                "must be between 1 and 86400 seconds",
            ));
        }
        let max_conn = raw.db_max_connections.unwrap_or(10);
        if max_conn == 0 {
            return Err(invalid("db_max_connections", "must be at least 1"));
        }
        let prefix = raw.redis_prefix.unwrap_or_else(|| "proxyfleet:".to_owned());
        if prefix.is_empty()
            || prefix.contains(|c: char| c.is_whitespace() || "*?[]\\^".contains(c))
        {
            return Err(invalid(
                "redis_prefix",
                "must be non-empty, without spaces or the characters * ? [ ] \\ ^",
            ));
        }
        let public_url = raw.public_url.unwrap_or_else(|| format!("http://{listen}"));
        let parsed_url =
            url::Url::parse(&public_url).map_err(|e| invalid("public_url", e.to_string()))?;
        let proxy_public_host = match raw.proxy_public_host {
            Some(h) if h.trim().is_empty() || h.contains(['/', ' ', '@']) => {
                return Err(invalid(
                    "proxy_public_host",
                    "must be a bare host name or address",
                ))
            }
            Some(h) => h,
            None => parsed_url.host_str().unwrap_or("localhost").to_owned(),
        };
        let proxy_dedicated_ports = raw
            .proxy_dedicated_ports
            .as_deref()
            .map(port_range)
            .transpose()?;
        let config = ServeConfig {
            data_dir,
            listen,
            database_url,
            db_max_connections: max_conn,
            jwt_secret: raw.jwt_secret,
            redis_url,
            redis_prefix: prefix,
            session_idle_timeout: Duration::from_secs(idle),
            password_composition_rule: raw.password_composition_rule.unwrap_or(true),
            trusted_proxies: raw.trusted_proxies.unwrap_or_default(),
            public_url: public_url.trim_end_matches('/').to_owned(),
            log_format: raw.log_format.unwrap_or_default(),
            log_level: log_filter(raw.log_level.unwrap_or_else(|| "info".to_owned()))?,
            // At least the 2 s a stopping flow has to write what it already counted, the 2 s it has for that to
            // arrive before its socket closes, and its goodbye.
            shutdown_timeout: Duration::from_secs(secs_in(
                "shutdown_timeout_secs",
                raw.shutdown_timeout_secs,
                10,
                5,
                3600,
            )?),
            tunnel_listen: raw.tunnel_listen,
            tunnel_quic: raw.tunnel_quic.unwrap_or(true),
            tunnel_heartbeat: Duration::from_secs(secs_in(
                "tunnel_heartbeat_secs",
                raw.tunnel_heartbeat_secs,
                30,
                1,
                3600,
            )?),
            pairing_ttl: Duration::from_secs(secs_in(
                "pairing_ttl_secs",
                raw.pairing_ttl_secs,
                900,
                60,
                7 * 86400,
            )?),
            http_proxy_listen: raw.http_proxy_listen,
            socks5_listen: raw.socks5_listen,
            proxy_dedicated_ports,
            proxy_dedicated_ip: raw
                .proxy_dedicated_ip
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            proxy_public_host,
            usage_flush: Duration::from_secs(secs_in(
                "usage_flush_secs",
                raw.usage_flush_secs,
                5,
                1,
                300,
            )?),
            proxy_handshake_timeout: Duration::from_secs(secs_in(
                "proxy_handshake_timeout_secs",
                raw.proxy_handshake_timeout_secs,
                10,
                1,
                120,
            )?),
            proxy_half_closed_timeout: Duration::from_secs(secs_in(
                "proxy_half_closed_timeout_secs",
                raw.proxy_half_closed_timeout_secs,
                60,
                1,
                86_400,
            )?),
            proxy_keep_alive_timeout: Duration::from_secs(secs_in(
                "proxy_keep_alive_timeout_secs",
                raw.proxy_keep_alive_timeout_secs,
                60,
                1,
                3_600,
            )?),
            proxy_max_flows_per_connection: {
                let v = raw.proxy_max_flows_per_connection.unwrap_or(1024);
                if !(1..=100_000).contains(&v) {
                    return Err(invalid(
                        "proxy_max_flows_per_connection",
                        "must be between 1 and 100000".to_owned(),
                    ));
                }
                usize::try_from(v).unwrap_or(1024)
            },
            offline_after: Duration::from_secs(secs_in(
                "offline_after_secs",
                raw.offline_after_secs,
                120,
                1,
                86_400,
            )?),
            alert_cooldown: Duration::from_secs(secs_in(
                "alert_cooldown_secs",
                raw.alert_cooldown_secs,
                300,
                0,
                86_400,
            )?),
            monitor_scan: Duration::from_secs(secs_in(
                "monitor_scan_secs",
                raw.monitor_scan_secs,
                5,
                1,
                60,
            )?),
            webhook_allow_private: raw.webhook_allow_private.unwrap_or(false),
            openvpn: openvpn_settings(&raw_vpn)?,
        };
        // A healthy device would be declared offline between two of its heartbeats, then recovered, over and
        // over (an offline and a recovery webhook each time).
        let beat = config.tunnel_heartbeat.as_secs();
        if config.offline_after.as_secs() < 2 * beat {
            return Err(invalid(
                "offline_after_secs",
                format!(
                    "must be at least twice tunnel_heartbeat_secs ({beat} s), or healthy devices flap between \
                     offline and online"
                ),
            ));
        }
        Ok(config)
    }
}

/// The OpenVPN door's settings, when `openvpn_listen` is set.
fn openvpn_settings(raw: &RawVpn) -> Result<Option<OpenVpnSettings>, ConfigError> {
    let Some(listen) = raw.listen else {
        return Ok(None);
    };
    let proto = match raw.proto.as_deref().unwrap_or("udp") {
        "udp" => "udp",
        "tcp" => "tcp",
        other => {
            return Err(invalid(
                "openvpn_proto",
                format!("{other:?} is neither udp nor tcp"),
            ))
        }
    };
    let subnet = raw
        .subnet
        .unwrap_or(ipnet::Ipv4Net::new_assert(
            std::net::Ipv4Addr::new(10, 77, 0, 0),
            16,
        ))
        .trunc();
    if !(8..=26).contains(&subnet.prefix_len()) {
        return Err(invalid(
            "openvpn_subnet",
            "must be a /8 to /26 network (for example 10.77.0.0/16)",
        ));
    }
    let net = u32::from(subnet.network());
    let dns = raw.dns.unwrap_or_else(|| std::net::Ipv4Addr::from(net + 2));
    let host = u32::from(dns).wrapping_sub(net);
    if dns.is_loopback()
        || dns.is_unspecified()
        || (subnet.contains(&dns)
            && (host == 0 || host == 1 || host >= crate::openvpn::FIRST_CUSTOMER_HOST))
    {
        return Err(invalid(
            "openvpn_dns",
            "must not be the network's own, the server's (.1) or a customer's address (.16 and up)",
        ));
    }
    Ok(Some(OpenVpnSettings {
        listen,
        proto,
        subnet,
        dns,
        binary: raw
            .binary
            .clone()
            .unwrap_or_else(|| PathBuf::from("openvpn")),
        keepalive: Duration::from_secs(secs_in(
            "openvpn_keepalive_secs",
            raw.keepalive_secs,
            10,
            1,
            300,
        )?),
    }))
}

/// The OpenVPN part of [`RawConfig`], taken out before the rest is consumed.
struct RawVpn {
    listen: Option<SocketAddr>,
    proto: Option<String>,
    subnet: Option<ipnet::Ipv4Net>,
    dns: Option<std::net::Ipv4Addr>,
    binary: Option<PathBuf>,
    keepalive_secs: Option<u64>,
}

/// `START-END`, both ports inclusive, `START <= END`, no port 0.
fn port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, ConfigError> {
    let bad = || {
        invalid(
            "proxy_dedicated_ports",
            format!("{s:?} is not a port range like 20000-20999"),
        )
    };
    let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok(a..=b)
}

fn secs_in(
    setting: &'static str,
    v: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let v = v.unwrap_or(default);
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(invalid(
            setting,
            format!("must be between {min} and {max} seconds"),
        ))
    }
}

/// `DATABASE_URL` if given; else one built from `DB_HOST`…; else the SQLite file in the data directory.
fn database_url(raw: &RawConfig, data_dir: &Path) -> Result<Secret, ConfigError> {
    if let Some(url) = &raw.database_url {
        return Ok(url.clone());
    }
    let Some(host) = &raw.db_host else {
        if let Some(driver) = raw.db_driver.as_deref().filter(|d| *d != "sqlite") {
            return Err(invalid(
                "DB_HOST",
                format!("is required with DB_DRIVER={driver}"),
            ));
        }
        let path = data_dir.join("proxyfleet.db");
        return Ok(Secret(format!("sqlite://{}", path.display())));
    };
    let driver = match raw.db_driver.as_deref() {
        Some("postgres" | "postgresql") => "postgres",
        Some("mysql" | "mariadb") => "mysql",
        Some(other) => {
            return Err(invalid(
                "DB_DRIVER",
                format!("{other:?} is not postgres or mysql"),
            ))
        }
        // The seed never named its driver; its port tells.
        None if raw.db_port == Some(3306) => "mysql",
        None => "postgres",
    };
    let port = raw
        .db_port
        .unwrap_or(if driver == "mysql" { 3306 } else { 5432 });
    let mut url = url::Url::parse(&format!("{driver}://placeholder"))
        .map_err(|e| invalid("DB_HOST", e.to_string()))?;
    url.set_host(Some(host))
        .map_err(|e| invalid("DB_HOST", e.to_string()))?;
    let _ = url.set_port(Some(port));
    if let Some(user) = &raw.db_user {
        let _ = url.set_username(user);
    }
    if let Some(pass) = &raw.db_pass {
        let _ = url.set_password(Some(pass.expose()));
    }
    url.set_path(raw.db_name.as_deref().unwrap_or("proxyfleet"));
    Ok(Secret(url.to_string()))
}

/// `REDIS_ADDR` may be `host:port` or a full `redis://` URL; `REDIS_PASSWORD` is added when given.
fn redis_url(addr: Option<&str>, password: Option<&Secret>) -> Result<Option<Secret>, ConfigError> {
    let Some(addr) = addr.filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let text = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}")
    };
    let mut url = url::Url::parse(&text).map_err(|e| invalid("REDIS_ADDR", format!("{e}")))?;
    if url.scheme() != "redis" {
        // rediss:// (TLS) is not built in; say so instead of failing later with a vague error.
        return Err(invalid(
            "REDIS_ADDR",
            "must be host:port or a redis:// URL (TLS to Redis is not supported)",
        ));
    }
    if url.host_str().is_none() {
        return Err(invalid("REDIS_ADDR", "has no host"));
    }
    if let Some(p) = password {
        let _ = url.set_password(Some(p.expose()));
    }
    Ok(Some(Secret(url.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        move |k| v.iter().find(|(a, _)| a == k).map(|(_, b)| b.clone())
    }

    #[test]
    fn openvpn_settings_are_validated() {
        assert_eq!(
            ServeConfig::resolve(RawConfig::default()).unwrap().openvpn,
            None,
            "off by default"
        );
        let on = |f: fn(&mut RawConfig)| {
            let mut raw = RawConfig {
                openvpn_listen: Some("0.0.0.0:1194".parse().unwrap()),
                ..Default::default()
            };
            f(&mut raw);
            ServeConfig::resolve(raw).map(|c| c.openvpn.unwrap())
        };
        let d = on(|_| {}).unwrap();
        assert_eq!(d.proto, "udp");
        assert_eq!(d.subnet.to_string(), "10.77.0.0/16");
        assert_eq!(d.dns, std::net::Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(d.keepalive, Duration::from_secs(10));
        assert_eq!(d.binary, PathBuf::from("openvpn"));
        let tcp = on(|r| {
            r.openvpn_proto = Some("tcp".into());
            r.openvpn_subnet = Some("10.99.1.7/24".parse().unwrap());
        })
        .unwrap();
        assert_eq!(
            (tcp.proto, tcp.subnet.to_string()),
            ("tcp", "10.99.1.0/24".into())
        );
        assert_eq!(
            tcp.dns,
            std::net::Ipv4Addr::new(10, 99, 1, 2),
            "DNS follows the subnet"
        );
        assert!(on(|r| r.openvpn_dns = Some("1.1.1.1".parse().unwrap())).is_ok());
        assert!(on(|r| r.openvpn_dns = Some("10.77.0.3".parse().unwrap())).is_ok());
        type Case = (fn(&mut RawConfig), &'static str);
        let bad: [Case; 6] = [
            (|r| r.openvpn_proto = Some("tls".into()), "openvpn_proto"),
            (
                |r| r.openvpn_subnet = Some("10.0.0.0/30".parse().unwrap()),
                "openvpn_subnet",
            ),
            (
                |r| r.openvpn_dns = Some("10.77.0.1".parse().unwrap()),
                "openvpn_dns",
            ),
            (
                |r| r.openvpn_dns = Some("10.77.0.16".parse().unwrap()),
                "openvpn_dns",
            ),
            (
                |r| r.openvpn_dns = Some("127.0.0.1".parse().unwrap()),
                "openvpn_dns",
            ),
            (
                |r| r.openvpn_keepalive_secs = Some(0),
                "openvpn_keepalive_secs",
            ),
        ];
        for (f, setting) in bad {
            let e = on(f).unwrap_err();
            assert!(e.to_string().contains(setting), "{e}");
        }
    }

    #[test]
    fn the_offline_threshold_must_leave_room_for_heartbeats() {
        let with = |beat, offline| {
            ServeConfig::resolve(RawConfig {
                tunnel_heartbeat_secs: Some(beat),
                offline_after_secs: offline,
                ..Default::default()
            })
        };
        assert!(
            with(30, None).is_ok(),
            "the defaults: 30 s heartbeats, offline after 120 s"
        );
        assert!(with(10, Some(20)).is_ok());
        for (beat, offline) in [(30, 30), (12, 5), (30, 59)] {
            let e = with(beat, Some(offline)).unwrap_err().to_string();
            assert!(
                e.contains("offline_after_secs") && e.contains("tunnel_heartbeat_secs"),
                "{e}"
            );
        }
        // The default threshold is checked too: a slow heartbeat needs a later one.
        assert!(with(61, None).is_err());
    }

    #[test]
    fn proxy_settings_are_validated() {
        let c = ServeConfig::resolve(RawConfig {
            proxy_dedicated_ports: Some("20000-20999".into()),
            public_url: Some("https://panel.example.com".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.proxy_dedicated_ports, Some(20000..=20999));
        assert_eq!(c.proxy_public_host, "panel.example.com");
        assert_eq!(c.usage_flush, Duration::from_secs(5));
        assert_eq!((c.http_proxy_listen, c.socks5_listen), (None, None));
        for (raw, setting) in [
            (
                RawConfig {
                    proxy_dedicated_ports: Some("20999-20000".into()),
                    ..Default::default()
                },
                "proxy_dedicated_ports",
            ),
            (
                RawConfig {
                    proxy_dedicated_ports: Some("0-10".into()),
                    ..Default::default()
                },
                "proxy_dedicated_ports",
            ),
            (
                RawConfig {
                    proxy_dedicated_ports: Some("20000".into()),
                    ..Default::default()
                },
                "proxy_dedicated_ports",
            ),
            (
                RawConfig {
                    usage_flush_secs: Some(0),
                    ..Default::default()
                },
                "usage_flush_secs",
            ),
            (
                RawConfig {
                    proxy_keep_alive_timeout_secs: Some(0),
                    ..Default::default()
                },
                "proxy_keep_alive_timeout_secs",
            ),
            (
                RawConfig {
                    proxy_public_host: Some("a b".into()),
                    ..Default::default()
                },
                "proxy_public_host",
            ),
        ] {
            let e = ServeConfig::resolve(raw).unwrap_err();
            assert!(e.to_string().contains(setting), "{e}");
        }
    }

    #[test]
    fn defaults_are_sqlite_in_data_dir_without_redis() {
        let c = ServeConfig::resolve(RawConfig::default()).unwrap();
        assert_eq!(c.database_url.expose(), "sqlite://data/proxyfleet.db");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.redis_url.is_none());
        assert!(c.jwt_secret.is_none());
        assert_eq!(c.session_idle_timeout, Duration::from_secs(3600));
        assert!(c.password_composition_rule);
    }

    #[test]
    fn validation_names_the_setting() {
        let table: Vec<(RawConfig, &str)> = vec![
            (
                RawConfig {
                    jwt_secret: Some(Secret::new("short")),
                    ..Default::default()
                },
                "JWT_SECRET",
            ),
            (
                RawConfig {
                    session_idle_timeout_secs: Some(0),
                    ..Default::default()
                },
                "session_idle_timeout_secs",
            ),
            (
                RawConfig {
                    database_url: Some(Secret::new("oracle://x")),
                    ..Default::default()
                },
                "database_url",
            ),
            (
                RawConfig {
                    redis_addr: Some(Secret::new("http://x:1")),
                    ..Default::default()
                },
                "REDIS_ADDR",
            ),
            (
                RawConfig {
                    redis_addr: Some(Secret::new("rediss://x:1")),
                    ..Default::default()
                },
                "REDIS_ADDR",
            ),
            (
                RawConfig {
                    redis_prefix: Some("pf*".into()),
                    ..Default::default()
                },
                "redis_prefix",
            ),
            (
                RawConfig {
                    db_driver: Some("postgres".into()),
                    ..Default::default()
                },
                "DB_HOST",
            ),
            (
                RawConfig {
                    db_max_connections: Some(0),
                    ..Default::default()
                },
                "db_max_connections",
            ),
            (
                RawConfig {
                    public_url: Some("not a url".into()),
                    ..Default::default()
                },
                "public_url",
            ),
        ];
        for (raw, setting) in table {
            let err = ServeConfig::resolve(raw).unwrap_err().to_string();
            assert!(err.contains(setting), "{err:?} should name {setting}");
        }
    }

    #[test]
    fn jwt_secret_of_32_bytes_is_accepted_and_hidden() {
        let s = "x".repeat(32);
        let c = ServeConfig::resolve(RawConfig {
            jwt_secret: Some(Secret::new(&s)),
            ..Default::default()
        })
        .unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains(&s), "secret leaked into Debug: {debug}");
    }

    #[test]
    fn seed_db_variables_build_a_url_and_hide_the_password() {
        let raw = RawConfig::from_seed_env(env(&[
            ("DB_HOST", "db.internal"),
            ("DB_USER", "pf"),
            ("DB_PASS", "s3cr3t-p@ss"),
            ("DB_NAME", "fleet"),
            ("DB_PORT", "3306"),
            ("REDIS_ADDR", "127.0.0.1:6380"),
            ("REDIS_PASSWORD", "redispw"),
        ]))
        .unwrap();
        let c = ServeConfig::resolve(raw).unwrap();
        assert_eq!(
            c.database_url.expose(),
            "mysql://pf:s3cr3t-p%40ss@db.internal:3306/fleet"
        );
        assert_eq!(
            c.redis_url.as_ref().unwrap().expose(),
            "redis://:redispw@127.0.0.1:6380"
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("s3cr3t") && !debug.contains("redispw"),
            "{debug}"
        );
    }

    #[test]
    fn seed_db_port_must_be_numeric() {
        let err = RawConfig::from_seed_env(env(&[("DB_PORT", "abc")])).unwrap_err();
        assert!(err.to_string().contains("DB_PORT"));
    }

    #[test]
    fn precedence_file_then_env_then_cli() {
        let file: RawConfig = toml::from_str(
            "listen = \"127.0.0.1:1000\"\nredis_prefix = \"file:\"\nsession_idle_timeout_secs = 60\n",
        )
        .unwrap();
        let env_layer = RawConfig {
            listen: Some("127.0.0.1:2000".parse().unwrap()),
            redis_prefix: Some("env:".into()),
            ..Default::default()
        };
        let cli = RawConfig {
            listen: Some("127.0.0.1:3000".parse().unwrap()),
            ..Default::default()
        };
        let c = ServeConfig::resolve(file.overlay(env_layer).overlay(cli)).unwrap();
        assert_eq!(c.listen.port(), 3000);
        assert_eq!(c.redis_prefix, "env:");
        assert_eq!(c.session_idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn toml_unknown_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listne = \"127.0.0.1:1\"\n").unwrap();
        let err = RawConfig::from_toml_file(&p).unwrap_err().to_string();
        assert!(err.contains("listne"), "{err}");
    }
}
