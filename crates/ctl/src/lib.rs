//! Operator CLI (`dualwrite ctl …`). It talks only to Kafka, but for
//! [`verify`], which reads both sides' databases.

pub mod cli;
pub mod repair;
pub mod touch;
pub mod verify;

use dualwrite_runtime::side::{schema_problems, CopySide};
use std::io::Write;
use std::time::Duration;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use dualwrite_model::avro::{self, AvroRecord};
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{
    dependencies, ControlCommand, ControlEvent, MapState, MapStatus, Outcome,
};
use dualwrite_model::record::{
    ApplyWrite, ChangeRecord, ErrorRecord, InitialSyncError, MappedChange, ResolverState,
};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::Message;
use dualwrite_runtime::kafka::rdkafka::{Offset, TopicPartitionList};
use dualwrite_runtime::kafka::{self as kafka_rt};
use dualwrite_runtime::kafka::{client_config, DwContext, Outgoing};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{0}")]
    Usage(String),
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
}

/// Prints every environment variable the binary reads: its options'
/// (`options`, from the command line's definition), `others` (name, what),
/// the configuration's overrides and the secrets the file names.
pub fn print_env_vars(
    config: &Config,
    options: &[(String, String)],
    others: &[(&str, &str)],
    out: &mut impl Write,
) -> std::io::Result<()> {
    use dualwrite_model::config::{ENV_OVERRIDES, KAFKA_ENV_PREFIX};
    for (name, option) in options {
        writeln!(out, "{name}\toption {option}")?;
    }
    for (name, what) in others {
        writeln!(out, "{name}\t{what}")?;
    }
    for (name, setting) in ENV_OVERRIDES {
        writeln!(out, "{name}\toverrides {setting}")?;
    }
    writeln!(
        out,
        "{KAFKA_ENV_PREFIX}<PROPERTY>\tsets a Kafka client property (e.g. {KAFKA_ENV_PREFIX}SECURITY_PROTOCOL)"
    )?;
    for name in config.secret_env_vars() {
        writeln!(out, "{name}\tsecret named by the configuration file")?;
    }
    Ok(())
}

/// Checks each map against both sides' tables and prints what does not
/// fit (or that it fits); how many problems were found.
pub async fn check_schema<C: CopySide>(
    config: &Config,
    maps: &[&dualwrite_model::config::MapConfig],
    out: &mut impl Write,
) -> Result<usize, CtlError> {
    let mut problems = 0;
    for map in maps {
        let found = schema_problems::<C>(config, map)
            .await
            .map_err(|e| CtlError::Usage(e.message))?;
        if found.is_empty() {
            writeln!(out, "map {}: fits both tables", map.name)?;
        }
        for p in &found {
            writeln!(out, "{p}")?;
        }
        problems += found.len();
    }
    Ok(problems)
}

/// Prints the maps of the configuration.
pub fn describe_maps(config: &Config, out: &mut impl Write) -> std::io::Result<()> {
    let (l, r) = (&config.sides.left.name, &config.sides.right.name);
    writeln!(out, "sides: left = {l}, right = {r}")?;
    for m in &config.maps {
        writeln!(
            out,
            "map {}: {l}:{} ({}) <-> {r}:{} ({}); {} fields; conflict master {}; initial sync default {}{}",
            m.name,
            m.left.qualified(),
            m.left.key.join(", "),
            m.right.qualified(),
            m.right.key.join(", "),
            m.fields.len(),
            config.side(config.conflict_master(m)).name,
            if m.initial_sync { "on" } else { "off" },
            if m.depends_on.is_empty() {
                String::new()
            } else {
                format!("; depends on {}", m.depends_on.join(", "))
            }
        )?;
    }
    Ok(())
}

/// Prints every topic of the deployment and what flows on it.
pub fn describe_topics(config: &Config, out: &mut impl Write) -> std::io::Result<()> {
    let t = Topics::new(&config.kafka.topic_prefix);
    for side in [&config.sides.left.name, &config.sides.right.name] {
        writeln!(
            out,
            "{}\tChangeRecord: committed writes captured on {side}, and its applier's reports of its writes",
            t.capture(side)
        )?;
    }
    for m in &config.maps {
        writeln!(
            out,
            "{}\tMappedChange: map {}, both sides' writes and reports, keyed by alternate key",
            t.map(&m.name),
            m.name
        )?;
        writeln!(
            out,
            "{}\tResolverState (compacted): the resolver's state of each record of map {}",
            t.resolver(&m.name),
            m.name
        )?;
    }
    for side in [&config.sides.left.name, &config.sides.right.name] {
        writeln!(
            out,
            "{}\tApplyWrite: the resolver's decisions for {side}, written by its applier",
            t.apply(side)
        )?;
    }
    writeln!(
        out,
        "{}\tErrorRecord: records that could not be processed, with context",
        t.errors()
    )?;
    for (topic, what) in [
        (
            t.control(),
            "ControlCommand (Avro or JSON): operator commands",
        ),
        (
            t.status(),
            "MapStatus (compacted): each map's state and initial sync progress",
        ),
        (
            t.events(),
            "ControlEvent: acknowledgements and state changes",
        ),
        (
            t.catchup_errors(),
            "MappedChange: changes a skip-to-live resume set aside",
        ),
        (
            t.initial_sync_errors(),
            "InitialSyncError: rows an initial sync could not write, all kept",
        ),
    ] {
        writeln!(out, "{topic}\t{what}")?;
    }
    Ok(())
}

