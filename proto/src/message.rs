//! Messages between the supervisor and its children, and the handshake.

use crate::model::*;
use serde::{Deserialize, Serialize};

/// Bumped whenever a message changes shape; peers of different versions
/// refuse each other at the handshake.
pub const PROTOCOL_VERSION: u32 = 9;
/// First bytes of every hello, so a stray connection is told apart.
pub const MAGIC: [u8; 8] = *b"ANLYTCS\0";

pub type RequestId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Supervisor,
    Worker,
    Storage,
}

/// The first frame each side sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub version: u32,
    pub role: Role,
    pub pid: u32,
}

impl Hello {
    pub fn new(role: Role) -> Hello {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            role,
            pid: std::process::id(),
        }
    }
}

/// Settings a worker needs to fold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub low_stock_threshold: i64,
    pub max_event_bytes: u32,
    /// Bytes of changes per part of a flush answer (see
    /// [`FromWorker::Changes`]).
    pub answer_part_bytes: u32,
    /// Build the raw event archive (DESIGN §6) of the events applied:
    /// [`ShardChanges::archive`]. On for a Kafka source.
    pub archive_events: bool,
}

/// Raw event values of one shard and stream, packed into one buffer:
/// event `i` is `payload[ends[i-1]..ends[i]]` at `offsets[i]`, with the
/// source's timestamp `timestamps[i]` when it has them (Kafka; a file source
/// has none and leaves `timestamps` empty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    pub shard: Shard,
    pub stream: Box<str>,
    /// The stream was read up to here: the shard has no events at or below
    /// it other than these and earlier batches'. Lets a shard's position
    /// advance when the stream carries nothing for it (may be the only
    /// content of a batch).
    pub upto: Offset,
    pub offsets: Vec<Offset>,
    /// Epoch milliseconds per event, or empty; [`NO_TIMESTAMP`] when the
    /// source has none for one event.
    pub timestamps: Vec<i64>,
    pub ends: Vec<u32>,
    #[serde(with = "crate::model::bytes")]
    pub payload: Vec<u8>,
}

/// An event without a source timestamp, in [`EventBatch::timestamps`].
pub const NO_TIMESTAMP: i64 = -1;

