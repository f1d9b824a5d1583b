//! Entity map lifecycle: states, the actions available in each (the
//! reference's table), control commands, status records and events, and the
//! order in which related maps run.
//!
//! | State        | Available actions |
//! |--------------|-------------------|
//! | Not running  | Run               |
//! | Initializing | none              |
//! | Running      | Stop, Pause       |
//! | Paused       | Run (resumes)     |
//! | Resuming     | none              |
//! | Failed       | Run, Stop         |
//!
//! Initializing → Running and Resuming → Running happen by themselves (the
//! initial write finished; the catch-up reached the end offsets taken when
//! the resume began); any state may turn Failed with a reason.
//!
//! Two actions extend the reference's table for the initial write:
//! `SkipInitialSync` (Initializing or Failed → Running: go straight to live
//! sync) and `RerunInitialSync` (Running or Failed → Initializing: copy again
//! after fixing data; rows that already match are not written).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::avro::{
    self, avro_record, CONTROL_COMMAND_AVSC, CONTROL_COMMAND_V1_AVSC, CONTROL_EVENT_AVSC,
    CONTROL_EVENT_V1_AVSC, CONTROL_EVENT_V2_AVSC,
};
use crate::avro::{MAP_STATUS_AVSC, MAP_STATUS_V1_AVSC};
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MapState {
    NotRunning,
    Initializing,
    Running,
    Paused,
    Resuming,
    Failed,
}

impl MapState {
    pub const ALL: [MapState; 6] = [
        MapState::NotRunning,
        MapState::Initializing,
        MapState::Running,
        MapState::Paused,
        MapState::Resuming,
        MapState::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            MapState::NotRunning => "Not running",
            MapState::Initializing => "Initializing",
            MapState::Running => "Running",
            MapState::Paused => "Paused",
            MapState::Resuming => "Resuming",
            MapState::Failed => "Failed",
        }
    }

    /// The operator actions available in this state.
    pub fn actions(self) -> &'static [Action] {
        match self {
            MapState::NotRunning => &[Action::Run],
            MapState::Initializing => &[Action::SkipInitialSync],
            MapState::Resuming => &[],
            MapState::Running => &[Action::Stop, Action::Pause, Action::RerunInitialSync],
            MapState::Paused => &[Action::Run],
            MapState::Failed => &[
                Action::Run,
                Action::Stop,
                Action::SkipInitialSync,
                Action::RerunInitialSync,
            ],
        }
    }

    /// Whether records of the map flow to the target in this state.
    pub fn flows(self) -> bool {
        matches!(self, MapState::Running | MapState::Resuming)
    }
}

impl fmt::Display for MapState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[serde(alias = "run")]
    Run,
    #[serde(alias = "pause")]
    Pause,
    #[serde(alias = "stop")]
    Stop,
    /// Ends an initialization (or a failed one) without copying: live sync.
    #[serde(alias = "skip_initial_sync")]
    SkipInitialSync,
    /// Copies pre-existing rows again (after fixing data).
    #[serde(alias = "rerun_initial_sync")]
    RerunInitialSync,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Run,
        Action::Pause,
        Action::Stop,
        Action::SkipInitialSync,
        Action::RerunInitialSync,
    ];
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Run => "Run",
            Action::Pause => "Pause",
            Action::Stop => "Stop",
            Action::SkipInitialSync => "SkipInitialSync",
            Action::RerunInitialSync => "RerunInitialSync",
        })
    }
}

