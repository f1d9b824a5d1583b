//! The consume → transform → produce loop shared by the services that move
//! records between topics, with at-least-once delivery: a batch's offsets
//! are stored only after everything it produced (records and error records)
//! was acknowledged; a failed write is retried with backoff, the same batch
//! again, so nothing is skipped.

use std::time::Duration;

use dualwrite_model::record::ErrorRecord;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::errors::ErrorSink;
use crate::kafka::{self, KafkaConsumer, Outgoing, Producer};

/// Records to produce for a batch, and error records for what could not be processed.
#[derive(Debug, Default)]
pub struct Output {
    pub records: Vec<Outgoing>,
    pub errors: Vec<ErrorRecord>,
}

/// Runs the loop until `shutdown` is cancelled, then commits the stored offsets.
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
    loop {
        // Priority: shutdown first, then the next batch.
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            b = kafka::recv_batch(consumer, 1000, Duration::from_millis(5)) => b,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("receive failed: {e}");
                if backoff.brief(shutdown).await {
                    break;
                }
                continue;
            }
        };
        let output = process(&batch);
        if !deliver(producer, errors, &output, &mut backoff, shutdown).await {
            break;
        }
        backoff.reset();
        kafka::store_offsets(consumer, &batch)?;
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
    let (records, mut too_large) = errors.oversized(output.records.clone());
    too_large.extend(output.errors.iter().cloned());
    loop {
        let res = async {
            kafka::send_all(producer, &records)
                .await
                .map_err(|e| e.to_string())?;
            if !too_large.is_empty() {
                errors
                    .publish(&too_large)
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
