//! Values shared by the worker, the supervisor and the storage process.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A routing shard: a Kafka partition number, or a virtual partition of a
/// file source. One shard is always folded by one worker.
pub type Shard = u32;

/// A position within one stream (a Kafka topic-partition or a file).
pub type Offset = i64;

/// A product identifier. JSON numbers and canonical numeric strings
/// (`12345`, `"12345"`) are the same product; anything else is text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ProductId {
    Num(u64),
    Text(Box<str>),
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProductId::Num(n) => write!(f, "{n}"),
            ProductId::Text(s) => f.write_str(s),
        }
    }
}

/// Orders the writes to one field of a product: event timestamp, then the
/// event type (created < updated < deleted). Packed as `timestamp * 4 + rank`;
/// `Version::NONE` means the field was never set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version(pub i64);

impl Version {
    pub const NONE: Version = Version(-1);
}

/// The last-writer-wins state of one product, field by field, as it travels
/// between processes (the worker keeps a compact interned form).
pub type ProductState = ProductStateOf<Box<str>>;

/// [`ProductState`] over any string type: the worker encodes its states as
/// `ProductStateOf<&str>`, borrowing its interned strings, and the bytes
/// are those of a `ProductState` (serde writes every string type alike).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductStateOf<S> {
    pub seller: Field<S>,
    pub category: Field<S>,
    pub name: Field<S>,
    /// Exact price in cents.
    pub price_cents: Field<i64>,
    pub quantity: Field<i64>,
    pub deleted: Field<bool>,
    /// Timestamp of the event that put the product on the low-stock list.
    pub low_stock_since: Option<i64>,
}

/// One last-writer-wins register.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field<T> {
    pub value: Option<T>,
    pub version: Version,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            value: None,
            version: Version::NONE,
        }
    }
}

/// A seller or a category.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EntityKey {
    Seller(Box<str>),
    Category(Box<str>),
}

/// What one shard contributes to a seller or category. Entity metrics are the
/// sum of these over shards; all fields are exact integers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityTotals {
    /// Products in the entity, active or deleted.
    pub products: u64,
    pub active: u64,
    pub deleted: u64,
    /// Σ price × quantity over active products, in cents.
    pub value_cents: i128,
    /// Σ price over active products, in cents.
    pub price_sum_cents: i128,
    pub low_stock: u64,
    /// Largest event timestamp that mentioned the entity; -1 when none did.
    pub last_event_at: i64,
}

impl EntityTotals {
    /// Adds another shard's contribution.
    pub fn merge(&mut self, other: &EntityTotals) {
        self.products += other.products;
        self.active += other.active;
        self.deleted += other.deleted;
        self.value_cents += other.value_cents;
        self.price_sum_cents += other.price_sum_cents;
        self.low_stock += other.low_stock;
        self.last_event_at = self.last_event_at.max(other.last_event_at);
    }
}

/// The last applied offset of one stream within a shard.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    pub stream: Box<str>,
    pub offset: Offset,
}

/// A rejected event, kept with its original bytes and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub stream: Box<str>,
    pub shard: Shard,
    pub offset: Offset,
    /// Stable reason code, e.g. `invalid_json`, `missing_field`.
    pub reason: Box<str>,
    /// Human-readable detail.
    pub detail: Box<str>,
    /// The original bytes (a prefix only when the event was too large).
    #[serde(with = "bytes")]
    pub raw: Vec<u8>,
}

/// A byte vector as one bytes value: a length and a copy. serde's default
/// for `Vec<u8>` is a sequence of single bytes, which bincode encodes one
/// element at a time (measured: about half the supervisor's instructions).
pub mod bytes {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Visit)
    }
}
