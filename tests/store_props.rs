//! The real embedded store under any schedule (DESIGN §5): generated events
//! (both dialects, malformed lines among them) are folded in batches; each
//! flush is written to a redb store, in one write or in two parts as a
//! worker's answer may be; events are redelivered; the worker crashes, is
//! restored from what the store holds (in chunks) and resumes after the
//! lowest durable position; and earlier writes reach the store again. Whatever the schedule, the store's records equal
//! the straight fold of the events, so does a fold restored from the store,
//! and each malformed line is a dead letter exactly once.
//!
//! `worker/tests/fold_props.rs` checks the fold against a model of the
//! store; this checks the store itself.

use analytics::store::{EmbeddedStore, StoreOptions};
use analytics_worker::fold::Fold;
use analytics_worker::generate::{GenOptions, generate};
use analytics_worker::records::MetricRecord;
use proptest::prelude::*;
use proto::{EventBatch, Offset, Shard, ShardChanges};
use std::collections::BTreeMap;
use supervisor::route::{seller_key, shard_for_key};

const SHARDS: u32 = 4;
const LOW_STOCK: i64 = 10;
const MAX_EVENT: usize = 1 << 20;
const STREAM: &str = "file";

/// The generated lines, each with the shard the file source routes it to.
fn events(seed: u64, count: u64) -> Vec<(Shard, Vec<u8>)> {
    let opts = GenOptions {
        events: count,
        sellers: 6,
        seed,
        bad_every: 17,
        ..GenOptions::default()
    };
    let mut out = Vec::new();
    generate(&opts, &mut out).expect("generate into memory");
    // Every line counts, the empty ones too (one kind of malformed line),
    // as the file source reads them.
    out.strip_suffix(b"\n")
        .unwrap_or(&out)
        .split(|&b| b == b'\n')
        .map(|l| {
            let shard = seller_key(l).map_or(0, |k| shard_for_key(&k, SHARDS));
            (shard, l.to_vec())
        })
        .collect()
}

/// Folds events `range`, offsets = index, one batch per shard.
fn feed(fold: &mut Fold, events: &[(Shard, Vec<u8>)], range: std::ops::Range<usize>) {
    let mut batches: BTreeMap<Shard, EventBatch> = BTreeMap::new();
    for i in range {
        let (shard, line) = &events[i];
        batches
            .entry(*shard)
            .or_insert_with(|| EventBatch::new(*shard, STREAM.into()))
            .push(i as Offset, line);
    }
    for b in batches.values() {
        fold.apply_batch(b);
    }
}

fn lines(records: &[MetricRecord]) -> Vec<String> {
    records.iter().map(MetricRecord::to_json_line).collect()
}

/// A worker restarted on what the store holds, restored in small chunks.
fn restored(store: &EmbeddedStore) -> Fold {
    let mut fold = Fold::new(LOW_STOCK, MAX_EVENT);
    for shard in 0..SHARDS {
        let chunks = store.load_shard(shard, 7).expect("load a shard");
        for (i, chunk) in chunks.into_iter().enumerate() {
            fold.restore(chunk, i == 0);
        }
    }
    fold
}

/// Where the source resumes: after the lowest durable position.
fn resume_from(store: &EmbeddedStore) -> usize {
    let stored: BTreeMap<Shard, Offset> = store
        .positions()
        .expect("positions")
        .into_iter()
        .map(|(s, p)| (s, p.offset))
        .collect();
    (0..SHARDS)
        .map(|s| stored.get(&s).map_or(0, |&o| o as usize + 1))
        .min()
        .unwrap_or(0)
}

#[derive(Clone, Debug)]
enum Action {
    /// Fold the next `n` events.
    Feed(usize),
    /// Write the changes, split into two writes after `split` shards.
    Flush { split: usize },
    /// Re-send the last `n` events already fed (a redelivery).
    Replay(usize),
    /// Lose the fold; restore from the store and resume after its position.
    Crash,
    /// Deliver the `k`-th last write again (a write replayed to the store,
    /// however stale): it must change nothing.
    Resend(usize),
}

fn actions() -> impl Strategy<Value = Vec<Action>> {
    proptest::collection::vec(
        prop_oneof![
            4 => (1usize..60).prop_map(Action::Feed),
            2 => (0usize..5).prop_map(|split| Action::Flush { split }),
            1 => (1usize..40).prop_map(Action::Replay),
            1 => Just(Action::Crash),
            1 => (0usize..4).prop_map(Action::Resend),
        ],
        0..30,
    )
}

/// Writes the fold's changes, in two parts split after `split` shards;
/// keeps each part in `written`.
fn write(
    store: &mut EmbeddedStore,
    fold: &mut Fold,
    split: usize,
    written: &mut Vec<Vec<ShardChanges>>,
) {
    let changes = fold.take_changes().expect("changes encode");
    let (first, second) = changes.split_at(split.min(changes.len()));
    for part in [first, second] {
        if !part.is_empty() {
            store
                .write(part, analytics::storage::now_ms())
                .expect("write");
            written.push(part.to_vec());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_schedule_of_flushes_replays_and_crashes_stores_the_straight_fold(
        seed in any::<u64>(),
        count in 50u64..400,
        plan in actions(),
    ) {
        let events = events(seed, count);
        let mut straight = Fold::new(LOW_STOCK, MAX_EVENT);
        feed(&mut straight, &events, 0..events.len());
        let expected = lines(&straight.records());

        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = EmbeddedStore::open(dir.path(), StoreOptions::default()).expect("open");
        let mut fold = Fold::new(LOW_STOCK, MAX_EVENT);
        let mut cursor = 0usize;
        let mut written = Vec::new();
        for action in plan {
            match action {
                Action::Feed(n) => {
                    let end = (cursor + n).min(events.len());
                    feed(&mut fold, &events, cursor..end);
                    cursor = end;
                }
                Action::Flush { split } => write(&mut store, &mut fold, split, &mut written),
                Action::Replay(n) => feed(&mut fold, &events, cursor.saturating_sub(n)..cursor),
                Action::Crash => {
                    fold = restored(&store);
                    cursor = resume_from(&store);
                }
                Action::Resend(k) => {
                    if let Some(part) = written.iter().rev().nth(k) {
                        store.write(part, analytics::storage::now_ms()).expect("write");
                    }
                }
            }
        }
        feed(&mut fold, &events, cursor..events.len());
        write(&mut store, &mut fold, 1, &mut written);

        let now = analytics::storage::now_ms();
        prop_assert_eq!(&lines(&store.current_records(now).expect("records")), &expected);
        prop_assert_eq!(&lines(&restored(&store).records()), &expected);

        let letters = std::fs::read_to_string(store.dead_letter_path()).unwrap_or_default();
        let mut letters: Vec<&str> = letters.lines().collect();
        let written = letters.len();
        letters.sort_unstable();
        letters.dedup();
        prop_assert_eq!(written, letters.len(), "a dead letter was stored twice");
        prop_assert_eq!(written as u64, count / 17, "a malformed line is missing");
    }
}