/// A record printer for a topic.
type Printer = fn(&[u8]) -> String;

/// The topic `which` names (see [`tail`]) and how its records print.
fn printer_of(config: &Config, which: &str) -> Result<(String, Printer), CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    Ok(match which.split_once(':') {
        None if which == "errors" => (t.errors(), render::<ErrorRecord>),
        Some(("capture", side)) => (t.capture(side), render::<ChangeRecord>),
        Some(("map", map)) => (t.map(map), render::<MappedChange>),
        Some(("apply", side)) => (t.apply(side), render::<ApplyWrite>),
        Some(("resolver", map)) => (t.resolver(map), render::<ResolverState>),
        None if which == "catchup-errors" => (t.catchup_errors(), render::<MappedChange>),
        None if which == "initial-sync-errors" => {
            (t.initial_sync_errors(), render::<InitialSyncError>)
        }
        None if which == "status" => (t.status(), render::<MapStatus>),
        None if which == "events" => (t.events(), render::<ControlEvent>),
        None if which == "control" => (t.control(), render_command),
        _ => {
            return Err(CtlError::Usage(format!(
                "unknown topic `{which}`: use errors, capture:<side>, map:<map>, apply:<side>, catchup-errors, initial-sync-errors, status, events or control"
            )))
        }
    })
}

/// A topic's partitions with their low and high watermarks; a topic that
/// does not exist is an error that names it, the broker and the prefix.
fn watermarks(config: &Config, topic: &str) -> Result<kafka_rt::Watermarks, CtlError> {
    kafka_rt::watermarks_if_exists(&config.kafka, topic)?.ok_or_else(|| {
        CtlError::Usage(format!(
            "topic {topic} does not exist on {}: the services create their topics when they start, so either they have not started with this configuration yet, or kafka.topic_prefix (`{}`) is not the deployment's",
            config.kafka.bootstrap_servers, config.kafka.topic_prefix
        ))
    })
}

/// Prints the records of a topic as JSON lines, from the beginning, up to
/// `max` records: every record the topic held at the start (however long
/// the broker takes), then new ones until nothing arrives for `idle`.
/// `which` is `errors`, `capture:<side>`, `map:<map>` or `apply:<side>`.
pub fn tail(
    config: &Config,
    which: &str,
    max: usize,
    idle: Duration,
    out: &mut impl Write,
) -> Result<usize, CtlError> {
    let (topic, printer) = printer_of(config, which)?;
    let marks = watermarks(config, &topic)?;
    let consumer: BaseConsumer<DwContext> = client_config(&config.kafka, "dualwrite-ctl")
        .set("group.id", "dualwrite-ctl")
        .set("enable.auto.commit", "false")
        .create_with_context(DwContext)?;
    let mut tpl = TopicPartitionList::new();
    // What the topic holds now is always printed (however slow the first
    // fetch); after that, new records until nothing arrives for `idle`.
    let mut pending: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, lo, hi) in marks {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
        if hi > lo {
            pending.insert(p, hi);
        }
    }
    consumer.assign(&tpl)?;
    let catch_up_deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while n < max {
        let wait = if pending.is_empty() {
            idle
        } else {
            catch_up_deadline.saturating_duration_since(Instant::now())
        };
        match consumer.poll(wait) {
            None if pending.is_empty() => break,
            None => {
                eprintln!(
                    "warning: {topic}: stopped before the end the topic had at the start (partitions {:?} not reached within 60 s)",
                    pending.keys().collect::<Vec<_>>()
                );
                break;
            }
            // The client finds a moved leader by itself.
            Some(Err(e)) if kafka_rt::retry::classify(&e) != kafka_rt::retry::Retry::No => {}
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                if pending
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    pending.remove(&m.partition());
                }
                let body = m.payload().map(printer).unwrap_or_else(|| "null".into());
                writeln!(
                    out,
                    "{{\"partition\":{},\"offset\":{},\"key\":{},\"value\":{body}}}",
                    m.partition(),
                    m.offset(),
                    serde_json::to_string(&m.key().map(|k| String::from_utf8_lossy(k)))
                        .unwrap_or_default()
                )?;
                n += 1;
            }
        }
    }
    Ok(n)
}

