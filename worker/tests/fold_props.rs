//! Property tests of the fold (DESIGN §5, §11): for any generated trace, any
//! split into batches, any replay of already-applied events, any crash that
//! loses the unflushed work and restores from what was flushed, and any
//! interleaving of the three topics, the metrics equal one straight pass;
//! and what is stored for each UTC day is the straight pass up to that
//! day's end.

use analytics_worker::fold::Fold;
use analytics_worker::records::{LowStockRecord, MetricRecord, Money};
use proptest::prelude::*;
use proto::{
    EntityKey, EntityTotals, EventBatch, LowStockChange, LowStockItem, Offset, Position, ProductId,
    ProductState, Shard, ShardChanges, ShardState, utc_day_number,
};
use serde_json::json;
use std::collections::BTreeMap;

const SHARDS: u32 = 2;
const MAX_EVENT: usize = 1 << 20;
const DAY: i64 = 86_400_000;
/// Between two events of a trace: a new UTC day every fifth event.
const EVENT_GAP: i64 = DAY / 5;

#[derive(Clone, Debug)]
enum Op {
    Create {
        price: i64,
        qty: i64,
        category: u8,
    },
    UpdateContract {
        price: Option<i64>,
        qty: Option<i64>,
        category: Option<u8>,
    },
    UpdateBackend {
        price: i64,
        qty: i64,
        category: u8,
    },
    DeleteThin,
    DeleteFull,
    Garbage,
}

#[derive(Clone, Debug)]
struct Step {
    product: u8,
    op: Op,
}

fn op() -> impl Strategy<Value = Op> {
    let price = 0i64..5_000;
    let qty = 0i64..20;
    let cat = 0u8..4;
    prop_oneof![
        3 => (price.clone(), qty.clone(), cat.clone()).prop_map(|(price, qty, category)| Op::Create { price, qty, category }),
        3 => (proptest::option::of(price.clone()), proptest::option::of(qty.clone()), proptest::option::of(cat.clone()))
            .prop_map(|(price, qty, category)| Op::UpdateContract { price, qty, category }),
        3 => (price, qty, cat).prop_map(|(price, qty, category)| Op::UpdateBackend { price, qty, category }),
        1 => Just(Op::DeleteThin),
        1 => Just(Op::DeleteFull),
        1 => Just(Op::Garbage),
    ]
}

fn trace() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        (0u8..10, op()).prop_map(|(product, op)| Step { product, op }),
        1..120,
    )
}

/// "12.34": how the backend writes NUMERIC columns.
fn money_text(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// 12.34 as a JSON number (the shortest float text is the exact decimal).
fn money_number(cents: i64) -> serde_json::Value {
    json!(money_text(cents).parse::<f64>().unwrap_or_default())
}

/// A product's seller is fixed (product p → seller p % 3), so a product
/// always lives in one shard, as with Kafka keys.
fn seller(product: u8) -> String {
    format!("s{}", product % 3)
}

fn shard_of(product: u8) -> Shard {
    (product as u32 % 3) % SHARDS
}

/// Renders a step as the raw event value at timestamp `ts`, with its topic.
fn render(step: &Step, ts: i64) -> (String, &'static str) {
    let id = step.product as u64;
    let s = seller(step.product);
    let cat = |c: u8| format!("cat{c}");
    let v = match &step.op {
        Op::Create {
            price,
            qty,
            category,
        } => json!({"eventType":"ProductCreated","timestamp":ts,
            "data":{"productId":id,"sellerId":s,"name":format!("p{id}"),"price":money_number(*price),
            "quantity":qty,"category":cat(*category),"description":"x"}}),
        Op::UpdateContract {
            price,
            qty,
            category,
        } => {
            let mut changes = serde_json::Map::new();
            if let Some(p) = price {
                changes.insert("price".into(), json!({"old":1,"new":money_number(*p)}));
            }
            if let Some(q) = qty {
                changes.insert("quantity".into(), json!({"old":1,"new":q}));
            }
            if let Some(c) = category {
                changes.insert("category".into(), json!({"old":"cat9","new":cat(*c)}));
            }
            json!({"eventType":"ProductUpdated","timestamp":ts,"data":{"productId":id.to_string(),"sellerId":s,"changes":changes}})
        }
        Op::UpdateBackend {
            price,
            qty,
            category,
        } => json!({"eventType":"ProductUpdated","timestamp":ts,
            "data":{"productId":id,"sellerId":s,"name":format!("p{id}"),"price":money_text(*price),"quantity":qty,"category":cat(*category),
            "previousData":{"id":id,"seller_id":s,"category":"cat9","price":"1.00","quantity":1}}}),
        Op::DeleteThin => json!({"eventType":"ProductDeleted","timestamp":ts,
            "data":{"productId":id,"sellerId":s,"name":format!("p{id}"),"category":"cat1"}}),
        Op::DeleteFull => json!({"eventType":"ProductDeleted","timestamp":ts,
            "data":{"productId":id,"sellerId":s,"price":"2.50","quantity":3,"category":"cat2"}}),
        Op::Garbage => {
            let bad = format!(
                r#"{{"eventType":"ProductCreated","timestamp":{ts},"data":{{"productId":-1}}}}"#
            );
            return (bad, "product.created");
        }
    };
    let topic = match step.op {
        Op::Create { .. } | Op::Garbage => "product.created",
        Op::UpdateContract { .. } | Op::UpdateBackend { .. } => "product.updated",
        Op::DeleteThin | Op::DeleteFull => "product.deleted",
    };
    (v.to_string(), topic)
}

struct Rendered {
    bytes: String,
    topic: &'static str,
    shard: Shard,
}

fn render_all(steps: &[Step]) -> Vec<Rendered> {
    steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let (bytes, topic) = render(step, day_start(i));
            Rendered {
                bytes,
                topic,
                shard: shard_of(step.product),
            }
        })
        .collect()
}

