//! Change capturer: reads committed changes of one side's PostgreSQL
//! database from a logical replication slot (wal2json) and publishes them to
//! `<prefix>.capture.<side>` as Avro [`ChangeRecord`]s.
//!
//! Crash safety: the slot is only *peeked*; it is advanced past a
//! transaction only after Kafka acknowledged every record of it. A crash
//! (even `kill -9`) between the two re-publishes the transactions read
//! since the last advance, with the same positions: at least once, never
//! lost.
//!
//! Bounded memory: a peek's rows are streamed, decoded one at a time and
//! published in chunks of at most [`CHUNK_BYTES`] of records as they come,
//! so no layer (wal2json rows, decoded records, Avro bytes, the producer's
//! queue) holds a whole transaction, however large. A crash inside a huge
//! transaction reads it again from its start.
//!
//! Only the columns the side's maps read are published (see
//! [`wal2json`]); a record still larger than `kafka.max_record_bytes` goes
//! to the errors topic with its key and source position, and `ctl
//! retry-errors` can bring it back by touching the row on the side.
//!
//! Loop prevention: the appliers write under replication origins; the
//! capturer asks wal2json for each transaction's origin (`include-origin`)
//! and leaves out the rows of the appliers' transactions, so an applied
//! change never comes back as a new one. What it keeps of them is the
//! appliers' reports (`dualwrite.ack` messages) of the writes they committed,
//! which tell the resolver, in the side's commit order, what the side holds.
//! The initial write's origin is left out entirely (`filter-origins`).

pub mod wal2json;

use std::sync::Arc;
use std::time::Duration;

use dualwrite_model::avro;
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::{ChangeRecord, ErrorRecord};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::health::health;
use dualwrite_runtime::kafka::{self, Outgoing, Producer, TopicSpec};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::pg;
use futures::TryStreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::wal2json::{format_lsn, parse_lsn, Context, Decoded, Decoder, SlotRow};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("side `{side}`: {message}")]
    Setup { side: String, message: String },
    #[error("kafka: {0}")]
    Kafka(#[from] kafka::rdkafka::error::KafkaError),
}

impl CaptureError {
    fn setup(side: &str, message: impl Into<String>) -> CaptureError {
        CaptureError::Setup {
            side: side.to_owned(),
            message: message.into(),
        }
    }
}

/// Topics the capturer of `side` writes.
pub fn topics(config: &Config, side: SideId) -> Vec<TopicSpec> {
    let t = Topics::new(&config.kafka.topic_prefix);
    vec![
        TopicSpec::new(t.capture(&config.side(side).name), config.kafka.partitions),
        TopicSpec::new(t.errors(), config.kafka.partitions),
    ]
}

/// Runs the capturer of `side` until `shutdown` is cancelled.
pub async fn run(
    config: Arc<Config>,
    side: SideId,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    let span = tracing::info_span!("capture", side = %config.side(side).name);
    run_inner(config, side, shutdown).instrument(span).await
}