impl EventBatch {
    pub fn new(shard: Shard, stream: Box<str>) -> EventBatch {
        EventBatch {
            shard,
            stream,
            upto: Offset::MIN,
            offsets: Vec::new(),
            timestamps: Vec::new(),
            ends: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// An empty batch with room for `events` events of `bytes` in all.
    pub fn with_capacity(
        shard: Shard,
        stream: Box<str>,
        events: usize,
        bytes: usize,
    ) -> EventBatch {
        EventBatch {
            offsets: Vec::with_capacity(events),
            ends: Vec::with_capacity(events),
            payload: Vec::with_capacity(bytes),
            ..EventBatch::new(shard, stream)
        }
    }

    pub fn push(&mut self, offset: Offset, value: &[u8]) {
        self.payload.extend_from_slice(value);
        self.offsets.push(offset);
        self.ends.push(self.payload.len() as u32);
        self.upto = self.upto.max(offset);
    }

    /// Adds an event with its source timestamp. A batch takes either only
    /// `push` or only `push_at`.
    pub fn push_at(&mut self, offset: Offset, timestamp: i64, value: &[u8]) {
        self.push(offset, value);
        self.timestamps.push(timestamp);
    }

    /// The source timestamp of event `i`, if the batch has them.
    pub fn timestamp(&self, i: usize) -> i64 {
        self.timestamps.get(i).copied().unwrap_or(NO_TIMESTAMP)
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    pub fn last_offset(&self) -> Option<Offset> {
        self.offsets.last().copied()
    }

    /// The events as (offset, bytes). A batch whose `ends` are inconsistent
    /// with its payload yields nothing past the first bad entry.
    pub fn iter(&self) -> impl Iterator<Item = (Offset, &[u8])> {
        let mut start = 0usize;
        self.offsets
            .iter()
            .zip(&self.ends)
            .map_while(move |(&offset, &end)| {
                let end = end as usize;
                let bytes = self.payload.get(start..end)?;
                start = end;
                Some((offset, bytes))
            })
    }
}

/// A slice of one shard's durable state, sent by storage when a shard is
/// loaded and forwarded to the worker that will own it. Large states come in
/// several chunks; the last has `last = true`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardState {
    pub shard: Shard,
    pub positions: Vec<Position>,
    pub products: Vec<(ProductId, ProductState)>,
    /// `lastEventAt` of the entities the shard has seen (the rest of an
    /// entity's totals is derived from the products).
    pub entity_times: Vec<(EntityKey, i64)>,
    pub last: bool,
}

/// About how many bytes of product states and entity times one `Loaded`
/// chunk carries, far below the frame limit (64 MiB): a count alone let
/// 50,000 products with names of a few KiB outgrow a frame, and such a
/// shard could never be restored.
pub const LOAD_CHUNK_BYTES: usize = 16 << 20;

impl ShardState {
    /// A shard's durable state as `Loaded` chunks: the positions in the
    /// first, then entity times and products, at most `max_products`
    /// products and about [`LOAD_CHUNK_BYTES`] per chunk; only the last
    /// has `last = true`.
    pub fn chunked(
        shard: Shard,
        positions: Vec<Position>,
        entity_times: Vec<(EntityKey, i64)>,
        products: impl IntoIterator<Item = (ProductId, ProductState)>,
        max_products: usize,
    ) -> Vec<ShardState> {
        let empty = || ShardState {
            shard,
            ..ShardState::default()
        };
        let mut chunks = vec![ShardState {
            positions,
            ..empty()
        }];
        let mut bytes = 0;
        let mut room = |chunks: &mut Vec<ShardState>, size: usize, product: bool| {
            let last = chunks.len() - 1;
            let full = (bytes > 0 && bytes + size > LOAD_CHUNK_BYTES)
                || (product && chunks[last].products.len() >= max_products.max(1));
            if full {
                chunks.push(empty());
                bytes = 0;
            }
            bytes += size;
        };
        for (key, at) in entity_times {
            let size = 16
                + match &key {
                    EntityKey::Seller(s) | EntityKey::Category(s) => s.len(),
                };
            room(&mut chunks, size, false);
            if let Some(c) = chunks.last_mut() {
                c.entity_times.push((key, at));
            }
        }
        for (id, state) in products {
            room(&mut chunks, encoded_size_hint(&id, &state), true);
            if let Some(c) = chunks.last_mut() {
                c.products.push((id, state));
            }
        }
        if let Some(c) = chunks.last_mut() {
            c.last = true;
        }
        chunks
    }
}

/// A bound on what a product's state and id take encoded besides their
/// strings (versions, numbers, length prefixes).
pub const STATE_FIXED_BYTES: usize = 160;

/// A little more than a product's encoded size: its strings and a bound on
/// the rest.
fn encoded_size_hint(id: &ProductId, state: &ProductState) -> usize {
    let text = |f: &Field<Box<str>>| f.value.as_ref().map_or(0, |s| s.len());
    let id = match id {
        ProductId::Num(_) => 0,
        ProductId::Text(s) => s.len(),
    };
    STATE_FIXED_BYTES + id + text(&state.seller) + text(&state.category) + text(&state.name)
}

/// What changed in one shard since the previous flush, as absolute values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardChanges {
    pub shard: Shard,
    /// Last applied offset of every stream the shard has seen, after these
    /// changes: all of them, so that a store can tell a stale owner's write
    /// (ahead on one stream, behind on another) from a replay.
    pub positions: Vec<Position>,
    pub products: EncodedProducts,
    /// What these product changes do to the low-stock list.
    pub low_stock: Vec<LowStockChange>,
    pub entities: Vec<(EntityKey, EntityTotals)>,
    pub dead_letters: Vec<DeadLetter>,
    /// The archive objects of the events these changes newly cover, one
    /// per stream and hour (when the worker archives events), in offset
    /// order.
    pub archive: Vec<ArchivedEvents>,
    /// Applied events among these that moved a product this shard never
    /// held from another seller, whose shard may still count it (README,
    /// "Known limits"): reported, so operators see when totals are off.
    pub moved_in: u64,
    /// Per entry of `entities`, the largest timestamp of an event that
    /// changed or named it (empty from a sender that does not know it).
    /// Its `DAY#` item is filed under this UTC day when it is later than
    /// its `lastEventAt`: an update that changes a category without naming
    /// it (a contract-dialect price change) must not rewrite the category's
    /// item of an earlier day.
    pub changed_at: Vec<i64>,
}

impl ShardChanges {
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
            && self.products.is_empty()
            && self.low_stock.is_empty()
            && self.entities.is_empty()
            && self.dead_letters.is_empty()
            && self.archive.is_empty()
            && self.moved_in == 0
    }
}