fn render<T: AvroRecord>(bytes: &[u8]) -> String {
    match avro::decode::<T>(bytes) {
        Ok(r) => serde_json::to_string(&r)
            .unwrap_or_else(|e| format!("{{\"render_error\":{:?}}}", e.to_string())),
        Err(e) => format!("{{\"decode_error\":{:?}}}", e.to_string()),
    }
}

fn render_command(bytes: &[u8]) -> String {
    match dualwrite_model::lifecycle::parse_command(bytes) {
        Ok(c) => serde_json::to_string(&c).unwrap_or_default(),
        Err(e) => format!("{{\"decode_error\":{:?}}}", e),
    }
}

/// One map's state and how far behind it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MapRow {
    pub map: String,
    pub state: String,
    pub generation: i64,
    /// Records on the map topic not yet released by the pause buffer.
    pub backlog: i64,
    pub depends_on: Vec<String>,
    pub reason: Option<String>,
    pub last_command_id: Option<String>,
    /// The latest initial sync, e.g. `copying 41%` or `done, 2 failed`.
    pub initial_sync: Option<String>,
    /// The mapping version the map runs with (recorded by its run).
    pub mapping_version: Option<String>,
    /// The mapping version of the configuration file read by this command.
    pub configured_version: String,
    /// The conflict master the map runs with: the side its run chose
    /// (recorded in its status), else the configured one.
    pub conflict_master: String,
    /// Whether that is the configured conflict master.
    pub master_configured: bool,
}

/// A short summary of an initial sync for the maps table.
fn initial_summary(i: &dualwrite_model::lifecycle::InitialSync) -> String {
    use dualwrite_model::lifecycle::CopyPhase;
    match &i.phase {
        CopyPhase::Copying if i.rows_total > 0 => format!(
            "copying {}%",
            (i.rows_done * 100 / i.rows_total).clamp(0, 100)
        ),
        CopyPhase::Done if i.failed > 0 => format!("done, {} failed", i.failed),
        phase => phase.to_string(),
    }
}

/// The latest status of each map on the status topic (none while the
/// topic does not exist: no map was ever run).
pub fn read_statuses(config: &Config) -> Result<BTreeMap<String, MapStatus>, CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let mut out = BTreeMap::new();
    if kafka_rt::watermarks_if_exists(&config.kafka, &t.status())?.is_none() {
        return Ok(out);
    }
    for m in kafka_rt::read_to_end(&config.kafka, &t.status())? {
        if let Some(Ok(s)) = m.payload().map(avro::decode::<MapStatus>) {
            out.insert(s.map.clone(), s);
        }
    }
    Ok(out)
}

/// Every configured map with its state and backlog.
pub fn map_rows(config: &Config) -> Result<Vec<MapRow>, CtlError> {
    map_rows_of(config, &read_statuses(config)?)
}

/// [`map_rows`] from statuses already read (`read_statuses`).
pub fn map_rows_of(
    config: &Config,
    statuses: &BTreeMap<String, MapStatus>,
) -> Result<Vec<MapRow>, CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let mut rows = Vec::new();
    for m in &config.maps {
        let status = statuses.get(&m.name);
        let chosen = status.and_then(|s| s.conflict_master.as_deref());
        let master = config.run_master(m, chosen);
        let topic = t.map(&m.name);
        let marks = watermarks(config, &topic)?;
        let group = t.group(&format!("pause-buffer.{}", m.name));
        let positions = kafka_rt::group_positions(&config.kafka, &group, &topic)?;
        let backlog = marks
            .iter()
            .map(|(p, lo, hi)| (hi - positions.get(p).copied().unwrap_or(*lo)).max(0))
            .sum();
        rows.push(MapRow {
            map: m.name.clone(),
            state: status
                .map_or(MapState::NotRunning, |s| s.state)
                .label()
                .to_owned(),
            generation: status.map_or(0, |s| s.generation),
            backlog,
            depends_on: m.depends_on.clone(),
            reason: status.and_then(|s| s.reason.clone()),
            last_command_id: status.and_then(|s| s.last_command_id.clone()),
            initial_sync: status.and_then(|s| s.initial.as_ref()).map(initial_summary),
            mapping_version: status.and_then(|s| s.mapping_version.clone()),
            configured_version: m.version.clone(),
            conflict_master: config.side(master).name.clone(),
            master_configured: master == config.conflict_master(m),
        });
    }
    Ok(rows)
}

