//! The records that flow on the topics. Each has an Avro schema in `schemas/`.

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
}

/// A committed change of one row on one side (topic `<prefix>.capture.<side>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub side: String,
    /// `schema.table`.
    pub entity: String,
    pub op: ChangeOp,
    /// Old values of the row identity (update, delete).
    pub before: Option<Vec<Field>>,
    /// New values (insert, update).
    pub after: Option<Vec<Field>>,
    /// End LSN of the commit record of the source transaction.
    pub commit_lsn: i64,
    /// Position of the change within its transaction.
    pub seq: i32,
    pub xid: i64,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApplyOp {
    Upsert,
    Delete,
    /// Asks the target, the conflict master, to send its current values of
    /// the record back through the map.
    Reassert,
}

/// A change mapped for one map and direction, in the target's names
/// (topics `<prefix>.map.<map>` and `<prefix>.apply.<side>`).
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
    #[serde(with = "apache_avro::serde_avro_bytes_opt")]
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