async fn run_inner(
    config: Arc<Config>,
    side: SideId,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    let side_cfg = config.side(side);
    let name = side_cfg.name.clone();
    let t = Topics::new(&config.kafka.topic_prefix);
    kafka::ensure_topics(&config.kafka, &topics(&config, side)).await?;
    let producer = kafka::producer(&config.kafka, &format!("dualwrite-capture-{name}"))?;
    let errors = ErrorSink::new(producer.clone(), t.errors(), "capture")
        .with_max_record_bytes(config.kafka.max_record_bytes)
        .with_settings(config.errors);
    let topic = t.capture(&name);
    let slot = config.slot_name(side);
    let origins = config.origin_names(side);
    let tables: Vec<String> = config.captured_entities(side).into_keys().collect();
    let poll = Duration::from_millis(config.capture.poll_interval_ms);
    let out = Publisher {
        producer: &producer,
        errors: &errors,
        topic: &topic,
        side: &name,
        max_records: config.capture.max_batch.max(1) as usize,
    };
    let db_ready = format!("capture.{name}:database");
    health().set(&db_ready, false);

    let mut backoff = Backoff::new("capture");
    'connect: loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let client = match pg::connect(&side_cfg.connection, "dualwrite-capture").await {
            Ok(c) => c,
            Err(e) if e.is_transient() => {
                health().set(&db_ready, false);
                tracing::warn!("cannot connect to {name}'s database, retrying: {e}");
                if backoff.wait(&shutdown).await {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(CaptureError::setup(&name, format!("cannot connect: {e}"))),
        };
        let mut origin_ids = match prepare(&client, &config, side, &slot, &origins).await {
            Ok(id) => id,
            Err(Prep::Fatal(m)) => return Err(CaptureError::setup(&name, m)),
            Err(Prep::Transient(e)) => {
                tracing::warn!("setup on {name} failed, retrying: {}", pg::describe(&e));
                if backoff.wait(&shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        tracing::info!(%slot, tables = ?tables, "capturing");
        health().set(&db_ready, true);
        // The last origin is the initial write's: left out entirely.
        let init = origin_ids.pop().into_iter().collect::<Vec<_>>();
        let ctx = Context {
            side: name.clone(),
            applier_origins: origin_ids.into_iter().collect(),
            keys: config.captured_entities(side),
            columns: config.read_columns(side),
        };
        let peek = peek_sql(&tables, &init);
        let mut idle_reads = 0u32;
        // Empty reads since the last one that found changes.
        let mut quiet = 0u32;
        loop {
            // Priority: shutdown first, then the next read of the slot.
            let params: [&(dyn ToSql + Sync); 2] = [&slot, &config.capture.max_batch];
            let (read, result) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                r = read_slot(&client, &peek, &params, &ctx, &out) => r,
            };
            if let Some(lsn) = read.acked {
                if let Err(e) = advance(&client, &slot, lsn).await {
                    tracing::warn!(
                        "advancing slot {slot} failed (changes will be sent again): {}",
                        pg::describe(&e)
                    );
                    continue 'connect;
                }
            }
            match result {
                Ok(()) => backoff.reset(),
                Err(ReadError::Pg(e)) if pg::is_transient(&e) => {
                    tracing::warn!(
                        "reading slot {slot} failed, reconnecting: {}",
                        pg::describe(&e)
                    );
                    health().set(&db_ready, false);
                    if backoff.wait(&shutdown).await {
                        return Ok(());
                    }
                    continue 'connect;
                }
                Err(ReadError::Pg(e)) => {
                    return Err(CaptureError::setup(
                        &name,
                        format!("reading slot {slot}: {}", pg::describe(&e)),
                    ))
                }
                Err(ReadError::Publish(e)) => {
                    tracing::warn!("publishing changes failed, will read them again: {e}");
                    if backoff.wait(&shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            }
            if read.acked.is_some() {
                idle_reads = 0;
                quiet = 0;
                continue;
            }
            quiet = quiet.saturating_add(1);
            if let Err(e) = idle(&client, &slot, read.rows, &mut idle_reads).await {
                tracing::warn!("heartbeat on slot {slot} failed: {}", pg::describe(&e));
                if pg::is_transient(&e) {
                    continue 'connect;
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(next_poll(poll, quiet)) => {},
            }
        }
    }
}

/// How long to wait before reading the slot again after `quiet` empty
/// reads in a row: a slot that just gave changes is read again soon (the
/// next commit of a busy side is likely moments away, and waiting the
/// whole interval for it is latency), one that stays empty backs off to
/// `poll` (`capture.poll_interval_ms`).
fn next_poll(poll: Duration, quiet: u32) -> Duration {
    let soon = Duration::from_millis(2) * 2u32.saturating_pow(quiet.saturating_sub(1).min(8));
    soon.min(poll)
}

/// Most bytes of encoded records the capturer holds before publishing
/// them (plus the record that crossed it): with the producer's copy and
/// the rows being decoded, what the capturer's memory grows by, whatever
/// the size of a transaction.
pub const CHUNK_BYTES: usize = 4 << 20;

/// Where the capturer publishes.
struct Publisher<'a> {
    producer: &'a Producer,
    errors: &'a ErrorSink,
    topic: &'a str,
    side: &'a str,
    /// Most records of a chunk (`capture.max_batch`).
    max_records: usize,
}

/// What one read of the slot did.
#[derive(Debug, Default)]
struct Read {
    /// Rows the peek returned.
    rows: u64,
    /// The last commit all of whose records Kafka acknowledged: where the
    /// slot may advance to.
    acked: Option<u64>,
}

enum ReadError {
    Pg(tokio_postgres::Error),
    Publish(String),
}

/// Records decoded and not published yet, encoded.
#[derive(Default)]
struct Chunk {
    out: Vec<Outgoing>,
    bad: Vec<ErrorRecord>,
    bytes: usize,
    /// The last commit whose records are all in this chunk or published.
    commit: Option<u64>,
}

/// Streams one peek of the slot: decodes each row as it arrives and
/// publishes the records in chunks as they fill. A failure stops the read;
/// the commits acknowledged before it are in the returned [`Read`].
async fn read_slot(
    client: &Client,
    peek: &str,
    params: &[&(dyn ToSql + Sync)],
    ctx: &Context,
    out: &Publisher<'_>,
) -> (Read, Result<(), ReadError>) {
    let mut read = Read::default();
    let result = stream_slot(client, peek, params, ctx, out, &mut read).await;
    (read, result)
}

async fn stream_slot(
    client: &Client,
    peek: &str,
    params: &[&(dyn ToSql + Sync)],
    ctx: &Context,
    out: &Publisher<'_>,
    read: &mut Read,
) -> Result<(), ReadError> {
    let rows = client
        .query_raw(peek, params.iter().copied())
        .await
        .map_err(ReadError::Pg)?;
    let mut rows = std::pin::pin!(rows);
    let mut decoder = Decoder::new(ctx);
    let mut decoded = Decoded::default();
    let mut chunk = Chunk::default();
    while let Some(row) = rows.try_next().await.map_err(ReadError::Pg)? {
        read.rows += 1;
        let row = SlotRow {
            lsn: parse_lsn(row.get::<_, &str>(0)).unwrap_or(0),
            data: row.get::<_, String>(1),
        };
        decoder.push(&row, &mut decoded);
        out.take(&mut decoded, &mut chunk);
        if chunk.bytes >= CHUNK_BYTES || chunk.out.len() + chunk.bad.len() >= out.max_records {
            out.publish(&mut chunk, read).await?;
        }
    }
    out.publish(&mut chunk, read).await
}

impl Publisher<'_> {
    /// Moves what was decoded into `chunk`, encoded; a record too large to
    /// produce becomes an error record.
    fn take(&self, decoded: &mut Decoded, chunk: &mut Chunk) {
        for c in decoded.changes.drain(..) {
            let payload = match avro::encode::<ChangeRecord>(&c.record) {
                Ok(p) => p,
                Err(e) => {
                    let mut r = self
                        .errors
                        .record("encode", format!("change on {}: {e}", c.record.entity));
                    r.source_side = Some(self.side.to_owned());
                    r.source_lsn = Some(c.record.commit_lsn);
                    chunk.bad.push(r);
                    continue;
                }
            };
            let r = Outgoing {
                topic: self.topic.to_owned(),
                key: c.kafka_key,
                payload,
            };
            if self.errors.fits(&r) {
                chunk.bytes += r.key.len() + r.payload.len();
                chunk.out.push(r);
            } else {
                chunk.bad.push(self.too_large(&r, &c.record));
            }
        }
        for b in decoded.bad.drain(..) {
            let mut r = self.errors.record("malformed_change", b.message);
            r.source_side = Some(self.side.to_owned());
            r.source_lsn = Some(b.lsn as i64);
            r.payload = Some(b.data.into_bytes());
            chunk.bad.push(r);
        }
        if let Some(lsn) = decoded.last_commit.take() {
            chunk.commit = Some(lsn);
        }
    }

    /// The error record of a change too large to produce: its key (entity
    /// and alternate key), side and source position, from which `ctl
    /// retry-errors` finds the row.
    fn too_large(&self, r: &Outgoing, c: &ChangeRecord) -> ErrorRecord {
        let mut e = self.errors.too_large(r);
        e.source_side = Some(self.side.to_owned());
        e.source_lsn = Some(c.commit_lsn);
        e.message = format!(
            "{} (the {:?} of {} committed at {}, position {} in its transaction: \
             `dualwrite ctl retry-errors --class record_too_large` syncs the row's current values once they fit)",
            e.message,
            c.op,
            c.entity,
            format_lsn(c.commit_lsn as u64),
            c.seq
        );
        e
    }

    /// Publishes the chunk and waits for Kafka's acknowledgement; its
    /// commit then counts as acknowledged.
    async fn publish(&self, chunk: &mut Chunk, read: &mut Read) -> Result<(), ReadError> {
        let fail = |e: String| ReadError::Publish(e);
        kafka::send_all(self.producer, &chunk.out)
            .await
            .map_err(|e| fail(e.to_string()))?;
        metrics()
            .captured
            .with_label_values(&[self.side])
            .inc_by(chunk.out.len() as u64);
        if !chunk.bad.is_empty() {
            self.errors
                .publish(&chunk.bad)
                .await
                .map_err(|e| fail(e.to_string()))?;
        }
        tracing::debug!(records = chunk.out.len(), "published changes");
        read.acked = chunk.commit.take().or(read.acked);
        chunk.out.clear();
        chunk.bad.clear();
        chunk.bytes = 0;
        Ok(())
    }
}

/// Moves the slot to `lsn`, the end of a commit whose records Kafka acknowledged.
async fn advance(client: &Client, slot: &str, lsn: u64) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&slot, &format_lsn(lsn)],
        )
        .await
        .map(|_| ())
}