/// Prints the maps as a table or JSON.
pub fn list_maps(config: &Config, json: bool, out: &mut impl Write) -> Result<(), CtlError> {
    let rows = map_rows(config)?;
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<13} {:>4} {:>9}  {:<16} {:<12}  {:<12}  DEPENDS ON",
        "MAP", "STATE", "GEN", "BACKLOG", "INITIAL SYNC", "VERSION", "MASTER"
    )?;
    for r in rows {
        // The running version; `running→configured` when the file has another.
        let version = match &r.mapping_version {
            None => "-".to_owned(),
            Some(v) if *v == r.configured_version => v.clone(),
            Some(v) => format!("{v}→{}", r.configured_version),
        };
        // The run's master, marked `*` when the run chose another than the file's.
        let master = if r.master_configured {
            r.conflict_master.clone()
        } else {
            format!("{}*", r.conflict_master)
        };
        writeln!(
            out,
            "{:<20} {:<13} {:>4} {:>9}  {:<16} {:<12}  {:<12}  {}",
            r.map,
            r.state,
            r.generation,
            r.backlog,
            r.initial_sync.as_deref().unwrap_or("-"),
            version,
            master,
            if r.depends_on.is_empty() {
                "-".to_owned()
            } else {
                r.depends_on.join(", ")
            }
        )?;
    }
    Ok(())
}

/// The initial write of a map: its progress and counts (from the status
/// topic) and every row it could not write (from the initial sync errors
/// topic), for the latest run or the one given.
#[derive(Debug, serde::Serialize)]
pub struct InitialSyncDetails {
    pub map: String,
    pub state: String,
    pub run: Option<i64>,
    /// Progress of the latest run (when `run` is that one).
    pub progress: Option<dualwrite_model::lifecycle::InitialSync>,
    /// The failed rows of the run, the latest record per target and key
    /// (a chunk copied again after a crash records its failures again).
    pub failed_rows: Vec<InitialSyncError>,
}

pub fn initial_sync_details(
    config: &Config,
    map: &str,
    run: Option<i64>,
) -> Result<InitialSyncDetails, CtlError> {
    if config.map(map).is_none() {
        return Err(CtlError::Usage(format!("unknown map `{map}`")));
    }
    let t = Topics::new(&config.kafka.topic_prefix);
    let status = read_statuses(config)?.remove(map);
    let latest = status.as_ref().and_then(|s| s.initial.clone());
    let run = run.or(latest.as_ref().map(|i| i.run));
    let mut rows: BTreeMap<(String, String), InitialSyncError> = BTreeMap::new();
    if let Some(run) = run {
        for m in kafka_rt::read_to_end(&config.kafka, &t.initial_sync_errors())? {
            if let Some(Ok(e)) = m.payload().map(avro::decode::<InitialSyncError>) {
                if e.map == map && e.run == run {
                    rows.insert((e.target_side.clone(), e.key.clone()), e);
                }
            }
        }
    }
    Ok(InitialSyncDetails {
        map: map.to_owned(),
        state: status
            .as_ref()
            .map_or(MapState::NotRunning, |s| s.state)
            .label()
            .to_owned(),
        run,
        progress: latest.filter(|i| Some(i.run) == run),
        failed_rows: rows.into_values().collect(),
    })
}

/// Prints [`initial_sync_details`] as text or JSON.
pub fn print_initial_sync(
    d: &InitialSyncDetails,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(d).unwrap_or_default()
        )?;
        return Ok(());
    }
    let Some(run) = d.run else {
        writeln!(out, "map {}: {}; no initial sync has run", d.map, d.state)?;
        return Ok(());
    };
    match &d.progress {
        Some(p) => writeln!(
            out,
            "map {}: {}; initial sync run {run}: {}, {}/{} rows read; {} created, {} updated, {} unchanged, {} failed",
            d.map, d.state, p.phase, p.rows_done, p.rows_total, p.created, p.updated, p.unchanged, p.failed
        )?,
        None => writeln!(out, "map {}: {}; initial sync run {run}", d.map, d.state)?,
    }
    if d.failed_rows.is_empty() {
        writeln!(out, "no failed rows")?;
        return Ok(());
    }
    writeln!(out, "failed rows ({}):", d.failed_rows.len())?;
    writeln!(
        out,
        "{:<12} {:<9} {:<30} ERROR",
        "TARGET", "OPERATION", "KEY"
    )?;
    for e in &d.failed_rows {
        writeln!(
            out,
            "{:<12} {:<9} {:<30} {}",
            e.target_side, e.operation, e.key, e.message
        )?;
    }
    Ok(())
}

