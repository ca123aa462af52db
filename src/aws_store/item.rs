//! Metric items as DynamoDB attribute maps.
//!
//! The attributes are exactly the embedded store's (`store::entity_object`,
//! `store::low_stock_value`, read back by `store::parse_item_value`), so both
//! stores share one item model and one item -> record conversion. Only the
//! types differ: JSON numbers become `N`; money (`totalValue`,
//! `averagePrice`, `price`), a two-decimal string in JSON, is written as `N`
//! with the exact decimal text (`120.00`), so analysts can sum and compare
//! it in DynamoDB and Athena. DynamoDB may give a number back normalised
//! (`120`), so reading pads it back to two decimals.

use super::AwsStoreError;
use crate::store::JsonObject;
use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::Value;
use std::collections::HashMap;

pub type Item = HashMap<String, AttributeValue>;

/// Attributes holding money: `N` in DynamoDB, a two-decimal string in JSON.
const MONEY: &[&str] = &["totalValue", "averagePrice", "price"];

fn encode_err(detail: String) -> AwsStoreError {
    AwsStoreError::Encode {
        what: "item",
        detail,
    }
}

fn decode_err(detail: String) -> AwsStoreError {
    AwsStoreError::Decode {
        what: "item",
        detail,
    }
}

/// An item: its keys plus the attributes of a JSON object.
pub fn to_item(pk: &str, sk: &str, obj: &JsonObject) -> Result<Item, AwsStoreError> {
    let mut item = Item::with_capacity(obj.len() + 2);
    item.insert("PK".into(), AttributeValue::S(pk.into()));
    item.insert("SK".into(), AttributeValue::S(sk.into()));
    for (name, value) in obj {
        let attr = match value {
            Value::Null => AttributeValue::Null(true),
            Value::Bool(b) => AttributeValue::Bool(*b),
            Value::Number(n) => AttributeValue::N(n.to_string()),
            Value::String(s) if MONEY.contains(&name.as_str()) => AttributeValue::N(s.clone()),
            Value::String(s) => AttributeValue::S(s.clone()),
            other => return Err(encode_err(format!("{name}: unsupported value {other}"))),
        };
        item.insert(name.clone(), attr);
    }
    Ok(item)
}

/// An item's attributes (keys left out) as the JSON object the embedded
/// store would hold.
pub fn to_json(item: &Item) -> Result<Value, AwsStoreError> {
    let mut obj = JsonObject::new();
    for (name, attr) in item {
        if name == "PK" || name == "SK" {
            continue;
        }
        let value = match attr {
            AttributeValue::Null(_) => Value::Null,
            AttributeValue::Bool(b) => Value::Bool(*b),
            AttributeValue::S(s) => Value::String(s.clone()),
            AttributeValue::N(n) if MONEY.contains(&name.as_str()) => Value::String(
                money_text(n)
                    .ok_or_else(|| decode_err(format!("{name}: not a money amount: {n:?}")))?,
            ),
            AttributeValue::N(n) => serde_json::from_str::<serde_json::Number>(n)
                .map(Value::Number)
                .map_err(|e| decode_err(format!("{name}: {n:?}: {e}")))?,
            other => return Err(decode_err(format!("{name}: unsupported type {other:?}"))),
        };
        obj.insert(name.clone(), value);
    }
    Ok(Value::Object(obj))
}

/// A DynamoDB number with at most two decimals as an exact two-decimal
/// string (`120` -> `120.00`, `15.5` -> `15.50`, `-0.1` -> `-0.10`).
pub fn money_text(n: &str) -> Option<String> {
    let (neg, digits) = match n.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, n.strip_prefix('+').unwrap_or(n)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let frac = frac.trim_end_matches('0');
    if frac.len() > 2
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        || (int.is_empty() && frac.is_empty())
    {
        return None;
    }
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let zero = int == "0" && frac.is_empty();
    let sign = if neg && !zero { "-" } else { "" };
    Some(format!("{sign}{int}.{frac:0<2}"))
}

/// A string attribute.
pub fn s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

/// A number attribute as u64.
pub fn n_u64(item: &Item, name: &str) -> Option<u64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

pub fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([
        ("PK".to_string(), AttributeValue::S(pk.into())),
        ("SK".to_string(), AttributeValue::S(sk.into())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_numbers_come_back_with_two_decimals() {
        for (n, text) in [
            ("120", "120.00"),
            ("120.00", "120.00"),
            ("15.5", "15.50"),
            ("0", "0.00"),
            ("0.00", "0.00"),
            ("-0.1", "-0.10"),
            ("-0", "0.00"),
            ("007.05", "7.05"),
            (
                "12345678901234567890123456789012345.67",
                "12345678901234567890123456789012345.67",
            ),
        ] {
            assert_eq!(money_text(n).as_deref(), Some(text), "{n}");
        }
        for bad in ["1.234", "abc", "", "1e3", "."] {
            assert_eq!(money_text(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_item_and_its_json_convert_both_ways() {
        let json = serde_json::json!({
            "sellerId": "s1", "totalProducts": 2, "totalValue": "120.00",
            "lastEventAt": -1, "TTL": 1_700_000_000, "since": null,
            "productId": "x-1",
        });
        let Value::Object(obj) = json.clone() else {
            panic!()
        };
        let item = to_item("SELLER#s1", "CURRENT", &obj).unwrap();
        assert_eq!(item["PK"], AttributeValue::S("SELLER#s1".into()));
        assert_eq!(item["totalValue"], AttributeValue::N("120.00".into()));
        assert_eq!(item["totalProducts"], AttributeValue::N("2".into()));
        assert_eq!(item["productId"], AttributeValue::S("x-1".into()));
        assert_eq!(to_json(&item).unwrap(), json);

        // A normalised number from DynamoDB reads back the same.
        let mut normalised = item.clone();
        normalised.insert("totalValue".into(), AttributeValue::N("120".into()));
        assert_eq!(to_json(&normalised).unwrap(), json);
    }
}
