//! The `bill24-gateway` binary: parses the command line, loads the config, starts logging and
//! runs the gateway (or one of the helper commands).

#![forbid(unsafe_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use bill24_gateway::caller_changes::CallerChanges;
use bill24_gateway::config::{self, Loaded};
use bill24_gateway::{Gateway, LogHandle, ReloadReport, Reloader, demo, hash_key, init_logging};
use bill24_sim::{self as sim, SimConfig, Simulator};

/// mimalloc: measured faster than the system allocator on the hit path (README, Performance).
/// Its v2 series: v3 serves many small allocations with an alignment on a slow over-allocating
/// path (hyper's read buffers among them).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A caching gateway in front of Bill24's wallet-balance API.
#[derive(Parser)]
#[command(name = "bill24-gateway", version, about)]
struct Cli {
    /// Config file (TOML). Default: $GATEWAY_CONFIG, else config/default.toml when present.
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,

    /// Load and validate the config, print it as TOML (secrets redacted) and exit.
    #[arg(long)]
    check_config: bool,

    /// With --check-config: also say what the config would change for the callers against
    /// the one this file makes (with the same environment), e.g. the file last applied.
    #[arg(long, value_name = "PATH", requires = "check_config")]
    against: Option<PathBuf>,

    /// Run against an embedded Bill24 simulator with a demo caller key.
    #[arg(long, conflicts_with = "check_config")]
    demo: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Read a caller key on stdin, print its hex SHA-256 for [[callers]] key_sha256.
    HashKey,
    /// Run the Bill24 simulator on its own (for load tests and local work).
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
struct SimulateArgs {
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: SocketAddr,
    /// Lifetime of the access tokens it issues.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
    /// Delay before each balance answer.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With HTTPS: require client certificates signed by this PEM CA.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// With HTTPS: offer only http/1.1 by ALPN (not h2).
    #[arg(long, requires = "tls_cert")]
    http1_only: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::HashKey) => print_key_hash(),
        Some(Command::Simulate(args)) => simulate(args),
        None if cli.check_config => check_config(cli.config, cli.against),
        None => serve(cli.config, cli.demo),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("bill24-gateway: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<PathBuf>) -> Result<Loaded, String> {
    config::load(path.as_deref()).map_err(|e| format!("config: {e}"))
}

fn check_config(path: Option<PathBuf>, against: Option<PathBuf>) -> Result<(), String> {
    let loaded = load(path)?;
    for warning in loaded.warnings.iter().chain(&loaded.config.warnings()) {
        eprintln!("warning: {warning}");
    }
    if let Some(against) = against {
        if !against.exists() {
            return Err(format!("--against: {} does not exist", against.display()));
        }
        let old = config::load(Some(&against)).map_err(|e| format!("--against: config: {e}"))?;
        eprintln!(
            "{}",
            changes_line(
                &against,
                &CallerChanges::between(&old.config.callers, &loaded.config.callers)
            )
        );
    }
    // The certificate, key, client CA and JWKS file as the gateway would take them at start.
    bill24_gateway::check_identity(&loaded.config)?;
    let text = config::to_redacted_toml(&loaded.raw).map_err(|e| format!("config: {e}"))?;
    print!("{text}");
    Ok(())
}

/// The callers' changes against `against`, in the fields of the reload's log line; a
/// `warning:` when a caller is removed or a limit loosened.
fn changes_line(against: &Path, changes: &CallerChanges) -> String {
    if changes.is_empty() {
        return format!("against {}: no change to the callers", against.display());
    }
    format!(
        "{}against {}: callers_added={:?} callers_removed={:?} callers_loosened={:?} \
         callers_changed={:?}",
        if changes.weakens() { "warning: " } else { "" },
        against.display(),
        changes.added,
        changes.removed,
        changes.loosened,
        changes.changed
    )
}

fn print_key_hash() -> Result<(), String> {
    const MAX_KEY_BYTES: u64 = 64 * 1024;
    let mut input = Vec::new();
    std::io::stdin()
        .take(MAX_KEY_BYTES + 1)
        .read_to_end(&mut input)
        .map_err(|e| format!("cannot read the key from stdin: {e}"))?;
    if input.len() as u64 > MAX_KEY_BYTES {
        return Err(format!("the key is longer than {MAX_KEY_BYTES} bytes"));
    }
    let text = String::from_utf8(input).map_err(|_| "the key is not UTF-8 text".to_string())?;
    let key = config::trim_one_newline(&text);
    if key.is_empty() {
        return Err("no key on stdin (try: echo my-key | bill24-gateway hash-key)".into());
    }
    // The gateway trims white space around the key a caller sends: a key that starts or ends
    // with some could never match its hash. Control characters cannot be sent in a header.
    if key.trim() != key || key.chars().any(char::is_control) {
        return Err(
            "the key starts or ends with white space or holds a control character: no caller \
             could ever send it as it is; remove them (one trailing newline is fine)"
                .into(),
        );
    }
    println!("{}", hex::encode(hash_key(key.as_bytes())));
    Ok(())
}

/// The runtime for `threads` (see [`bill24_gateway::runtime`]).
fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    bill24_gateway::runtime(threads).map_err(|e| format!("cannot start the runtime: {e}"))
}

