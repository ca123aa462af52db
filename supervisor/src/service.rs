//! What the tree tells the service manager and the probes: `READY=1` once
//! the pipeline is up, `WATCHDOG=1` only while it is healthy, a one-line
//! `STATUS=`, and `STOPPING=1` at shutdown (DESIGN §9).
//!
//! The tree decides *whether* it is up and healthy (it knows its children);
//! this module turns that into notifications and the readiness flag of the
//! telemetry, and computes the event rate for the status line. The pings are
//! sent from the tree's own loop, so a wedged loop stops them too.

use crate::notify::Notifier;
use crate::telemetry::Telemetry;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often STATUS is refreshed when there is no watchdog to follow.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

pub struct Service {
    notifier: Notifier,
    telemetry: Arc<Telemetry>,
    ready: bool,
    stopping: bool,
    /// The reason pings stopped, while they are stopped (logged once).
    stalled: Option<String>,
    /// Events consumed at the previous tick, for the rate.
    last: (Instant, u64),
}

/// What the tree reports on each tick.
pub struct Health {
    /// Why the pipeline is not making progress, if it is not.
    pub stall: Option<String>,
    pub restarts: u64,
}

impl Service {
    pub fn new(notifier: Notifier, telemetry: Arc<Telemetry>) -> Service {
        Service {
            last: (Instant::now(), telemetry.consumed()),
            notifier,
            telemetry,
            ready: false,
            stopping: false,
            stalled: None,
        }
    }

    /// A service that tells no one (tests, embedding).
    pub fn silent() -> Service {
        Service::new(Notifier::disabled(), Telemetry::new())
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// How often the tree should call [`Service::tick`].
    pub fn tick_interval(&self) -> Duration {
        self.notifier
            .watchdog_interval()
            .map_or(STATUS_INTERVAL, |w| w.min(STATUS_INTERVAL))
            .max(Duration::from_millis(1))
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The consumer, the workers and storage are up: tell systemd, once.
    pub fn up(&mut self, what: &str) {
        if self.ready || self.stopping {
            return;
        }
        self.ready = true;
        self.telemetry.set_ready(true);
        tracing::info!(pipeline = what, "ready");
        if let Err(e) = self.notifier.ready(&format!("ready: {what}")) {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
    }

    /// Pings the watchdog if healthy, and refreshes STATUS.
    pub fn tick(&mut self, health: Health) {
        let now = Instant::now();
        let consumed = self.telemetry.consumed();
        let secs = now.duration_since(self.last.0).as_secs_f64();
        let rate = if secs > 0.0 {
            (consumed.saturating_sub(self.last.1)) as f64 / secs
        } else {
            0.0
        };
        self.last = (now, consumed);
        match (&health.stall, &self.stalled) {
            (Some(why), None) => {
                tracing::error!(reason = %why, "pipeline stalled: watchdog pings stop");
            }
            (None, Some(_)) => tracing::info!("pipeline moving again: watchdog pings resume"),
            _ => {}
        }
        self.stalled = health.stall.clone();
        if self.ready && health.stall.is_none() {
            // A ping after STOPPING is harmless, and a long drain that keeps
            // making progress should not be killed for silence.
            if let Err(e) = self.notifier.watchdog() {
                tracing::warn!(error = %e, "cannot ping the watchdog");
            }
        }
        let state = match (&health.stall, self.stopping, self.ready) {
            (Some(why), _, _) => format!("stalled ({why})"),
            (None, true, _) => "stopping".to_string(),
            (None, false, true) => "ready".to_string(),
            (None, false, false) => "starting".to_string(),
        };
        let lag = self
            .telemetry
            .total_lag()
            .map_or(String::new(), |l| format!(", lag {l}"));
        let status = format!(
            "{state}: {rate:.0} events/s{lag}, {} restarts",
            health.restarts
        );
        if let Err(e) = self.notifier.status(&status) {
            tracing::debug!(error = %e, "cannot send STATUS");
        }
    }

    /// Shutdown began: tell systemd, once.
    pub fn stopping(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.telemetry.set_stopping();
        if let Err(e) = self.notifier.stopping("stopping: flushing and draining") {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
    }
}
