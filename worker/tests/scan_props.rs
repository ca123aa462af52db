//! The fast scanner against serde_json: for realistic events, for any
//! mutation of them (bytes cut, tokens spliced in), and for generated
//! documents built from the event's keys with values of any type, repeated
//! keys, odd numbers and strings, the scanner either declines or gives
//! exactly the fields serde_json gives.

use analytics_worker::decode::fields_by_serde;
use analytics_worker::generate::{GenOptions, generate};
use analytics_worker::scan;
use proptest::prelude::*;

/// Events of both dialects, some malformed, from the generator.
static EVENTS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(events);

fn events() -> Vec<String> {
    let mut bytes = Vec::new();
    let opts = GenOptions {
        events: 400,
        bad_every: 9,
        seed: 17,
        ..GenOptions::default()
    };
    generate(&opts, &mut bytes).expect("generate into memory");
    String::from_utf8(bytes)
        .expect("generated events are UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Pieces that make or break JSON and the event's shape.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\n",
    "\\u00e9",
    " ",
    "\t",
    "\n",
    "null",
    "true",
    "false",
    "0",
    "01",
    "-",
    "1.5",
    "1e3",
    ".",
    "e",
    "\"eventType\":",
    "\"data\":",
    "\"changes\":",
    "\"new\":",
    "\"old\":",
    "\"price\":",
    "\"sellerId\":",
    "\"previousData\":",
    "\"category\":",
    "\"x\"",
    "\u{1}",
    "é",
    "{}",
    "[]",
    "\"ProductUpdated\"",
];

#[derive(Clone, Debug)]
enum Mutation {
    Cut { at: usize, len: usize },
    Splice { at: usize, token: usize },
    Replace { at: usize, token: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..12).prop_map(|(at, len)| Mutation::Cut { at, len }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, token)| Mutation::Splice { at, token }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, token)| Mutation::Replace { at, token }),
    ]
}

/// Applies a mutation at a char boundary. Start positions wrap around the
/// text; a span's end is clamped to it (wrapping it too could put the end
/// before the start).
fn mutate(text: &str, m: &Mutation) -> String {
    let floor = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let start = |at: usize| floor(at % (text.len() + 1));
    let end = |from: usize, len: usize| floor(from.saturating_add(len).min(text.len())).max(from);
    let mut out = text.to_string();
    match *m {
        Mutation::Cut { at, len } => {
            let a = start(at);
            out.replace_range(a..end(a, len), "");
        }
        Mutation::Splice { at, token } => out.insert_str(start(at), TOKENS[token]),
        Mutation::Replace { at, token } => {
            // One character (up to 4 bytes in UTF-8), if any is left.
            let a = start(at);
            let b = match end(a, 1) {
                b if b == a => end(a, 4),
                b => b,
            };
            out.replace_range(a..b, TOKENS[token]);
        }
    }
    out
}

fn check(text: &str) -> Result<bool, TestCaseError> {
    match scan::fields(text) {
        None => Ok(false),
        Some(fast) => {
            let slow = fields_by_serde(text);
            prop_assert_eq!(Ok(&fast), slow.as_ref(), "on {}", text);
            Ok(true)
        }
    }
}

#[test]
fn well_formed_events_are_scanned() {
    let events = events();
    let scanned = events.iter().filter(|e| check(e).unwrap_or(false)).count();
    // Malformed lines that are not JSON fall to serde_json; the rest scan.
    assert!(
        scanned * 10 >= events.len() * 8,
        "{scanned} of {}",
        events.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn mutated_events_are_declined_or_agree(
        pick in any::<usize>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut text = EVENTS[pick % EVENTS.len()].clone();
        for m in &mutations {
            text = mutate(&text, m);
        }
        check(&text)?;
    }
}

/// A JSON-like document: numbers and strings as raw text from pools that
/// hold valid and invalid forms, keys from the event's schema.
#[derive(Clone, Debug)]
enum Doc {
    Raw(&'static str),
    Array(Vec<Doc>),
    Object(Vec<(&'static str, Doc)>),
}

const KEYS: &[&str] = &[
    "eventType",
    "timestamp",
    "data",
    "productId",
    "sellerId",
    "name",
    "category",
    "price",
    "quantity",
    "changes",
    "previousData",
    "seller_id",
    "old",
    "new",
    "description",
    "x",
];

/// Scalars the scanner takes, and ones it must leave to serde_json
/// (invalid, or with escapes or control characters).
const GOOD: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "12",
    "-3",
    "29.99",
    "1e5",
    "-0.5E+2",
    "\"\"",
    "\"s1\"",
    "\"ProductCreated\"",
    "\"ProductUpdated\"",
    "\"15.00\"",
    "\"é☕\"",
];
const BAD: &[&str] = &[
    "01",
    "1.",
    "-",
    "1e",
    ".5",
    "nul",
    "+1",
    "\"caf\\u00e9\"",
    "\"tab\there\"",
    "\"a\\\"b\"",
    "\"x\\\\\"",
    "\"unterminated",
];

fn scalar() -> impl Strategy<Value = Doc> {
    prop_oneof![
        12 => (0..GOOD.len()).prop_map(|i| Doc::Raw(GOOD[i])),
        1 => (0..BAD.len()).prop_map(|i| Doc::Raw(BAD[i])),
    ]
}

fn doc() -> impl Strategy<Value = Doc> {
    scalar().prop_recursive(5, 40, 6, |inner| {
        prop_oneof![
            1 => proptest::collection::vec(inner.clone(), 0..3).prop_map(Doc::Array),
            3 => proptest::collection::vec((key(), inner), 0..6).prop_map(Doc::Object),
        ]
    })
}

fn key() -> impl Strategy<Value = &'static str> {
    (0..KEYS.len()).prop_map(|i| KEYS[i])
}

/// Top-level keys: the envelope's, so that repeats are common.
fn top_key() -> impl Strategy<Value = &'static str> {
    (0..4usize).prop_map(|i| ["eventType", "timestamp", "data", "x"][i])
}

/// The text of a document, with whitespace where `ws` says.
fn render(d: &Doc, ws: &mut impl Iterator<Item = bool>, out: &mut String) {
    fn space(ws: &mut impl Iterator<Item = bool>, out: &mut String) {
        if ws.next().unwrap_or(false) {
            out.push(' ');
        }
    }
    match d {
        Doc::Raw(t) => out.push_str(t),
        Doc::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                space(ws, out);
                render(item, ws, out);
            }
            out.push(']');
        }
        Doc::Object(members) => {
            out.push('{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                space(ws, out);
                out.push('"');
                out.push_str(k);
                out.push_str("\":");
                space(ws, out);
                render(v, ws, out);
            }
            out.push('}');
        }
    }
}

#[test]
fn generated_documents_are_declined_or_agree() {
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config::with_cases(5000));
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let strategy = (
        proptest::collection::vec((top_key(), prop_oneof![2 => scalar(), 1 => doc()]), 0..6),
        proptest::collection::vec(any::<bool>(), 0..64),
    );
    runner
        .run(&strategy, |(members, spaces)| {
            let mut text = String::new();
            render(
                &Doc::Object(members),
                &mut spaces.into_iter().cycle(),
                &mut text,
            );
            if check(&text)? {
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Not a vacuous pass: the scanner answered for many of them.
    let answered = answered.into_inner();
    assert!(answered >= 1000, "the scanner answered {answered} of 5000");
}