/// The timestamp of event `i` of a trace.
fn day_start(i: usize) -> i64 {
    1_000 + EVENT_GAP * i as i64
}

fn lines(records: &[MetricRecord]) -> Vec<String> {
    records.iter().map(MetricRecord::to_json_line).collect()
}

/// Events `range` of the trace as one stream ("file") per shard, offsets =
/// index.
fn batches(events: &[Rendered], range: std::ops::Range<usize>) -> BTreeMap<Shard, EventBatch> {
    let mut batches: BTreeMap<Shard, EventBatch> = BTreeMap::new();
    for i in range {
        let e = &events[i];
        batches
            .entry(e.shard)
            .or_insert_with(|| EventBatch::new(e.shard, "file".into()))
            .push(i as Offset, e.bytes.as_bytes());
    }
    batches
}

/// Folds events `range` of the trace.
fn feed(fold: &mut Fold, events: &[Rendered], range: std::ops::Range<usize>) {
    for b in batches(events, range).values() {
        fold.apply_batch(b);
    }
}

/// Folds events `range` as the worker does: each shard's changes are taken
/// where its events reach a new UTC day, into `sealed`, which storage gets
/// before the changes taken after them.
fn feed_by_day(
    fold: &mut Fold,
    sealed: &mut Vec<ShardChanges>,
    events: &[Rendered],
    range: std::ops::Range<usize>,
) {
    for b in batches(events, range).values() {
        fold.apply_batch_by_day(b, |day_end| sealed.push(day_end))
            .expect("changes encode");
    }
}

/// A shard's contribution to an entity at the end of UTC day `day`: the
/// straight pass over the events up to then.
fn at_end_of_day(
    events: &[Rendered],
    shard: Shard,
    key: &EntityKey,
    day: i64,
) -> Option<EntityTotals> {
    let end = (0..events.len())
        .find(|&i| utc_day_number(day_start(i)) > day)
        .unwrap_or(events.len());
    let mut fold = Fold::new(10, MAX_EVENT);
    feed(&mut fold, events, 0..end);
    let changes = fold.take_changes().expect("changes encode");
    let shard = changes.iter().find(|c| c.shard == shard)?;
    shard
        .entities
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, t)| *t)
}

fn straight(events: &[Rendered]) -> Vec<String> {
    let mut fold = Fold::new(10, MAX_EVENT);
    feed(&mut fold, events, 0..events.len());
    lines(&fold.records())
}

