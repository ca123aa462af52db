//! The worker process: a [`Fold`] behind a proto channel to the supervisor.
//! A panic, abort or OOM here kills this process only; the supervisor
//! restores the shards elsewhere from storage.

use crate::fold::Fold;
use proto::{FrameError, FromWorker, Role, ToWorker};
use std::collections::HashSet;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("channel to the supervisor failed: {0}")]
    Channel(#[from] FrameError),
    #[error("supervisor sent {0} before Configure")]
    NotConfigured(&'static str),
    #[error("encoding the changes of a flush: {0}")]
    EncodeChanges(FrameError),
}

/// Serves the supervisor until it closes the channel.
pub async fn serve(stream: UnixStream) -> Result<(), ServeError> {
    let (mut tx, mut rx, hello) =
        proto::handshake::<FromWorker, ToWorker>(stream, Role::Worker, Role::Supervisor).await?;
    tracing::info!(
        supervisor_pid = hello.pid,
        "worker connected to the supervisor"
    );
    let mut fold: Option<Fold> = None;
    let mut restoring: HashSet<u32> = HashSet::new();
    loop {
        let msg = match rx.recv().await {
            Ok(msg) => msg,
            Err(FrameError::Closed) => {
                tracing::info!("supervisor closed the connection; worker exits");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match msg {
            ToWorker::Configure(c) => {
                fold = Some(Fold::new(c.low_stock_threshold, c.max_event_bytes as usize))
            }
            ToWorker::Restore(chunk) => {
                let fold = fold.as_mut().ok_or(ServeError::NotConfigured("Restore"))?;
                let first = restoring.insert(chunk.shard);
                if chunk.last {
                    restoring.remove(&chunk.shard);
                }
                fold.restore(chunk, first);
            }
            ToWorker::Events(batch) => {
                fold.as_mut()
                    .ok_or(ServeError::NotConfigured("Events"))?
                    .apply_batch(&batch);
            }
            ToWorker::Release { shard } => {
                restoring.remove(&shard);
                fold.as_mut()
                    .ok_or(ServeError::NotConfigured("Release"))?
                    .release(shard);
            }
            ToWorker::Flush { id } => {
                let shards = fold
                    .as_mut()
                    .ok_or(ServeError::NotConfigured("Flush"))?
                    .take_changes()
                    .map_err(ServeError::EncodeChanges)?;
                tx.send(&FromWorker::Changes { id, shards }).await?;
            }
        }
    }
}
