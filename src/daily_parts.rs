//! Each shard's contribution to one seller or category as it stood at the
//! end of every UTC day it wrote in: what makes a category's `DAY#` item its
//! value "as at the end of that UTC day" (DESIGN §6) although its
//! partitions reach midnight at different times, and one partition may be
//! read hours behind another.
//!
//! A worker cuts a shard's writes where its events reach a new UTC day, so
//! the last write of a shard filed under day `d` holds that shard's
//! contribution at the end of `d`. The entity's `DAY#d` item is then the sum,
//! over shards, of each shard's latest entry at or before `d`. A shard that
//! writes an earlier day after another shard wrote a later one changes the
//! later day's sum too: [`DailyParts::days_from`] lists the items to redo.
//!
//! Both stores keep these entries: the embedded store in a table of its own,
//! the AWS store inside the entity's parts item.

use proto::{EntityTotals, Shard, utc_day_number};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A shard's contribution to one entity at the end of each day it wrote in,
/// by (shard, UTC day number).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyParts {
    entries: BTreeMap<(Shard, i64), EntityTotals>,
    /// The first day whose sum is still exact: [`prune`](Self::prune)
    /// dropped what days before it need. Only grows.
    exact_from: i64,
}

impl Default for DailyParts {
    fn default() -> Self {
        DailyParts {
            entries: BTreeMap::new(),
            exact_from: i64::MIN,
        }
    }
}

impl DailyParts {
    pub fn from_entries(
        entries: impl IntoIterator<Item = ((Shard, i64), EntityTotals)>,
        exact_from: i64,
    ) -> Self {
        DailyParts {
            entries: entries.into_iter().collect(),
            exact_from,
        }
    }

    pub fn exact_from(&self) -> i64 {
        self.exact_from
    }

    pub fn entries(&self) -> impl Iterator<Item = (&(Shard, i64), &EntityTotals)> {
        self.entries.iter()
    }

    pub fn get(&self, key: &(Shard, i64)) -> Option<&EntityTotals> {
        self.entries.get(key)
    }

    /// One shard's new part, filed under `day` ([`record`](Self::record)),
    /// then a [`prune`](Self::prune); returns the `DAY#` items it changes,
    /// (day number, the entity at the end of that day) for each of
    /// [`days_from`](Self::days_from), taken before the prune. A store
    /// applies the changes of a write one by one, in order, so its items do
    /// not depend on how the changes were batched into writes; a later item
    /// of a day replaces an earlier one.
    pub fn apply(
        &mut self,
        shard: Shard,
        day: i64,
        totals: EntityTotals,
        retain_days: i64,
    ) -> Vec<(i64, EntityTotals)> {
        let day = self.record(shard, day, totals);
        let items = self
            .days_from(day)
            .into_iter()
            .map(|d| (d, self.at_end_of(d)))
            .collect();
        self.prune(retain_days);
        items
    }

    /// The shard's contribution after a write filed under `day`, or under
    /// the shard's latest day when that is later; returns the day used.
    /// (A late event can file under an earlier day after a restart, which
    /// forgets the change times; a shard's days must not go back.)
    pub fn record(&mut self, shard: Shard, day: i64, totals: EntityTotals) -> i64 {
        let day = self.latest_day(shard).map_or(day, |latest| latest.max(day));
        self.entries.insert((shard, day), totals);
        day
    }

    fn latest_day(&self, shard: Shard) -> Option<i64> {
        self.entries
            .range((shard, i64::MIN)..=(shard, i64::MAX))
            .next_back()
            .map(|(&(_, d), _)| d)
    }

    /// A shard whose current contribution predates this record (written by
    /// a build that kept none) counts from the day of its last event. Call
    /// it before the shard's next part replaces that contribution. Its
    /// values before that day are unknown, so the days before are no
    /// longer exact.
    pub fn seed(&mut self, shard: Shard, current: &EntityTotals) {
        if self.latest_day(shard).is_none() {
            let day = match current.last_event_at {
                ms if ms >= 0 => utc_day_number(ms),
                _ => i64::MIN,
            };
            self.entries.insert((shard, day), *current);
            self.exact_from = self.exact_from.max(day);
        }
    }

