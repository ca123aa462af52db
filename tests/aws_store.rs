//! The AWS store against a real DynamoDB + S3 API server (moto, DESIGN §10),
//! with the embedded store as the oracle.
//!
//! The server's endpoint comes from `ANALYTICS_TEST_AWS_ENDPOINT` (default
//! `http://127.0.0.1:5000`). These tests fail, never skip, when it is absent.

mod support;

use analytics::aws_store::{AwsConfig, AwsStore, AwsStoreError};
use analytics::store::{EmbeddedStore, StoreOptions};
use analytics_worker::records::MetricRecord;
use aws_sdk_dynamodb::types::AttributeValue;
use proto::{
    EncodedProducts, EntityKey, EntityTotals, Field, LowStockChange, LowStockItem, Position,
    ProductId, ProductState, Shard, ShardChanges, ShardState, Version,
};
use std::io::Read;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const T0: i64 = 1_696_176_060_000; // 2023-10-01T16:01:00Z

static ENV: Once = Once::new();

/// Dummy credentials and region unless the environment has them, and a
/// check that the server answers; its endpoint.
fn setup() -> String {
    ENV.call_once(|| {
        for (k, v) in support::kafka::AWS_TEST_ENV {
            if std::env::var_os(k).is_none() {
                // SAFETY: every test calls `setup` before anything else and
                // `Once` makes the others wait, so no thread reads the
                // environment while it is written.
                unsafe { std::env::set_var(k, v) };
            }
        }
    });
    support::kafka::aws_endpoint()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Table and bucket names unique to this test run and call.
fn config(name: &str) -> AwsConfig {
    let ep = setup();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 1_000_000_000;
    let base = format!("t{}-{stamp}-{n}-{name}", std::process::id());
    AwsConfig {
        endpoint: Some(ep),
        region: Some("us-east-1".into()),
        metrics_table: format!("{base}-metrics"),
        state_table: format!("{base}-state"),
        bucket: base.to_lowercase().chars().take(63).collect(),
        compact_after: 3,
        ..AwsConfig::default()
    }
}

async fn connect(cfg: &AwsConfig) -> AwsStore {
    AwsStore::connect(cfg.clone())
        .await
        .unwrap_or_else(|e| panic!("connecting to {:?}: {e}", cfg.endpoint))
}

fn oracle() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
    (dir, store)
}

fn f<T>(v: T) -> Field<T> {
    Field {
        value: Some(v),
        version: Version(0),
    }
}

fn product(
    seller: &str,
    cat: &str,
    price: i64,
    qty: i64,
    deleted: bool,
    low: Option<i64>,
) -> ProductState {
    ProductState {
        seller: f(seller.into()),
        category: f(cat.into()),
        name: f(format!("name-{seller}-{cat}").into()),
        price_cents: f(price),
        quantity: f(qty),
        deleted: f(deleted),
        low_stock_since: low,
    }
}

fn totals(
    products: u64,
    active: u64,
    deleted: u64,
    value: i128,
    price_sum: i128,
    low: u64,
    last: i64,
) -> EntityTotals {
    EntityTotals {
        products,
        active,
        deleted,
        value_cents: value,
        price_sum_cents: price_sum,
        low_stock: low,
        last_event_at: last,
    }
}

fn pos(offset: i64) -> Vec<Position> {
    vec![Position {
        stream: "events".into(),
        offset,
    }]
}

fn seller(s: &str) -> EntityKey {
    EntityKey::Seller(s.into())
}

fn cat(c: &str) -> EntityKey {
    EntityKey::Category(c.into())
}

thread_local! {
    /// What this test's worker listed at its previous flush, per shard and
    /// product (each test runs on its own thread).
    static LISTED: std::cell::RefCell<std::collections::HashMap<(Shard, ProductId), Box<str>>> =
        Default::default();
}

/// The changes a worker sends after everything this test sent before: the
/// states encoded, a low-stock put for each listed product, and a delete
/// for an item filed under another seller at the previous flush.
fn changes(
    shard: Shard,
    offset: i64,
    products: Vec<(ProductId, ProductState)>,
    entities: Vec<(EntityKey, EntityTotals)>,
) -> ShardChanges {
    let mut low_stock = Vec::new();
    LISTED.with_borrow_mut(|listed| {
        for (id, state) in &products {
            let item = LowStockItem::of(id, state);
            let now = item.as_ref().map(|i| i.seller_id.clone());
            let key = (shard, id.clone());
            if let Some(old) = listed.get(&key)
                && Some(old) != now.as_ref()
            {
                low_stock.push(LowStockChange::Delete {
                    seller_id: old.clone(),
                    product_id: id.clone(),
                });
            }
            match now {
                Some(seller) => listed.insert(key, seller),
                None => listed.remove(&key),
            };
            low_stock.extend(item.map(LowStockChange::Put));
        }
    });
    ShardChanges {
        shard,
        positions: pos(offset),
        products: EncodedProducts::encode(&products).expect("states encode"),
        low_stock,
        entities,
        dead_letters: vec![],
        archive: vec![],
        moved_in: 0,
        changed_at: vec![],
    }
}

