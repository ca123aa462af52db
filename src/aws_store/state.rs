//! The shard state kept in S3 and the state table: object keys, the object
//! format, the checkpoint pointer, and entity parts (pure logic, no I/O).

use super::AwsStoreError;
use super::item::{self, Item};
use crate::daily_parts::DailyParts;
use crate::store::{entity_pk, parse_entity_pk};
use aws_sdk_dynamodb::types::AttributeValue;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use proto::{EntityKey, EntityTotals, Position, ProductId, ProductState, Shard};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};

pub const CHECKPOINT_SK: &str = "CHECKPOINT";
pub const PARTS_SK: &str = "PARTS";

pub fn checkpoint_pk(shard: Shard) -> String {
    format!("SHARD#{shard}")
}

pub fn parts_pk(key: &EntityKey) -> String {
    format!("PARTS#{}", entity_pk(key))
}

/// `state/shard=<p>/<seq, 20 digits>-<kind>-<writer>.bin.gz`. The writer's
/// token keeps a stale owner (one that lost the shard but has not noticed
/// yet) from overwriting the committed object of the same seq; a retry by
/// the same writer overwrites its own uncommitted object.
pub fn object_key(shard: Shard, seq: u64, kind: &str, writer: &str) -> String {
    format!("state/shard={shard}/{seq:020}-{kind}-{writer}.bin.gz")
}

/// One record of a state object. An object is gzip of a sequence of proto
/// frames (little-endian u32 length + bincode), one record per frame, so no
/// frame nears the frame limit however large the shard, and a reader
/// streams it. `End` carries the count, so a truncated object is detected.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Header {
        shard: Shard,
        seq: u64,
        base: bool,
        positions: Vec<Position>,
    },
    Product(ProductId, ProductState),
    Entity(EntityKey, EntityTotals),
    /// A low-stock item this delta removes: (seller it was filed under, product).
    LowStockDelete(Box<str>, ProductId),
    End {
        records: u64,
    },
    /// Per entity record of the delta, in their order, the newest event
    /// that changed it (`ShardChanges::changed_at`). Added after the
    /// others, so objects written before it decode as they did.
    ChangedAt(Vec<i64>),
}

/// The same records, borrowed, for encoding (same serde shape).
#[derive(Serialize)]
enum RecordRef<'a> {
    Header {
        shard: Shard,
        seq: u64,
        base: bool,
        positions: &'a [Position],
    },
    Product(&'a ProductId, &'a ProductState),
    Entity(&'a EntityKey, &'a EntityTotals),
    LowStockDelete(&'a str, &'a ProductId),
    End {
        records: u64,
    },
    ChangedAt(&'a [i64]),
}

/// What one committed write changed in a shard: the delta object's content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub shard: Shard,
    pub seq: u64,
    /// Positions after this write.
    pub positions: Vec<Position>,
    pub products: Vec<(ProductId, ProductState)>,
    /// The shard's contribution to each changed entity, after this write.
    pub entities: Vec<(EntityKey, EntityTotals)>,
    /// Low-stock items to delete: (seller filed under, product).
    pub low_stock_deletes: Vec<(Box<str>, ProductId)>,
    /// Per entry of `entities`, the newest event that changed it
    /// (`ShardChanges::changed_at`): a repair files `DAY#` items as the
    /// write would have.
    pub changed_at: Vec<i64>,
}

/// A shard's whole state, rebuilt from its base and deltas.
#[derive(Debug, Default)]
pub struct Image {
    pub products: BTreeMap<ProductId, ProductState>,
    pub contributions: BTreeMap<EntityKey, EntityTotals>,
}

struct Encoder {
    gz: GzEncoder<Vec<u8>>,
    frame: Vec<u8>,
    records: u64,
}

impl Encoder {
    fn new() -> Self {
        Encoder {
            // Fast level: state objects are written at every flush.
            gz: GzEncoder::new(Vec::new(), Compression::fast()),
            frame: Vec::new(),
            records: 0,
        }
    }

    fn push(&mut self, r: &RecordRef<'_>) -> Result<(), AwsStoreError> {
        proto::frame::encode_into(r, &mut self.frame).map_err(|e| AwsStoreError::Encode {
            what: "state record",
            detail: e.to_string(),
        })?;
        self.records += 1;
        self.gz
            .write_all(&self.frame)
            .map_err(|e| AwsStoreError::Encode {
                what: "state object",
                detail: e.to_string(),
            })
    }

