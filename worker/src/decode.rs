//! Decoding of one event value (DESIGN §2) into an [`Event`], or a typed
//! [`Rejection`] saying why it is bad input (DESIGN §7).
//!
//! Both producer dialects are accepted: the published contract (updates carry
//! `data.changes = {field: {old, new}}`, thin deletes) and the backend as it
//! runs (full rows, `data.previousData` in snake_case, prices as strings).
//! Numbers are read from their JSON text, never through f64, so prices are
//! exact cents.
//!
//! Decoding reads the fields it needs into [`Fields`] first: through the
//! fast scanner of [`crate::scan`] for a well-formed event, or through
//! serde_json for anything the scanner leaves alone (escapes, odd types,
//! bad JSON). Both give the same `Fields` for every input the scanner takes
//! (a property test holds this); everything after that is shared.

use proto::ProductId;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Timestamps are packed into versions as `ts * 4 + rank`.
const MAX_TIMESTAMP: i64 = i64::MAX / 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    Created = 0,
    Updated = 1,
    Deleted = 2,
}

/// A decoded event. Borrowed strings point into the raw value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event<'a> {
    pub kind: EventKind,
    pub timestamp: i64,
    pub product_id: ProductId,
    pub seller: Cow<'a, str>,
    /// New field values the event carries (absent = not carried).
    pub category: Option<Cow<'a, str>>,
    pub name: Option<Cow<'a, str>>,
    pub price_cents: Option<i64>,
    pub quantity: Option<i64>,
    /// Previous seller and category the event names (`changes.*.old`,
    /// `previousData`): they are mentioned by the event too.
    pub old_seller: Option<Cow<'a, str>>,
    pub old_category: Option<Cow<'a, str>>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No length: a file source stops reading a line one byte past the
    /// limit, so the length it has is not the event's.
    #[error("event is larger than the limit of {max} bytes")]
    TooLarge { max: usize },
    #[error("not valid JSON: {0}")]
    InvalidJson(String),
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("field {field} is invalid: {why}")]
    InvalidField {
        field: Cow<'static, str>,
        why: String,
    },
    #[error("field {0} is negative")]
    NegativeValue(&'static str),
    #[error("unknown eventType {0:?}")]
    UnknownEventType(String),
}

impl Rejection {
    /// Stable reason code, used for counting and in dead letters.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::TooLarge { .. } => "too_large",
            Rejection::InvalidJson(_) => "invalid_json",
            Rejection::MissingField(_) => "missing_field",
            Rejection::InvalidField { .. } => "invalid_field",
            Rejection::NegativeValue(_) => "negative_value",
            Rejection::UnknownEventType(_) => "unknown_event_type",
        }
    }
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "eventType", borrow, default, deserialize_with = "opt_cow")]
    event_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<Obj<RawData<'a>>>,
}

#[derive(Deserialize)]
struct RawData<'a> {
    #[serde(rename = "productId", borrow)]
    product_id: Option<&'a RawValue>,
    #[serde(rename = "sellerId", borrow, default, deserialize_with = "opt_cow")]
    seller_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    category: Option<Cow<'a, str>>,
    #[serde(borrow)]
    price: Option<&'a RawValue>,
    #[serde(borrow)]
    quantity: Option<&'a RawValue>,
    #[serde(borrow)]
    changes: Option<Obj<RawChanges<'a>>>,
    #[serde(rename = "previousData", borrow)]
    previous: Option<Obj<RawPrevious<'a>>>,
}

#[derive(Deserialize)]
struct RawChanges<'a> {
    #[serde(borrow)]
    price: Option<Obj<RawChange<&'a RawValue>>>,
    #[serde(borrow)]
    quantity: Option<Obj<RawChange<&'a RawValue>>>,
    #[serde(borrow)]
    category: Option<Obj<RawStrChange<'a>>>,
    #[serde(borrow)]
    name: Option<Obj<RawStrChange<'a>>>,
    #[serde(rename = "sellerId", borrow)]
    seller_id: Option<Obj<RawStrChange<'a>>>,
}

#[derive(Deserialize)]
struct RawChange<T> {
    new: Option<T>,
}

#[derive(Deserialize)]
struct RawStrChange<'a> {
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    old: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    new: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawPrevious<'a> {
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    seller_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "opt_cow")]
    category: Option<Cow<'a, str>>,
}