/// DESIGN §3's worked check in two flushes of shard 0.
fn worked_check() -> Vec<ShardChanges> {
    let (a, b) = (ProductId::Num(1), ProductId::Text("B".into()));
    vec![
        changes(
            0,
            1,
            vec![
                (a.clone(), product("s1", "Books", 3000, 2, false, Some(T0))),
                (
                    b.clone(),
                    product("s1", "Books", 1000, 5, false, Some(T0 + 1000)),
                ),
            ],
            vec![
                (seller("s1"), totals(2, 2, 0, 11000, 4000, 2, T0 + 1000)),
                (cat("Books"), totals(2, 2, 0, 11000, 4000, 2, T0 + 1000)),
            ],
        ),
        changes(
            0,
            3,
            vec![
                (a, product("s1", "Games", 1500, 8, false, Some(T0 + 2000))),
                (b, product("s1", "Books", 1000, 5, true, None)),
            ],
            vec![
                (seller("s1"), totals(2, 1, 1, 12000, 1500, 1, T0 + 3000)),
                (cat("Books"), totals(1, 0, 1, 0, 0, 0, T0 + 3000)),
                (cat("Games"), totals(1, 1, 0, 12000, 1500, 1, T0 + 2000)),
            ],
        ),
    ]
}

/// A varied sequence of writes: the worked check, categories across shards,
/// a low-stock product moving between sellers and leaving the list, a
/// replay, a stale write, a shard twice in one call, positions only.
fn sequence() -> Vec<Vec<ShardChanges>> {
    let wc = worked_check();
    let p = ProductId::Num(42);
    vec![
        vec![wc[0].clone()],
        vec![
            wc[1].clone(),
            changes(
                1,
                10,
                vec![(
                    ProductId::Num(7),
                    product("s2", "Books", 250, 40, false, None),
                )],
                vec![
                    (seller("s2"), totals(1, 1, 0, 10000, 250, 0, T0 + 5)),
                    (cat("Books"), totals(1, 1, 0, 10000, 250, 0, T0 + 5)),
                ],
            ),
            changes(
                2,
                4,
                vec![(p.clone(), product("s3", "Toys", 999, 3, false, Some(T0)))],
                vec![
                    (seller("s3"), totals(1, 1, 0, 2997, 999, 1, T0)),
                    (cat("Toys"), totals(1, 1, 0, 2997, 999, 1, T0)),
                ],
            ),
        ],
        // A replay of everything so far.
        vec![wc[0].clone(), wc[1].clone()],
        // The listed product moves to another seller, then (same call) is restocked.
        vec![
            changes(
                2,
                5,
                vec![(
                    p.clone(),
                    product("s4", "Toys", 999, 2, false, Some(T0 + 86_400_000)),
                )],
                vec![
                    (seller("s3"), totals(0, 0, 0, 0, 0, 0, T0 + 86_400_000)),
                    (seller("s4"), totals(1, 1, 0, 1998, 999, 1, T0 + 86_400_000)),
                    (cat("Toys"), totals(1, 1, 0, 1998, 999, 1, T0 + 86_400_000)),
                ],
            ),
            changes(
                2,
                6,
                vec![(p, product("s4", "Toys", 999, 50, false, None))],
                vec![
                    (
                        seller("s4"),
                        totals(1, 1, 0, 49950, 999, 0, T0 + 86_400_001),
                    ),
                    (cat("Toys"), totals(1, 1, 0, 49950, 999, 0, T0 + 86_400_001)),
                ],
            ),
        ],
        // Shard 1 replaces its contribution to Books; a stale write of shard 1 is skipped.
        vec![changes(
            1,
            11,
            vec![(
                ProductId::Num(8),
                product("s2", "Books", 100, 1, false, Some(T0 + 9)),
            )],
            vec![
                (seller("s2"), totals(2, 2, 0, 10100, 350, 1, T0 + 9)),
                (cat("Books"), totals(2, 2, 0, 10100, 350, 1, T0 + 9)),
            ],
        )],
        vec![changes(
            1,
            9,
            vec![],
            vec![(cat("Books"), totals(99, 99, 0, 1, 1, 0, T0))],
        )],
        // Positions only.
        vec![ShardChanges {
            shard: 3,
            positions: pos(100),
            ..ShardChanges::default()
        }],
        // More flushes of shard 1, so its deltas are compacted into a base.
        vec![changes(
            1,
            12,
            vec![(
                ProductId::Num(112),
                product("s2", "Books", 12, 20, false, None),
            )],
            vec![],
        )],
        vec![changes(
            1,
            13,
            vec![(
                ProductId::Num(113),
                product("s2", "Books", 13, 20, false, None),
            )],
            vec![],
        )],
        vec![changes(
            1,
            14,
            vec![(
                ProductId::Num(114),
                product("s2", "Books", 14, 20, false, None),
            )],
            vec![],
        )],
        vec![changes(
            1,
            15,
            vec![(
                ProductId::Num(115),
                product("s2", "Books", 15, 20, false, None),
            )],
            vec![],
        )],
    ]
}

