//! The fold: events in, exact metrics out (DESIGN §3).
//!
//! Each product is a set of last-writer-wins registers (seller, category,
//! name, price, quantity, deleted), each written only by an event whose
//! version (timestamp, then created < updated < deleted) is at least the
//! register's. Field values therefore do not depend on how the three topics
//! interleave, and a replayed event changes nothing. Seller and category
//! totals are exact integer sums kept per shard, adjusted by each product's
//! old and new contribution; an entity's `lastEventAt` is the largest
//! timestamp of an event that named it (new or old value).
//!
//! A shard also remembers the last applied offset of each stream: events at
//! or below it are skipped, which is how replays after a restore are absorbed.

use crate::archive::ShardArchive;
use crate::decode::{Event, EventKind, Rejection, decode};
use crate::intern::{Interner, Sym};
use crate::records::{LowStockRecord, MetricRecord, Money};
use foldhash::HashMap;
use proto::{
    DeadLetter, EncodedProducts, EntityKey, EntityTotals, EventBatch, Field, FrameError,
    LowStockChange, LowStockItem, Offset, Position, ProductId, ProductState, ProductStateOf, Shard,
    ShardChanges, ShardState, Version, utc_day_number,
};
use std::collections::BTreeMap;

const NO_SYM: Sym = Sym::MAX;
const UNKNOWN: i64 = i64::MIN;

/// The compact in-memory form of [`ProductState`].
struct Product {
    price: i64,
    quantity: i64,
    low_since: i64,
    seller_v: Version,
    category_v: Version,
    name_v: Version,
    price_v: Version,
    quantity_v: Version,
    deleted_v: Version,
    name: Option<Box<str>>,
    seller: Sym,
    category: Sym,
    /// The seller whose low-stock list holds the product's item as of the
    /// last flush (or restore); `NO_SYM` when it is not listed.
    listed: Sym,
    deleted: bool,
    dirty: bool,
}

/// Product identity as a map key: numeric ids as themselves, text ids as an
/// interned symbol with the top bit set.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ProductKey(u64);

const TEXT_ID: u64 = 1 << 63;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Entity {
    Seller(Sym),
    Category(Sym),
}

/// What a product adds to its seller's and category's totals.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Contribution {
    seller: Sym,
    category: Sym,
    deleted: bool,
    value_cents: i128,
    price_cents: i128,
    low: bool,
}

#[derive(Default)]
struct ShardFold {
    index: HashMap<ProductKey, u32>,
    products: Vec<(ProductKey, Product)>,
    entities: Entities,
    positions: Vec<(Box<str>, Offset, bool)>,
    dirty_products: Vec<u32>,
    dead_letters: Vec<DeadLetter>,
    /// What `dead_letters` takes once decoded (what a frame's limit counts).
    dead_letter_bytes: usize,
    /// About what the states of `dirty_products` take encoded: each counted
    /// when it turns dirty, plus any string it takes on after that.
    dirty_state_bytes: usize,
    /// The archive objects of the events applied since the last take (when
    /// the fold archives events).
    archive: ShardArchive,
    /// Events since the last take that moved a product in from another
    /// seller ([`BatchStats::moved_in`]).
    moved_in: u64,
    /// The latest UTC day of the events applied to the shard (kept across
    /// takes: a late event after a take starts no new day).
    day: Option<i64>,
}

/// Takes what changed in shard `s` since its last take, as absolute values.
fn take_shard(
    strings: &Interner,
    shard: Shard,
    s: &mut ShardFold,
) -> Result<ShardChanges, FrameError> {
    let mut changes = ShardChanges {
        shard,
        ..ShardChanges::default()
    };
    // Every stream's position once any moved: a store tells a
    // replay (behind or equal on every stream) from a stale owner's
    // write (ahead on one, behind on another) only with all of them.
    if s.positions.iter().any(|(_, _, dirty)| *dirty) {
        for (stream, offset, dirty) in &mut s.positions {
            *dirty = false;
            changes.positions.push(Position {
                stream: stream.clone(),
                offset: *offset,
            });
        }
    }
    // First the marks and the low-stock list, then the states,
    // encoded straight from the interned strings.
    let dirty = std::mem::take(&mut s.dirty_products);
    for &i in &dirty {
        let (key, p) = &mut s.products[i as usize];
        p.dirty = false;
        let listed = if p.low_since != UNKNOWN {
            p.seller
        } else {
            NO_SYM
        };
        if p.listed != NO_SYM && p.listed != listed {
            changes.low_stock.push(LowStockChange::Delete {
                seller_id: strings.name(p.listed).into(),
                product_id: product_id(strings, *key),
            });
        }
        if listed != NO_SYM {
            changes
                .low_stock
                .push(LowStockChange::Put(low_stock_item(strings, *key, p)));
        }
        p.listed = listed;
    }
    let states: Vec<_> = dirty
        .iter()
        .map(|&i| {
            let (key, p) = &s.products[i as usize];
            (product_id(strings, *key), wire_state(strings, p))
        })
        .collect();
    changes.products = EncodedProducts::encode(&states)?;
    s.dirty_products = dirty;
    s.dirty_products.clear();
    for (e, totals, changed_at) in s.entities.take_dirty() {
        changes.entities.push((entity_key(strings, e), totals));
        changes.changed_at.push(changed_at);
    }
    changes.dead_letters = std::mem::take(&mut s.dead_letters);
    changes.moved_in = std::mem::take(&mut s.moved_in);
    s.dead_letter_bytes = 0;
    s.dirty_state_bytes = 0;
    changes.archive = s.archive.take()?;
    Ok(changes)
}

/// Counts of one `apply_batch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub applied: u64,
    pub rejected: u64,
    pub skipped: u64,
    /// Applied events that name a previous seller (`changes.sellerId.old`,
    /// `previousData.seller_id`) for a product this shard never held: the
    /// product moved from a seller whose events may be in another shard,
    /// which then still counts it (README, "Known limits").
    pub moved_in: u64,
}

impl BatchStats {
    fn add(&mut self, other: BatchStats) {
        self.applied += other.applied;
        self.rejected += other.rejected;
        self.skipped += other.skipped;
        self.moved_in += other.moved_in;
    }
}

pub struct Fold {
    low_stock_threshold: i64,
    max_event_bytes: usize,
    archive_events: bool,
    strings: Interner,
    shards: BTreeMap<Shard, ShardFold>,
}

impl Fold {
    pub fn new(low_stock_threshold: i64, max_event_bytes: usize) -> Fold {
        Fold {
            low_stock_threshold,
            max_event_bytes,
            archive_events: false,
            strings: Interner::default(),
            shards: BTreeMap::new(),
        }
    }

    /// From now on, also build the raw event archive of the events applied
    /// or rejected ([`ShardChanges::archive`]).
    pub fn archive_events(&mut self) {
        self.archive_events = true;
    }

    /// Folds a batch of raw event values. Bad events become dead letters.
    pub fn apply_batch(&mut self, batch: &EventBatch) -> BatchStats {
        self.apply_from(batch, 0, false).0
    }

