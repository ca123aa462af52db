//! The embedded default's durable store (DESIGN §8): one redb file,
//! `<data_dir>/analytics.redb`, holding the metric items with the DynamoDB
//! item model of DESIGN §6 (PK, SK, attributes, `TTL` in epoch seconds) and
//! the service's own state (product states, per-shard entity contributions,
//! stream positions), plus a JSON-lines dead-letter file beside it.
//!
//! Tables:
//! - `items`: `(PK, SK)` → the item's attributes as a JSON object. An item
//!   whose `TTL` is in the past is absent for every read, as in DynamoDB.
//!   Seller and category items (`CURRENT` and `DAY#…`).
//! - `low_stock_items`: `(sellerId, productId)` → the low-stock item
//!   `LOWSTOCK#<sellerId>` / `PRODUCT#<productId>` (its attributes, as the
//!   worker's [`LowStockItem`] in bincode; no `TTL`, as in DESIGN §6).
//! - `product_log`: `(shard, seq)` → the product states one write changed
//!   (bincode); replayed in order, the last state of a product wins. A
//!   shard's log is merged into snapshot entries after 16 entries.
//! - `contributions`: `(entity PK, shard)` → what the shard adds to the entity.
//! - `daily_contributions`: `(entity PK, shard, UTC day number)` → the same
//!   at the end of each recent day the shard wrote in: a `DAY#` item is
//!   their sum as at the end of its day ([`crate::daily_parts`]);
//!   `daily_exact_from`: entity PK → the first day they still hold exactly.
//! - `positions`: `(stream, shard)` → the last applied offset.
//! - `meta`: small named values (the dead-letter file's committed length).
//!
//! A [`EmbeddedStore::write`] is one transaction: a replayed batch (every
//! position already stored) is skipped, so values never move backwards and
//! nothing is added twice.
//!
//! Low-stock items are put and deleted as the worker says
//! ([`proto::LowStockChange`]): it knows under which seller each listed
//! product's item was filed. (A table of that here cost a third of the
//! storage process: a B-tree lookup per changed product.) They have a table
//! of their own, in bincode: stored among the items as JSON (~250 bytes
//! each, three times the size), their puts and deletes were half of the
//! storage process's time and dirtied most of the tree's leaves at every
//! write. Stores of earlier versions are moved over when opened.