/// A fresh command id.
pub fn new_command_id() -> String {
    format!(
        "ctl-{}-{}",
        dualwrite_runtime::now_micros(),
        std::process::id()
    )
}

/// Who sends `ctl`'s commands: `ctl: <user>` (the login name from the
/// environment), as recorded on the command and its events.
pub fn sender() -> String {
    let user = ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()));
    format!("ctl: {}", user.as_deref().unwrap_or("unknown user"))
}

/// What happened to a command.
#[derive(Debug, PartialEq, Eq)]
pub enum CommandResult {
    Completed,
    Rejected(String),
    Failed(String),
    /// Accepted, not completed within the wait (e.g. a long catch-up).
    Pending,
    /// No acknowledgement at all within the wait: no pause buffer read it.
    Unanswered,
}

/// Refuses a command before it is sent if the controller would refuse it:
/// against the configuration always, and against the maps' states when
/// they are known (`None`: not read, e.g. a command id sent again, which
/// the controller answers as a duplicate whatever the state now).
pub fn check_command(
    config: &Config,
    statuses: Option<&BTreeMap<String, MapStatus>>,
    cmd: &ControlCommand,
) -> Result<(), String> {
    match statuses {
        Some(s) => dualwrite_model::plan::plan(config, s, cmd).map(|_| ()),
        None => dualwrite_model::plan::check(config, cmd).map(|_| ()),
    }
}

/// A map's last recorded state, for a message: "Running (generation 3,
/// recorded 12 s ago)", or "Not running (no status recorded)".
pub fn last_recorded(statuses: &BTreeMap<String, MapStatus>, map: &str, now_micros: i64) -> String {
    match statuses.get(map) {
        None => format!("{} (no status recorded)", MapState::NotRunning),
        Some(s) => format!(
            "{} (generation {}, recorded {} s ago{})",
            s.state,
            s.generation,
            (now_micros - s.updated_at).max(0) / 1_000_000,
            s.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    }
}

/// Sends a command (Avro) to the control topic and, unless `wait` is zero,
/// prints its acknowledgements until it completed for every map it acts on,
/// was rejected or failed, or `wait` passed.
pub fn send_command(
    config: &Config,
    cmd: &ControlCommand,
    wait: Duration,
    out: &mut impl Write,
) -> Result<CommandResult, CtlError> {
    print_related(config, cmd, out)?;
    let t = Topics::new(&config.kafka.topic_prefix);
    let start = kafka_rt::watermarks(&config.kafka, &t.events())?;
    let payload = avro::encode(cmd).map_err(|e| CtlError::Usage(e.to_string()))?;
    let signature = sign_command(config, &payload)?;
    let record = Outgoing {
        topic: t.control(),
        key: cmd.id.clone(),
        payload,
    };
    kafka_rt::produce_blocking_with_headers(
        &config.kafka,
        "dualwrite-ctl",
        &[record],
        &signature,
        Duration::from_secs(30),
    )?;
    writeln!(out, "sent {} {} (id {})", cmd.action, cmd.map, cmd.id)?;
    if wait.is_zero() {
        return Ok(CommandResult::Pending);
    }
    let consumer = events_from(config, &start)?;
    let deadline = Instant::now() + wait;
    let mut answer = Answer::default();
    while Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = match m {
            Ok(m) => m,
            Err(e) if kafka_rt::retry::classify(&e) != kafka_rt::retry::Retry::No => continue,
            Err(e) => return Err(e.into()),
        };
        let Some(Ok(ev)) = m.payload().map(avro::decode::<ControlEvent>) else {
            continue;
        };
        if ev.command_id.as_deref() != Some(&cmd.id) {
            continue;
        }
        writeln!(
            out,
            "{:<13} {:<16} {:<13} {}",
            outcome_label(ev.outcome),
            ev.map.as_deref().unwrap_or("-"),
            ev.state.as_deref().unwrap_or(""),
            ev.message
        )?;
        if let Some(done) = answer.hear(ev) {
            return Ok(done);
        }
    }
    Ok(if answer.heard {
        CommandResult::Pending
    } else {
        CommandResult::Unanswered
    })
}

