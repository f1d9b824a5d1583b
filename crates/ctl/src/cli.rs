//! The `ctl` subcommands of the binary: their arguments (clap) and what
//! each does. The binary parses the command line and hands `ctl` here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{Action, ControlCommand, MapStatus};
use dualwrite_runtime::kafka::{self, TopicSpec};
use dualwrite_runtime::side::{CopySide, Inspect};

use crate::CommandResult;

/// What `ctl env-vars` lists besides the configuration's own: the
/// command line's options read from the environment (option name) and the
/// other variables the binary reads (what for).
pub struct CliEnv {
    pub options: Vec<(String, String)>,
    pub others: &'static [(&'static str, &'static str)],
}

#[derive(Subcommand)]
pub enum CtlCommand {
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
        /// With --include-related: the maps to run, in order, comma separated
        /// (related maps left out are not run); must respect dependencies.
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

#[derive(clap::Args)]
pub struct SendArgs {
    /// Command id (default: a fresh one). Sending the same id again changes nothing.
    #[arg(long)]
    pub id: Option<String>,
    /// Do not wait for the acknowledgements.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the command to complete.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
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

/// Runs one `ctl` subcommand. `control_topics`: the control and events
/// topics, created if missing before a command is sent. (Long as a
/// dispatch table is: one short arm per subcommand, the work in the
/// functions they call.) The sides are read through `C` (the schema
/// check) and `I` (verify, repair, the touch of `retry-errors`).
pub async fn run<C: CopySide, I: Inspect>(
    config: Arc<Config>,
    command: CtlCommand,
    env: &CliEnv,
    control_topics: &[TopicSpec],
) -> anyhow::Result<()> {
    match command {
        CtlCommand::Validate => {
            println!("configuration is valid");
            crate::describe_maps(&config, &mut std::io::stdout())?;
        }
        CtlCommand::Topics => crate::describe_topics(&config, &mut std::io::stdout())?,
        CtlCommand::Maps { json } => {
            let cfg = config.clone();
            tokio::task::spawn_blocking(move || {
                crate::list_maps(&cfg, json, &mut std::io::stdout())
            })
            .await??;
        }
        CtlCommand::RetryCatchup { map, keys } => {
            let cfg = config.clone();
            tokio::task::spawn_blocking(move || {
                crate::retry_catchup(&cfg, &map, &keys, &mut std::io::stdout())
            })
            .await??;
        }
        CtlCommand::RetryErrors { map, class, at } => {
            let cfg = config.clone();
            let filter = crate::ErrorFilter { map, class, at };
            let touches = tokio::task::spawn_blocking(move || {
                crate::retry_errors(&cfg, &filter, &mut std::io::stdout())
            })
            .await??;
            crate::touch::retry::<I>(&config, &touches, &mut std::io::stdout()).await?;
        }
        CtlCommand::EnvVars => {
            crate::print_env_vars(&config, &env.options, env.others, &mut std::io::stdout())?
        }
        CtlCommand::CheckSchema { maps } => {
            let maps = selected_maps(&config, &maps)?;
            let problems = crate::check_schema::<C>(&config, &maps, &mut std::io::stdout()).await?;
            if problems > 0 {
                anyhow::bail!("{problems} problem(s) found");
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
                    crate::verify::verify_map::<I>(&config, map, one_way)
                        .await
                        .map_err(|e| anyhow::Error::msg(e.message))?,
                );
            }
            crate::verify::print(&reports, json, examples, &mut std::io::stdout())?;
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
            let chosen = read_statuses(&config)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "not repaired: cannot read the maps' statuses, which say the conflict master map `{map}` runs with: {e}"
                    )
                })?
                .remove(&map)
                .and_then(|s| s.conflict_master);
            let master = config.run_master(m, chosen.as_deref());
            let r = crate::repair::repair::<I>(&config, m, master, &keys, wait)
                .await
                .map_err(anyhow::Error::msg)?;
            crate::repair::print(&r, json, &mut std::io::stdout())?;
            if r.repaired.len() < r.sent.len() {
                anyhow::bail!("some records still differ");
            }
        }
        CtlCommand::Watch { idle_secs } => {
            let cfg = config.clone();
            tokio::task::spawn_blocking(move || {
                crate::watch(&cfg, Duration::from_secs(idle_secs), &mut std::io::stdout())
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
                .map(|p| {
                    dualwrite_model::lifecycle::ResumePolicy::from_name(&p).ok_or_else(|| {
                        anyhow::anyhow!(
                            "unknown resume policy `{p}`: use catch_up, skip_to_live or discard"
                        )
                    })
                })
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
                sent_by: None,
            };
            send_command(config, cmd, send, control_topics).await?;
        }
        CtlCommand::Pause {
            map,
            include_related,
            send,
        } => {
            let cmd = related(Action::Pause, map, include_related);
            send_command(config, cmd, send, control_topics).await?;
        }
        CtlCommand::Stop { map, send } => {
            let cmd = ControlCommand::new(Action::Stop, map);
            send_command(config, cmd, send, control_topics).await?;
        }
        CtlCommand::SkipInitialSync {
            map,
            include_related,
            send,
        } => {
            let cmd = related(Action::SkipInitialSync, map, include_related);
            send_command(config, cmd, send, control_topics).await?;
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
            send_command(config, cmd, send, control_topics).await?;
        }
        CtlCommand::InitialSync { map, run, json } => {
            let cfg = config.clone();
            let details =
                tokio::task::spawn_blocking(move || crate::initial_sync_details(&cfg, &map, run))
                    .await??;
            crate::print_initial_sync(&details, json, &mut std::io::stdout())?;
        }
        CtlCommand::Tail {
            topic,
            max,
            idle_secs,
        } => {
            let cfg = config.clone();
            tokio::task::spawn_blocking(move || {
                crate::tail(
                    &cfg,
                    &topic,
                    max,
                    Duration::from_secs(idle_secs),
                    &mut std::io::stdout(),
                )
            })
            .await??;
        }
    }
    Ok(())
}