use crate::daily_parts::DailyParts;
use analytics_worker::records::{
    CategoryRecord, LowStockRecord, MetricRecord, Money, SellerRecord, sort_records,
};
use proto::{
    DeadLetter, EntityKey, EntityTotals, FrameError, LowStockChange, LowStockItem, Offset,
    Position, ProductId, ProductState, Shard, ShardChanges, ShardState, utc_day_number,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const ITEMS: TableDefinition<(&str, &str), &str> = TableDefinition::new("items");
const LOW_STOCK_ITEMS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("low_stock_items");
/// Product states as a log per shard: `(shard, seq)` → the states changed
/// in one flush (later entries win). One insert per shard per flush instead
/// of one per product, which in a copy-on-write B-tree rewrote most leaves
/// at every flush; compacted after `LOG_COMPACT_AFTER` entries.
const PRODUCT_LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("product_log");
/// Products on the low-stock list: `(shard, product key)` → the seller their
/// item is filed under, so an item can be removed without the old state.
/// Held a low-stock index in earlier versions; dropped when found.
const OLD_LOW_STOCK_INDEX: TableDefinition<(u32, &[u8]), &str> =
    TableDefinition::new("low_stock_index");
/// Log entries per shard before they are merged into one snapshot.
const LOG_COMPACT_AFTER: usize = 16;
/// Products per log entry written by a compaction.
const LOG_ENTRY_PRODUCTS: usize = 50_000;
const CONTRIBUTIONS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("contributions");
/// (entity PK, shard, UTC day number) → the shard's contribution at the end
/// of that day ([`DailyParts`]).
const DAILY_CONTRIBUTIONS: TableDefinition<(&str, u32, i64), &[u8]> =
    TableDefinition::new("daily_contributions");
/// Entity PK → the first day whose sum its daily contributions still hold
/// exactly ([`DailyParts::exact_from`]); absent: every day.
const DAILY_EXACT_FROM: TableDefinition<&str, i64> = TableDefinition::new("daily_exact_from");
const POSITIONS: TableDefinition<(&str, u32), i64> = TableDefinition::new("positions");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// `meta` key: length of the dead-letter file as of the last commit.
const DEAD_LETTERS_LEN: &str = "dead_letters.committed_len";
/// `meta` key: what a shard number means in this store.
const SHARD_SCHEME: &str = "shard_scheme";

pub const DB_FILE: &str = "analytics.redb";
pub const DEAD_LETTER_FILE: &str = "dead-letters.jsonl";
pub const CURRENT: &str = "CURRENT";

/// A TTL refresh (both stores) rewrites only the current items whose `TTL`
/// (epoch seconds) is before this: less than half their lifetime left, so a
/// restart does not redo items written or refreshed lately. The storage
/// process refreshes often enough that a skipped item lives until the
/// refresh after next (`storage::ttl_refresh_ms`).
pub fn ttl_refresh_due(now_s: i64, ttl_secs: i64) -> i64 {
    now_s.saturating_add(ttl_secs / 2)
}
pub(crate) const LOW_STOCK_PREFIX: &str = "LOWSTOCK#";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating the data directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    /// redb's lock: another process has the store open.
    #[error(
        "{path} is in use by another process (a running `analytics run`, or a \
         `query` or `export` reading it): wait for it or stop it; a running \
         service's latest metric snapshot is in the archive directory"
    )]
    InUse { path: PathBuf },
    #[error("opening the database {path}: {source}")]
    OpenDatabase {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    /// Boxed: redb's error can hold a whole read transaction.
    #[error("beginning a transaction: {0}")]
    BeginTransaction(Box<redb::TransactionError>),
    #[error("opening a table: {0}")]
    OpenTable(#[from] redb::TableError),
    #[error("accessing a table: {0}")]
    Access(#[from] redb::StorageError),
    #[error("committing a transaction: {0}")]
    Commit(#[from] redb::CommitError),
    #[error("dead-letter file {path}: {source}")]
    DeadLetterFile { path: PathBuf, source: io::Error },
    #[error("encoding {what}: {detail}")]
    Encode { what: &'static str, detail: String },
    #[error("decoding stored {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    #[error(
        "this data directory holds state of a {stored} source and cannot be used for a {wanted} source; use another --data-dir"
    )]
    ShardSchemeMismatch { stored: String, wanted: String },
}

impl From<redb::TransactionError> for StoreError {
    fn from(e: redb::TransactionError) -> Self {
        StoreError::BeginTransaction(Box::new(e))
    }
}

impl StoreError {
    /// Whether the same call may succeed later on the same store: I/O trouble
    /// (a full disk, a lock held by another process) may pass; corrupt or
    /// undecodable data will not.
    pub fn is_retryable(&self) -> bool {
        fn io(e: &redb::StorageError) -> bool {
            matches!(e, redb::StorageError::Io(_))
        }
        match self {
            StoreError::CreateDir { .. }
            | StoreError::DeadLetterFile { .. }
            | StoreError::InUse { .. } => true,
            StoreError::OpenDatabase { source, .. } => match source {
                redb::DatabaseError::Storage(e) => io(e),
                _ => false,
            },
            StoreError::BeginTransaction(e) => {
                matches!(&**e, redb::TransactionError::Storage(e) if io(e))
            }
            StoreError::OpenTable(redb::TableError::Storage(e))
            | StoreError::Access(e)
            | StoreError::Commit(redb::CommitError::Storage(e)) => io(e),
            StoreError::OpenTable(_) | StoreError::Commit(_) => false,
            StoreError::Encode { .. }
            | StoreError::Decode { .. }
            | StoreError::ShardSchemeMismatch { .. } => false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Lifetime of metric items after their last write (DESIGN §6).
    pub ttl: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// What one [`EmbeddedStore::write`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub shards_applied: u64,
    /// Shard changes skipped as replays of something already durable.
    pub shards_skipped: u64,
    /// Product states written.
    pub products: u64,
    /// Distinct entities whose items were rebuilt.
    pub entities: u64,
    pub low_stock_puts: u64,
    pub low_stock_deletes: u64,
    pub dead_letters: u64,
}

pub struct EmbeddedStore {
    db: Database,
    dead_letter_path: PathBuf,
    ttl_secs: i64,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `data_dir`, and drops any dead-letter
    /// lines a crashed write appended without committing.
    pub fn open(data_dir: &Path, opts: StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let db_path = data_dir.join(DB_FILE);
        let db = Database::create(&db_path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: db_path },
            source => StoreError::OpenDatabase {
                path: db_path,
                source,
            },
        })?;
        let store = EmbeddedStore {
            db,
            dead_letter_path: data_dir.join(DEAD_LETTER_FILE),
            ttl_secs: i64::try_from(opts.ttl.as_secs()).unwrap_or(i64::MAX),
        };
        let txn = store.db.begin_write()?;
        {
            move_low_stock_items(
                &mut txn.open_table(ITEMS)?,
                &mut txn.open_table(LOW_STOCK_ITEMS)?,
            )?;
            txn.open_table(PRODUCT_LOG)?;
            // Not an error if absent (`Ok(false)`).
            txn.delete_table(OLD_LOW_STOCK_INDEX)?;
            txn.open_table(CONTRIBUTIONS)?;
            txn.open_table(DAILY_CONTRIBUTIONS)?;
            txn.open_table(DAILY_EXACT_FROM)?;
            txn.open_table(POSITIONS)?;
            let mut meta = txn.open_table(META)?;
            let committed = meta
                .get(DEAD_LETTERS_LEN)?
                .map(|g| decode_len(g.value()))
                .transpose()?;
            let file_len = match std::fs::metadata(&store.dead_letter_path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(source) => return Err(store.dead_letter_error(source)),
            };
            match committed {
                // A file that predates the database is kept as it is.
                None => {
                    meta.insert(DEAD_LETTERS_LEN, &file_len.to_le_bytes()[..])?;
                }
                Some(len) if file_len > len => store.truncate_dead_letters(len)?,
                Some(_) => {}
            }
        }
        txn.commit()?;
        Ok(store)
    }

    /// Records which meaning shards have in this store (file virtual
    /// partitions or Kafka partitions), and refuses a different one: state
    /// from two schemes would mix one product into two shards.
    pub fn claim_shard_scheme(&self, scheme: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let stored = meta.get(SHARD_SCHEME)?.map(|g| g.value().to_vec());
            match stored {
                Some(s) if s != scheme.as_bytes() => {
                    return Err(StoreError::ShardSchemeMismatch {
                        stored: String::from_utf8_lossy(&s).into_owned(),
                        wanted: scheme.to_string(),
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(SHARD_SCHEME, scheme.as_bytes())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn dead_letter_path(&self) -> PathBuf {
        self.dead_letter_path.clone()
    }

    /// Applies a slice of shard changes in one transaction (DESIGN §5).
    pub fn write(
        &mut self,
        changes: &[ShardChanges],
        now_ms: i64,
    ) -> Result<WriteStats, StoreError> {
        let mut stats = WriteStats::default();
        let ttl = self.ttl_at(now_ms);
        let mut dead_lines: Vec<u8> = Vec::new();
        let txn = self.db.begin_write()?;
        {
            let mut items = txn.open_table(ITEMS)?;
            let mut low_stock_items = txn.open_table(LOW_STOCK_ITEMS)?;
            let mut log = txn.open_table(PRODUCT_LOG)?;
            let mut contributions = txn.open_table(CONTRIBUTIONS)?;
            let mut daily = txn.open_table(DAILY_CONTRIBUTIONS)?;
            let mut daily_exact = txn.open_table(DAILY_EXACT_FROM)?;
            let mut positions = txn.open_table(POSITIONS)?;
            // Changed entities, with their daily parts as read (before this
            // write replaces a contribution) and as the write leaves them.
            let mut changed: BTreeMap<String, ChangedEntity> = BTreeMap::new();
            let retain = self.retain_days();
            // Low-stock items to put (`Some`) or delete, of every shard.
            let mut low_stock: Vec<(&str, String, Option<Vec<u8>>)> = Vec::new();

            for sc in changes {
                let mut newer = false;
                for p in &sc.positions {
                    let stored = positions.get((&*p.stream, sc.shard))?.map(|g| g.value());
                    if stored.is_none_or(|s| p.offset > s) {
                        newer = true;
                    }
                }
                if !newer {
                    stats.shards_skipped += 1;
                    continue;
                }
                stats.shards_applied += 1;
                for p in &sc.positions {
                    let stored = positions.get((&*p.stream, sc.shard))?.map(|g| g.value());
                    if stored.is_none_or(|s| p.offset > s) {
                        positions.insert((&*p.stream, sc.shard), p.offset)?;
                    }
                }

                if !sc.products.is_empty() {
                    // The worker's encoding is the log's: stored as it came.
                    let seq = next_log_seq(&log, sc.shard)?;
                    log.insert((sc.shard, seq), sc.products.bytes.as_slice())?;
                    stats.products += u64::from(sc.products.count);
                }
                for change in &sc.low_stock {
                    low_stock.push(match change {
                        LowStockChange::Put(item) => (
                            &item.seller_id,
                            item.product_id.to_string(),
                            Some(encode("low-stock item", item)?),
                        ),
                        LowStockChange::Delete {
                            seller_id,
                            product_id,
                        } => (seller_id, product_id.to_string(), None),
                    });
                }
                compact_log(&mut log, sc.shard)?;

                for (i, (key, totals)) in sc.entities.iter().enumerate() {
                    let pk = entity_pk(key);
                    if !changed.contains_key(&pk) {
                        let stored = read_daily_parts(&daily, &daily_exact, &pk)?;
                        let mut days = stored.clone();
                        // Contributions stored by a build without daily parts.
                        for entry in
                            contributions.range((pk.as_str(), 0u32)..=(pk.as_str(), u32::MAX))?
                        {
                            let (k, v) = entry?;
                            days.seed(k.value().1, &decode("entity totals", v.value())?);
                        }
                        let entity = ChangedEntity {
                            key: key.clone(),
                            stored,
                            days,
                            items: BTreeMap::new(),
                        };
                        changed.insert(pk.clone(), entity);
                    }
                    let Some(entity) = changed.get_mut(&pk) else {
                        continue;
                    };
                    let day = part_day(totals, sc.changed_at.get(i).copied(), now_ms);
                    (entity.items).extend(entity.days.apply(sc.shard, day, *totals, retain));
                    let bytes = encode("entity totals", totals)?;
                    contributions.insert((pk.as_str(), sc.shard), bytes.as_slice())?;
                }

                for dl in &sc.dead_letters {
                    dead_lines.extend_from_slice(dead_letter_line(dl)?.as_bytes());
                    dead_lines.push(b'\n');
                    stats.dead_letters += 1;
                }
            }

            // In key order: a seller's items share leaves of the B-tree, so
            // each leaf is copied once per transaction rather than once per
            // item (in the order products changed, nearly every put copied
            // a leaf: 20k instructions each).
            // Stable: were a key put and deleted in one write, the last
            // change must stay last.
            low_stock.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            for (seller, product, item) in &low_stock {
                match item {
                    Some(item) => {
                        low_stock_items.insert((*seller, product.as_str()), item.as_slice())?;
                        stats.low_stock_puts += 1;
                    }
                    None => {
                        if low_stock_items
                            .remove((*seller, product.as_str()))?
                            .is_some()
                        {
                            stats.low_stock_deletes += 1;
                        }
                    }
                }
            }

            for (pk, entity) in &changed {
                let ChangedEntity {
                    key,
                    stored,
                    days,
                    items: day_items,
                } = entity;
                let mut sum = EntityTotals {
                    last_event_at: -1,
                    ..EntityTotals::default()
                };
                for entry in contributions.range((pk.as_str(), 0u32)..=(pk.as_str(), u32::MAX))? {
                    sum.merge(&decode::<EntityTotals>("entity totals", entry?.1.value())?);
                }
                let item = entity_item(&MetricRecord::entity(key, &sum), now_ms, ttl)?;
                items.insert((pk.as_str(), CURRENT), item.as_str())?;
                for (day, totals) in day_items {
                    let item = entity_item(&MetricRecord::entity(key, totals), now_ms, ttl)?;
                    items.insert((pk.as_str(), day_sk(*day).as_str()), item.as_str())?;
                }
                // What the write changed of the daily parts.
                for (&(shard, day), _) in stored.entries() {
                    if days.get(&(shard, day)).is_none() {
                        daily.remove((pk.as_str(), shard, day))?;
                    }
                }
                for (&(shard, day), totals) in days.entries() {
                    if stored.get(&(shard, day)) != Some(totals) {
                        let bytes = encode("entity totals", totals)?;
                        daily.insert((pk.as_str(), shard, day), bytes.as_slice())?;
                    }
                }
                if days.exact_from() != stored.exact_from() {
                    daily_exact.insert(pk.as_str(), days.exact_from())?;
                }
                stats.entities += 1;
            }
        }

        if !dead_lines.is_empty() {
            let mut meta = txn.open_table(META)?;
            let committed = meta
                .get(DEAD_LETTERS_LEN)?
                .map(|g| decode_len(g.value()))
                .transpose()?
                .unwrap_or(0);
            let new_len = self.append_dead_letters(committed, &dead_lines)?;
            meta.insert(DEAD_LETTERS_LEN, &new_len.to_le_bytes()[..])?;
        }
        txn.commit()?;
        Ok(stats)
    }

    /// The durable state of one shard, as [`ShardState::chunked`] cuts it
    /// (at most `max_products_per_chunk` products and about
    /// [`proto::LOAD_CHUNK_BYTES`] per chunk).
    pub fn load_shard(
        &self,
        shard: Shard,
        max_products_per_chunk: usize,
    ) -> Result<Vec<ShardState>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut positions = Vec::new();
        for entry in txn.open_table(POSITIONS)?.iter()? {
            let (k, v) = entry?;
            let (stream, s) = k.value();
            if s == shard {
                positions.push(Position {
                    stream: stream.into(),
                    offset: v.value(),
                });
            }
        }
        let mut entity_times = Vec::new();
        for entry in txn.open_table(CONTRIBUTIONS)?.iter()? {
            let (k, v) = entry?;
            let (pk, s) = k.value();
            if s == shard {
                let key = parse_entity_pk(pk)?;
                let totals: EntityTotals = decode("entity totals", v.value())?;
                entity_times.push((key, totals.last_event_at));
            }
        }
        let products = read_log(&txn.open_table(PRODUCT_LOG)?, shard)?;
        Ok(ShardState::chunked(
            shard,
            positions,
            entity_times,
            products,
            max_products_per_chunk,
        ))
    }

    /// Every stored (shard, position).
    pub fn positions(&self) -> Result<Vec<(Shard, Position)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(POSITIONS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (stream, shard) = k.value();
            out.push((
                shard,
                Position {
                    stream: stream.into(),
                    offset: v.value(),
                },
            ));
        }
        Ok(out)
    }

    /// Every live current seller and category item and every low-stock item,
    /// sorted by key.
    pub fn current_records(&self, now_ms: i64) -> Result<Vec<MetricRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let items = txn.open_table(ITEMS)?;
        let mut out = Vec::new();
        for entry in items.iter()? {
            let (k, v) = entry?;
            let (pk, sk) = k.value();
            if sk == CURRENT
                && let Some(r) = parse_item(pk, v.value(), now_ms)?
            {
                out.push(r);
            }
        }
        for entry in txn.open_table(LOW_STOCK_ITEMS)?.iter()? {
            out.push(low_stock_record(entry?.1.value())?);
        }
        sort_records(&mut out);
        Ok(out)
    }

    /// The seller's current record and its daily history (oldest day first).
    pub fn seller(&self, id: &str, now_ms: i64) -> Result<Option<History>, StoreError> {
        self.entity(&format!("SELLER#{id}"), now_ms)
    }

    /// The category's current record and its daily history (oldest day first).
    pub fn category(&self, name: &str, now_ms: i64) -> Result<Option<History>, StoreError> {
        self.entity(&format!("CATEGORY#{name}"), now_ms)
    }

    fn entity(&self, pk: &str, now_ms: i64) -> Result<Option<History>, StoreError> {
        let txn = self.db.begin_read()?;
        let items = txn.open_table(ITEMS)?;
        let current = match items.get((pk, CURRENT))? {
            Some(v) => parse_item(pk, v.value(), now_ms)?,
            None => None,
        };
        let Some(current) = current else {
            return Ok(None);
        };
        let mut days = Vec::new();
        for entry in items.range((pk, "DAY#")..)? {
            let (k, v) = entry?;
            let (p, sk) = k.value();
            let Some(day) = sk.strip_prefix("DAY#").filter(|_| p == pk) else {
                break;
            };
            if let Some(r) = parse_item(pk, v.value(), now_ms)? {
                days.push((day.to_string(), r));
            }
        }
        Ok(Some((current, days)))
    }

    /// Low-stock items, of one seller or of all, sorted by key.
    pub fn low_stock(&self, seller: Option<&str>) -> Result<Vec<MetricRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOW_STOCK_ITEMS)?;
        let entries = match seller {
            Some(s) => table.range((s, "")..)?,
            None => table.range::<(&str, &str)>(..)?,
        };
        let mut out = Vec::new();
        for entry in entries {
            let (k, v) = entry?;
            if seller.is_some_and(|s| k.value().0 != s) {
                break;
            }
            out.push(low_stock_record(v.value())?);
        }
        sort_records(&mut out);
        Ok(out)
    }

    /// Rewrites the TTL of every current item with less than half its
    /// lifetime left (as the AWS store does), so entities the store still
    /// holds contributions for never expire, and deletes expired daily items.
    /// Current items are refreshed even when already expired: they are derived
    /// from contributions, which never expire. Returns the items refreshed.
    pub fn refresh_ttl(&mut self, now_ms: i64) -> Result<u64, StoreError> {
        let ttl = self.ttl_at(now_ms);
        let now_s = now_ms.div_euclid(1000);
        let due = ttl_refresh_due(now_s, self.ttl_secs);
        let txn = self.db.begin_write()?;
        let mut refreshed = 0;
        {
            let mut items = txn.open_table(ITEMS)?;
            let mut rewrite = Vec::new();
            let mut expired = Vec::new();
            for entry in items.iter()? {
                let (k, v) = entry?;
                let (pk, sk) = k.value();
                let mut obj = parse_object(v.value())?;
                let expires = obj.get("TTL").and_then(|t| t.as_i64());
                if sk == CURRENT {
                    if expires.is_none_or(|t| t < due) {
                        obj.insert("TTL".into(), ttl.into());
                        rewrite.push((pk.to_string(), json_string(&obj)?));
                    }
                } else if expires.is_some_and(|t| t < now_s) {
                    expired.push((pk.to_string(), sk.to_string()));
                }
            }
            for (pk, item) in &rewrite {
                items.insert((pk.as_str(), CURRENT), item.as_str())?;
                refreshed += 1;
            }
            for (pk, sk) in &expired {
                items.remove((pk.as_str(), sk.as_str()))?;
            }
            tracing::debug!(refreshed, purged = expired.len(), "refreshed item TTLs");
        }
        txn.commit()?;
        Ok(refreshed)
    }

    /// How long items live after their last write.
    pub fn ttl_secs(&self) -> i64 {
        self.ttl_secs
    }

    fn ttl_at(&self, now_ms: i64) -> i64 {
        now_ms.div_euclid(1000).saturating_add(self.ttl_secs)
    }

    /// Days of [`DailyParts`] kept behind the newest: as long as `DAY#`
    /// items live.
    fn retain_days(&self) -> i64 {
        retain_days(self.ttl_secs)
    }

    fn dead_letter_error(&self, source: io::Error) -> StoreError {
        StoreError::DeadLetterFile {
            path: self.dead_letter_path.clone(),
            source,
        }
    }

    fn truncate_dead_letters(&self, len: u64) -> Result<(), StoreError> {
        let file = OpenOptions::new()
            .write(true)
            .open(&self.dead_letter_path)
            .map_err(|e| self.dead_letter_error(e))?;
        file.set_len(len).map_err(|e| self.dead_letter_error(e))?;
        file.sync_all().map_err(|e| self.dead_letter_error(e))
    }

    /// Appends `bytes` after the committed length (dropping any uncommitted
    /// tail of a failed write) and syncs; returns the new length.
    fn append_dead_letters(&self, committed: u64, bytes: &[u8]) -> Result<u64, StoreError> {
        let run = || -> io::Result<u64> {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&self.dead_letter_path)?;
            let start = file.metadata()?.len().min(committed);
            file.set_len(start)?;
            file.seek(SeekFrom::Start(start))?;
            file.write_all(bytes)?;
            file.sync_all()?;
            Ok(start + bytes.len() as u64)
        };
        run().map_err(|e| self.dead_letter_error(e))
    }

    #[cfg(test)]
    fn dump_low_stock(&self) -> Vec<((String, String), LowStockItem)> {
        let txn = self.db.begin_read().unwrap();
        let table = txn.open_table(LOW_STOCK_ITEMS).unwrap();
        table
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                let (seller, product) = k.value();
                let item = decode("low-stock item", v.value()).unwrap();
                ((seller.to_string(), product.to_string()), item)
            })
            .collect()
    }

    #[cfg(test)]
    fn dump_items(&self) -> Vec<(String, String, String)> {
        let txn = self.db.begin_read().unwrap();
        let items = txn.open_table(ITEMS).unwrap();
        items
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                let (pk, sk) = k.value();
                (pk.to_string(), sk.to_string(), v.value().to_string())
            })
            .collect()
    }
}

