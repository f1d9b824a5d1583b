//! `dualwrite`: one binary, every service by subcommand.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dualwrite_ctl::CommandResult;
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::lifecycle::{Action, ControlCommand, MapStatus};
use dualwrite_runtime::kafka::{self, Shard, TopicSpec};

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
    Run,
    /// Create the topics and check the configuration, then exit.
    Setup,
    /// Operator commands.
    Ctl {
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Check the configuration and list the maps.
    Validate,
    /// List the topics and what flows on them.
    Topics,
    /// List the maps with state, generation and backlog.
    Maps {
        #[arg(long)]
        json: bool,
    },
    /// Run a map (from Not running or Failed), or resume it (from Paused).
    Run {
        map: String,
        /// Also run the maps it depends on, dependencies first.
        #[arg(long)]
        include_related: bool,
        /// Copy pre-existing rows first (default: the map's configuration).
        #[arg(long)]
        initial_sync: Option<bool>,
        /// Side whose values win conflicts.
        #[arg(long)]
        conflict_master: Option<String>,
        /// Order of the related maps, comma separated; must respect dependencies.
        #[arg(long, value_delimiter = ',')]
        order: Option<Vec<String>>,
        /// On resume: catch_up (default), skip_to_live or discard.
        #[arg(long)]
        resume_policy: Option<String>,
        #[command(flatten)]
        send: SendArgs,
    },
    /// Pause a running map: its changes queue until it is run again.
    Pause {
        map: String,
        /// Also pause the maps it depends on.
        #[arg(long)]
        include_related: bool,
        #[command(flatten)]
        send: SendArgs,
    },
    /// Stop a running map: it writes nothing until it is run again.
    Stop {
        map: String,
        #[command(flatten)]
        send: SendArgs,
    },
    /// End an initialization (or a failed one) without copying: live sync
    /// of every change since the run.
    SkipInitialSync {
        map: String,
        /// Also the maps it depends on that are initializing.
        #[arg(long)]
        include_related: bool,
        #[command(flatten)]
        send: SendArgs,
    },
    /// Copy pre-existing rows again (e.g. after fixing the rows that failed):
    /// only missing and differing records are written.
    RerunInitialSync {
        map: String,
        /// Also the maps it depends on, dependencies first.
        #[arg(long)]
        include_related: bool,
        /// Side whose values win for records on both sides.
        #[arg(long)]
        conflict_master: Option<String>,
        #[command(flatten)]
        send: SendArgs,
    },
    /// Show a map's initial sync: progress, counts and every failed row.
    InitialSync {
        map: String,
        /// Run id (default: the latest).
        #[arg(long)]
        run: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Send changes that a skip-to-live resume set aside back through the map
    /// (all, or the given keys); changes overtaken by later ones are skipped.
    RetryCatchup {
        map: String,
        /// A record key as shown by `ctl tail catchup-errors` (JSON array), repeatable.
        #[arg(long = "key")]
        keys: Vec<String>,
    },
    /// Send the records behind error records back to where they were read,
    /// once the cause is fixed (all, or filtered).
    RetryErrors {
        #[arg(long)]
        map: Option<String>,
        /// Error class, e.g. rejected_by_target.
        #[arg(long)]
        class: Option<String>,
        /// Position on the errors topic, `partition:offset` (as `ctl tail errors` shows), repeatable.
        #[arg(long = "at")]
        at: Vec<String>,
    },
    /// List every environment variable this binary reads, with this configuration's secrets.
    EnvVars,
    /// Compare both sides of maps (all, or those named), after mapping: missing
    /// and differing records. Exit code 1 when they differ.
    Verify {
        maps: Vec<String>,
        #[arg(long)]
        json: bool,
        /// Also compare the fields that sync one way.
        #[arg(long)]
        one_way: bool,
        /// Most example keys printed per kind of difference.
        #[arg(long, default_value_t = 10)]
        examples: usize,
    },
    /// Re-assert the conflict master's values of records that differ between
    /// the sides (those given, or every one a full comparison finds), through
    /// the pipeline: written only where the other side still has what was
    /// read, so a newer change is never overwritten. Waits for the sides to
    /// agree; exit code 1 when some still differ.
    Repair {
        map: String,
        /// A record's key as `ctl verify` prints it (a JSON array), repeatable.
        #[arg(long = "key")]
        keys: Vec<String>,
        /// How long to wait for the repaired records to agree.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Check maps (all, or those named) against both databases' tables:
    /// missing tables and columns, types that cannot be converted, alternate
    /// keys without a unique index. Exit code 1 when there are problems.
    CheckSchema { maps: Vec<String> },
    /// Print acknowledgements and state changes as they happen.
    Watch {
        /// Stop when nothing happens for this many seconds (0: never).
        #[arg(long, default_value_t = 0)]
        idle_secs: u64,
    },
    /// Print a topic's records as JSON lines: errors, capture:<side>, map:<map>, apply:<side>,
    /// catchup-errors, initial-sync-errors, status, events, control.
    Tail {
        topic: String,
        /// Stop after this many records.
        #[arg(long, default_value_t = 100)]
        max: usize,
        /// After the records the topic held at the start, stop when nothing
        /// new arrives for this many seconds.
        #[arg(long, default_value_t = 3)]
        idle_secs: u64,
    },
}

/// The maps named (all when none), in that order; an unknown name is an error.
fn selected_maps<'a>(
    config: &'a Config,
    names: &[String],
) -> anyhow::Result<Vec<&'a dualwrite_model::config::MapConfig>> {
    if names.is_empty() {
        return Ok(config.maps.iter().collect());
    }
    names
        .iter()
        .map(|n| config.map(n).with_context(|| format!("unknown map `{n}`")))
        .collect()
}