    fn finish(mut self) -> Result<Vec<u8>, AwsStoreError> {
        let records = self.records + 1;
        self.push(&RecordRef::End { records })?;
        self.gz.finish().map_err(|e| AwsStoreError::Encode {
            what: "state object",
            detail: e.to_string(),
        })
    }
}

pub fn encode_delta(d: &Delta) -> Result<Vec<u8>, AwsStoreError> {
    let mut enc = Encoder::new();
    enc.push(&RecordRef::Header {
        shard: d.shard,
        seq: d.seq,
        base: false,
        positions: &d.positions,
    })?;
    if !d.changed_at.is_empty() {
        enc.push(&RecordRef::ChangedAt(&d.changed_at))?;
    }
    for (id, state) in &d.products {
        enc.push(&RecordRef::Product(id, state))?;
    }
    for (key, totals) in &d.entities {
        enc.push(&RecordRef::Entity(key, totals))?;
    }
    for (seller, id) in &d.low_stock_deletes {
        enc.push(&RecordRef::LowStockDelete(seller, id))?;
    }
    enc.finish()
}

pub fn encode_base(
    shard: Shard,
    seq: u64,
    positions: &[Position],
    image: &Image,
) -> Result<Vec<u8>, AwsStoreError> {
    let mut enc = Encoder::new();
    enc.push(&RecordRef::Header {
        shard,
        seq,
        base: true,
        positions,
    })?;
    for (id, state) in &image.products {
        enc.push(&RecordRef::Product(id, state))?;
    }
    for (key, totals) in &image.contributions {
        enc.push(&RecordRef::Entity(key, totals))?;
    }
    enc.finish()
}

fn decode_err(detail: impl ToString) -> AwsStoreError {
    AwsStoreError::Decode {
        what: "state object",
        detail: detail.to_string(),
    }
}

/// Streams an object's records into `delta`'s fields through the callbacks:
/// products and entities go to `on_product` / `on_entity` as they are read.
pub fn decode_object(
    bytes: &[u8],
    mut on_product: impl FnMut(ProductId, ProductState),
    mut on_entity: impl FnMut(EntityKey, EntityTotals),
    mut on_delete: impl FnMut(Box<str>, ProductId),
) -> Result<(Shard, u64, Vec<Position>, Vec<i64>), AwsStoreError> {
    let mut gz = GzDecoder::new(bytes);
    let mut header = None;
    let mut changed_at = Vec::new();
    let mut records = 0u64;
    let mut payload = Vec::new();
    loop {
        let mut len = [0u8; 4];
        gz.read_exact(&mut len)
            .map_err(|e| decode_err(format!("truncated after {records} records: {e}")))?;
        let len = proto::frame::check_len(u32::from_le_bytes(len)).map_err(decode_err)?;
        payload.resize(len, 0);
        gz.read_exact(&mut payload)
            .map_err(|e| decode_err(format!("truncated record: {e}")))?;
        records += 1;
        let record: Record = proto::frame::decode(&payload).map_err(decode_err)?;
        match record {
            Record::Header {
                shard,
                seq,
                positions,
                ..
            } if header.is_none() => header = Some((shard, seq, positions)),
            _ if header.is_none() => return Err(decode_err("no header")),
            Record::Header { .. } => return Err(decode_err("a second header")),
            Record::Product(id, state) => on_product(id, state),
            Record::Entity(key, totals) => on_entity(key, totals),
            Record::LowStockDelete(seller, id) => on_delete(seller, id),
            Record::ChangedAt(times) => changed_at = times,
            Record::End { records: n } if n == records => {
                let mut rest = [0u8; 1];
                if gz.read(&mut rest).map_err(decode_err)? != 0 {
                    return Err(decode_err("bytes after the end record"));
                }
                let (shard, seq, positions) = header.ok_or_else(|| decode_err("no header"))?;
                return Ok((shard, seq, positions, changed_at));
            }
            Record::End { records: n } => {
                return Err(decode_err(format!("{records} records, end says {n}")));
            }
        }
    }
}