/// The state an action leads to, or why it is not available.
pub fn next_state(state: MapState, action: Action) -> Result<MapState, String> {
    let next = match (state, action) {
        (MapState::NotRunning | MapState::Failed, Action::Run) => MapState::Initializing,
        (MapState::Paused, Action::Run) => MapState::Resuming,
        (MapState::Running, Action::Pause) => MapState::Paused,
        (MapState::Running | MapState::Failed, Action::Stop) => MapState::NotRunning,
        (MapState::Initializing | MapState::Failed, Action::SkipInitialSync) => MapState::Running,
        (MapState::Running | MapState::Failed, Action::RerunInitialSync) => MapState::Initializing,
        _ => {
            let available = state.actions();
            return Err(format!(
                "{action} is not available while the map is {state} (available: {})",
                if available.is_empty() {
                    "none".to_owned()
                } else {
                    available
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
    };
    debug_assert!(state.actions().contains(&action));
    Ok(next)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResumePolicy {
    /// Replay the queued changes in order, then Running (default).
    #[default]
    #[serde(alias = "catch_up")]
    CatchUp,
    /// Go live at once; the queued changes go to the catch-up errors topic.
    #[serde(alias = "skip_to_live")]
    SkipToLive,
    /// Go live at once and drop the queued changes.
    #[serde(alias = "discard")]
    Discard,
}

impl ResumePolicy {
    pub const ALL: [ResumePolicy; 3] = [
        ResumePolicy::CatchUp,
        ResumePolicy::SkipToLive,
        ResumePolicy::Discard,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResumePolicy::CatchUp => "catch_up",
            ResumePolicy::SkipToLive => "skip_to_live",
            ResumePolicy::Discard => "discard",
        }
    }

    /// The policy named `name` (`catch_up`, any case).
    pub fn from_name(name: &str) -> Option<ResumePolicy> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name))
    }
}

/// The resume policy on the status record: its name (`catch_up`, …), a
/// string in the schema; a name this version does not know reads as none.
mod policy_name {
    use super::ResumePolicy;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<ResumePolicy>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_some(p.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ResumePolicy>, D::Error> {
        let name = Option::<String>::deserialize(d)?;
        Ok(name.and_then(|n| ResumePolicy::from_name(&n)))
    }
}

/// An operator command (topic `<prefix>.control`, JSON or Avro).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlCommand {
    pub id: String,
    pub action: Action,
    pub map: String,
    #[serde(default)]
    pub include_related: bool,
    #[serde(default)]
    pub initial_sync: Option<bool>,
    #[serde(default)]
    pub conflict_master: Option<String>,
    #[serde(default)]
    pub order: Option<Vec<String>>,
    #[serde(default)]
    pub resume_policy: Option<ResumePolicy>,
    /// Who sent it, as the sender names them (recorded, not checked).
    #[serde(default)]
    pub sent_by: Option<String>,
}

impl ControlCommand {
    /// A command without options; the id is set when it is sent.
    pub fn new(action: Action, map: impl Into<String>) -> ControlCommand {
        ControlCommand {
            id: String::new(),
            action,
            map: map.into(),
            include_related: false,
            initial_sync: None,
            conflict_master: None,
            order: None,
            resume_policy: None,
            sent_by: None,
        }
    }
}

/// Largest command accepted.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Reads a command: Avro single-object encoding, or JSON.
pub fn parse_command(bytes: &[u8]) -> Result<ControlCommand, String> {
    if bytes.len() > MAX_COMMAND_BYTES {
        return Err(format!(
            "command is {} bytes, more than the {MAX_COMMAND_BYTES} allowed",
            bytes.len()
        ));
    }
    let cmd: ControlCommand = if bytes.starts_with(&[0xC3, 0x01]) {
        avro::decode(bytes).map_err(|e| format!("invalid Avro command: {e}"))?
    } else {
        serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON command: {e}"))?
    };
    if cmd.id.trim().is_empty() || cmd.id.len() > 200 {
        return Err("command id must be 1 to 200 characters".into());
    }
    Ok(cmd)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    pub partition: i32,
    pub offset: i64,
}

/// The state of a map (topic `<prefix>.status`, compacted, keyed by map).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapStatus {
    pub map: String,
    pub state: MapState,
    pub generation: i64,
    pub reason: Option<String>,
    pub last_command_id: Option<String>,
    pub last_action: Option<String>,
    pub initial_sync: bool,
    pub conflict_master: Option<String>,
    #[serde(with = "policy_name")]
    pub resume_policy: Option<ResumePolicy>,
    pub start_offsets: Vec<PartitionOffset>,
    pub resume_targets: Vec<PartitionOffset>,
    pub paused_at: Option<i64>,
    pub updated_at: i64,
    /// The latest initial write of this map (none before the first).
    #[serde(default)]
    pub initial: Option<InitialSync>,
    /// The mapping version ([`crate::version`]) the map runs with, recorded
    /// when it is run; `None` before the first run (and in older records).
    #[serde(default)]
    pub mapping_version: Option<String>,
}