/// A command of `action` on `map`, and on its related maps if asked.
fn related(action: Action, map: String, include_related: bool) -> ControlCommand {
    ControlCommand {
        include_related,
        ..ControlCommand::new(action, map)
    }
}

/// Sends a command and waits for its outcome; an error unless it completed (or was sent without waiting).
async fn send_command(
    config: Arc<Config>,
    mut cmd: ControlCommand,
    send: SendArgs,
    control_topics: &[TopicSpec],
) -> anyhow::Result<()> {
    let resent = send.id.is_some();
    cmd.id = send.id.unwrap_or_else(crate::new_command_id);
    cmd.sent_by = Some(crate::sender());
    let known = if resent {
        None
    } else {
        statuses(&config).await
    };
    crate::check_command(&config, known.as_ref(), &cmd)
        .map_err(|reason| anyhow::anyhow!("not sent: {reason}"))?;
    let wait = if send.no_wait {
        Duration::ZERO
    } else {
        Duration::from_secs(send.timeout_secs)
    };
    // The pause buffer creates the control and events topics too; a command
    // sent before it first started (or while it starts) does not fail on
    // a topic that is not there yet.
    kafka::ensure_topics(&config.kafka, control_topics).await?;
    let (cfg, map) = (config.clone(), cmd.map.clone());
    let result = tokio::task::spawn_blocking(move || {
        crate::send_command(&cfg, &cmd, wait, &mut std::io::stdout())
    })
    .await??;
    match result {
        CommandResult::Unanswered => Err(anyhow::anyhow!(
            "no pause buffer answered within {} s (is `dualwrite pause-buffer` or `dualwrite run` running with topic prefix `{}`?); the command stays on the control topic and is taken when one starts; map `{map}` was last recorded {}",
            wait.as_secs(),
            config.kafka.topic_prefix,
            crate::last_recorded(
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
    read_statuses(config)
        .await
        .map_err(|e| tracing::debug!("cannot read the maps' statuses: {e}"))
        .ok()
}

/// The maps' statuses from the status topic (a map never run has none).
async fn read_statuses(config: &Arc<Config>) -> anyhow::Result<BTreeMap<String, MapStatus>> {
    let cfg = config.clone();
    tokio::task::spawn_blocking(move || crate::read_statuses(&cfg))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))
}