/// What storage keeps: the last absolute state of each product, entity
/// times, positions, dead letters, and the low-stock items as the worker's
/// puts and deletes leave them. A minimal model of the store, which skips a
/// shard's changes when none of their positions is newer, as the stores do.
#[derive(Default)]
struct StoreModel {
    products: BTreeMap<(Shard, ProductId), ProductState>,
    times: BTreeMap<(Shard, EntityKey), i64>,
    positions: BTreeMap<(Shard, String), Offset>,
    dead_letters: Vec<(Shard, Offset)>,
    low_stock: BTreeMap<(String, ProductId), LowStockItem>,
    /// The last contribution filed under each UTC day, as the stores file
    /// `DAY#` items: under the later of `lastEventAt` and the change time.
    daily: BTreeMap<(Shard, EntityKey, i64), EntityTotals>,
}

impl StoreModel {
    fn write(&mut self, changes: Vec<ShardChanges>) {
        for sc in changes {
            let newer = sc.positions.iter().any(|p| {
                self.positions
                    .get(&(sc.shard, p.stream.to_string()))
                    .is_none_or(|&o| p.offset > o)
            });
            if !newer {
                continue;
            }
            for (id, st) in sc.products.decode().expect("the worker's states decode") {
                self.products.insert((sc.shard, id), st);
            }
            for change in sc.low_stock {
                match change {
                    LowStockChange::Put(item) => {
                        let key = (item.seller_id.to_string(), item.product_id.clone());
                        self.low_stock.insert(key, item);
                    }
                    LowStockChange::Delete {
                        seller_id,
                        product_id,
                    } => {
                        self.low_stock.remove(&(seller_id.to_string(), product_id));
                    }
                }
            }
            for (i, (k, t)) in sc.entities.into_iter().enumerate() {
                let at = sc
                    .changed_at
                    .get(i)
                    .copied()
                    .unwrap_or(-1)
                    .max(t.last_event_at);
                if at >= 0 {
                    self.daily
                        .insert((sc.shard, k.clone(), utc_day_number(at)), t);
                }
                self.times.insert((sc.shard, k), t.last_event_at);
            }
            for p in sc.positions {
                let slot = self
                    .positions
                    .entry((sc.shard, p.stream.to_string()))
                    .or_insert(Offset::MIN);
                *slot = (*slot).max(p.offset);
            }
            self.dead_letters
                .extend(sc.dead_letters.iter().map(|d| (sc.shard, d.offset)));
        }
    }

    fn restore_into(&self, fold: &mut Fold) {
        for shard in 0..SHARDS {
            let mine = |s: &Shard| *s == shard;
            let state = ShardState {
                shard,
                positions: self
                    .positions
                    .iter()
                    .filter(|((s, _), _)| mine(s))
                    .map(|((_, stream), &offset)| Position {
                        stream: stream.as_str().into(),
                        offset,
                    })
                    .collect(),
                products: self
                    .products
                    .iter()
                    .filter(|((s, _), _)| mine(s))
                    .map(|((_, id), st)| (id.clone(), st.clone()))
                    .collect(),
                entity_times: self
                    .times
                    .iter()
                    .filter(|((s, _), _)| mine(s))
                    .map(|((_, k), &t)| (k.clone(), t))
                    .collect(),
                last: true,
            };
            fold.restore(state, true);
        }
    }

    /// The low-stock records the stored items make.
    fn low_stock_lines(&self) -> Vec<String> {
        let mut records: Vec<MetricRecord> = self
            .low_stock
            .values()
            .map(|i| {
                MetricRecord::LowStock(LowStockRecord {
                    seller_id: i.seller_id.to_string(),
                    product_id: i.product_id.clone(),
                    name: i.name.to_string(),
                    category: i.category.to_string(),
                    quantity: i.quantity,
                    price: Money(i.price_cents.into()),
                })
            })
            .collect();
        analytics_worker::records::sort_records(&mut records);
        lines(&records)
    }

    /// Where a restarted source resumes: after the lowest durable position.
    fn resume_from(&self) -> usize {
        (0..SHARDS)
            .map(|s| {
                self.positions
                    .get(&(s, "file".to_string()))
                    .map_or(0, |&o| o as usize + 1)
            })
            .min()
            .unwrap_or(0)
    }
}

#[derive(Clone, Debug)]
enum Action {
    /// Fold the next `n` events.
    Feed(usize),
    /// Hand the changes to storage.
    Flush,
    /// Re-send the last `n` events already fed (a redelivery).
    Replay(usize),
    /// Lose the fold; restore from storage and resume after its position.
    Crash,
}

