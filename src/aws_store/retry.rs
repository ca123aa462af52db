//! Capped exponential backoff with full jitter (DESIGN §6).
//!
//! The SDK's own retries are switched off (`RetryConfig::disabled()`), so
//! every call is retried here and only here: one policy for DynamoDB and S3,
//! our own classification (it also knows DynamoDB's transaction conflicts),
//! a bounded total of attempts rather than SDK attempts × our attempts, and
//! a log line per retry.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Retries and throttled responses since the storage process last reported
/// them (process-wide: a storage process has one store). The storage process
/// takes them with [`take_counts`] and sends them to the supervisor, which
/// keeps the totals for telemetry.
static RETRIES: AtomicU64 = AtomicU64::new(0);
static THROTTLES: AtomicU64 = AtomicU64::new(0);

/// Counts one retried store call (the storage process's outage loop).
pub fn note_retry() {
    RETRIES.fetch_add(1, Ordering::Relaxed);
}

/// Counts one throttled response (called where SDK errors are classified).
pub fn note_throttle() {
    THROTTLES.fetch_add(1, Ordering::Relaxed);
}

/// (retries, throttles) since the previous call.
pub fn take_counts() -> (u64, u64) {
    (
        RETRIES.swap(0, Ordering::Relaxed),
        THROTTLES.swap(0, Ordering::Relaxed),
    )
}

#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub base: Duration,
    /// No delay is longer than this.
    pub cap: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(25),
            cap: Duration::from_secs(5),
            max_attempts: 10,
        }
    }
}

impl Backoff {
    /// The delay before retry number `retry` (0 for the first retry):
    /// uniform in [0, min(cap, base × 2^retry)] ("full jitter").
    pub fn delay(&self, retry: u32, random: u64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .min(self.cap);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 { 0 } else { random % (nanos + 1) })
    }
}

/// A fresh pseudo-random number (std's per-process random hash keys plus a
/// counter; jitter needs spread, not cryptographic quality).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Runs `op` until it succeeds, fails with an error `retryable` rejects, or
/// `policy.max_attempts` attempts have failed (the last error is returned).
pub async fn retry<T, E, F, Fut>(
    policy: &Backoff,
    what: &str,
    retryable: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e) && attempt + 1 < policy.max_attempts => {
                let delay = policy.delay(attempt, random_u64());
                RETRIES.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(what, attempt, delay_ms = delay.as_millis() as u64, error = %e, "retrying an AWS call");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_up_to_the_cap_with_full_jitter() {
        let b = Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(300),
            max_attempts: 5,
        };
        // The largest random value gives the ceiling.
        let ceiling = |r| b.delay(r, u64::MAX - 1);
        assert!(ceiling(0) <= Duration::from_millis(10));
        assert!(ceiling(3) <= Duration::from_millis(80));
        assert!(ceiling(30) <= Duration::from_millis(300));
        assert!(ceiling(200) <= Duration::from_millis(300));
        assert_eq!(b.delay(4, 0), Duration::ZERO);
        // Jitter spreads the delays.
        let mut seen: Vec<Duration> = (0..50).map(|_| b.delay(5, random_u64())).collect();
        seen.sort();
        seen.dedup();
        assert!(seen.len() > 40);
        assert!(seen.iter().all(|d| *d <= Duration::from_millis(300)));
    }

    #[tokio::test]
    async fn retries_only_what_may_pass_and_stops_at_the_limit() {
        let b = Backoff {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(2),
            max_attempts: 4,
        };
        let mut calls = 0;
        let r: Result<(), String> = retry(
            &b,
            "t",
            |_| true,
            || {
                calls += 1;
                async { Err("busy".to_string()) }
            },
        )
        .await;
        assert_eq!((r.is_err(), calls), (true, 4));

        let mut calls = 0;
        let r: Result<(), String> = retry(
            &b,
            "t",
            |e: &String| e == "busy",
            || {
                calls += 1;
                async { Err("bad request".to_string()) }
            },
        )
        .await;
        assert_eq!((r.is_err(), calls), (true, 1));

        let mut calls = 0;
        let r: Result<u32, String> = retry(
            &b,
            "t",
            |_| true,
            || {
                calls += 1;
                let c = calls;
                async move { if c < 3 { Err("busy".into()) } else { Ok(c) } }
            },
        )
        .await;
        assert_eq!(r, Ok(3));
    }
}
