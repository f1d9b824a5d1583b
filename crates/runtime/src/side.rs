//! The seam between the services and a side's database.
//!
//! The capturer reads a side through a [`ChangeSource`], the applier
//! writes it through a [`Target`], the initial write copies it through
//! a [`CopySide`] and the comparisons read it through an [`Inspect`];
//! none names a kind of database. A
//! kind of database is one crate that implements them all (PostgreSQL:
//! `dualwrite-side-postgres`), and `dualwrite` picks the implementation
//! from the side's `kind`. Failures cross the seam as [`SideError`]s,
//! classified once, where the database's own codes are known ([`Class`]).
//!
//! The traits are used through generics (the services are generic over
//! them, instantiated once per kind), so their futures are spelled out as
//! `impl Future + Send`: the services run on a multi-threaded runtime.

mod inspect;

use std::collections::HashMap;
use std::future::Future;

use dualwrite_model::config::{Config, MapConfig, SideId};
use dualwrite_model::lifecycle::SideSnapshot;
use dualwrite_model::record::{ApplyWrite, ChangeRecord, Field};
use dualwrite_model::schema::{SchemaProblem, TableInfo};
use tokio_util::sync::CancellationToken;

use crate::kafka::Shard;

pub use inspect::{Inspect, Payload, Reading, TextKey, TextRow};

/// What to do about a failure. One classification for every service; the
/// side's implementation classifies its database's errors, the services
/// act on the class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A clash of the moment that the same work, done again on a fresh
    /// transaction, can pass: a deadlock, a serialization failure, a lock
    /// not available. Retried after a brief pause.
    RetryNow,
    /// The database or the connection is away, shutting down or short of
    /// resources: retried after a growing backoff, on a new connection.
    RetryLater,
    /// A property of the data (a constraint, a bad value, a missing
    /// column): the record goes to the errors topic with this message, the
    /// rest goes on.
    Record,
    /// What no retry mends (credentials, a missing table or slot, a
    /// refused setting): the service stops with the message.
    Fatal,
}

/// A failure of a side's database, classified.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SideError {
    pub class: Class,
    /// For operators: the database's message with its code and detail
    /// (the detail may quote a row's values).
    pub message: String,
    /// The same without the row's values: what logs and error records
    /// carry unless `errors.log_values` is set.
    pub redacted: String,
    /// The write refers to a related record the side has not got yet (a
    /// foreign key): the applier holds it back for a while.
    pub missing_parent: bool,
    /// The database's code for the failure (PostgreSQL: the SQLSTATE).
    pub code: Option<String>,
}

impl SideError {
    /// A failure with one message (nothing in it to redact).
    pub fn new(class: Class, message: impl Into<String>) -> SideError {
        let message = message.into();
        SideError {
            class,
            redacted: message.clone(),
            message,
            missing_parent: false,
            code: None,
        }
    }

    /// Whether the same work may pass when tried again.
    pub fn is_retryable(&self) -> bool {
        matches!(self.class, Class::RetryNow | Class::RetryLater)
    }

    /// The same failure, its messages prefixed with what was being done.
    pub fn context(mut self, what: &str) -> SideError {
        self.message = format!("{what}: {}", self.message);
        self.redacted = format!("{what}: {}", self.redacted);
        self
    }
}

/// A decoded change with the key used on the capture topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Captured {
    pub record: ChangeRecord,
    /// `[entity, alternate key values…]` as JSON.
    pub kafka_key: String,
}

/// Something the side's change stream gave that could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    /// Its position in the side's log.
    pub lsn: u64,
    pub message: String,
    /// What was read, as read.
    pub data: String,
}

/// What a part of a read decoded to.
#[derive(Debug, Default)]
pub struct Decoded {
    pub changes: Vec<Captured>,
    pub bad: Vec<BadRow>,
    /// The end of the last transaction read whole: where the source may be
    /// confirmed to once every record before it was published.
    pub last_commit: Option<u64>,
}

