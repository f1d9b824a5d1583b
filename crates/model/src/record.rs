//! The records that flow on the topics. Each has an Avro schema in `schemas/`.
//! The records of changes declare their fields in their schema's order:
//! [`crate::avro::encode`] writes them straight from serde, in this order
//! (its tests check each).

use serde::{Deserialize, Serialize};

/// A column (or mapped field) and its value in PostgreSQL's text form; `None` is SQL NULL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    pub value: Option<String>,
}

impl Field {
    pub fn new(name: impl Into<String>, value: Option<impl Into<String>>) -> Field {
        Field {
            name: name.into(),
            value: value.map(Into::into),
        }
    }
}

/// Finds a field by name.
pub fn field<'a>(fields: &'a [Field], name: &str) -> Option<&'a Field> {
    fields.iter().find(|f| f.name == name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChangeOp {
    Insert,
    Update,
    Delete,
    /// The side's applier committed a write of the resolver (see [`Applied`]).
    Applied,
    /// The side's applier moved a record to this alternate key, its
    /// values untouched, for a key change made on the other side; `after`
    /// holds the row as moved. Not a write of the side: it tells what the
    /// side holds.
    Moved,
}

/// Which write of the resolver an applier handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub map: String,
    pub version: i64,
    /// False: not made, the side not being in the expected state (superseded).
    #[serde(default = "yes")]
    pub written: bool,
}

fn yes() -> bool {
    true
}

/// A committed write of one row on one side (topic `<prefix>.capture.<side>`):
/// made on the side itself, or the side's applier reporting a committed
/// write ([`ChangeOp::Applied`]; `before` then holds the alternate key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub side: String,
    /// `schema.table`.
    pub entity: String,
    pub op: ChangeOp,
    /// Old values (update, delete), of the columns the side's maps read
    /// only: the alternate key and scope columns and, for an update, the
    /// read columns `after` leaves out (unchanged TOASTed values).
    pub before: Option<Vec<Field>>,
    /// New values (insert, update) of the columns the side's maps read.
    pub after: Option<Vec<Field>>,
    /// End LSN of the commit record of the source transaction.
    pub commit_lsn: i64,
    /// Position of the change within its transaction.
    pub seq: i32,
    pub xid: i64,
    /// [`ChangeOp::Applied`] only.
    #[serde(default)]
    pub applied: Option<Applied>,
    /// One half of an update that changed the alternate key (a delete of
    /// the old key, an insert of the new one): the other half's key.
    #[serde(default)]
    pub moved: Option<Vec<Field>>,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApplyOp {
    Upsert,
    Delete,
    /// From earlier versions (a request to re-assert); ignored.
    Reassert,
    /// The source side's applier committed the write of `version`.
    Applied,
    /// An operator's repair (see [`Repair`]).
    Repair,
    /// The source side's applier did not make the write of `version`: the
    /// side was not in the state the resolver expected.
    Superseded,
    /// The source side's applier moved a record to this key for a key
    /// change of the other side (see [`ChangeOp::Moved`]); `own` holds the
    /// row as moved.
    Moved,
}

/// One event of a record for the resolver (topic `<prefix>.map.<map>`):
/// a write of the source side mapped into the target's names, the source
/// side's applier reporting a committed write, or a repair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedChange {
    pub map: String,
    pub source_side: String,
    pub target_side: String,
    pub source_entity: String,
    pub target_entity: String,
    pub op: ApplyOp,
    /// Alternate key of the target record, in the map's key order.
    pub key: Vec<Field>,
    /// Mapped values (target names); empty for a delete.
    pub values: Vec<Field>,
    pub source_lsn: i64,
    pub source_seq: i32,
    pub source_xid: i64,
    /// Source commit time, microseconds since the Unix epoch.
    pub commit_time: i64,
    /// The fields that sync both ways (target names) as the source had them
    /// before this change (for a record new on the source: its new values);
    /// `None` when unknown (no conflict detection).
    pub before: Option<Vec<Field>>,
    /// Whether the record existed on the source before this change.
    pub existed: bool,
    /// Side whose values win a conflict.
    pub conflict_master: Option<String>,
    /// Upsert: the source side's own values (its names) of the columns the
    /// other side writes into it, as it has them after the write.
    #[serde(default)]
    pub own: Vec<Field>,
    /// [`ApplyOp::Applied`]: the version of the committed write.
    #[serde(default)]
    pub version: i64,
    /// Upsert, delete: one half of a key change on the source; the other
    /// half's alternate key (target names). Empty otherwise.
    #[serde(default)]
    pub moved: Vec<Field>,
    /// [`ApplyOp::Repair`] only.
    #[serde(default)]
    pub repair: Option<Repair>,
}

/// Both sides' rows as read by `ctl repair`, to re-assert the conflict
/// master's row on the other side through the resolver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repair {
    pub observed: Vec<Observed>,
    /// The master's row mapped into the other side's names.
    pub master_values: Vec<Field>,
}

