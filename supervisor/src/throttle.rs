//! Keeps a repeated log line from flooding the journal.
//!
//! Against an unreachable cluster librdkafka reports "1/1 brokers are down"
//! and every poll fails, about 40 warnings a second between them (~140k
//! journal lines an hour). A line said again within the window is held back
//! and counted; the next time it is said after the window, the count goes
//! with it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogThrottle {
    window: Duration,
    /// Per line: when it was last logged, and how often it was held back since.
    said: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Distinct lines remembered at most; past it the memory starts afresh (a
/// line then gets through once more).
const MAX_LINES: usize = 1024;

impl LogThrottle {
    pub fn new(window: Duration) -> LogThrottle {
        LogThrottle {
            window,
            said: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(held back since it was last logged)` when `line` should be
    /// logged now, `None` when it was logged less than the window ago.
    pub fn admit(&self, line: &str, now: Instant) -> Option<u64> {
        let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((last, held)) = said.get_mut(line) {
            if now.saturating_duration_since(*last) < self.window {
                *held += 1;
                return None;
            }
            *last = now;
            return Some(std::mem::take(held));
        }
        if said.len() >= MAX_LINES {
            said.clear();
        }
        said.insert(line.to_string(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_repeated_within_the_window_is_held_back_and_counted() {
        let throttle = LogThrottle::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(throttle.admit("brokers down", at(0)), Some(0));
        assert_eq!(throttle.admit("brokers down", at(1)), None);
        assert_eq!(throttle.admit("brokers down", at(29)), None);
        assert_eq!(throttle.admit("another", at(29)), Some(0));
        assert_eq!(throttle.admit("brokers down", at(30)), Some(2));
        assert_eq!(throttle.admit("brokers down", at(31)), None);
        assert_eq!(throttle.admit("brokers down", at(90)), Some(1));
    }

    #[test]
    fn memory_is_bounded() {
        let throttle = LogThrottle::new(Duration::from_secs(30));
        let t0 = Instant::now();
        for i in 0..(MAX_LINES * 3) {
            assert_eq!(throttle.admit(&i.to_string(), t0), Some(0));
        }
        assert!(throttle.said.lock().unwrap().len() <= MAX_LINES);
    }
}
