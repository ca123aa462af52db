//! The storage process: serves the supervisor's `Load`, `Write` and
//! `Snapshot` requests against the configured store (DESIGN §4, §5, §6, §8).
//!
//! The process does one thing at a time, in request order: the supervisor
//! relies on writes being answered in order.
//!
//! In Kafka mode a write carries the raw event archive's objects of the
//! events it covers, as the workers built them; they are stored
//! (`crate::archive`) before the write commits, so every event the store
//! has applied is in the archive.
//!
//! While the store is unreachable (the AWS store's own retries ran out on
//! an outage) a request is retried here, with capped exponential backoff
//! and full jitter, until it passes: the supervisor meanwhile holds back
//! input (bounded memory) and commits nothing, and restarting this process
//! would not help. Only the embedded store's retryable errors (a busy lock)
//! are reported back, so the supervisor can replace the process.

use crate::aws_store::retry::{Backoff, random_u64, retry};
use crate::aws_store::{AwsConfig, AwsStore, AwsStoreError};
use crate::backend::{Backend, BackendError};
use crate::dlq::KafkaDlq;
use anyhow::Context;
use proto::{
    ArchivedEvents, FrameError, FromStorage, Role, Shard, ShardChanges, ToStorage, WriteReport,
};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::UnixStream;

/// Products per `Loaded` chunk, well below the frame limit.
pub const LOAD_CHUNK_PRODUCTS: usize = 50_000;
/// Current items are refreshed at least this often (DESIGN §6), and at
/// least four times per lifetime: a refresh skips items with more than half
/// of it left (`store::ttl_refresh_due`), which must then still live until
/// the refresh after next.
const TTL_REFRESH_MS: i64 = 24 * 3600 * 1000;

fn ttl_refresh_ms(ttl_secs: i64) -> i64 {
    TTL_REFRESH_MS
        .min(ttl_secs.saturating_mul(1000) / 4)
        .max(1000)
}
/// Backoff between attempts of a request while the AWS store is down.
const OUTAGE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    cap: Duration::from_secs(5),
    max_attempts: u32::MAX,
};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Serves one supervisor until it closes the connection (`Ok`), breaks
/// the protocol, or a write fails (`Err`: the supervisor replaces this
/// process).
pub async fn serve(
    stream: UnixStream,
    mut store: Backend,
    dlq: Option<KafkaDlq>,
) -> anyhow::Result<()> {
    let (mut tx, mut rx, hello) =
        proto::handshake::<FromStorage, ToStorage>(stream, Role::Storage, Role::Supervisor)
            .await
            .context("storage handshake with the supervisor")?;
    tracing::info!(
        supervisor_pid = hello.pid,
        aws = store.is_aws(),
        "storage connected to the supervisor"
    );
    let mut ttl = TtlRefresh::every(ttl_refresh_ms(store.ttl_secs()));
    ttl.tick(&mut store, now_ms()).await;
    let mut archive = ArchiveState::default();
    loop {
        // Refreshes come when due also while no request does (an idle
        // source, no periodic snapshots); `recv` is cancel safe.
        let wait = ttl.wait(now_ms());
        let received = tokio::select! {
            received = rx.recv() => received,
            () = tokio::time::sleep(wait) => {
                ttl.tick(&mut store, now_ms()).await;
                continue;
            }
        };
        let request = match received {
            Ok(request) => request,
            Err(FrameError::Closed) => {
                tracing::info!("supervisor closed the connection; storage exits");
                return Ok(());
            }
            Err(e) => return Err(e).context("receiving a request from the supervisor"),
        };
        let now = now_ms();
        let write = match &request {
            ToStorage::Write { id, .. } => Some(*id),
            _ => None,
        };
        let replies = handle(&mut store, dlq.as_ref(), &mut archive, request, now).await;
        let failed = replies
            .iter()
            .any(|r| matches!(r, FromStorage::Failed { .. }));
        for reply in replies {
            tx.send(&reply)
                .await
                .context("sending a reply to the supervisor")?;
        }
        // Later writes may be queued behind it, some for the same shards:
        // committing one would move the shard's position past the failed
        // write's events, and its retry would then be skipped as a replay
        // (its changes lost). So nothing more is served: the supervisor
        // starts a new storage process and sends the writes again, in order.
        if let (Some(id), true) = (write, failed) {
            anyhow::bail!("write {id} failed; stopping so that no later write commits past it");
        }
    }
}

