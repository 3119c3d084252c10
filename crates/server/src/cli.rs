//! Command-line flags. Every flag has a `PROXYFLEET_*` environment twin; the flag wins.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use proxyfleet::config::{LogFormat, RawConfig, Secret, ServeConfig};
use proxyfleet::store::Role;

#[derive(Parser)]
#[command(
    name = "proxyfleet",
    version,
    about = "Self-hosted mobile-proxy platform"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the server: API, dashboard, device tunnel, proxy doors (HTTP, SOCKS5) and the OpenVPN door.
    Serve(Box<ServeArgs>),
    /// Manage operator accounts from the command line.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Import data from other platforms.
    Import {
        #[command(subcommand)]
        command: ImportCommand,
    },
    /// Replace every plaintext proxy password with its bcrypt hash (also runs at server start).
    MigratePasswords {
        #[command(flatten)]
        common: CommonArgs,
        /// Report what would be done; change nothing.
        #[arg(long, env = "PROXYFLEET_MIGRATE_DRY_RUN")]
        dry_run: bool,
        /// Rows hashed per transaction.
        #[arg(long, env = "PROXYFLEET_MIGRATE_BATCH_SIZE", default_value_t = proxyfleet::legacy::DEFAULT_BATCH)]
        batch_size: usize,
    },
    /// Check the installation: plaintext credentials left, rows without any credential. Exits 1 on a problem.
    Doctor {
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Subcommand)]
pub enum ImportCommand {
    /// Import proxy connections from a CSV or JSON export, keeping each customer's username and password. Columns
    /// (or JSON keys): name, device (id or name), username, password, bandwidth_limit_bytes, used_bytes, enabled.
    Connections {
        #[command(flatten)]
        common: CommonArgs,
        /// The export: `.csv` with a header row, or `.json` (an array of objects).
        file: PathBuf,
        /// The operator who receives the connections.
        #[arg(long, env = "PROXYFLEET_IMPORT_OPERATOR")]
        operator: String,
        /// Import the good rows and report the bad ones (default: any bad row imports nothing).
        #[arg(long, env = "PROXYFLEET_IMPORT_SKIP_BAD")]
        skip_bad: bool,
    },
}

#[derive(Subcommand)]
pub enum OperatorCommand {
    /// Create an operator. The first operator is always an admin.
    Create {
        #[command(flatten)]
        common: CommonArgs,
        /// 3–64 letters, digits or underscores.
        #[arg(long, env = "PROXYFLEET_USERNAME")]
        username: String,
        /// Read the password from standard input (required: passwords are never taken as arguments).
        #[arg(long, env = "PROXYFLEET_PASSWORD_STDIN")]
        password_stdin: bool,
        /// Role of a non-first operator.
        #[arg(long, env = "PROXYFLEET_ROLE", value_parser = parse_role, default_value = "operator")]
        role: Role,
        /// The password is checked as `serve` checks passwords set through the API and dashboard.
        #[command(flatten)]
        rule: PasswordRuleArgs,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "admin" => Ok(Role::Admin),
        "operator" => Ok(Role::Operator),
        _ => Err(format!("unknown role {s:?} (use admin or operator)")),
    }
}

/// The operator password rule, shared by `serve` and `operator create` so both read it from the same flag and
/// environment variable.
#[derive(Args)]
pub struct PasswordRuleArgs {
    /// Require upper, lower, digit and special characters in operator passwords. Default true.
    #[arg(long, env = "PROXYFLEET_PASSWORD_COMPOSITION_RULE", num_args = 0..=1, default_missing_value = "true")]
    pub password_composition_rule: Option<bool>,
}

