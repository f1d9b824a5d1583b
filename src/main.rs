//! `dualwrite`: one binary, every service by subcommand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dualwrite_initial_sync::Copier;
use dualwrite_model::config::{Config, SideId, SideKind};
use dualwrite_runtime::kafka::{self, Shard, TopicSpec};
use dualwrite_side_postgres::{PgCopy, PgInspect, PgSource, PgTarget};

/// The services allocate many small, short-lived values per record (Avro
/// values, fields, keys); mimalloc serves them with less CPU than the
/// system allocator (BENCHMARKS.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "dualwrite",
    version,
    about = "Two-way sync of business records between two systems of record through Kafka"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(
        long,
        short,
        env = "DUALWRITE_CONFIG",
        default_value = "dualwrite.toml",
        global = true
    )]
    config: PathBuf,
    /// This instance's index among `--instances` of the router or an applier (e.g. a StatefulSet's pod index).
    #[arg(
        long,
        env = "DUALWRITE_INSTANCE_INDEX",
        default_value_t = 0,
        global = true
    )]
    instance_index: u32,
    /// How many instances of the router or of one side's applier share the partitions.
    #[arg(long, env = "DUALWRITE_INSTANCES", default_value_t = 1, global = true)]
    instances: u32,
    /// Serve /metrics, /healthz and /readyz on this address (e.g. 0.0.0.0:9464; port 0 picks one).
    #[arg(long, env = "DUALWRITE_METRICS_ADDR", global = true)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Log progress (INFO) to stderr for `ctl` and `setup` too, which
    /// otherwise log only warnings and errors (`RUST_LOG` overrides both).
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture committed changes of one side into Kafka.
    Capture {
        /// Side name (or `left` / `right`).
        #[arg(long)]
        side: String,
    },
    /// Map captured changes into each map's topic.
    Router,
    /// Gate each map between its topic and the appliers.
    PauseBuffer,
    /// Write mapped changes to one side.
    Apply {
        /// Side name (or `left` / `right`).
        #[arg(long)]
        side: String,
    },
    /// Run every service in this one process (capture and apply for both sides, router, pause buffer).
    Run {
        /// Also serve the operator console on this address (e.g. 127.0.0.1:8080).
        #[arg(long, env = "DUALWRITE_CONSOLE_ADDR")]
        console: Option<std::net::SocketAddr>,
        /// The console's operator token, from this file (else DUALWRITE_CONSOLE_TOKEN).
        #[arg(long, env = "DUALWRITE_CONSOLE_TOKEN_FILE")]
        console_token_file: Option<PathBuf>,
    },
    /// Serve the operator console (commands need the operator token).
    Console {
        /// Address to serve on (port 0 picks one).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The operator token, from this file (else DUALWRITE_CONSOLE_TOKEN).
        #[arg(long, env = "DUALWRITE_CONSOLE_TOKEN_FILE")]
        token_file: Option<PathBuf>,
    },
    /// Create the topics and check the configuration, then exit.
    Setup,
    /// Operator commands.
    Ctl {
        #[command(subcommand)]
        command: dualwrite_ctl::cli::CtlCommand,
    },
}

/// Environment variables read by the binary besides its options'
/// (`option_env_vars`), the configuration's overrides and secrets.
const ENV_VARS: &[(&str, &str)] = &[
    (
        dualwrite_console::TOKEN_ENV,
        "the console's operator token (without it the console is read-only)",
    ),
    ("DUALWRITE_LOG_FORMAT", "json for JSON logs"),
    ("RUST_LOG", "log filter"),
];

/// Environment variables of the command line's options, from clap's own definition.
fn option_env_vars() -> Vec<(String, String)> {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, out: &mut Vec<(String, String)>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                let name = env.to_string_lossy().into_owned();
                if !out.iter().any(|(n, _)| n == &name) {
                    out.push((name, format!("--{}", arg.get_long().unwrap_or_default())));
                }
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    walk(&Cli::command(), &mut out);
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Ctl { .. } | Command::Setup) && !cli.verbose;
    dualwrite_runtime::telemetry::init_logging(if quiet { "warn" } else { "info" });
    let config = match Config::load(&cli.config) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = kafka::check_properties(&config.kafka) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shard = match Shard::new(cli.instance_index, cli.instances) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: --instance-index/--instances: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli.command, config, cli.metrics_addr, shard)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn side(config: &Config, s: &str) -> anyhow::Result<SideId> {
    match s {
        "left" => Ok(SideId::Left),
        "right" => Ok(SideId::Right),
        name => config.side_id(name).with_context(|| {
            format!(
                "no side named `{name}`: use `{}`, `{}`, `left` or `right`",
                config.sides.left.name, config.sides.right.name
            )
        }),
    }
}