/// The values of an event that decoding looks at, as found in the JSON:
/// strings as their content, other values as their JSON text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields<'a> {
    pub event_type: Option<Cow<'a, str>>,
    pub timestamp: Option<&'a str>,
    /// `None` when `data` is absent or null.
    pub data: Option<DataFields<'a>>,
}

/// `data`'s values; `changes.x.new` and the like are flattened (absent
/// when any level is absent or null).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataFields<'a> {
    pub product_id: Option<&'a str>,
    pub seller_id: Option<Cow<'a, str>>,
    pub name: Option<Cow<'a, str>>,
    pub category: Option<Cow<'a, str>>,
    pub price: Option<&'a str>,
    pub quantity: Option<&'a str>,
    pub new_price: Option<&'a str>,
    pub new_quantity: Option<&'a str>,
    pub old_category: Option<Cow<'a, str>>,
    pub new_category: Option<Cow<'a, str>>,
    pub new_name: Option<Cow<'a, str>>,
    pub old_seller_id: Option<Cow<'a, str>>,
    pub new_seller_id: Option<Cow<'a, str>>,
    pub previous_seller_id: Option<Cow<'a, str>>,
    pub previous_category: Option<Cow<'a, str>>,
}

impl<'a> From<RawEvent<'a>> for Fields<'a> {
    fn from(raw: RawEvent<'a>) -> Fields<'a> {
        Fields {
            event_type: raw.event_type,
            timestamp: raw.timestamp.map(RawValue::get),
            data: raw.data.map(|Obj(d)| {
                let ch = d.changes;
                let ch = ch.as_deref();
                let prev = d.previous.map(|Obj(p)| p);
                let str_change = |c: Option<&Obj<RawStrChange<'a>>>| {
                    c.map_or((None, None), |c| (c.old.clone(), c.new.clone()))
                };
                let (old_category, new_category) = str_change(ch.and_then(|c| c.category.as_ref()));
                let (_, new_name) = str_change(ch.and_then(|c| c.name.as_ref()));
                let (old_seller_id, new_seller_id) =
                    str_change(ch.and_then(|c| c.seller_id.as_ref()));
                let (previous_seller_id, previous_category) =
                    prev.map_or((None, None), |p| (p.seller_id, p.category));
                DataFields {
                    product_id: d.product_id.map(RawValue::get),
                    seller_id: d.seller_id,
                    name: d.name,
                    category: d.category,
                    price: d.price.map(RawValue::get),
                    quantity: d.quantity.map(RawValue::get),
                    new_price: ch
                        .and_then(|c| c.price.as_ref())
                        .and_then(|c| c.new)
                        .map(RawValue::get),
                    new_quantity: ch
                        .and_then(|c| c.quantity.as_ref())
                        .and_then(|c| c.new)
                        .map(RawValue::get),
                    old_category,
                    new_category,
                    new_name,
                    old_seller_id,
                    new_seller_id,
                    previous_seller_id,
                    previous_category,
                }
            }),
        }
    }
}

/// The fields of an event through serde_json: any valid JSON, and the
/// errors for anything else.
pub fn fields_by_serde(text: &str) -> Result<Fields<'_>, Rejection> {
    match serde_json::from_str::<Obj<RawEvent<'_>>>(text) {
        Ok(Obj(raw)) => Ok(raw.into()),
        Err(e) => Err(rejection_of(text, &e)),
    }
}

/// Why serde_json refused an event, naming the field (`data.name`) where
/// the value had the wrong type. Rare, so the event is read a second time
/// to find the field.
fn rejection_of(text: &str, e: &serde_json::Error) -> Rejection {
    if text.trim().is_empty() {
        return Rejection::InvalidJson("empty: no JSON value".into());
    }
    if e.classify() != serde_json::error::Category::Data {
        return Rejection::InvalidJson(without_position(e));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let path = match serde_path_to_error::deserialize::<_, Obj<RawEvent<'_>>>(&mut de) {
        Err(e) => e.path().to_string(),
        Ok(_) => String::new(),
    };
    Rejection::InvalidField {
        field: match path.as_str() {
            "" | "." => "event".into(),
            _ => path.into(),
        },
        why: without_position(e),
    }
}

/// serde_json's message without its "at line 1 column 7": an event is one
/// line (of a file whose own line number the dead letter gives), so only
/// the column is kept.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let message = text.rsplit_once(" at line ").map_or(&*text, |(m, _)| m);
    match (e.line(), e.column()) {
        (0, _) => message.to_string(),
        (1, column) => format!("{message} (column {column})"),
        (line, column) => format!("{message} (line {line}, column {column})"),
    }
}

