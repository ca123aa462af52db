//! The position ledger: per shard, the events handed to a worker but not yet
//! acknowledged by storage (kept as encoded frames, so a restarted worker can
//! be sent them again), and the last acknowledged offset per stream.

use proto::{Offset, Position, Shard};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

struct Pending {
    stream: Arc<str>,
    last_offset: Offset,
    events: u64,
    frame: Arc<Vec<u8>>,
}

#[derive(Default)]
struct ShardLedger {
    acked: HashMap<Arc<str>, Offset>,
    pending: VecDeque<Pending>,
}

#[derive(Default)]
pub struct Ledger {
    shards: BTreeMap<Shard, ShardLedger>,
    bytes: usize,
}

impl Ledger {
    /// Remembers a batch sent (or to be sent) to the shard's worker.
    pub fn push(
        &mut self,
        shard: Shard,
        stream: Arc<str>,
        last_offset: Offset,
        events: u64,
        frame: Arc<Vec<u8>>,
    ) {
        let s = self.shards.entry(shard).or_default();
        if s.acked.get(&stream).is_some_and(|&a| a >= last_offset) {
            return;
        }
        self.bytes += frame.len();
        s.pending.push_back(Pending {
            stream,
            last_offset,
            events,
            frame,
        });
    }

    /// Storage holds the shard up to these positions: forget what they cover.
    /// Returns how many events that was.
    pub fn ack(&mut self, shard: Shard, positions: &[Position]) -> u64 {
        let s = self.shards.entry(shard).or_default();
        for p in positions {
            let slot = s.acked.entry(Arc::from(&*p.stream)).or_insert(Offset::MIN);
            *slot = (*slot).max(p.offset);
        }
        let acked = &s.acked;
        let (mut freed, mut events) = (0, 0);
        s.pending.retain(|b| {
            let done = acked.get(&b.stream).is_some_and(|&a| a >= b.last_offset);
            if done {
                freed += b.frame.len();
                events += b.events;
            }
            !done
        });
        self.bytes -= freed;
        events
    }

    /// Drops a shard (it moved to another owner).
    pub fn forget(&mut self, shard: Shard) {
        if let Some(s) = self.shards.remove(&shard) {
            self.bytes -= s.pending.iter().map(|p| p.frame.len()).sum::<usize>();
        }
    }

    /// The last acknowledged offset of a stream in a shard.
    pub fn acked(&self, shard: Shard, stream: &str) -> Option<Offset> {
        self.shards.get(&shard)?.acked.get(stream).copied()
    }

    /// Frames not yet acknowledged, oldest first.
    pub fn pending(&self, shard: Shard) -> impl Iterator<Item = &Arc<Vec<u8>>> {
        self.shards
            .get(&shard)
            .into_iter()
            .flat_map(|s| s.pending.iter().map(|p| &p.frame))
    }

    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_drained(&self) -> bool {
        self.shards.values().all(|s| s.pending.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(stream: &str, offset: Offset) -> Position {
        Position {
            stream: stream.into(),
            offset,
        }
    }

    #[test]
    fn ack_trims_what_storage_holds() {
        let mut l = Ledger::default();
        let f = |n: usize| Arc::new(vec![0u8; n]);
        l.push(0, "a".into(), 10, 2, f(5));
        l.push(0, "a".into(), 20, 3, f(7));
        l.push(0, "b".into(), 3, 1, f(1));
        assert_eq!(l.buffered_bytes(), 13);
        assert_eq!(l.ack(0, &[pos("a", 15)]), 2);
        assert_eq!(l.buffered_bytes(), 8);
        assert_eq!(l.pending(0).count(), 2);
        assert_eq!(l.ack(0, &[pos("a", 20), pos("b", 3)]), 4);
        assert!(l.is_drained());
        assert_eq!(l.ack(0, &[pos("a", 20)]), 0, "an ack counts events once");
        assert_eq!(l.acked(0, "a"), Some(20));
        // A batch already covered by an ack is not kept.
        l.push(0, "a".into(), 19, 4, f(9));
        assert!(l.is_drained());
    }
}
