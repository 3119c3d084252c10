//! `proxyfleet-agent`: parse the command line, set up logging and signals, call the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use proxyfleet_agent::RunOptions;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "proxyfleet-agent", version, about = "proxyfleet device agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this device with a pairing code from the dashboard.
    Enroll {
        /// The server's tunnel address, HOST:PORT.
        #[arg(long, env = "PROXYFLEET_AGENT_SERVER")]
        server: String,
        /// The pairing code.
        #[arg(long, env = "PROXYFLEET_AGENT_CODE", hide_env_values = true)]
        code: String,
        /// Where the device's key and certificate are kept.
        #[arg(long, env = "PROXYFLEET_AGENT_STATE_DIR")]
        state_dir: PathBuf,
    },
    /// Keep the tunnel to the server until stopped.
    Run {
        /// Where `enroll` put the device's key and certificate.
        #[arg(long, env = "PROXYFLEET_AGENT_STATE_DIR")]
        state_dir: PathBuf,
        /// Where battery information lives.
        #[arg(
            long,
            env = "PROXYFLEET_AGENT_POWER_SUPPLY_DIR",
            default_value = "/sys/class/power_supply"
        )]
        power_supply_dir: PathBuf,
        /// Shell command that rotates this device's public IP when the operator asks (for example
        /// `mmcli -m any --simple-disconnect && mmcli -m any --simple-connect=apn=internet`).
        #[arg(long, env = "PROXYFLEET_AGENT_ROTATE_COMMAND")]
        rotate_command: Option<String>,
        /// Let customers reach loopback, private and link-local addresses from this device, its own LAN
        /// included. Off by default: only public addresses are dialled.
        #[arg(
            long,
            env = "PROXYFLEET_AGENT_ALLOW_PRIVATE_TARGETS",
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        allow_private_targets: bool,
        /// Resolver (IP or IP:PORT) for VPN customers' DNS lookups. Default: the device's own, from resolv.conf.
        #[arg(long, env = "PROXYFLEET_AGENT_DNS_SERVER", value_parser = parse_dns_server)]
        dns_server: Option<std::net::SocketAddr>,
    },
}

fn parse_dns_server(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse::<std::net::SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
        .map_err(|_| format!("{s:?} is not an IP address or IP:PORT"))
}

fn main() -> std::process::ExitCode {
    proxyfleet_proto::net::tune_allocator();
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    // Flows are copied on all cores (a busy proxy device carries hundreds at once), up to four threads.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Enroll {
                server,
                code,
                state_dir,
            } => {
                let id = proxyfleet_agent::enroll(&server, &code, &state_dir).await?;
                println!(
                    "enrolled as device {id}; start it with: proxyfleet-agent run --state-dir {}",
                    state_dir.display()
                );
                Ok(())
            }
            Command::Run {
                state_dir,
                power_supply_dir,
                rotate_command,
                allow_private_targets,
                dns_server,
            } => {
                let cancel = CancellationToken::new();
                let c = cancel.clone();
                tokio::spawn(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    if let (Ok(mut t), Ok(mut i)) = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                    ) {
                        tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                    }
                    c.cancel();
                });
                // SIGHUP: the network changed; move the tunnel to a fresh socket (QUIC migrates it).
                let rebind = std::sync::Arc::new(tokio::sync::Notify::new());
                let r = rebind.clone();
                tokio::spawn(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    if let Ok(mut hup) = signal(SignalKind::hangup()) {
                        while hup.recv().await.is_some() {
                            r.notify_one();
                        }
                    }
                });
                proxyfleet_agent::run(
                    &state_dir,
                    RunOptions {
                        power_supply_dir,
                        rebind: Some(rebind),
                        rotate_command,
                        allow_private_targets,
                        dns_server,
                        ..RunOptions::default()
                    },
                    cancel,
                )
                .await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<proxyfleet_agent::run::Refused>().is_some() {
                std::process::ExitCode::from(3)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}
