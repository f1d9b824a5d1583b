//! Commands too old to tell whether they were applied.
//!
//! A command id is recognised as already applied by the events it left on
//! `<p>.events` (read back at start, and kept in memory after). Those
//! events are kept as long as the topic's `retention.ms`: a command sent
//! again after that (a client retrying days later, or the control topic
//! read again from an old offset) would be applied a second time. Kafka
//! deletes a record no earlier than `retention.ms` after its timestamp,
//! and a command's events are written after it was sent, so while a
//! command is younger than the retention its events, if any, are still
//! there. An older one is refused: the operator sends it again with a new
//! id. An hour is taken off the retention for clocks that disagree.

use dualwrite_runtime::kafka::rdkafka::message::{Message, OwnedMessage};

/// Taken off the events topic's retention for clock differences.
const CLOCK_MARGIN_MS: i64 = 3_600_000;

/// `Err` with the reason when the command in `m` was sent longer ago than
/// the events topic keeps events (`kept_ms`; `None`: forever).
pub fn check(m: &OwnedMessage, kept_ms: Option<i64>, now_micros: i64) -> Result<(), String> {
    match m.timestamp().to_millis() {
        Some(sent) => check_age(sent, kept_ms, now_micros / 1000),
        None => Ok(()),
    }
}

fn check_age(sent_ms: i64, kept_ms: Option<i64>, now_ms: i64) -> Result<(), String> {
    let Some(kept) = kept_ms else {
        return Ok(());
    };
    let age = now_ms - sent_ms;
    let limit = (kept - CLOCK_MARGIN_MS).max(0);
    if age <= limit {
        return Ok(());
    }
    Err(format!(
        "sent {} h ago, longer than the events topic keeps the record of applied commands ({} h, less an hour for clocks): whether it was already applied cannot be told; send it again with a new id",
        age / 3_600_000,
        kept / 3_600_000
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn commands_older_than_the_events_kept_are_refused() {
        let now = 1_000 * H;
        let week = Some(168 * H);
        assert!(check_age(now - H, week, now).is_ok());
        assert!(check_age(now - 167 * H, week, now).is_ok());
        let e = check_age(now - 192 * H, week, now).unwrap_err();
        assert!(
            e.starts_with("sent 192 h ago") && e.contains("(168 h"),
            "{e}"
        );
        // Kept forever: any age.
        assert!(check_age(0, None, now).is_ok());
        // A command from the future (a fast clock) passes.
        assert!(check_age(now + H, week, now).is_ok());
    }
}
