//! Operator CLI (`dualwrite ctl …`). It talks only to Kafka, but for
//! [`verify`], which reads both sides' databases.

pub mod verify;

use std::io::Write;
use std::time::Duration;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use dualwrite_model::avro::{self, AvroRecord};
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{
    dependencies, ControlCommand, ControlEvent, MapState, MapStatus, Outcome,
};
use dualwrite_model::record::{ChangeRecord, ErrorRecord, InitialSyncError, MappedChange};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::Message;
use dualwrite_runtime::kafka::rdkafka::producer::{
    BaseRecord, DefaultProducerContext, Producer, ThreadedProducer,
};
use dualwrite_runtime::kafka::rdkafka::{Offset, TopicPartitionList};
use dualwrite_runtime::kafka::{self as kafka_rt};
use dualwrite_runtime::kafka::{client_config, DwContext};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{0}")]
    Usage(String),
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
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
            "{}\tChangeRecord: committed changes captured on {side}",
            t.capture(side)
        )?;
    }
    for m in &config.maps {
        writeln!(
            out,
            "{}\tMappedChange: map {}, both directions, keyed by alternate key",
            t.map(&m.name),
            m.name
        )?;
    }
    for side in [&config.sides.left.name, &config.sides.right.name] {
        writeln!(
            out,
            "{}\tMappedChange: released by the pause buffer, applied to {side}",
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
    let t = Topics::new(&config.kafka.topic_prefix);
    let (topic, printer): (String, fn(&[u8]) -> String) = match which.split_once(':') {
        None if which == "errors" => (t.errors(), render::<ErrorRecord>),
        Some(("capture", side)) => (t.capture(side), render::<ChangeRecord>),
        Some(("map", map)) => (t.map(map), render::<MappedChange>),
        Some(("apply", side)) => (t.apply(side), render::<MappedChange>),
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
    };
    let consumer: BaseConsumer<DwContext> = client_config(&config.kafka, "dualwrite-ctl")
        .set("group.id", "dualwrite-ctl")
        .set("enable.auto.commit", "false")
        .create_with_context(DwContext)?;
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for tm in md.topics() {
        for p in tm.partitions() {
            tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
        }
    }
    if tpl.count() == 0 {
        return Err(CtlError::Usage(format!("topic {topic} does not exist")));
    }
    // What the topic holds now is always printed (however slow the first
    // fetch); after that, new records until nothing arrives for `idle`.
    let mut pending: BTreeMap<i32, i64> = BTreeMap::new();
    for p in tpl.elements() {
        let (lo, hi) = consumer.fetch_watermarks(&topic, p.partition(), Duration::from_secs(10))?;
        if hi > lo {
            pending.insert(p.partition(), hi);
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
#[derive(Debug, serde::Serialize)]
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
}

/// A short summary of an initial sync for the maps table.
fn initial_summary(i: &dualwrite_model::lifecycle::InitialSync) -> String {
    match i.phase.as_str() {
        "copying" if i.rows_total > 0 => format!(
            "copying {}%",
            (i.rows_done * 100 / i.rows_total).clamp(0, 100)
        ),
        "done" if i.failed > 0 => format!("done, {} failed", i.failed),
        phase => phase.to_owned(),
    }
}

/// The latest status of each map on the status topic.
pub fn read_statuses(config: &Config) -> Result<BTreeMap<String, MapStatus>, CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let mut out = BTreeMap::new();
    for m in kafka_rt::read_to_end(&config.kafka, &t.status())? {
        if let Some(Ok(s)) = m.payload().map(avro::decode::<MapStatus>) {
            out.insert(s.map.clone(), s);
        }
    }
    Ok(out)
}

/// Every configured map with its state and backlog.
pub fn map_rows(config: &Config) -> Result<Vec<MapRow>, CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let statuses = read_statuses(config)?;
    let mut rows = Vec::new();
    for m in &config.maps {
        let status = statuses.get(&m.name);
        let topic = t.map(&m.name);
        let marks = kafka_rt::watermarks(&config.kafka, &topic)?;
        let group: BaseConsumer<DwContext> = client_config(&config.kafka, "dualwrite-ctl")
            .set("group.id", t.group(&format!("pause-buffer.{}", m.name)))
            .set("enable.auto.commit", "false")
            .create_with_context(DwContext)?;
        let mut tpl = TopicPartitionList::new();
        for (p, _, _) in &marks {
            tpl.add_partition(&topic, *p);
        }
        let committed = group.committed_offsets(tpl, Duration::from_secs(10))?;
        let backlog = marks
            .iter()
            .map(|(p, lo, hi)| {
                let pos = match committed.find_partition(&topic, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => *lo,
                };
                (hi - pos).max(0)
            })
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
        "{:<20} {:<13} {:>4} {:>9}  {:<16} {:<12}  DEPENDS ON",
        "MAP", "STATE", "GEN", "BACKLOG", "INITIAL SYNC", "VERSION"
    )?;
    for r in rows {
        // The running version; `running→configured` when the file has another.
        let version = match &r.mapping_version {
            None => "-".to_owned(),
            Some(v) if *v == r.configured_version => v.clone(),
            Some(v) => format!("{v}→{}", r.configured_version),
        };
        writeln!(
            out,
            "{:<20} {:<13} {:>4} {:>9}  {:<16} {:<12}  {}",
            r.map,
            r.state,
            r.generation,
            r.backlog,
            r.initial_sync.as_deref().unwrap_or("-"),
            version,
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

/// What happened to a command.
#[derive(Debug, PartialEq, Eq)]
pub enum CommandResult {
    Completed,
    Rejected(String),
    Failed(String),
    /// Accepted, not completed within the wait (e.g. a long catch-up).
    Pending,
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
    let t = Topics::new(&config.kafka.topic_prefix);
    if cmd.action == dualwrite_model::lifecycle::Action::Run {
        let deps = dependencies(config, &cmd.map);
        if !deps.is_empty() {
            writeln!(
                out,
                "related maps of {}: {}{}",
                cmd.map,
                deps.join(", "),
                if cmd.include_related {
                    " (run together, dependencies first)"
                } else {
                    " (add --include-related to run them too)"
                }
            )?;
        }
    }
    let start = kafka_rt::watermarks(&config.kafka, &t.events())?;
    let payload = avro::encode(cmd).map_err(|e| CtlError::Usage(e.to_string()))?;
    let producer: ThreadedProducer<DefaultProducerContext> =
        client_config(&config.kafka, "dualwrite-ctl")
            .set("acks", "all")
            .create()?;
    producer
        .send(BaseRecord::to(&t.control()).key(&cmd.id).payload(&payload))
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(30))?;
    writeln!(out, "sent {} {} (id {})", cmd.action, cmd.map, cmd.id)?;
    if wait.is_zero() {
        return Ok(CommandResult::Pending);
    }
    let consumer = events_from(config, &start)?;
    let deadline = Instant::now() + wait;
    let mut pending: Option<BTreeSet<String>> = None;
    while Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
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
        match ev.outcome {
            Outcome::Rejected => return Ok(CommandResult::Rejected(ev.message)),
            Outcome::Failed => return Ok(CommandResult::Failed(ev.message)),
            Outcome::Accepted => pending = Some(ev.maps.iter().cloned().collect()),
            Outcome::Completed => match pending.as_mut() {
                // A duplicate id completes without being accepted again.
                None => return Ok(CommandResult::Completed),
                Some(p) => {
                    if let Some(map) = &ev.map {
                        p.remove(map);
                    }
                    if p.is_empty() {
                        return Ok(CommandResult::Completed);
                    }
                }
            },
            Outcome::StateChanged => {}
        }
    }
    Ok(CommandResult::Pending)
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
        let m = m?;
        last = Instant::now();
        if let Some(Ok(ev)) = m.payload().map(avro::decode::<ControlEvent>) {
            writeln!(
                out,
                "{:<13} {:<16} {:<13} {:<28} {}",
                outcome_label(ev.outcome),
                ev.map.as_deref().unwrap_or("-"),
                ev.state.as_deref().unwrap_or(""),
                ev.command_id.as_deref().unwrap_or("-"),
                ev.message
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
    }
}

/// Sends the changes a skip-to-live resume set aside for `map` (all, or
/// those whose key is in `keys`) back through the map's topic. The applier
/// skips any that a later change of the same record has overtaken, so a
/// retry never regresses a record and may be repeated. Returns how many
/// were sent.
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
    let producer: ThreadedProducer<DefaultProducerContext> =
        client_config(&config.kafka, "dualwrite-ctl")
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .create()?;
    for (topic, key, payload) in records {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    KafkaError::MessageProduction(
                        dualwrite_runtime::kafka::rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
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
/// topic they were read from, once the cause is fixed. Records whose change
/// a later one has overtaken are skipped by the applier, so a retry never
/// regresses a record. Returns (sent, not retryable).
pub fn retry_errors(
    config: &Config,
    filter: &ErrorFilter,
    out: &mut impl Write,
) -> Result<(usize, usize), CtlError> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let mut records = Vec::new();
    let mut not_retryable = 0;
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
        match (e.topic, e.payload) {
            (Some(topic), Some(payload)) => {
                records.push((topic, e.key.unwrap_or_default(), payload))
            }
            _ => not_retryable += 1,
        }
    }
    republish(config, &records)?;
    writeln!(
        out,
        "sent {} record(s) back to the topics they came from; {not_retryable} matching error(s) carry no record to retry",
        records.len()
    )?;
    Ok((records.len(), not_retryable))
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