/// The consumed events of one stream (topic) of a shard (partition) that
/// one write covers, as the archive object that holds them (DESIGN §6):
/// gzip JSON lines, built by the worker, which has the events and has
/// parsed them already. Storage stores it before the write commits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedEvents {
    pub stream: Box<str>,
    pub shard: Shard,
    pub first_offset: Offset,
    pub last_offset: Offset,
    /// The first event's source timestamp (epoch ms, 0 when it had none):
    /// the object's date, so a retried write lands on the same key.
    pub time_ms: i64,
    pub events: u64,
    #[serde(with = "crate::model::bytes")]
    pub gzip: Vec<u8>,
}

impl ArchivedEvents {
    /// The hour its object is filed under (`dt=…/hour=…`), in hours since
    /// the epoch.
    pub fn hour(&self) -> i64 {
        archive_hour(self.time_ms)
    }
}

/// The hour since the epoch that an event at `ms` is archived under: a
/// range of events starts a new object when an event's hour is later than
/// its first event's, so that each object sits under the hour of its
/// events (late ones aside).
pub fn archive_hour(ms: i64) -> i64 {
    ms.div_euclid(3_600_000)
}

/// The UTC day, in days since the epoch, of an event at `ms`: where a
/// worker ends a shard's write, and under which `DAY#` items are filed.
pub fn utc_day_number(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// Product states, encoded once by the worker: the bytes of a
/// `Vec<(ProductId, ProductState)>` in the wire's encoding, which is also
/// how the embedded store's product log keeps them. The supervisor passes
/// them on untouched and the embedded store stores them as they are; only
/// a reader that needs the states decodes them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedProducts {
    pub count: u32,
    #[serde(with = "crate::model::bytes")]
    pub bytes: Vec<u8>,
}

impl EncodedProducts {
    pub fn encode<S: Serialize>(
        products: &[(ProductId, ProductStateOf<S>)],
    ) -> Result<EncodedProducts, crate::FrameError> {
        Ok(EncodedProducts {
            count: u32::try_from(products.len()).unwrap_or(u32::MAX),
            bytes: crate::frame::encode_payload(&products)?,
        })
    }

    pub fn decode(&self) -> Result<Vec<(ProductId, ProductState)>, crate::FrameError> {
        if self.bytes.is_empty() {
            return Ok(Vec::new());
        }
        crate::frame::decode(&self.bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Checks that the bytes hold `count` well-formed states, without
    /// decoding them into owned values: what a receiver does before it
    /// passes them on or stores them.
    pub fn check(&self) -> Result<(), crate::FrameError> {
        if self.bytes.is_empty() && self.count == 0 {
            return Ok(());
        }
        let states: Vec<(ProductId, ProductStateOf<&str>)> = crate::frame::check(&self.bytes)?;
        if states.len() != self.count as usize {
            return Err(crate::FrameError::CountMismatch {
                declared: self.count as usize,
                found: states.len(),
            });
        }
        Ok(())
    }
}

/// A change to the low-stock list (DESIGN §6's `LOWSTOCK#` items), worked
/// out by the worker, which knows under which seller each listed product's
/// item was filed at the previous flush.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LowStockChange {
    /// The product is listed: its item, under its seller (written whenever
    /// the product changed).
    Put(LowStockItem),
    /// The product's item under `seller_id` goes: it left the list, or it
    /// moved to another seller.
    Delete {
        seller_id: Box<str>,
        product_id: ProductId,
    },
}

/// A listed product's item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowStockItem {
    pub product_id: ProductId,
    pub seller_id: Box<str>,
    pub name: Box<str>,
    pub category: Box<str>,
    pub quantity: i64,
    pub price_cents: i64,
    /// When it went on the list (event time).
    pub since: i64,
}

