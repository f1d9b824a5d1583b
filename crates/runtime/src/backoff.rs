//! Exponential backoff between retries of a transient failure.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::metrics;

/// Exponential backoff between retries, 100 ms to 10 s; each wait counts as
/// a retry of `service` in the metrics.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    service: &'static str,
}

impl Backoff {
    pub fn new(service: &'static str) -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
            service,
        }
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
    /// Waits a short fixed time after a consumer reported an error (a
    /// broker down, a transport failure): the client reconnects by itself and
    /// reports each broken connection once, so these reports must not add
    /// up to long waits once the broker is back. True if shutdown came first.
    pub async fn brief(&mut self, shutdown: &CancellationToken) -> bool {
        metrics().retries.with_label_values(&[self.service]).inc();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_millis(200)) => false,
        }
    }

    /// Waits the current delay; returns true if shutdown was requested meanwhile.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        metrics().retries.with_label_values(&[self.service]).inc();
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(10));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}
