//! The storage process: serves the supervisor's `Load`, `Write` and
//! `Snapshot` requests against the embedded store (DESIGN §4, §5, §8).
//!
//! The process does one thing, so its blocking redb work runs inline.

use crate::archive::write_metric_snapshot;
use crate::dlq::KafkaDlq;
use crate::store::EmbeddedStore;
use anyhow::Context;
use proto::{FrameError, FromStorage, Role, ShardChanges, ToStorage, WriteReport};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::UnixStream;

/// Products per `Loaded` chunk, well below the frame limit.
pub const LOAD_CHUNK_PRODUCTS: usize = 50_000;
/// Current items are refreshed at least this often (DESIGN §6).
const TTL_REFRESH_MS: i64 = 24 * 3600 * 1000;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Serves one supervisor until it closes the connection (`Ok`) or breaks
/// the protocol (`Err`: the supervisor replaces this process).
pub async fn serve(
    stream: UnixStream,
    mut store: EmbeddedStore,
    archive_dir: PathBuf,
    dlq: Option<KafkaDlq>,
) -> anyhow::Result<()> {
    let (mut tx, mut rx, hello) =
        proto::handshake::<FromStorage, ToStorage>(stream, Role::Storage, Role::Supervisor)
            .await
            .context("storage handshake with the supervisor")?;
    tracing::info!(
        supervisor_pid = hello.pid,
        "storage connected to the supervisor"
    );
    let mut last_refresh = refresh(&mut store, now_ms());
    loop {
        let request = match rx.recv().await {
            Ok(request) => request,
            Err(FrameError::Closed) => {
                tracing::info!("supervisor closed the connection; storage exits");
                return Ok(());
            }
            Err(e) => return Err(e).context("receiving a request from the supervisor"),
        };
        let now = now_ms();
        if now.saturating_sub(last_refresh) >= TTL_REFRESH_MS {
            last_refresh = refresh(&mut store, now);
        }
        for reply in handle(&mut store, &archive_dir, dlq.as_ref(), request, now) {
            tx.send(&reply)
                .await
                .context("sending a reply to the supervisor")?;
        }
    }
}

/// Refreshes the TTL of current items; a failure is logged and retried on
/// the next request. Returns the time of the last successful refresh.
fn refresh(store: &mut EmbeddedStore, now: i64) -> i64 {
    match store.refresh_ttl(now) {
        Ok(items) => {
            tracing::info!(items, "refreshed the TTL of current items");
            now
        }
        Err(error) => {
            tracing::warn!(%error, "refreshing item TTLs failed");
            now.saturating_sub(TTL_REFRESH_MS)
        }
    }
}

fn handle(
    store: &mut EmbeddedStore,
    archive_dir: &Path,
    dlq: Option<&KafkaDlq>,
    request: ToStorage,
    now: i64,
) -> Vec<FromStorage> {
    match request {
        ToStorage::Load { id, shard } => match store.load_shard(shard, LOAD_CHUNK_PRODUCTS) {
            Ok(chunks) => chunks
                .into_iter()
                .map(|state| FromStorage::Loaded { id, state })
                .collect(),
            Err(e) => vec![failed(id, "load", shard.to_string(), &e, e.is_retryable())],
        },
        ToStorage::Write { id, mut changes } => {
            // With a dead-letter topic, rejected events are published (and
            // acknowledged by the broker) before the write commits; the
            // store then only records the rest.
            let mut published = 0;
            if let Some(dlq) = dlq {
                let letters: Vec<_> = changes.iter().flat_map(|c| &c.dead_letters).collect();
                if let Err(e) = dlq.publish(&letters) {
                    let retryable = e.is_retryable();
                    return vec![failed(id, "write", "dead letters".into(), &e, retryable)];
                }
                published = letters.len() as u64;
                for c in &mut changes {
                    c.dead_letters.clear();
                }
            }
            write(store, id, &changes, now, published)
        }
        ToStorage::Snapshot { id } => {
            let result = store
                .current_records(now)
                .map_err(|e| (e.is_retryable(), anyhow::Error::new(e)))
                .and_then(|records| {
                    write_metric_snapshot(archive_dir, &records, now)
                        .map_err(|e| (true, anyhow::Error::new(e)))
                });
            match result {
                Ok(key) => {
                    tracing::info!(id, key, "metric snapshot archived");
                    vec![FromStorage::Snapshotted { id, key }]
                }
                Err((retryable, e)) => vec![failed(id, "snapshot", String::new(), &*e, retryable)],
            }
        }
    }
}

