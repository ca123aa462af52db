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
    if let Some(key) = scan_seller_key(line) {
        return Some(Cow::Borrowed(key));
    }
    serde_json::from_slice::<KeyOnly<'_>>(line)
        .ok()?
        .data?
        .seller_id
}

/// The fast path, without parsing the whole line: exactly one `"sellerId"`
/// key with a plain string value (no escapes). Anything else (no such key,
/// several, an escaped value) is left to the full parse. In valid JSON the
/// bytes `"sellerId"` followed by `:` can only be a key: inside a string
/// the quotes would be escaped.
fn scan_seller_key(line: &[u8]) -> Option<&str> {
    // The key without its opening quote, checked separately: with the quote
    // in the needle, the finder's rare-byte prefilter picked the quote,
    // which JSON is full of (callgrind: 850 instructions per line).
    const KEY: &[u8] = b"sellerId\"";
    // Built once: building a finder per line was 1% of the supervisor.
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(KEY));
    let mut found = None;
    for at in FINDER.find_iter(line) {
        if at == 0 || line[at - 1] != b'"' {
            continue;
        }
        let rest = skip_ws(&line[at + KEY.len()..]);
        let rest = skip_ws(rest.strip_prefix(b":")?);
        let value = rest.strip_prefix(b"\"")?;
        let end = memchr::memchr(b'"', value)?;
        let value = &value[..end];
        if found.is_some() || value.contains(&b'\\') {
            return None;
        }
        found = Some(std::str::from_utf8(value).ok()?);
    }
    found
}

fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
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

    #[test]
    fn fast_path_agrees_with_the_parse_or_defers_to_it() {
        let cases: [&[u8]; 6] = [
            br#"{"data":{"sellerId" : "s-1","name":"x \"sellerId\": \"no\""}}"#,
            br#"{"data":{"changes":{"sellerId":{"old":"a","new":"b"}},"sellerId":"b"}}"#,
            br#"{"data":{"sellerId":"a\"b"}}"#,
            br#"{"data":{"sellerId":"a"},"x":{"sellerId":"b"}}"#,
            br#"{"data":{"seller_id":"a"}}"#,
            br#"{"data":{"sellerId":7}}"#,
        ];
        for line in cases {
            let parsed = serde_json::from_slice::<KeyOnly<'_>>(line)
                .ok()
                .and_then(|k| k.data?.seller_id);
            assert_eq!(
                seller_key(line),
                parsed,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            scan_seller_key(br#"{"data":{"sellerId":"s-1"}}"#),
            Some("s-1")
        );
        assert_eq!(
            scan_seller_key(br#"{"data":{"sellerId":"a"},"x":{"sellerId":"b"}}"#),
            None,
            "ambiguous: parse"
        );
    }
}
