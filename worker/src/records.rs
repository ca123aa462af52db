//! Metric records: the one output format of `analytics-worker fold`,
//! `analytics export` and the archive's metric snapshots (DESIGN §4).
//! Records sort by their storage key (PK, SK), so every output is in the same
//! order.

use proto::{EntityKey, EntityTotals, ProductId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum MetricRecord {
    #[serde(rename = "seller")]
    Seller(SellerRecord),
    #[serde(rename = "category")]
    Category(CategoryRecord),
    #[serde(rename = "lowStock")]
    LowStock(LowStockRecord),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SellerRecord {
    pub seller_id: String,
    pub total_products: u64,
    pub active_products: u64,
    pub deleted_products: u64,
    pub total_value: Money,
    pub low_stock_count: u64,
    pub last_event_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CategoryRecord {
    pub category: String,
    /// Active products in the category.
    pub total_products: u64,
    pub total_value: Money,
    pub average_price: Money,
    pub last_event_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LowStockRecord {
    pub seller_id: String,
    #[serde(with = "product_id_json")]
    pub product_id: ProductId,
    pub name: String,
    pub category: String,
    pub quantity: i64,
    pub price: Money,
}

/// An exact amount in cents, written as a decimal string with two decimals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Money(pub i128);

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl std::str::FromStr for Money {
    type Err = String;

    /// Parses the exact form `Display` writes (`-12.34`, `0.00`).
    fn from_str(s: &str) -> Result<Money, String> {
        let bad = || format!("not a money amount: {s:?}");
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (int, frac) = digits.split_once('.').ok_or_else(bad)?;
        if int.is_empty()
            || frac.len() != 2
            || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let int: i128 = int.parse().map_err(|_| bad())?;
        let frac: i128 = frac.parse().map_err(|_| bad())?;
        let cents = int
            .checked_mul(100)
            .and_then(|c| c.checked_add(frac))
            .ok_or_else(bad)?;
        Ok(Money(if neg { -cents } else { cents }))
    }
}

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Money, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Mean of `sum` over `count`, rounded to the cent, half away from zero.
pub fn average_cents(sum: i128, count: u64) -> i128 {
    if count == 0 {
        return 0;
    }
    let n = count as i128;
    let (q, r) = (sum / n, sum % n);
    if 2 * r.abs() >= n {
        q + sum.signum()
    } else {
        q
    }
}

impl MetricRecord {
    /// The record of an entity whose totals are summed over shards.
    pub fn entity(key: &EntityKey, t: &EntityTotals) -> MetricRecord {
        match key {
            EntityKey::Seller(id) => MetricRecord::Seller(SellerRecord {
                seller_id: id.to_string(),
                total_products: t.products,
                active_products: t.active,
                deleted_products: t.deleted,
                total_value: Money(t.value_cents),
                low_stock_count: t.low_stock,
                last_event_at: t.last_event_at,
            }),
            EntityKey::Category(name) => MetricRecord::Category(CategoryRecord {
                category: name.to_string(),
                total_products: t.active,
                total_value: Money(t.value_cents),
                average_price: Money(average_cents(t.price_sum_cents, t.active)),
                last_event_at: t.last_event_at,
            }),
        }
    }

    /// The storage key (PK, SK) of the record's current item (DESIGN §6).
    pub fn key(&self) -> (String, String) {
        match self {
            MetricRecord::Seller(r) => (format!("SELLER#{}", r.seller_id), "CURRENT".into()),
            MetricRecord::Category(r) => (format!("CATEGORY#{}", r.category), "CURRENT".into()),
            MetricRecord::LowStock(r) => low_stock_key(&r.seller_id, &r.product_id),
        }
    }

    pub fn to_json_line(&self) -> String {
        // Serializing plain structs of strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

pub fn low_stock_key(seller: &str, product: &ProductId) -> (String, String) {
    (format!("LOWSTOCK#{seller}"), format!("PRODUCT#{product}"))
}

/// Sorts records by storage key, the order every output uses.
pub fn sort_records(records: &mut [MetricRecord]) {
    records.sort_by_cached_key(MetricRecord::key);
}

/// `ProductId` in JSON: a number when it is one, a string otherwise.
pub mod product_id_json {
    use proto::ProductId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &ProductId, s: S) -> Result<S::Ok, S::Error> {
        match id {
            ProductId::Num(n) => s.serialize_u64(*n),
            ProductId::Text(t) => s.serialize_str(t),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ProductId, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Num(n) => ProductId::Num(n),
            Raw::Text(t) => ProductId::Text(t.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_prints_two_decimals_and_parses_back() {
        for (cents, text) in [
            (0, "0.00"),
            (5, "0.05"),
            (12000, "120.00"),
            (-1, "-0.01"),
            (-12345, "-123.45"),
        ] {
            assert_eq!(Money(cents).to_string(), text);
            assert_eq!(text.parse::<Money>(), Ok(Money(cents)));
        }
        assert!("1.5".parse::<Money>().is_err());
        assert!("abc".parse::<Money>().is_err());
    }

    #[test]
    fn average_rounds_half_away_from_zero() {
        assert_eq!(average_cents(0, 0), 0);
        assert_eq!(average_cents(3000, 2), 1500);
        assert_eq!(average_cents(1001, 2), 501); // 500.5 -> 501
        assert_eq!(average_cents(1000, 3), 333); // 333.33 -> 333
        assert_eq!(average_cents(2000, 3), 667); // 666.67 -> 667
        assert_eq!(average_cents(-1001, 2), -501);
    }

    #[test]
    fn records_serialize_with_type_tag() {
        let r = MetricRecord::LowStock(LowStockRecord {
            seller_id: "s1".into(),
            product_id: ProductId::Num(7),
            name: "Mouse".into(),
            category: "Electronics".into(),
            quantity: 3,
            price: Money(2999),
        });
        let line = r.to_json_line();
        assert_eq!(
            line,
            r#"{"type":"lowStock","sellerId":"s1","productId":7,"name":"Mouse","category":"Electronics","quantity":3,"price":"29.99"}"#
        );
        assert_eq!(serde_json::from_str::<MetricRecord>(&line).ok(), Some(r));
    }
}