pub fn decode_delta(bytes: &[u8]) -> Result<Delta, AwsStoreError> {
    let mut d = Delta::default();
    let (mut products, mut entities, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
    let (shard, seq, positions, changed_at) = decode_object(
        bytes,
        |id, s| products.push((id, s)),
        |k, t| entities.push((k, t)),
        |s, id| deletes.push((s, id)),
    )?;
    d.shard = shard;
    d.seq = seq;
    d.positions = positions;
    d.products = products;
    d.entities = entities;
    d.low_stock_deletes = deletes;
    d.changed_at = changed_at;
    Ok(d)
}

/// Whether a write follows what a shard's checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Succession {
    /// Ahead on some stream, behind on none: it applies.
    Newer,
    /// Ahead on no stream: an earlier write sent again (after a restart of
    /// the storage process, say); skipped.
    Replay,
    /// Ahead on one stream and behind on another: it was folded from a
    /// state that another owner has moved on from since (it lost the shard
    /// in a rebalance and does not know yet). Applying it would put back
    /// the other owner's folded events as unapplied, under positions that
    /// say they are.
    Diverged,
}

/// The commit pointer of a shard: item `PK=SHARD#<p>, SK=CHECKPOINT` in the
/// state table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Last committed write.
    pub seq: u64,
    /// Last write whose metric items are known written; `applied < seq`
    /// means the metric writes of `seq` must be (re)done.
    pub applied: u64,
    pub base_key: Option<String>,
    pub base_seq: u64,
    pub base_bytes: u64,
    /// Delta objects after the base, oldest first.
    pub deltas: Vec<String>,
    pub delta_bytes: u64,
    /// The delta object of `seq` (None when that write changed positions only).
    pub last_delta: Option<String>,
    pub positions: BTreeMap<String, i64>,
    /// Unique per commit: recognises our own commit after an ambiguous failure.
    pub commit_id: String,
}

impl Checkpoint {
    pub fn to_item(&self, shard: Shard, now_ms: i64) -> Item {
        let mut it = item::key(checkpoint_pk(shard), CHECKPOINT_SK);
        it.insert("seq".into(), item::n(self.seq));
        it.insert("applied".into(), item::n(self.applied));
        if let Some(k) = &self.base_key {
            it.insert("baseKey".into(), AttributeValue::S(k.clone()));
        }
        it.insert("baseSeq".into(), item::n(self.base_seq));
        it.insert("baseBytes".into(), item::n(self.base_bytes));
        it.insert(
            "deltas".into(),
            AttributeValue::L(
                self.deltas
                    .iter()
                    .map(|k| AttributeValue::S(k.clone()))
                    .collect(),
            ),
        );
        it.insert("deltaBytes".into(), item::n(self.delta_bytes));
        if let Some(k) = &self.last_delta {
            it.insert("lastDelta".into(), AttributeValue::S(k.clone()));
        }
        it.insert(
            "positions".into(),
            AttributeValue::M(
                self.positions
                    .iter()
                    .map(|(s, o)| (s.clone(), item::n(o)))
                    .collect(),
            ),
        );
        it.insert("commitId".into(), AttributeValue::S(self.commit_id.clone()));
        it.insert("updatedAt".into(), item::n(now_ms));
        it
    }

