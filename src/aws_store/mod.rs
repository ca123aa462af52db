//! The AWS store (DESIGN §5, §6): the storage process's store on DynamoDB
//! and S3, with the same operations and the same item model as the embedded
//! [`crate::store::EmbeddedStore`], async.
//!
//! # Layout
//!
//! **Metrics table** (default `analytics-metrics`, PK/SK strings, TTL on
//! `TTL`): exactly DESIGN §6 and the embedded store's attributes:
//! `SELLER#<id>` / `CATEGORY#<name>` × `CURRENT` / `DAY#YYYY-MM-DD` (the
//! entity at the end of that UTC day: every shard's part as it stood then,
//! see [`crate::daily_parts`]), with `updatedAt` and `TTL` (write time plus
//! the ttl); `LOWSTOCK#<seller>` / `PRODUCT#<id>` without TTL. Counts
//! and times are `N`; money is `N` holding the exact decimal (`120.00`:
//! DynamoDB numbers are exact decimals of up to 38 digits, so sums stay exact
//! and analysts can compare and add them); see [`item`].
//!
//! **State table** (default `analytics-state`, never expires):
//! - `SHARD#<p>` / `CHECKPOINT`: the shard's commit pointer ([`state::Checkpoint`]):
//!   `seq`, `applied`, the base object, the delta objects since, positions.
//! - `PARTS#<entity PK>` / `PARTS`: every shard's contribution to one seller
//!   or category, each tagged with the seq of the write that set it, the
//!   same at the end of each recent day it wrote in (for the `DAY#` items),
//!   and a `version` for optimistic concurrency ([`state::Parts`]).
//!
//! **Bucket** (default `analytics-archive`):
//! - `state/shard=<p>/<seq:020>-delta-<writer>.bin.gz`: what one write changed
//!   (product states, the shard's changed entity contributions, positions,
//!   low-stock deletions); `...-base-<writer>.bin.gz`: the whole shard at a
//!   seq. Gzip of proto frames, one record each ([`state`]).
//! - `metrics/dt=YYYY-MM-DD/snapshot-<epochMillis>.jsonl.gz`: metric snapshots.
//!
//! # A write, per shard
//!
//! 1. **Skip replays, refuse a stale owner**: a change whose positions are
//!    all committed is skipped. One ahead on a stream but behind on another
//!    (writes carry every stream's position) was folded by an owner that
//!    lost the shard meanwhile: [`AwsStoreError::LostOwnership`]. The
//!    conditional commit alone does not catch it when this storage process
//!    reads the checkpoint afresh (after a restart, or a failed attempt).
//! 2. **Delta**: put the delta object; every `compact_after` deltas, or once
//!    the deltas outweigh the base, also a new base (base + deltas merged).
//!    Cost grows with the products changed; a restore reads one base and at
//!    most a few deltas, a few large objects even for a million products.
//! 3. **Commit**: a conditional put of the checkpoint, `seq = :expected` (or
//!    `attribute_not_exists` for the first). Two owners can never both
//!    commit a seq; the loser gets [`AwsStoreError::LostOwnership`], never
//!    retried. After an ambiguous failure (a timeout) our own `commitId` in
//!    the item tells that the commit did happen.
//! 4. **Metric items, derived from the committed delta** (so they can be
//!    redone): low-stock puts/deletes, then per changed entity a
//!    read-modify-write of its parts item — this shard's part is replaced
//!    only by a newer seq, the sum over parts is the entity's value — written
//!    with its `CURRENT` item and the `DAY#` items of the days the write
//!    filed parts under and every later day (a shard read behind the others
//!    changes those sums too) in one `TransactWriteItems`
//!    conditioned on the parts item's version. A conflict (another instance
//!    updated the same category) re-reads and retries, so concurrent shards
//!    sum exactly.
//! 5. **Applied**: `applied = seq`. A crash between 3 and 5 leaves
//!    `applied < seq`; the next write or load of the shard first redoes step 4
//!    from the delta of `seq` (idempotent: a part of the same seq is not
//!    applied twice), then sets `applied`.
//!
//! # Departures from the brief, and why
//!
//! - **Object names carry the writer's token.** With names fixed by shard
//!   and seq only, a stale owner (lost the shard to a rebalance, not yet told)
//!   would overwrite the *committed* delta of the same seq before its own
//!   commit failed. Names `<seq>-<kind>-<writer>` make that impossible; the
//!   checkpoint records which object is current. A retry by the same writer
//!   still overwrites its own uncommitted object.
//! - **Metric writes are fenced by the checkpoint.** Every metric
//!   transaction also checks `seq = :ours` on the shard's checkpoint. Without
//!   it, a stale owner's late metric writes (after a new owner committed
//!   later seqs) could bring back a low-stock item the new owner deleted.
//!   So low-stock items go through `TransactWriteItems` (up to 99 items and
//!   the fence per request; 2 WCU per item) instead of unconditioned
//!   `BatchWriteItem`, which cannot carry a condition.
//!   (`BatchGetItem`'s `UnprocessedKeys` are resubmitted; see [`resubmit`].)
//! - Which low-stock item to delete (the product left the list, or moved
//!   to another seller) comes from the worker with each write
//!   ([`proto::LowStockChange`]); nothing here keeps a low-stock index.
//!
//! # Known limits
//!
//! - Objects of a writer that lost a race are never committed and never
//!   read; they are left behind (tiny; a bucket lifecycle rule on `state/`
//!   for non-current objects could remove them). Objects superseded by a new
//!   base are deleted, best effort, right after the commit.
//! - Compaction and `load_shard` hold a shard's products in memory, as the
//!   embedded store does.

pub mod error;
pub mod item;
pub mod requests;
pub mod retry;
pub mod state;
mod ttl;

pub use error::AwsStoreError;
pub use ttl::TtlRefresher;

use crate::archive::{
    encode_metric_snapshot, event_range_key, event_range_prefix, is_range_under,
    metric_snapshot_key,
};
use crate::store::{
    CURRENT, History, LOW_STOCK_PREFIX, WriteStats, day_sk, entity_object, entity_pk,
    low_stock_value, parse_item_value, part_day, retain_days,
};
use analytics_worker::records::{MetricRecord, low_stock_key, sort_records};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, ConditionCheck, Delete, KeySchemaElement, KeyType,
    KeysAndAttributes, Put, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
    TimeToLiveStatus, TransactWriteItem,
};
use error::{conditional, describe};
use item::Item;
use proto::{
    EntityKey, EntityTotals, LowStockChange, LowStockItem, ProductId, Shard, ShardChanges,
    ShardState,
};
use retry::{Backoff, retry};
use state::{Checkpoint, Delta, Image, Parts, Succession};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// Items per `TransactWriteItems` (DynamoDB's limit).
const TRANSACT_MAX: usize = 100;
/// Keys per `BatchGetItem` (DynamoDB's limit).
const BATCH_GET_MAX: usize = 100;
/// Rounds of re-reading entity parts after conflicting transactions.
const MAX_CONFLICT_ROUNDS: u32 = 30;

