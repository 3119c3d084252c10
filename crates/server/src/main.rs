//! The `proxyfleet` binary: parse the command line, set up logging and signals, call the library.

mod cli;

use std::io::Read;

use anyhow::Context;
use clap::Parser;
use proxyfleet::config::{LogFormat, RawConfig, ServeConfig};
use proxyfleet::server::{self, ServeOptions};

use cli::{Cli, Command, ImportCommand, OperatorCommand};

fn main() -> std::process::ExitCode {
    proxyfleet_proto::net::tune_allocator();
    // `./.env` fills in variables that the real environment does not set. Only the working directory's: a file
    // in some parent directory must not configure a server started below it.
    if let Err(e) = dotenvy::from_path(".env") {
        if !e.not_found() {
            eprintln!("error: reading .env: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
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
            init_tracing(config.log_format, &config.log_level)?;
            let store_args = store_args(&args.common, &config);
            serve(config, &store_args).await
        }
        Command::Operator {
            command:
                OperatorCommand::Create {
                    common,
                    username,
                    password_stdin,
                    role,
                    rule,
                },
        } => {
            let flags = RawConfig {
                password_composition_rule: rule.password_composition_rule,
                ..RawConfig::default()
            };
            let config = cli::resolve(&common, flags)?;
            init_tracing(LogFormat::Text, "warn")?;
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
        Command::Import {
            command:
                ImportCommand::Connections {
                    common,
                    file,
                    operator,
                    skip_bad,
                },
        } => {
            let config = cli::resolve(&common, Default::default())?;
            init_tracing(LogFormat::Text, "warn")?;
            let store = server::open_store(&config).await?;
            let now = proxyfleet::clock::Clock::now_ms(&proxyfleet::clock::SystemClock);
            let report =
                proxyfleet::legacy::import_connections(&store, &operator, &file, skip_bad, now)
                    .await;
            store.close().await;
            match report {
                Ok(r) => {
                    for bad in &r.skipped {
                        eprintln!("skipped {bad}");
                    }
                    println!(
                        "imported {} connection(s); {} already present; {} bad row(s) skipped.",
                        r.counts.created,
                        r.counts.already_present,
                        r.skipped.len()
                    );
                    if r.counts.created > 0 {
                        println!("Run `proxyfleet migrate-passwords` (or start the server) to hash their passwords.");
                    }
                    Ok(())
                }
                Err(proxyfleet::legacy::ImportError::BadRows(rows)) => {
                    for bad in &rows {
                        eprintln!("{}: {bad}", file.display());
                    }
                    anyhow::bail!(
                        "{} bad row(s); nothing was imported (fix them, or pass --skip-bad to import the rest)",
                        rows.len()
                    )
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::MigratePasswords {
            common,
            dry_run,
            batch_size,
        } => {
            let config = cli::resolve(&common, Default::default())?;
            init_tracing(LogFormat::Text, "warn")?;
            let store = server::open_store(&config).await?;
            let report = migrate_with_progress(&store, batch_size, dry_run).await;
            store.close().await;
            let report = report?;
            let verb = if dry_run { "would migrate" } else { "migrated" };
            println!(
                "{verb} {}; already hashed {}; failed {}",
                report.migrated,
                report.already_hashed,
                report.failed.len()
            );
            for (user, why) in &report.failed {
                println!("  failed {user}: {why}");
            }
            if report.failed.is_empty() {
                Ok(())
            } else {
                anyhow::bail!(
                    "{} row(s) keep their plaintext password",
                    report.failed.len()
                )
            }
        }
        Command::Doctor { common } => {
            let config = cli::resolve(&common, Default::default())?;
            init_tracing(LogFormat::Text, "warn")?;
            let store = server::open_store(&config).await?;
            let counts = store.credential_counts().await;
            store.close().await;
            let (plain, hashed, neither) = counts?;
            println!("plaintext credentials: {plain}");
            println!("hashed credentials:    {hashed}");
            println!("rows without any credential: {neither}");
            if plain > 0 {
                anyhow::bail!(
                    "{plain} connection(s) still have a plaintext password: run `proxyfleet migrate-passwords`; \
                     a row it reports as failed (a password over 71 bytes) needs regenerate-password"
                );
            }
            Ok(())
        }
    }
}

/// The migration with a progress bar on standard error.
async fn migrate_with_progress(
    store: &proxyfleet::store::Store,
    batch: usize,
    dry_run: bool,
) -> anyhow::Result<proxyfleet::legacy::MigrationReport> {
    use std::io::Write;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hasher = proxyfleet::auth::password::Hasher::new(cores).await?;
    let started = std::time::Instant::now();
    let stop = tokio_util::sync::CancellationToken::new();
    let report = proxyfleet::legacy::migrate_passwords(
        store,
        &hasher,
        batch,
        dry_run,
        &stop,
        |done, total| {
            let total = u64::try_from(total).unwrap_or(0).max(1);
            let width = 30;
            let filled = usize::try_from(done.min(total) * width / total).unwrap_or(0);
            let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
            let eta = total.saturating_sub(done) as f64 / rate.max(0.001);
            eprint!(
                "\r[{}{}] {done}/{total} rows, {rate:.1} rows/s, about {eta:.0} s left ",
                "#".repeat(filled),
                " ".repeat(width as usize - filled)
            );
            let _ = std::io::stderr().flush();
        },
    )
    .await?;
    eprintln!();
    Ok(report)
}

/// The arguments that make `proxyfleet operator create` open the store this server opened. The database URL
/// itself is not printed (it may hold a password): the hint names the flag.
fn store_args(common: &cli::CommonArgs, config: &ServeConfig) -> String {
    let mut args = String::new();
    if let Some(path) = &common.config {
        args.push_str(&format!(" --config {}", path.display()));
    }
    args.push_str(&format!(" --data-dir {}", config.data_dir.display()));
    if common.database_url.is_some() {
        args.push_str(" --database-url <the server's database URL>");
    }
    args
}

async fn serve(config: ServeConfig, store_args: &str) -> anyhow::Result<()> {
    let public_url = config.public_url.clone();
    // Listening before the start: a SIGTERM that comes while the server starts stops it gracefully once it has
    // started, instead of killing it with whatever it had begun (the data-plane lock, a migration).
    let mut signals = Signals::new()?;
    let asked = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let asked = asked.clone();
        async move {
            signals.next().await;
            tracing::info!("shutting down (a second signal stops at once)");
            asked.cancel();
            // A start or a shutdown that hangs (an unreachable database) must not hold the process.
            signals.next().await;
            eprintln!("error: stopped at once by a second signal");
            std::process::exit(1);
        }
    });
    let running = server::start(config, ServeOptions::default()).await?;
    if let Some(token) = &running.setup_token {
        // Printed, never logged: whoever reads the console may create the first operator.
        println!(
            "\nNo operator exists yet. Create the first one (valid 24 hours, one use):\n  open {public_url}/setup#{}\n  \
             or run: proxyfleet operator create --username NAME --password-stdin{store_args}\n",
            token.expose(),
        );
        tracing::warn!("no operator exists; a one-time setup link was printed to standard output");
    }
    let cancel = running.cancel_token();
    tokio::spawn(async move {
        asked.cancelled().await;
        cancel.cancel();
    });
    running.wait().await
}

/// SIGTERM and SIGINT, caught from the moment this is made (a signal before the first wait is kept).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn init_tracing(format: LogFormat, level: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::builder()
            .parse(&v)
            .map_err(|e| anyhow::anyhow!("RUST_LOG: {e}"))?,
        _ => EnvFilter::new(level),
    };
    // Colours only for a person at a terminal, not in files or the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}