fn serve(path: Option<PathBuf>, demo: bool) -> Result<(), String> {
    let loaded = load(path.clone())?;
    let log = init_logging(&loaded.config.log)?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    if !demo {
        // The demo brings its own credentials and caller.
        for warning in loaded.config.warnings() {
            tracing::warn!("{warning}");
        }
    }
    if let Some(file) = &loaded.file {
        tracing::info!(file = %file.display(), "config loaded");
    }
    let runtime = runtime(loaded.config.server.worker_threads)?;
    let served = runtime.block_on(async move {
        let shutdown = shutdown_signal()?;
        if demo {
            return demo::run(loaded.config, shutdown)
                .await
                .map_err(|e| e.to_string());
        }
        let threads = bill24_gateway::serving_threads(loaded.config.server.worker_threads);
        let gateway = Gateway::bind_threads(loaded.config, threads)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(reload_on_sighup(path, gateway.reloader(), log));
        gateway.run(shutdown).await.map_err(|e| e.to_string())
    });
    // Dropping the runtime would wait for every blocking task, a config read parked on a FIFO
    // included (it may never end): the gateway has shut down, so that one is left behind.
    runtime.shutdown_timeout(EXIT_WAIT_FOR_BLOCKING);
    served
}

/// How long the exit waits for blocking tasks still running after the shutdown.
const EXIT_WAIT_FOR_BLOCKING: Duration = Duration::from_millis(500);

/// The longest a reload may take to read its files.
const CONFIG_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// On each SIGHUP, re-reads the config (file and environment) and applies it; an invalid one
/// is rejected with a log line and the running config stays. Certificate and JWKS files are
/// read again after that, whatever the config holds, so new file names take effect at once.
async fn reload_on_sighup(path: Option<PathBuf>, reloader: Reloader, log: LogHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: config reload is unavailable");
            return;
        }
    };
    let mut pending = None;
    while hangups.recv().await.is_some() {
        let report = reload_config(path.as_deref(), &reloader, &mut pending).await;
        reloader.reread_files().await;
        let Some(report) = report else {
            continue;
        };
        for key in &report.needs_restart {
            tracing::warn!(key, "config changed; takes effect after a restart");
        }
        // Logged before a new level applies, so even a quieter level shows the reload; at
        // WARN when a caller was removed or a limit loosened (what a cut-off file does).
        let changes = &report.callers;
        macro_rules! reloaded {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    applied = ?report.applied,
                    needs_restart = ?report.needs_restart,
                    callers_added = ?changes.added,
                    callers_removed = ?changes.removed,
                    callers_loosened = ?changes.loosened,
                    callers_changed = ?changes.changed,
                    "config reloaded"
                )
            };
        }
        if changes.weakens() {
            reloaded!(tracing::Level::WARN);
        } else {
            reloaded!(tracing::Level::INFO);
        }
        if let Some(level) = &report.log_level
            && let Err(e) = log.set_level(level)
        {
            tracing::error!(error = %e, "log.level not applied");
        }
    }
}