    /// Folds a batch as [`Fold::apply_batch`] does, but where the shard's
    /// events reach a later UTC day than its changes not yet taken, takes
    /// those changes and hands them to `day_end` first. Each write then
    /// holds one day of the shard, so the `DAY#` items it files hold the
    /// values at the end of that day, also when a backlog is read at full
    /// speed. Fails as [`Fold::take_changes`] does.
    pub fn apply_batch_by_day(
        &mut self,
        batch: &EventBatch,
        mut day_end: impl FnMut(ShardChanges),
    ) -> Result<BatchStats, FrameError> {
        let mut stats = BatchStats::default();
        let mut from = 0;
        loop {
            let (part, next_day_at) = self.apply_from(batch, from, true);
            stats.add(part);
            let Some(next) = next_day_at else {
                return Ok(stats);
            };
            if let Some(changes) = self.take_shard_changes(batch.shard)? {
                day_end(changes);
            }
            from = next;
        }
    }

    /// Folds events `from` on; with `by_day`, stops before the first event
    /// of a later UTC day than the shard's untaken changes, and says where.
    fn apply_from(
        &mut self,
        batch: &EventBatch,
        from: usize,
        by_day: bool,
    ) -> (BatchStats, Option<usize>) {
        let mut stats = BatchStats::default();
        let shard = self.shards.entry(batch.shard).or_default();
        let pos = position_slot(&mut shard.positions, &batch.stream);
        // The archive object the stream's events go to now.
        let mut archive: Option<usize> = None;
        for (i, (offset, bytes)) in batch.iter().enumerate().skip(from) {
            if offset <= shard.positions[pos].1 {
                stats.skipped += 1;
                continue;
            }
            let decoded = decode(bytes, self.max_event_bytes);
            if let Ok(event) = &decoded
                && by_day
                && shard
                    .day
                    .is_some_and(|d| utc_day_number(event.timestamp) > d)
                && shard.positions.iter().any(|(_, _, moved)| *moved)
            {
                // Before its position moves: the rest of the batch, and
                // `upto`, wait for the caller.
                return (stats, Some(i));
            }
            shard.positions[pos].1 = offset;
            shard.positions[pos].2 = true;
            let applied = match decoded {
                Ok(event) => {
                    if shard.apply(&mut self.strings, &event, self.low_stock_threshold) {
                        stats.moved_in += 1;
                        shard.moved_in += 1;
                    }
                    shard.day = shard.day.max(Some(utc_day_number(event.timestamp)));
                    stats.applied += 1;
                    true
                }
                Err(rejection) => {
                    let letter = dead_letter(batch, offset, bytes, &rejection);
                    shard.dead_letter_bytes += decoded_size(&letter);
                    shard.dead_letters.push(letter);
                    stats.rejected += 1;
                    false
                }
            };
            if self.archive_events {
                let timestamp = batch.timestamp(i);
                let slot = match archive {
                    Some(slot) if shard.archive.takes(slot, timestamp) => slot,
                    _ => *archive.insert(shard.archive.slot(&batch.stream, batch.shard, timestamp)),
                };
                shard.archive.push(slot, offset, timestamp, bytes, applied);
            }
        }
        if batch.upto > shard.positions[pos].1 {
            shard.positions[pos].1 = batch.upto;
            shard.positions[pos].2 = true;
        }
        (stats, None)
    }

    /// Some shard's changes (dead letters, changed states and the archive
    /// of its events) take about `bytes` or more: the caller should take
    /// them now rather than at the next flush, so that one shard's answer
    /// stays far below a frame (a flush may be asked for only after
    /// hundreds of thousands of events; malformed ones of 100 bytes make
    /// dead letters of ~300). States can be far larger than the events that
    /// change them: 4,400 products with 16 KiB names, each changed by a
    /// small update within one flush, made 72 MB for one shard, more than a
    /// frame.
    pub fn changes_reach(&self, bytes: usize) -> bool {
        self.shards
            .values()
            .any(|s| s.dead_letter_bytes + s.dirty_state_bytes + s.archive.bytes() >= bytes)
    }

    /// Applies one decoded event to a shard, ignoring positions.
    pub fn apply_event(&mut self, shard: Shard, event: &Event<'_>) {
        let threshold = self.low_stock_threshold;
        self.shards
            .entry(shard)
            .or_default()
            .apply(&mut self.strings, event, threshold);
    }

    /// Everything changed since the previous call, as absolute values.
    /// Fails only when a shard's changed states do not fit a frame; the
    /// marks are then gone, so the caller must give up this fold (a worker
    /// exits, and its replacement restores and replays).
    pub fn take_changes(&mut self) -> Result<Vec<ShardChanges>, FrameError> {
        let mut out = Vec::new();
        for (&shard, s) in &mut self.shards {
            let changes = take_shard(&self.strings, shard, s)?;
            if !changes.is_empty() {
                out.push(changes);
            }
        }
        Ok(out)
    }

    /// What changed in one shard since its changes were last taken (as
    /// [`Fold::take_changes`] does for all), if anything did.
    pub fn take_shard_changes(&mut self, shard: Shard) -> Result<Option<ShardChanges>, FrameError> {
        let Some(s) = self.shards.get_mut(&shard) else {
            return Ok(None);
        };
        let changes = take_shard(&self.strings, shard, s)?;
        Ok((!changes.is_empty()).then_some(changes))
    }