/// Environment variables read by the binary besides its options'
/// (`option_env_vars`), the configuration's overrides and secrets.
const ENV_VARS: &[(&str, &str)] = &[
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

#[derive(clap::Args)]
struct SendArgs {
    /// Command id (default: a fresh one). Sending the same id again changes nothing.
    #[arg(long)]
    id: Option<String>,
    /// Do not wait for the acknowledgements.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the command to complete.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
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
            dualwrite_capture::run(config, s, shutdown).await?;
        }
        Command::Router => dualwrite_router::run(config, shard, shutdown).await?,
        Command::PauseBuffer => dualwrite_pause_buffer::run(config, shutdown).await?,
        Command::Apply { side: s } => {
            let s = side(&config, &s)?;
            dualwrite_apply::run(config, s, shard, shutdown).await?;
        }
        Command::Run => run_all(config, shutdown).await?,
        Command::Setup => {
            kafka::ensure_topics(&config.kafka, &all_topics(&config)).await?;
            println!("topics ready:");
            dualwrite_ctl::describe_topics(&config, &mut std::io::stdout())?;
        }
        Command::Ctl { command } => match command {
            CtlCommand::Validate => {
                println!("configuration is valid");
                dualwrite_ctl::describe_maps(&config, &mut std::io::stdout())?;
            }
            CtlCommand::Topics => dualwrite_ctl::describe_topics(&config, &mut std::io::stdout())?,
            CtlCommand::Maps { json } => {
                let cfg = config.clone();
                tokio::task::spawn_blocking(move || {
                    dualwrite_ctl::list_maps(&cfg, json, &mut std::io::stdout())
                })
                .await??;
            }
            CtlCommand::RetryCatchup { map, keys } => {
                let cfg = config.clone();
                tokio::task::spawn_blocking(move || {
                    dualwrite_ctl::retry_catchup(&cfg, &map, &keys, &mut std::io::stdout())
                })
                .await??;
            }
            CtlCommand::RetryErrors { map, class, at } => {
                let cfg = config.clone();
                let filter = dualwrite_ctl::ErrorFilter { map, class, at };
                tokio::task::spawn_blocking(move || {
                    dualwrite_ctl::retry_errors(&cfg, &filter, &mut std::io::stdout())
                })
                .await??;
            }
            CtlCommand::EnvVars => {
                for (name, option) in option_env_vars() {
                    println!("{name}\toption {option}");
                }
                for (name, what) in ENV_VARS {
                    println!("{name}\t{what}");
                }
                for (name, setting) in dualwrite_model::config::ENV_OVERRIDES {
                    println!("{name}\toverrides {setting}");
                }
                println!(
                    "{}<PROPERTY>\tsets a Kafka client property (e.g. {}SECURITY_PROTOCOL)",
                    dualwrite_model::config::KAFKA_ENV_PREFIX,
                    dualwrite_model::config::KAFKA_ENV_PREFIX
                );
                for name in config.secret_env_vars() {
                    println!("{name}\tsecret named by the configuration file");
                }
            }
            CtlCommand::CheckSchema { maps } => {
                let mut problems = 0;
                for map in selected_maps(&config, &maps)? {
                    let name = &map.name;
                    let found = dualwrite_runtime::pg::schema_problems(&config, map)
                        .await
                        .map_err(|(_, msg)| anyhow::Error::msg(msg))?;
                    if found.is_empty() {
                        println!("map {name}: fits both tables");
                    }
                    for p in &found {
                        println!("{p}");
                    }
                    problems += found.len();
                }
                if problems > 0 {
                    std::process::exit(1);
                }
            }
            CtlCommand::Verify {
                maps,
                json,
                one_way,
                examples,
            } => {
                let mut reports = Vec::new();
                for map in selected_maps(&config, &maps)? {
                    reports.push(
                        dualwrite_ctl::verify::verify_map(&config, map, one_way)
                            .await
                            .map_err(anyhow::Error::msg)?,
                    );
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&reports)?);
                } else {
                    for r in &reports {
                        println!(
                            "map {}: {} left, {} right: {} only left, {} only right, {} differing{}",
                            r.map,
                            r.left_rows,
                            r.right_rows,
                            r.only_left.len(),
                            r.only_right.len(),
                            r.differing.len(),
                            if r.is_equal() { " — equal" } else { "" }
                        );
                        for k in r.only_left.iter().take(examples) {
                            println!("  only left:  {k}");
                        }
                        for k in r.only_right.iter().take(examples) {
                            println!("  only right: {k}");
                        }
                        for d in r.differing.iter().take(examples) {
                            println!(
                                "  differs:    {} {} = {:?} / {} = {:?}",
                                d.key, d.left_field, d.left, d.right_field, d.right
                            );
                        }
                    }
                }
                if reports.iter().any(|r| !r.is_equal()) {
                    anyhow::bail!("the sides differ");
                }
            }
            CtlCommand::Repair {
                map,
                keys,
                wait_secs,
                json,
            } => {
                let m = config
                    .map(&map)
                    .ok_or_else(|| anyhow::anyhow!("unknown map `{map}`"))?;
                let wait = std::time::Duration::from_secs(wait_secs);
                let r = dualwrite_ctl::repair::repair(&config, m, &keys, wait)
                    .await
                    .map_err(anyhow::Error::msg)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    println!(
                        "map {}: {} record(s) repaired of {} sent; {} already equal",
                        r.map,
                        r.repaired.len(),
                        r.sent.len(),
                        r.equal
                    );
                    for k in r.sent.iter().filter(|k| !r.repaired.contains(k)) {
                        println!("  still differs: {k} (a write of it may be on its way: run again once settled)");
                    }
                }
                if r.repaired.len() < r.sent.len() {
                    anyhow::bail!("some records still differ");
                }
            }
            CtlCommand::Watch { idle_secs } => {
                let cfg = config.clone();
                tokio::task::spawn_blocking(move || {
                    dualwrite_ctl::watch(
                        &cfg,
                        Duration::from_secs(idle_secs),
                        &mut std::io::stdout(),
                    )
                })
                .await??;
            }
            CtlCommand::Run {
                map,
                include_related,
                initial_sync,
                conflict_master,
                order,
                resume_policy,
                send,
            } => {
                let resume_policy = resume_policy
                    .map(|p| serde_json::from_value(serde_json::Value::String(p.clone())).map_err(|_| {
                        anyhow::anyhow!("unknown resume policy `{p}`: use catch_up, skip_to_live or discard")
                    }))
                    .transpose()?;
                let cmd = ControlCommand {
                    id: String::new(),
                    action: Action::Run,
                    map,
                    include_related,
                    initial_sync,
                    conflict_master,
                    order,
                    resume_policy,
                };
                send_command(config, cmd, send).await?;
            }
            CtlCommand::Pause {
                map,
                include_related,
                send,
            } => {
                let cmd = ControlCommand {
                    include_related,
                    ..ControlCommand::new(Action::Pause, map)
                };
                send_command(config, cmd, send).await?;
            }
            CtlCommand::Stop { map, send } => {
                let cmd = ControlCommand::new(Action::Stop, map);
                send_command(config, cmd, send).await?;
            }
            CtlCommand::SkipInitialSync {
                map,
                include_related,
                send,
            } => {
                let cmd = ControlCommand {
                    include_related,
                    ..ControlCommand::new(Action::SkipInitialSync, map)
                };
                send_command(config, cmd, send).await?;
            }
            CtlCommand::RerunInitialSync {
                map,
                include_related,
                conflict_master,
                send,
            } => {
                let cmd = ControlCommand {
                    include_related,
                    conflict_master,
                    ..ControlCommand::new(Action::RerunInitialSync, map)
                };
                send_command(config, cmd, send).await?;
            }
            CtlCommand::InitialSync { map, run, json } => {
                let cfg = config.clone();
                let details = tokio::task::spawn_blocking(move || {
                    dualwrite_ctl::initial_sync_details(&cfg, &map, run)
                })
                .await??;
                dualwrite_ctl::print_initial_sync(&details, json, &mut std::io::stdout())?;
            }
            CtlCommand::Tail {
                topic,
                max,
                idle_secs,
            } => {
                let cfg = config.clone();
                tokio::task::spawn_blocking(move || {
                    dualwrite_ctl::tail(
                        &cfg,
                        &topic,
                        max,
                        Duration::from_secs(idle_secs),
                        &mut std::io::stdout(),
                    )
                })
                .await??;
            }
        },
    }
    Ok(())
}

