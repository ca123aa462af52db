//! The supervisor's side of the raw event archive (DESIGN §6): with each
//! write, storage gets the consumed events that the write's positions newly
//! cover, per topic-partition, and archives them before it commits the
//! write.
//!
//! A topic-partition's range in a write runs from just after what earlier
//! writes covered to the write's position, so ranges follow one another
//! without gaps or overlaps. A write resent to a restarted storage process
//! carries the same events, so its objects get the same names and overwrite
//! themselves. After a restart of the whole service, or when a partition
//! moves to another instance, ranges start again right after the durable
//! position: storage then removes an object that an uncommitted write left
//! with the same first offset (`src/archive.rs`).

use crate::ledger::Ledger;
use proto::{EventBatch, Offset, Position, Shard, ShardChanges, ToWorker};
use std::collections::HashMap;
use std::sync::Arc;

/// Payload bytes per archive message: a range larger than this travels in
/// several, each far below the frame limit.
const CHUNK_BYTES: usize = 8 << 20;

#[derive(Default)]
pub struct EventArchive {
    /// The last offset a write covered, per (shard, topic).
    covered: HashMap<(Shard, Arc<str>), Offset>,
}

impl EventArchive {
    /// Storage holds the shard up to `positions` (a restore): ranges start
    /// after them.
    pub fn restored(&mut self, shard: Shard, positions: &[Position]) {
        for p in positions {
            let slot = self
                .covered
                .entry((shard, Arc::from(&*p.stream)))
                .or_insert(p.offset);
            *slot = (*slot).max(p.offset);
        }
    }

    /// The shard moved to another owner.
    pub fn forget(&mut self, shard: Shard) {
        self.covered.retain(|(s, _), _| *s != shard);
    }

    /// The events of the ledger that `changes` newly cover, in archive
    /// messages (one topic-partition each, in offset order), and marks them
    /// covered.
    pub fn take(&mut self, ledger: &Ledger, changes: &[ShardChanges]) -> Vec<EventBatch> {
        let mut out = Vec::new();
        for change in changes {
            for p in &change.positions {
                let key = (change.shard, Arc::from(&*p.stream));
                let from = self.covered.get(&key).copied().unwrap_or(Offset::MIN);
                if p.offset <= from {
                    continue;
                }
                collect(ledger, change.shard, &p.stream, from, p.offset, &mut out);
                self.covered.insert(key, p.offset);
            }
        }
        out
    }
}