fn sorted(mut chunks: Vec<ShardState>) -> Vec<ShardState> {
    for c in &mut chunks {
        c.entity_times.sort();
    }
    chunks
}

async fn assert_same(aws: &AwsStore, emb: &EmbeddedStore, now: i64, shards: &[Shard]) {
    assert_eq!(
        aws.current_records(now).await.unwrap(),
        emb.current_records(now).unwrap()
    );
    assert_eq!(
        aws.low_stock(None).await.unwrap(),
        emb.low_stock(None).unwrap()
    );
    for s in ["s1", "s2", "s3", "s4", "nobody"] {
        assert_eq!(
            aws.seller(s, now).await.unwrap(),
            emb.seller(s, now).unwrap(),
            "seller {s}"
        );
        assert_eq!(
            aws.low_stock(Some(s)).await.unwrap(),
            emb.low_stock(Some(s)).unwrap(),
            "low stock {s}"
        );
    }
    for c in ["Books", "Games", "Toys", "None"] {
        assert_eq!(
            aws.category(c, now).await.unwrap(),
            emb.category(c, now).unwrap(),
            "category {c}"
        );
    }
    for &shard in shards {
        for chunk in [1, 2, 1000] {
            assert_eq!(
                sorted(aws.load_shard(shard, chunk).await.unwrap()),
                sorted(emb.load_shard(shard, chunk).unwrap()),
                "load of shard {shard} in chunks of {chunk}"
            );
        }
    }
}

/// Every item of both tables, keyed, with `updatedAt` kept.
async fn dump(store: &AwsStore) -> Vec<(String, String, String)> {
    let (ddb, _) = store.clients();
    let mut out = Vec::new();
    for table in [&store.config().metrics_table, &store.config().state_table] {
        let page = ddb.scan().table_name(table.as_str()).send().await.unwrap();
        assert!(page.last_evaluated_key().is_none());
        for it in page.items() {
            let s = |k: &str| match it.get(k) {
                Some(AttributeValue::S(v)) => v.clone(),
                _ => String::new(),
            };
            let mut attrs: Vec<_> = it.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            attrs.sort();
            out.push((s("PK"), s("SK"), attrs.join(" ")));
        }
    }
    out.sort();
    out
}