    /// Rejected events not yet handed out (for callers that never flush).
    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        self.shards
            .values_mut()
            .flat_map(|s| {
                s.dead_letter_bytes = 0;
                std::mem::take(&mut s.dead_letters)
            })
            .collect()
    }

    /// Loads one chunk of a shard's durable state. The first chunk of a
    /// shard replaces whatever the fold held for it.
    pub fn restore(&mut self, chunk: ShardState, first: bool) {
        if first {
            self.shards.insert(chunk.shard, ShardFold::default());
        }
        let strings = &mut self.strings;
        let shard = self.shards.entry(chunk.shard).or_default();
        for p in chunk.positions {
            let slot = position_slot(&mut shard.positions, &p.stream);
            shard.positions[slot].1 = shard.positions[slot].1.max(p.offset);
        }
        for (id, state) in chunk.products {
            let key = product_key(strings, &id);
            let product = compact_state(strings, &state);
            let c = product.contribution();
            shard.add(c, 1);
            if let Some(&i) = shard.index.get(&key) {
                let old = shard.products[i as usize].1.contribution();
                shard.add(old, -1);
                shard.products[i as usize].1 = product;
            } else {
                shard.index.insert(key, shard.products.len() as u32);
                shard.products.push((key, product));
            }
        }
        for (key, at) in chunk.entity_times {
            let e = match &key {
                EntityKey::Seller(s) => Entity::Seller(strings.intern(s)),
                EntityKey::Category(c) => Entity::Category(strings.intern(c)),
            };
            shard.entities.touch(e, at);
        }
        shard.entities.take_dirty().for_each(drop);
        shard.dirty_products.clear();
        shard.dirty_state_bytes = 0;
        for (_, p) in &mut shard.products {
            p.dirty = false;
        }
    }

    /// Drops a shard (it moved to another owner).
    pub fn release(&mut self, shard: Shard) {
        self.shards.remove(&shard);
    }

    /// Number of products held, over all shards.
    pub fn product_count(&self) -> usize {
        self.shards.values().map(|s| s.products.len()).sum()
    }

    /// Every metric record, entity totals summed over shards, sorted by key.
    pub fn records(&self) -> Vec<MetricRecord> {
        let mut totals: BTreeMap<EntityKey, EntityTotals> = BTreeMap::new();
        let mut out = Vec::new();
        for shard in self.shards.values() {
            for (&e, EntityState { totals: t, .. }) in &shard.entities.map {
                totals
                    .entry(entity_key(&self.strings, e))
                    .or_insert_with(empty_totals)
                    .merge(t);
            }
            for (key, p) in &shard.products {
                if p.low_since != UNKNOWN {
                    out.push(MetricRecord::LowStock(LowStockRecord {
                        seller_id: self.strings.name(p.seller).to_string(),
                        product_id: product_id(&self.strings, *key),
                        name: p.name.as_deref().unwrap_or_default().to_string(),
                        category: sym_name(&self.strings, p.category).to_string(),
                        quantity: p.quantity,
                        price: Money(known_or_zero(p.price) as i128),
                    }));
                }
            }
        }
        out.extend(totals.iter().map(|(k, t)| MetricRecord::entity(k, t)));
        crate::records::sort_records(&mut out);
        out
    }
}

fn empty_totals() -> EntityTotals {
    EntityTotals {
        last_event_at: -1,
        ..EntityTotals::default()
    }
}

fn position_slot(positions: &mut Vec<(Box<str>, Offset, bool)>, stream: &str) -> usize {
    match positions.iter().position(|(s, _, _)| &**s == stream) {
        Some(i) => i,
        None => {
            positions.push((stream.into(), Offset::MIN, false));
            positions.len() - 1
        }
    }
}

/// The longest `detail` a dead letter keeps. A detail may quote the event
/// (an unknown event type, a value that is not a number), whose bytes the
/// dead letter holds whole anyway: uncapped, a 1 MB event type made its
/// dead letter twice the event, and a flush answer twice its events.
const MAX_DETAIL_BYTES: usize = 256;

fn capped_detail(mut detail: String) -> Box<str> {
    if detail.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push('…');
    }
    detail.into()
}

/// A little more than a product's state takes encoded (with its id): its
/// strings and a bound on the rest.
fn state_size_hint(strings: &Interner, key: ProductKey, p: &Product) -> usize {
    let id = if key.0 & TEXT_ID == 0 {
        0
    } else {
        sym_len(strings, (key.0 & !TEXT_ID) as Sym)
    };
    proto::STATE_FIXED_BYTES
        + id
        + sym_len(strings, p.seller)
        + sym_len(strings, p.category)
        + p.name.as_deref().map_or(0, str::len)
}

fn sym_len(strings: &Interner, sym: Sym) -> usize {
    if sym == NO_SYM {
        0
    } else {
        strings.name(sym).len()
    }
}

/// What a dead letter takes in memory once decoded, which is what a frame's
/// decoding limit counts.
fn decoded_size(letter: &DeadLetter) -> usize {
    std::mem::size_of::<DeadLetter>()
        + letter.stream.len()
        + letter.reason.len()
        + letter.detail.len()
        + letter.raw.len()
}

fn dead_letter(
    batch: &EventBatch,
    offset: Offset,
    bytes: &[u8],
    rejection: &Rejection,
) -> DeadLetter {
    DeadLetter {
        stream: batch.stream.clone(),
        shard: batch.shard,
        offset,
        reason: rejection.reason().into(),
        detail: capped_detail(rejection.to_string()),
        raw: bytes.to_vec(),
    }
}

impl ShardFold {
    /// Applies an event. True when it moved a product this shard never
    /// held from another seller (see [`BatchStats::moved_in`]).
    fn apply(&mut self, strings: &mut Interner, e: &Event<'_>, threshold: i64) -> bool {
        let version = Version(e.timestamp * 4 + e.kind as i64);
        self.entities.now = e.timestamp;
        let key = product_key(strings, &e.product_id);
        let (i, is_new) = match self.index.get(&key) {
            Some(&i) => (i, false),
            None => {
                let i = self.products.len() as u32;
                self.index.insert(key, i);
                self.products.push((key, Product::new()));
                (i, true)
            }
        };
        let p = &mut self.products[i as usize].1;
        let before = p.contribution();
        let old_low_since = p.low_since;
        let (was_dirty, seller_before, category_before) = (p.dirty, p.seller, p.category);
        let mut name_replaced = false;
        let mut changed = false;

        let seller = strings.intern(&e.seller);
        let category = e.category.as_deref().map(|c| strings.intern(c));
        changed |= write(&mut p.seller, &mut p.seller_v, seller, version);
        if let Some(c) = category {
            changed |= write(&mut p.category, &mut p.category_v, c, version);
        }
        if let Some(n) = &e.name {
            if version >= p.name_v && p.name.as_deref() != Some(&**n) {
                p.name = Some((**n).into());
                changed = true;
                name_replaced = true;
            }
            changed |= version > p.name_v;
            p.name_v = p.name_v.max(version);
        }
        if let Some(price) = e.price_cents {
            changed |= write(&mut p.price, &mut p.price_v, price, version);
        }
        if let Some(q) = e.quantity {
            changed |= write(&mut p.quantity, &mut p.quantity_v, q, version);
        }
        match e.kind {
            EventKind::Created => {
                changed |= write(&mut p.deleted, &mut p.deleted_v, false, version)
            }
            EventKind::Deleted => changed |= write(&mut p.deleted, &mut p.deleted_v, true, version),
            EventKind::Updated => {}
        }
        let is_low = p.is_low(threshold);
        p.low_since = match (is_low, p.low_since) {
            (false, _) => UNKNOWN,
            (true, UNKNOWN) => e.timestamp,
            (true, since) => since,
        };
        changed |= p.low_since != old_low_since;
        let after = p.contribution();

        if changed && !std::mem::replace(&mut p.dirty, true) {
            self.dirty_products.push(i);
            self.dirty_state_bytes += state_size_hint(strings, key, p);
        } else if was_dirty {
            if p.seller != seller_before {
                self.dirty_state_bytes += sym_len(strings, p.seller);
            }
            if p.category != category_before {
                self.dirty_state_bytes += sym_len(strings, p.category);
            }
            if name_replaced {
                self.dirty_state_bytes += p.name.as_deref().map_or(0, str::len);
            }
        }
        if is_new {
            self.add(after, 1);
        } else if before != after {
            self.entities
                .shift(before.seller, after.seller, Entity::Seller, &before, &after);
            self.entities.shift(
                before.category,
                after.category,
                Entity::Category,
                &before,
                &after,
            );
        }
        // `lastEventAt` goes to the entities the event names, not to the
        // product's category at the moment of applying: that would depend on
        // how the topics interleave.
        self.entities.touch(Entity::Seller(seller), e.timestamp);
        if let Some(c) = category {
            self.entities.touch(Entity::Category(c), e.timestamp);
        }
        if let Some(c) = e
            .old_category
            .as_deref()
            .filter(|&c| Some(c) != e.category.as_deref())
        {
            self.entities
                .touch(Entity::Category(strings.intern(c)), e.timestamp);
        }
        let moved_from = e.old_seller.as_deref().filter(|&s| s != e.seller);
        if let Some(s) = moved_from {
            self.entities
                .touch(Entity::Seller(strings.intern(s)), e.timestamp);
        }
        is_new && moved_from.is_some()
    }