/// A current record and its daily history as (YYYY-MM-DD, record).
pub type History = (MetricRecord, Vec<(String, MetricRecord)>);

/// The partition key of an entity's items and contributions.
pub fn entity_pk(key: &EntityKey) -> String {
    match key {
        EntityKey::Seller(s) => format!("SELLER#{s}"),
        EntityKey::Category(c) => format!("CATEGORY#{c}"),
    }
}

pub(crate) fn parse_entity_pk(pk: &str) -> Result<EntityKey, StoreError> {
    if let Some(s) = pk.strip_prefix("SELLER#") {
        Ok(EntityKey::Seller(s.into()))
    } else if let Some(c) = pk.strip_prefix("CATEGORY#") {
        Ok(EntityKey::Category(c.into()))
    } else {
        Err(StoreError::Decode {
            what: "entity key",
            detail: format!("unknown entity key {pk:?}"),
        })
    }
}

/// The next sequence number of a shard's product log.
fn next_log_seq(
    log: &impl ReadableTable<(u32, u64), &'static [u8]>,
    shard: Shard,
) -> Result<u64, StoreError> {
    Ok(log
        .range((shard, 0)..=(shard, u64::MAX))?
        .next_back()
        .transpose()?
        .map_or(0, |(k, _)| k.value().1 + 1))
}