/// A JSON object, nothing else: serde's derived structs also take an array
/// (fields by position), which DESIGN §2 does not allow.
struct Obj<T>(T);

impl<T> std::ops::Deref for Obj<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData)).map(Obj)
    }
}

/// An optional string that borrows from the input when it has no escapes.
/// (serde's own `Option<Cow<str>>` always allocates: its `borrow` applies
/// only to a bare `Cow`.)
fn opt_cow<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
    }
    d.deserialize_option(Visit)
}

/// Decodes one event value.
pub fn decode(bytes: &[u8], max_event_bytes: usize) -> Result<Event<'_>, Rejection> {
    if bytes.len() > max_event_bytes {
        return Err(Rejection::TooLarge {
            max: max_event_bytes,
        });
    }
    // Validating UTF-8 once here is much cheaper than serde_json checking
    // every borrowed string of a byte slice.
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Rejection::InvalidJson(format!("not UTF-8: {e}")))?;
    let raw = match crate::scan::fields(text) {
        Some(fields) => fields,
        None => fields_by_serde(text)?,
    };
    let kind = match raw.event_type.as_deref() {
        None => return Err(Rejection::MissingField("eventType")),
        Some("ProductCreated") => EventKind::Created,
        Some("ProductUpdated") => EventKind::Updated,
        Some("ProductDeleted") => EventKind::Deleted,
        Some(other) => return Err(Rejection::UnknownEventType(other.to_string())),
    };
    let timestamp = integer(
        raw.timestamp.ok_or(Rejection::MissingField("timestamp"))?,
        "timestamp",
    )?;
    if timestamp > MAX_TIMESTAMP {
        return Err(Rejection::InvalidField {
            field: "timestamp".into(),
            why: "too large".into(),
        });
    }
    let data = raw.data.ok_or(Rejection::MissingField("data"))?;
    let product_id = product_id(
        data.product_id
            .ok_or(Rejection::MissingField("data.productId"))?,
    )?;
    let seller = data
        .seller_id
        .ok_or(Rejection::MissingField("data.sellerId"))?;
    if seller.is_empty() {
        return Err(Rejection::InvalidField {
            field: "data.sellerId".into(),
            why: "empty".into(),
        });
    }

    let mut event = Event {
        kind,
        timestamp,
        product_id,
        seller,
        category: data.category,
        name: data.name,
        price_cents: data
            .price
            .map(|p| price_cents(p, "data.price"))
            .transpose()?,
        quantity: data
            .quantity
            .map(|q| quantity(q, "data.quantity"))
            .transpose()?,
        old_seller: data.previous_seller_id,
        old_category: data.previous_category,
    };
    // `changes` is the contract's explicit statement of new values: it wins
    // over the top-level fields.
    if let Some(new) = data.new_price {
        event.price_cents = Some(price_cents(new, "data.changes.price.new")?);
    }
    if let Some(new) = data.new_quantity {
        event.quantity = Some(quantity(new, "data.changes.quantity.new")?);
    }
    event.old_category = data.old_category.or(event.old_category);
    event.category = data.new_category.or(event.category);
    event.name = data.new_name.or(event.name);
    event.old_seller = data.old_seller_id.or(event.old_seller);
    if let Some(new) = data.new_seller_id.filter(|s| !s.is_empty()) {
        event.seller = new;
    }
    // A created product is a whole product (DESIGN §2). Without a price it
    // would count as 0.00 in its category's averagePrice; without a
    // category it would be listed on low stock with none. (Updates and
    // deletes may carry part of a product: they change what they name.)
    if kind == EventKind::Created {
        if event.price_cents.is_none() {
            return Err(Rejection::MissingField("data.price"));
        }
        if event.quantity.is_none() {
            return Err(Rejection::MissingField("data.quantity"));
        }
        if event.category.is_none() {
            return Err(Rejection::MissingField("data.category"));
        }
    }
    check_lengths(&event)?;
    Ok(event)
}

/// Longest seller id, category or text product id, in bytes. They become
/// DynamoDB keys (`PARTS#CATEGORY#<category>`, at most 2048 bytes;
/// `PRODUCT#<productId>`, at most 1024), which DynamoDB refuses for good
/// beyond that: one such event would stop every write of its partition.
pub const MAX_KEY_BYTES: usize = 1000;
/// Longest product name, in bytes. A name travels in the product's state at
/// every change and in its low-stock item (a DynamoDB item holds at most
/// 400 KB); real names are a few hundred bytes at most.
pub const MAX_NAME_BYTES: usize = 16 * 1024;

