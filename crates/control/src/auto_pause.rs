//! The automatic pause: a map whose errors reach its rule's count within
//! the rule's window is paused (`[map.auto_pause]`, or the default).

use std::collections::{BTreeMap, VecDeque};

use dualwrite_model::config::AutoPause;

/// Recent error times per map, for the automatic pause.
#[derive(Default)]
pub struct ErrorWindows {
    seen: BTreeMap<String, VecDeque<i64>>,
}

impl ErrorWindows {
    /// Records an error of `map` at `at` (µs); returns the pause reason when
    /// the map's errors within the window reach the rule's count.
    pub fn record(
        &mut self,
        map: &str,
        rule: AutoPause,
        flowing: bool,
        at: i64,
        message: &str,
    ) -> Option<String> {
        if rule.errors == 0 || !flowing {
            self.seen.remove(map);
            return None;
        }
        let q = self.seen.entry(map.to_owned()).or_default();
        q.push_back(at);
        let since = at - rule.window_secs as i64 * 1_000_000;
        while q.front().is_some_and(|t| *t < since) {
            q.pop_front();
        }
        if q.len() < rule.errors as usize {
            return None;
        }
        let n = q.len();
        self.seen.remove(map);
        Some(format!(
            "auto-paused: {n} errors within {} s (threshold {}); last: {message}. Fix the cause, retry the errors (ctl retry-errors) and run the map again",
            rule.window_secs, rule.errors
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_within_the_window_trigger_once() {
        let rule = AutoPause {
            errors: 3,
            window_secs: 10,
        };
        let mut w = ErrorWindows::default();
        let s = 1_000_000;
        assert!(w.record("m", rule, true, 0, "a").is_none());
        assert!(w.record("m", rule, true, 20 * s, "b").is_none()); // the first fell out of the window
        assert!(w.record("m", rule, true, 21 * s, "c").is_none());
        let reason = w.record("m", rule, true, 22 * s, "d").unwrap();
        assert!(
            reason.starts_with("auto-paused: 3 errors within 10 s") && reason.contains("last: d"),
            "{reason}"
        );
        assert!(w.record("m", rule, true, 23 * s, "e").is_none()); // counting starts over
        assert!(w
            .record(
                "m",
                AutoPause {
                    errors: 0,
                    window_secs: 10
                },
                true,
                0,
                "x"
            )
            .is_none());
        assert!(w.record("other", rule, false, 0, "x").is_none());
    }
}