impl LowStockItem {
    /// The item of a product in this state, if it is listed.
    pub fn of(product_id: &ProductId, state: &ProductState) -> Option<LowStockItem> {
        let text = |f: &Field<Box<str>>| f.value.clone().unwrap_or_default();
        Some(LowStockItem {
            product_id: product_id.clone(),
            seller_id: text(&state.seller),
            name: text(&state.name),
            category: text(&state.category),
            quantity: state.quantity.value.unwrap_or(0),
            price_cents: state.price_cents.value.unwrap_or(0),
            since: state.low_stock_since?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    Configure(WorkerConfig),
    /// Durable state of a shard the worker now owns; events for the shard
    /// follow only after the chunk with `last = true`.
    Restore(ShardState),
    Events(EventBatch),
    /// Answer with everything changed since the previous flush.
    Flush {
        id: RequestId,
    },
    /// Drop a shard's state: it moved to another owner (after its changes
    /// were flushed and made durable).
    Release {
        shard: Shard,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The answer to `Flush { id }`, in one or more parts (each within a
    /// frame): `more` until the last. Each shard's changes are whole in one
    /// part, and each part is written on its own.
    Changes {
        id: RequestId,
        shards: Vec<ShardChanges>,
        more: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToStorage {
    /// Stream the durable state of a shard back as `Loaded` chunks.
    Load { id: RequestId, shard: Shard },
    /// Write changes atomically and idempotently, then answer `Written`.
    Write {
        id: RequestId,
        changes: Vec<ShardChanges>,
    },
    /// Write a snapshot of every metric record to the archive.
    Snapshot { id: RequestId },
}

/// What a storage process did besides the write itself, for telemetry:
/// counts since its previous `Written` (so a restarted process loses at most
/// one reply's worth).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteReport {
    /// Dead letters this write stored or published (a replayed write that
    /// storage already holds writes none).
    pub dead_letters: u64,
    /// Calls to the backing store that failed and were retried.
    pub retries: u64,
    /// Of those, the ones the service throttled.
    pub throttles: u64,
    /// Requests sent to the backing services, by operation
    /// (`DynamoDB.BatchWriteItem`); empty for the embedded store.
    pub requests: Vec<(Box<str>, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromStorage {
    Loaded {
        id: RequestId,
        state: ShardState,
    },
    Written {
        id: RequestId,
        report: WriteReport,
    },
    Snapshotted {
        id: RequestId,
        key: String,
    },
    Failed {
        id: RequestId,
        error: String,
        retryable: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(i: u64, name_bytes: usize) -> (ProductId, ProductState) {
        let field = |s: String| Field {
            value: Some(s.into_boxed_str()),
            version: Version::NONE,
        };
        let state = ProductState {
            seller: field("s".into()),
            category: Field::default(),
            name: field("n".repeat(name_bytes)),
            price_cents: Field::default(),
            quantity: Field::default(),
            deleted: Field::default(),
            low_stock_since: None,
        };
        (ProductId::Num(i), state)
    }

    #[test]
    fn chunks_are_bounded_by_products_and_by_bytes_and_keep_everything_in_order() {
        let position = Position {
            stream: "t".into(),
            offset: 7,
        };
        let entities = vec![(EntityKey::Seller("s".into()), 1)];
        // 100 products of 1 MiB: about 16 per chunk.
        let large: Vec<_> = (0..100).map(|i| product(i, 1 << 20)).collect();
        let chunks = ShardState::chunked(
            3,
            vec![position.clone()],
            entities.clone(),
            large.clone(),
            50_000,
        );
        assert!(chunks.len() >= 7, "{} chunks", chunks.len());
        for c in &chunks {
            let size: usize = c.products.iter().map(|(_, p)| encoded_size(p)).sum();
            assert!(size <= LOAD_CHUNK_BYTES, "{size} bytes in a chunk");
            assert_eq!(c.shard, 3);
        }
        assert_eq!(chunks[0].positions, vec![position]);
        assert_eq!(chunks[0].entity_times, entities);
        assert!(chunks[1..].iter().all(|c| c.positions.is_empty()));
        let lasts: Vec<bool> = chunks.iter().map(|c| c.last).collect();
        assert_eq!(lasts.iter().filter(|&&l| l).count(), 1);
        assert_eq!(lasts.last(), Some(&true));
        let all: Vec<_> = chunks.into_iter().flat_map(|c| c.products).collect();
        assert_eq!(all, large);

        // Small products: the count bounds them.
        let small: Vec<_> = (0..25).map(|i| product(i, 10)).collect();
        let chunks = ShardState::chunked(0, Vec::new(), Vec::new(), small, 10);
        let sizes: Vec<usize> = chunks.iter().map(|c| c.products.len()).collect();
        assert_eq!(sizes, vec![10, 10, 5]);

        // Nothing to load is still one (last) chunk.
        let chunks = ShardState::chunked(0, Vec::new(), Vec::new(), Vec::new(), 10);
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].last);
    }

    fn encoded_size(state: &ProductState) -> usize {
        let mut buf = Vec::new();
        crate::frame::encode_into(state, &mut buf).expect("encode");
        buf.len()
    }
}