/// Sends a command and waits for its outcome; an error unless it completed (or was sent without waiting).
async fn send_command(
    config: Arc<Config>,
    mut cmd: ControlCommand,
    send: SendArgs,
) -> anyhow::Result<()> {
    let resent = send.id.is_some();
    cmd.id = send.id.unwrap_or_else(dualwrite_ctl::new_command_id);
    let known = if resent {
        None
    } else {
        statuses(&config).await
    };
    dualwrite_ctl::check_command(&config, known.as_ref(), &cmd)
        .map_err(|reason| anyhow::anyhow!("not sent: {reason}"))?;
    let wait = if send.no_wait {
        Duration::ZERO
    } else {
        Duration::from_secs(send.timeout_secs)
    };
    // The pause buffer creates the control and events topics too; a command
    // sent before it first started (or while it starts) does not fail on
    // a topic that is not there yet.
    let t = dualwrite_model::topics::Topics::new(&config.kafka.topic_prefix);
    let (control, events) = (t.control(), t.events());
    let own: Vec<TopicSpec> = dualwrite_pause_buffer::topics(&config)
        .into_iter()
        .filter(|s| s.name == control || s.name == events)
        .collect();
    kafka::ensure_topics(&config.kafka, &own).await?;
    let (cfg, map) = (config.clone(), cmd.map.clone());
    let result = tokio::task::spawn_blocking(move || {
        dualwrite_ctl::send_command(&cfg, &cmd, wait, &mut std::io::stdout())
    })
    .await??;
    match result {
        CommandResult::Unanswered => Err(anyhow::anyhow!(
            "no pause buffer answered within {} s (is `dualwrite pause-buffer` or `dualwrite run` running with topic prefix `{}`?); the command stays on the control topic and is taken when one starts; map `{map}` was last recorded {}",
            wait.as_secs(),
            config.kafka.topic_prefix,
            dualwrite_ctl::last_recorded(
                &statuses(&config).await.unwrap_or_default(),
                &map,
                dualwrite_runtime::now_micros()
            )
        )),
        CommandResult::Completed => Ok(()),
        CommandResult::Pending if wait.is_zero() => Ok(()),
        CommandResult::Pending => Err(anyhow::anyhow!(
            "not completed within {} s; it may still complete: follow it with `dualwrite ctl watch`",
            wait.as_secs()
        )),
        CommandResult::Rejected(r) => Err(anyhow::anyhow!("rejected: {r}")),
        CommandResult::Failed(r) => Err(anyhow::anyhow!("failed: {r}")),
    }
}

/// The maps' statuses, `None` if they cannot be read (then nothing is known).
async fn statuses(config: &Arc<Config>) -> Option<BTreeMap<String, MapStatus>> {
    let cfg = config.clone();
    match tokio::task::spawn_blocking(move || dualwrite_ctl::read_statuses(&cfg)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!("cannot read the maps' statuses: {e}");
            None
        }
        Err(_) => None,
    }
}

fn all_topics(config: &Config) -> Vec<TopicSpec> {
    let mut v = dualwrite_router::topics(config);
    v.extend(dualwrite_pause_buffer::topics(config));
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
        tasks.spawn(async move {
            (
                "capture",
                dualwrite_capture::run(c, s, t).await.map_err(Into::into),
            )
        });
        let (c, t) = (config.clone(), shutdown.clone());
        tasks.spawn(async move {
            (
                "apply",
                dualwrite_apply::run(c, s, Shard::ALL, t)
                    .await
                    .map_err(Into::into),
            )
        });
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
    tasks.spawn(async move {
        (
            "pause-buffer",
            dualwrite_pause_buffer::run(c, t).await.map_err(Into::into),
        )
    });
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
