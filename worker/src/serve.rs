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

/// What `Configure` sets up: the fold, and the size of a flush answer's parts.
struct Configured {
    fold: Fold,
    part_bytes: usize,
    /// Changes taken early (see `SEAL_CHANGE_BYTES`, and where a shard's
    /// events reach a new UTC day), oldest first:
    /// each is a consistent state of its shards, answered before the rest
    /// at the next flush, each in parts of its own.
    sealed: Vec<Vec<proto::ShardChanges>>,
}

/// Changes of one shard (dead letters, changed states, archived events)
/// at which the worker takes them without waiting for the flush, so that
/// no shard's answer outgrows a frame (64 MiB): 500,000 malformed lines of 100 bytes,
/// or 4,400 products with 16 KiB names changed by small updates, in one
/// shard and asked for in one flush, used to make an answer the supervisor
/// could not decode.
const SEAL_CHANGE_BYTES: usize = 16 << 20;

/// Serves the supervisor until it closes the channel.
pub async fn serve(stream: UnixStream) -> Result<(), ServeError> {
    let (mut tx, mut rx, hello) =
        proto::handshake::<FromWorker, ToWorker>(stream, Role::Worker, Role::Supervisor).await?;
    tracing::info!(
        supervisor_pid = hello.pid,
        "worker connected to the supervisor"
    );
    let mut configured: Option<Configured> = None;
    let mut restoring: HashSet<u32> = HashSet::new();
    let mut moved_in = 0;
    loop {
        let msg = match rx.recv().await {
            Ok(msg) => msg,
            Err(FrameError::Closed) => {
                tracing::info!("supervisor closed the connection; worker exits");
                // The state is memory only: the process's exit returns it
                // at once, where dropping it walked every product (~20 ms
                // at a million products, at the end of every run).
                std::mem::forget(configured);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match msg {
            ToWorker::Configure(c) => {
                let mut fold = Fold::new(c.low_stock_threshold, c.max_event_bytes as usize);
                if c.archive_events {
                    fold.archive_events();
                }
                configured = Some(Configured {
                    fold,
                    part_bytes: c.answer_part_bytes as usize,
                    sealed: Vec::new(),
                })
            }
            ToWorker::Restore(chunk) => {
                let c = configured_for(&mut configured, "Restore")?;
                let first = restoring.insert(chunk.shard);
                if chunk.last {
                    restoring.remove(&chunk.shard);
                }
                if first {
                    forget_sealed(&mut c.sealed, chunk.shard);
                }
                c.fold.restore(chunk, first);
            }
            ToWorker::Events(batch) => {
                let c = configured_for(&mut configured, "Events")?;
                let sealed = &mut c.sealed;
                let stats = c
                    .fold
                    .apply_batch_by_day(&batch, |day_end| seal_day(sealed, day_end))
                    .map_err(ServeError::EncodeChanges)?;
                warn_of_moves(&mut moved_in, stats.moved_in);
                if c.fold.changes_reach(SEAL_CHANGE_BYTES) {
                    let changes = c.fold.take_changes().map_err(ServeError::EncodeChanges)?;
                    c.sealed.push(changes);
                }
            }
            ToWorker::Release { shard } => {
                let c = configured_for(&mut configured, "Release")?;
                restoring.remove(&shard);
                forget_sealed(&mut c.sealed, shard);
                c.fold.release(shard);
            }
            ToWorker::Flush { id } => {
                let c = configured_for(&mut configured, "Flush")?;
                let mut windows = std::mem::take(&mut c.sealed);
                windows.push(c.fold.take_changes().map_err(ServeError::EncodeChanges)?);
                let mut parts: Vec<_> = windows
                    .into_iter()
                    .flat_map(|w| in_parts(w, c.part_bytes))
                    .filter(|part| !part.is_empty())
                    .collect();
                if parts.is_empty() {
                    parts.push(Vec::new()); // nothing changed: still one answer
                }
                let last = parts.len() - 1;
                for (i, shards) in parts.into_iter().enumerate() {
                    let more = i < last;
                    tx.send(&FromWorker::Changes { id, shards, more }).await?;
                }
            }
        }
    }
}

/// What `Configure` set up, or the error for a `what` that came before it.
fn configured_for<'a>(
    configured: &'a mut Option<Configured>,
    what: &'static str,
) -> Result<&'a mut Configured, ServeError> {
    configured.as_mut().ok_or(ServeError::NotConfigured(what))
}

/// Warns that products moved here from a seller this shard never held
/// them under, at the 1st, 10th, 100th, … such event of the process.
fn warn_of_moves(total: &mut u64, new: u64) {
    let before = *total;
    *total = total.saturating_add(new);
    if crosses_power_of_ten(before, *total) {
        tracing::warn!(
            events = *total,
            "updates moved products that this shard never held from another seller: if that \
             seller's events are in another partition, its metrics still count them (README, \
             Known limits)"
        );
    }
}