async fn state_objects(store: &AwsStore, shard: Shard) -> Vec<String> {
    let (_, s3) = store.clients();
    let out = s3
        .list_objects_v2()
        .bucket(&store.config().bucket)
        .prefix(format!("state/shard={shard}/"))
        .send()
        .await
        .unwrap();
    out.contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn writes_give_what_the_embedded_store_gives() {
    let cfg = config("oracle");
    let mut aws = connect(&cfg).await;
    let (_dir, mut emb) = oracle();
    for (i, batch) in sequence().into_iter().enumerate() {
        let now = T0 + i as i64 * 1000;
        let a = aws.write(&batch, now).await.unwrap();
        let e = emb.write(&batch, now).unwrap();
        assert_eq!(
            (a.shards_applied, a.shards_skipped, a.products),
            (e.shards_applied, e.shards_skipped, e.products),
            "write {i}"
        );
    }
    assert_same(&aws, &emb, T0 + 60_000, &[0, 1, 2, 3, 9]).await;

    // The exact worked check (DESIGN §3).
    let lines: Vec<String> = aws
        .current_records(T0)
        .await
        .unwrap()
        .iter()
        .filter(|r| matches!(r, MetricRecord::Category(c) if c.category == "Games"))
        .map(MetricRecord::to_json_line)
        .collect();
    assert_eq!(
        lines,
        [
            r#"{"type":"category","category":"Games","totalProducts":1,"totalValue":"120.00","averagePrice":"15.00","lastEventAt":1696176062000}"#
        ]
    );

    // Money is an exact decimal number in DynamoDB.
    let (ddb, _) = aws.clients();
    let it = ddb
        .get_item()
        .table_name(&cfg.metrics_table)
        .key("PK", AttributeValue::S("SELLER#s1".into()))
        .key("SK", AttributeValue::S("CURRENT".into()))
        .send()
        .await
        .unwrap();
    let it = it.item().unwrap();
    assert!(
        matches!(&it["totalValue"], AttributeValue::N(v) if v.trim_end_matches('0').trim_end_matches('.') == "120")
    );
    assert!(matches!(&it["TTL"], AttributeValue::N(_)));

    // Shard 1 was compacted: one base and the last delta are left.
    let objects = state_objects(&aws, 1).await;
    assert!(objects.iter().any(|k| k.contains("-base-")), "{objects:?}");
    assert!(objects.len() <= 4, "{objects:?}");

    // A fresh instance (a restarted storage process) reads the same.
    let fresh = connect(&cfg).await;
    assert_same(&fresh, &emb, T0 + 60_000, &[0, 1, 2]).await;
}

#[tokio::test]
async fn a_replayed_write_changes_nothing() {
    let cfg = config("replay");
    let mut aws = connect(&cfg).await;
    let wc = worked_check();
    aws.write(&wc, T0).await.unwrap();
    let before = dump(&aws).await;
    let again = aws.write(&wc, T0 + 5000).await.unwrap();
    assert_eq!((again.shards_applied, again.shards_skipped), (0, 2));
    assert_eq!(dump(&aws).await, before);
    // Also from a fresh instance that never saw the shard.
    let mut fresh = connect(&cfg).await;
    let again = fresh.write(&wc[..1], T0 + 9000).await.unwrap();
    assert_eq!(again.shards_skipped, 1);
    assert_eq!(dump(&fresh).await, before);
}

/// A write files its entities' `DAY#` items under the day of its newest
/// event when that is later than their `lastEventAt`: a contract-dialect
/// price change names no category, so it leaves the category's
/// `lastEventAt` on an earlier day, whose item must keep that day's values.
/// The same when the metric writes are redone after a crash.
#[tokio::test]
async fn a_change_that_names_no_category_files_under_the_day_of_its_events() {
    const DAY: i64 = 86_400_000;
    let cfg = config("window-day");
    let (_dir, mut emb) = oracle();
    let write = |offset, price, window| ShardChanges {
        changed_at: vec![window],
        ..changes(
            5,
            offset,
            vec![(
                ProductId::Num(1),
                product("s5", "Gardening", price, 2, false, None),
            )],
            vec![(
                cat("Gardening"),
                totals(1, 1, 0, 2 * i128::from(price), i128::from(price), 0, T0),
            )],
        )
    };
    let (first, second) = (write(1, 1000, T0), write(2, 1500, T0 + DAY + 5));

    let mut aws = connect(&cfg).await;
    aws.write(std::slice::from_ref(&first), T0).await.unwrap();
    emb.write(std::slice::from_ref(&first), T0).unwrap();
    // The second is committed, its metric items not written: a restarted
    // storage process redoes them from the stored delta.
    aws.fail_after_commit(true);
    assert!(
        aws.write(std::slice::from_ref(&second), T0 + DAY)
            .await
            .is_err()
    );
    drop(aws);
    let aws = connect(&cfg).await;
    aws.load_shard(5, 100).await.unwrap();
    emb.write(std::slice::from_ref(&second), T0 + DAY).unwrap();

    let now = T0 + DAY;
    let (_, days) = aws.category("Gardening", now).await.unwrap().unwrap();
    let values: Vec<(String, String)> = days
        .iter()
        .map(|(day, r)| match r {
            MetricRecord::Category(c) => (day.clone(), c.total_value.to_string()),
            other => panic!("not a category: {other:?}"),
        })
        .collect();
    assert_eq!(
        values,
        [
            ("2023-10-01".to_string(), "20.00".to_string()),
            ("2023-10-02".to_string(), "30.00".to_string())
        ]
    );
    assert_eq!(
        aws.category("Gardening", now).await.unwrap(),
        emb.category("Gardening", now).unwrap()
    );
}

/// A category's `DAY#` items hold every shard's value at the end of the
/// day, also when one shard is read a day behind another and writes its
/// earlier day last, with the shards written by two instances (two store
/// clients, one after the other) through the category's parts item.
#[tokio::test]
async fn a_categorys_daily_items_sum_shards_that_cross_midnight_apart() {
    const DAY: i64 = 86_400_000;
    let cfg = config("midnight");
    let (_dir, mut emb) = oracle();
    let books = |shard, offset, products, last| {
        changes(
            shard,
            offset,
            vec![],
            vec![(cat("Books"), totals(products, products, 0, 0, 0, 0, last))],
        )
    };
    // Shard 0 ends day 1 with 2 products and reaches day 2 with 5; shard 1,
    // behind it, ends day 1 with 3 and day 2 with 4.
    let order = [
        books(0, 1, 2, T0),
        books(0, 2, 5, T0 + DAY),
        books(1, 1, 3, T0 + 10),
        books(1, 2, 4, T0 + DAY + 10),
    ];
    let (mut a, mut b) = (connect(&cfg).await, connect(&cfg).await);
    let now = T0 + 2 * DAY;
    for sc in &order {
        let instance = if sc.shard == 0 { &mut a } else { &mut b };
        instance.write(std::slice::from_ref(sc), now).await.unwrap();
        emb.write(std::slice::from_ref(sc), now).unwrap();
    }
    // Replays change nothing.
    for sc in &order {
        let instance = if sc.shard == 0 { &mut a } else { &mut b };
        instance.write(std::slice::from_ref(sc), now).await.unwrap();
    }

    let (_, days) = a.category("Books", now).await.unwrap().unwrap();
    let products: Vec<(String, u64)> = days
        .iter()
        .map(|(day, r)| match r {
            MetricRecord::Category(c) => (day.clone(), c.total_products),
            other => panic!("not a category: {other:?}"),
        })
        .collect();
    assert_eq!(
        products,
        [("2023-10-01".to_string(), 5), ("2023-10-02".to_string(), 9)]
    );
    assert_eq!(
        a.category("Books", now).await.unwrap(),
        emb.category("Books", now).unwrap()
    );
}

#[tokio::test]
async fn a_crash_between_commit_and_metric_writes_is_repaired() {
    let cfg = config("crash");
    let (_dir, mut emb) = oracle();
    let wc = worked_check();
    let other = changes(
        4,
        1,
        vec![(
            ProductId::Num(5),
            product("s9", "Books", 100, 1, false, Some(T0)),
        )],
        vec![
            (seller("s9"), totals(1, 1, 0, 100, 100, 1, T0)),
            (cat("Books"), totals(1, 1, 0, 100, 100, 1, T0)),
        ],
    );

    // Committed, no metric item written.
    let mut aws = connect(&cfg).await;
    aws.fail_after_commit(true);
    let err = aws
        .write(&[wc[0].clone(), other.clone()], T0)
        .await
        .unwrap_err();
    assert!(matches!(err, AwsStoreError::Injected { .. }), "{err}");
    assert!(aws.current_records(T0).await.unwrap().is_empty());
    emb.write(&[wc[0].clone(), other.clone()], T0).unwrap();
    drop(aws);

    // A restarted process: loading shard 0 repairs it.
    let mut aws = connect(&cfg).await;
    let loaded = aws.load_shard(0, 100).await.unwrap();
    assert_eq!(sorted(loaded), sorted(emb.load_shard(0, 100).unwrap()));
    // The supervisor sends the unacknowledged write again: a replay, which
    // repairs shard 4 on its way.
    let again = aws.write(&[wc[0].clone(), other], T0).await.unwrap();
    assert_eq!(again.shards_skipped, 2);
    assert_same(&aws, &emb, T0, &[0, 4]).await;

    // Crash again, then the next write of the shard (not a replay) repairs first.
    aws.fail_after_commit(true);
    assert!(aws.write(&wc[1..], T0).await.is_err());
    aws.fail_after_commit(false);
    emb.write(&wc[1..], T0).unwrap();
    let next = changes(
        0,
        4,
        vec![],
        vec![(cat("Games"), totals(1, 1, 0, 12000, 1500, 1, T0 + 4000))],
    );
    aws.write(std::slice::from_ref(&next), T0).await.unwrap();
    emb.write(&[next], T0).unwrap();
    assert_same(&aws, &emb, T0, &[0, 4]).await;
}

#[tokio::test]
async fn two_instances_writing_the_same_categories_sum_exactly() {
    let cfg = config("concurrent");
    let (_dir, mut emb) = oracle();
    let mut a = connect(&cfg).await;
    let mut b = connect(&cfg).await;
    // Instance A owns shards 0 and 1, B owns 2 and 3; every flush touches
    // the same two categories.
    let flush = |shard: Shard, round: i64| {
        let v = i128::from(shard) * 1000 + i128::from(round);
        changes(
            shard,
            round,
            vec![],
            vec![
                (
                    cat("Books"),
                    totals(round as u64, round as u64, 0, v, v, 0, T0 + round),
                ),
                (cat("Games"), totals(1, 1, 0, v * 3, v, 0, T0 + round)),
            ],
        )
    };
    let rounds = 8;
    async fn run(store: &mut AwsStore, writes: Vec<Vec<ShardChanges>>) {
        for w in &writes {
            store.write(w, T0).await.unwrap();
        }
    }
    let writes = |shards: [Shard; 2]| -> Vec<Vec<ShardChanges>> {
        (1..=rounds)
            .map(|r| shards.iter().map(|&s| flush(s, r)).collect())
            .collect()
    };
    tokio::join!(run(&mut a, writes([0, 1])), run(&mut b, writes([2, 3])));
    for r in 1..=rounds {
        emb.write(&[flush(0, r), flush(1, r), flush(2, r), flush(3, r)], T0)
            .unwrap();
    }
    assert_eq!(
        a.current_records(T0).await.unwrap(),
        emb.current_records(T0).unwrap()
    );
    let MetricRecord::Category(books) = &a.current_records(T0).await.unwrap()[0] else {
        panic!()
    };
    assert_eq!((books.total_products, books.total_value.0), (32, 6008 + 24));
}

#[tokio::test]
async fn a_low_stock_item_moves_between_sellers_and_leaves_the_list_after_a_restart() {
    let cfg = config("lowstock");
    let (_dir, mut emb) = oracle();
    let id = ProductId::Num(42);
    let at = |offset, state| changes(5, offset, vec![(id.clone(), state)], vec![]);
    let mut aws = connect(&cfg).await;
    let keys = |r: Vec<MetricRecord>| r.iter().map(MetricRecord::key).collect::<Vec<_>>();

    for w in [
        at(1, product("s1", "Toys", 250, 3, false, Some(T0))),
        at(2, product("s2", "Toys", 250, 4, false, Some(T0))),
    ] {
        let s = aws.write(std::slice::from_ref(&w), T0).await.unwrap();
        emb.write(&[w], T0).unwrap();
        assert_eq!(s.low_stock_puts, 1);
    }
    assert_eq!(
        keys(aws.low_stock(None).await.unwrap()),
        vec![("LOWSTOCK#s2".into(), "PRODUCT#42".into())]
    );
    assert!(aws.low_stock(Some("s1")).await.unwrap().is_empty());

    // A restarted storage process that never loaded shard 5 still knows
    // where the item is filed.
    drop(aws);
    let mut aws = connect(&cfg).await;
    let w = at(3, product("s2", "Toys", 250, 40, false, None));
    let s = aws.write(std::slice::from_ref(&w), T0).await.unwrap();
    emb.write(&[w], T0).unwrap();
    assert_eq!((s.low_stock_puts, s.low_stock_deletes), (0, 1));
    assert!(aws.low_stock(None).await.unwrap().is_empty());
    assert_same(&aws, &emb, T0, &[5]).await;
}

#[tokio::test]
async fn a_stale_owner_loses_the_shard_and_cannot_clobber_it() {
    let cfg = config("owner");
    let mut a = connect(&cfg).await;
    let mut b = connect(&cfg).await;
    let w = |offset, value| {
        changes(
            7,
            offset,
            vec![],
            vec![(cat("Books"), totals(1, 1, 0, value, value, 0, T0 + offset))],
        )
    };
    a.write(&[w(1, 100)], T0).await.unwrap();
    // The shard moves to B, which loads and writes it.
    b.load_shard(7, 10).await.unwrap();
    b.write(&[w(2, 200)], T0).await.unwrap();
    // A has not noticed: its write is refused, for good.
    let err = a.write(&[w(3, 300)], T0).await.unwrap_err();
    assert!(
        matches!(err, AwsStoreError::LostOwnership { shard: 7, .. }),
        "{err}"
    );
    assert!(!err.is_retryable());
    // B's state is intact, and B goes on.
    let books = |r: Vec<MetricRecord>| match &r[..] {
        [MetricRecord::Category(c)] => c.total_value.0,
        other => panic!("{other:?}"),
    };
    assert_eq!(books(b.current_records(T0).await.unwrap()), 200);
    b.write(&[w(3, 300)], T0).await.unwrap();
    assert_eq!(books(b.current_records(T0).await.unwrap()), 300);
    assert_eq!(b.load_shard(7, 10).await.unwrap()[0].positions, pos(3));
}

/// A round of two shards, where the instance lost the second one: the
/// first one's commit gets its metric items before the refusal.
#[tokio::test]
async fn a_round_refused_on_one_shard_still_writes_the_metrics_of_the_other() {
    let cfg = config("round");
    let mut a = connect(&cfg).await;
    let mut b = connect(&cfg).await;
    let w = |shard, offset, category, value| {
        changes(
            shard,
            offset,
            vec![],
            vec![(cat(category), totals(1, 1, 0, value, value, 0, T0))],
        )
    };
    a.write(&[w(7, 1, "Games", 100)], T0).await.unwrap();
    b.load_shard(7, 10).await.unwrap();
    b.write(&[w(7, 2, "Games", 200)], T0).await.unwrap();
    // A's cached checkpoint of shard 7 is stale: its commit is refused.
    let err = a
        .write(&[w(3, 1, "Books", 50), w(7, 3, "Games", 300)], T0)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AwsStoreError::LostOwnership { shard: 7, .. }),
        "{err}"
    );
    let mut values: Vec<_> = b
        .current_records(T0)
        .await
        .unwrap()
        .into_iter()
        .map(|r| match r {
            MetricRecord::Category(c) => (c.category, c.total_value.0),
            other => panic!("{other:?}"),
        })
        .collect();
    values.sort();
    assert_eq!(
        values,
        [("Books".to_string(), 50), ("Games".to_string(), 200)]
    );
}