#[derive(Clone, Debug)]
pub struct AwsConfig {
    /// Endpoint override for a local stack (`http://127.0.0.1:5000` for
    /// moto); S3 then uses path-style addressing.
    pub endpoint: Option<String>,
    /// Region; `None` takes it from the provider chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    pub metrics_table: String,
    pub state_table: String,
    pub bucket: String,
    /// Lifetime of seller/category items after their last write.
    pub ttl: Duration,
    /// Deltas per shard before they are folded into a new base.
    pub compact_after: usize,
    pub backoff: Backoff,
    /// How long `connect` waits for a new table to become ACTIVE.
    pub table_wait: Duration,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            endpoint: None,
            region: None,
            metrics_table: "analytics-metrics".into(),
            state_table: "analytics-state".into(),
            bucket: "analytics-archive".into(),
            ttl: Duration::from_secs(30 * 24 * 3600),
            compact_after: 16,
            backoff: Backoff::default(),
            table_wait: Duration::from_secs(120),
        }
    }
}

/// What the store remembers of a shard it has touched.
#[derive(Debug)]
struct ShardCache {
    /// `None`: the shard has never been committed.
    cp: Option<Checkpoint>,
}

pub struct AwsStore {
    ddb: aws_sdk_dynamodb::Client,
    s3: aws_sdk_s3::Client,
    cfg: AwsConfig,
    ttl_secs: i64,
    /// This store's token in object names and commit ids.
    writer: String,
    shards: Mutex<HashMap<Shard, ShardCache>>,
    fail_after_commit: bool,
}

/// One entity's transaction items and the shard checkpoints that fence them.
type EntityOp = (EntityKey, Vec<TransactWriteItem>, Vec<(Shard, u64)>);

/// How a transaction ended, when it did not fail outright.
enum Transact {
    Done,
    /// Cancelled: a condition failed or a conflicting transaction ran.
    Cancelled(String),
}

/// A table's set-up (describe, create, wait) failed.
fn table_setup_error(name: &str, detail: String, retryable: bool) -> AwsStoreError {
    AwsStoreError::Setup {
        what: format!("table {name}"),
        detail,
        retryable,
    }
}

impl AwsStore {
    /// Builds the clients from the standard provider chain and creates the
    /// tables, TTL setting and bucket when missing.
    pub async fn connect(cfg: AwsConfig) -> Result<AwsStore, AwsStoreError> {
        let store = AwsStore::clients_for(cfg).await?;
        store.ensure_table(&store.cfg.metrics_table).await?;
        store.ensure_table(&store.cfg.state_table).await?;
        store.ensure_ttl().await?;
        store.ensure_bucket().await?;
        Ok(store)
    }

    /// For reading (`query`, `export`): creates nothing. A missing table is
    /// an error, as a missing embedded store is: a mistyped table name must
    /// not leave an empty table behind and print nothing.
    pub async fn open_existing(cfg: AwsConfig) -> Result<AwsStore, AwsStoreError> {
        let store = AwsStore::clients_for(cfg).await?;
        for table in [&store.cfg.metrics_table, &store.cfg.state_table] {
            if !store.table_exists(table).await? {
                return Err(AwsStoreError::Config(format!(
                    "no DynamoDB table {table} (run `analytics run --store aws` first)"
                )));
            }
        }
        Ok(store)
    }