/// Settings every command that opens the store needs.
#[derive(Args)]
pub struct CommonArgs {
    /// TOML configuration file (lowest precedence after built-in defaults).
    #[arg(long, env = "PROXYFLEET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory: SQLite file, generated secrets. Default `./data`.
    #[arg(long, env = "PROXYFLEET_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL (sqlite://…, postgres://…, mysql://…). Also read from `DATABASE_URL`.
    #[arg(long, env = "PROXYFLEET_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address for the API and dashboard. Default 127.0.0.1:8080.
    #[arg(long, env = "PROXYFLEET_LISTEN", value_name = "IP:PORT")]
    pub listen: Option<SocketAddr>,
    /// Redis address (host:port or redis:// URL). Also read from `REDIS_ADDR`. Unset: no Redis.
    #[arg(long, env = "PROXYFLEET_REDIS_ADDR", hide_env_values = true)]
    pub redis_addr: Option<String>,
    /// Prefix of every Redis key. Default `proxyfleet:`.
    #[arg(long, env = "PROXYFLEET_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Maximum database connections. Default 10.
    #[arg(long, env = "PROXYFLEET_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<u32>,
    /// Seconds of inactivity after which a session ends. Default 3600.
    #[arg(long, env = "PROXYFLEET_SESSION_IDLE_TIMEOUT_SECS")]
    pub session_idle_timeout_secs: Option<u64>,
    #[command(flatten)]
    pub rule: PasswordRuleArgs,
    /// Comma-separated CIDRs of reverse proxies whose X-Forwarded-For is believed. Default none.
    #[arg(long, env = "PROXYFLEET_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<IpNet>>,
    /// Base URL used in printed links. Default http://LISTEN.
    #[arg(long, env = "PROXYFLEET_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Log format: text or json. Default text.
    #[arg(long, env = "PROXYFLEET_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log level or filter (RUST_LOG syntax; RUST_LOG itself wins). Default info.
    #[arg(long, env = "PROXYFLEET_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// UDP address for device tunnels (QUIC). Unset: no device can connect.
    #[arg(long, env = "PROXYFLEET_TUNNEL_LISTEN", value_name = "IP:PORT")]
    pub tunnel_listen: Option<SocketAddr>,
    /// Serve QUIC on the tunnel port (UDP). Default true; the TLS-over-TCP fallback on the same port number is
    /// always served.
    #[arg(long, env = "PROXYFLEET_TUNNEL_QUIC", num_args = 0..=1, default_missing_value = "true")]
    pub tunnel_quic: Option<bool>,
    /// Heartbeat interval told to agents, seconds. Default 30.
    #[arg(long, env = "PROXYFLEET_TUNNEL_HEARTBEAT_SECS")]
    pub tunnel_heartbeat_secs: Option<u64>,
    /// Lifetime of a device pairing code, seconds. Default 900.
    #[arg(long, env = "PROXYFLEET_PAIRING_TTL_SECS")]
    pub pairing_ttl_secs: Option<u64>,
    /// Address of the shared HTTP proxy port (for example 0.0.0.0:3128). Unset: no HTTP proxy door.
    #[arg(long, env = "PROXYFLEET_HTTP_PROXY_LISTEN", value_name = "IP:PORT")]
    pub http_proxy_listen: Option<SocketAddr>,
    /// Address of the shared SOCKS5 port (for example 0.0.0.0:1080). Unset: no SOCKS5 door.
    #[arg(long, env = "PROXYFLEET_SOCKS5_LISTEN", value_name = "IP:PORT")]
    pub socks5_listen: Option<SocketAddr>,
    /// Ports operators may give connections as their own, START-END (for example 20000-20999). Unset: none.
    #[arg(long, env = "PROXYFLEET_PROXY_DEDICATED_PORTS")]
    pub proxy_dedicated_ports: Option<String>,
    /// Address the dedicated ports listen on. Default 0.0.0.0.
    #[arg(long, env = "PROXYFLEET_PROXY_DEDICATED_IP")]
    pub proxy_dedicated_ip: Option<std::net::IpAddr>,
    /// Host name customers put in their proxy settings. Default: the host of the public URL.
    #[arg(long, env = "PROXYFLEET_PROXY_PUBLIC_HOST")]
    pub proxy_public_host: Option<String>,
    /// Seconds a proxy client has to finish its handshake. Default 10.
    #[arg(long, env = "PROXYFLEET_PROXY_HANDSHAKE_TIMEOUT_SECS")]
    pub proxy_handshake_timeout_secs: Option<u64>,
    /// Seconds a flow one side has closed may stay silent on the other before it ends. Default 60.
    #[arg(long, env = "PROXYFLEET_PROXY_HALF_CLOSED_TIMEOUT_SECS")]
    pub proxy_half_closed_timeout_secs: Option<u64>,
    /// Seconds an HTTP proxy client's kept-alive connection may wait for its next request. Default 60.
    #[arg(long, env = "PROXYFLEET_PROXY_KEEP_ALIVE_TIMEOUT_SECS")]
    pub proxy_keep_alive_timeout_secs: Option<u64>,
    /// Most flows one connection may have open at once. Default 1024.
    #[arg(long, env = "PROXYFLEET_PROXY_MAX_FLOWS_PER_CONNECTION")]
    pub proxy_max_flows_per_connection: Option<u64>,
    /// Seconds without a heartbeat after which a device is offline (and the grace after startup). Default 120.
    #[arg(long, env = "PROXYFLEET_OFFLINE_AFTER_SECS")]
    pub offline_after_secs: Option<u64>,
    /// Seconds after an offline alert during which no other is sent for that device. Default 300.
    #[arg(long, env = "PROXYFLEET_ALERT_COOLDOWN_SECS")]
    pub alert_cooldown_secs: Option<u64>,
    /// Seconds between offline-detection scans. Default 5.
    #[arg(long, env = "PROXYFLEET_MONITOR_SCAN_SECS")]
    pub monitor_scan_secs: Option<u64>,
    /// Allow webhooks to private and loopback addresses (labs, tests). Default false.
    #[arg(long, env = "PROXYFLEET_WEBHOOK_ALLOW_PRIVATE", num_args = 0..=1, default_missing_value = "true")]
    pub webhook_allow_private: Option<bool>,
    /// Seconds between writes of usage counters to the store. Default 5.
    #[arg(long, env = "PROXYFLEET_USAGE_FLUSH_SECS")]
    pub usage_flush_secs: Option<u64>,
    /// Seconds to wait for open requests at shutdown. Default 10.
    #[arg(long, env = "PROXYFLEET_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Address of the OpenVPN door (for example 0.0.0.0:1194). Unset: no OpenVPN door. Needs root
    /// (CAP_NET_ADMIN) and the `openvpn` and `nft` programs.
    #[arg(long, env = "PROXYFLEET_OPENVPN_LISTEN", value_name = "IP:PORT")]
    pub openvpn_listen: Option<SocketAddr>,
    /// OpenVPN transport: udp or tcp. Default udp.
    #[arg(long, env = "PROXYFLEET_OPENVPN_PROTO")]
    pub openvpn_proto: Option<String>,
    /// Customers' VPN addresses. Default 10.77.0.0/16 (server .1, DNS .2, customers from .16).
    #[arg(long, env = "PROXYFLEET_OPENVPN_SUBNET")]
    pub openvpn_subnet: Option<ipnet::Ipv4Net>,
    /// DNS address pushed to VPN customers; answered by the device's resolver. Default: the subnet's .2.
    #[arg(long, env = "PROXYFLEET_OPENVPN_DNS")]
    pub openvpn_dns: Option<std::net::Ipv4Addr>,
    /// The openvpn program. Default `openvpn` (from PATH).
    #[arg(long, env = "PROXYFLEET_OPENVPN_BINARY")]
    pub openvpn_binary: Option<std::path::PathBuf>,
    /// Ping interval pushed to VPN clients, seconds (a silent peer is dropped after three). Default 10.
    #[arg(long, env = "PROXYFLEET_OPENVPN_KEEPALIVE_SECS")]
    pub openvpn_keepalive_secs: Option<u64>,
}