/// A side's committed changes, in commit order, read again from the last
/// confirmed position after a restart (at least once, never lost).
///
/// A read is [`start`](ChangeSource::start) then
/// [`next`](ChangeSource::next) until it gives `false`; the capturer
/// publishes what `next` decoded as it comes, then
/// [`confirm`](ChangeSource::confirm)s the last commit Kafka acknowledged.
pub trait ChangeSource: Sized + Send + 'static {
    /// Connects, checks that the captured tables can be read (each
    /// table's delete carries its alternate key) and creates what the
    /// source needs on the side (its slot, the appliers' origins).
    fn open(config: &Config, side: SideId) -> impl Future<Output = Result<Self, SideError>> + Send;

    /// Starts reading, from the last confirmed position, at most
    /// `max_changes` changes (whole transactions).
    fn start(&mut self, max_changes: i32) -> impl Future<Output = Result<(), SideError>> + Send;

    /// Decodes the next part of the read into `out`; `false` at its end.
    fn next(&mut self, out: &mut Decoded) -> impl Future<Output = Result<bool, SideError>> + Send;

    /// How much the current read has read (rows, messages) so far.
    fn read_so_far(&self) -> u64;

    /// Everything up to the commit ending at `lsn` is published: the
    /// source never gives it again.
    fn confirm(&mut self, lsn: u64) -> impl Future<Output = Result<(), SideError>> + Send;

    /// After a read that gave no commit: keeps the position moving on a
    /// side whose only changes are the appliers' own (left out), so that
    /// the side does not keep its log for the source.
    fn idle(&mut self) -> impl Future<Output = Result<(), SideError>> + Send;
}

/// What became of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// A redelivery: a write of this version or a later one was decided
    /// (made or superseded).
    Stale,
    /// The target changed since the decision (a write of its own the
    /// resolver has not seen yet, which it resolves in its turn).
    Superseded,
    /// The upsert of a key change's new key, while the row of the old key
    /// is still there: it waits for that row to be moved or deleted.
    Waiting,
}

/// The bookkeeping of one record on the target: the applier's last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The version of the last write made (0: none made).
    pub version: i64,
    /// The row version that write left (`None` when it deleted).
    pub row_version: Option<String>,
    pub present: bool,
    /// The latest write decided (made or superseded); `None` in
    /// bookkeeping written before this was kept.
    pub decided: Option<i64>,
}

/// The target row of one write: its version and whether it holds the
/// values the write expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowState {
    pub row_version: String,
    pub same: bool,
}

/// A write decided, for the bookkeeping and the side's report of it.
#[derive(Debug, Clone, Copy)]
pub struct Decided<'a> {
    pub write: &'a ApplyWrite,
    pub outcome: Outcome,
    /// A key change's delete that moved the row: the row as moved (JSON
    /// object of its values), reported instead of a delete.
    pub moved_to: Option<&'a str>,
}

/// A side's database as the applier writes it: in transactions, each
/// write compared and set against the side's bookkeeping of the
/// applier's last write of the record, and reported back through the
/// side's change stream in the same transaction.
///
/// Writes of one call share one shape (map, table, operation, field
/// names); each record occurs once among them.
pub trait Target: Sized + Send + 'static {
    /// Connects as applier instance `shard` of `side` (under its own
    /// origin: the side's source leaves its writes out) and creates the
    /// bookkeeping where it lacks.
    fn connect(
        config: &Config,
        side: SideId,
        shard: Shard,
    ) -> impl Future<Output = Result<Self, SideError>> + Send;

    fn begin(&mut self) -> impl Future<Output = Result<(), SideError>> + Send;
    fn commit(&mut self) -> impl Future<Output = Result<(), SideError>> + Send;
    fn rollback(&mut self) -> impl Future<Output = Result<(), SideError>> + Send;

    /// The bookkeeping of the records `keys` of `map`, locked until the
    /// transaction ends, by record key.
    fn versions(
        &mut self,
        map: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Version>, SideError>> + Send;

    /// Each write's target row, locked (`None`: no row has its key), and
    /// whether it holds the values the writes that expect a row expect.
    fn rows(
        &mut self,
        writes: &[&ApplyWrite],
    ) -> impl Future<Output = Result<Vec<Option<RowState>>, SideError>> + Send;

    /// Makes the writes: upserts or deletes by alternate key.
    fn write(
        &mut self,
        writes: &[&ApplyWrite],
    ) -> impl Future<Output = Result<(), SideError>> + Send;

    /// Whether a row has the other key of a key change (`w.moved`).
    fn other_key_taken(
        &mut self,
        w: &ApplyWrite,
    ) -> impl Future<Output = Result<bool, SideError>> + Send;

    /// A key change's delete: moves the row of the old key to the new one
    /// when no row has it; the moved row's values (JSON), `None` when
    /// nothing moved.
    fn move_row(
        &mut self,
        w: &ApplyWrite,
    ) -> impl Future<Output = Result<Option<String>, SideError>> + Send;

    /// Records the decisions in the bookkeeping and reports every one that
    /// is not a redelivery, in the transaction.
    fn record_and_report(
        &mut self,
        map: &str,
        decided: &[Decided<'_>],
    ) -> impl Future<Output = Result<(), SideError>> + Send;

    /// Forgets the bookkeeping of records deleted more than `retention_secs`
    /// ago, on a connection of its own; how many records.
    fn prune(
        config: &Config,
        side: SideId,
        retention_secs: u64,
    ) -> impl Future<Output = Result<u64, SideError>> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Create,
    Update,
}

impl WriteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::Create => "create",
            WriteKind::Update => "update",
        }
    }
}