async fn run(
    command: Command,
    config: Arc<Config>,
    metrics_addr: Option<std::net::SocketAddr>,
    shard: Shard,
) -> anyhow::Result<()> {
    let shutdown = dualwrite_runtime::shutdown::on_signals();
    if let (Some(addr), false) = (
        metrics_addr,
        matches!(command, Command::Ctl { .. } | Command::Setup),
    ) {
        dualwrite_runtime::health::serve(addr, shutdown.clone())
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    match command {
        Command::Capture { side: s } => {
            let s = side(&config, &s)?;
            capture(config, s, shutdown).await?;
        }
        Command::Router => dualwrite_router::run(config, shard, shutdown).await?,
        Command::PauseBuffer => pause_buffer(config, shutdown).await?,
        Command::Apply { side: s } => {
            let s = side(&config, &s)?;
            apply(config, s, shard, shutdown).await?;
        }
        Command::Run {
            console: addr,
            console_token_file: file,
        } => {
            if let Some(addr) = addr {
                console(&config, addr, file, &shutdown).await?;
            }
            run_all(config, shutdown).await?
        }
        Command::Console { listen, token_file } => {
            console(&config, listen, token_file, &shutdown).await?;
            shutdown.cancelled().await;
        }
        Command::Setup => {
            kafka::ensure_topics(&config.kafka, &all_topics(&config)).await?;
            println!("topics ready:");
            dualwrite_ctl::describe_topics(&config, &mut std::io::stdout())?;
        }
        Command::Ctl { command } => {
            let env_vars = dualwrite_ctl::cli::CliEnv {
                options: option_env_vars(),
                others: ENV_VARS,
            };
            let control = dualwrite_control::control_topics(&config);
            match kinds(&config) {
                (SideKind::Postgres, SideKind::Postgres) => {
                    dualwrite_ctl::cli::run::<PgCopy, PgInspect>(
                        config, command, &env_vars, &control,
                    )
                    .await?
                }
            }
        }
    }
    Ok(())
}

/// Starts the operator console on `listen`; the operator token from
/// `token_file`, else from the environment.
async fn console(
    config: &Arc<Config>,
    listen: std::net::SocketAddr,
    token_file: Option<PathBuf>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let token = match token_file {
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the console token file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var(dualwrite_console::TOKEN_ENV).ok(),
    };
    let sd = shutdown.clone();
    let bound = match kinds(config) {
        (SideKind::Postgres, SideKind::Postgres) => {
            dualwrite_console::serve::<PgCopy, PgInspect>(config.clone(), listen, token, sd).await
        }
    }
    .with_context(|| format!("cannot serve the console on {listen}"))?;
    eprintln!("console: http://{bound}/");
    Ok(())
}

/// The capturer of `side`, reading the source of its kind of database.
async fn capture(
    config: Arc<Config>,
    side: SideId,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match config.side(side).kind {
        SideKind::Postgres => dualwrite_capture::run::<PgSource>(config, side, shutdown).await?,
    }
    Ok(())
}

/// The applier of `side`, writing to the target of its kind of database.
async fn apply(
    config: Arc<Config>,
    side: SideId,
    shard: Shard,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match config.side(side).kind {
        SideKind::Postgres => {
            dualwrite_apply::run::<PgTarget>(config, side, shard, shutdown).await?
        }
    }
    Ok(())
}

/// The kinds of database of the left and right sides. The services that
/// read both sides (the pause buffer's initial write and drift check,
/// `ctl`) take one implementation for the pair: a pair of two kinds needs
/// one that serves both (an enum over the kinds' own).
fn kinds(config: &Config) -> (SideKind, SideKind) {
    (config.sides.left.kind, config.sides.right.kind)
}

/// The pause buffer, copying and comparing the sides' kinds of database.
async fn pause_buffer(
    config: Arc<Config>,
    shutdown: CancellationToken,
) -> Result<(), dualwrite_control::ControlError> {
    match kinds(&config) {
        (SideKind::Postgres, SideKind::Postgres) => {
            let copier = Copier::of::<PgCopy>();
            dualwrite_control::run::<PgInspect>(config, copier, shutdown).await
        }
    }
}

fn all_topics(config: &Config) -> Vec<TopicSpec> {
    let mut v = dualwrite_router::topics(config);
    v.extend(dualwrite_control::topics(config));
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v.dedup_by(|a, b| a.name == b.name);
    v
}

/// Every service as a task of this process. If one fails, all stop.
async fn run_all(config: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    kafka::ensure_topics(&config.kafka, &all_topics(&config)).await?;
    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    for s in [SideId::Left, SideId::Right] {
        let (c, t) = (config.clone(), shutdown.clone());
        tasks.spawn(async move { ("capture", capture(c, s, t).await) });
        let (c, t) = (config.clone(), shutdown.clone());
        tasks.spawn(async move { ("apply", apply(c, s, Shard::ALL, t).await) });
    }
    let (c, t) = (config.clone(), shutdown.clone());
    tasks.spawn(async move {
        (
            "router",
            dualwrite_router::run(c, Shard::ALL, t)
                .await
                .map_err(Into::into),
        )
    });
    let (c, t) = (config.clone(), shutdown.clone());
    tasks.spawn(async move { ("pause-buffer", pause_buffer(c, t).await.map_err(Into::into)) });
    tracing::info!("all services running");

    let mut first_error = None;
    // Wait for shutdown or the first service to stop.
    tokio::select! {
        _ = shutdown.cancelled() => {},
        Some(res) = tasks.join_next() => {
            first_error = Some(describe_exit(res));
            shutdown.cancel();
        }
    }
    // Drain within a deadline, then abort what is left.
    let drain = async {
        while let Some(res) = tasks.join_next().await {
            let e = describe_exit(res);
            if first_error.is_none() {
                first_error = Some(e);
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(15), drain)
        .await
        .is_err()
    {
        tracing::warn!("services did not stop within 15 s; aborting them");
        tasks.abort_all();
    }
    match first_error {
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

fn describe_exit(
    res: Result<(&'static str, anyhow::Result<()>), tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match res {
        Ok((name, Ok(()))) => {
            tracing::info!("{name} stopped");
            Ok(())
        }
        Ok((name, Err(e))) => Err(e.context(format!("{name} failed"))),
        Err(e) => Err(anyhow::anyhow!("a service panicked: {e}")),
    }
}