/// A config read that outlived its bound: still blocked (a FIFO, a stuck mount) on a
/// blocking-pool thread, which cannot be cancelled.
type PendingRead = Option<tokio::task::JoinHandle<Result<Loaded, config::ConfigError>>>;

/// Loads the config and applies it: what changed, or `None` (logged) when it was rejected.
///
/// At most one read is in flight: while one that timed out is still blocked, a SIGHUP is
/// refused at once, and no second thread is parked on the same file. Once that read ends,
/// its result is dropped and the next SIGHUP reads afresh.
async fn reload_config(
    path: Option<&Path>,
    reloader: &Reloader,
    pending: &mut PendingRead,
) -> Option<ReloadReport> {
    if pending.as_ref().is_some_and(|read| !read.is_finished()) {
        tracing::error!(
            limit_ms = CONFIG_READ_LIMIT.as_millis() as u64,
            "config reload rejected: the previous read of the config file is still blocked; \
             the running config stays"
        );
        return None;
    }
    // Off the runtime's threads and within a bound: a config path that blocks on open (a
    // FIFO, a stuck mount) must not stop the gateway from serving.
    let read = pending.insert(tokio::task::spawn_blocking({
        let path = path.map(Path::to_path_buf);
        move || config::load(path.as_deref())
    }));
    let joined = tokio::time::timeout(CONFIG_READ_LIMIT, read).await;
    if joined.is_ok() {
        *pending = None;
    }
    let loaded = match joined {
        Ok(Ok(Ok(loaded))) => loaded,
        Ok(Ok(Err(e))) => {
            tracing::error!(error = %e, "config reload rejected; the running config stays");
            return None;
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "config reload failed; the running config stays");
            return None;
        }
        Err(_) => {
            tracing::error!(
                limit_ms = CONFIG_READ_LIMIT.as_millis() as u64,
                "config reload rejected: the file could not be read in time; the running \
                 config stays"
            );
            return None;
        }
    };
    for warning in loaded.warnings.iter().chain(&loaded.config.warnings()) {
        tracing::warn!("{warning}");
    }
    match reloader.apply(loaded.config, loaded.explicit) {
        Ok(report) => Some(report),
        Err(refused) => {
            tracing::error!(
                error = %refused,
                "config reload rejected; the running config stays"
            );
            None
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
        }
    })
}

fn simulate(args: SimulateArgs) -> Result<(), String> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let client_ca = match &args.tls_client_ca {
                Some(path) => Some(read("--tls-client-ca", path)?),
                None => None,
            };
            Some(
                sim::tls_config(
                    &read("--tls-cert", cert)?,
                    &read("--tls-key", key)?,
                    client_ca.as_deref(),
                    !args.http1_only,
                )
                .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?,
            )
        }
        _ => None,
    };
    runtime(0)?.block_on(async move {
        let simulator = Simulator::bind(
            args.listen,
            SimConfig {
                token_lifetime: args.token_lifetime,
                tls,
                ..SimConfig::default()
            },
        )
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        simulator.handle().set_latency(args.latency);
        println!(
            "Bill24 simulator on {}\n  merchant_token = \"{}\"\n  client_id = \"{}\"\n  \
             client_secret = \"{}\"\n  control: GET /_sim/stats, POST /_sim/control",
            simulator.base_url(),
            sim::DEMO_MERCHANT_TOKEN,
            sim::DEMO_CLIENT_ID,
            sim::DEMO_CLIENT_SECRET
        );
        let shutdown = shutdown_signal()?;
        shutdown.await;
        Ok(())
    })
}