impl ServeArgs {
    pub fn to_raw(&self) -> RawConfig {
        RawConfig {
            listen: self.listen,
            redis_addr: self.redis_addr.clone().map(Secret::new),
            redis_prefix: self.redis_prefix.clone(),
            db_max_connections: self.db_max_connections,
            session_idle_timeout_secs: self.session_idle_timeout_secs,
            password_composition_rule: self.rule.password_composition_rule,
            trusted_proxies: self.trusted_proxies.clone(),
            public_url: self.public_url.clone(),
            log_format: self.log_format,
            log_level: self.log_level.clone(),
            shutdown_timeout_secs: self.shutdown_timeout_secs,
            tunnel_listen: self.tunnel_listen,
            tunnel_quic: self.tunnel_quic,
            tunnel_heartbeat_secs: self.tunnel_heartbeat_secs,
            pairing_ttl_secs: self.pairing_ttl_secs,
            http_proxy_listen: self.http_proxy_listen,
            socks5_listen: self.socks5_listen,
            proxy_dedicated_ports: self.proxy_dedicated_ports.clone(),
            proxy_dedicated_ip: self.proxy_dedicated_ip,
            proxy_public_host: self.proxy_public_host.clone(),
            usage_flush_secs: self.usage_flush_secs,
            proxy_handshake_timeout_secs: self.proxy_handshake_timeout_secs,
            proxy_half_closed_timeout_secs: self.proxy_half_closed_timeout_secs,
            proxy_keep_alive_timeout_secs: self.proxy_keep_alive_timeout_secs,
            proxy_max_flows_per_connection: self.proxy_max_flows_per_connection,
            offline_after_secs: self.offline_after_secs,
            alert_cooldown_secs: self.alert_cooldown_secs,
            monitor_scan_secs: self.monitor_scan_secs,
            webhook_allow_private: self.webhook_allow_private,
            openvpn_listen: self.openvpn_listen,
            openvpn_proto: self.openvpn_proto.clone(),
            openvpn_subnet: self.openvpn_subnet,
            openvpn_dns: self.openvpn_dns,
            openvpn_binary: self.openvpn_binary.clone(),
            openvpn_keepalive_secs: self.openvpn_keepalive_secs,
            ..RawConfig::default()
        }
    }
}

/// defaults < TOML file < seed environment names < `PROXYFLEET_*` environment and flags.
pub fn resolve(common: &CommonArgs, flags: RawConfig) -> anyhow::Result<ServeConfig> {
    let file = match &common.config {
        Some(path) => RawConfig::from_toml_file(path)?,
        None => RawConfig::default(),
    };
    let seed = RawConfig::from_seed_env(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))?;
    let proxyfleet_env = RawConfig::from_seed_env(|k| {
        std::env::var(format!("PROXYFLEET_{k}"))
            .ok()
            .filter(|v| !v.is_empty())
    })?;
    let flags = RawConfig {
        data_dir: common.data_dir.clone(),
        database_url: common.database_url.clone().map(Secret::new),
        ..flags
    };
    Ok(ServeConfig::resolve(
        file.overlay(seed).overlay(proxyfleet_env).overlay(flags),
    )?)
}