/// A shard's products: its log replayed in order, the last state winning.
fn read_log(
    log: &impl ReadableTable<(u32, u64), &'static [u8]>,
    shard: Shard,
) -> Result<BTreeMap<ProductId, ProductState>, StoreError> {
    let mut live = BTreeMap::new();
    for entry in log.range((shard, 0)..=(shard, u64::MAX))? {
        let (_, v) = entry?;
        let states: Vec<(ProductId, ProductState)> = decode("product states", v.value())?;
        live.extend(states);
    }
    Ok(live)
}

/// Merges a shard's log into snapshot entries once it is long enough, so a
/// restore reads each product about once and the log does not grow with
/// the number of flushes. Amortised, each flush pays 1/16 of the shard.
fn compact_log(
    log: &mut redb::Table<(u32, u64), &'static [u8]>,
    shard: Shard,
) -> Result<(), StoreError> {
    let entries = log.range((shard, 0)..=(shard, u64::MAX))?.count();
    if entries <= LOG_COMPACT_AFTER {
        return Ok(());
    }
    let next = next_log_seq(log, shard)?;
    let live: Vec<(ProductId, ProductState)> = read_log(log, shard)?.into_iter().collect();
    let old: Vec<u64> = log
        .range((shard, 0)..=(shard, u64::MAX))?
        .map(|e| e.map(|(k, _)| k.value().1))
        .collect::<Result<_, _>>()?;
    for seq in old {
        log.remove((shard, seq))?;
    }
    // Cut as a restore cuts a shard, by count and by bytes: an entry must
    // encode within a frame's limit.
    let entries = ShardState::chunked(shard, Vec::new(), Vec::new(), live, LOG_ENTRY_PRODUCTS);
    for (i, entry) in entries.iter().enumerate() {
        log.insert(
            (shard, next + i as u64),
            encode("product states", &entry.products)?.as_slice(),
        )?;
    }
    Ok(())
}

/// Bincode through the proto crate's codec (the frame without its prefix).
fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    let mut buf = Vec::new();
    proto::frame::encode_into(value, &mut buf).map_err(|e| StoreError::Encode {
        what,
        detail: e.to_string(),
    })?;
    buf.drain(..4);
    Ok(buf)
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    proto::frame::decode(bytes).map_err(|e: FrameError| StoreError::Decode {
        what,
        detail: e.to_string(),
    })
}

fn decode_len(bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Decode {
        what: "dead-letter length",
        detail: format!("{} bytes instead of 8", bytes.len()),
    })?;
    Ok(u64::from_le_bytes(arr))
}

pub(crate) type JsonObject = serde_json::Map<String, serde_json::Value>;

fn parse_object(text: &str) -> Result<JsonObject, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Decode {
        what: "item",
        detail: e.to_string(),
    })
}

fn json_string(obj: &JsonObject) -> Result<String, StoreError> {
    serde_json::to_string(obj).map_err(|e| StoreError::Encode {
        what: "item",
        detail: e.to_string(),
    })
}

/// A record's attributes (without its `type` tag) as a JSON object.
pub(crate) fn record_object(record: &MetricRecord) -> Result<JsonObject, StoreError> {
    match serde_json::to_value(record) {
        Ok(serde_json::Value::Object(mut obj)) => {
            obj.remove("type");
            Ok(obj)
        }
        Ok(_) => Err(StoreError::Encode {
            what: "item",
            detail: "record is not an object".into(),
        }),
        Err(e) => Err(StoreError::Encode {
            what: "item",
            detail: e.to_string(),
        }),
    }
}

fn entity_item(record: &MetricRecord, now_ms: i64, ttl: i64) -> Result<String, StoreError> {
    json_string(&entity_object(record, now_ms, ttl)?)
}

/// An entity item's attributes (DESIGN §6): the record's fields, `updatedAt`
/// and `TTL`. Shared with the AWS store.
pub(crate) fn entity_object(
    record: &MetricRecord,
    now_ms: i64,
    ttl: i64,
) -> Result<JsonObject, StoreError> {
    let mut obj = record_object(record)?;
    obj.insert("updatedAt".into(), now_ms.into());
    obj.insert("TTL".into(), ttl.into());
    Ok(obj)
}

/// A low-stock item's attributes (DESIGN §6), serialized straight from the
/// item (the AWS store's items).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LowStockAttrs<'a> {
    #[serde(with = "analytics_worker::records::product_id_json")]
    product_id: ProductId,
    seller_id: &'a str,
    name: &'a str,
    category: &'a str,
    quantity: i64,
    price: Money,
    since: i64,
}

/// The record of a stored low-stock item.
fn low_stock_record(stored: &[u8]) -> Result<MetricRecord, StoreError> {
    let item: LowStockItem = decode("low-stock item", stored)?;
    Ok(MetricRecord::LowStock(LowStockRecord {
        seller_id: item.seller_id.into(),
        product_id: item.product_id,
        name: item.name.into(),
        category: item.category.into(),
        quantity: item.quantity,
        price: Money(i128::from(item.price_cents)),
    }))
}

/// Moves the low-stock items a store of an earlier version kept among the
/// items (as JSON) into their own table. Nothing to do once moved.
fn move_low_stock_items(
    items: &mut redb::Table<(&str, &str), &str>,
    low_stock_items: &mut redb::Table<(&str, &str), &[u8]>,
) -> Result<(), StoreError> {
    let mut old = Vec::new();
    for entry in items.range((LOW_STOCK_PREFIX, "")..)? {
        let (k, v) = entry?;
        let (pk, sk) = k.value();
        if !pk.starts_with(LOW_STOCK_PREFIX) {
            break;
        }
        old.push((pk.to_string(), sk.to_string(), v.value().to_string()));
    }
    for (pk, sk, text) in &old {
        let bad = |detail: String| StoreError::Decode {
            what: "low-stock item of an earlier version",
            detail: format!("{pk} {sk}: {detail}"),
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let since = value.get("since").and_then(|s| s.as_i64()).unwrap_or(0);
        let Some(MetricRecord::LowStock(r)) = parse_item_value(pk, value, i64::MIN)? else {
            return Err(bad("not a low-stock record".into()));
        };
        let item = LowStockItem {
            price_cents: i64::try_from(r.price.0).map_err(|e| bad(e.to_string()))?,
            product_id: r.product_id,
            seller_id: r.seller_id.into(),
            name: r.name.into(),
            category: r.category.into(),
            quantity: r.quantity,
            since,
        };
        let product = item.product_id.to_string();
        low_stock_items.insert(
            (&*item.seller_id, product.as_str()),
            encode("low-stock item", &item)?.as_slice(),
        )?;
        items.remove((pk.as_str(), sk.as_str()))?;
    }
    if !old.is_empty() {
        tracing::info!(
            items = old.len(),
            "moved low-stock items to their own table"
        );
    }
    Ok(())
}

/// A low-stock item's attributes as a JSON value (the AWS store's items are
/// built from the same form).
pub(crate) fn low_stock_value(item: &LowStockItem) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(LowStockAttrs::from_item(item)).map_err(|e| StoreError::Encode {
        what: "item",
        detail: e.to_string(),
    })
}

impl<'a> LowStockAttrs<'a> {
    fn from_item(item: &'a LowStockItem) -> Self {
        LowStockAttrs {
            product_id: item.product_id.clone(),
            seller_id: &item.seller_id,
            name: &item.name,
            category: &item.category,
            quantity: item.quantity,
            price: Money(i128::from(item.price_cents)),
            since: item.since,
        }
    }
}

/// The record an item holds, or `None` when its TTL has passed.
fn parse_item(pk: &str, text: &str, now_ms: i64) -> Result<Option<MetricRecord>, StoreError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| StoreError::Decode {
        what: "item",
        detail: e.to_string(),
    })?;
    parse_item_value(pk, value, now_ms)
}