    pub fn from_item(it: &Item) -> Result<Checkpoint, AwsStoreError> {
        let bad = |what: &str| AwsStoreError::Decode {
            what: "checkpoint",
            detail: format!("missing or malformed {what}"),
        };
        let deltas = match it.get("deltas") {
            Some(AttributeValue::L(l)) => l
                .iter()
                .map(|v| match v {
                    AttributeValue::S(s) => Ok(s.clone()),
                    _ => Err(bad("deltas")),
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
            _ => return Err(bad("deltas")),
        };
        let positions = match it.get("positions") {
            Some(AttributeValue::M(m)) => m
                .iter()
                .map(|(s, v)| match v {
                    AttributeValue::N(n) => n
                        .parse::<i64>()
                        .map(|o| (s.clone(), o))
                        .map_err(|_| bad("positions")),
                    _ => Err(bad("positions")),
                })
                .collect::<Result<_, _>>()?,
            None => BTreeMap::new(),
            _ => return Err(bad("positions")),
        };
        Ok(Checkpoint {
            seq: item::n_u64(it, "seq").ok_or_else(|| bad("seq"))?,
            applied: item::n_u64(it, "applied").ok_or_else(|| bad("applied"))?,
            base_key: item::s(it, "baseKey").map(str::to_string),
            base_seq: item::n_u64(it, "baseSeq").unwrap_or(0),
            base_bytes: item::n_u64(it, "baseBytes").unwrap_or(0),
            deltas,
            delta_bytes: item::n_u64(it, "deltaBytes").unwrap_or(0),
            last_delta: item::s(it, "lastDelta").map(str::to_string),
            positions,
            commit_id: item::s(it, "commitId").unwrap_or_default().to_string(),
        })
    }

    /// How a write's positions (all of its shard's streams, see
    /// [`proto::ShardChanges::positions`]) stand to what is committed.
    pub fn succession(&self, positions: &[Position]) -> Succession {
        let ahead = positions
            .iter()
            .any(|p| self.positions.get(&*p.stream).is_none_or(|&s| p.offset > s));
        let behind = self.positions.iter().any(|(stream, &committed)| {
            positions
                .iter()
                .find(|p| *p.stream == **stream)
                .is_none_or(|p| p.offset < committed)
        });
        match (ahead, behind) {
            (true, false) => Succession::Newer,
            (true, true) => Succession::Diverged,
            (false, _) => Succession::Replay,
        }
    }

    /// Each stream keeps its largest offset.
    pub fn merge_positions(&mut self, positions: &[Position]) {
        for p in positions {
            let e = self
                .positions
                .entry(p.stream.to_string())
                .or_insert(p.offset);
            *e = (*e).max(p.offset);
        }
    }

    pub fn position_list(&self) -> Vec<Position> {
        self.positions
            .iter()
            .map(|(s, &o)| Position {
                stream: s.as_str().into(),
                offset: o,
            })
            .collect()
    }

    /// Whether the next write should fold the deltas into a new base: after
    /// `compact_after` deltas, or once the deltas outweigh the base (so
    /// compaction costs at most about twice the bytes written, amortised,
    /// and a restore reads at most about twice the shard).
    pub fn should_compact(&self, compact_after: usize) -> bool {
        self.deltas.len() >= compact_after.max(1) || self.delta_bytes > self.base_bytes
    }
}

/// Per-shard contributions to one entity: item `PK=PARTS#<entity PK>,
/// SK=PARTS` in the state table, `parts` (binary) and `version`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parts {
    /// shard → (seq of the write that set it, the shard's totals).
    pub parts: BTreeMap<Shard, (u64, EntityTotals)>,
    /// Each shard's part at the end of every day it wrote in, for the
    /// `DAY#` items (pruned to what they can still need).
    pub days: DailyParts,
}

/// [`Parts`] as builds before the daily parts wrote them.
#[derive(Deserialize)]
struct PartsWithoutDays {
    parts: BTreeMap<Shard, (u64, EntityTotals)>,
}

impl Parts {
    /// Sets the shard's part, filed under UTC day number `day`, unless what
    /// is stored is as new or newer, so a replayed or stale write can
    /// neither count twice nor go backwards. When it changed, returns the
    /// `DAY#` items it changes ([`DailyParts::apply`], keeping
    /// `retain_days`).
    pub fn apply(
        &mut self,
        shard: Shard,
        seq: u64,
        totals: EntityTotals,
        day: i64,
        retain_days: i64,
    ) -> Option<Vec<(i64, EntityTotals)>> {
        match self.parts.get(&shard) {
            Some((stored, _)) if *stored >= seq => None,
            _ => {
                self.parts.insert(shard, (seq, totals));
                Some(self.days.apply(shard, day, totals, retain_days))
            }
        }
    }

    /// Counts parts stored without days (by an earlier build) from the day
    /// of their last event: call it as read, before parts are applied.
    pub fn seed_days(&mut self) {
        for (shard, (_, totals)) in &self.parts {
            self.days.seed(*shard, totals);
        }
    }

    /// The entity's totals: the sum of every shard's part.
    pub fn sum(&self) -> EntityTotals {
        let mut sum = EntityTotals {
            last_event_at: -1,
            ..EntityTotals::default()
        };
        for (_, t) in self.parts.values() {
            sum.merge(t);
        }
        sum
    }

    pub fn encode(&self) -> Result<Vec<u8>, AwsStoreError> {
        let mut buf = Vec::new();
        proto::frame::encode_into(self, &mut buf).map_err(|e| AwsStoreError::Encode {
            what: "entity parts",
            detail: e.to_string(),
        })?;
        buf.drain(..4);
        Ok(buf)
    }