/// Appends the ledger's events of `stream` in `shard` with offsets in
/// `(after, upto]` to `out`, chunked.
fn collect(
    ledger: &Ledger,
    shard: Shard,
    stream: &str,
    after: Offset,
    upto: Offset,
    out: &mut Vec<EventBatch>,
) {
    let mut chunk = EventBatch::new(shard, stream.into());
    let mut last = after;
    for frame in ledger.pending_of(shard, stream, after) {
        let batch = match frame.get(4..).map(proto::frame::decode::<ToWorker>) {
            Some(Ok(ToWorker::Events(batch))) => batch,
            // Our own encoding of our own message: cannot happen.
            _ => {
                tracing::error!(
                    shard,
                    stream,
                    "a ledger frame does not decode; its events are not archived"
                );
                continue;
            }
        };
        for (i, (offset, bytes)) in batch.iter().enumerate() {
            // Strictly increasing offsets within the range: a batch seen
            // twice adds nothing twice.
            if offset <= last || offset > upto {
                continue;
            }
            last = offset;
            chunk.push_at(offset, batch.timestamp(i), bytes);
            if chunk.payload.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut chunk, EventBatch::new(shard, stream.into()));
                out.push(full);
            }
        }
        if batch.offsets.first().is_some_and(|&o| o > upto) {
            break;
        }
    }
    if !chunk.is_empty() {
        out.push(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::frame::encode_into;

    fn frame(
        shard: Shard,
        stream: &str,
        offsets: std::ops::RangeInclusive<Offset>,
    ) -> (Offset, Arc<Vec<u8>>) {
        let mut b = EventBatch::new(shard, stream.into());
        for o in offsets {
            b.push_at(o, 1_000 + o, format!("event {o}").as_bytes());
        }
        let mut f = Vec::new();
        encode_into(&ToWorker::Events(b.clone()), &mut f).unwrap();
        (b.upto, Arc::new(f))
    }

    fn push(
        ledger: &mut Ledger,
        shard: Shard,
        stream: &str,
        offsets: std::ops::RangeInclusive<Offset>,
    ) {
        let n = offsets.clone().count() as u64;
        let (last, f) = frame(shard, stream, offsets);
        ledger.push(shard, stream.into(), last, n, f);
    }

    fn changes(shard: Shard, positions: &[(&str, Offset)]) -> ShardChanges {
        ShardChanges {
            shard,
            positions: positions
                .iter()
                .map(|&(s, offset)| Position {
                    stream: s.into(),
                    offset,
                })
                .collect(),
            ..ShardChanges::default()
        }
    }

    fn offsets(batches: &[EventBatch]) -> Vec<(Shard, String, Vec<Offset>)> {
        batches
            .iter()
            .map(|b| (b.shard, b.stream.to_string(), b.offsets.clone()))
            .collect()
    }

    #[test]
    fn ranges_follow_the_writes_without_gaps_or_overlaps() {
        let mut ledger = Ledger::default();
        push(&mut ledger, 1, "a", 0..=4);
        push(&mut ledger, 1, "b", 10..=12);
        push(&mut ledger, 1, "a", 5..=9);
        push(&mut ledger, 2, "a", 0..=1);
        let mut archive = EventArchive::default();

        let first = archive.take(&ledger, &[changes(1, &[("a", 6), ("b", 12)])]);
        assert_eq!(
            offsets(&first),
            [
                (1, "a".into(), vec![0, 1, 2, 3, 4, 5, 6]),
                (1, "b".into(), vec![10, 11, 12])
            ]
        );
        assert_eq!(
            first[0].timestamps,
            [1000, 1001, 1002, 1003, 1004, 1005, 1006]
        );
        assert_eq!(first[0].iter().nth(6).unwrap().1, b"event 6");

        // The same positions again cover nothing new; later ones the rest.
        assert!(archive.take(&ledger, &[changes(1, &[("a", 6)])]).is_empty());
        let second = archive.take(&ledger, &[changes(1, &[("a", 9)]), changes(2, &[("a", 1)])]);
        assert_eq!(
            offsets(&second),
            [(1, "a".into(), vec![7, 8, 9]), (2, "a".into(), vec![0, 1])]
        );
    }

    #[test]
    fn a_restore_starts_after_the_durable_position() {
        let mut ledger = Ledger::default();
        // Re-read from an older committed offset after a restart.
        push(&mut ledger, 0, "a", 0..=9);
        let mut archive = EventArchive::default();
        archive.restored(
            0,
            &[Position {
                stream: "a".into(),
                offset: 5,
            }],
        );
        let got = archive.take(&ledger, &[changes(0, &[("a", 9)])]);
        assert_eq!(offsets(&got), [(0, "a".into(), vec![6, 7, 8, 9])]);

        // A forgotten shard starts from whatever the next restore says.
        archive.forget(0);
        let got = archive.take(&ledger, &[changes(0, &[("a", 9)])]);
        assert_eq!(offsets(&got)[0].2.len(), 10);
    }

    #[test]
    fn large_ranges_come_in_chunks() {
        let mut ledger = Ledger::default();
        let big = vec![b'x'; CHUNK_BYTES / 2 + 1];
        let mut b = EventBatch::new(0, "a".into());
        for o in 0..5 {
            b.push_at(o, o, &big);
        }
        let mut f = Vec::new();
        encode_into(&ToWorker::Events(b), &mut f).unwrap();
        ledger.push(0, "a".into(), 4, 5, Arc::new(f));
        let got = EventArchive::default().take(&ledger, &[changes(0, &[("a", 4)])]);
        assert_eq!(
            offsets(&got),
            [
                (0, "a".into(), vec![0, 1]),
                (0, "a".into(), vec![2, 3]),
                (0, "a".into(), vec![4])
            ]
        );
    }
}