/// A run's related maps, and whether they run with it.
fn print_related(
    config: &Config,
    cmd: &ControlCommand,
    out: &mut impl Write,
) -> std::io::Result<()> {
    if cmd.action != dualwrite_model::lifecycle::Action::Run {
        return Ok(());
    }
    let deps = dependencies(config, &cmd.map);
    if deps.is_empty() {
        return Ok(());
    }
    let how = if cmd.include_related {
        " (run together, dependencies first)"
    } else {
        " (add --include-related to run them too)"
    };
    writeln!(out, "related maps of {}: {}{how}", cmd.map, deps.join(", "))
}

/// What a command's events said so far.
#[derive(Default)]
struct Answer {
    heard: bool,
    /// The maps it acts on that have not completed (once accepted).
    pending: Option<BTreeSet<String>>,
}

impl Answer {
    /// Takes one of the command's events; the result once it ended.
    fn hear(&mut self, ev: ControlEvent) -> Option<CommandResult> {
        self.heard = true;
        match ev.outcome {
            Outcome::Rejected => Some(CommandResult::Rejected(ev.message)),
            Outcome::Failed => Some(CommandResult::Failed(ev.message)),
            Outcome::Accepted => {
                self.pending = Some(ev.maps.into_iter().collect());
                None
            }
            Outcome::Completed => {
                // A duplicate id completes without being accepted again.
                let Some(p) = self.pending.as_mut() else {
                    return Some(CommandResult::Completed);
                };
                if let Some(map) = &ev.map {
                    p.remove(map);
                }
                p.is_empty().then_some(CommandResult::Completed)
            }
            Outcome::StateChanged | Outcome::Drift => None,
        }
    }
}

/// The signature header of a command (none without `control.signing_keys`),
/// made with the first key.
fn sign_command(config: &Config, payload: &[u8]) -> Result<Vec<(&'static str, String)>, CtlError> {
    let key = config.control.signing_key().map_err(CtlError::Usage)?;
    Ok(key
        .map(|k| {
            let now = dualwrite_runtime::now_micros() / 1_000_000;
            let value = dualwrite_model::signing::sign(k.expose().as_bytes(), now, payload);
            (dualwrite_model::signing::HEADER, value)
        })
        .into_iter()
        .collect())
}

/// Prints events as they happen, for `max` or until nothing arrives for `idle` (zero: forever).
pub fn watch(config: &Config, idle: Duration, out: &mut impl Write) -> Result<(), CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let start = kafka_rt::watermarks(&config.kafka, &t.events())?;
    let consumer = events_from(config, &start)?;
    let mut last = Instant::now();
    loop {
        if !idle.is_zero() && last.elapsed() > idle {
            return Ok(());
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = match m {
            Ok(m) => m,
            Err(e) if kafka_rt::retry::classify(&e) != kafka_rt::retry::Retry::No => continue,
            Err(e) => return Err(e.into()),
        };
        last = Instant::now();
        if let Some(Ok(ev)) = m.payload().map(avro::decode::<ControlEvent>) {
            writeln!(
                out,
                "{:<13} {:<16} {:<13} {:<28} {}{}",
                outcome_label(ev.outcome),
                ev.map.as_deref().unwrap_or("-"),
                ev.state.as_deref().unwrap_or(""),
                ev.command_id.as_deref().unwrap_or("-"),
                ev.message,
                ev.sent_by
                    .as_deref()
                    .map(|by| format!(" (sent by {by})"))
                    .unwrap_or_default()
            )?;
            out.flush()?;
        }
    }
}

fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Accepted => "ACCEPTED",
        Outcome::Rejected => "REJECTED",
        Outcome::Completed => "COMPLETED",
        Outcome::Failed => "FAILED",
        Outcome::StateChanged => "STATE_CHANGED",
        Outcome::Drift => "DRIFT",
    }
}

/// Sends the changes a skip-to-live resume set aside for `map` (all, or
/// those whose key is in `keys`) back through the map's topic. The
/// resolver skips any that a later write of the same side has overtaken
/// (their positions are behind), so a retry never regresses a record and
/// may be repeated. Returns how many were sent.
pub fn retry_catchup(
    config: &Config,
    map: &str,
    keys: &[String],
    out: &mut impl Write,
) -> Result<usize, CtlError> {
    if config.map(map).is_none() {
        return Err(CtlError::Usage(format!("unknown map `{map}`")));
    }
    let t = Topics::new(&config.kafka.topic_prefix);
    let mut selected = Vec::new();
    for m in kafka_rt::read_to_end(&config.kafka, &t.catchup_errors())? {
        let Some(payload) = m.payload() else { continue };
        let Ok(mc) = avro::decode::<MappedChange>(payload) else {
            continue;
        };
        if mc.map == map && (keys.is_empty() || keys.contains(&mc.kafka_key())) {
            selected.push((mc.kafka_key(), payload.to_vec()));
        }
    }
    let topic = t.map(map);
    let records: Vec<(String, String, Vec<u8>)> = selected
        .iter()
        .map(|(k, p)| (topic.clone(), k.clone(), p.clone()))
        .collect();
    republish(config, &records)?;
    writeln!(
        out,
        "sent {} queued change(s) of map {map} back through {topic}",
        selected.len()
    )?;
    Ok(selected.len())
}