/// One side's row as read by a repair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub side: String,
    /// The side's WAL position when read.
    pub lsn: i64,
    pub present: bool,
    /// Its values of the columns the other side writes into it (its names).
    pub own: Vec<Field>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WriteOp {
    Upsert,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExpectKind {
    Nothing,
    Applied,
    Row,
}

/// The state a target must be in for a write to be made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expectation {
    pub kind: ExpectKind,
    /// [`ExpectKind::Applied`]: the applier's write that is the row's last.
    pub version: i64,
    /// [`ExpectKind::Row`]: whether the row is there, and its values.
    pub present: bool,
    pub values: Vec<Field>,
}

/// A decision of the resolver for one side (topic `<prefix>.apply.<side>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyWrite {
    pub map: String,
    /// The side of the event that led to the decision.
    pub source_side: String,
    pub target_side: String,
    pub target_entity: String,
    /// Alternate key, target names.
    pub key: Vec<Field>,
    pub version: i64,
    pub op: WriteOp,
    /// Upsert: the columns to write, target names.
    pub values: Vec<Field>,
    pub expect: Expectation,
    /// A half of a key change on the other side (target names): for a
    /// delete, the new key, to which the row is moved (values untouched)
    /// if no row has it; for an upsert, the old key, whose row must be
    /// gone (moved or deleted) before the upsert is made. Empty otherwise.
    #[serde(default)]
    pub moved: Vec<Field>,
    /// Position of the event that led to the decision (error reports).
    pub source_lsn: i64,
    /// Commit time of that event if it is a write of the other side, else 0.
    pub commit_time: i64,
}

impl ApplyWrite {
    /// The Kafka key, as [`MappedChange::kafka_key`].
    pub fn kafka_key(&self) -> String {
        key_string(self.key.iter().map(|f| f.value.as_deref()))
    }
}

/// The resolver's state of one record (topic `<prefix>.resolver.<map>`,
/// compacted); see `crates/resolve` for the meaning of each part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolverState {
    pub map: String,
    pub generation: i64,
    pub run: i64,
    pub agreed: Option<AgreedState>,
    pub left: SideStateRecord,
    pub right: SideStateRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "Agreed")] // its schema's name: serde's direct path checks it
pub struct AgreedState {
    pub present: bool,
    pub into_left: Vec<Field>,
    pub into_right: Vec<Field>,
    pub both: i64,
    pub both_from: Option<String>,
    pub one_way_left: i64,
    pub one_way_right: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "SideState")] // its schema's name: serde's direct path checks it
pub struct SideStateRecord {
    pub lsn: Option<i64>,
    pub seq: i32,
    pub known: Known,
    pub holds: HoldsRecord,
    pub pending: Vec<PendingRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub kind: ExpectKind,
    pub version: i64,
    pub present: bool,
    pub values: Vec<Field>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "Holds")] // its schema's name: serde's direct path checks it
pub struct HoldsRecord {
    pub present: Option<bool>,
    pub both: Option<i64>,
    pub one_way: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename = "Pending")] // its schema's name: serde's direct path checks it
pub struct PendingRecord {
    pub version: i64,
    pub expect: Known,
    pub holds: HoldsRecord,
    pub overtaken: bool,
}

impl MappedChange {
    /// The Kafka key: the alternate key values as a JSON array. Both
    /// directions of a map produce the same key for the same record, so a
    /// record's changes from both sides share one partition.
    pub fn kafka_key(&self) -> String {
        key_string(self.key.iter().map(|f| f.value.as_deref()))
    }
}

/// A JSON array of the values, the text form of a record key.
pub fn key_string<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> String {
    let v: Vec<Option<&str>> = values.into_iter().collect();
    serde_json::to_string(&v).unwrap_or_default()
}

/// A record that could not be processed (topic `<prefix>.errors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub service: String,
    pub error_class: String,
    pub message: String,
    pub map: Option<String>,
    pub source_side: Option<String>,
    pub target_side: Option<String>,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub key: Option<String>,
    pub source_lsn: Option<i64>,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub payload: Option<Vec<u8>>,
    /// Microseconds since the Unix epoch.
    pub occurred_at: i64,
}

impl ErrorRecord {
    /// An error record with the required fields; set the context fields after.
    pub fn new(
        service: &str,
        error_class: &str,
        message: impl Into<String>,
        occurred_at: i64,
    ) -> ErrorRecord {
        ErrorRecord {
            service: service.to_owned(),
            error_class: error_class.to_owned(),
            message: message.into(),
            map: None,
            source_side: None,
            target_side: None,
            topic: None,
            partition: None,
            offset: None,
            key: None,
            source_lsn: None,
            payload: None,
            occurred_at,
        }
    }
}

/// A row the initial write could not write (topic `<prefix>.initial-sync-errors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitialSyncError {
    pub map: String,
    pub run: i64,
    pub source_side: String,
    pub target_side: String,
    pub target_entity: String,
    /// The alternate key values, a JSON array.
    pub key: String,
    /// `create` or `update`.
    pub operation: String,
    pub sqlstate: Option<String>,
    pub message: String,
    /// Microseconds since the Unix epoch.
    pub occurred_at: i64,
}

/// PostgreSQL `X/Y` LSN text to a number.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// A number to PostgreSQL `X/Y` LSN text.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}
