//! Exponential backoff between retries of a transient failure.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff between retries, 100 ms to 10 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
    /// Waits the current delay; returns true if shutdown was requested meanwhile.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(10));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}