    async fn clients_for(cfg: AwsConfig) -> Result<AwsStore, AwsStoreError> {
        use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            );
        if let Some(region) = &cfg.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &cfg.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(AwsStoreError::Config(
                "no AWS region: set AWS_REGION or the region option".into(),
            ));
        }
        let ddb = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(&sdk)
                .interceptor(requests::RequestCounter)
                .build(),
        );
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(cfg.endpoint.is_some())
                .interceptor(requests::RequestCounter)
                .build(),
        );
        let store = AwsStore {
            ddb,
            s3,
            ttl_secs: i64::try_from(cfg.ttl.as_secs()).unwrap_or(i64::MAX),
            writer: format!("{:016x}", retry::random_u64()),
            cfg,
            shards: Mutex::new(HashMap::new()),
            fail_after_commit: false,
        };
        Ok(store)
    }

    pub fn config(&self) -> &AwsConfig {
        &self.cfg
    }

    /// The DynamoDB and S3 clients, for tools and tests that look at the
    /// raw items and objects.
    pub fn clients(&self) -> (&aws_sdk_dynamodb::Client, &aws_sdk_s3::Client) {
        (&self.ddb, &self.s3)
    }

    /// Test hook: make `write` stop with [`AwsStoreError::Injected`] right
    /// after its commits, before any metric item is written (a crash
    /// between commit and metric writes).
    #[doc(hidden)]
    pub fn fail_after_commit(&mut self, on: bool) {
        self.fail_after_commit = on;
    }

    // ---- set-up ---------------------------------------------------------

    async fn table_exists(&self, name: &str) -> Result<bool, AwsStoreError> {
        let setup = |detail, retryable| table_setup_error(name, detail, retryable);
        retry(
            &self.cfg.backoff,
            "describe_table",
            AwsStoreError::is_retryable,
            || async {
                match self.ddb.describe_table().table_name(name).send().await {
                    Ok(_) => Ok(true),
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_resource_not_found_exception()) =>
                    {
                        Ok(false)
                    }
                    Err(e) => {
                        let (d, r) = describe(&e);
                        Err(setup(d, r))
                    }
                }
            },
        )
        .await
    }

    async fn ensure_table(&self, name: &str) -> Result<(), AwsStoreError> {
        let setup = |detail, retryable| table_setup_error(name, detail, retryable);
        if !self.table_exists(name).await? {
            let key = |n: &str, t| {
                KeySchemaElement::builder()
                    .attribute_name(n)
                    .key_type(t)
                    .build()
            };
            let attr = |n: &str| {
                AttributeDefinition::builder()
                    .attribute_name(n)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
            };
            let build = |e: aws_sdk_dynamodb::error::BuildError| setup(e.to_string(), false);
            let created = self
                .ddb
                .create_table()
                .table_name(name)
                .key_schema(key("PK", KeyType::Hash).map_err(build)?)
                .key_schema(key("SK", KeyType::Range).map_err(build)?)
                .attribute_definitions(attr("PK").map_err(build)?)
                .attribute_definitions(attr("SK").map_err(build)?)
                .billing_mode(BillingMode::PayPerRequest)
                .send()
                .await;
            match created {
                Ok(_) => tracing::info!(table = name, "created DynamoDB table"),
                // Another instance created it first.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_resource_in_use_exception()) => {}
                Err(e) => {
                    let (d, r) = describe(&e);
                    return Err(setup(d, r));
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.cfg.table_wait;
        loop {
            let out = self.ddb.describe_table().table_name(name).send().await;
            let status = match out {
                Ok(o) => o.table().and_then(|t| t.table_status().cloned()),
                Err(e) => {
                    let (d, r) = describe(&e);
                    if !r {
                        return Err(setup(d, r));
                    }
                    None
                }
            };
            if status == Some(TableStatus::Active) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(setup(
                    format!("not ACTIVE after {:?} ({status:?})", self.cfg.table_wait),
                    true,
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn ensure_ttl(&self) -> Result<(), AwsStoreError> {
        let table = &self.cfg.metrics_table;
        let setup = |(detail, retryable)| AwsStoreError::Setup {
            what: format!("TTL of {table}"),
            detail,
            retryable,
        };
        let out = retry(
            &self.cfg.backoff,
            "describe_time_to_live",
            AwsStoreError::is_retryable,
            || async {
                self.ddb
                    .describe_time_to_live()
                    .table_name(table)
                    .send()
                    .await
                    .map_err(|e| setup(describe(&e)))
            },
        )
        .await?;
        let status = out
            .time_to_live_description()
            .and_then(|d| d.time_to_live_status().cloned());
        if matches!(
            status,
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
        ) {
            return Ok(());
        }
        let spec = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name("TTL")
            .build()
            .map_err(|e| setup((e.to_string(), false)))?;
        retry(
            &self.cfg.backoff,
            "update_time_to_live",
            AwsStoreError::is_retryable,
            || async {
                self.ddb
                    .update_time_to_live()
                    .table_name(table)
                    .time_to_live_specification(spec.clone())
                    .send()
                    .await
                    .map_err(|e| setup(describe(&e)))
            },
        )
        .await?;
        tracing::info!(table, "enabled TTL on attribute TTL");
        Ok(())
    }

    async fn ensure_bucket(&self) -> Result<(), AwsStoreError> {
        let bucket = &self.cfg.bucket;
        let setup = |(detail, retryable)| AwsStoreError::Setup {
            what: format!("bucket {bucket}"),
            detail,
            retryable,
        };
        let exists = retry(
            &self.cfg.backoff,
            "head_bucket",
            AwsStoreError::is_retryable,
            || async {
                match self.s3.head_bucket().bucket(bucket).send().await {
                    Ok(_) => Ok(true),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
                    Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                        Ok(false)
                    }
                    Err(e) => Err(setup(describe(&e))),
                }
            },
        )
        .await?;
        if exists {
            return Ok(());
        }
        let mut req = self.s3.create_bucket().bucket(bucket);
        let region = self.s3.config().region().map(|r| r.as_ref().to_string());
        if let Some(region) = region.filter(|r| r != "us-east-1") {
            req = req.create_bucket_configuration(
                aws_sdk_s3::types::CreateBucketConfiguration::builder()
                    .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(
                        region.as_str(),
                    ))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => {
                tracing::info!(bucket, "created S3 bucket");
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_bucket_already_owned_by_you()) =>
            {
                Ok(())
            }
            Err(e) => Err(setup(describe(&e))),
        }
    }

    // ---- writes ---------------------------------------------------------

    /// Applies shard changes exactly once (see the module doc). Dead letters
    /// are the caller's. Changes of one shard are applied in order; a slice
    /// naming a shard twice is applied in rounds.
    pub async fn write(
        &mut self,
        changes: &[ShardChanges],
        now_ms: i64,
    ) -> Result<WriteStats, AwsStoreError> {
        let mut stats = WriteStats::default();
        let mut rest = changes;
        while !rest.is_empty() {
            // The longest prefix naming each shard once.
            let mut seen = BTreeSet::new();
            let n = rest.iter().take_while(|c| seen.insert(c.shard)).count();
            let (round, tail) = rest.split_at(n);
            self.write_round(round, now_ms, &mut stats).await?;
            rest = tail;
        }
        Ok(stats)
    }

    async fn write_round(
        &mut self,
        round: &[ShardChanges],
        now_ms: i64,
        stats: &mut WriteStats,
    ) -> Result<(), AwsStoreError> {
        // Every shard is checked before any commits: a refusal after a
        // commit would leave that commit's metric writes undone.
        let mut checked = Vec::with_capacity(round.len());
        for sc in round {
            let cache = self.touch(sc.shard, now_ms).await?;
            let newer = match &cache.cp {
                Some(cp) => match cp.succession(&sc.positions) {
                    Succession::Newer => true,
                    Succession::Replay => false,
                    Succession::Diverged => {
                        return Err(AwsStoreError::LostOwnership {
                            shard: sc.shard,
                            seq: cp.seq,
                        });
                    }
                },
                None => !sc.positions.is_empty(),
            };
            checked.push((sc, cache, newer));
        }
        let mut committed = Vec::new();
        for (sc, mut cache, newer) in checked {
            if !newer {
                stats.shards_skipped += 1;
                self.put_back(sc.shard, cache);
                continue;
            }
            // On error the cache is dropped: the next touch reads the truth.
            let delta = match self.commit(sc, &mut cache, now_ms).await {
                Ok(delta) => delta,
                Err(e) => {
                    // Another shard of the round may have committed: its
                    // metric writes are done now rather than left to a
                    // repair (a refusal here ends the service).
                    if let Err(also) = self.apply_committed(&committed, now_ms).await {
                        tracing::warn!(error = %also, "writing the metrics of a round's commits failed");
                    }
                    return Err(e);
                }
            };
            self.put_back(sc.shard, cache);
            stats.shards_applied += 1;
            stats.products += u64::from(sc.products.count);
            if let Some(d) = delta {
                committed.push(d);
            }
        }
        if self.fail_after_commit
            && let Some(d) = committed.first()
        {
            return Err(AwsStoreError::Injected { shard: d.shard });
        }
        let applied = self.apply_committed(&committed, now_ms).await?;
        stats.entities += applied.entities;
        stats.low_stock_puts += applied.low_stock_puts;
        stats.low_stock_deletes += applied.low_stock_deletes;
        Ok(())
    }

    /// Steps 4 and 5 for the commits of a round.
    async fn apply_committed(
        &self,
        committed: &[Delta],
        now_ms: i64,
    ) -> Result<WriteStats, AwsStoreError> {
        let applied = self.apply_metrics(committed, now_ms).await?;
        for d in committed {
            self.mark_applied(d.shard, d.seq).await?;
        }
        Ok(applied)
    }

    fn put_back(&self, shard: Shard, cache: ShardCache) {
        self.cache().insert(shard, cache);
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Shard, ShardCache>> {
        // The map holds no invariant a panic could break mid-update.
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shard's cache entry, taken out of the map, restored on first
    /// touch, with any committed-but-unapplied write repaired.
    async fn touch(&self, shard: Shard, now_ms: i64) -> Result<ShardCache, AwsStoreError> {
        let cached = self.cache().remove(&shard);
        let mut cache = match cached {
            Some(c) => c,
            None => ShardCache {
                cp: self.read_checkpoint(shard).await?,
            },
        };
        if let Some(cp) = &mut cache.cp {
            self.repair(shard, cp, now_ms).await?;
        }
        Ok(cache)
    }

    /// Redoes the metric writes of a committed but unapplied seq.
    async fn repair(
        &self,
        shard: Shard,
        cp: &mut Checkpoint,
        now_ms: i64,
    ) -> Result<(), AwsStoreError> {
        if cp.applied >= cp.seq {
            return Ok(());
        }
        tracing::info!(
            shard,
            seq = cp.seq,
            applied = cp.applied,
            "redoing the metric writes of a committed write"
        );
        if let Some(key) = &cp.last_delta {
            let delta = state::decode_delta(&self.get_object(key).await?)?;
            if delta.seq != cp.seq || delta.shard != shard {
                return Err(AwsStoreError::Decode {
                    what: "state object",
                    detail: format!("{key} holds shard {} seq {}", delta.shard, delta.seq),
                });
            }
            self.apply_metrics(std::slice::from_ref(&delta), now_ms)
                .await?;
        }
        self.mark_applied(shard, cp.seq).await?;
        cp.applied = cp.seq;
        Ok(())
    }

    /// Steps 2 and 3: the delta (and maybe a base) object, then the
    /// conditional commit. Returns the delta when it has metric writes.
    async fn commit(
        &self,
        sc: &ShardChanges,
        cache: &mut ShardCache,
        now_ms: i64,
    ) -> Result<Option<Delta>, AwsStoreError> {
        let shard = sc.shard;
        let prev = cache.cp.clone();
        let mut cp = prev.clone().unwrap_or_default();
        cp.seq += 1;
        cp.merge_positions(&sc.positions);
        cp.commit_id = format!("{}-{}", self.writer, retry::random_u64());
        cp.last_delta = None;

        // Low-stock items whose product left the list or moved to another
        // seller, as the worker says; the puts follow the product states.
        let low_stock_deletes: Vec<(Box<str>, ProductId)> = sc
            .low_stock
            .iter()
            .filter_map(|c| match c {
                LowStockChange::Delete {
                    seller_id,
                    product_id,
                } => Some((seller_id.clone(), product_id.clone())),
                LowStockChange::Put(_) => None,
            })
            .collect();
        let products = sc.products.decode().map_err(|e| AwsStoreError::Decode {
            what: "product states of a write",
            detail: e.to_string(),
        })?;
        let has_metrics =
            !products.is_empty() || !sc.entities.is_empty() || !low_stock_deletes.is_empty();
        let delta = Delta {
            shard,
            seq: cp.seq,
            positions: cp.position_list(),
            products,
            entities: sc.entities.clone(),
            low_stock_deletes,
            changed_at: sc.changed_at.clone(),
        };
        let mut superseded = Vec::new();
        if has_metrics {
            let bytes = state::encode_delta(&delta)?;
            let key = state::object_key(shard, cp.seq, "delta", &self.writer);
            self.put_object(&key, bytes.clone()).await?;
            cp.delta_bytes += bytes.len() as u64;
            cp.deltas.push(key.clone());
            cp.last_delta = Some(key.clone());
            if cp.should_compact(self.cfg.compact_after) {
                let image = match self.read_image(shard, &cp).await {
                    Ok(image) => image,
                    // A new owner's compaction may have removed our base.
                    Err(e) => return Err(self.ownership_or(shard, prev.as_ref(), e).await),
                };
                let base = state::encode_base(shard, cp.seq, &delta.positions, &image)?;
                let base_key = state::object_key(shard, cp.seq, "base", &self.writer);
                self.put_object(&base_key, base.clone()).await?;
                if let Some(p) = &prev {
                    superseded.extend(p.base_key.iter().cloned());
                    superseded.extend(p.deltas.iter().cloned());
                    superseded.extend(p.last_delta.iter().cloned());
                }
                superseded.retain(|k| *k != key);
                cp.base_key = Some(base_key);
                cp.base_seq = cp.seq;
                cp.base_bytes = base.len() as u64;
                cp.deltas.clear();
                cp.delta_bytes = 0;
            }
        } else {
            // Positions only: nothing to apply.
            cp.applied = cp.seq;
        }
        // The previous write's delta, when a compaction had already folded
        // it into the base, is referenced by nothing once this commits (its
        // metrics were applied before this write began).
        if let Some(p) = &prev
            && let Some(last) = &p.last_delta
            && !p.deltas.contains(last)
            && !superseded.contains(last)
            && cp.last_delta.as_ref() != Some(last)
        {
            superseded.push(last.clone());
        }
        self.put_checkpoint(shard, prev.as_ref().map(|p| p.seq), &cp, now_ms)
            .await?;
        cache.cp = Some(cp);
        for key in superseded {
            if let Err(error) = self
                .s3
                .delete_object()
                .bucket(&self.cfg.bucket)
                .key(&key)
                .send()
                .await
            {
                tracing::warn!(key, error = %error::sdk_detail(&error), "could not delete a superseded state object");
            }
        }
        Ok(has_metrics.then_some(delta))
    }

    /// `e`, unless the shard's checkpoint moved past `prev`: then another
    /// instance owns the shard, which explains `e`.
    async fn ownership_or(
        &self,
        shard: Shard,
        prev: Option<&Checkpoint>,
        e: AwsStoreError,
    ) -> AwsStoreError {
        let expected = prev.map(|p| p.seq);
        match self.read_checkpoint(shard).await {
            Ok(cp) if cp.as_ref().map(|c| c.seq) != expected => {
                self.cache().remove(&shard);
                AwsStoreError::LostOwnership {
                    shard,
                    seq: expected.unwrap_or(0),
                }
            }
            _ => e,
        }
    }

    async fn put_checkpoint(
        &self,
        shard: Shard,
        expected: Option<u64>,
        cp: &Checkpoint,
        now_ms: i64,
    ) -> Result<(), AwsStoreError> {
        let item = cp.to_item(shard, now_ms);
        let result = retry(
            &self.cfg.backoff,
            "commit",
            AwsStoreError::is_retryable,
            || async {
                let mut req = self
                    .ddb
                    .put_item()
                    .table_name(&self.cfg.state_table)
                    .set_item(Some(item.clone()));
                req = match expected {
                    Some(seq) => req
                        .condition_expression("seq = :expected")
                        .expression_attribute_values(":expected", item::n(seq)),
                    None => req.condition_expression("attribute_not_exists(PK)"),
                };
                conditional(
                    req.send().await,
                    PutItemError::is_conditional_check_failed_exception,
                    |detail, retryable| AwsStoreError::Commit {
                        shard,
                        seq: cp.seq,
                        detail,
                        retryable,
                    },
                )
            },
        )
        .await?;
        if result {
            return Ok(());
        }
        // Our own earlier attempt may have landed (a lost response).
        match self.read_checkpoint(shard).await? {
            Some(stored) if stored.commit_id == cp.commit_id => Ok(()),
            _ => {
                self.cache().remove(&shard);
                Err(AwsStoreError::LostOwnership {
                    shard,
                    seq: expected.unwrap_or(0),
                })
            }
        }
    }

    async fn mark_applied(&self, shard: Shard, seq: u64) -> Result<(), AwsStoreError> {
        let ok = retry(
            &self.cfg.backoff,
            "mark_applied",
            AwsStoreError::is_retryable,
            || async {
                let result = self
                    .ddb
                    .update_item()
                    .table_name(&self.cfg.state_table)
                    .set_key(Some(item::key(
                        state::checkpoint_pk(shard),
                        state::CHECKPOINT_SK,
                    )))
                    .update_expression("SET applied = :seq")
                    .condition_expression("seq = :seq")
                    .expression_attribute_values(":seq", item::n(seq))
                    .send()
                    .await;
                conditional(
                    result,
                    UpdateItemError::is_conditional_check_failed_exception,
                    |detail, retryable| AwsStoreError::Commit {
                        shard,
                        seq,
                        detail,
                        retryable,
                    },
                )
            },
        )
        .await?;
        if !ok {
            self.cache().remove(&shard);
            return Err(AwsStoreError::LostOwnership { shard, seq });
        }
        if let Some(c) = self.cache().get_mut(&shard)
            && let Some(cp) = &mut c.cp
            && cp.seq == seq
        {
            cp.applied = seq;
        }
        Ok(())
    }

    /// Step 4 for committed deltas: low-stock items, then entity items.
    async fn apply_metrics(
        &self,
        deltas: &[Delta],
        now_ms: i64,
    ) -> Result<WriteStats, AwsStoreError> {
        let mut stats = WriteStats::default();
        for d in deltas {
            let mut ops: BTreeMap<(String, String), Option<Item>> = BTreeMap::new();
            for (seller, id) in &d.low_stock_deletes {
                ops.insert(low_stock_key(seller, id), None);
            }
            for (id, st) in &d.products {
                if let Some(listed) = LowStockItem::of(id, st) {
                    let (pk, sk) = low_stock_key(&listed.seller_id, id);
                    let obj = match low_stock_value(&listed).map_err(store_err)? {
                        serde_json::Value::Object(o) => o,
                        _ => return Err(store_err("low-stock item is not an object")),
                    };
                    let it = item::to_item(&pk, &sk, &obj)?;
                    ops.insert((pk, sk), Some(it));
                }
            }
            let fence = [(d.shard, d.seq)];
            let mut items: Vec<TransactWriteItem> = Vec::new();
            for ((pk, sk), op) in ops {
                match op {
                    Some(it) => {
                        stats.low_stock_puts += 1;
                        items.push(
                            TransactWriteItem::builder()
                                .put(
                                    Put::builder()
                                        .table_name(&self.cfg.metrics_table)
                                        .set_item(Some(it))
                                        .build()
                                        .map_err(build_err)?,
                                )
                                .build(),
                        );
                    }
                    None => {
                        stats.low_stock_deletes += 1;
                        items.push(
                            TransactWriteItem::builder()
                                .delete(
                                    Delete::builder()
                                        .table_name(&self.cfg.metrics_table)
                                        .set_key(Some(item::key(pk, sk)))
                                        .build()
                                        .map_err(build_err)?,
                                )
                                .build(),
                        );
                    }
                }
            }
            for chunk in items.chunks(TRANSACT_MAX - 1) {
                let mut round = 0;
                loop {
                    let mut all = self.fences(&fence)?;
                    all.extend_from_slice(chunk);
                    match self.transact(all).await? {
                        Transact::Done => break,
                        Transact::Cancelled(why) => {
                            self.check_fences(&fence).await?;
                            round += 1;
                            if round >= MAX_CONFLICT_ROUNDS {
                                return Err(AwsStoreError::Contention { attempts: round });
                            }
                            tracing::debug!(why, "low-stock transaction cancelled; retrying");
                            tokio::time::sleep(self.cfg.backoff.delay(round, retry::random_u64()))
                                .await;
                        }
                    }
                }
            }
        }

        // Entities: every shard's update of each changed entity, with the
        // day it is filed under (`ShardChanges::changed_at`, `part_day`).
        let mut pending: BTreeMap<EntityKey, Vec<(Shard, u64, EntityTotals, i64)>> =
            BTreeMap::new();
        for d in deltas {
            for (i, (key, totals)) in d.entities.iter().enumerate() {
                let day = part_day(totals, d.changed_at.get(i).copied(), now_ms);
                pending
                    .entry(key.clone())
                    .or_default()
                    .push((d.shard, d.seq, *totals, day));
            }
        }
        stats.entities = pending.len() as u64;
        let ttl = now_ms.div_euclid(1000).saturating_add(self.ttl_secs);
        let mut round = 0u32;
        while !pending.is_empty() {
            if round > 0 {
                if round >= MAX_CONFLICT_ROUNDS {
                    return Err(AwsStoreError::Contention { attempts: round });
                }
                tokio::time::sleep(self.cfg.backoff.delay(round - 1, retry::random_u64())).await;
            }
            round += 1;
            let stored = self.read_parts(pending.keys()).await?;
            // (entity, items, shards to fence)
            let mut ops: Vec<EntityOp> = Vec::new();
            let mut done = Vec::new();
            for (key, updates) in &pending {
                let (version, mut parts) = stored.get(key).cloned().unwrap_or_default();
                parts.seed_days();
                let mut fences = Vec::new();
                // The DAY# items the updates change, one by one in order
                // (`DailyParts::apply`): a later item of a day replaces an
                // earlier one.
                let mut day_items: BTreeMap<i64, EntityTotals> = BTreeMap::new();
                for &(shard, seq, totals, day) in updates {
                    if let Some(items) = parts.apply(shard, seq, totals, day, self.retain_days()) {
                        fences.push((shard, seq));
                        day_items.extend(items);
                    }
                }
                if fences.is_empty() {
                    // Already written by an earlier attempt, or by a newer write.
                    done.push(key.clone());
                    continue;
                }
                let mut days: Vec<(i64, EntityTotals)> = day_items.into_iter().collect();
                // One transaction holds the entity's parts, CURRENT and
                // DAY# items and its fences. Only a shard far behind on an
                // entity of very many partitions makes more: then its
                // oldest days keep what they had.
                let room = TRANSACT_MAX.saturating_sub(2 + fences.len());
                if days.len() > room {
                    tracing::warn!(
                        entity = %entity_pk(key),
                        days = days.len(),
                        written = room,
                        "too many daily items to redo in one transaction; the oldest keep their values"
                    );
                    days.drain(..days.len() - room);
                }
                ops.push((
                    key.clone(),
                    self.entity_items(key, &parts, version, &days, now_ms, ttl)?,
                    fences,
                ));
            }
            for key in done {
                pending.remove(&key);
            }
            // Pack entities into transactions of at most 100 items.
            let mut i = 0;
            while i < ops.len() {
                let mut fences: BTreeSet<(Shard, u64)> = BTreeSet::new();
                let mut items = Vec::new();
                let mut keys = Vec::new();
                while i < ops.len() {
                    let (key, its, fs) = &ops[i];
                    let new_fences = fs.iter().filter(|f| !fences.contains(f)).count();
                    if !keys.is_empty()
                        && items.len() + fences.len() + its.len() + new_fences > TRANSACT_MAX
                    {
                        break;
                    }
                    fences.extend(fs.iter().copied());
                    items.extend(its.iter().cloned());
                    keys.push(key.clone());
                    i += 1;
                }
                let fences: Vec<(Shard, u64)> = fences.into_iter().collect();
                let mut all = self.fences(&fences)?;
                all.extend(items);
                match self.transact(all).await? {
                    Transact::Done => {
                        for key in keys {
                            pending.remove(&key);
                        }
                    }
                    Transact::Cancelled(why) => {
                        self.check_fences(&fences).await?;
                        tracing::debug!(
                            why,
                            entities = keys.len(),
                            "entity transaction cancelled; re-reading"
                        );
                    }
                }
            }
        }
        Ok(stats)
    }

    /// The parts and CURRENT items of one entity, and its `DAY#` items of
    /// `days` (day number, the entity at its end).
    fn entity_items(
        &self,
        key: &EntityKey,
        parts: &Parts,
        version: u64,
        days: &[(i64, EntityTotals)],
        now_ms: i64,
        ttl: i64,
    ) -> Result<Vec<TransactWriteItem>, AwsStoreError> {
        let pk = entity_pk(key);
        let record = MetricRecord::entity(key, &parts.sum());
        let obj = entity_object(&record, now_ms, ttl).map_err(store_err)?;
        let mut parts_item = item::key(state::parts_pk(key), state::PARTS_SK);
        parts_item.insert("parts".into(), AttributeValue::B(parts.encode()?.into()));
        parts_item.insert("version".into(), item::n(version + 1));
        parts_item.insert("updatedAt".into(), item::n(now_ms));
        let parts_put = Put::builder()
            .table_name(&self.cfg.state_table)
            .set_item(Some(parts_item));
        let parts_put = if version == 0 {
            parts_put.condition_expression("attribute_not_exists(PK)")
        } else {
            parts_put
                .condition_expression("version = :v")
                .expression_attribute_values(":v", item::n(version))
        };
        let put = |it: Item| -> Result<TransactWriteItem, AwsStoreError> {
            Ok(TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.cfg.metrics_table)
                        .set_item(Some(it))
                        .build()
                        .map_err(build_err)?,
                )
                .build())
        };
        let mut items = vec![
            TransactWriteItem::builder()
                .put(parts_put.build().map_err(build_err)?)
                .build(),
            put(item::to_item(&pk, CURRENT, &obj)?)?,
        ];
        for (day, totals) in days {
            let at_end = MetricRecord::entity(key, totals);
            let obj = entity_object(&at_end, now_ms, ttl).map_err(store_err)?;
            items.push(put(item::to_item(&pk, &day_sk(*day), &obj)?)?);
        }
        Ok(items)
    }

    /// Condition checks that each shard's checkpoint is still at our seq.
    fn fences(&self, fences: &[(Shard, u64)]) -> Result<Vec<TransactWriteItem>, AwsStoreError> {
        fences
            .iter()
            .map(|&(shard, seq)| {
                Ok(TransactWriteItem::builder()
                    .condition_check(
                        ConditionCheck::builder()
                            .table_name(&self.cfg.state_table)
                            .set_key(Some(item::key(
                                state::checkpoint_pk(shard),
                                state::CHECKPOINT_SK,
                            )))
                            .condition_expression("seq = :seq")
                            .expression_attribute_values(":seq", item::n(seq))
                            .build()
                            .map_err(build_err)?,
                    )
                    .build())
            })
            .collect()
    }

    /// After a cancelled transaction: a fence that moved means another
    /// instance owns the shard now.
    async fn check_fences(&self, fences: &[(Shard, u64)]) -> Result<(), AwsStoreError> {
        for &(shard, seq) in fences {
            let cp = self.read_checkpoint(shard).await?;
            if cp.is_none_or(|c| c.seq != seq) {
                self.cache().remove(&shard);
                return Err(AwsStoreError::LostOwnership { shard, seq });
            }
        }
        Ok(())
    }

    async fn transact(&self, items: Vec<TransactWriteItem>) -> Result<Transact, AwsStoreError> {
        retry(
            &self.cfg.backoff,
            "transact_write_items",
            AwsStoreError::is_retryable,
            || async {
                match self
                    .ddb
                    .transact_write_items()
                    .set_transact_items(Some(items.clone()))
                    .send()
                    .await
                {
                    Ok(_) => Ok(Transact::Done),
                    Err(e) => match e.as_service_error() {
                        Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                            let why = c
                                .cancellation_reasons()
                                .iter()
                                .filter_map(|r| r.code())
                                .filter(|c| *c != "None")
                                .collect::<Vec<_>>()
                                .join(",");
                            Ok(Transact::Cancelled(why))
                        }
                        _ => {
                            let (detail, retryable) = describe(&e);
                            Err(AwsStoreError::MetricWrite { detail, retryable })
                        }
                    },
                }
            },
        )
        .await
    }

    /// Consistent reads of entity parts items: entity → (version, parts).
    async fn read_parts<'a>(
        &self,
        keys: impl Iterator<Item = &'a EntityKey>,
    ) -> Result<HashMap<EntityKey, (u64, Parts)>, AwsStoreError> {
        let keys: Vec<Item> = keys
            .map(|k| item::key(state::parts_pk(k), state::PARTS_SK))
            .collect();
        let mut out = HashMap::new();
        for chunk in keys.chunks(BATCH_GET_MAX) {
            let items = resubmit(chunk.to_vec(), |keys| self.batch_get(keys)).await?;
            for it in items {
                let pk = item::s(&it, "PK").unwrap_or_default();
                let key = state::entity_of_parts_pk(pk)?;
                let version = item::n_u64(&it, "version").unwrap_or(0);
                let parts = match it.get("parts") {
                    Some(AttributeValue::B(b)) => Parts::decode(b.as_ref())?,
                    _ => {
                        return Err(AwsStoreError::Decode {
                            what: "entity parts",
                            detail: format!("{pk}: no parts attribute"),
                        });
                    }
                };
                out.insert(key, (version, parts));
            }
        }
        Ok(out)
    }

    /// One `BatchGetItem` of state table keys: (items, unprocessed keys).
    async fn batch_get(&self, keys: Vec<Item>) -> Result<(Vec<Item>, Vec<Item>), AwsStoreError> {
        let table = &self.cfg.state_table;
        let ka = KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .consistent_read(true)
            .build()
            .map_err(build_err)?;
        let out = retry(
            &self.cfg.backoff,
            "batch_get_item",
            AwsStoreError::is_retryable,
            || async {
                self.ddb
                    .batch_get_item()
                    .request_items(table, ka.clone())
                    .send()
                    .await
                    .map_err(read_error)
            },
        )
        .await?;
        let items = out
            .responses()
            .and_then(|r| r.get(table))
            .cloned()
            .unwrap_or_default();
        let unprocessed = out
            .unprocessed_keys()
            .and_then(|u| u.get(table))
            .map(|k| k.keys().to_vec())
            .unwrap_or_default();
        Ok((items, unprocessed))
    }

    // ---- state objects ----------------------------------------------------

    async fn read_checkpoint(&self, shard: Shard) -> Result<Option<Checkpoint>, AwsStoreError> {
        let out = retry(
            &self.cfg.backoff,
            "get_checkpoint",
            AwsStoreError::is_retryable,
            || async {
                self.ddb
                    .get_item()
                    .table_name(&self.cfg.state_table)
                    .set_key(Some(item::key(
                        state::checkpoint_pk(shard),
                        state::CHECKPOINT_SK,
                    )))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| {
                        let (detail, retryable) = describe(&e);
                        AwsStoreError::ReadCheckpoint {
                            shard,
                            detail,
                            retryable,
                        }
                    })
            },
        )
        .await?;
        out.item().map(Checkpoint::from_item).transpose()
    }

    /// The shard as of `cp`: its base, then its deltas in order.
    async fn read_image(&self, shard: Shard, cp: &Checkpoint) -> Result<Image, AwsStoreError> {
        let mut image = Image::default();
        let keys = cp.base_key.iter().chain(cp.deltas.iter());
        for key in keys {
            let bytes = self.get_object(key).await?;
            let mut contributions = Vec::new();
            let (s, _, _, _) = state::decode_object(
                &bytes,
                |id, st| {
                    image.products.insert(id, st);
                },
                |k, t| contributions.push((k, t)),
                |_, _| {},
            )?;
            if s != shard {
                return Err(AwsStoreError::Decode {
                    what: "state object",
                    detail: format!("{key} belongs to shard {s}"),
                });
            }
            image.contributions.extend(contributions);
        }
        Ok(image)
    }

    async fn put_object(&self, key: &str, bytes: Vec<u8>) -> Result<(), AwsStoreError> {
        retry(
            &self.cfg.backoff,
            "put_object",
            AwsStoreError::is_retryable,
            || async {
                self.s3
                    .put_object()
                    .bucket(&self.cfg.bucket)
                    .key(key)
                    .body(bytes.clone().into())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        let (detail, retryable) = describe(&e);
                        AwsStoreError::StateObject {
                            key: key.to_string(),
                            detail,
                            retryable,
                        }
                    })
            },
        )
        .await
    }

    async fn get_object(&self, key: &str) -> Result<Vec<u8>, AwsStoreError> {
        retry(
            &self.cfg.backoff,
            "get_object",
            AwsStoreError::is_retryable,
            || async {
                let err = |detail: String, retryable| AwsStoreError::StateObject {
                    key: key.to_string(),
                    detail,
                    retryable,
                };
                let out = self
                    .s3
                    .get_object()
                    .bucket(&self.cfg.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| {
                        let (d, r) = describe(&e);
                        // A missing object does not come back by asking again.
                        let missing = e.as_service_error().is_some_and(|s| s.is_no_such_key());
                        err(d, r && !missing)
                    })?;
                let body = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| err(e.to_string(), true))?;
                Ok(body.into_bytes().to_vec())
            },
        )
        .await
    }

    // ---- loads and reads --------------------------------------------------

    /// The durable state of one shard, as [`ShardState::chunked`] cuts it
    /// (the embedded store's contract); redoes a committed-but-unapplied
    /// write first.
    pub async fn load_shard(
        &self,
        shard: Shard,
        max_products_per_chunk: usize,
    ) -> Result<Vec<ShardState>, AwsStoreError> {
        self.cache().remove(&shard);
        let mut attempt = 0;
        let (cp, image) = loop {
            let mut cp = self.read_checkpoint(shard).await?;
            if let Some(cp) = &mut cp {
                self.repair(shard, cp, crate::storage::now_ms()).await?;
            }
            let image = match &cp {
                Some(c) => self.read_image(shard, c).await,
                None => Ok(Image::default()),
            };
            match image {
                Ok(image) => break (cp, image),
                // The previous owner compacted while we read: read again.
                Err(e) if attempt < 3 && self.read_checkpoint(shard).await? != cp => {
                    tracing::info!(shard, error = %e, "shard moved on while loading; reading again");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let positions = cp
            .as_ref()
            .map(Checkpoint::position_list)
            .unwrap_or_default();
        let entity_times = image
            .contributions
            .iter()
            .map(|(k, t)| (k.clone(), t.last_event_at))
            .collect();
        let chunks = ShardState::chunked(
            shard,
            positions,
            entity_times,
            image.products,
            max_products_per_chunk,
        );
        self.put_back(shard, ShardCache { cp });
        Ok(chunks)
    }

    /// Every live current seller and category item and every low-stock
    /// item, sorted by key.
    pub async fn current_records(&self, now_ms: i64) -> Result<Vec<MetricRecord>, AwsStoreError> {
        let items = self
            .scan_metrics(
                "SK = :current OR begins_with(PK, :low)",
                &[(":current", CURRENT), (":low", LOW_STOCK_PREFIX)],
            )
            .await?;
        let mut out = Vec::new();
        for it in &items {
            if let Some(r) = parse(it, now_ms)? {
                out.push(r);
            }
        }
        sort_records(&mut out);
        Ok(out)
    }

    /// The seller's current record and its daily history (oldest day first).
    pub async fn seller(&self, id: &str, now_ms: i64) -> Result<Option<History>, AwsStoreError> {
        self.entity(&format!("SELLER#{id}"), now_ms).await
    }

    /// The category's current record and its daily history (oldest day first).
    pub async fn category(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<Option<History>, AwsStoreError> {
        self.entity(&format!("CATEGORY#{name}"), now_ms).await
    }

    async fn entity(&self, pk: &str, now_ms: i64) -> Result<Option<History>, AwsStoreError> {
        let items = self.query_pk(pk).await?;
        let mut current = None;
        let mut days = Vec::new();
        for it in &items {
            let sk = item::s(it, "SK").unwrap_or_default();
            if sk == CURRENT {
                current = parse(it, now_ms)?;
            } else if let Some(day) = sk.strip_prefix("DAY#")
                && let Some(r) = parse(it, now_ms)?
            {
                days.push((day.to_string(), r));
            }
        }
        days.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(current.map(|c| (c, days)))
    }

    /// Low-stock items, of one seller or of all, sorted by key.
    pub async fn low_stock(
        &self,
        seller: Option<&str>,
    ) -> Result<Vec<MetricRecord>, AwsStoreError> {
        let items = match seller {
            Some(s) => self.query_pk(&format!("{LOW_STOCK_PREFIX}{s}")).await?,
            None => {
                self.scan_metrics("begins_with(PK, :low)", &[(":low", LOW_STOCK_PREFIX)])
                    .await?
            }
        };
        let mut out = Vec::new();
        for it in &items {
            if let Some(r) = parse(it, i64::MIN)? {
                out.push(r);
            }
        }
        sort_records(&mut out);
        Ok(out)
    }

    async fn query_pk(&self, pk: &str) -> Result<Vec<Item>, AwsStoreError> {
        self.read_pages("query", |start| async move {
            let page = self
                .ddb
                .query()
                .table_name(&self.cfg.metrics_table)
                .key_condition_expression("PK = :pk")
                .expression_attribute_values(":pk", AttributeValue::S(pk.to_string()))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(read_error)?;
            Ok((page.items().to_vec(), page.last_evaluated_key().cloned()))
        })
        .await
    }

    async fn scan_metrics(
        &self,
        filter: &str,
        values: &[(&str, &str)],
    ) -> Result<Vec<Item>, AwsStoreError> {
        let values: HashMap<String, AttributeValue> = values
            .iter()
            .map(|(k, v)| (k.to_string(), AttributeValue::S(v.to_string())))
            .collect();
        let values = &values;
        self.read_pages("scan", |start| async move {
            let page = self
                .ddb
                .scan()
                .table_name(&self.cfg.metrics_table)
                .filter_expression(filter)
                .set_expression_attribute_values(Some(values.clone()))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(read_error)?;
            Ok((page.items().to_vec(), page.last_evaluated_key().cloned()))
        })
        .await
    }

    async fn read_pages<F, Fut>(&self, what: &str, page: F) -> Result<Vec<Item>, AwsStoreError>
    where
        F: FnMut(Option<Item>) -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<Item>, Option<Item>), AwsStoreError>>,
    {
        read_pages(&self.cfg.backoff, what, page).await
    }

    // ---- archive and TTL ----------------------------------------------------

    /// Writes every record as gzip JSON lines to
    /// `metrics/dt=YYYY-MM-DD/snapshot-<epochMillis>.jsonl.gz` and returns the
    /// key. One `PutObject`: readers never see a partial snapshot, and a
    /// retry overwrites itself.
    pub async fn write_metric_snapshot(
        &self,
        records: &[MetricRecord],
        now_ms: i64,
    ) -> Result<String, AwsStoreError> {
        let key = metric_snapshot_key(now_ms);
        let bytes = encode_metric_snapshot(records).map_err(|e| AwsStoreError::Encode {
            what: "metric snapshot",
            detail: e.to_string(),
        })?;
        self.put_archive_object(&key, bytes).await?;
        Ok(key)
    }

    /// Archives one topic-partition's range of events, as the worker built
    /// it (`analytics_worker::archive`), and returns its key. With
    /// `clean`, other objects of ranges with the same first offset (left by
    /// a write that never committed) are deleted first: one
    /// `ListObjectsV2`, on the first range of a partition after a (re)start
    /// and its first of each later hour only.
    pub async fn put_event_range(
        &self,
        events: &proto::ArchivedEvents,
        clean: bool,
    ) -> Result<String, AwsStoreError> {
        let (Some(key), Some(prefix)) = (event_range_key(events), event_range_prefix(events))
        else {
            return Err(AwsStoreError::Encode {
                what: "event range",
                detail: "an empty range has no key".into(),
            });
        };
        if clean {
            for stale in self.list_keys(&prefix).await? {
                if stale != key && is_range_under(&stale, &prefix) {
                    tracing::info!(stale = %stale, key = %key, "deleting an archived event range that never committed");
                    self.delete_archive_object(&stale).await?;
                }
            }
        }
        self.put_archive_object(&key, events.gzip.clone()).await?;
        Ok(key)
    }

    /// Every key under `prefix` in the bucket.
    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, AwsStoreError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = retry(
                &self.cfg.backoff,
                "list_archive",
                AwsStoreError::is_retryable,
                || async {
                    self.s3
                        .list_objects_v2()
                        .bucket(&self.cfg.bucket)
                        .prefix(prefix)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| archive_error(prefix, &e))
                },
            )
            .await?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            token = page.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                return Ok(keys);
            }
        }
    }

    async fn delete_archive_object(&self, key: &str) -> Result<(), AwsStoreError> {
        retry(
            &self.cfg.backoff,
            "delete_archive",
            AwsStoreError::is_retryable,
            || async {
                self.s3
                    .delete_object()
                    .bucket(&self.cfg.bucket)
                    .key(key)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| archive_error(key, &e))
            },
        )
        .await
    }

    /// One `PutObject` of a gzip JSON-lines archive object.
    async fn put_archive_object(&self, key: &str, bytes: Vec<u8>) -> Result<(), AwsStoreError> {
        retry(
            &self.cfg.backoff,
            "put_archive",
            AwsStoreError::is_retryable,
            || async {
                self.s3
                    .put_object()
                    .bucket(&self.cfg.bucket)
                    .key(key)
                    // A gzip file, as the key says: with `Content-Encoding:
                    // gzip` HTTP clients (browsers, presigned downloads)
                    // would unpack it on the way and save plain text as `.gz`.
                    .content_type("application/gzip")
                    .body(bytes.clone().into())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| archive_error(key, &e))
            },
        )
        .await
    }

    /// Sets `TTL` = now + ttl on the current items due for it; see
    /// [`TtlRefresher::refresh`]. Returns the items refreshed.
    pub async fn refresh_ttl(&self, now_ms: i64) -> Result<u64, AwsStoreError> {
        self.ttl_refresher().refresh(now_ms).await
    }

    /// Days of daily parts kept behind the newest ([`retain_days`]).
    fn retain_days(&self) -> i64 {
        retain_days(self.ttl_secs)
    }

    /// How long items live after their last write.
    pub fn ttl_secs(&self) -> i64 {
        self.ttl_secs
    }

    /// A handle that refreshes `TTL`s on its own, sharing this store's
    /// client: a refresh can run beside the store's requests.
    pub fn ttl_refresher(&self) -> TtlRefresher {
        TtlRefresher {
            ddb: self.ddb.clone(),
            table: self.cfg.metrics_table.clone(),
            backoff: self.cfg.backoff,
            ttl_secs: self.ttl_secs,
        }
    }
}