    /// Adds (`sign = 1`) or removes (`-1`) a product's contribution.
    fn add(&mut self, c: Contribution, sign: i64) {
        if c.seller != NO_SYM {
            apply_contribution(self.entities.changed(Entity::Seller(c.seller)), &c, sign);
        }
        if c.category != NO_SYM {
            apply_contribution(
                self.entities.changed(Entity::Category(c.category)),
                &c,
                sign,
            );
        }
    }
}

/// Per-shard seller and category totals, with the list of those changed
/// since the last flush (a flag in the entry, so marking is free).
#[derive(Default)]
struct Entities {
    map: HashMap<Entity, EntityState>,
    dirty: Vec<Entity>,
    /// The timestamp of the event being applied.
    now: i64,
}

struct EntityState {
    totals: EntityTotals,
    dirty: bool,
    /// The largest timestamp of an event that changed the totals or named
    /// the entity ([`ShardChanges::changed_at`]); unlike `lastEventAt` it
    /// follows updates that change a category without naming it.
    changed_at: i64,
}

impl EntityState {
    fn new() -> EntityState {
        EntityState {
            totals: empty_totals(),
            dirty: false,
            changed_at: -1,
        }
    }
}

impl Entities {
    /// The totals of an entity, marked as changed (by the event at `now`).
    fn changed(&mut self, e: Entity) -> &mut EntityTotals {
        let st = self.map.entry(e).or_insert_with(EntityState::new);
        st.changed_at = st.changed_at.max(self.now);
        if !std::mem::replace(&mut st.dirty, true) {
            self.dirty.push(e);
        }
        &mut st.totals
    }

    /// The entity was named by an event at `timestamp`.
    fn touch(&mut self, e: Entity, timestamp: i64) {
        let st = self.map.entry(e).or_insert_with(EntityState::new);
        st.changed_at = st.changed_at.max(timestamp);
        if timestamp > st.totals.last_event_at {
            st.totals.last_event_at = timestamp;
            if !std::mem::replace(&mut st.dirty, true) {
                self.dirty.push(e);
            }
        }
    }

    /// Moves a product's contribution from `before` to `after` for one kind
    /// of entity (`from`/`to` are the symbols, `NO_SYM` for none): one lookup
    /// when the product stays in the same entity.
    fn shift(
        &mut self,
        from: Sym,
        to: Sym,
        kind: fn(Sym) -> Entity,
        before: &Contribution,
        after: &Contribution,
    ) {
        if from == to {
            if to != NO_SYM {
                let t = self.changed(kind(to));
                apply_contribution(t, before, -1);
                apply_contribution(t, after, 1);
            }
            return;
        }
        if from != NO_SYM {
            apply_contribution(self.changed(kind(from)), before, -1);
        }
        if to != NO_SYM {
            apply_contribution(self.changed(kind(to)), after, 1);
        }
    }

    /// The changed entities with their totals and change times; clears
    /// the marks.
    fn take_dirty(&mut self) -> impl Iterator<Item = (Entity, EntityTotals, i64)> + '_ {
        let map = &mut self.map;
        self.dirty.drain(..).filter_map(move |e| {
            let st = map.get_mut(&e)?;
            st.dirty = false;
            Some((e, st.totals, st.changed_at))
        })
    }
}

/// Adds (`sign = 1`) or removes (`-1`) one product's contribution.
fn apply_contribution(t: &mut EntityTotals, c: &Contribution, sign: i64) {
    let s = sign as i128;
    t.products = t.products.wrapping_add_signed(sign);
    if c.deleted {
        t.deleted = t.deleted.wrapping_add_signed(sign);
    } else {
        t.active = t.active.wrapping_add_signed(sign);
        t.value_cents += s * c.value_cents;
        t.price_sum_cents += s * c.price_cents;
        if c.low {
            t.low_stock = t.low_stock.wrapping_add_signed(sign);
        }
    }
}

/// Writes a register if the version is at least its own; true if the value
/// or the version changed. A newer version with the same value must reach
/// storage too: after a restore, an older event on another topic (a delete
/// replayed after a re-create with identical data) would otherwise win.
fn write<T: PartialEq>(value: &mut T, current: &mut Version, new: T, version: Version) -> bool {
    if version < *current {
        return false;
    }
    let bumped = version > *current;
    *current = version;
    if *value == new {
        return bumped;
    }
    *value = new;
    true
}

fn known_or_zero(v: i64) -> i64 {
    if v == UNKNOWN { 0 } else { v }
}

impl Product {
    fn new() -> Product {
        Product {
            price: UNKNOWN,
            quantity: UNKNOWN,
            low_since: UNKNOWN,
            seller_v: Version::NONE,
            category_v: Version::NONE,
            name_v: Version::NONE,
            price_v: Version::NONE,
            quantity_v: Version::NONE,
            deleted_v: Version::NONE,
            name: None,
            seller: NO_SYM,
            category: NO_SYM,
            listed: NO_SYM,
            deleted: false,
            dirty: false,
        }
    }

    fn is_low(&self, threshold: i64) -> bool {
        !self.deleted && self.quantity != UNKNOWN && self.quantity < threshold
    }

    fn contribution(&self) -> Contribution {
        let price = known_or_zero(self.price) as i128;
        Contribution {
            seller: self.seller,
            category: self.category,
            deleted: self.deleted,
            value_cents: price * known_or_zero(self.quantity) as i128,
            price_cents: price,
            low: self.low_since != UNKNOWN,
        }
    }
}

fn product_key(strings: &mut Interner, id: &ProductId) -> ProductKey {
    match id {
        ProductId::Num(n) if *n < TEXT_ID => ProductKey(*n),
        ProductId::Num(n) => ProductKey(TEXT_ID | strings.intern(&n.to_string()) as u64),
        ProductId::Text(t) => ProductKey(TEXT_ID | strings.intern(t) as u64),
    }
}

fn product_id(strings: &Interner, key: ProductKey) -> ProductId {
    if key.0 & TEXT_ID == 0 {
        return ProductId::Num(key.0);
    }
    let text = strings.name((key.0 & !TEXT_ID) as Sym);
    match text.parse::<u64>() {
        Ok(n) if n >= TEXT_ID => ProductId::Num(n),
        _ => ProductId::Text(text.into()),
    }
}