/// Writes changes; `published` dead letters already went to the topic.
fn write(
    store: &mut EmbeddedStore,
    id: u64,
    changes: &[ShardChanges],
    now: i64,
    published: u64,
) -> Vec<FromStorage> {
    match store.write(changes, now) {
        Ok(stats) => {
            tracing::debug!(
                id,
                shards_applied = stats.shards_applied,
                shards_skipped = stats.shards_skipped,
                products = stats.products,
                entities = stats.entities,
                dead_letters = stats.dead_letters,
                "write committed"
            );
            let (retries, throttles) = crate::aws_store::retry::take_counts();
            let report = WriteReport {
                dead_letters: published + stats.dead_letters,
                retries,
                throttles,
            };
            vec![FromStorage::Written { id, report }]
        }
        Err(e) => vec![failed(
            id,
            "write",
            format!("{} shard changes", changes.len()),
            &e,
            e.is_retryable(),
        )],
    }
}

fn failed(
    id: u64,
    request: &'static str,
    what: String,
    error: &(dyn std::error::Error + 'static),
    retryable: bool,
) -> FromStorage {
    let error = format_chain(error);
    tracing::error!(
        id,
        request,
        what,
        retryable,
        error,
        "storage request failed"
    );
    FromStorage::Failed {
        id,
        error,
        retryable,
    }
}

fn format_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;
    use proto::{EntityKey, EntityTotals, Position, ProductId, ShardChanges};

    #[tokio::test]
    async fn write_then_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let archive = dir.path().join("archive");
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = tokio::spawn(serve(theirs, store, archive.clone(), None));

        let (mut tx, mut rx, hello) =
            proto::handshake::<ToStorage, FromStorage>(ours, Role::Supervisor, Role::Storage)
                .await
                .unwrap();
        assert_eq!(hello.role, Role::Storage);

        let changes = crate::store::tests::worked_check_changes();
        let mut products = changes[1].products.clone();
        tx.send(&ToStorage::Write {
            id: 1,
            changes: changes.clone(),
        })
        .await
        .unwrap();
        let FromStorage::Written { id: 1, report } = rx.recv().await.unwrap() else {
            panic!("expected Written")
        };
        assert_eq!(report.dead_letters, 0);

        tx.send(&ToStorage::Load { id: 2, shard: 0 }).await.unwrap();
        let FromStorage::Loaded { id: 2, state } = rx.recv().await.unwrap() else {
            panic!("expected Loaded")
        };
        assert!(state.last);
        assert_eq!(
            state.positions,
            vec![Position {
                stream: "events".into(),
                offset: 3
            }]
        );
        let mut loaded = state.products;
        loaded.sort_by(|a, b| a.0.cmp(&b.0));
        products.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(loaded, products);
        assert_eq!(loaded[0].0, ProductId::Num(1));
        let mut times = state.entity_times;
        times.sort();
        assert_eq!(
            times[0],
            (EntityKey::Seller("s1".into()), 1_696_176_063_000)
        );

        // An entity-only write that is already durable still gets an answer.
        let replay = ShardChanges {
            shard: 0,
            positions: changes[1].positions.clone(),
            entities: vec![(EntityKey::Seller("s1".into()), EntityTotals::default())],
            ..ShardChanges::default()
        };
        tx.send(&ToStorage::Write {
            id: 3,
            changes: vec![replay],
        })
        .await
        .unwrap();
        assert!(matches!(
            rx.recv().await.unwrap(),
            FromStorage::Written { id: 3, .. }
        ));

        tx.send(&ToStorage::Snapshot { id: 4 }).await.unwrap();
        let FromStorage::Snapshotted { id: 4, key } = rx.recv().await.unwrap() else {
            panic!("expected Snapshotted")
        };
        assert!(archive.join(&key).is_file(), "{key}");

        // The supervisor goes away: storage returns cleanly.
        drop((tx, rx));
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_broken_frame_is_an_error() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = tokio::spawn(serve(theirs, store, dir.path().join("archive"), None));
        let (tx, rx, _) =
            proto::handshake::<ToStorage, FromStorage>(ours, Role::Supervisor, Role::Storage)
                .await
                .unwrap();
        drop((tx, rx));
        server.await.unwrap().unwrap();

        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let server = tokio::spawn(serve(theirs, store, dir.path().join("archive"), None));
        // Not a hello at all: a frame claiming far too many bytes.
        ours.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        assert!(server.await.unwrap().is_err());
    }
}