/// The record an item's attributes (as JSON) hold, or `None` when its TTL
/// has passed. Shared with the AWS store.
pub(crate) fn parse_item_value(
    pk: &str,
    value: serde_json::Value,
    now_ms: i64,
) -> Result<Option<MetricRecord>, StoreError> {
    if let Some(ttl) = value.get("TTL").and_then(|t| t.as_i64())
        && ttl < now_ms.div_euclid(1000)
    {
        return Ok(None);
    }
    let bad = |e: serde_json::Error| StoreError::Decode {
        what: "item",
        detail: format!("{pk}: {e}"),
    };
    let record = if pk.starts_with("SELLER#") {
        MetricRecord::Seller(serde_json::from_value::<SellerRecord>(value).map_err(bad)?)
    } else if pk.starts_with("CATEGORY#") {
        MetricRecord::Category(serde_json::from_value::<CategoryRecord>(value).map_err(bad)?)
    } else if pk.starts_with(LOW_STOCK_PREFIX) {
        MetricRecord::LowStock(serde_json::from_value::<LowStockRecord>(value).map_err(bad)?)
    } else {
        return Err(StoreError::Decode {
            what: "item",
            detail: format!("unknown partition key {pk:?}"),
        });
    };
    Ok(Some(record))
}

#[derive(Serialize)]
struct DeadLetterLine<'a> {
    stream: &'a str,
    shard: Shard,
    offset: Offset,
    line: Offset,
    reason: &'a str,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
    #[serde(rename = "rawHex", skip_serializing_if = "Option::is_none")]
    raw_hex: Option<String>,
}