fn sym_name(strings: &Interner, sym: Sym) -> &str {
    if sym == NO_SYM { "" } else { strings.name(sym) }
}

fn entity_key(strings: &Interner, e: Entity) -> EntityKey {
    match e {
        Entity::Seller(s) => EntityKey::Seller(strings.name(s).into()),
        Entity::Category(c) => EntityKey::Category(strings.name(c).into()),
    }
}

fn field<T>(value: Option<T>, version: Version) -> Field<T> {
    Field { value, version }
}

fn known(v: i64) -> Option<i64> {
    (v != UNKNOWN).then_some(v)
}

fn wire_state<'a>(strings: &'a Interner, p: &'a Product) -> ProductStateOf<&'a str> {
    let sym = |s: Sym| (s != NO_SYM).then(|| strings.name(s));
    ProductStateOf {
        seller: field(sym(p.seller), p.seller_v),
        category: field(sym(p.category), p.category_v),
        name: field(p.name.as_deref(), p.name_v),
        price_cents: field(known(p.price), p.price_v),
        quantity: field(known(p.quantity), p.quantity_v),
        deleted: field(Some(p.deleted), p.deleted_v),
        low_stock_since: known(p.low_since),
    }
}

/// A listed product's low-stock item.
fn low_stock_item(strings: &Interner, key: ProductKey, p: &Product) -> LowStockItem {
    LowStockItem {
        product_id: product_id(strings, key),
        seller_id: sym_name(strings, p.seller).into(),
        name: p.name.as_deref().unwrap_or_default().into(),
        category: sym_name(strings, p.category).into(),
        quantity: known_or_zero(p.quantity),
        price_cents: known_or_zero(p.price),
        since: p.low_since,
    }
}