/// The stale owner's storage process has no checkpoint cached (it was
/// restarted, or its last attempt failed), so its commit is conditioned on
/// the seq it reads now: the positions must give it away.
#[tokio::test]
async fn a_stale_owner_that_reads_the_checkpoint_afresh_cannot_clobber_the_shard() {
    let cfg = config("afresh");
    let w = |created, updated, value| {
        let mut c = changes(
            7,
            0,
            vec![],
            vec![(cat("Books"), totals(1, 1, 0, value, value, 0, T0))],
        );
        c.positions = ["created", "updated"]
            .into_iter()
            .zip([created, updated])
            .map(|(stream, offset)| Position {
                stream: stream.into(),
                offset,
            })
            .collect();
        c
    };
    connect(&cfg)
        .await
        .write(&[w(100, 500, 100)], T0)
        .await
        .unwrap();
    // B takes the shard over and folds further on `updated`.
    let mut b = connect(&cfg).await;
    b.load_shard(7, 10).await.unwrap();
    b.write(&[w(105, 900, 200)], T0).await.unwrap();
    // A went on from its own state (created 130, but updated only 520).
    let mut a = connect(&cfg).await;
    let err = a.write(&[w(130, 520, 300)], T0).await.unwrap_err();
    assert!(
        matches!(err, AwsStoreError::LostOwnership { shard: 7, .. }),
        "{err}"
    );
    // A replay of what A wrote before B took over is skipped, not refused.
    let replay = a.write(&[w(100, 500, 100)], T0).await.unwrap();
    assert_eq!((replay.shards_applied, replay.shards_skipped), (0, 1));
    let restored = b.load_shard(7, 10).await.unwrap();
    let mut positions: Vec<_> = restored[0]
        .positions
        .iter()
        .map(|p| (p.stream.to_string(), p.offset))
        .collect();
    positions.sort();
    assert_eq!(
        positions,
        [("created".to_string(), 105), ("updated".to_string(), 900)]
    );
    match &b.current_records(T0).await.unwrap()[..] {
        [MetricRecord::Category(c)] => assert_eq!(c.total_value.0, 200),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn metric_snapshots_go_to_s3_as_gzip_json_lines_and_ttl_is_refreshed() {
    let mut cfg = config("archive");
    cfg.ttl = Duration::from_secs(3600);
    let mut aws = connect(&cfg).await;
    aws.write(&worked_check(), T0).await.unwrap();
    let records = aws.current_records(T0).await.unwrap();
    assert_eq!(records.len(), 4);

    let key = aws.write_metric_snapshot(&records, T0).await.unwrap();
    assert_eq!(key, "metrics/dt=2023-10-01/snapshot-1696176060000.jsonl.gz");
    let (_, s3) = aws.clients();
    let body = s3
        .get_object()
        .bucket(&cfg.bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    // A gzip file as such: no `Content-Encoding` for HTTP clients to undo.
    assert_eq!(body.content_type(), Some("application/gzip"));
    assert_eq!(body.content_encoding(), None);
    let bytes = body.body.collect().await.unwrap().into_bytes();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut text)
        .unwrap();
    let expected: String = records.iter().map(|r| r.to_json_line() + "\n").collect();
    assert_eq!(text, expected);

    // Past the TTL the entity items are gone from reads; a refresh brings
    // the current ones back (the low-stock item has no TTL).
    let later = T0 + 2 * 3600 * 1000;
    assert_eq!(aws.current_records(later).await.unwrap().len(), 1);
    assert_eq!(aws.refresh_ttl(later).await.unwrap(), 3);
    assert_eq!(aws.current_records(later).await.unwrap().len(), 4);
    // Refreshed lately (less than half the lifetime ago): not again, so a
    // restarted storage process does not redo a large table.
    assert_eq!(aws.refresh_ttl(later + 1000).await.unwrap(), 0);
    let much_later = later + 3600 * 1000;
    assert_eq!(aws.refresh_ttl(much_later).await.unwrap(), 3);
    assert_eq!(aws.current_records(much_later).await.unwrap().len(), 4);
    assert!(aws.seller("s1", later).await.unwrap().unwrap().1.is_empty());
}

#[tokio::test]
async fn connect_sets_up_tables_ttl_and_bucket_once() {
    let cfg = config("setup");
    let aws = connect(&cfg).await;
    let (ddb, s3) = aws.clients();
    let ttl = ddb
        .describe_time_to_live()
        .table_name(&cfg.metrics_table)
        .send()
        .await
        .unwrap();
    let desc = ttl.time_to_live_description().unwrap();
    assert_eq!(desc.attribute_name(), Some("TTL"));
    s3.head_bucket().bucket(&cfg.bucket).send().await.unwrap();
    // Connecting again finds everything in place.
    connect(&cfg).await;
}

/// Figures for the report: one flush of 400 changed products (10% on the
/// low-stock list) and 40 entities, then a restore of the shard. Kept small:
/// moto deep-copies a table for every item of a transaction, so its cost
/// grows with the table (real DynamoDB's does not); the figures are moto's.
#[tokio::test]
async fn measure_a_large_flush_and_a_restore() {
    let mut cfg = config("measure");
    cfg.compact_after = 16;
    let mut aws = connect(&cfg).await;
    let n = 400u64;
    let flush = |round: u64| {
        let products: Vec<_> = (0..n)
            .map(|i| {
                let id = ProductId::Num(round * n + i);
                let low = (i % 10 == 0).then_some(T0);
                (
                    id,
                    product(
                        &format!("s{}", i % 20),
                        &format!("c{}", i % 20),
                        100 + i as i64,
                        5,
                        false,
                        low,
                    ),
                )
            })
            .collect();
        let entities: Vec<_> = (0..20)
            .flat_map(|i| {
                [
                    (
                        seller(&format!("s{i}")),
                        totals(20 * (round + 1), 20, 0, 1000, 100, 2, T0),
                    ),
                    (
                        cat(&format!("c{i}")),
                        totals(20 * (round + 1), 20, 0, 1000, 100, 2, T0),
                    ),
                ]
            })
            .collect();
        changes(8, round as i64, products, entities)
    };
    let start = Instant::now();
    let stats = aws.write(&[flush(0)], T0).await.unwrap();
    let first = start.elapsed();
    for round in 1..3 {
        aws.write(&[flush(round)], T0).await.unwrap();
    }
    let start = Instant::now();
    let loaded: usize = aws
        .load_shard(8, 50_000)
        .await
        .unwrap()
        .iter()
        .map(|c| c.products.len())
        .sum();
    let restore = start.elapsed();
    assert_eq!(loaded, 3 * n as usize);
    eprintln!(
        "flush of {n} products, {} entities, {} low-stock puts: {first:?} ({:.0} metric items/s); restore of {loaded} products: {restore:?}",
        stats.entities,
        stats.low_stock_puts,
        (stats.entities * 3 + stats.low_stock_puts) as f64 / first.as_secs_f64()
    );
}

/// Reading (`query`, `export`) creates nothing: a mistyped table name is an
/// error, not a new empty table and no output. `connect` (for `run`) does
/// create them, and reading then works.
#[tokio::test]
async fn reading_a_store_that_does_not_exist_creates_nothing() {
    let cfg = config("read-only");
    let err = match AwsStore::open_existing(cfg.clone()).await {
        Ok(_) => panic!("opened a store whose tables do not exist"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("no DynamoDB table {}", cfg.metrics_table)),
        "{err}"
    );
    let store = connect(&cfg).await;
    let (ddb, _) = store.clients();
    assert!(
        ddb.describe_table()
            .table_name(&cfg.metrics_table)
            .send()
            .await
            .is_ok()
    );
    // Both tables are there now (connect made them): a read opens them.
    AwsStore::open_existing(cfg.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn export_with_a_mistyped_table_fails_and_creates_nothing() {
    let cfg = config("typo");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_analytics"))
        .args([
            "export",
            "--store",
            "aws",
            "--aws-region",
            "us-east-1",
            "--aws-endpoint",
        ])
        .arg(cfg.endpoint.as_deref().unwrap_or_default())
        .args([
            "--dynamodb-table",
            &cfg.metrics_table,
            "--state-table",
            &cfg.state_table,
        ])
        .args(["--s3-bucket", &cfg.bucket])
        .output()
        .expect("run analytics export");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no DynamoDB table"), "{stderr}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let still_missing = rt.block_on(AwsStore::open_existing(cfg.clone()));
    assert!(
        still_missing.is_err_and(|e| e.to_string().contains("no DynamoDB table")),
        "export created {}",
        cfg.metrics_table
    );
}