/// One write of the initial copy to a target side, in the target's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyWrite {
    pub target: SideId,
    pub kind: WriteKind,
    pub key: Vec<Field>,
    /// Values to write (for a create: every field that flows to the target).
    pub new: Vec<Field>,
    /// For an update: the target's values of the same fields at the
    /// snapshot. The update happens only if the row still has them (a
    /// change made after the snapshot is left to live sync).
    pub old: Vec<Field>,
}

/// What became of one write of the initial copy.
#[derive(Debug, Clone)]
pub enum CopyOutcome {
    Written,
    /// Nothing to write after all (equal as the column types compare, or
    /// changed on the target after the snapshot: live sync carries it).
    Unchanged,
    /// The side refused it (its message without the row's values).
    Rejected(SideError),
}

/// A row of a snapshot: its alternate key's values (as the copy orders
/// them) and every column's value as text.
pub type SnapshotRow = (Vec<Option<String>>, Vec<Field>);

/// One side of a map's initial copy: a consistent snapshot of the map's
/// table, read in key order (byte order of each key value's text, the
/// same on every side), and a [`CopyWriter`] of guarded writes under the
/// initial write's own origin (the side's source leaves them out). Reader
/// and writer are apart, so the copy reads the next rows while it writes.
pub trait CopySide: Sized + Send + 'static {
    /// The side's writer.
    type Writer: CopyWriter;

    /// Takes the snapshot of `map`'s table on `side` (its rows after the
    /// key `after`, all when `None`) and connects the writer.
    fn open(
        config: &Config,
        map: &MapConfig,
        side: SideId,
        after: Option<&[String]>,
    ) -> impl Future<Output = Result<(Self, Self::Writer), SideError>> + Send;

    /// What the snapshot sees, to tell which later changes it holds.
    fn snapshot(&self) -> &SideSnapshot;

    /// How many rows the copy reads from the snapshot.
    fn rows(&self) -> i64;

    /// The next rows in key order; none at the end.
    fn fetch(&mut self) -> impl Future<Output = Result<Vec<SnapshotRow>, SideError>> + Send;

    /// Ends the snapshot.
    fn finish(&mut self) -> impl Future<Output = Result<(), SideError>> + Send;

    /// Waits until the side's change source has given every transaction
    /// committed so far (`false`: cancelled first).
    fn wait_captured(
        config: &Config,
        side: SideId,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<bool, SideError>> + Send;

    /// What the side says about a table (`schema.table`): its columns,
    /// unique keys and the foreign keys that refer to it; `None` when
    /// there is no such table. For the schema check.
    fn describe_table(
        config: &Config,
        side: SideId,
        entity: &str,
    ) -> impl Future<Output = Result<Option<TableInfo>, SideError>> + Send;
}

/// The writes of a copy to one side (see [`CopySide`]).
pub trait CopyWriter: Send + 'static {
    /// Makes the writes in one transaction: a create does nothing if the
    /// record appeared meanwhile, an update only while the row still has
    /// the values the snapshot read. A write the side refuses is
    /// `Rejected` and the others are still made; `Err` when none could be.
    fn write(
        &mut self,
        writes: &[&CopyWrite],
    ) -> impl Future<Output = Result<Vec<CopyOutcome>, SideError>> + Send;
}

/// The problems a map's mapping has with its tables, or why the tables
/// could not be read.
pub type SchemaCheck = Result<Vec<SchemaProblem>, SideError>;

/// Checks a map's mapping against the tables of both sides (connecting to
/// each through `C`): the problems found, or why a side could not be read.
pub async fn schema_problems<C: CopySide>(config: &Config, map: &MapConfig) -> SchemaCheck {
    let mut tables = Vec::with_capacity(2);
    for side in [SideId::Left, SideId::Right] {
        tables.push(C::describe_table(config, side, &map.entity(side).qualified()).await?);
    }
    Ok(dualwrite_model::schema::check_map(
        config,
        map,
        tables[0].as_ref(),
        tables[1].as_ref(),
    ))
}