    pub fn decode(bytes: &[u8]) -> Result<Parts, AwsStoreError> {
        proto::frame::decode(bytes)
            .or_else(|e| {
                // Written before the days were kept: every byte is the map.
                proto::frame::decode::<PartsWithoutDays>(bytes)
                    .map(|old| Parts {
                        parts: old.parts,
                        days: DailyParts::default(),
                    })
                    .map_err(|_| e)
            })
            .map_err(|e| AwsStoreError::Decode {
                what: "entity parts",
                detail: e.to_string(),
            })
    }
}

/// The entity of a parts item's PK.
pub fn entity_of_parts_pk(pk: &str) -> Result<EntityKey, AwsStoreError> {
    let inner = pk
        .strip_prefix("PARTS#")
        .ok_or_else(|| AwsStoreError::Decode {
            what: "parts key",
            detail: pk.to_string(),
        })?;
    parse_entity_pk(inner).map_err(|e| AwsStoreError::Decode {
        what: "parts key",
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Field, Version};

    fn totals(products: u64, value: i128, last: i64) -> EntityTotals {
        EntityTotals {
            products,
            active: products,
            deleted: 0,
            value_cents: value,
            price_sum_cents: value,
            low_stock: 0,
            last_event_at: last,
        }
    }

    fn state(seller: &str, low: Option<i64>) -> ProductState {
        let f = |v: &str| Field {
            value: Some(v.into()),
            version: Version(1),
        };
        ProductState {
            seller: f(seller),
            category: f("Books"),
            name: f("n"),
            price_cents: Field {
                value: Some(1999),
                version: Version(1),
            },
            quantity: Field::default(),
            deleted: Field::default(),
            low_stock_since: low,
        }
    }

    #[test]
    fn keys() {
        assert_eq!(
            object_key(3, 42, "delta", "ab12"),
            "state/shard=3/00000000000000000042-delta-ab12.bin.gz"
        );
        assert_eq!(checkpoint_pk(7), "SHARD#7");
        let cat = EntityKey::Category("Books".into());
        assert_eq!(parts_pk(&cat), "PARTS#CATEGORY#Books");
        assert_eq!(entity_of_parts_pk("PARTS#CATEGORY#Books").unwrap(), cat);
        assert!(entity_of_parts_pk("CATEGORY#Books").is_err());
        // Zero padding keeps seq order and key order the same.
        assert!(object_key(0, 9, "d", "w") < object_key(0, 10, "d", "w"));
    }

    #[test]
    fn parts_sum_and_replace_only_with_newer_writes() {
        let mut p = Parts::default();
        assert_eq!(p.sum().last_event_at, -1);
        assert!(p.apply(0, 5, totals(2, 1000, 10), 0, 7).is_some());
        assert!(p.apply(1, 1, totals(1, 500, 30), 0, 7).is_some());
        assert_eq!(p.sum(), {
            let mut t = totals(3, 1500, 30);
            t.price_sum_cents = 1500;
            t
        });
        // A replay (same seq) and a stale write (older seq) change nothing.
        assert_eq!(p.apply(0, 5, totals(9, 9, 9), 1, 7), None);
        assert_eq!(p.apply(0, 4, totals(9, 9, 9), 1, 7), None);
        assert_eq!(p.sum().products, 3);
        assert_eq!(p.days.at_end_of(1).products, 3);
        // A newer write replaces the shard's part, never adds to it.
        let items = p.apply(0, 6, totals(1, 200, 40), 1, 7).unwrap();
        assert_eq!(items.iter().map(|(d, _)| *d).collect::<Vec<_>>(), [1]);
        let s = p.sum();
        assert_eq!((s.products, s.value_cents, s.last_event_at), (2, 700, 40));
        assert_eq!(p.days.at_end_of(0).products, 3);
        assert_eq!(p.days.at_end_of(1).products, 2);
        assert_eq!(Parts::decode(&p.encode().unwrap()).unwrap(), p);
    }

    #[test]
    fn parts_written_without_days_count_from_their_last_event() {
        #[derive(Serialize)]
        struct Old {
            parts: BTreeMap<Shard, (u64, EntityTotals)>,
        }
        const DAY: i64 = 86_400_000;
        // Shards 0 and 1 were last written on day 10 by the earlier build.
        let old = Old {
            parts: BTreeMap::from([
                (0, (3, totals(2, 100, 10 * DAY + 1))),
                (1, (4, totals(6, 100, 10 * DAY + 2))),
            ]),
        };
        let mut bytes = Vec::new();
        proto::frame::encode_into(&old, &mut bytes).unwrap();
        let mut p = Parts::decode(&bytes[4..]).unwrap();
        assert_eq!(p.days, DailyParts::default());
        // Shard 1 reaches day 11; shard 0's part stays where it was.
        p.seed_days();
        assert!(p.apply(1, 5, totals(5, 100, 11 * DAY), 11, 7).is_some());
        assert_eq!(p.days.at_end_of(10).products, 8);
        assert_eq!(p.days.at_end_of(11).products, 7);
        // Stored and read again, shard 0 then writes day 11 too: day 10
        // keeps both old parts.
        let mut p = Parts::decode(&p.encode().unwrap()).unwrap();
        p.seed_days();
        assert!(p.apply(0, 4, totals(1, 100, 11 * DAY + 3), 11, 7).is_some());
        assert_eq!(p.days.at_end_of(10).products, 8);
        assert_eq!(p.days.at_end_of(11).products, 6);
    }

    #[test]
    fn a_delta_round_trips_and_truncation_is_detected() {
        let d = Delta {
            shard: 2,
            seq: 9,
            positions: vec![Position {
                stream: "events".into(),
                offset: 77,
            }],
            products: vec![
                (ProductId::Num(1), state("s1", Some(5))),
                (ProductId::Text("x".into()), state("s2", None)),
            ],
            entities: vec![(EntityKey::Seller("s1".into()), totals(1, 1999, 5))],
            low_stock_deletes: vec![("s0".into(), ProductId::Num(1))],
            changed_at: vec![1_700_000_000_123],
        };
        let bytes = encode_delta(&d).unwrap();
        assert_eq!(decode_delta(&bytes).unwrap(), d);
        // Cut the uncompressed stream short: re-encode without the end record.
        let mut raw = Vec::new();
        GzDecoder::new(&bytes[..]).read_to_end(&mut raw).unwrap();
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(&raw[..raw.len() - 3]).unwrap();
        assert!(decode_delta(&gz.finish().unwrap()).is_err());
    }

    #[test]
    fn a_base_holds_the_image() {
        let mut image = Image::default();
        image
            .products
            .insert(ProductId::Num(1), state("s1", Some(5)));
        image.products.insert(ProductId::Num(2), state("s2", None));
        image
            .contributions
            .insert(EntityKey::Seller("s1".into()), totals(2, 1, 1));
        let bytes = encode_base(4, 12, &[], &image).unwrap();
        let mut back = Image::default();
        let mut contributions = BTreeMap::new();
        let (shard, seq, _, _) = decode_object(
            &bytes,
            |id, s| {
                back.products.insert(id, s);
            },
            |k, t| {
                contributions.insert(k, t);
            },
            |_, _| {},
        )
        .unwrap();
        assert_eq!((shard, seq), (4, 12));
        assert_eq!(back.products, image.products);
        assert_eq!(contributions, image.contributions);
    }

    #[test]
    fn checkpoint_item_round_trip_positions_and_compaction_rule() {
        let mut cp = Checkpoint {
            seq: 3,
            applied: 2,
            base_key: Some("b".into()),
            base_seq: 1,
            base_bytes: 100,
            deltas: vec!["d2".into(), "d3".into()],
            delta_bytes: 60,
            last_delta: Some("d3".into()),
            positions: BTreeMap::from([("a".to_string(), 10)]),
            commit_id: "c".into(),
        };
        assert_eq!(Checkpoint::from_item(&cp.to_item(5, 0)).unwrap(), cp);
        let pos = |s: &str, o| Position {
            stream: s.into(),
            offset: o,
        };
        assert_eq!(cp.succession(&[pos("a", 10)]), Succession::Replay);
        assert_eq!(cp.succession(&[]), Succession::Replay);
        assert_eq!(cp.succession(&[pos("a", 9)]), Succession::Replay);
        assert_eq!(cp.succession(&[pos("a", 11)]), Succession::Newer);
        assert_eq!(
            cp.succession(&[pos("a", 10), pos("b", 0)]),
            Succession::Newer
        );
        // Ahead on b, behind on a (or silent about it): another owner's past.
        assert_eq!(
            cp.succession(&[pos("a", 3), pos("b", 0)]),
            Succession::Diverged
        );
        assert_eq!(cp.succession(&[pos("b", 0)]), Succession::Diverged);
        cp.merge_positions(&[pos("a", 10), pos("b", 0)]);
        assert_eq!(cp.position_list(), vec![pos("a", 10), pos("b", 0)]);
        assert!(!cp.should_compact(16));
        assert!(cp.should_compact(2));
        cp.delta_bytes = 101;
        assert!(cp.should_compact(16));
    }
}
