//! Change capturer: reads committed changes of one side's PostgreSQL
//! database from a logical replication slot (wal2json) and publishes them to
//! `<prefix>.capture.<side>` as Avro [`ChangeRecord`]s.
//!
//! Crash safety: the slot is only *peeked*; it is advanced past a batch of
//! transactions only after Kafka acknowledged every record of the batch. A
//! crash (even `kill -9`) between the two re-publishes that batch: at least
//! once, never lost.
//!
//! Loop prevention: the appliers write under a replication origin, and the
//! capturer asks wal2json to leave out changes of that origin
//! (`filter-origins`), so an applied change never comes back as a new one.

pub mod wal2json;

use std::sync::Arc;
use std::time::Duration;

use dualwrite_model::avro;
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::ChangeRecord;
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::health::health;
use dualwrite_runtime::kafka::{self, Outgoing, Producer, TopicSpec};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::pg;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::wal2json::{decode, format_lsn, parse_lsn, SlotRow};

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
        .with_max_record_bytes(config.kafka.max_record_bytes);
    let topic = t.capture(&name);
    let slot = config.slot_name(side);
    let origins = config.origin_names(side);
    let tables: Vec<String> = config.captured_entities(side).into_keys().collect();
    let poll = Duration::from_millis(config.capture.poll_interval_ms);
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
        let origin_ids = match prepare(&client, &config, side, &slot, &origins).await {
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
        let peek = peek_sql(&tables, &origin_ids);
        let mut idle_reads = 0u32;
        loop {
            // Priority: shutdown first, then the next read of the slot.
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                [&slot, &config.capture.max_batch];
            let rows = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                r = client.query(&peek, &params) => r,
            };
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) if pg::is_transient(&e) => {
                    tracing::warn!(
                        "reading slot {slot} failed, reconnecting: {}",
                        pg::describe(&e)
                    );
                    if backoff.wait(&shutdown).await {
                        return Ok(());
                    }
                    health().set(&db_ready, false);
                    continue 'connect;
                }
                Err(e) => {
                    return Err(CaptureError::setup(
                        &name,
                        format!("reading slot {slot}: {}", pg::describe(&e)),
                    ))
                }
            };
            backoff.reset();
            let slot_rows: Vec<SlotRow> = rows
                .iter()
                .map(|r| SlotRow {
                    lsn: parse_lsn(r.get::<_, &str>(0)).unwrap_or(0),
                    data: r.get::<_, String>(1),
                })
                .collect();
            let decoded = decode(&name, &slot_rows);
            let Some(last) = decoded.last_commit else {
                if slot_rows.is_empty() {
                    idle_reads += 1;
                    if idle_reads >= HEARTBEAT_EVERY_IDLE_READS {
                        idle_reads = 0;
                        if let Err(e) = heartbeat(&client, &slot).await {
                            tracing::warn!("heartbeat on slot {slot} failed: {}", pg::describe(&e));
                            if pg::is_transient(&e) {
                                continue 'connect;
                            }
                        }
                    }
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(poll) => {},
                }
                continue;
            };
            idle_reads = 0;
            if let Err(e) = publish(&producer, &errors, &topic, &name, decoded).await {
                tracing::warn!("publishing changes failed, will read them again: {e}");
                if backoff.wait(&shutdown).await {
                    return Ok(());
                }
                continue;
            }
            if let Err(e) = client
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&slot, &format_lsn(last)],
                )
                .await
            {
                tracing::warn!(
                    "advancing slot {slot} failed (changes will be sent again): {}",
                    pg::describe(&e)
                );
                continue 'connect;
            }
        }
    }
}

async fn publish(
    producer: &Producer,
    errors: &ErrorSink,
    topic: &str,
    side: &str,
    decoded: wal2json::Decoded,
) -> Result<(), String> {
    let mut out = Vec::with_capacity(decoded.changes.len());
    let mut bad = Vec::new();
    for c in decoded.changes {
        match avro::encode::<ChangeRecord>(&c.record) {
            Ok(payload) => out.push(Outgoing {
                topic: topic.to_owned(),
                key: c.kafka_key,
                payload,
            }),
            Err(e) => {
                let mut r = errors.record("encode", format!("change on {}: {e}", c.record.entity));
                r.source_side = Some(side.to_owned());
                r.source_lsn = Some(c.record.commit_lsn);
                bad.push(r);
            }
        }
    }
    for b in decoded.bad {
        let mut r = errors.record("malformed_change", b.message);
        r.source_side = Some(side.to_owned());
        r.source_lsn = Some(b.lsn as i64);
        r.payload = Some(b.data.into_bytes());
        bad.push(r);
    }
    let (out, too_large): (Vec<Outgoing>, Vec<Outgoing>) =
        out.into_iter().partition(|r| errors.fits(r));
    for r in &too_large {
        let mut e = errors.too_large(r);
        e.source_side = Some(side.to_owned());
        bad.push(e);
    }
    kafka::send_all(producer, &out)
        .await
        .map_err(|e| e.to_string())?;
    metrics()
        .captured
        .with_label_values(&[side])
        .inc_by(out.len() as u64);
    if !bad.is_empty() {
        errors.publish(&bad).await.map_err(|e| e.to_string())?;
    }
    tracing::debug!(records = out.len(), "published changes");
    Ok(())
}

/// Empty reads in a row after which a lagging slot gets a heartbeat. Every
/// empty read decodes the WAL since the slot's position again (e.g. the
/// appliers' writes, filtered out by origin), so the heartbeat comes soon:
/// with 20 (one a second), replaying a backlog onto this side kept each
/// capturer's backend at 16 % of a core re-decoding the same WAL.
const HEARTBEAT_EVERY_IDLE_READS: u32 = 2;

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
         'include-xids','true','include-pk','true','add-tables','{add_tables}'"
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