fn actions() -> impl Strategy<Value = Vec<Action>> {
    proptest::collection::vec(
        prop_oneof![
            4 => (1usize..30).prop_map(Action::Feed),
            2 => Just(Action::Flush),
            1 => (1usize..20).prop_map(Action::Replay),
            1 => Just(Action::Crash),
        ],
        0..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Any batching, replay and crash/restore schedule ends in the straight
    /// fold's records, both in the live fold and in what storage holds.
    #[test]
    fn batches_replays_and_crashes_equal_the_straight_fold(steps in trace(), plan in actions()) {
        let events = render_all(&steps);
        let expected = straight(&events);

        let mut store = StoreModel::default();
        let mut fold = Fold::new(10, MAX_EVENT);
        // Changes taken at day ends, written before those taken after.
        let mut sealed = Vec::new();
        let flush = |fold: &mut Fold, sealed: &mut Vec<ShardChanges>, store: &mut StoreModel| {
            let mut changes = std::mem::take(sealed);
            changes.extend(fold.take_changes().expect("changes encode"));
            store.write(changes);
        };
        let mut cursor = 0usize;
        for action in plan {
            match action {
                Action::Feed(n) => {
                    let end = (cursor + n).min(events.len());
                    feed_by_day(&mut fold, &mut sealed, &events, cursor..end);
                    cursor = end;
                }
                Action::Flush => flush(&mut fold, &mut sealed, &mut store),
                Action::Replay(n) => {
                    feed_by_day(&mut fold, &mut sealed, &events, cursor.saturating_sub(n)..cursor)
                }
                Action::Crash => {
                    fold = Fold::new(10, MAX_EVENT);
                    sealed.clear();
                    store.restore_into(&mut fold);
                    cursor = store.resume_from();
                }
            }
        }
        feed_by_day(&mut fold, &mut sealed, &events, cursor..events.len());
        flush(&mut fold, &mut sealed, &mut store);
        prop_assert_eq!(&lines(&fold.records()), &expected);

        // What each day's item holds is the shard's contribution at the
        // end of that day.
        for ((shard, key, day), stored) in &store.daily {
            let want = at_end_of_day(&events, *shard, key, *day);
            prop_assert_eq!(Some(*stored), want, "{:?} of shard {} at the end of day {}", key, shard, day);
        }

        let mut restored = Fold::new(10, MAX_EVENT);
        store.restore_into(&mut restored);
        prop_assert_eq!(&lines(&restored.records()), &expected);

        // The low-stock items the worker's puts and deletes leave in
        // storage are the straight fold's low-stock list.
        let listed: Vec<String> = expected
            .iter()
            .filter(|l| l.starts_with(r#"{"type":"lowStock""#))
            .cloned()
            .collect();
        prop_assert_eq!(store.low_stock_lines(), listed);

        // Every rejected event reached storage exactly once.
        let mut dls = store.dead_letters.clone();
        dls.sort();
        let written = dls.len();
        dls.dedup();
        prop_assert_eq!(written, dls.len());
        let garbage = steps.iter().filter(|s| matches!(s.op, Op::Garbage)).count();
        prop_assert_eq!(dls.len(), garbage);
    }

    /// The consumer reads the three topics in any interleaving (each topic in
    /// order); the metrics are those of the events in timestamp order.
    #[test]
    fn any_interleaving_of_the_topics_gives_the_same_metrics(
        steps in trace(),
        picks in proptest::collection::vec(0usize..3, 0..400),
    ) {
        let events = render_all(&steps);
        let expected = straight(&events);

        let topics = ["product.created", "product.updated", "product.deleted"];
        let mut queues: Vec<Vec<usize>> =
            topics.iter().map(|t| (0..events.len()).rev().filter(|&i| events[i].topic == *t).collect()).collect();
        let mut order = Vec::new();
        let mut picks = picks.into_iter();
        while queues.iter().any(|q| !q.is_empty()) {
            let mut t = picks.next().unwrap_or(0);
            while queues[t].is_empty() {
                t = (t + 1) % 3;
            }
            order.extend(queues[t].pop());
        }

        let mut fold = Fold::new(10, MAX_EVENT);
        for i in order {
            let e = &events[i];
            let mut b = EventBatch::new(e.shard, e.topic.into());
            b.push(i as Offset, e.bytes.as_bytes());
            fold.apply_batch(&b);
        }
        prop_assert_eq!(lines(&fold.records()), expected);
    }
}
