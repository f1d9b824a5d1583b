//! The consume → transform → produce loop shared by the services that move
//! records between topics, with at-least-once delivery: a batch's offsets
//! are stored only after everything it produced (records and error records)
//! was acknowledged; a failed write is retried with backoff, the same batch
//! again, so nothing is skipped.

use std::borrow::Cow;
use std::time::Duration;

use dualwrite_model::record::ErrorRecord;
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::errors::ErrorSink;
use crate::kafka::{self, KafkaConsumer, Outgoing, Producer};

/// Most records relayed at once: a batch's output is acknowledged before
/// the next batch is read, so a larger batch waits less per record when a
/// backlog flows (4,000 rather than 1,000: BENCHMARKS.md, 2026-12-03).
const BATCH: usize = 4000;

/// Records to produce for a batch, and error records for what could not be processed.
#[derive(Debug, Default)]
pub struct Output {
    pub records: Vec<Outgoing>,
    pub errors: Vec<ErrorRecord>,
}

/// Runs the loop until `shutdown` is cancelled, then commits the stored
/// offsets. Meanwhile it renews the committed offsets every
/// [`kafka::KEEPALIVE`], so that an input without new records keeps its
/// place (see [`kafka::keep_offsets_alive`]).
pub async fn relay<F>(
    consumer: &KafkaConsumer,
    producer: &Producer,
    errors: &ErrorSink,
    shutdown: &CancellationToken,
    mut process: F,
) -> Result<(), KafkaError>
where
    F: FnMut(&[OwnedMessage]) -> Output,
{
    let mut backoff = Backoff::new(errors.service());
    let mut held = kafka::assigned_positions(consumer)?;
    let mut keepalive = tokio::time::interval(kafka::KEEPALIVE);
    loop {
        // Priority: shutdown first, then renewing offsets, then the next
        // batch (whose first `recv` is cancel-safe; the rest is taken outside).
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = keepalive.tick() => {
                for (topic, positions) in &held {
                    kafka::keep_offsets_alive(consumer, topic, positions);
                }
                continue;
            }
            m = consumer.recv() => m,
        };
        let first = match first {
            Ok(m) => m.detach(),
            Err(e) => {
                tracing::warn!("receive failed: {e}");
                if backoff.brief(shutdown).await {
                    break;
                }
                continue;
            }
        };
        let batch = kafka::recv_more(consumer, first, BATCH, Duration::from_millis(5)).await;
        let output = process(&batch);
        if !deliver(producer, errors, &output, &mut backoff, shutdown).await {
            break;
        }
        backoff.reset();
        kafka::store_offsets(consumer, &batch)?;
        for m in &batch {
            let next = held.entry(m.topic().to_owned()).or_default();
            let e = next.entry(m.partition()).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
    }
    kafka::commit_now(consumer);
    Ok(())
}

/// Writes the output, retrying until acknowledged. False if shutdown came first.
pub async fn deliver(
    producer: &Producer,
    errors: &ErrorSink,
    output: &Output,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> bool {
    // Records too large to produce become error records; the common case
    // (all fit) sends the output as it is.
    let (records, error_records): (Cow<[Outgoing]>, Cow<[ErrorRecord]>) =
        if output.records.iter().all(|r| errors.fits(r)) {
            (
                Cow::Borrowed(&output.records),
                Cow::Borrowed(&output.errors),
            )
        } else {
            let (fit, big): (Vec<&Outgoing>, Vec<&Outgoing>) =
                output.records.iter().partition(|r| errors.fits(r));
            let mut errs: Vec<ErrorRecord> = big.into_iter().map(|r| errors.too_large(r)).collect();
            errs.extend(output.errors.iter().cloned());
            (
                Cow::Owned(fit.into_iter().cloned().collect()),
                Cow::Owned(errs),
            )
        };
    loop {
        let res = async {
            kafka::send_all(producer, &records)
                .await
                .map_err(|e| e.to_string())?;
            if !error_records.is_empty() {
                errors
                    .publish(&error_records)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        }
        .await;
        match res {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!("writing records failed, retrying: {e}");
                if backoff.wait(shutdown).await {
                    return false;
                }
            }
        }
    }
}