/// Where an initial write stands. On the status topic it is its name, a
/// string in the schema, so that a phase a later version adds still reads
/// (as [`CopyPhase::Other`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum CopyPhase {
    /// For related maps or for the changes on their way.
    Waiting,
    Copying,
    Done,
    Skipped,
    Failed,
    Other(String),
}

impl CopyPhase {
    pub fn as_str(&self) -> &str {
        match self {
            CopyPhase::Waiting => "waiting",
            CopyPhase::Copying => "copying",
            CopyPhase::Done => "done",
            CopyPhase::Skipped => "skipped",
            CopyPhase::Failed => "failed",
            CopyPhase::Other(s) => s,
        }
    }

    /// Whether the copy is still to finish (waiting or copying).
    pub fn is_under_way(&self) -> bool {
        matches!(self, CopyPhase::Waiting | CopyPhase::Copying)
    }
}

impl From<String> for CopyPhase {
    fn from(s: String) -> CopyPhase {
        match s.as_str() {
            "waiting" => CopyPhase::Waiting,
            "copying" => CopyPhase::Copying,
            "done" => CopyPhase::Done,
            "skipped" => CopyPhase::Skipped,
            "failed" => CopyPhase::Failed,
            _ => CopyPhase::Other(s),
        }
    }
}

impl From<CopyPhase> for String {
    fn from(p: CopyPhase) -> String {
        p.as_str().to_owned()
    }
}

impl fmt::Display for CopyPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Progress and result of one initial write (a run id per attempt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitialSync {
    /// Run id: 1 for the first initial write of the map, +1 for each rerun.
    pub run: i64,
    pub phase: CopyPhase,
    /// Rows on both sides to read (left + right), as counted at the snapshots.
    pub rows_total: i64,
    /// Rows read so far, both sides.
    pub rows_done: i64,
    /// Target records created, updated, left as they were (already equal, or
    /// changed after the snapshot: live sync carries those), and failed.
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub failed: i64,
    /// Last key copied (values in key order); the copy resumes after it.
    pub checkpoint: Option<Vec<String>>,
    /// The snapshots the copy read, one per (re)start after a crash; each
    /// covers the keys after `after_key` (up to the next segment's).
    pub segments: Vec<SnapshotSegment>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

impl InitialSync {
    pub fn new(run: i64, now: i64) -> InitialSync {
        InitialSync {
            run,
            phase: CopyPhase::Waiting,
            rows_total: 0,
            rows_done: 0,
            created: 0,
            updated: 0,
            unchanged: 0,
            failed: 0,
            checkpoint: None,
            segments: Vec::new(),
            started_at: now,
            finished_at: None,
        }
    }

    /// Whether the change of a record with `key` (values in key order) from
    /// the left or right side, committed at `lsn` by transaction `xid`, is
    /// already part of what the copy read: if it has not reached the other
    /// side yet, the copy leaves its record to live sync.
    pub fn covers(&self, key: &[Option<&str>], left: bool, lsn: i64, xid: i64) -> bool {
        if xid == 0 {
            // Values read at their own time (a repair, a retry): always newer.
            return false;
        }
        let Some(seg) = self
            .segments
            .iter()
            .rev()
            .find(|s| s.after_key.as_ref().is_none_or(|a| key_after(key, a)))
        else {
            return false;
        };
        let snap = if left { &seg.left } else { &seg.right };
        snap.contains(lsn, xid)
    }
}

/// Whether `key` sorts after `after` (byte order of each value, the order
/// the copy reads rows in).
fn key_after(key: &[Option<&str>], after: &[String]) -> bool {
    let k: Vec<&[u8]> = key.iter().map(|v| v.unwrap_or("").as_bytes()).collect();
    let a: Vec<&[u8]> = after.iter().map(|v| v.as_bytes()).collect();
    k > a
}

/// The keys after `after_key` were read from these snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSegment {
    pub after_key: Option<Vec<String>>,
    pub left: SideSnapshot,
    pub right: SideSnapshot,
}

/// A PostgreSQL snapshot (`pg_current_snapshot()`) and the WAL insert
/// position read with it: every transaction that commits later ends after
/// `lsn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideSnapshot {
    pub xmin: i64,
    pub xmax: i64,
    pub xip: Vec<i64>,
    pub lsn: i64,
}