/// The refreshes of current items' TTL: at start, then every `every` ms
/// (the serve loop wakes for them). The AWS store's refresh (an
/// `UpdateItem` per due item) runs in a task of its own, so that a large
/// table does not hold requests up: waiting for it, the supervisor would
/// take storage for stalled.
struct TtlRefresh {
    every: i64,
    /// When the last refresh started (0: never).
    last: i64,
    running: Option<tokio::task::JoinHandle<Result<u64, AwsStoreError>>>,
}

impl TtlRefresh {
    fn every(every: i64) -> TtlRefresh {
        TtlRefresh {
            every,
            last: 0,
            running: None,
        }
    }

    async fn tick(&mut self, store: &mut Backend, now: i64) {
        if let Some(task) = self.running.take_if(|t| t.is_finished()) {
            let result = task.await.unwrap_or_else(|e| {
                Err(AwsStoreError::MetricWrite {
                    detail: format!("the TTL refresh task failed: {e}"),
                    retryable: true,
                })
            });
            self.finished(result.map_err(BackendError::from), now);
        }
        if self.running.is_some() || now.saturating_sub(self.last) < self.every {
            return;
        }
        self.last = now;
        match store {
            Backend::Aws(aws) => {
                let refresher = aws.ttl_refresher();
                self.running = Some(tokio::spawn(async move { refresher.refresh(now).await }));
            }
            Backend::Embedded { .. } => {
                let result = store.refresh_ttl(now).await;
                self.finished(result, now);
            }
        }
    }

    /// How long until the next refresh is due (or, while one runs, until
    /// it is looked at again).
    fn wait(&self, now: i64) -> Duration {
        let due_in = if self.running.is_some() {
            10_000
        } else {
            self.last.saturating_add(self.every).saturating_sub(now)
        };
        Duration::from_millis(due_in.clamp(0, self.every) as u64)
    }

    /// Logs a refresh's outcome; after a failure the next is due in a
    /// minute (or sooner, when refreshes are that frequent).
    fn finished(&mut self, result: Result<u64, BackendError>, now: i64) {
        match result {
            Ok(items) => tracing::info!(items, "refreshed the TTL of current items"),
            Err(error) => {
                tracing::warn!(%error, "refreshing item TTLs failed; retrying in a minute");
                self.last = now.saturating_sub(self.every.saturating_sub(60_000).max(0));
            }
        }
    }
}

/// Connects to DynamoDB and S3, waiting with the outage backoff for as long
/// as they are unreachable (the supervisor holds input back meanwhile); a
/// setting that cannot work is an error at once.
pub async fn connect_aws(cfg: AwsConfig) -> anyhow::Result<AwsStore> {
    retry(
        &OUTAGE_BACKOFF,
        "connect",
        AwsStoreError::is_retryable,
        || AwsStore::connect(cfg.clone()),
    )
    .await
    .context("connecting to the AWS store")
}