    /// The entity's totals at the end of `day`: every shard's latest entry
    /// at or before it.
    pub fn at_end_of(&self, day: i64) -> EntityTotals {
        let mut sum = EntityTotals {
            last_event_at: -1,
            ..EntityTotals::default()
        };
        let mut shard = None;
        // Entries come by shard, then day: the last one of a shard at or
        // before `day` is its value then.
        let mut latest: Option<&EntityTotals> = None;
        for (&(s, d), totals) in &self.entries {
            if shard != Some(s) {
                if let Some(t) = latest.take() {
                    sum.merge(t);
                }
                shard = Some(s);
            }
            if d <= day {
                latest = Some(totals);
            }
        }
        if let Some(t) = latest {
            sum.merge(t);
        }
        sum
    }

    /// The `DAY#` items a write filed under `day` changes: the days at or
    /// after it that some shard wrote in, from the first exact day on
    /// (before it the other shards' values are no longer kept, and such a
    /// day's item keeps what it had). A store writes them before it prunes.
    pub fn days_from(&self, day: i64) -> BTreeSet<i64> {
        let day = day.max(self.exact_from);
        self.entries
            .keys()
            .map(|&(_, d)| d)
            .filter(|&d| d >= day)
            .collect()
    }

    /// Drops entries no `DAY#` item can need again, and returns their keys.
    /// A shard never files a part under a day before its latest (see
    /// [`record`](Self::record)), so the days before every shard's latest
    /// are final, and so are those more than `retain_days` before the
    /// newest (a shard that stopped touching the entity would otherwise
    /// hold every other shard's entries for ever). Each shard keeps its
    /// newest entry before that cut: its value for every day from then
    /// until its next entry; the days before it are no longer exact.
    ///
    /// What is lost: a shard more than `retain_days` behind the newest no
    /// longer updates the items of its days; and a shard that never
    /// contributed to the entity, writing a day before another shard's
    /// kept entries, counts only in the items from those entries on (a
    /// partition that first touches a category more than a day behind
    /// another one that did).
    pub fn prune(&mut self, retain_days: i64) -> Vec<(Shard, i64)> {
        let mut latest: BTreeMap<Shard, i64> = BTreeMap::new();
        for &(s, d) in self.entries.keys() {
            latest.insert(s, d);
        }
        let (Some(&oldest), Some(&newest)) = (latest.values().min(), latest.values().max()) else {
            return Vec::new();
        };
        let cut = oldest.max(newest.saturating_sub(retain_days));
        let mut dropped = Vec::new();
        let mut previous: Option<(Shard, i64)> = None;
        for &(s, d) in self.entries.keys() {
            if d >= cut {
                continue;
            }
            // Of a shard's entries before the cut only the newest stays.
            if let Some(p) = previous
                && p.0 == s
            {
                dropped.push(p);
                self.exact_from = self.exact_from.max(d);
            }
            previous = Some((s, d));
        }
        for key in &dropped {
            self.entries.remove(key);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: i64 = 86_400_000;

    fn totals(products: u64, last_event_at: i64) -> EntityTotals {
        EntityTotals {
            products,
            active: products,
            deleted: 0,
            value_cents: i128::from(products) * 100,
            price_sum_cents: i128::from(products) * 100,
            low_stock: 0,
            last_event_at,
        }
    }

    #[test]
    fn a_lagging_shard_counts_its_own_day_in_every_later_day() {
        let mut p = DailyParts::default();
        // Shard 0 wrote days 10 and 11; shard 1, behind, then writes day 10.
        p.record(0, 10, totals(2, 10 * DAY + 5));
        p.record(0, 11, totals(3, 11 * DAY + 5));
        p.record(1, 10, totals(7, 10 * DAY + 9));
        assert_eq!(p.at_end_of(10).products, 9);
        assert_eq!(p.at_end_of(10).last_event_at, 10 * DAY + 9);
        assert_eq!(p.at_end_of(11).products, 10);
        assert_eq!(p.at_end_of(9).products, 0);
        assert_eq!(p.at_end_of(9).last_event_at, -1);
        assert_eq!(p.days_from(10), BTreeSet::from([10, 11]));
        assert_eq!(p.days_from(11), BTreeSet::from([11]));
        // A late event after a restart cannot take shard 0 back to day 10.
        assert_eq!(p.record(0, 10, totals(4, 10 * DAY + 7)), 11);
        assert_eq!(p.at_end_of(10).products, 9);
        assert_eq!(p.at_end_of(11).products, 11);
    }

    #[test]
    fn a_shard_without_entries_counts_from_its_last_event() {
        let mut p = DailyParts::default();
        p.record(0, 11, totals(3, 11 * DAY));
        p.seed(1, &totals(4, 10 * DAY + 1));
        p.seed(0, &totals(99, 11 * DAY));
        assert_eq!(p.at_end_of(10).products, 4);
        assert_eq!(p.at_end_of(11).products, 7);
    }

    #[test]
    fn pruning_keeps_each_shards_value_before_the_cut() {
        let mut p = DailyParts::default();
        for d in [1, 2, 3, 4] {
            p.record(0, d, totals(d as u64, d * DAY));
        }
        p.record(1, 2, totals(10, 2 * DAY));
        // Shard 1 is at day 2: nothing from day 2 on may go, and shard 0's
        // day 1 is its value at the end of day 1 only.
        assert_eq!(p.prune(30), vec![]);
        p.record(1, 4, totals(20, 4 * DAY));
        // Both at day 4: shard 0 keeps day 3 (its value until day 4),
        // shard 1 keeps day 2.
        assert_eq!(p.prune(30), vec![(0, 1), (0, 2)]);
        assert_eq!(p.exact_from(), 3);
        assert_eq!(p.at_end_of(3).products, 13);
        assert_eq!(p.at_end_of(4).products, 24);
        // Past the retention a stalled shard no longer holds entries back.
        let mut q = DailyParts::default();
        for d in [1, 10, 50, 60] {
            q.record(0, d, totals(1, d * DAY));
        }
        q.record(1, 1, totals(1, DAY));
        assert_eq!(q.prune(30), vec![(0, 1)]);
        // Shard 1, far behind, writes day 2: day 2's item would need shard
        // 0's pruned day 1, so only days from shard 0's day 10 on are redone.
        q.record(1, 2, totals(1, 2 * DAY));
        assert_eq!(q.days_from(2), BTreeSet::from([10, 50, 60]));
        // A new shard with an early day cannot make the lost days exact again.
        q.record(2, 1, totals(1, DAY));
        q.prune(30);
        assert_eq!(q.days_from(1), BTreeSet::from([10, 50, 60]));
    }

    proptest! {
        /// Shards write their days in order, interleaved in any way, and
        /// pruning happens after any write: every day's sum equals the sum
        /// of each shard's last write of that day or before.
        #[test]
        fn every_days_sum_is_each_shards_value_at_its_end(
            writes in prop::collection::vec((0u32..4, 0i64..3, 1u64..50), 1..60),
            retain in 2i64..6,
        ) {
            let mut parts = DailyParts::default();
            let mut day_of: BTreeMap<Shard, i64> = BTreeMap::new();
            // Every write of each shard: (day, products).
            let mut history: BTreeMap<Shard, Vec<(i64, u64)>> = BTreeMap::new();
            // Shards 0–2 are known from the first day; shard 3 may first
            // contribute at any time, behind the others (see `prune`).
            for shard in 0..3 {
                parts.record(shard, 100, totals(0, 100 * DAY));
                day_of.insert(shard, 100);
            }
            // The `DAY#` items, written as the stores write them.
            let mut items: BTreeMap<i64, u64> = BTreeMap::new();
            for (shard, step, products) in writes {
                let day = day_of.entry(shard).or_insert(100);
                // A step of 0 now and then files a late event's day.
                let filed = *day + step - i64::from(step == 0 && products % 2 == 0);
                // A shard's days never go back (`record`).
                let filed = filed.max(*day);
                let changed = parts.apply(shard, filed, totals(products, filed * DAY), retain);
                *day = filed;
                history.entry(shard).or_default().push((filed, products));
                for (d, t) in changed {
                    items.insert(d, t.products);
                }
            }
            let newest = day_of.values().copied().max().unwrap_or(100);
            let oldest = day_of.values().copied().min().unwrap_or(100);
            let truth = |day: i64| -> u64 {
                history
                    .values()
                    .filter_map(|w| w.iter().rev().find(|(d, _)| *d <= day).map(|(_, p)| *p))
                    .sum()
            };
            // Exact for every day a shard could still write in, and for
            // every day within the retention.
            if !history.contains_key(&3) {
                prop_assert!(parts.exact_from() <= oldest.max(newest - retain));
            }
            for day in parts.exact_from().max(99)..=newest + 1 {
                prop_assert_eq!(parts.at_end_of(day).products, truth(day), "day {}", day);
            }
            // Every day a shard wrote in since the first exact day has an
            // item, holding that day's end (before, a shard more than
            // `retain` days behind no longer updates them).
            let written: BTreeSet<i64> = history.values().flatten().map(|(d, _)| *d).collect();
            for day in written.range(parts.exact_from()..) {
                prop_assert_eq!(items.get(day).copied(), Some(truth(*day)), "item of day {}", day);
            }
        }
    }
}