impl SideSnapshot {
    /// Parses `xmin:xmax:xip,…` (64-bit transaction ids).
    pub fn parse(text: &str, lsn: i64) -> Option<SideSnapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<i64>>>()?,
        };
        Some(SideSnapshot {
            xmin,
            xmax,
            xip,
            lsn,
        })
    }

    /// Whether a transaction that committed at `lsn` with the 32-bit id
    /// `xid` (as logical decoding reports it) is visible in the snapshot.
    pub fn contains(&self, lsn: i64, xid: i64) -> bool {
        if lsn > self.lsn {
            return false;
        }
        // Widen the 32-bit id to the epoch nearest the snapshot's xmax.
        let xid32 = xid & 0xFFFF_FFFF;
        let mut full = (self.xmax & !0xFFFF_FFFF) | xid32;
        if full > self.xmax + (1 << 31) {
            full -= 1 << 32;
        } else if full + (1 << 31) < self.xmax {
            full += 1 << 32;
        }
        if full < self.xmin {
            return true;
        }
        full < self.xmax && !self.xip.contains(&full)
    }
}

impl MapStatus {
    /// A map never run: Not running, generation 0.
    pub fn initial(map: &str, now: i64) -> MapStatus {
        MapStatus {
            map: map.to_owned(),
            state: MapState::NotRunning,
            generation: 0,
            reason: None,
            last_command_id: None,
            last_action: None,
            initial_sync: true,
            conflict_master: None,
            resume_policy: None,
            start_offsets: Vec::new(),
            resume_targets: Vec::new(),
            paused_at: None,
            updated_at: now,
            initial: None,
            mapping_version: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Accepted,
    Rejected,
    Completed,
    Failed,
    StateChanged,
    /// The drift detector found records that differ between the sides.
    Drift,
}

/// An acknowledgement or a state change (topic `<prefix>.events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlEvent {
    pub command_id: Option<String>,
    pub outcome: Outcome,
    pub map: Option<String>,
    pub state: Option<String>,
    pub maps: Vec<String>,
    pub message: String,
    pub at: i64,
    /// Who sent the command the event answers (as the command says).
    #[serde(default)]
    pub sent_by: Option<String>,
}

/// The maps `map` depends on, transitively (not itself), in config order.
pub fn dependencies(config: &Config, map: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![map.to_owned()];
    while let Some(m) = stack.pop() {
        if let Some(mc) = config.map(&m) {
            for d in &mc.depends_on {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
    }
    seen.remove(map);
    config
        .maps
        .iter()
        .map(|m| m.name.clone())
        .filter(|n| seen.contains(n))
        .collect()
}

/// The maps that depend on `map` (directly or not), dependents first:
/// the order in which to pause them before `map`.
pub fn dependents(config: &Config, map: &str) -> Vec<String> {
    let set: Vec<String> = config
        .maps
        .iter()
        .map(|m| m.name.clone())
        .filter(|m| dependencies(config, m).iter().any(|d| d == map))
        .collect();
    let mut order = topological(config, &set);
    order.reverse();
    order
}

/// The maps a command acts on, in the order to act: the map alone, or with
/// its dependencies, dependencies first. With related maps, the operator's
/// `order` may name some of them (those left out are not acted on, as in
/// the reference's Run dialog where related maps can be unticked); it must
/// name the map itself and run every map after those it depends on.
pub fn command_order(
    config: &Config,
    map: &str,
    include_related: bool,
    order: Option<&[String]>,
) -> Result<Vec<String>, String> {
    if config.map(map).is_none() {
        return Err(format!("unknown map `{map}`"));
    }
    let mut set: Vec<String> = Vec::new();
    if include_related {
        set.extend(dependencies(config, map));
    }
    set.push(map.to_owned());
    let Some(order) = order else {
        return Ok(topological(config, &set));
    };
    let wanted: BTreeSet<&str> = set.iter().map(String::as_str).collect();
    let given: BTreeSet<&str> = order.iter().map(String::as_str).collect();
    if given.len() != order.len() {
        return Err("order names a map more than once".into());
    }
    if let Some(extra) = given.difference(&wanted).next() {
        return Err(format!(
            "order names `{extra}`, which is not among the maps this command acts on ({})",
            set.join(", ")
        ));
    }
    if !given.contains(map) {
        return Err(format!(
            "order leaves out `{map}`, the map the command is for"
        ));
    }
    for (i, m) in order.iter().enumerate() {
        for d in &config
            .map(m)
            .map(|c| c.depends_on.clone())
            .unwrap_or_default()
        {
            if let Some(j) = order.iter().position(|x| x == d) {
                if j > i {
                    return Err(format!(
                        "inconsistent order: `{m}` depends on `{d}`, so `{d}` must come first"
                    ));
                }
            }
        }
    }
    Ok(order.to_vec())
}

/// Dependencies first; otherwise the order of the configuration file.
fn topological(config: &Config, set: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut left: Vec<&String> = config
        .maps
        .iter()
        .map(|m| &m.name)
        .filter(|n| set.contains(n))
        .collect();
    while !left.is_empty() {
        // Config validation rules out cycles, so some map is always ready.
        let pos = left
            .iter()
            .position(|m| {
                config.map(m).is_none_or(|c| {
                    c.depends_on
                        .iter()
                        .all(|d| !set.contains(d) || out.contains(d))
                })
            })
            .unwrap_or(0);
        out.push(left.remove(pos).clone());
    }
    out
}

avro_record!(ControlCommand, "ControlCommand", CONTROL_COMMAND_AVSC, legacy CONTROL_COMMAND_V1_AVSC);
avro_record!(MapStatus, "MapStatus", MAP_STATUS_AVSC, legacy MAP_STATUS_V1_AVSC);
avro_record!(
    ControlEvent,
    "ControlEvent",
    CONTROL_EVENT_AVSC,
    legacy CONTROL_EVENT_V1_AVSC,
    CONTROL_EVENT_V2_AVSC
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro::AvroRecord;
    use proptest::prelude::*;

    #[test]
    fn lifecycle_records_round_trip() {
        let mut st = MapStatus::initial("customers", 7);
        st.state = MapState::Resuming;
        st.resume_targets = vec![PartitionOffset {
            partition: 2,
            offset: 99,
        }];
        st.paused_at = Some(5);
        st.reason = Some("r".into());
        st.resume_policy = Some(ResumePolicy::SkipToLive);
        assert_eq!(
            avro::decode::<MapStatus>(&avro::encode(&st).unwrap()).unwrap(),
            st
        );
        let mut init = InitialSync::new(3, 9);
        init.checkpoint = Some(vec!["C1".into(), "x".into()]);
        init.segments.push(SnapshotSegment {
            after_key: None,
            left: SideSnapshot::parse("5:9:6,7", 100).unwrap(),
            right: SideSnapshot::parse("1:1:", 200).unwrap(),
        });
        st.initial = Some(init);
        assert_eq!(
            avro::decode::<MapStatus>(&avro::encode(&st).unwrap()).unwrap(),
            st
        );
        let ev = ControlEvent {
            command_id: Some("c".into()),
            outcome: Outcome::Rejected,
            map: None,
            state: Some("Paused".into()),
            maps: vec!["a".into(), "b".into()],
            message: "m".into(),
            at: 1,
            sent_by: Some("console: ana".into()),
        };
        assert_eq!(
            avro::decode::<ControlEvent>(&avro::encode(&ev).unwrap()).unwrap(),
            ev
        );
        let cmd = ControlCommand {
            id: "x".into(),
            action: Action::Stop,
            map: "m".into(),
            include_related: false,
            initial_sync: Some(false),
            conflict_master: None,
            order: None,
            resume_policy: Some(ResumePolicy::Discard),
            sent_by: Some("ctl: ana".into()),
        };
        assert_eq!(
            avro::decode::<ControlCommand>(&avro::encode(&cmd).unwrap()).unwrap(),
            cmd
        );
    }

    /// `record` written with the older schema `old`, without `field`.
    #[allow(deprecated)] // to_avro_datum: as the releases before wrote
    fn written_before<T: AvroRecord + Serialize>(
        record: &T,
        old: &avro::Compiled,
        field: &str,
    ) -> Vec<u8> {
        let apache_avro::types::Value::Record(mut fields) = apache_avro::to_value(record).unwrap()
        else {
            panic!("a record")
        };
        fields.retain(|(n, _)| n != field);
        let value = apache_avro::types::Value::Record(fields)
            .resolve(old.schema)
            .unwrap();
        let mut bytes = avro::MAGIC.to_vec();
        bytes.extend_from_slice(&old.fingerprint);
        bytes.extend(apache_avro::to_avro_datum(old.schema, value).unwrap());
        bytes
    }

    /// Commands and events written before `sent_by` existed still read.
    #[test]
    fn commands_and_events_without_a_sender_still_decode() {
        let cmd = ControlCommand::new(Action::Pause, "customers");
        let old = &ControlCommand::legacy()[0];
        assert_eq!(
            avro::decode::<ControlCommand>(&written_before(&cmd, old, "sent_by")).unwrap(),
            cmd
        );
        let ev = ControlEvent {
            command_id: Some("c".into()),
            outcome: Outcome::Accepted,
            map: Some("customers".into()),
            state: None,
            maps: vec!["customers".into()],
            message: "accepted".into(),
            at: 1,
            sent_by: None,
        };
        let old = &ControlEvent::legacy()[1];
        assert_eq!(
            avro::decode::<ControlEvent>(&written_before(&ev, old, "sent_by")).unwrap(),
            ev
        );
    }

    /// A status record written before `mapping_version` existed still
    /// reads, without a version.
    #[test]
    fn older_status_records_still_decode() {
        let old = &MapStatus::legacy()[0];
        let mut st = MapStatus::initial("customers", 7);
        st.state = MapState::Paused;
        st.initial = Some(InitialSync::new(2, 3));
        let bytes = written_before(&st, old, "mapping_version");
        assert_eq!(avro::decode::<MapStatus>(&bytes).unwrap(), st);
        st.mapping_version = Some("a820a787357b".into());
        assert_eq!(
            avro::decode::<MapStatus>(&avro::encode(&st).unwrap()).unwrap(),
            st
        );
        assert_ne!(old.fingerprint, MapStatus::schema().fingerprint);
    }

    /// Phases and resume policies are names on the status topic: every
    /// one reads back, and one this version does not know is kept (a
    /// phase) or read as none (a policy), never an unreadable status.
    #[test]
    fn phases_and_policies_travel_as_their_names() {
        let mut st = MapStatus::initial("customers", 7);
        for name in [
            "waiting",
            "copying",
            "done",
            "skipped",
            "failed",
            "verifying",
        ] {
            let mut init = InitialSync::new(1, 2);
            init.phase = CopyPhase::from(name.to_owned());
            assert_eq!(init.phase.as_str(), name);
            st.initial = Some(init);
            assert_eq!(
                avro::decode::<MapStatus>(&avro::encode(&st).unwrap()).unwrap(),
                st
            );
        }
        assert_eq!(
            CopyPhase::from("verifying".to_owned()),
            CopyPhase::Other("verifying".into())
        );
        for p in ResumePolicy::ALL {
            st.resume_policy = Some(p);
            assert_eq!(
                avro::decode::<MapStatus>(&avro::encode(&st).unwrap()).unwrap(),
                st
            );
            assert_eq!(ResumePolicy::from_name(&p.as_str().to_uppercase()), Some(p));
        }
        assert_eq!(ResumePolicy::from_name("later"), None);
    }

    proptest! {
        /// Random bodies behind each lifecycle record's own marker and
        /// fingerprint: an error or a record, never a panic.
        #[test]
        fn any_body_behind_a_valid_header_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
            use avro::framed;
            let _ = avro::decode::<ControlCommand>(&framed::<ControlCommand>(&body));
            let _ = avro::decode::<ControlEvent>(&framed::<ControlEvent>(&body));
            let _ = avro::decode::<MapStatus>(&framed::<MapStatus>(&body));
        }
    }

    fn config() -> Config {
        Config::parse(crate::config::DEMO_CONFIG).unwrap()
    }

    fn state() -> impl Strategy<Value = MapState> {
        prop::sample::select(MapState::ALL.to_vec())
    }
    fn action() -> impl Strategy<Value = Action> {
        prop::sample::select(Action::ALL.to_vec())
    }

    /// The reference's table, written out independently of `next_state`.
    fn table(s: MapState, a: Action) -> Option<MapState> {
        use Action::*;
        use MapState::*;
        match (s, a) {
            (NotRunning, Run) => Some(Initializing),
            (Running, Stop) => Some(NotRunning),
            (Running, Pause) => Some(Paused),
            (Paused, Run) => Some(Resuming),
            (Failed, Run) => Some(Initializing),
            (Failed, Stop) => Some(NotRunning),
            (Initializing | Failed, SkipInitialSync) => Some(Running),
            (Running | Failed, RerunInitialSync) => Some(Initializing),
            _ => None,
        }
    }

    proptest! {
        #[test]
        fn every_action_in_every_state_follows_the_table(s in state(), a in action()) {
            match (next_state(s, a), table(s, a)) {
                (Ok(n), Some(t)) => prop_assert_eq!(n, t),
                (Err(reason), None) => {
                    prop_assert!(reason.contains(&a.to_string()) && reason.contains(s.label()), "{}", reason);
                    prop_assert!(!s.actions().contains(&a));
                }
                (got, want) => prop_assert!(false, "{:?} {:?}: got {:?}, table says {:?}", s, a, got, want),
            }
        }

        /// Random walks: only Running and Resuming let records flow, and
        /// the available actions are exactly those that succeed.
        #[test]
        fn random_walks_stay_within_the_table(actions in prop::collection::vec(action(), 0..40)) {
            let mut s = MapState::NotRunning;
            for a in actions {
                let ok: Vec<Action> = Action::ALL.into_iter().filter(|x| next_state(s, *x).is_ok()).collect();
                prop_assert_eq!(ok.as_slice().len(), s.actions().len());
                if let Ok(n) = next_state(s, a) {
                    s = n;
                    // The automatic steps.
                    if s == MapState::Initializing || s == MapState::Resuming {
                        prop_assert!(s.actions().iter().all(|a| *a == Action::SkipInitialSync));
                        s = MapState::Running;
                    }
                }
            }
        }

        #[test]
        fn json_commands_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_command(&bytes);
        }
    }

    #[test]
    fn snapshots_tell_older_changes_from_newer_ones() {
        let s = SideSnapshot::parse("100:110:103,105", 5000).unwrap();
        assert_eq!(s.xip, [103, 105]);
        assert!(s.contains(4000, 99), "committed before xmin");
        assert!(s.contains(4000, 104), "between, not in progress");
        assert!(!s.contains(4000, 103), "in progress at the snapshot");
        assert!(!s.contains(4000, 110), "started after the snapshot");
        assert!(!s.contains(5001, 50), "committed after the position");
        // Ids widen to the snapshot's epoch.
        let e = SideSnapshot::parse(&format!("{}:{}:", (3i64 << 32) + 10, (3i64 << 32) + 20), 9)
            .unwrap();
        assert!(e.contains(1, 15) && !e.contains(1, 25));
        let wrap =
            SideSnapshot::parse(&format!("{}:{}:", (3i64 << 32) + 5, (3i64 << 32) + 8), 9).unwrap();
        assert!(wrap.contains(1, 0xFFFF_FFF0), "previous epoch");
        assert!(SideSnapshot::parse("1:2", 0).is_none());

        let mut run = InitialSync::new(1, 0);
        let snap = |xmax: i64| SideSnapshot {
            xmin: xmax,
            xmax,
            xip: vec![],
            lsn: 100,
        };
        run.segments.push(SnapshotSegment {
            after_key: None,
            left: snap(10),
            right: snap(10),
        });
        run.segments.push(SnapshotSegment {
            after_key: Some(vec!["M".into()]),
            left: snap(20),
            right: snap(20),
        });
        assert!(run.covers(&[Some("A")], true, 50, 9));
        assert!(
            !run.covers(&[Some("A")], true, 50, 15),
            "first segment's snapshot"
        );
        assert!(
            run.covers(&[Some("N")], false, 50, 15),
            "second segment's snapshot"
        );
        assert!(
            !run.covers(&[Some("N")], false, 50, 0),
            "re-asserts always pass"
        );
        assert!(!InitialSync::new(2, 0).covers(&[Some("A")], true, 1, 1));
    }

    #[test]
    fn json_and_avro_commands_parse() {
        let j = br#"{"id":"c1","action":"run","map":"customers","include_related":true,"order":["currencies","customer_groups","customers"],"resume_policy":"skip_to_live"}"#;
        let c = parse_command(j).unwrap();
        assert_eq!(c.action, Action::Run);
        assert!(c.include_related);
        assert_eq!(c.resume_policy, Some(ResumePolicy::SkipToLive));
        let a = avro::encode(&c).unwrap();
        assert_eq!(parse_command(&a).unwrap(), c);
        let upper = br#"{"id":"c2","action":"PAUSE","map":"customers"}"#;
        assert_eq!(parse_command(upper).unwrap().action, Action::Pause);
    }

    #[test]
    fn bad_commands_say_why() {
        let e = parse_command(br#"{"id":"c","action":"explode","map":"m"}"#).unwrap_err();
        assert!(e.contains("unknown variant `explode`"), "{e}");
        let e = parse_command(br#"{"id":"c","action":"run","map":"m","colour":1}"#).unwrap_err();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = parse_command(br#"{"id":"c","action":"run","map":"m","include_related":"yes"}"#)
            .unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = parse_command(br#"{"id":"","action":"run","map":"m"}"#).unwrap_err();
        assert!(e.contains("id"), "{e}");
        let e = parse_command(b"{not json").unwrap_err();
        assert!(e.starts_with("invalid JSON command"), "{e}");
        let big = vec![b' '; MAX_COMMAND_BYTES + 1];
        assert!(parse_command(&big).unwrap_err().contains("more than"));
    }

    #[test]
    fn related_maps_run_dependencies_first() {
        let c = config();
        assert_eq!(
            dependencies(&c, "contacts"),
            ["customer_groups", "currencies", "customers"]
        );
        assert_eq!(
            command_order(&c, "contacts", true, None).unwrap(),
            ["customer_groups", "currencies", "customers", "contacts"]
        );
        assert_eq!(
            command_order(&c, "customers", false, None).unwrap(),
            ["customers"]
        );
        let order: Vec<String> = ["currencies", "customer_groups", "customers"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            command_order(&c, "customers", true, Some(&order)).unwrap(),
            order
        );
    }

    #[test]
    fn inconsistent_orders_are_rejected() {
        let c = config();
        let bad: Vec<String> = ["customers", "currencies", "customer_groups"]
            .map(String::from)
            .to_vec();
        let e = command_order(&c, "customers", true, Some(&bad)).unwrap_err();
        assert!(
            e.contains("inconsistent order: `customers` depends on"),
            "{e}"
        );
        // Related maps left out are not acted on; the map itself must be there.
        let short: Vec<String> = ["currencies", "customers"].map(String::from).to_vec();
        assert_eq!(
            command_order(&c, "customers", true, Some(&short)).unwrap(),
            short
        );
        let headless: Vec<String> = ["currencies"].map(String::from).to_vec();
        assert!(command_order(&c, "customers", true, Some(&headless))
            .unwrap_err()
            .contains("leaves out `customers`"));
        let extra: Vec<String> = ["contacts", "customer_groups", "currencies", "customers"]
            .map(String::from)
            .to_vec();
        assert!(command_order(&c, "customers", true, Some(&extra))
            .unwrap_err()
            .contains("`contacts`"));
        assert!(command_order(&c, "nope", false, None)
            .unwrap_err()
            .contains("unknown map `nope`"));
    }
}
