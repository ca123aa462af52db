//! Routing: which shard an event belongs to, and which worker folds a shard.

use serde::Deserialize;
use std::borrow::Cow;

/// Java's `String.hashCode` over UTF-16 code units, as the catalogue backend
/// computes it to pick a partition.
pub fn java_string_hash(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32))
}

/// `abs(javaStringHash(key)) % shards`, the backend's partitioner.
pub fn shard_for_key(key: &str, shards: u32) -> u32 {
    java_string_hash(key).unsigned_abs() % shards
}

/// The worker that folds a shard; fixed for the life of the tree.
pub fn worker_for_shard(shard: u32, workers: usize) -> usize {
    shard as usize % workers
}

#[derive(Deserialize)]
struct KeyOnly<'a> {
    #[serde(borrow)]
    data: Option<KeyData<'a>>,
}

#[derive(Deserialize)]
struct KeyData<'a> {
    #[serde(rename = "sellerId", borrow)]
    seller_id: Option<Cow<'a, str>>,
}

/// The message key a producer would use (`data.sellerId`). A line without
/// one is still routed (to shard 0), where the worker rejects it.
pub fn seller_key(line: &[u8]) -> Option<Cow<'_, str>> {
    serde_json::from_slice::<KeyOnly<'_>>(line)
        .ok()?
        .data?
        .seller_id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_java_string_hash_code() {
        // Values computed with java.lang.String#hashCode.
        assert_eq!(java_string_hash(""), 0);
        assert_eq!(java_string_hash("a"), 97);
        assert_eq!(java_string_hash("seller-123"), 315_796_196);
        assert_eq!(java_string_hash("polygenelubricants"), i32::MIN);
        assert_eq!(shard_for_key("polygenelubricants", 4), 0);
    }

    #[test]
    fn finds_the_seller_key() {
        assert_eq!(
            seller_key(br#"{"data":{"x":[1],"sellerId":"s-1"},"eventType":"x"}"#).as_deref(),
            Some("s-1")
        );
        assert_eq!(seller_key(b"not json"), None);
        assert_eq!(seller_key(br#"{"data":{"productId":1}}"#), None);
    }
}