/// Empty reads in a row after which a lagging slot gets a heartbeat. Every
/// empty read decodes the WAL since the slot's position again (e.g. the
/// appliers' writes, filtered out by origin), so the heartbeat comes soon:
/// with 20 (one a second), replaying a backlog onto this side kept each
/// capturer's backend at 16 % of a core re-decoding the same WAL.
const HEARTBEAT_EVERY_IDLE_READS: u32 = 2;

/// After a read that gave no commit: counts empty reads and sends a
/// heartbeat every [`HEARTBEAT_EVERY_IDLE_READS`] of them.
async fn idle(
    client: &Client,
    slot: &str,
    rows: u64,
    idle_reads: &mut u32,
) -> Result<(), tokio_postgres::Error> {
    if rows > 0 {
        return Ok(());
    }
    *idle_reads += 1;
    if *idle_reads < HEARTBEAT_EVERY_IDLE_READS {
        return Ok(());
    }
    *idle_reads = 0;
    heartbeat(client, slot).await
}

/// A side whose only changes are the appliers' own writes (left out by
/// origin) gives empty reads, and the slot, which advances only to a commit
/// it read, would stay behind: every read would decode the same WAL again
/// and the slot would hold it on disk. When the slot lags, a transactional
/// logical message (`pg_logical_emit_message`, ignored by the decoder) gives
/// the next read a commit of this database to advance to, through the same
/// path as any other commit.
async fn heartbeat(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<(), tokio_postgres::Error> {
    let lagging: Option<bool> = client
        .query_opt(
            "SELECT pg_current_wal_lsn() - confirmed_flush_lsn > 65536 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .and_then(|r| r.get(0));
    if lagging == Some(true) {
        client
            .execute(
                "SELECT pg_logical_emit_message(true, 'dualwrite', 'heartbeat')",
                &[],
            )
            .await?;
    }
    Ok(())
}

fn peek_sql(tables: &[String], origin_ids: &[i64]) -> String {
    let add_tables = tables
        .iter()
        .map(|t| t.replace('\'', "''").replace(',', "\\,"))
        .collect::<Vec<_>>()
        .join(",");
    let mut opts = format!(
        "'format-version','2','include-lsn','true','include-timestamp','true',\
         'include-xids','true','include-pk','true','include-origin','true',\
         'add-msg-prefixes','{ack}','add-tables','{add_tables}'",
        ack = wal2json::ACK_PREFIX
    );
    if !origin_ids.is_empty() {
        let ids: Vec<String> = origin_ids.iter().map(i64::to_string).collect();
        opts.push_str(&format!(",'filter-origins','{}'", ids.join(",")));
    }
    format!("SELECT lsn::text, data FROM pg_logical_slot_peek_changes($1, NULL, $2, {opts})")
}

enum Prep {
    Fatal(String),
    Transient(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for Prep {
    fn from(e: tokio_postgres::Error) -> Prep {
        if pg::is_transient(&e) {
            Prep::Transient(e)
        } else {
            Prep::Fatal(pg::describe(&e))
        }
    }
}

/// Checks the captured tables, creates the slot and the appliers'
/// replication origins if missing, and returns the origins' ids.
async fn prepare(
    client: &Client,
    config: &Config,
    side: SideId,
    slot: &str,
    origins: &[String],
) -> Result<Vec<i64>, Prep> {
    client.batch_execute("SET TimeZone = 'UTC'").await?;
    let mut problems = Vec::new();
    for (entity, key) in config.captured_entities(side) {
        let (schema, table) = entity.split_once('.').unwrap_or(("public", &entity));
        let row = client
            .query_opt(
                "SELECT c.relreplident::text, \
                   ARRAY(SELECT a.attname::text FROM pg_index i \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                         WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary) \
                               OR (c.relreplident = 'i' AND i.indisreplident))) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &table],
            )
            .await?;
        let Some(row) = row else {
            problems.push(format!("table {entity} does not exist"));
            continue;
        };
        let ident: String = row.get(0);
        let cols: Vec<String> = row.get(1);
        let covered = ident == "f" || (ident != "n" && key.iter().all(|k| cols.contains(k)));
        if !covered {
            problems.push(format!(
                "table {entity}: its replica identity does not include the alternate key ({}), so deletes could not be linked; run `ALTER TABLE {entity} REPLICA IDENTITY FULL`",
                key.join(", ")
            ));
        }
    }
    if !problems.is_empty() {
        return Err(Prep::Fatal(problems.join("; ")));
    }
    let exists = client
        .query_opt(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    match exists {
        Some(row) => {
            let plugin: String = row.get(0);
            if plugin != "wal2json" {
                return Err(Prep::Fatal(format!(
                    "replication slot {slot} uses plugin {plugin}, not wal2json; drop it or configure another slot name"
                )));
            }
        }
        None => {
            client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'wal2json')",
                    &[&slot],
                )
                .await?;
            tracing::info!(%slot, "created replication slot: changes from now on are captured");
        }
    }
    // Created here, before the first read, so that no applier can write
    // under an origin this capturer does not leave out yet.
    let mut ids = Vec::with_capacity(origins.len());
    for o in origins {
        ids.push(pg::ensure_origin(client, o).await?);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_that_just_gave_changes_is_read_again_soon() {
        let poll = Duration::from_millis(50);
        let waits: Vec<u128> = (1..=7).map(|q| next_poll(poll, q).as_millis()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 50, 50]);
        assert_eq!(next_poll(Duration::from_millis(1), 1).as_millis(), 1);
    }
}
