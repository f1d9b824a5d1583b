//! Shared runtime pieces of the dualwrite services: Kafka clients with one
//! shared context, topic setup, the errors topic, the seam to the sides'
//! databases ([`side`]), shutdown and logging.

pub mod backoff;
pub mod errors;
pub mod health;
pub mod kafka;
pub mod metrics;
pub mod relay;
pub mod shutdown;
pub mod side;
pub mod telemetry;

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
