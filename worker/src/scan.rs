//! The fast path of decoding: one pass over a well-formed event that picks
//! out the [`Fields`] decoding needs and checks the JSON on the way.
//!
//! serde_json spends most of its time per key (parsing each key as a string
//! and matching it against the struct's fields), and an event has thirty
//! keys or so, most of them of no interest. The scanner compares raw keys
//! and skips uninteresting values with a word-at-a-time string scan.
//!
//! It takes only what producers ordinarily send (objects, strings without
//! escapes or control characters, numbers, `true`/`false`/`null`, arrays)
//! with the expected types in the fields it reads, and returns `None` for
//! anything else: an escape, a field of another type, a repeated field,
//! deep nesting, bad JSON. The caller then decodes through serde_json,
//! which knows every rule and words the error. So the scanner never rejects
//! an event, and where it answers it gives what serde_json gives
//! (`tests::agrees_with_serde_json` and the property test in
//! `tests/fold_props.rs` hold this).
//!
//! The input is already known to be UTF-8, so slicing at the ASCII quote,
//! brace and comma positions the scanner stops at is always on a char
//! boundary.

use crate::decode::{DataFields, Fields};
use std::borrow::Cow;

/// Deeper values are left to serde_json (whose own limit is 128).
const MAX_DEPTH: u32 = 64;

/// The fields of `text` when it is a well-formed event of the usual shape.
pub fn fields(text: &str) -> Option<Fields<'_>> {
    let mut s = Scanner {
        text,
        b: text.as_bytes(),
        pos: 0,
    };
    s.ws();
    let fields = s.event()?;
    s.ws();
    (s.pos == s.b.len()).then_some(fields)
}

struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    pos: usize,
}

