//! Change capturer: reads the committed changes of one side through its
//! [`ChangeSource`] and publishes them to `<prefix>.capture.<side>` as Avro
//! [`ChangeRecord`]s.
//!
//! Crash safety: the source is confirmed past a transaction only after
//! Kafka acknowledged every record of it. A crash (even `kill -9`) between
//! the two publishes the transactions read since the last confirmation
//! again, with the same positions: at least once, never lost.
//!
//! Bounded memory: a read's changes are decoded as they come and published
//! in chunks of at most [`CHUNK_BYTES`] of records, so no layer (what the
//! source read, decoded records, Avro bytes, the producer's queue) holds a
//! whole transaction, however large. A crash inside a huge transaction
//! reads it again from its start.
//!
//! Only the columns the side's maps read are published (the source leaves
//! the rest out); a record still larger than `kafka.max_record_bytes` goes
//! to the errors topic with its key and source position, and `ctl
//! retry-errors` can bring it back by touching the row on the side.
//!
//! Loop prevention is the source's: the appliers' own writes are left out,
//! and what it keeps of them is their reports of the writes they
//! committed, which tell the resolver, in the side's commit order, what
//! the side holds.

use std::sync::Arc;
use std::time::Duration;

use dualwrite_model::avro;
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::{format_lsn, ChangeRecord, ErrorRecord};
use dualwrite_model::topics::Topics;
use dualwrite_runtime::backoff::Backoff;
use dualwrite_runtime::errors::ErrorSink;
use dualwrite_runtime::health::health;
use dualwrite_runtime::kafka::{self, Outgoing, Producer, TopicSpec};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::side::{ChangeSource, Class, Decoded, SideError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("side `{side}`: {message}")]
    Setup { side: String, message: String },
    #[error("kafka: {0}")]
    Kafka(#[from] kafka::rdkafka::error::KafkaError),
}

impl CaptureError {
    fn setup(side: &str, message: impl std::fmt::Display) -> CaptureError {
        CaptureError::Setup {
            side: side.to_owned(),
            message: message.to_string(),
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

/// Runs the capturer of `side`, reading it through `S`, until `shutdown`
/// is cancelled.
pub async fn run<S: ChangeSource>(
    config: Arc<Config>,
    side: SideId,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    let span = tracing::info_span!("capture", side = %config.side(side).name);
    run_inner::<S>(config, side, shutdown)
        .instrument(span)
        .await
}

async fn run_inner<S: ChangeSource>(
    config: Arc<Config>,
    side: SideId,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    let name = config.side(side).name.clone();
    let t = Topics::new(&config.kafka.topic_prefix);
    kafka::ensure_topics(&config.kafka, &topics(&config, side)).await?;
    let producer = kafka::producer(&config.kafka, &format!("dualwrite-capture-{name}"))?;
    let errors = ErrorSink::new(producer.clone(), t.errors(), "capture")
        .with_max_record_bytes(config.kafka.max_record_bytes)
        .with_settings(config.errors);
    let topic = t.capture(&name);
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
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let failure = match S::open(&config, side).await {
            Ok(mut source) => {
                let tables: Vec<String> = config.captured_entities(side).into_keys().collect();
                tracing::info!(?tables, "capturing");
                health().set(&db_ready, true);
                match capture(&mut source, &config, &out, &mut backoff, &shutdown).await {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        if !failure.is_retryable() {
            return Err(CaptureError::setup(&name, failure));
        }
        tracing::warn!("capturing {name} failed, reconnecting: {failure}");
        health().set(&db_ready, false);
        if backoff.wait(&shutdown).await {
            return Ok(());
        }
    }
}

/// Reads the source and publishes what it gives until `shutdown` (`Ok`)
/// or a failure of the source (a retryable one: on a new connection).
async fn capture<S: ChangeSource>(
    source: &mut S,
    config: &Config,
    out: &Publisher<'_>,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<(), SideError> {
    let poll = Duration::from_millis(config.capture.poll_interval_ms);
    // Empty reads since the last one that found changes.
    let mut quiet = 0u32;
    loop {
        // Priority: shutdown first, then the next read of the source.
        let (acked, result) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            r = read(source, config.capture.max_batch, out) => r,
        };
        if let Some(lsn) = acked {
            // Whatever the cause, confirmed again after reconnecting.
            source.confirm(lsn).await.map_err(|e| SideError {
                class: Class::RetryLater,
                ..e.context("changes will be sent again")
            })?;
        }
        match result {
            Ok(()) => backoff.reset(),
            Err(ReadError::Side(e)) => return Err(e),
            Err(ReadError::Publish(e)) => {
                tracing::warn!("publishing changes failed, will read them again: {e}");
                if backoff.wait(shutdown).await {
                    return Ok(());
                }
                continue;
            }
        }
        if acked.is_some() {
            quiet = 0;
            continue;
        }
        quiet = quiet.saturating_add(1);
        let wait = next_poll(poll, quiet);
        if let Err(e) = source.idle().await {
            tracing::warn!("{e}");
            if e.is_retryable() {
                return Err(e);
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {},
        }
    }
}

/// How long to wait before reading the source again after `quiet` reads
/// in a row that gave no commit: soon at first (the next commit of a busy
/// side is likely moments away, and waiting the whole interval for it is
/// latency), backing off to `poll` (`capture.poll_interval_ms`). A source
/// that streams (PostgreSQL's) waits for its next transaction inside the
/// read, so its reads end without a commit only rarely.
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

enum ReadError {
    Side(SideError),
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

/// One read of the source: decodes what it gives as it comes and
/// publishes the records in chunks as they fill. Returns the last commit
/// all of whose records Kafka acknowledged (where the source may be
/// confirmed to), also when a failure stopped the read.
async fn read<S: ChangeSource>(
    source: &mut S,
    max_changes: i32,
    out: &Publisher<'_>,
) -> (Option<u64>, Result<(), ReadError>) {
    let mut acked = None;
    let result = stream(source, max_changes, out, &mut acked).await;
    (acked, result)
}

async fn stream<S: ChangeSource>(
    source: &mut S,
    max_changes: i32,
    out: &Publisher<'_>,
    acked: &mut Option<u64>,
) -> Result<(), ReadError> {
    source.start(max_changes).await.map_err(ReadError::Side)?;
    let mut decoded = Decoded::default();
    let mut chunk = Chunk::default();
    while source.next(&mut decoded).await.map_err(ReadError::Side)? {
        out.take(&mut decoded, &mut chunk);
        if chunk.bytes >= CHUNK_BYTES || chunk.out.len() + chunk.bad.len() >= out.max_records {
            out.publish(&mut chunk, acked).await?;
        }
    }
    out.publish(&mut chunk, acked).await
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
    async fn publish(&self, chunk: &mut Chunk, acked: &mut Option<u64>) -> Result<(), ReadError> {
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
        *acked = chunk.commit.take().or(*acked);
        chunk.out.clear();
        chunk.bad.clear();
        chunk.bytes = 0;
        Ok(())
    }
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