/// Whether some power of ten `m` has `before < m <= after`.
fn crosses_power_of_ten(before: u64, after: u64) -> bool {
    let mut mark: u64 = 1;
    while mark <= after {
        if mark > before {
            return true;
        }
        match mark.checked_mul(10) {
            Some(next) => mark = next,
            None => return false,
        }
    }
    false
}

/// Adds a shard's changes taken where its events reach a new day to the
/// last window taken early, unless that holds the shard already: the day
/// ends of a worker's shards, which come close together, then make one
/// write rather than one each (8 shards a worker made 56 writes of a 1M
/// event run instead of 10, and the run 11% slower).
fn seal_day(sealed: &mut Vec<Vec<proto::ShardChanges>>, changes: proto::ShardChanges) {
    match sealed.last_mut() {
        Some(window) if window.iter().all(|c| c.shard != changes.shard) => window.push(changes),
        _ => sealed.push(vec![changes]),
    }
}

/// Drops a shard's changes taken early: it was restored afresh or went to
/// another owner, and whoever holds it now replays what storage lacks.
/// (Writing them could put an old state over a newer owner's.)
fn forget_sealed(sealed: &mut [Vec<proto::ShardChanges>], shard: proto::Shard) {
    for changes in sealed {
        changes.retain(|c| c.shard != shard);
    }
}

/// Splits a flush's shard changes into parts of about `part_bytes` (16 MiB
/// by default, far below the frame limit; a shard larger than that travels
/// alone); always at least one part.
fn in_parts(shards: Vec<proto::ShardChanges>, part_bytes: usize) -> Vec<Vec<proto::ShardChanges>> {
    let mut parts = vec![Vec::new()];
    let mut size = 0;
    for sc in shards {
        let bytes = approximate_bytes(&sc);
        if size + bytes > part_bytes && parts.last().is_some_and(|p| !p.is_empty()) {
            parts.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(part) = parts.last_mut() {
            part.push(sc);
        }
    }
    parts
}

/// About what a shard's changes take in a frame.
fn approximate_bytes(sc: &proto::ShardChanges) -> usize {
    let low_stock: usize = sc
        .low_stock
        .iter()
        .map(|c| match c {
            proto::LowStockChange::Put(i) => {
                64 + i.name.len() + i.category.len() + i.seller_id.len()
            }
            proto::LowStockChange::Delete { seller_id, .. } => 32 + seller_id.len(),
        })
        .sum();
    let letters: usize = sc
        .dead_letters
        .iter()
        .map(|d| 64 + d.raw.len() + d.detail.len())
        .sum();
    let archive: usize = sc.archive.iter().map(|a| 64 + a.gzip.len()).sum();
    sc.products.bytes.len()
        + low_stock
        + letters
        + archive
        + 64 * (sc.entities.len() + sc.positions.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{EncodedProducts, ShardChanges};

    fn shard(shard: u32, bytes: usize) -> ShardChanges {
        ShardChanges {
            shard,
            products: EncodedProducts {
                count: 1,
                bytes: vec![0; bytes],
            },
            ..ShardChanges::default()
        }
    }

    const PART_BYTES: usize = 16 << 20;

    #[test]
    fn warnings_come_at_powers_of_ten() {
        assert!(crosses_power_of_ten(0, 1));
        assert!(!crosses_power_of_ten(1, 9));
        assert!(crosses_power_of_ten(9, 10));
        assert!(crosses_power_of_ten(5, 5000));
        assert!(!crosses_power_of_ten(10, 99));
        assert!(!crosses_power_of_ten(0, 0));
        assert!(!crosses_power_of_ten(u64::MAX - 1, u64::MAX));
    }

    #[test]
    fn a_large_flush_is_answered_in_parts_each_shard_whole() {
        let parts = in_parts(
            vec![
                shard(0, PART_BYTES / 2),
                shard(1, PART_BYTES / 2),
                shard(2, PART_BYTES * 2),
                shard(3, 10),
            ],
            PART_BYTES,
        );
        let shards: Vec<Vec<u32>> = parts
            .iter()
            .map(|p| p.iter().map(|s| s.shard).collect())
            .collect();
        assert_eq!(shards, [vec![0, 1], vec![2], vec![3]]);
        assert_eq!(
            in_parts(vec![shard(0, 10), shard(1, 10)], PART_BYTES).len(),
            1
        );
        assert_eq!(in_parts(vec![shard(0, 10), shard(1, 10)], 1).len(), 2);
        // Nothing changed: still one (empty) answer.
        assert_eq!(in_parts(Vec::new(), PART_BYTES), vec![Vec::new()]);
    }
}
