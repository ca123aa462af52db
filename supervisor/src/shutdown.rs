//! The one shutdown signal of the supervisor: SIGTERM or SIGINT asks the tree
//! to stop reading, flush and exit; a second SIGINT exits at once (nothing
//! unacknowledged was committed, so a re-run redoes it).

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Resolves when shutdown was requested.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|&stop| stop).await;
    }

    /// A handle that never fires and a trigger for it (for tests and callers
    /// that manage signals themselves).
    pub fn manual() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }
}

/// Installs the signal handlers. Must be called inside the runtime.
pub fn listen() -> std::io::Result<Shutdown> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down: flushing and draining"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down: flushing and draining (Ctrl-C again to quit now)"),
        }
        let _ = tx.send(true);
        loop {
            tokio::select! {
                _ = int.recv() => {
                    tracing::warn!("second SIGINT: exiting now; unacknowledged events will be redone by the next run");
                    std::process::exit(130);
                }
                _ = term.recv() => {}
            }
        }
    });
    Ok(Shutdown(rx))
}