fn compact_state(strings: &mut Interner, s: &ProductState) -> Product {
    let mut sym = |v: &Option<Box<str>>| v.as_deref().map_or(NO_SYM, |n| strings.intern(n));
    let seller = sym(&s.seller.value);
    Product {
        seller,
        listed: if s.low_stock_since.is_some() {
            seller
        } else {
            NO_SYM
        },
        category: sym(&s.category.value),
        price: s.price_cents.value.unwrap_or(UNKNOWN),
        quantity: s.quantity.value.unwrap_or(UNKNOWN),
        low_since: s.low_stock_since.unwrap_or(UNKNOWN),
        seller_v: s.seller.version,
        category_v: s.category.version,
        name_v: s.name.version,
        price_v: s.price_cents.version,
        quantity_v: s.quantity.version,
        deleted_v: s.deleted.version,
        name: s.name.value.clone(),
        deleted: s.deleted.value.unwrap_or(false),
        dirty: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new fold restored from one flush of shard changes, as a restarted
    /// worker is from storage.
    fn restored_from(changes: &ShardChanges) -> Fold {
        let mut fold = Fold::new(10, 1 << 20);
        fold.restore(
            ShardState {
                shard: changes.shard,
                positions: changes.positions.clone(),
                products: changes.products.decode().unwrap(),
                entity_times: Vec::new(),
                last: true,
            },
            true,
        );
        fold
    }

    fn batch(events: &[&str]) -> EventBatch {
        let mut b = EventBatch::new(0, "test".into());
        for (i, e) in events.iter().enumerate() {
            b.push(i as Offset, e.as_bytes());
        }
        b
    }

    /// A worker takes a shard's changes where its events reach a new UTC
    /// day (by event time), so each write holds one day of the shard and
    /// its `DAY#` items hold that day's closing values. A late event of an
    /// earlier day starts no new window, also when it is the first after a
    /// take. Each changed entity carries the newest event that changed it.
    #[test]
    fn a_batch_stops_where_its_shard_reaches_a_new_day() {
        const DAY: i64 = 86_400_000;
        let day1 = 20_000 * DAY; // 2024-10-04
        let created = |id: u32, ts: i64| {
            format!(
                r#"{{"eventType":"ProductCreated","timestamp":{ts},"data":{{"productId":{id},"sellerId":"s1","category":"Books","price":1,"quantity":50}}}}"#
            )
        };
        let events = [
            created(1, day1 + 5),
            created(2, day1 + DAY - 1),
            created(3, day1 + DAY),     // the next day
            created(4, day1 + 7),       // late, of the first day
            created(5, day1 + 2 * DAY), // the day after
            created(6, day1 + DAY + 9), // late, and the first after a take
            created(7, day1 + 2 * DAY + 3),
            // A contract price change names no category: the category's
            // lastEventAt stays, its change time moves.
            format!(
                r#"{{"eventType":"ProductUpdated","timestamp":{},"data":{{"productId":7,"sellerId":"s1","changes":{{"price":{{"old":1,"new":2}}}}}}}}"#,
                day1 + 2 * DAY + 60
            ),
        ];
        let refs: Vec<&str> = events.iter().map(String::as_str).collect();
        let mut b = batch(&refs);
        b.upto = 20;
        let mut fold = Fold::new(10, 1 << 20);
        // (products, lastEventAt, change time) of an entity in a window.
        let of = |changes: &[ShardChanges], key: EntityKey| {
            let c = &changes[0];
            let i = c.entities.iter().position(|(k, _)| *k == key)?;
            let t = c.entities[i].1;
            Some((t.products, t.last_event_at, c.changed_at[i]))
        };
        let seller = || EntityKey::Seller("s1".into());
        let books = || EntityKey::Category("Books".into());

        let mut day_ends = Vec::new();
        let stats = fold
            .apply_batch_by_day(&b, |c| day_ends.push(vec![c]))
            .unwrap();
        assert_eq!(stats.applied, 8);
        // Two day ends: before event 2 (day 2) and before event 4 (day 3);
        // the late events 3 and 5 start none.
        assert_eq!(day_ends.len(), 2);
        assert_eq!(day_ends[0][0].positions[0].offset, 1, "nothing of day 2");
        let end_of_day1 = (2, day1 + DAY - 1, day1 + DAY - 1);
        assert_eq!(of(&day_ends[0], seller()), Some(end_of_day1));
        assert_eq!(day_ends[1][0].positions[0].offset, 3);
        let end_of_day2 = (4, day1 + DAY, day1 + DAY);
        assert_eq!(of(&day_ends[1], seller()), Some(end_of_day2));

        let window = fold.take_changes().unwrap();
        assert_eq!(
            window[0].positions[0].offset, 20,
            "upto, once the batch is done"
        );
        let last = day1 + 2 * DAY + 60;
        assert_eq!(of(&window, books()), Some((7, day1 + 2 * DAY + 3, last)));
        // `apply_batch` applies it all, whatever the days.
        let mut whole = Fold::new(10, 1 << 20);
        assert_eq!(whole.apply_batch(&b).applied, 8);
        assert_eq!(whole.records(), fold.records());
    }

    /// The worked check of DESIGN §3, in the contract dialect and then in the
    /// backend dialect: both must give the same records.
    #[test]
    fn worked_check_of_design_section_3() {
        let contract = [
            r#"{"eventType":"ProductCreated","timestamp":1000,"data":{"productId":"A","sellerId":"s1","name":"Alpha","category":"Books","price":30.00,"quantity":2}}"#,
            r#"{"eventType":"ProductCreated","timestamp":2000,"data":{"productId":"B","sellerId":"s1","name":"Beta","category":"Books","price":10.00,"quantity":5}}"#,
            r#"{"eventType":"ProductUpdated","timestamp":3000,"data":{"productId":"A","sellerId":"s1","changes":{"price":{"old":30,"new":15},"quantity":{"old":2,"new":8},"category":{"old":"Books","new":"Games"}}}}"#,
            r#"{"eventType":"ProductDeleted","timestamp":4000,"data":{"productId":"B","sellerId":"s1","name":"Beta","category":"Books","deletedAt":"x"}}"#,
        ];
        let backend = [
            contract[0],
            contract[1],
            r#"{"eventType":"ProductUpdated","timestamp":3000,"data":{"productId":"A","sellerId":"s1","name":"Alpha","category":"Games","price":"15.00","quantity":8,
                "previousData":{"id":"A","seller_id":"s1","name":"Alpha","category":"Books","price":"30.00","quantity":2}}}"#,
            r#"{"eventType":"ProductDeleted","timestamp":4000,"data":{"productId":"B","sellerId":"s1","name":"Beta","category":"Books","price":"10.00","quantity":5}}"#,
        ];
        let expected: Vec<String> = [
            r#"{"type":"category","category":"Books","totalProducts":0,"totalValue":"0.00","averagePrice":"0.00","lastEventAt":4000}"#,
            r#"{"type":"category","category":"Games","totalProducts":1,"totalValue":"120.00","averagePrice":"15.00","lastEventAt":3000}"#,
            r#"{"type":"lowStock","sellerId":"s1","productId":"A","name":"Alpha","category":"Games","quantity":8,"price":"15.00"}"#,
            r#"{"type":"seller","sellerId":"s1","totalProducts":2,"activeProducts":1,"deletedProducts":1,"totalValue":"120.00","lowStockCount":1,"lastEventAt":4000}"#,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for events in [contract, backend] {
            let mut fold = Fold::new(10, 1 << 20);
            let stats = fold.apply_batch(&batch(&events));
            assert_eq!(
                stats,
                BatchStats {
                    applied: 4,
                    rejected: 0,
                    skipped: 0,
                    moved_in: 0,
                }
            );
            let lines: Vec<String> = fold
                .records()
                .iter()
                .map(MetricRecord::to_json_line)
                .collect();
            assert_eq!(lines, expected);
        }
    }

    /// An update naming another previous seller counts as a move into the
    /// shard only when the shard never held the product: held, the product
    /// simply moves within the shard.
    #[test]
    fn seller_moves_into_a_shard_that_never_held_the_product_are_counted() {
        let created = r#"{"eventType":"ProductCreated","timestamp":1000,"data":{"productId":1,"sellerId":"s1","category":"C","price":1,"quantity":5}}"#;
        let moved = |id: u32, ts: u32| {
            format!(
                r#"{{"eventType":"ProductUpdated","timestamp":{ts},"data":{{"productId":{id},"sellerId":"s2","changes":{{"sellerId":{{"old":"s1","new":"s2"}}}}}}}}"#
            )
        };
        let backend = r#"{"eventType":"ProductUpdated","timestamp":4000,"data":{"productId":3,"sellerId":"s2","category":"C","price":"1.00","quantity":5,
            "previousData":{"id":3,"seller_id":"s2","category":"C","price":"2.00","quantity":5}}}"#;
        let (held, unknown) = (moved(1, 2000), moved(2, 3000));
        let mut fold = Fold::new(10, 1 << 20);
        let stats = fold.apply_batch(&batch(&[created, &held, &unknown, backend]));
        assert_eq!((stats.applied, stats.moved_in), (4, 1), "{stats:?}");
        // Reported with the next flush's changes, once.
        let moved = |changes: Vec<ShardChanges>| changes.iter().map(|c| c.moved_in).sum::<u64>();
        assert_eq!(moved(fold.take_changes().expect("fits")), 1);
        assert_eq!(moved(fold.take_changes().expect("fits")), 0);
    }

    /// A re-create with the same data only moves the `deleted` register's
    /// version. That version must be flushed: restored elsewhere, the older
    /// delete (another topic, replayed after the restore) must still lose.
    #[test]
    fn a_version_only_change_survives_flush_and_restore() {
        let created = |ts: i64| {
            format!(
                r#"{{"eventType":"ProductCreated","timestamp":{ts},"data":{{"productId":7,"sellerId":"s","name":"N","category":"c","price":1.00,"quantity":50}}}}"#
            )
        };
        let delete = r#"{"eventType":"ProductDeleted","timestamp":2000,"data":{"productId":7,"sellerId":"s","name":"N","category":"c"}}"#;
        let (first, second) = (created(1000), created(3000));

        let mut before_crash = Fold::new(10, 1 << 20);
        before_crash.apply_batch(&batch(&[&first]));
        before_crash.take_changes().unwrap();
        before_crash.apply_batch(&batch(&[&first, &second]));
        let flushed = before_crash.take_changes().unwrap();
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].products.count, 1, "the version bump is flushed");

        // Restore what the two flushes hold, then the delete arrives.
        let mut restored = restored_from(&flushed[0]);
        let mut deletes = EventBatch::new(0, "deleted".into());
        deletes.push(0, delete.as_bytes());
        restored.apply_batch(&deletes);

        let mut straight = Fold::new(10, 1 << 20);
        straight.apply_batch(&batch(&[&first, &second, delete]));
        let active = |f: &Fold| {
            f.records().iter().find_map(|r| match r {
                MetricRecord::Seller(s) => Some((s.active_products, s.deleted_products)),
                _ => None,
            })
        };
        assert_eq!(active(&straight), Some((1, 0)));
        assert_eq!(active(&restored), active(&straight));
    }

    #[test]
    fn money_is_exact_after_a_million_add_and_remove_cycles() {
        let mut fold = Fold::new(10, 1 << 20);
        let mut b = EventBatch::new(0, "t".into());
        for i in 0..1_000_000i64 {
            let (kind, qty) = if i % 2 == 0 {
                ("ProductCreated", 3)
            } else {
                ("ProductDeleted", 3)
            };
            let e = format!(
                r#"{{"eventType":"{kind}","timestamp":{i},"data":{{"productId":1,"sellerId":"s","category":"c","price":29.99,"quantity":{qty}}}}}"#
            );
            b.push(i, e.as_bytes());
        }
        fold.apply_batch(&b);
        let records = fold.records();
        let seller = records.iter().find_map(|r| match r {
            MetricRecord::Seller(s) => Some(s.clone()),
            _ => None,
        });
        assert_eq!(seller.map(|s| s.total_value), Some(Money(0)));
    }

    #[test]
    fn bad_events_become_dead_letters_and_advance_the_position() {
        let mut fold = Fold::new(10, 1 << 20);
        let stats = fold.apply_batch(&batch(&[
            "nope",
            r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","category":"c","price":1,"quantity":1}}"#,
        ]));
        assert_eq!(
            stats,
            BatchStats {
                applied: 1,
                rejected: 1,
                skipped: 0,
                moved_in: 0,
            }
        );
        let changes = fold.take_changes().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].dead_letters.len(), 1);
        assert_eq!(&*changes[0].dead_letters[0].reason, "invalid_json");
        assert_eq!(changes[0].dead_letters[0].raw, b"nope");
        assert_eq!(
            changes[0].positions,
            vec![Position {
                stream: "test".into(),
                offset: 1
            }]
        );
        assert!(
            fold.take_changes().unwrap().is_empty(),
            "changes are handed out once"
        );
    }

    #[test]
    fn a_detail_quoting_a_large_event_is_cut_and_the_raw_bytes_are_kept() {
        let mut fold = Fold::new(10, 1 << 20);
        let kind = "é".repeat(100_000); // two bytes a char: cuts fall inside one
        let line = format!(r#"{{"eventType":"{kind}","timestamp":1,"data":{{}}}}"#);
        fold.apply_batch(&batch(&[line.as_str(), "nope"]));
        let changes = fold.take_changes().unwrap();
        let letters = &changes[0].dead_letters;
        assert_eq!(&*letters[0].reason, "unknown_event_type");
        assert_eq!(letters[0].raw, line.as_bytes());
        let detail = &*letters[0].detail;
        assert!(
            detail.len() <= MAX_DETAIL_BYTES + '…'.len_utf8(),
            "{}",
            detail.len()
        );
        assert!(detail.ends_with("éé…"), "{detail}");
        // A short detail stays as it is.
        assert!(!letters[1].detail.ends_with('…'), "{}", letters[1].detail);
    }

    #[test]
    fn dead_letter_bytes_count_per_shard_until_the_changes_are_taken() {
        let mut fold = Fold::new(10, 1 << 20);
        let bad = "x".repeat(1000);
        fold.apply_batch(&batch(&[bad.as_str(), bad.as_str()]));
        assert!(
            fold.changes_reach(2000),
            "two letters of 1000 bytes and more"
        );
        assert!(!fold.changes_reach(4000));
        let letters = &fold.take_changes().unwrap()[0].dead_letters;
        assert_eq!(letters.len(), 2);
        assert!(!fold.changes_reach(1), "taken with the changes");
    }

    #[test]
    fn changed_states_count_once_per_product_plus_the_strings_they_take_on() {
        let mut fold = Fold::new(10, 1 << 20);
        let created = |id: u32, name: &str| {
            format!(
                r#"{{"eventType":"ProductCreated","timestamp":{id},"data":{{"productId":{id},"sellerId":"s","name":"{name}","category":"c","price":1,"quantity":50}}}}"#
            )
        };
        let updated = |id: u32, ts: u32, name: &str| {
            format!(
                r#"{{"eventType":"ProductUpdated","timestamp":{ts},"data":{{"productId":{id},"sellerId":"s","name":"{name}","changes":{{"price":{{"old":1,"new":{ts}}}}}}}}}"#
            )
        };
        let mut offset = 0;
        let mut apply = |fold: &mut Fold, events: &[String]| {
            let mut b = EventBatch::new(0, "test".into());
            for e in events {
                b.push(offset, e.as_bytes());
                offset += 1;
            }
            assert_eq!(fold.apply_batch(&b).applied, events.len() as u64);
        };
        let big = "n".repeat(10_000);
        apply(&mut fold, &[created(1, &big), created(2, "small")]);
        let counted = fold.shards[&0].dirty_state_bytes;
        assert!((10_005..10_500).contains(&counted), "{counted}");
        // Updates of dirty products that keep their strings add nothing...
        let same: Vec<String> = (10..20).map(|ts| updated(1, ts, &big)).collect();
        apply(&mut fold, &same);
        assert_eq!(fold.shards[&0].dirty_state_bytes, counted);
        // ...a name one takes on adds its length.
        apply(&mut fold, &[updated(2, 30, &"m".repeat(15_000))]);
        assert_eq!(fold.shards[&0].dirty_state_bytes, counted + 15_000);
        assert!(fold.changes_reach(25_000) && !fold.changes_reach(30_000));
        fold.take_changes().unwrap();
        assert!(!fold.changes_reach(1), "taken with the changes");
    }

    #[test]
    fn upto_advances_a_shard_without_events() {
        let mut fold = Fold::new(10, 1 << 20);
        let mut b = batch(&[
            r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s"}}"#,
        ]);
        b.upto = 10;
        fold.apply_batch(&b);
        let mut empty = EventBatch::new(0, "test".into());
        empty.upto = 20;
        fold.apply_batch(&empty);
        let changes = fold.take_changes().unwrap();
        assert_eq!(
            changes[0].positions,
            vec![Position {
                stream: "test".into(),
                offset: 20
            }]
        );
        // Events at or below it are now replays.
        assert_eq!(
            fold.apply_batch(&batch(&["nope"])),
            BatchStats {
                applied: 0,
                rejected: 0,
                skipped: 1,
                moved_in: 0,
            }
        );
    }

    /// The offsets of the lines of an archive object.
    fn archived_offsets(range: &proto::ArchivedEvents) -> Vec<i64> {
        use std::io::Read;
        let mut text = String::new();
        flate2::read::GzDecoder::new(&range.gzip[..])
            .read_to_string(&mut text)
            .unwrap();
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["offset"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn archive_objects_follow_each_other_without_gaps_or_replays() {
        let e = |id: u32| {
            format!(
                r#"{{"eventType":"ProductCreated","timestamp":1,"data":{{"productId":{id},"sellerId":"s","category":"c","price":1,"quantity":1}}}}"#
            )
        };
        let at = |offsets: std::ops::Range<i64>, bad: i64| {
            let mut b = EventBatch::new(0, "test".into());
            for o in offsets {
                let text = if o == bad {
                    "not json".to_string()
                } else {
                    e(o as u32)
                };
                b.push_at(o, 1_696_176_060_000 + o, text.as_bytes());
            }
            b
        };
        let mut fold = Fold::new(10, 1 << 20);
        fold.archive_events();
        fold.apply_batch(&at(0..5, 3));
        fold.apply_batch(&at(5..8, -1));
        let first = fold.take_changes().unwrap();
        assert_eq!(first[0].archive.len(), 1);
        let a = &first[0].archive[0];
        assert_eq!(
            (&*a.stream, a.shard, a.first_offset, a.last_offset, a.events),
            ("test", 0, 0, 7, 8)
        );
        assert_eq!(a.time_ms, 1_696_176_060_000);
        // The rejected event is archived too (as raw text).
        assert_eq!(archived_offsets(a), (0..8).collect::<Vec<_>>());
        // A replay of what was applied is not archived again; what follows is.
        fold.apply_batch(&at(6..10, -1));
        let second = fold.take_changes().unwrap();
        assert_eq!(archived_offsets(&second[0].archive[0]), vec![8, 9]);
        assert_eq!(second[0].archive[0].first_offset, 8);
        // Nothing new: no object.
        fold.apply_batch(&at(0..10, -1));
        assert!(fold.take_changes().unwrap().is_empty());
        // A restore drops what was not taken: the new owner's replay
        // archives it.
        fold.apply_batch(&at(10..12, -1));
        fold.restore(
            ShardState {
                shard: 0,
                positions: vec![Position {
                    stream: "test".into(),
                    offset: 9,
                }],
                ..ShardState::default()
            },
            true,
        );
        fold.apply_batch(&at(10..13, -1));
        let third = fold.take_changes().unwrap();
        assert_eq!(archived_offsets(&third[0].archive[0]), vec![10, 11, 12]);
        // Without archiving (a file source), no objects.
        let mut plain = Fold::new(10, 1 << 20);
        plain.apply_batch(&at(0..3, -1));
        assert!(plain.take_changes().unwrap()[0].archive.is_empty());
    }

    #[test]
    fn an_archive_object_holds_one_hour_of_its_stream() {
        const HOUR: i64 = 3_600_000;
        let t0 = 1_696_176_000_000 - 1_696_176_000_000 % HOUR; // 16:00 UTC
        let event = br#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","category":"c","price":1,"quantity":1}}"#;
        let mut b = EventBatch::new(0, "test".into());
        let mut other = EventBatch::new(0, "other".into());
        // 16:59, 17:00, a late 16:59, one without a timestamp, 19:30, and
        // another stream's 16:10 after them all.
        for (o, at) in [(0, t0 + HOUR - 1), (1, t0 + HOUR), (2, t0 + HOUR - 5)]
            .into_iter()
            .chain([(3, proto::NO_TIMESTAMP), (4, t0 + 3 * HOUR + HOUR / 2)])
        {
            b.push_at(o, at, event);
        }
        other.push_at(7, t0 + HOUR / 6, event);
        let mut fold = Fold::new(10, 1 << 20);
        fold.archive_events();
        fold.apply_batch(&b);
        fold.apply_batch(&other);
        let changes = fold.take_changes().unwrap();
        let objects: Vec<_> = changes[0]
            .archive
            .iter()
            .map(|a| (&*a.stream, a.hour() - t0 / HOUR, archived_offsets(a)))
            .collect();
        assert_eq!(
            objects,
            vec![
                ("test", 0, vec![0]),
                ("test", 1, vec![1, 2, 3]),
                ("test", 3, vec![4]),
                ("other", 0, vec![7]),
            ]
        );
    }

    #[test]
    fn archived_events_count_toward_an_early_take() {
        // One product's event again and again (a producer retrying): it
        // changes no state after the first, but every copy is archived.
        // An ignored field of pseudo-random letters keeps them from
        // compressing away.
        let mut seed = 7u64;
        let mut noise = || {
            (0..2000)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    char::from(b'a' + (seed >> 59) as u8)
                })
                .collect::<String>()
        };
        let mut b = EventBatch::new(0, "test".into());
        for o in 0..4000 {
            let e = format!(
                r#"{{"eventType":"ProductCreated","timestamp":1,"note":"{}","data":{{"productId":1,"sellerId":"s","category":"c","price":1,"quantity":1}}}}"#,
                noise()
            );
            b.push_at(o, 1, e.as_bytes());
        }
        let limit = 2 << 20;
        let mut plain = Fold::new(10, 1 << 20);
        plain.apply_batch(&b);
        assert!(!plain.changes_reach(limit), "one product's state is small");
        let mut fold = Fold::new(10, 1 << 20);
        fold.archive_events();
        fold.apply_batch(&b);
        assert!(fold.changes_reach(limit), "8 MB of events archived");
        fold.take_changes().unwrap();
        assert!(!fold.changes_reach(1));
    }

    #[test]
    fn an_unchanged_replay_dirties_nothing() {
        let e = r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","category":"c","price":1,"quantity":1}}"#;
        let mut fold = Fold::new(10, 1 << 20);
        fold.apply_event(0, &crate::decode::decode(e.as_bytes(), 1 << 20).unwrap());
        fold.take_changes().unwrap();
        fold.apply_event(0, &crate::decode::decode(e.as_bytes(), 1 << 20).unwrap());
        assert!(fold.take_changes().unwrap().is_empty());
    }

    #[test]
    fn low_stock_puts_and_deletes_follow_what_was_listed_at_the_last_flush() {
        let ev = |ts: i64, seller: &str, qty: i64| {
            format!(
                r#"{{"eventType":"ProductUpdated","timestamp":{ts},"data":{{"productId":7,"sellerId":"{seller}","name":"Lamp","category":"Home","price":"2.50","quantity":{qty}}}}}"#
            )
        };
        let low = |changes: &[ShardChanges]| changes[0].low_stock.clone();
        let put = |seller: &str, qty: i64, since: i64| {
            LowStockChange::Put(LowStockItem {
                product_id: ProductId::Num(7),
                seller_id: seller.into(),
                name: "Lamp".into(),
                category: "Home".into(),
                quantity: qty,
                price_cents: 250,
                since,
            })
        };
        let delete = |seller: &str| LowStockChange::Delete {
            seller_id: seller.into(),
            product_id: ProductId::Num(7),
        };
        let mut fold = Fold::new(10, 1 << 20);
        let mut offset = 0;
        let mut apply = |fold: &mut Fold, e: String| {
            let mut b = EventBatch::new(0, "test".into());
            b.push(offset, e.as_bytes());
            offset += 1;
            fold.apply_batch(&b);
        };

        apply(&mut fold, ev(1, "s1", 3));
        assert_eq!(low(&fold.take_changes().unwrap()), [put("s1", 3, 1)]);
        // Still listed: the item is written again with the new quantity.
        apply(&mut fold, ev(2, "s1", 4));
        assert_eq!(low(&fold.take_changes().unwrap()), [put("s1", 4, 1)]);
        // Moved to another seller: the old item goes, the new one comes.
        apply(&mut fold, ev(3, "s2", 4));
        let changes = fold.take_changes().unwrap();
        assert_eq!(low(&changes), [delete("s1"), put("s2", 4, 1)]);

        // A restored worker knows the product is listed under s2.
        let mut restored = restored_from(&changes[0]);
        apply(&mut restored, ev(4, "s2", 40));
        assert_eq!(low(&restored.take_changes().unwrap()), [delete("s2")]);
        // Not listed, and not on the list: nothing to say.
        apply(&mut restored, ev(5, "s2", 41));
        assert!(low(&restored.take_changes().unwrap()).is_empty());
    }
}