/// Every item of a paged read: `page(start)` returns one page's items and
/// the key to go on from; each page is retried on its own.
async fn read_pages<F, Fut>(
    backoff: &Backoff,
    what: &str,
    mut page: F,
) -> Result<Vec<Item>, AwsStoreError>
where
    F: FnMut(Option<Item>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<Item>, Option<Item>), AwsStoreError>>,
{
    let mut out = Vec::new();
    let mut start: Option<Item> = None;
    loop {
        let (items, next) = retry(backoff, what, AwsStoreError::is_retryable, || {
            page(start.clone())
        })
        .await?;
        out.extend(items);
        match next {
            Some(k) if !k.is_empty() => start = Some(k),
            _ => return Ok(out),
        }
    }
}

/// Sends `keys` through `op` until nothing is left unprocessed; `op` returns
/// (results, unprocessed keys). Used for `BatchGetItem`'s `UnprocessedKeys`;
/// the same loop would serve `BatchWriteItem`'s `UnprocessedItems`. Backs
/// off between resubmissions; gives up after a bounded number of rounds.
pub async fn resubmit<K, T, F, Fut>(mut keys: Vec<K>, mut op: F) -> Result<Vec<T>, AwsStoreError>
where
    F: FnMut(Vec<K>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Vec<K>), AwsStoreError>>,
{
    let backoff = Backoff::default();
    let mut out = Vec::new();
    let mut round = 0;
    while !keys.is_empty() {
        if round > 0 {
            if round >= MAX_CONFLICT_ROUNDS {
                return Err(AwsStoreError::Read {
                    detail: format!("{} keys still unprocessed after {round} rounds", keys.len()),
                    retryable: true,
                });
            }
            tokio::time::sleep(backoff.delay(round - 1, retry::random_u64())).await;
        }
        let (got, left) = op(keys).await?;
        out.extend(got);
        keys = left;
        round += 1;
    }
    Ok(out)
}