/// Produces the records (topic, key, payload) and waits until all are acknowledged.
fn republish(config: &Config, records: &[(String, String, Vec<u8>)]) -> Result<(), CtlError> {
    let records: Vec<Outgoing> = records
        .iter()
        .map(|(topic, key, payload)| Outgoing {
            topic: topic.clone(),
            key: key.clone(),
            payload: payload.clone(),
        })
        .collect();
    kafka_rt::produce_blocking(
        &config.kafka,
        "dualwrite-ctl",
        &records,
        Duration::from_secs(60),
    )?;
    Ok(())
}

/// Which error records to retry.
#[derive(Debug, Default)]
pub struct ErrorFilter {
    pub map: Option<String>,
    pub class: Option<String>,
    /// Offsets on the errors topic (as `partition:offset`); empty: all.
    pub at: Vec<String>,
}

/// Sends the records behind error records (matching `filter`) back to the
/// topic they were read from, once the cause is fixed. A write retried on
/// an apply topic is made only if the target has no later write and is
/// still in the state it expected; a captured change retried is skipped by
/// the resolver when a later write of its side overtook it; so a retry
/// never regresses a record. Returns the rows to touch (changes too large
/// to capture: [`touch::retry`] brings them back).
pub fn retry_errors(
    config: &Config,
    filter: &ErrorFilter,
    out: &mut impl Write,
) -> Result<BTreeSet<touch::Touch>, CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let mut records = Vec::new();
    let mut touches = BTreeSet::new();
    let (mut not_retryable, mut refused) = (0, 0);
    for m in kafka_rt::read_to_end(&config.kafka, &t.errors())? {
        let Some(Ok(e)) = m.payload().map(avro::decode::<ErrorRecord>) else {
            continue;
        };
        let here = format!("{}:{}", m.partition(), m.offset());
        if filter
            .map
            .as_ref()
            .is_some_and(|f| e.map.as_ref() != Some(f))
            || filter.class.as_ref().is_some_and(|c| &e.error_class != c)
            || (!filter.at.is_empty() && !filter.at.contains(&here))
        {
            continue;
        }
        // A change too large to capture: brought back by touching its row.
        match touch::touch_of(config, &e) {
            Some(Ok(row)) => {
                touches.insert(row);
                continue;
            }
            Some(Err(why)) => {
                writeln!(out, "not retried: error record at {here}: {why}")?;
                refused += 1;
                continue;
            }
            None => {}
        }
        match (e.topic, e.payload) {
            (Some(topic), Some(payload)) => match retry_destination(config, &topic, &payload) {
                Ok(()) => records.push((topic, e.key.unwrap_or_default(), payload)),
                Err(why) => {
                    writeln!(out, "not retried: error record at {here}: {why}")?;
                    refused += 1;
                }
            },
            _ => not_retryable += 1,
        }
    }
    republish(config, &records)?;
    writeln!(
        out,
        "sent {} record(s) back to the topics they came from; {not_retryable} matching error(s) carry no record to retry; {refused} refused",
        records.len()
    )?;
    Ok(touches)
}

/// Whether the record `payload` may be sent back to `topic`: only to the
/// topic a service reads it from, as the configuration names it (a side's
/// capture topic, a configured map's topic, a side's apply topic), and only
/// a record of that topic's kind for that side or map. Never the control
/// topic, the status or events topics, or a topic outside the prefix: an
/// error record names its topic itself, and anyone who may write the
/// errors topic could name any.
pub fn retry_destination(config: &Config, topic: &str, payload: &[u8]) -> Result<(), String> {
    use dualwrite_model::config::SideId;
    let t = Topics::new(&config.kafka.topic_prefix);
    let refuse = |why: String| Err(format!("topic `{topic}`: {why}"));
    for side in [SideId::Left, SideId::Right] {
        let name = &config.side(side).name;
        if topic == t.capture(name) {
            return match avro::decode::<ChangeRecord>(payload) {
                Ok(c) if &c.side == name => Ok(()),
                Ok(c) => refuse(format!(
                    "the record is a change of side `{}`, not `{name}`",
                    c.side
                )),
                Err(e) => refuse(format!("the record is not a captured change: {e}")),
            };
        }
        if topic == t.apply(name) {
            return match avro::decode::<ApplyWrite>(payload) {
                Ok(w) => dualwrite_model::authorise::authorise_write(config, side, &w)
                    .map(|_| ())
                    .or_else(|r| refuse(r.to_string())),
                Err(e) => refuse(format!("the record is not an apply record: {e}")),
            };
        }
    }
    if let Some(map) = config.maps.iter().find(|m| topic == t.map(&m.name)) {
        return match avro::decode::<MappedChange>(payload) {
            Ok(mc) if mc.map == map.name => Ok(()),
            Ok(mc) => refuse(format!(
                "the record is of map `{}`, not `{}`",
                mc.map, map.name
            )),
            Err(e) => refuse(format!("the record is not a mapped change: {e}")),
        };
    }
    if topic == t.control() {
        return refuse("records are never retried to the control topic".to_owned());
    }
    refuse(format!(
        "not a topic records are retried to (the capture, map and apply topics of prefix `{}`)",
        config.kafka.topic_prefix
    ))
}