/// A store operation, boxed so one retry loop serves them all.
type StoreOp<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Runs `op` until it succeeds or fails for good; retryable failures of
/// the AWS store are retried here (see the module doc), others returned.
/// `input` is what the operation borrows (its own lifetime would not fit
/// the boxed future's otherwise).
async fn until_done<I: ?Sized + Sync, T>(
    store: &mut Backend,
    what: &str,
    input: &I,
    mut op: impl for<'a> FnMut(&'a mut Backend, &'a I) -> StoreOp<'a, T>,
) -> Result<T, BackendError> {
    let mut attempt = 0u32;
    loop {
        match op(store, input).await {
            Err(e) if store.is_aws() && e.is_retryable() => {
                let delay = OUTAGE_BACKOFF.delay(attempt, random_u64());
                tracing::warn!(what, attempt, delay_ms = delay.as_millis() as u64, error = %e,
                    "the store is unreachable; retrying");
                crate::aws_store::retry::note_retry();
                tokio::time::sleep(delay).await;
                attempt = attempt.saturating_add(1);
            }
            result => return result,
        }
    }
}

/// Which topic-partitions have had a range archived.
#[derive(Default)]
struct ArchiveState {
    /// Topic-partitions archived since this process started, or since their
    /// shard was last loaded, with the hour of their last range.
    continued: HashMap<(Box<str>, Shard), i64>,
}

impl ArchiveState {
    /// Whether other objects with `range`'s first offset must go before it
    /// is stored. A range that never committed (a crash between upload and
    /// commit) started at the first offset after the durable position, or
    /// at the first event of a later hour within its write: the ranges
    /// that replace it start there too. So: the first range of a
    /// topic-partition since a (re)start or load, and a range of a later
    /// hour than the one before.
    fn needs_clean(&self, range: &ArchivedEvents) -> bool {
        let partition = (range.stream.clone(), range.shard);
        self.continued.get(&partition) != Some(&range.hour())
    }

    fn archived(&mut self, range: &ArchivedEvents) {
        self.continued
            .insert((range.stream.clone(), range.shard), range.hour());
    }
}

/// Stores the archive objects a write carries, waiting out outages like a
/// write.
async fn archive_ranges(
    store: &mut Backend,
    state: &mut ArchiveState,
    changes: &[ShardChanges],
) -> Result<(), BackendError> {
    for range in changes.iter().flat_map(|c| &c.archive) {
        let clean = state.needs_clean(range);
        let key = until_done(store, "archive events", range, |s, r| {
            Box::pin(s.archive_events(r, clean))
        })
        .await?;
        tracing::debug!(key, events = range.events, "events archived");
        state.archived(range);
    }
    Ok(())
}

async fn handle(
    store: &mut Backend,
    dlq: Option<&KafkaDlq>,
    archive: &mut ArchiveState,
    request: ToStorage,
    now: i64,
) -> Vec<FromStorage> {
    match request {
        ToStorage::Load { id, shard } => {
            // Whoever owned the shard before may have left an uncommitted range.
            archive.continued.retain(|(_, s), _| *s != shard);
            let loaded = until_done(store, "load", &(), |s, _| {
                Box::pin(s.load_shard(shard, LOAD_CHUNK_PRODUCTS))
            })
            .await;
            match loaded {
                Ok(chunks) => chunks
                    .into_iter()
                    .map(|state| FromStorage::Loaded { id, state })
                    .collect(),
                Err(e) => vec![failed(id, "load", shard.to_string(), &e, e.is_retryable())],
            }
        }
        ToStorage::Write { id, mut changes } => {
            if let Err(e) = archive_ranges(store, archive, &changes).await {
                let retryable = e.is_retryable();
                return vec![failed(id, "write", "event archive".into(), &e, retryable)];
            }
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
            write(store, id, &changes, now, published).await
        }
        ToStorage::Snapshot { id } => {
            match until_done(store, "snapshot", &(), |s, _| Box::pin(s.snapshot(now))).await {
                Ok(key) => {
                    tracing::info!(id, key, "metric snapshot archived");
                    vec![FromStorage::Snapshotted { id, key }]
                }
                Err(e) => vec![failed(id, "snapshot", String::new(), &e, e.is_retryable())],
            }
        }
    }
}