/// Marks a field as seen; `None` if it was seen before (serde rejects a
/// repeated field of a struct).
fn once(seen: &mut u32, bit: u32) -> Option<()> {
    let mask = 1 << bit;
    if *seen & mask != 0 {
        return None;
    }
    *seen |= mask;
    Some(())
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    /// An object at the current position: `member` is called with each key
    /// and the position at its value, which it must consume.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.pos += 1;
        self.ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(());
        }
        loop {
            self.ws();
            let key = self.string()?;
            self.ws();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string without escapes or control characters: its content.
    fn string(&mut self) -> Option<&'a str> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.pos + 1;
        let end = start + plain_len(self.b.get(start..)?)?;
        self.pos = end + 1;
        self.text.get(start..end)
    }

    /// Any value, checked; its text.
    fn value(&mut self, depth: u32) -> Option<&'a str> {
        if depth > MAX_DEPTH {
            return None;
        }
        let start = self.pos;
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'{' => self.object(|s, _| s.value(depth + 1).map(drop))?,
            b'[' => self.array(depth)?,
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        self.text.get(start..self.pos)
    }

    fn array(&mut self, depth: u32) -> Option<()> {
        self.pos += 1;
        self.ws();
        if self.peek()? == b']' {
            self.pos += 1;
            return Some(());
        }
        loop {
            self.ws();
            self.value(depth + 1)?;
            self.ws();
            match self.peek()? {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if !self.b.get(self.pos..)?.starts_with(word) {
            return None;
        }
        self.pos += word.len();
        Some(())
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }

    /// `null` (absent) or a plain string.
    fn opt_str(&mut self) -> Option<Option<Cow<'a, str>>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| None),
            _ => self.string().map(|s| Some(Cow::Borrowed(s))),
        }
    }

    /// `null` (absent) or any value's text.
    fn opt_raw(&mut self, depth: u32) -> Option<Option<&'a str>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| None),
            _ => self.value(depth).map(Some),
        }
    }

    /// `null` (absent, `Some(false)`) or an object read by `read`
    /// (`Some(true)`).
    fn opt_object(&mut self, read: impl FnOnce(&mut Self) -> Option<()>) -> Option<bool> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| false),
            b'{' => read(self).map(|()| true),
            _ => None,
        }
    }

    fn event(&mut self) -> Option<Fields<'a>> {
        let mut f = Fields::default();
        let mut data = DataFields::default();
        let mut has_data = false;
        let mut seen = 0;
        self.object(|s, key| match key {
            "eventType" => {
                once(&mut seen, 0)?;
                f.event_type = s.opt_str()?;
                Some(())
            }
            "timestamp" => {
                once(&mut seen, 1)?;
                f.timestamp = s.opt_raw(2)?;
                Some(())
            }
            "data" => {
                once(&mut seen, 2)?;
                has_data = s.opt_object(|s| s.data(&mut data))?;
                Some(())
            }
            _ => s.value(2).map(drop),
        })?;
        f.data = has_data.then_some(data);
        Some(f)
    }

    fn data(&mut self, d: &mut DataFields<'a>) -> Option<()> {
        let mut seen = 0;
        self.object(|s, key| {
            match key {
                "productId" => {
                    once(&mut seen, 0)?;
                    d.product_id = s.opt_raw(3)?;
                }
                "sellerId" => {
                    once(&mut seen, 1)?;
                    d.seller_id = s.opt_str()?;
                }
                "name" => {
                    once(&mut seen, 2)?;
                    d.name = s.opt_str()?;
                }
                "category" => {
                    once(&mut seen, 3)?;
                    d.category = s.opt_str()?;
                }
                "price" => {
                    once(&mut seen, 4)?;
                    d.price = s.opt_raw(3)?;
                }
                "quantity" => {
                    once(&mut seen, 5)?;
                    d.quantity = s.opt_raw(3)?;
                }
                "changes" => {
                    once(&mut seen, 6)?;
                    s.opt_object(|s| s.changes(d))?;
                }
                "previousData" => {
                    once(&mut seen, 7)?;
                    s.opt_object(|s| s.previous(d))?;
                }
                _ => {
                    s.value(3)?;
                }
            }
            Some(())
        })
    }

    fn changes(&mut self, d: &mut DataFields<'a>) -> Option<()> {
        let mut seen = 0;
        self.object(|s, key| {
            match key {
                "price" => {
                    once(&mut seen, 0)?;
                    s.opt_object(|s| s.new_value(&mut d.new_price))?;
                }
                "quantity" => {
                    once(&mut seen, 1)?;
                    s.opt_object(|s| s.new_value(&mut d.new_quantity))?;
                }
                "category" => {
                    once(&mut seen, 2)?;
                    s.opt_object(|s| s.str_change(&mut d.old_category, &mut d.new_category))?;
                }
                "name" => {
                    once(&mut seen, 3)?;
                    let mut old = None;
                    s.opt_object(|s| s.str_change(&mut old, &mut d.new_name))?;
                }
                "sellerId" => {
                    once(&mut seen, 4)?;
                    s.opt_object(|s| s.str_change(&mut d.old_seller_id, &mut d.new_seller_id))?;
                }
                _ => {
                    s.value(4)?;
                }
            }
            Some(())
        })
    }

    /// `{"new": value, …}`: the value's text (`old` and the rest ignored).
    fn new_value(&mut self, new: &mut Option<&'a str>) -> Option<()> {
        let mut seen = 0;
        self.object(|s, key| match key {
            "new" => {
                once(&mut seen, 0)?;
                *new = s.opt_raw(5)?;
                Some(())
            }
            _ => s.value(5).map(drop),
        })
    }

    /// `{"old": string, "new": string, …}`.
    fn str_change(
        &mut self,
        old: &mut Option<Cow<'a, str>>,
        new: &mut Option<Cow<'a, str>>,
    ) -> Option<()> {
        let mut seen = 0;
        self.object(|s, key| match key {
            "old" => {
                once(&mut seen, 0)?;
                *old = s.opt_str()?;
                Some(())
            }
            "new" => {
                once(&mut seen, 1)?;
                *new = s.opt_str()?;
                Some(())
            }
            _ => s.value(5).map(drop),
        })
    }

    fn previous(&mut self, d: &mut DataFields<'a>) -> Option<()> {
        let mut seen = 0;
        self.object(|s, key| match key {
            "seller_id" => {
                once(&mut seen, 0)?;
                d.previous_seller_id = s.opt_str()?;
                Some(())
            }
            "category" => {
                once(&mut seen, 1)?;
                d.previous_category = s.opt_str()?;
                Some(())
            }
            _ => s.value(4).map(drop),
        })
    }
}