/// The same limits whichever store is configured, so that the metrics of
/// one input never depend on the store.
fn check_lengths(event: &Event<'_>) -> Result<(), Rejection> {
    let too_long = |field: &'static str, len: usize, max: usize| {
        Err(Rejection::InvalidField {
            field: field.into(),
            why: format!("{len} bytes, above the limit of {max}"),
        })
    };
    if let ProductId::Text(id) = &event.product_id
        && id.len() > MAX_KEY_BYTES
    {
        return too_long("data.productId", id.len(), MAX_KEY_BYTES);
    }
    let keys = [
        ("data.sellerId", Some(&event.seller)),
        ("data.category", event.category.as_ref()),
        ("data.sellerId (previous)", event.old_seller.as_ref()),
        ("data.category (previous)", event.old_category.as_ref()),
    ];
    for (field, value) in keys {
        if let Some(v) = value
            && v.len() > MAX_KEY_BYTES
        {
            return too_long(field, v.len(), MAX_KEY_BYTES);
        }
    }
    match &event.name {
        Some(name) if name.len() > MAX_NAME_BYTES => {
            too_long("data.name", name.len(), MAX_NAME_BYTES)
        }
        _ => Ok(()),
    }
}

/// The text of a JSON number, or of a string holding one.
fn numeric_text<'a>(raw: &'a str, field: &'static str) -> Result<&'a str, Rejection> {
    let text = match raw.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) => inner.trim(),
        None => raw,
    };
    if text.is_empty()
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
    {
        return Err(Rejection::InvalidField {
            field: field.into(),
            why: format!("not a number: {raw}"),
        });
    }
    Ok(text)
}

/// Parses a decimal number exactly and scales it by `10^scale`; fails if the
/// result is not an integer or does not fit an i64.
fn scaled_decimal(text: &str, scale: u32, field: &'static str) -> Result<i64, Rejection> {
    if let Some(v) = plain_decimal(text.as_bytes(), scale) {
        return Ok(v);
    }
    let invalid = |why: &str| Rejection::InvalidField {
        field: field.into(),
        why: format!("{why}: {text}"),
    };
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => {
            let exp: i32 = rest[i + 1..].parse().map_err(|_| invalid("bad exponent"))?;
            (&rest[..i], exp)
        }
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let dangling_point = mantissa.ends_with('.');
    if int.is_empty()
        || dangling_point
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(invalid("not a decimal number"));
    }
    // value = digits * 10^(exponent - frac.len()); we want value * 10^scale.
    let shift = exponent as i64 + scale as i64 - frac.len() as i64;
    let mut digits: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        digits = digits
            .checked_mul(10)
            .and_then(|d| d.checked_add((b - b'0') as i128))
            .ok_or_else(|| invalid("too large"))?;
    }
    let scaled = if shift >= 0 {
        10i128
            .checked_pow(shift as u32)
            .and_then(|p| digits.checked_mul(p))
    } else {
        let p = 10i128.checked_pow((-shift) as u32);
        match p {
            Some(p) if digits % p == 0 => Some(digits / p),
            Some(_) => {
                return Err(invalid(if scale == 0 {
                    "not an integer"
                } else {
                    "more than two decimals"
                }));
            }
            None if digits == 0 => Some(0),
            None => return Err(invalid("more decimals than representable")),
        }
    };
    let scaled = scaled
        .and_then(|s| i64::try_from(s).ok())
        .ok_or_else(|| invalid("too large"))?;
    if negative && scaled != 0 {
        return Err(Rejection::NegativeValue(field));
    }
    Ok(scaled)
}

/// The common case without i128 arithmetic: unsigned digits, optionally a
/// point and at most `scale` decimals, at most 15 integer digits. Anything
/// else (signs, exponents, trailing zeros beyond the scale) takes the exact
/// general path.
fn plain_decimal(b: &[u8], scale: u32) -> Option<i64> {
    let point = b.iter().position(|&c| c == b'.').unwrap_or(b.len());
    let (int, frac) = (&b[..point], b.get(point + 1..).unwrap_or_default());
    if int.is_empty()
        || int.len() > 15
        || frac.len() > scale as usize
        || (point < b.len() && frac.is_empty())
    {
        return None;
    }
    let mut v: i64 = 0;
    for &c in int.iter().chain(frac) {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as i64;
    }
    Some(v * 10i64.pow(scale - frac.len() as u32))
}

