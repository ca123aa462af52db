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

/// Payload bytes per archive message cut from a ledger batch (one at either
/// end of a range), far below the frame limit. A batch wholly inside a
/// range goes as it is: it came in a frame already.
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
/// `(after, upto]` to `out`. A ledger batch that lies wholly inside goes as
/// it is (decoding it is the one copy); only the batches at the ends of
/// the range are cut, into chunks of at most [`CHUNK_BYTES`].
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
        if batch.offsets.first().is_some_and(|&o| o > upto) {
            break;
        }
        if let Some(end) = end_if_inside(&batch.offsets, last, upto) {
            if !chunk.is_empty() {
                out.push(std::mem::replace(
                    &mut chunk,
                    EventBatch::new(shard, stream.into()),
                ));
            }
            last = end;
            out.push(batch);
            continue;
        }
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
    }
    if !chunk.is_empty() {
        out.push(chunk);
    }
}

/// The last offset, when the offsets are not empty, strictly increasing,
/// and all in `(after, upto]`.
fn end_if_inside(offsets: &[Offset], after: Offset, upto: Offset) -> Option<Offset> {
    let (&first, &last) = (offsets.first()?, offsets.last()?);
    (first > after && last <= upto && offsets.windows(2).all(|w| w[0] < w[1])).then_some(last)
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

    /// The ranges the messages make up, as storage sees them: consecutive
    /// messages of one topic-partition join.
    fn offsets(batches: &[EventBatch]) -> Vec<(Shard, String, Vec<Offset>)> {
        let mut ranges: Vec<(Shard, String, Vec<Offset>)> = Vec::new();
        for b in batches {
            match ranges.last_mut() {
                Some((shard, stream, offsets)) if *shard == b.shard && **stream == *b.stream => {
                    offsets.extend(&b.offsets)
                }
                _ => ranges.push((b.shard, b.stream.to_string(), b.offsets.clone())),
            }
        }
        ranges
    }

    /// The messages themselves.
    fn messages(batches: &[EventBatch]) -> Vec<Vec<Offset>> {
        batches.iter().map(|b| b.offsets.clone()).collect()
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
        let of_a: Vec<&EventBatch> = first.iter().filter(|b| &*b.stream == "a").collect();
        let timestamps: Vec<i64> = of_a.iter().flat_map(|b| b.timestamps.clone()).collect();
        assert_eq!(timestamps, [1000, 1001, 1002, 1003, 1004, 1005, 1006]);
        let last_of_a = of_a.last().and_then(|b| b.iter().last()).unwrap();
        assert_eq!(last_of_a, (6, &b"event 6"[..]));

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
    fn whole_batches_go_as_they_are_and_cut_ones_in_chunks() {
        let mut ledger = Ledger::default();
        push(&mut ledger, 0, "a", 0..=2);
        push(&mut ledger, 0, "a", 3..=5);
        push(&mut ledger, 0, "a", 6..=9);
        let mut archive = EventArchive::default();
        // 0..=2 and 3..=5 whole, 6..=9 cut at 7.
        let first = archive.take(&ledger, &[changes(0, &[("a", 7)])]);
        assert_eq!(messages(&first), [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]);
        assert_eq!(first[1].iter().nth(2).unwrap().1, b"event 5");
        assert_eq!(first[1].timestamps, [1003, 1004, 1005]);
        // The rest of the cut batch.
        let second = archive.take(&ledger, &[changes(0, &[("a", 9)])]);
        assert_eq!(messages(&second), [vec![8, 9]]);
    }

    #[test]
    fn large_cut_batches_come_in_chunks() {
        let mut ledger = Ledger::default();
        let big = vec![b'x'; CHUNK_BYTES / 2 + 1];
        let mut b = EventBatch::new(0, "a".into());
        for o in 0..6 {
            b.push_at(o, o, &big);
        }
        let mut f = Vec::new();
        encode_into(&ToWorker::Events(b), &mut f).unwrap();
        ledger.push(0, "a".into(), 5, 6, Arc::new(f));
        // A write up to 4 cuts the batch.
        let got = EventArchive::default().take(&ledger, &[changes(0, &[("a", 4)])]);
        assert_eq!(messages(&got), [vec![0, 1], vec![2, 3], vec![4]]);
    }
}