fn parse(it: &Item, now_ms: i64) -> Result<Option<MetricRecord>, AwsStoreError> {
    let pk = item::s(it, "PK").unwrap_or_default();
    parse_item_value(pk, item::to_json(it)?, now_ms).map_err(store_err)
}

/// A failed DynamoDB read, classified.
fn read_error<E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static>(
    e: aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> AwsStoreError {
    let (detail, retryable) = describe(&e);
    AwsStoreError::Read { detail, retryable }
}

fn store_err(e: impl ToString) -> AwsStoreError {
    AwsStoreError::Decode {
        what: "item",
        detail: e.to_string(),
    }
}

fn build_err(e: aws_sdk_dynamodb::error::BuildError) -> AwsStoreError {
    AwsStoreError::Encode {
        what: "request",
        detail: e.to_string(),
    }
}

/// An archive call's failure, retryable as the SDK error says.
fn archive_error<E>(
    key: &str,
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> AwsStoreError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let (detail, retryable) = describe(e);
    AwsStoreError::Archive {
        key: key.to_owned(),
        detail,
        retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unprocessed_keys_are_resubmitted_until_none_are_left() {
        // A fake service that processes at most two keys per call.
        let mut calls = Vec::new();
        let got = resubmit((0..7).collect::<Vec<u32>>(), |keys| {
            calls.push(keys.len());
            let (now, later) = keys.split_at(keys.len().min(2));
            let result = (
                now.iter().map(|k| k * 10).collect::<Vec<_>>(),
                later.to_vec(),
            );
            async move { Ok(result) }
        })
        .await
        .unwrap();
        assert_eq!(got, vec![0, 10, 20, 30, 40, 50, 60]);
        assert_eq!(calls, vec![7, 5, 3, 1]);

        // An error stops the loop.
        let r: Result<Vec<u32>, _> = resubmit(vec![1u32], |_| async {
            Err(AwsStoreError::Read {
                detail: "x".into(),
                retryable: false,
            })
        })
        .await;
        assert!(r.is_err());
    }
}