fn integer(raw: &str, field: &'static str) -> Result<i64, Rejection> {
    scaled_decimal(numeric_text(raw, field)?, 0, field)
}

/// Highest price accepted, in cents (one trillion), and highest quantity
/// (10^12). A product's value is then at most 10^26 cents, so a billion
/// products sum to at most 36 digits: exact in the fold's 128-bit sums
/// (which wrapped around to a negative total on three products priced and
/// stocked at the 64-bit maxima) and in a DynamoDB number (38 digits).
pub const MAX_PRICE_CENTS: i64 = 100_000_000_000_000;
pub const MAX_QUANTITY: i64 = 1_000_000_000_000;

fn price_cents(raw: &str, field: &'static str) -> Result<i64, Rejection> {
    let cents = scaled_decimal(numeric_text(raw, field)?, 2, field)?;
    at_most(cents, MAX_PRICE_CENTS, field, "1000000000000.00")
}

fn quantity(raw: &str, field: &'static str) -> Result<i64, Rejection> {
    at_most(integer(raw, field)?, MAX_QUANTITY, field, "1000000000000")
}

fn at_most(value: i64, max: i64, field: &'static str, shown: &str) -> Result<i64, Rejection> {
    if value > max {
        return Err(Rejection::InvalidField {
            field: field.into(),
            why: format!("above the limit of {shown}"),
        });
    }
    Ok(value)
}