/// Writes changes; `published` dead letters already went to the topic.
async fn write(
    store: &mut Backend,
    id: u64,
    changes: &[ShardChanges],
    now: i64,
    published: u64,
) -> Vec<FromStorage> {
    let result = until_done(store, "write", changes, |s, c| Box::pin(s.write(c, now))).await;
    match result {
        Ok(stats) => {
            tracing::debug!(
                id,
                shards_applied = stats.shards_applied,
                shards_skipped = stats.shards_skipped,
                products = stats.products,
                entities = stats.entities,
                low_stock_puts = stats.low_stock_puts,
                low_stock_deletes = stats.low_stock_deletes,
                dead_letters = stats.dead_letters,
                "write committed"
            );
            let (retries, throttles) = crate::aws_store::retry::take_counts();
            let report = WriteReport {
                dead_letters: published + stats.dead_letters,
                retries,
                throttles,
                requests: crate::aws_store::requests::take()
                    .into_iter()
                    .map(|(op, n)| (op.into(), n))
                    .collect(),
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
    use crate::store::{EmbeddedStore, StoreOptions};
    use proto::{EntityKey, EntityTotals, Position, ProductId, ShardChanges};

    #[tokio::test]
    async fn current_items_are_refreshed_at_start_then_four_times_a_lifetime_at_most_daily() {
        assert_eq!(ttl_refresh_ms(30 * 86_400), 86_400_000);
        assert_eq!(ttl_refresh_ms(86_400), 21_600_000);
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            ttl: Duration::from_secs(86_400),
        };
        let mut store = Backend::Embedded {
            store: EmbeddedStore::open(dir.path(), opts).unwrap(),
            archive_dir: dir.path().join("archive"),
        };
        let start = 1_696_176_060_000;
        let mut ttl = TtlRefresh::every(ttl_refresh_ms(86_400));
        for (now, last) in [
            (start, start),
            (start + 21_599_999, start),
            (start + 21_600_000, start + 21_600_000),
        ] {
            ttl.tick(&mut store, now).await;
            assert_eq!(ttl.last, last, "at {now}");
        }
        assert_eq!(
            ttl.wait(start + 21_600_001),
            Duration::from_millis(21_599_999)
        );
        // A failed refresh is due again a minute later.
        ttl.finished(
            Err(BackendError::Snapshot(std::io::Error::other("x"))),
            start,
        );
        assert_eq!(ttl.last, start - 21_600_000 + 60_000);
        assert_eq!(ttl.wait(start), Duration::from_secs(60));
    }

    type Serving = (
        proto::Sender<ToStorage>,
        proto::Receiver<FromStorage>,
        proto::Hello,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    );

    /// A storage process's loop serving `store` (its archive in
    /// `dir/archive`) on a socketpair, and the supervisor's end of it after
    /// the handshake.
    async fn serving(store: EmbeddedStore, dir: &std::path::Path) -> Serving {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let backend = Backend::Embedded {
            store,
            archive_dir: dir.join("archive"),
        };
        let server = tokio::spawn(serve(theirs, backend, None));
        let (tx, rx, hello) =
            proto::handshake::<ToStorage, FromStorage>(ours, Role::Supervisor, Role::Storage)
                .await
                .unwrap();
        (tx, rx, hello, server)
    }

    /// Offsets `offsets` of stream `t`, shard 0, one a minute from 16:50 UTC.
    fn range(offsets: std::ops::RangeInclusive<i64>) -> ArchivedEvents {
        let mut w = analytics_worker::archive::RangeWriter::new("t", 0);
        for o in offsets {
            w.push(o, 1_696_179_000_000 + o * 60_000, b"{}", true);
        }
        w.finish().unwrap()
    }

    /// A write that never committed (a crash between upload and commit)
    /// left an object at its first offset and one at the first event of
    /// the next hour; the write that replaces it ends elsewhere.
    #[tokio::test]
    async fn a_write_replacing_an_uncommitted_one_removes_its_objects_of_every_hour() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let archive = dir.path().join("archive");
        let stale = [range(0..=9), range(10..=25)];
        for r in &stale {
            crate::archive::write_event_range(&archive, r, false).unwrap();
        }
        assert_ne!(stale[0].hour(), stale[1].hour());
        let (mut tx, mut rx, _, server) = serving(store, dir.path()).await;
        let replacing = [range(0..=9), range(10..=20)];
        tx.send(&ToStorage::Write {
            id: 1,
            changes: vec![ShardChanges {
                shard: 0,
                positions: vec![Position {
                    stream: "t".into(),
                    offset: 20,
                }],
                archive: replacing.to_vec(),
                ..ShardChanges::default()
            }],
        })
        .await
        .unwrap();
        let FromStorage::Written { id: 1, .. } = rx.recv().await.unwrap() else {
            panic!("expected Written")
        };
        let key = |r: &ArchivedEvents| crate::archive::event_range_key(r).unwrap();
        assert!(!archive.join(key(&stale[1])).exists(), "{}", key(&stale[1]));
        for r in &replacing {
            assert!(archive.join(key(r)).is_file(), "{}", key(r));
        }
        drop(tx);
        server.await.unwrap().unwrap();
    }

    #[test]
    fn a_range_is_cleaned_up_first_after_a_start_or_at_a_later_hour() {
        let mut state = ArchiveState::default();
        let first = range(0..=3);
        assert!(state.needs_clean(&first));
        state.archived(&first);
        assert!(!state.needs_clean(&range(4..=6)));
        assert!(state.needs_clean(&range(10..=12)));
        let other = ArchivedEvents {
            shard: 1,
            ..first.clone()
        };
        assert!(state.needs_clean(&other));
    }

    #[tokio::test]
    async fn write_then_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let archive = dir.path().join("archive");
        let (mut tx, mut rx, hello, server) = serving(store, dir.path()).await;
        assert_eq!(hello.role, Role::Storage);

        let changes = crate::store::tests::worked_check_changes();
        let mut products = changes[1].products.decode().unwrap();
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
    async fn nothing_after_a_failed_write_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        // The first write's archive object cannot be stored: a file stands
        // where its directory would go.
        std::fs::create_dir_all(dir.path().join("archive")).unwrap();
        std::fs::write(dir.path().join("archive/events"), b"in the way").unwrap();
        let (mut tx, mut rx, _, server) = serving(store, dir.path()).await;
        let mut changes = crate::store::tests::worked_check_changes();
        let mut range = analytics_worker::archive::RangeWriter::new("events", 0);
        range.push(1, 1_696_176_061_000, b"{}", true);
        changes[0].archive.push(range.finish().unwrap());
        // Both queued before the first is answered, as the supervisor does.
        for (id, c) in [(1, &changes[0]), (2, &changes[1])] {
            tx.send(&ToStorage::Write {
                id,
                changes: vec![c.clone()],
            })
            .await
            .unwrap();
        }
        assert!(matches!(
            rx.recv().await.unwrap(),
            FromStorage::Failed { id: 1, .. }
        ));
        assert!(
            matches!(rx.recv().await, Err(FrameError::Closed)),
            "the second write is not answered"
        );
        assert!(server.await.unwrap().is_err());
        // ... nor committed: the shard holds nothing.
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let state = store.load_shard(0, 1000).unwrap();
        assert!(
            state
                .iter()
                .all(|s| s.positions.is_empty() && s.products.is_empty())
        );
    }

    #[tokio::test]
    async fn a_broken_frame_is_an_error() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let (tx, rx, _, server) = serving(store, dir.path()).await;
        drop((tx, rx));
        server.await.unwrap().unwrap();

        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let backend = Backend::Embedded {
            store,
            archive_dir: dir.path().join("archive"),
        };
        let server = tokio::spawn(serve(theirs, backend, None));
        // Not a hello at all: a frame claiming far too many bytes.
        ours.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        assert!(server.await.unwrap().is_err());
    }
}