/// A consumer of the events topic from the given end offsets on.
fn events_from(
    config: &Config,
    start: &[(i32, i64, i64)],
) -> Result<BaseConsumer<DwContext>, CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let consumer: BaseConsumer<DwContext> = client_config(&config.kafka, "dualwrite-ctl")
        .set("group.id", "dualwrite-ctl")
        .set("enable.auto.commit", "false")
        .create_with_context(DwContext)?;
    let mut tpl = TopicPartitionList::new();
    for (p, _, hi) in start {
        tpl.add_partition_offset(&t.events(), *p, Offset::Offset(*hi))?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::record::{ApplyOp, ChangeOp, ErrorRecord};

    fn config() -> Config {
        Config::parse(dualwrite_model::config::DEMO_CONFIG).unwrap()
    }

    fn mapped(map: &str) -> Vec<u8> {
        avro::encode(&MappedChange {
            map: map.into(),
            source_side: "fno".into(),
            target_side: "dataverse".into(),
            source_entity: "public.customers_v3".into(),
            target_entity: "public.accounts".into(),
            op: ApplyOp::Delete,
            key: vec![],
            values: vec![],
            source_lsn: 0,
            source_seq: 0,
            source_xid: 0,
            commit_time: 0,
            before: None,
            existed: true,
            conflict_master: None,
            own: vec![],
            version: 0,
            repair: None,
            moved: Vec::new(),
        })
        .unwrap()
    }

    #[test]
    fn records_are_retried_only_to_the_topic_that_reads_them() {
        let c = config();
        let p = &c.kafka.topic_prefix;
        let map = c.maps[0].name.clone();
        assert_eq!(
            retry_destination(&c, &format!("{p}.map.{map}"), &mapped(&map)),
            Ok(())
        );
        let change = avro::encode(&ChangeRecord {
            side: "fno".into(),
            entity: "public.x".into(),
            op: ChangeOp::Insert,
            before: None,
            after: None,
            commit_lsn: 0,
            seq: 0,
            xid: 0,
            applied: None,
            moved: None,
            commit_time: 0,
        })
        .unwrap();
        assert_eq!(
            retry_destination(&c, &format!("{p}.capture.fno"), &change),
            Ok(())
        );
        let e = retry_destination(&c, &format!("{p}.capture.dataverse"), &change).unwrap_err();
        assert!(e.contains("not `dataverse`"), "{e}");
        // The control topic, whatever the record, and topics outside the pipeline.
        let e = retry_destination(&c, &format!("{p}.control"), &mapped(&map)).unwrap_err();
        assert!(e.contains("never retried to the control topic"), "{e}");
        for other in [format!("{p}.status"), "elsewhere.map.x".to_owned()] {
            let e = retry_destination(&c, &other, &mapped(&map)).unwrap_err();
            assert!(e.contains("not a topic records are retried to"), "{e}");
        }
        // A record of another kind or map.
        let foreign = avro::encode(&ErrorRecord::new("x", "y", "z", 0)).unwrap();
        let e = retry_destination(&c, &format!("{p}.map.{map}"), &foreign).unwrap_err();
        assert!(e.contains("not a mapped change"), "{e}");
        let other = c.maps[1].name.clone();
        let e = retry_destination(&c, &format!("{p}.map.{map}"), &mapped(&other)).unwrap_err();
        assert!(e.contains(&format!("of map `{other}`")), "{e}");
        let e = retry_destination(&c, &format!("{p}.apply.fno"), &foreign).unwrap_err();
        assert!(e.contains("not an apply record"), "{e}");
    }
}