/// A non-negative integer (number or canonical digit string) is numeric;
/// any other non-empty string is a text id.
fn product_id(raw: &str) -> Result<ProductId, Rejection> {
    const FIELD: &str = "data.productId";
    if raw.starts_with('"') {
        // The raw text of a valid JSON string: without a backslash, its
        // content is what is between the quotes.
        let s: Cow<'_, str> = match raw.get(1..raw.len() - 1) {
            Some(inner) if raw.len() >= 2 && !inner.contains('\\') => Cow::Borrowed(inner),
            _ => Cow::Owned(
                serde_json::from_str(raw).map_err(|e| Rejection::InvalidField {
                    field: FIELD.into(),
                    why: e.to_string(),
                })?,
            ),
        };
        if s.is_empty() {
            return Err(Rejection::InvalidField {
                field: FIELD.into(),
                why: "empty".into(),
            });
        }
        let canonical =
            s.bytes().all(|b| b.is_ascii_digit()) && (s.len() == 1 || !s.starts_with('0'));
        return Ok(match s.parse::<u64>() {
            Ok(n) if canonical => ProductId::Num(n),
            _ => ProductId::Text(s.into()),
        });
    }
    let n = scaled_decimal(numeric_text(raw, FIELD)?, 0, FIELD)?;
    Ok(ProductId::Num(n as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn ok(json: &str) -> Event<'_> {
        match decode(json.as_bytes(), MAX) {
            Ok(e) => e,
            Err(r) => panic!("rejected {json}: {r}"),
        }
    }

    fn reason(json: &str) -> &'static str {
        match decode(json.as_bytes(), MAX) {
            Ok(e) => panic!("accepted {json}: {e:?}"),
            Err(r) => r.reason(),
        }
    }

    fn assert_over_limit(json: &str, field: &str) {
        match decode(json.as_bytes(), MAX) {
            Err(Rejection::InvalidField { field: f, why }) => {
                assert_eq!(f, field);
                assert!(why.contains("above the limit"), "{why}");
            }
            other => panic!("{field}: {other:?}"),
        }
    }

    #[test]
    fn ids_categories_and_names_beyond_their_limits_are_rejected_with_the_field() {
        let created = |id: &str, seller: &str, category: &str, name: &str| {
            format!(
                r#"{{"eventType":"ProductCreated","timestamp":1,"data":{{"productId":{id},"sellerId":"{seller}","name":"{name}","price":1,"quantity":1,"category":"{category}"}}}}"#
            )
        };
        // Limits count bytes: 'é' is two.
        let key = "é".repeat(MAX_KEY_BYTES / 2);
        let name = "é".repeat(MAX_NAME_BYTES / 2);
        let text_id = format!("\"{key}\"");
        let at_limit = created(&text_id, &key, &key, &name);
        let e = ok(&at_limit);
        assert_eq!(e.seller.len(), MAX_KEY_BYTES);
        assert_eq!(e.name.as_deref().map(str::len), Some(MAX_NAME_BYTES));

        let longer = format!("{key}x");
        let long_id = format!("\"{longer}\"");
        let long_name = format!("{name}x");
        for (json, field) in [
            (created(&long_id, &key, &key, &name), "data.productId"),
            (created(&text_id, &longer, &key, &name), "data.sellerId"),
            (created(&text_id, &key, &longer, &name), "data.category"),
            (created(&text_id, &key, &key, &long_name), "data.name"),
            (
                format!(
                    r#"{{"eventType":"ProductUpdated","timestamp":1,"data":{{"productId":1,"sellerId":"s","changes":{{"category":{{"old":"{longer}","new":"Books"}}}}}}}}"#
                ),
                "data.category (previous)",
            ),
        ] {
            assert_over_limit(&json, field);
        }
    }

    #[test]
    fn prices_and_quantities_beyond_their_limits_are_rejected() {
        let created = |price: &str, quantity: &str| {
            format!(
                r#"{{"eventType":"ProductCreated","timestamp":1,"data":{{"productId":1,"sellerId":"s","category":"c","price":{price},"quantity":{quantity}}}}}"#
            )
        };
        let at_limit = created("1000000000000.00", "1000000000000");
        let e = ok(&at_limit);
        assert_eq!(e.price_cents, Some(MAX_PRICE_CENTS));
        assert_eq!(e.quantity, Some(MAX_QUANTITY));
        for (json, field) in [
            (created("1000000000000.01", "1"), "data.price"),
            (created("\"92233720368547758.07\"", "1"), "data.price"),
            (created("1", "1000000000001"), "data.quantity"),
            (
                r#"{"eventType":"ProductUpdated","timestamp":1,"data":{"productId":1,"sellerId":"s","changes":{"quantity":{"old":1,"new":9223372036854775807}}}}"#.to_string(),
                "data.changes.quantity.new",
            ),
        ] {
            assert_over_limit(&json, field);
        }
    }

    #[test]
    fn created_with_full_data() {
        let e = ok(
            r#"{"eventId":"x","eventType":"ProductCreated","timestamp":1696176060000,
            "data":{"productId":12345,"sellerId":"seller-1","name":"Wireless Mouse","description":"d",
            "price":29.99,"quantity":150,"category":"Electronics","createdAt":"2023","extra":{"a":[1,2]}}}"#,
        );
        assert_eq!(e.kind, EventKind::Created);
        assert_eq!(e.timestamp, 1_696_176_060_000);
        assert_eq!(e.product_id, ProductId::Num(12345));
        assert_eq!(e.seller, "seller-1");
        assert_eq!(e.price_cents, Some(2999));
        assert_eq!(e.quantity, Some(150));
        assert_eq!(e.category.as_deref(), Some("Electronics"));
        assert_eq!(e.name.as_deref(), Some("Wireless Mouse"));
    }

    #[test]
    fn contract_update_changes_win_and_name_old_values() {
        let e = ok(
            r#"{"eventType":"ProductUpdated","timestamp":5,"data":{"productId":"7","sellerId":"s",
            "changes":{"price":{"old":10,"new":12.5},"category":{"old":"Books","new":"Games"},"description":{"old":"a","new":"b"}}}}"#,
        );
        assert_eq!(e.product_id, ProductId::Num(7));
        assert_eq!(e.price_cents, Some(1250));
        assert_eq!(e.quantity, None);
        assert_eq!(e.category.as_deref(), Some("Games"));
        assert_eq!(e.old_category.as_deref(), Some("Books"));
    }

    #[test]
    fn backend_update_with_previous_data_and_string_price() {
        let e = ok(
            r#"{"eventType":"ProductUpdated","timestamp":5,"data":{"productId":7,"sellerId":"s","price":"15.00",
            "quantity":"8","category":"Games","previousData":{"id":7,"seller_id":"s","price":"30.00","quantity":2,"category":"Books"}}}"#,
        );
        assert_eq!(e.price_cents, Some(1500));
        assert_eq!(e.quantity, Some(8));
        assert_eq!(e.old_category.as_deref(), Some("Books"));
        assert_eq!(e.old_seller.as_deref(), Some("s"));
    }

    #[test]
    fn thin_and_full_deletes() {
        let thin = ok(
            r#"{"eventType":"ProductDeleted","timestamp":1,"data":{"productId":"sku-1","sellerId":"s","name":"n","category":"c","deletedAt":"x"}}"#,
        );
        assert_eq!(thin.kind, EventKind::Deleted);
        assert_eq!(thin.product_id, ProductId::Text("sku-1".into()));
        assert_eq!(thin.price_cents, None);
        let full = ok(
            r#"{"eventType":"ProductDeleted","timestamp":1,"data":{"productId":1,"sellerId":"s","price":1,"quantity":0,"category":"c"}}"#,
        );
        assert_eq!(full.price_cents, Some(100));
        assert_eq!(full.quantity, Some(0));
    }

    #[test]
    fn product_ids_normalise() {
        let id = |v: &str| {
            let j = format!(
                r#"{{"eventType":"ProductDeleted","timestamp":1,"data":{{"productId":{v},"sellerId":"s"}}}}"#
            );
            decode(j.as_bytes(), MAX).map(|e| e.product_id)
        };
        assert_eq!(id("12"), Ok(ProductId::Num(12)));
        assert_eq!(id(r#""12""#), Ok(ProductId::Num(12)));
        assert_eq!(id(r#""012""#), Ok(ProductId::Text("012".into())));
        assert_eq!(id("1.5").map_err(|r| r.reason()), Err("invalid_field"));
        assert_eq!(id("-3").map_err(|r| r.reason()), Err("negative_value"));
        assert_eq!(id(r#""""#).map_err(|r| r.reason()), Err("invalid_field"));
    }

    #[test]
    fn exact_decimals() {
        let cents = |t: &str| scaled_decimal(t, 2, "p");
        assert_eq!(cents("29.99"), Ok(2999));
        assert_eq!(cents("29.990"), Ok(2999));
        assert_eq!(cents("0.1"), Ok(10));
        assert_eq!(cents("1e2"), Ok(10000));
        assert_eq!(cents("2999e-2"), Ok(2999));
        assert_eq!(cents("-0.00"), Ok(0));
        assert!(cents("29.999").is_err());
        assert!(cents("0.30000000000000004").is_err());
        assert!(cents("1e400").is_err());
        assert!(cents("99999999999999999999").is_err());
        assert_eq!(scaled_decimal("150", 0, "q"), Ok(150));
        assert_eq!(scaled_decimal("1.5e1", 0, "q"), Ok(15));
        assert!(scaled_decimal("1.5", 0, "q").is_err());
        assert!(scaled_decimal("1.", 2, "q").is_err());
        assert!(scaled_decimal(".5", 2, "q").is_err());
        assert_eq!(scaled_decimal("0.05", 2, "q"), Ok(5));
        assert_eq!(
            scaled_decimal("999999999999999.99", 2, "q"),
            Ok(99_999_999_999_999_999)
        );
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let e = ok(
            r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","name":"Mo\"use","category":"Books","price":1,"quantity":1}}"#,
        );
        assert!(matches!(e.category, Some(Cow::Borrowed("Books"))));
        assert!(matches!(e.seller, Cow::Borrowed("s")));
        assert_eq!(e.name.as_deref(), Some("Mo\"use"));
        let not_utf8 = decode(b"{\"eventType\":\"ProductCreated\",\"x\":\"\xff\"}", MAX);
        assert_eq!(not_utf8.err().map(|r| r.reason()), Some("invalid_json"));
    }

    /// DESIGN §2: every value is a JSON object. serde's derived structs
    /// also take arrays (fields by position): an array event was applied.
    #[test]
    fn only_objects_are_events_and_rejections_name_the_field() {
        let rejected = |text: &str| {
            decode(text.as_bytes(), 1 << 20)
                .err()
                .map(|r| r.to_string())
        };
        let array_event = r#"["ProductCreated",1,[50,"s9","n","c",5,1,null,null]]"#;
        assert_eq!(
            rejected(array_event).as_deref(),
            Some(
                "field event is invalid: invalid type: sequence, expected a JSON object (column 0)"
            )
        );
        let data = r#"{"eventType":"ProductCreated","timestamp":1,"data":[50,"s9","n","c",5,1,null,null]}"#;
        assert!(
            rejected(data)
                .is_some_and(|r| r.starts_with("field data is invalid: invalid type: sequence"))
        );
        let changes = r#"{"eventType":"ProductUpdated","timestamp":1,"data":{"productId":1,"sellerId":"s","changes":{"price":[1,2]}}}"#;
        assert!(
            rejected(changes).is_some_and(|r| r.starts_with("field data.changes.price is invalid"))
        );
        let previous = r#"{"eventType":"ProductUpdated","timestamp":1,"data":{"productId":1,"sellerId":"s","previousData":["s0","Books"]}}"#;
        assert!(
            rejected(previous).is_some_and(|r| r.starts_with("field data.previousData is invalid"))
        );
        let name = r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","name":123}}"#;
        assert_eq!(
            rejected(name).as_deref(),
            Some(
                "field data.name is invalid: invalid type: integer `123`, expected a string or null (column 91)"
            )
        );
        assert_eq!(
            rejected("  ").as_deref(),
            Some("not valid JSON: empty: no JSON value")
        );
        let cut = r#"{"eventType":"ProductCreated","#;
        assert_eq!(
            rejected(cut).as_deref(),
            Some("not valid JSON: EOF while parsing a value (column 30)")
        );
    }

    /// A create must carry a whole product; null is no value.
    #[test]
    fn a_create_without_price_quantity_or_category_is_rejected() {
        let whole = r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","category":"c","price":1,"quantity":1}}"#;
        assert!(decode(whole.as_bytes(), MAX).is_ok());
        for (field, without) in [
            (
                "data.price",
                whole.replace(r#""price":1"#, r#""price":null"#),
            ),
            ("data.quantity", whole.replace(r#","quantity":1"#, "")),
            ("data.category", whole.replace(r#""category":"c","#, "")),
        ] {
            assert_eq!(
                decode(without.as_bytes(), MAX).err(),
                Some(Rejection::MissingField(field)),
                "{without}"
            );
        }
        // Updates and deletes change what they name.
        let update = whole
            .replace("ProductCreated", "ProductUpdated")
            .replace(r#""price":1"#, r#""price":null"#);
        assert!(decode(update.as_bytes(), MAX).is_ok());
    }

    #[test]
    fn bad_input_is_typed() {
        assert_eq!(reason("not json"), "invalid_json");
        assert_eq!(reason(""), "invalid_json");
        assert_eq!(
            reason(r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1"#),
            "invalid_json"
        );
        assert_eq!(reason("[1,2]"), "invalid_field");
        assert_eq!(
            reason(
                r#"{"eventType":"ProductExploded","timestamp":1,"data":{"productId":1,"sellerId":"s"}}"#
            ),
            "unknown_event_type"
        );
        assert_eq!(
            reason(r#"{"timestamp":1,"data":{"productId":1,"sellerId":"s"}}"#),
            "missing_field"
        );
        assert_eq!(
            reason(r#"{"eventType":"ProductCreated","data":{"productId":1,"sellerId":"s"}}"#),
            "missing_field"
        );
        assert_eq!(
            reason(r#"{"eventType":"ProductCreated","timestamp":1}"#),
            "missing_field"
        );
        assert_eq!(
            reason(r#"{"eventType":"ProductCreated","timestamp":1,"data":{"sellerId":"s"}}"#),
            "missing_field"
        );
        assert_eq!(
            reason(r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1}}"#),
            "missing_field"
        );
        assert_eq!(
            reason(
                r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","quantity":-1}}"#
            ),
            "negative_value"
        );
        assert_eq!(
            reason(
                r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","price":{"a":1}}}"#
            ),
            "invalid_field"
        );
        assert_eq!(
            reason(
                r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","price":"NaN"}}"#
            ),
            "invalid_field"
        );
        assert_eq!(
            reason(
                r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","price":"Infinity"}}"#
            ),
            "invalid_field"
        );
        assert_eq!(
            reason(
                r#"{"eventType":"ProductCreated","timestamp":"soon","data":{"productId":1,"sellerId":"s"}}"#
            ),
            "invalid_field"
        );
        assert_eq!(
            reason(
                r#"{"eventType":"ProductCreated","timestamp":-5,"data":{"productId":1,"sellerId":"s"}}"#
            ),
            "negative_value"
        );
        assert_eq!(
            reason(
                r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":7}}"#
            ),
            "invalid_field"
        );
        assert_eq!(
            reason(r#"{"eventType":"ProductCreated","timestamp":1,"data":"x"}"#),
            "invalid_field"
        );
        let big = format!(
            r#"{{"eventType":"ProductCreated","pad":"{}"}}"#,
            "x".repeat(100)
        );
        assert_eq!(
            decode(big.as_bytes(), 64).map_err(|r| r.reason()),
            Err("too_large")
        );
    }
}