/// The length of a string's content up to its closing quote, when it has
/// no backslash or control character before it; eight bytes at a time.
fn plain_len(b: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte that is zero. Borrows only run upwards from
    // a real match, so the lowest bit set is always a real one.
    let zero_bytes = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut i = 0;
    while let Some(word) = b.get(i..i + 8) {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        let w = u64::from_le_bytes(w);
        let special = zero_bytes(w ^ (ONES * b'"' as u64))
            | zero_bytes(w ^ (ONES * b'\\' as u64))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
        if special != 0 {
            let at = i + (special.trailing_zeros() / 8) as usize;
            return (b.get(at) == Some(&b'"')).then_some(at);
        }
        i += 8;
    }
    for (j, &c) in b.get(i..)?.iter().enumerate() {
        match c {
            b'"' => return Some(i + j),
            b'\\' | 0..=0x1f => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::fields_by_serde;

    /// The scanner either declines or agrees with serde_json.
    fn agree(text: &str) -> bool {
        match fields(text) {
            None => false,
            Some(fast) => {
                let slow = fields_by_serde(text);
                assert_eq!(
                    Ok(&fast),
                    slow.as_ref(),
                    "scanner and serde_json differ on {text}"
                );
                true
            }
        }
    }

    #[test]
    fn agrees_with_serde_json() {
        let taken = [
            r#"{"eventId":"x","eventType":"ProductCreated","timestamp":1696176060000,"data":{"productId":12345,"sellerId":"seller-1","name":"Wireless Mouse","description":"d","price":29.99,"quantity":150,"category":"Electronics","createdAt":"2023","extra":{"a":[1,2.5e-3,true,false,null,{}],"b":[]}}}"#,
            r#" { "eventType" : "ProductUpdated" , "timestamp" : "5" , "data" : { "productId" : "7" , "sellerId" : "s" , "changes" : { "price" : { "old" : 10 , "new" : 12.5 } , "category" : { "old" : "Books" , "new" : "Games" } , "name" : {"old":"a","new":"b"}, "sellerId": {"old": "s0", "new": "s"}, "quantity": {"new": null}, "description" : { "old" : "a" , "new" : "b" } } } } "#,
            r#"{"eventType":"ProductUpdated","timestamp":5,"data":{"productId":7,"sellerId":"s","price":"15.00","quantity":"8","category":"Games","previousData":{"id":7,"seller_id":"s","price":"30.00","quantity":2,"category":"Books"}}}"#,
            r#"{"eventType":null,"timestamp":null,"data":null}"#,
            r#"{"data":{"changes":null,"previousData":null,"price":{"x":1},"quantity":[1]}}"#,
            r#"{"eventType":"ProductDeleted","timestamp":1,"data":{"productId":"sku-1","sellerId":"s","name":"Caf\u00e9 ☕","category":"c"}}"#,
            "{}",
            r#"{"eventType":"X","timestamp":-0.5E+2}"#,
        ];
        for t in taken {
            // The one with an escape is left to serde_json.
            assert_eq!(agree(t), !t.contains('\\'), "{t}");
        }
        let declined = [
            "",
            "null",
            "[1]",
            "{",
            r#"{"a":1,}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a":tru}"#,
            r#"{"a":"x"}x"#,
            r#"{"a":[1,]}"#,
            r#"{"a" 1}"#,
            "{\"a\":\"tab\there\"}",
            r#"{"eventType":"A","eventType":"B"}"#,
            r#"{"eventType":5}"#,
            r#"{"data":"x"}"#,
            r#"{"data":{"sellerId":1}}"#,
            r#"{"data":{"changes":{"price":{"new":1,"new":2}}}}"#,
            r#"{"data":{"changes":{"category":{"old":1}}}}"#,
            r#"{"data":{"previousData":{"category":true}}}"#,
            r#"{"data":["positional"]}"#,
        ];
        for t in declined {
            assert!(fields(t).is_none(), "took {t}");
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert!(fields(&deep).is_none());
    }

    #[test]
    fn generated_events_take_the_fast_path_and_agree() {
        let mut bytes = Vec::new();
        let opts = crate::generate::GenOptions {
            events: 3000,
            bad_every: 7,
            ..Default::default()
        };
        crate::generate::generate(&opts, &mut bytes).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let (mut fast, mut lines) = (0, 0);
        for line in text.lines() {
            lines += 1;
            fast += agree(line) as usize;
        }
        // Every well-formed event (6 in 7) is scanned.
        assert!(fast * 7 >= lines * 6 - 7, "{fast} of {lines}");
    }

    #[test]
    fn plain_len_stops_at_the_quote_and_declines_escapes() {
        assert_eq!(plain_len(b"abc\"rest"), Some(3));
        assert_eq!(plain_len(b"0123456789abcdef\"x"), Some(16));
        assert_eq!(plain_len("é—☕\"".as_bytes()), Some(8));
        assert_eq!(plain_len(b"0123456789\\\"x"), None);
        assert_eq!(plain_len(b"0123456789\n\"x"), None);
        assert_eq!(plain_len(b"unterminated"), None);
        assert_eq!(plain_len(b"\x7f\x7f\x7f\x7f\x7f\x7f\x7f\x7f\""), Some(8));
    }
}
