//! When to restart a child: exponential backoff per child, and an OTP-style
//! intensity limit over all children (too many restarts in a window means
//! something is badly wrong, and the whole service should stop so systemd
//! restarts it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 10,
            window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{restarts} restarts within {window:?}: giving up")]
pub struct TooManyRestarts {
    pub restarts: usize,
    pub window: Duration,
}

pub struct Intensity {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
    pub total: u64,
}

impl Intensity {
    pub fn new(policy: RestartPolicy) -> Intensity {
        Intensity {
            policy,
            recent: VecDeque::new(),
            total: 0,
        }
    }

    /// Records a child failure. `consecutive` is that child's failures since
    /// it last made progress; the answer is how long to wait before
    /// restarting it.
    pub fn on_failure(
        &mut self,
        now: Instant,
        consecutive: u32,
    ) -> Result<Duration, TooManyRestarts> {
        while self
            .recent
            .front()
            .is_some_and(|&t| now.duration_since(t) > self.policy.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.total += 1;
        if self.recent.len() > self.policy.max_restarts as usize {
            return Err(TooManyRestarts {
                restarts: self.recent.len(),
                window: self.policy.window,
            });
        }
        let factor = 1u32.checked_shl(consecutive.min(20)).unwrap_or(u32::MAX);
        Ok(self
            .policy
            .backoff_base
            .saturating_mul(factor)
            .min(self.policy.backoff_max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(10),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut i = Intensity::new(RestartPolicy {
            max_restarts: 100,
            ..policy()
        });
        let now = Instant::now();
        let delays: Vec<_> = (0..5)
            .map(|c| i.on_failure(now, c).map(|d| d.as_millis()).ok())
            .collect();
        assert_eq!(
            delays,
            vec![Some(100), Some(200), Some(400), Some(500), Some(500)]
        );
    }

    #[test]
    fn too_many_restarts_in_the_window_gives_up() {
        let mut i = Intensity::new(policy());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(i.on_failure(t0, 0).is_ok());
        }
        assert!(i.on_failure(t0, 0).is_err());
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut i = Intensity::new(policy());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(i.on_failure(t0, 0).is_ok());
        }
        assert!(i.on_failure(t0 + Duration::from_secs(11), 0).is_ok());
    }
}