fn dead_letter_line(dl: &DeadLetter) -> Result<String, StoreError> {
    let (raw, raw_hex) = match std::str::from_utf8(&dl.raw) {
        Ok(s) => (Some(s), None),
        Err(_) => (
            None,
            Some(dl.raw.iter().map(|b| format!("{b:02x}")).collect()),
        ),
    };
    let line = DeadLetterLine {
        stream: &dl.stream,
        shard: dl.shard,
        offset: dl.offset,
        line: dl.offset.saturating_add(1),
        reason: &dl.reason,
        detail: &dl.detail,
        raw,
        raw_hex,
    };
    serde_json::to_string(&line).map_err(|e| StoreError::Encode {
        what: "dead letter",
        detail: e.to_string(),
    })
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

/// An entity a write changes (see [`EmbeddedStore::write`]).
struct ChangedEntity {
    key: EntityKey,
    /// Its daily parts as stored, and as the write leaves them.
    stored: DailyParts,
    days: DailyParts,
    /// The `DAY#` items to write: day number → the entity at its end.
    items: BTreeMap<i64, EntityTotals>,
}

/// An entity's daily parts as stored.
fn read_daily_parts(
    daily: &redb::Table<(&str, u32, i64), &[u8]>,
    daily_exact: &redb::Table<&str, i64>,
    pk: &str,
) -> Result<DailyParts, StoreError> {
    let exact_from = daily_exact.get(pk)?.map_or(i64::MIN, |g| g.value());
    Ok(DailyParts::from_entries(
        daily
            .range((pk, 0u32, i64::MIN)..=(pk, u32::MAX, i64::MAX))?
            .map(|entry| {
                let (k, v) = entry?;
                let (_, shard, day) = k.value();
                Ok(((shard, day), decode("entity totals", v.value())?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?,
        exact_from,
    ))
}

/// The sort key of an entity's `DAY#` item of a UTC day number.
pub fn day_sk(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("DAY#{y:04}-{m:02}-{d:02}")
}

/// The UTC day number a shard's write files its part of an entity under:
/// the day of the part's `lastEventAt`, or of the latest event that
/// changed it (`ShardChanges::changed_at`) when that is later (an update
/// that changes a category without naming it must not rewrite an earlier
/// day's item), or, with neither, of `now_ms`.
pub fn part_day(part: &EntityTotals, changed_at: Option<i64>, now_ms: i64) -> i64 {
    let ms = match changed_at.map_or(part.last_event_at, |c| c.max(part.last_event_at)) {
        ms if ms >= 0 => ms,
        _ => now_ms,
    };
    utc_day_number(ms)
}

/// Days of [`DailyParts`] kept behind the newest: as long as `DAY#` items
/// live (`ttl_secs`), at most [`DAILY_PARTS_MAX_DAYS`].
pub fn retain_days(ttl_secs: i64) -> i64 {
    ttl_secs
        .div_euclid(86_400)
        .saturating_add(1)
        .min(DAILY_PARTS_MAX_DAYS)
}

/// How far behind the newest day a shard's write still updates a `DAY#`
/// item. Bounds the parts an entity keeps: a shard that stopped touching
/// a category makes the others keep up to this many days each, and the
/// AWS store writes them all in the entity's parts item at every change
/// (and its `DAY#` items for these days in one transaction).
pub const DAILY_PARTS_MAX_DAYS: i64 = 7;

/// The UTC day (`YYYY-MM-DD`) of an epoch-millisecond time.
pub fn utc_day(ms: i64) -> String {
    let (y, m, d) = civil_from_days(utc_day_number(ms));
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proto::{Field, Version};

    const T0: i64 = 1_696_176_060_000; // 2023-10-01T16:01:00Z
    const DAY: i64 = 86_400_000;

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

    fn pos(stream: &str, offset: i64) -> Position {
        Position {
            stream: stream.into(),
            offset,
        }
    }

    fn seller(s: &str) -> EntityKey {
        EntityKey::Seller(s.into())
    }

    fn cat(c: &str) -> EntityKey {
        EntityKey::Category(c.into())
    }

    fn open(dir: &Path) -> EmbeddedStore {
        EmbeddedStore::open(dir, StoreOptions::default()).unwrap()
    }

    fn entity_changes(
        shard: Shard,
        offset: i64,
        entities: Vec<(EntityKey, EntityTotals)>,
    ) -> ShardChanges {
        ShardChanges {
            shard,
            positions: vec![pos("events", offset)],
            entities,
            ..ShardChanges::default()
        }
    }

    /// Stands in for a worker: encodes product states and works out the
    /// low-stock puts and deletes from what it listed at its previous flush.
    #[derive(Default)]
    pub(crate) struct Worker {
        listed: std::collections::HashMap<(Shard, ProductId), Box<str>>,
    }

    impl Worker {
        /// `base` with `products` added the way a worker adds them.
        pub(crate) fn changes(
            &mut self,
            base: ShardChanges,
            products: Vec<(ProductId, ProductState)>,
        ) -> ShardChanges {
            let mut sc = base;
            for (id, state) in &products {
                let item = LowStockItem::of(id, state);
                let key = (sc.shard, id.clone());
                let now = item.as_ref().map(|i| i.seller_id.clone());
                if let Some(old) = self.listed.get(&key)
                    && Some(old) != now.as_ref()
                {
                    sc.low_stock.push(LowStockChange::Delete {
                        seller_id: old.clone(),
                        product_id: id.clone(),
                    });
                }
                match now {
                    Some(seller) => self.listed.insert(key, seller),
                    None => self.listed.remove(&key),
                };
                sc.low_stock.extend(item.map(LowStockChange::Put));
            }
            sc.products = proto::EncodedProducts::encode(&products).unwrap();
            sc
        }
    }

    fn record(store: &EmbeddedStore, key: &str) -> Option<MetricRecord> {
        store
            .current_records(T0)
            .unwrap()
            .into_iter()
            .find(|r| r.key().0 == key)
    }

    /// DESIGN §3's worked check, flushed in two batches.
    pub(crate) fn worked_check_changes() -> Vec<ShardChanges> {
        let (a, b) = (ProductId::Num(1), ProductId::Text("B".into()));
        let mut worker = Worker::default();
        let first = worker.changes(
            ShardChanges {
                shard: 0,
                positions: vec![pos("events", 1)],
                entities: vec![
                    (seller("s1"), totals(2, 2, 0, 11000, 4000, 2, T0 + 1000)),
                    (cat("Books"), totals(2, 2, 0, 11000, 4000, 2, T0 + 1000)),
                ],
                ..ShardChanges::default()
            },
            vec![
                (a.clone(), product("s1", "Books", 3000, 2, false, Some(T0))),
                (
                    b.clone(),
                    product("s1", "Books", 1000, 5, false, Some(T0 + 1000)),
                ),
            ],
        );
        let second = worker.changes(
            ShardChanges {
                shard: 0,
                positions: vec![pos("events", 3)],
                entities: vec![
                    (seller("s1"), totals(2, 1, 1, 12000, 1500, 1, T0 + 3000)),
                    (cat("Books"), totals(1, 0, 1, 0, 0, 0, T0 + 3000)),
                    (cat("Games"), totals(1, 1, 0, 12000, 1500, 1, T0 + 2000)),
                ],
                ..ShardChanges::default()
            },
            vec![
                (a, product("s1", "Games", 1500, 8, false, Some(T0 + 2000))),
                (b, product("s1", "Books", 1000, 5, true, None)),
            ],
        );
        vec![first, second]
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(utc_day(T0), "2023-10-01");
        assert_eq!(utc_day(-1), "1969-12-31");
        assert_eq!(utc_day(951_868_799_999), "2000-02-29");
        assert_eq!(utc_day(4_107_542_400_000), "2100-03-01");
    }

    #[test]
    fn worked_check_comes_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let changes = worked_check_changes();
        store.write(&changes[..1], T0).unwrap();
        let stats = store.write(&changes[1..], T0).unwrap();
        assert_eq!(stats.shards_applied, 1);
        assert_eq!(stats.products, 2);
        assert_eq!(stats.entities, 3);
        assert_eq!(stats.low_stock_puts, 1);
        assert_eq!(stats.low_stock_deletes, 1);

        let lines: Vec<String> = store
            .current_records(T0)
            .unwrap()
            .iter()
            .map(MetricRecord::to_json_line)
            .collect();
        assert_eq!(
            lines,
            [
                r#"{"type":"category","category":"Books","totalProducts":0,"totalValue":"0.00","averagePrice":"0.00","lastEventAt":1696176063000}"#,
                r#"{"type":"category","category":"Games","totalProducts":1,"totalValue":"120.00","averagePrice":"15.00","lastEventAt":1696176062000}"#,
                r#"{"type":"lowStock","sellerId":"s1","productId":1,"name":"name-s1-Games","category":"Games","quantity":8,"price":"15.00"}"#,
                r#"{"type":"seller","sellerId":"s1","totalProducts":2,"activeProducts":1,"deletedProducts":1,"totalValue":"120.00","lowStockCount":1,"lastEventAt":1696176063000}"#,
            ]
        );
    }

    #[test]
    fn items_have_dynamodb_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.write(&worked_check_changes(), T0 + 5000).unwrap();
        let items = store.dump_items();
        let get = |pk: &str, sk: &str| -> serde_json::Value {
            let (_, _, v) = items.iter().find(|(p, s, _)| p == pk && s == sk).unwrap();
            serde_json::from_str(v).unwrap()
        };
        let ttl = (T0 + 5000) / 1000 + 30 * 24 * 3600;
        assert_eq!(
            get("SELLER#s1", "CURRENT"),
            serde_json::json!({"sellerId":"s1","totalProducts":2,"activeProducts":1,"deletedProducts":1,
                "totalValue":"120.00","lowStockCount":1,"lastEventAt":T0 + 3000,"updatedAt":T0 + 5000,"TTL":ttl})
        );
        assert_eq!(
            get("CATEGORY#Games", "CURRENT"),
            serde_json::json!({"category":"Games","totalProducts":1,"totalValue":"120.00","averagePrice":"15.00",
                "lastEventAt":T0 + 2000,"updatedAt":T0 + 5000,"TTL":ttl})
        );
        // The low-stock item, in its own table: the same attributes.
        let low: Vec<((String, String), LowStockItem)> = store.dump_low_stock();
        assert_eq!(
            low,
            vec![(
                ("s1".to_string(), "1".to_string()),
                LowStockItem {
                    product_id: ProductId::Num(1),
                    seller_id: "s1".into(),
                    name: "name-s1-Games".into(),
                    category: "Games".into(),
                    quantity: 8,
                    price_cents: 1500,
                    since: T0 + 2000,
                }
            )]
        );
        assert!(
            items
                .iter()
                .all(|(pk, _, _)| !pk.starts_with(LOW_STOCK_PREFIX))
        );
    }

    #[test]
    fn low_stock_items_of_an_earlier_version_are_moved_to_their_table() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        {
            // An earlier version kept them among the items, as JSON.
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut items = txn.open_table(ITEMS).unwrap();
                for (pk, sk, text) in [
                    (
                        "LOWSTOCK#s1",
                        "PRODUCT#7",
                        r#"{"productId":7,"sellerId":"s1","name":"Mouse","category":"Toys","quantity":3,"price":"29.99","since":1000}"#,
                    ),
                    (
                        "LOWSTOCK#s2",
                        "PRODUCT#a-1",
                        r#"{"productId":"a-1","sellerId":"s2","name":"","category":"","quantity":0,"price":"0.00","since":2000}"#,
                    ),
                ] {
                    items.insert((pk, sk), text).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = open(dir.path());
        let keys: Vec<_> = store
            .dump_low_stock()
            .into_iter()
            .map(|(k, i)| (k, i.since))
            .collect();
        assert_eq!(
            keys,
            vec![
                (("s1".to_string(), "7".to_string()), 1000),
                (("s2".to_string(), "a-1".to_string()), 2000)
            ]
        );
        assert!(store.dump_items().is_empty(), "moved, not copied");
        match &store.low_stock(Some("s1")).unwrap()[..] {
            [MetricRecord::LowStock(r)] => {
                assert_eq!((&*r.name, r.quantity, r.price), ("Mouse", 3, Money(2999)))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(store.current_records(T0).unwrap().len(), 2);
        // Opening again finds nothing more to move.
        drop(store);
        assert_eq!(open(dir.path()).dump_low_stock().len(), 2);
    }

    #[test]
    fn categories_sum_across_shards_and_a_shard_replaces_its_contribution() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store
            .write(
                &[
                    entity_changes(
                        0,
                        10,
                        vec![(cat("Books"), totals(2, 2, 0, 1000, 700, 0, T0))],
                    ),
                    entity_changes(
                        1,
                        4,
                        vec![(cat("Books"), totals(1, 1, 0, 500, 300, 0, T0 + 7))],
                    ),
                ],
                T0,
            )
            .unwrap();
        let expect = |total, value, avg, last| {
            MetricRecord::Category(CategoryRecord {
                category: "Books".into(),
                total_products: total,
                total_value: Money(value),
                average_price: Money(avg),
                last_event_at: last,
            })
        };
        assert_eq!(
            record(&store, "CATEGORY#Books"),
            Some(expect(3, 1500, 333, T0 + 7))
        );

        store
            .write(
                &[entity_changes(
                    0,
                    11,
                    vec![(cat("Books"), totals(1, 1, 0, 200, 200, 0, T0 + 9))],
                )],
                T0,
            )
            .unwrap();
        assert_eq!(
            record(&store, "CATEGORY#Books"),
            Some(expect(2, 700, 250, T0 + 9))
        );
    }

    #[test]
    fn replays_are_skipped_and_never_move_values_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut worker = Worker::default();
        let newer = worker.changes(
            ShardChanges {
                shard: 2,
                positions: vec![pos("a", 10), pos("b", 5)],
                entities: vec![(seller("s1"), totals(1, 1, 0, 300, 100, 1, T0))],
                ..ShardChanges::default()
            },
            vec![(
                ProductId::Num(9),
                product("s1", "Books", 100, 3, false, Some(T0)),
            )],
        );
        let first = store.write(std::slice::from_ref(&newer), T0).unwrap();
        assert_eq!((first.shards_applied, first.shards_skipped), (1, 0));
        let before = store.dump_items();

        // The same write again, later: skipped, nothing rewritten (not even updatedAt).
        let again = store
            .write(std::slice::from_ref(&newer), T0 + 1000)
            .unwrap();
        assert_eq!(
            again,
            WriteStats {
                shards_skipped: 1,
                ..WriteStats::default()
            }
        );
        assert_eq!(store.dump_items(), before);

        // An older batch after the newer one: skipped.
        let older = worker.changes(
            ShardChanges {
                shard: 2,
                positions: vec![pos("a", 7), pos("b", 5)],
                entities: vec![(seller("s1"), totals(1, 1, 0, 5000, 100, 0, T0 - 5))],
                ..ShardChanges::default()
            },
            vec![(
                ProductId::Num(9),
                product("s1", "Books", 100, 50, false, None),
            )],
        );
        assert_eq!(store.write(&[older], T0 + 2000).unwrap().shards_skipped, 1);
        assert_eq!(store.dump_items(), before);

        // A batch that is newer on one stream is applied; each position keeps its maximum.
        let mixed = ShardChanges {
            shard: 2,
            positions: vec![pos("a", 3), pos("b", 6)],
            ..ShardChanges::default()
        };
        assert_eq!(store.write(&[mixed], T0).unwrap().shards_applied, 1);
        let mut positions = store.positions().unwrap();
        positions.sort_by(|x, y| x.1.stream.cmp(&y.1.stream));
        assert_eq!(positions, vec![(2, pos("a", 10)), (2, pos("b", 6))]);

        // No positions at all: nothing to prove it is new, so skipped.
        let blank = ShardChanges {
            shard: 2,
            entities: newer.entities.clone(),
            ..ShardChanges::default()
        };
        assert_eq!(store.write(&[blank], T0).unwrap().shards_skipped, 1);
    }

    #[test]
    fn low_stock_put_move_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let id = ProductId::Num(42);
        let mut worker = Worker::default();
        let mut at = |shard_offset: i64, state: ProductState| {
            let base = ShardChanges {
                shard: 0,
                positions: vec![pos("events", shard_offset)],
                ..ShardChanges::default()
            };
            worker.changes(base, vec![(id.clone(), state)])
        };
        let keys = |store: &EmbeddedStore| -> Vec<(String, String)> {
            store
                .low_stock(None)
                .unwrap()
                .iter()
                .map(MetricRecord::key)
                .collect()
        };

        let s = store
            .write(&[at(1, product("s1", "Toys", 250, 3, false, Some(T0)))], T0)
            .unwrap();
        assert_eq!((s.low_stock_puts, s.low_stock_deletes), (1, 0));
        assert_eq!(
            keys(&store),
            vec![("LOWSTOCK#s1".to_string(), "PRODUCT#42".to_string())]
        );
        assert_eq!(store.low_stock(Some("s1")).unwrap().len(), 1);
        assert!(store.low_stock(Some("s")).unwrap().is_empty());

        // The seller changes: the item moves.
        let s = store
            .write(&[at(2, product("s2", "Toys", 250, 4, false, Some(T0)))], T0)
            .unwrap();
        assert_eq!((s.low_stock_puts, s.low_stock_deletes), (1, 1));
        assert_eq!(
            keys(&store),
            vec![("LOWSTOCK#s2".to_string(), "PRODUCT#42".to_string())]
        );
        assert!(store.low_stock(Some("s1")).unwrap().is_empty());
        match &store.low_stock(Some("s2")).unwrap()[..] {
            [MetricRecord::LowStock(r)] => assert_eq!((r.quantity, r.price), (4, Money(250))),
            other => panic!("unexpected {other:?}"),
        }

        // Restocked: the item goes.
        let s = store
            .write(&[at(3, product("s2", "Toys", 250, 40, false, None))], T0)
            .unwrap();
        assert_eq!((s.low_stock_puts, s.low_stock_deletes), (0, 1));
        assert!(keys(&store).is_empty());
    }

    /// A category's products by day, as its `DAY#` items hold them.
    fn category_days(store: &EmbeddedStore, name: &str, now: i64) -> Vec<(String, u64)> {
        let (_, days) = store.category(name, now).unwrap().unwrap();
        days.into_iter()
            .map(|(d, r)| match r {
                MetricRecord::Category(r) => (d, r.total_products),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// Category values per day (DESIGN §6: "as at the end of that UTC
    /// day"), summed over shards that reach midnight at different times.
    pub(crate) fn shards_crossing_midnight_apart() -> Vec<ShardChanges> {
        let books =
            |products, last| vec![(cat("Books"), totals(products, products, 0, 0, 0, 0, last))];
        vec![
            // Shard 0 ends day 1 with 2 products, then reaches day 2 with 5.
            entity_changes(0, 1, books(2, T0)),
            entity_changes(0, 2, books(5, T0 + DAY)),
            // Shard 1, read behind it, ends day 1 with 3, day 2 with 4.
            entity_changes(1, 1, books(3, T0 + 10)),
            entity_changes(1, 2, books(4, T0 + DAY + 10)),
        ]
    }

    #[test]
    fn a_categorys_daily_items_hold_every_shards_value_at_the_end_of_the_day() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let now = T0 + 2 * DAY;
        let changes = shards_crossing_midnight_apart();
        // One write at a time, in this order, then all again (replays).
        for sc in changes.iter().chain(&changes) {
            store.write(std::slice::from_ref(sc), now).unwrap();
        }
        let days = |store: &EmbeddedStore| category_days(store, "Books", now);
        let want = vec![("2023-10-01".to_string(), 5), ("2023-10-02".to_string(), 9)];
        assert_eq!(days(&store), want);
        // The same in one write.
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.write(&changes, now).unwrap();
        assert_eq!(days(&store), want);
    }

    /// The same changes written one per write or all in one write give the
    /// same items, also when pruning falls between them (a shard 9 days
    /// behind, then one that first contributes behind the others).
    #[test]
    fn daily_items_do_not_depend_on_how_changes_are_batched() {
        let books = |shard, offset, products, day: i64| {
            entity_changes(
                shard,
                offset,
                vec![(
                    cat("Books"),
                    totals(products, products, 0, 0, 0, 0, T0 + day * DAY),
                )],
            )
        };
        let changes = [
            books(0, 1, 1, 0),
            books(0, 2, 2, 1),
            books(1, 1, 3, 0),
            books(0, 3, 4, 9),
            books(1, 2, 5, 9),
            books(2, 1, 6, 0),
            books(1, 3, 7, 1),
        ];
        let now = T0 + 10 * DAY;
        let (one, all) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut one_by_one, mut at_once) = (open(one.path()), open(all.path()));
        for sc in &changes {
            one_by_one.write(std::slice::from_ref(sc), now).unwrap();
        }
        at_once.write(&changes, now).unwrap();
        assert_eq!(one_by_one.dump_items(), at_once.dump_items());
        assert_eq!(
            category_days(&at_once, "Books", now).last(),
            Some(&("2023-10-10".to_string(), 17))
        );
    }

    /// A data directory of the build before daily contributions: each
    /// shard's stored contribution counts at the end of its own day, also
    /// after the shard's next part replaces it.
    #[test]
    fn contributions_stored_without_days_keep_their_day() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let now = T0 + 2 * DAY;
        let books = |shard, offset, products, last| {
            entity_changes(
                shard,
                offset,
                vec![(cat("Books"), totals(products, products, 0, 0, 0, 0, last))],
            )
        };
        store
            .write(&[books(0, 1, 2, T0), books(1, 1, 3, T0 + 5)], now)
            .unwrap();
        // What the earlier build left: no daily contributions.
        let txn = store.db.begin_write().unwrap();
        txn.delete_table(DAILY_CONTRIBUTIONS).unwrap();
        txn.commit().unwrap();
        store.write(&[books(1, 2, 4, T0 + DAY)], now).unwrap();
        store.write(&[books(0, 2, 1, T0 + DAY)], now).unwrap();
        // A shard read behind them needs both old parts at day 1's end.
        store.write(&[books(2, 1, 10, T0 + 9)], now).unwrap();
        assert_eq!(
            category_days(&store, "Books", now),
            vec![
                ("2023-10-01".to_string(), 15),
                ("2023-10-02".to_string(), 15)
            ]
        );
    }

    #[test]
    fn daily_items_ttl_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(3600);
        let mut store = EmbeddedStore::open(dir.path(), StoreOptions { ttl }).unwrap();
        let now = T0 + 3 * DAY;
        store
            .write(
                &[entity_changes(
                    0,
                    1,
                    vec![(seller("s1"), totals(1, 1, 0, 100, 100, 0, T0))],
                )],
                now,
            )
            .unwrap();
        store
            .write(
                &[entity_changes(
                    0,
                    2,
                    vec![(seller("s1"), totals(2, 2, 0, 300, 300, 0, T0 + DAY))],
                )],
                now,
            )
            .unwrap();
        // An entity that has no event time yet files under the day of the write.
        store
            .write(
                &[entity_changes(
                    0,
                    3,
                    vec![(cat("Empty"), totals(0, 0, 0, 0, 0, 0, -1))],
                )],
                now,
            )
            .unwrap();

        let (current, days) = store.seller("s1", now).unwrap().unwrap();
        let MetricRecord::Seller(current) = current else {
            panic!()
        };
        assert_eq!(current.total_products, 2);
        let days: Vec<(String, u64)> = days
            .into_iter()
            .map(|(d, r)| match r {
                MetricRecord::Seller(r) => (d, r.total_products),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            days,
            vec![("2023-10-01".to_string(), 1), ("2023-10-02".to_string(), 2)]
        );
        let (_, empty_days) = store.category("Empty", now).unwrap().unwrap();
        assert_eq!(
            empty_days
                .iter()
                .map(|(d, _)| d.as_str())
                .collect::<Vec<_>>(),
            ["2023-10-04"]
        );
        assert!(store.seller("nobody", now).unwrap().is_none());

        for (_, sk, item) in store.dump_items() {
            let v: serde_json::Value = serde_json::from_str(&item).unwrap();
            assert_eq!(v["TTL"], serde_json::json!(now / 1000 + 3600), "{sk}");
        }

        // Past the TTL every item is invisible.
        let later = now + 3601 * 1000;
        assert_eq!(store.current_records(now).unwrap().len(), 2);
        assert!(store.current_records(later).unwrap().is_empty());
        assert!(store.seller("s1", later).unwrap().is_none());

        // A refresh brings current items back and purges expired daily ones.
        assert_eq!(store.refresh_ttl(later).unwrap(), 2);
        assert_eq!(store.current_records(later).unwrap().len(), 2);
        // Refreshed lately: not rewritten again.
        assert_eq!(store.refresh_ttl(later + 1000).unwrap(), 0);
        let (_, days) = store.seller("s1", later).unwrap().unwrap();
        assert!(days.is_empty());
        assert!(store.dump_items().iter().all(|(_, sk, _)| sk == CURRENT));
    }

    #[test]
    fn dead_letters_are_appended_and_an_uncommitted_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let dl = |offset, raw: &[u8]| DeadLetter {
            stream: "events".into(),
            shard: 1,
            offset,
            reason: "invalid_json".into(),
            detail: "expected value".into(),
            raw: raw.to_vec(),
        };
        let changes = ShardChanges {
            shard: 1,
            positions: vec![pos("events", 8)],
            dead_letters: vec![dl(4, b"{nope"), dl(7, &[0xff, 0x00])],
            ..ShardChanges::default()
        };
        assert_eq!(
            store
                .write(std::slice::from_ref(&changes), T0)
                .unwrap()
                .dead_letters,
            2
        );
        let path = store.dead_letter_path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"stream":"events","shard":1,"offset":4,"line":5,"reason":"invalid_json","detail":"expected value","raw":"{nope"}"#,
                "\n",
                r#"{"stream":"events","shard":1,"offset":7,"line":8,"reason":"invalid_json","detail":"expected value","rawHex":"ff00"}"#,
                "\n"
            )
        );

        // A replay writes nothing more.
        assert_eq!(store.write(&[changes], T0).unwrap().dead_letters, 0);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

        // A crash after the append but before the commit leaves a tail; open drops it.
        drop(store);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"stream\":\"events\",\"offset\":9}\n")
            .unwrap();
        drop(file);
        let _store = open(dir.path());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn low_stock_changes_are_applied_as_the_worker_says_also_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut worker = Worker::default();
        let mut write = |store: &mut EmbeddedStore, offset: i64, low: Option<i64>| {
            let base = ShardChanges {
                shard: 2,
                positions: vec![pos("events", offset)],
                ..ShardChanges::default()
            };
            let products = vec![(
                ProductId::Num(9),
                product("s1", "Books", 100, 3, false, low),
            )];
            store.write(&[worker.changes(base, products)], 0).unwrap()
        };
        {
            let mut store = open(dir.path());
            write(&mut store, 1, Some(5));
            assert_eq!(store.low_stock(Some("s1")).unwrap().len(), 1);
        }
        // A restarted storage process needs no memory of the listing.
        let mut store = open(dir.path());
        let stats = write(&mut store, 2, None);
        assert_eq!((stats.low_stock_puts, stats.low_stock_deletes), (0, 1));
        assert!(store.low_stock(Some("s1")).unwrap().is_empty());
    }

    #[test]
    fn a_log_of_large_states_is_compacted_into_entries_that_fit_a_frame() {
        // 17 flushes of 300 products with 16 KiB names: the compaction
        // merges 84 MB of states, which one entry of up to 50,000 products
        // could not encode (a frame holds 64 MiB), failing the write.
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut worker = Worker::default();
        let name: Box<str> = "n".repeat(16 * 1024).into();
        for flush in 0..=LOG_COMPACT_AFTER as u64 {
            let products = (0..300)
                .map(|i| {
                    let mut state = product("s1", "Books", 100, 20, false, None);
                    state.name = f(name.clone());
                    (ProductId::Num(flush * 1000 + i), state)
                })
                .collect();
            let base = ShardChanges {
                shard: 3,
                positions: vec![pos("events", flush as i64)],
                ..ShardChanges::default()
            };
            store.write(&[worker.changes(base, products)], 0).unwrap();
        }
        let loaded = store.load_shard(3, 50_000).unwrap();
        let count: usize = loaded.iter().map(|c| c.products.len()).sum();
        assert_eq!(count, 300 * (LOG_COMPACT_AFTER + 1));
    }

    #[test]
    fn the_product_log_is_compacted_and_keeps_the_last_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut worker = Worker::default();
        // 40 flushes, each rewriting products 0..10 with a new price and
        // adding one new product: two compactions happen on the way.
        for flush in 0..40i64 {
            let mut products: Vec<(ProductId, ProductState)> = (0..10)
                .map(|i| {
                    (
                        ProductId::Num(i),
                        product("s1", "Books", 100 * flush + i as i64, 20, false, None),
                    )
                })
                .collect();
            products.push((
                ProductId::Num(1000 + flush as u64),
                product("s1", "Books", 1, 1, false, Some(flush)),
            ));
            let base = ShardChanges {
                shard: 3,
                positions: vec![pos("events", flush)],
                ..ShardChanges::default()
            };
            store.write(&[worker.changes(base, products)], 0).unwrap();
        }
        let txn = store.db.begin_read().unwrap();
        let log = txn.open_table(PRODUCT_LOG).unwrap();
        let entries = log.range((3u32, 0u64)..=(3u32, u64::MAX)).unwrap().count();
        assert!(entries <= LOG_COMPACT_AFTER, "log has {entries} entries");
        drop(log);
        drop(txn);
        let loaded: Vec<(ProductId, ProductState)> = store
            .load_shard(3, 1000)
            .unwrap()
            .into_iter()
            .flat_map(|c| c.products)
            .collect();
        assert_eq!(loaded.len(), 50);
        let price = |id: u64| {
            loaded
                .iter()
                .find(|(p, _)| *p == ProductId::Num(id))
                .and_then(|(_, s)| s.price_cents.value)
        };
        assert_eq!(price(7), Some(3907), "the last write wins");
        assert_eq!(price(1039), Some(1));
        assert_eq!(store.low_stock(Some("s1")).unwrap().len(), 40);
    }

    #[test]
    fn load_shard_returns_what_was_written_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut worker = Worker::default();
        let mut written: Vec<(ProductId, ProductState)> = (0..5)
            .map(|i| {
                (
                    ProductId::Num(i),
                    product("s1", "Books", 100 + i as i64, 20, false, None),
                )
            })
            .collect();
        written.push((
            ProductId::Text("x-1".into()),
            product("s1", "Games", 5, 1, false, Some(T0)),
        ));
        store
            .write(
                &[
                    worker.changes(
                        ShardChanges {
                            shard: 3,
                            positions: vec![pos("events", 77)],
                            entities: vec![
                                (seller("s1"), totals(6, 6, 0, 0, 0, 1, T0 + 1)),
                                (cat("Books"), totals(5, 5, 0, 0, 0, 0, T0)),
                            ],
                            ..ShardChanges::default()
                        },
                        written.clone(),
                    ),
                    worker.changes(
                        ShardChanges {
                            shard: 4,
                            positions: vec![pos("events", 5)],
                            entities: vec![(seller("s9"), totals(1, 1, 0, 1, 1, 0, T0 + 2))],
                            ..ShardChanges::default()
                        },
                        vec![(
                            ProductId::Num(100),
                            product("s9", "Books", 1, 1, false, None),
                        )],
                    ),
                ],
                T0,
            )
            .unwrap();

        let chunks = store.load_shard(3, 4).unwrap();
        assert_eq!(
            chunks
                .iter()
                .map(|c| (c.products.len(), c.last))
                .collect::<Vec<_>>(),
            vec![(4, false), (2, true)]
        );
        assert!(chunks.iter().all(|c| c.shard == 3));
        assert_eq!(chunks[0].positions, vec![pos("events", 77)]);
        assert!(chunks[1].positions.is_empty() && chunks[1].entity_times.is_empty());
        let mut times = chunks[0].entity_times.clone();
        times.sort();
        assert_eq!(times, vec![(seller("s1"), T0 + 1), (cat("Books"), T0)]);
        let mut loaded: Vec<_> = chunks.into_iter().flat_map(|c| c.products).collect();
        loaded.sort_by(|a, b| a.0.cmp(&b.0));
        written.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(loaded, written);

        let exact = store.load_shard(3, 6).unwrap();
        assert_eq!(exact.len(), 1);
        assert!(exact[0].last);

        let empty = store.load_shard(9, 4).unwrap();
        assert_eq!(
            empty,
            vec![ShardState {
                shard: 9,
                last: true,
                ..ShardState::default()
            }]
        );

        // Reopening finds the same state.
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.load_shard(4, 10).unwrap()[0].products.len(), 1);
    }

    #[test]
    fn retryable_errors() {
        assert!(
            StoreError::DeadLetterFile {
                path: "x".into(),
                source: io::Error::other("disk full")
            }
            .is_retryable()
        );
        assert!(
            !StoreError::Decode {
                what: "item",
                detail: "bad".into()
            }
            .is_retryable()
        );
        assert!(StoreError::Access(redb::StorageError::Io(io::Error::other("eio"))).is_retryable());
        assert!(!StoreError::Access(redb::StorageError::Corrupted("x".into())).is_retryable());
    }
}
