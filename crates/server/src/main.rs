//! The `proxyfleet` binary: parse the command line, set up logging and signals, call the library.

mod cli;

use std::io::Read;

use anyhow::Context;
use clap::Parser;
use proxyfleet::config::{LogFormat, ServeConfig};
use proxyfleet::server::{self, ServeOptions};

use cli::{Cli, Command, OperatorCommand};

fn main() -> std::process::ExitCode {
    // `.env` fills in variables that the real environment does not set.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = cli::resolve(&args.common, args.to_raw())?;
            init_tracing(config.log_format, &config.log_level);
            serve(config).await
        }
        Command::Operator {
            command:
                OperatorCommand::Create {
                    common,
                    username,
                    password_stdin,
                    role,
                },
        } => {
            let config = cli::resolve(&common, Default::default())?;
            init_tracing(LogFormat::Text, "warn");
            if !password_stdin {
                anyhow::bail!("pass --password-stdin and write the password to standard input (it is never taken as an argument)");
            }
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from standard input")?;
            let password = password.strip_suffix('\n').unwrap_or(&password);
            let password = password.strip_suffix('\r').unwrap_or(password);
            let op = server::create_operator(&config, &username, password, role).await?;
            println!(
                "created operator {} ({}), id {}",
                op.username,
                op.role.as_str(),
                op.id
            );
            Ok(())
        }
    }
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let public_url = config.public_url.clone();
    let data_dir = config.data_dir.clone();
    let running = server::start(config, ServeOptions::default()).await?;
    if let Some(token) = &running.setup_token {
        // Printed, never logged: whoever reads the console may create the first operator.
        println!(
            "\nNo operator exists yet. Create the first one (valid 24 hours, one use):\n  open {public_url}/setup#{}\n  \
             or run: proxyfleet operator create --username NAME --password-stdin --data-dir {}\n",
            token.expose(),
            data_dir.display()
        );
        tracing::warn!("no operator exists; a one-time setup link was printed to standard output");
    }
    let cancel = running.cancel_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        cancel.cancel();
    });
    running.wait().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_tracing(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
