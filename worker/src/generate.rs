//! A deterministic generator of catalogue event values (DESIGN §2) as JSON
//! lines, for the shipped example, tests and benchmarks.
//!
//! The stream looks like the catalogue backend's: ~35% creates, ~50% updates,
//! ~15% deletes; updates and deletes target products created earlier (about
//! 2% target products never seen, i.e. upserts); a deleted product is now and
//! then created again. Half the updates and deletes use the published
//! contract dialect (`changes`, thin deletes), half the backend's
//! (`previousData` in snake_case, full deletes, prices as numeric strings).
//! With `bad_every = K`, every K-th line is malformed instead (§7), rotating
//! through several kinds. The same options always give the same bytes.

use serde::Serialize;
use serde_json::{Map, Value, json};
use std::io::{self, Write};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenOptions {
    /// Lines to write (malformed ones included).
    pub events: u64,
    pub sellers: u32,
    pub seed: u64,
    /// 0 = none; else every K-th line is malformed.
    pub bad_every: u64,
    /// Timestamp of the first event, in ms since the epoch.
    pub start_ms: i64,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            events: 20_000,
            sellers: 200,
            seed: 1,
            bad_every: 0,
            start_ms: 1_696_176_000_000,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenSummary {
    pub lines: u64,
    pub malformed: u64,
}

/// Writes `opts.events` lines of event values to `out`.
pub fn generate(opts: &GenOptions, out: &mut impl Write) -> io::Result<GenSummary> {
    let mut g = Generator::new(opts);
    let mut summary = GenSummary::default();
    let mut line = Vec::with_capacity(2048);
    for n in 1..=opts.events {
        line.clear();
        g.ts += 1 + g.rng.below(500) as i64;
        if opts.bad_every > 0 && n % opts.bad_every == 0 {
            g.malformed(&mut line)?;
            summary.malformed += 1;
        } else {
            g.event(&mut line)?;
        }
        line.push(b'\n');
        out.write_all(&line)?;
        summary.lines += 1;
    }
    Ok(summary)
}

/// `analytics-worker generate`: writes generated events to a file or stdout.
#[derive(Clone, Debug, clap::Args)]
pub struct GenArgs {
    /// Number of lines to write (malformed ones included).
    #[arg(long, default_value_t = GenOptions::default().events)]
    pub events: u64,
    /// Number of distinct sellers.
    #[arg(long, default_value_t = GenOptions::default().sellers)]
    pub sellers: u32,
    /// Seed of the generator; the same seed gives the same bytes.
    #[arg(long, default_value_t = GenOptions::default().seed)]
    pub seed: u64,
    /// Make every K-th line malformed (0 = none).
    #[arg(long, default_value_t = 0)]
    pub bad_every: u64,
    /// Output file (default: stdout).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

impl GenArgs {
    pub fn options(&self) -> GenOptions {
        GenOptions {
            events: self.events,
            sellers: self.sellers.max(1),
            seed: self.seed,
            bad_every: self.bad_every,
            ..GenOptions::default()
        }
    }
}

pub fn run_cli(args: GenArgs) -> io::Result<()> {
    let opts = args.options();
    match &args.out {
        Some(path) => {
            let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
            let mut w = io::BufWriter::new(std::fs::File::create(path).map_err(named)?);
            generate(&opts, &mut w).map_err(named)?;
            w.flush().map_err(named)
        }
        None => {
            let mut w = io::BufWriter::new(io::stdout().lock());
            generate(&opts, &mut w)?;
            w.flush()
        }
    }
}

// ---------------------------------------------------------------------------
// PRNG

/// splitmix64: tiny, fast, and good enough for test data.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    /// True with probability `percent`/100.
    fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T: ?Sized>(&mut self, items: &'a [&'a T]) -> &'a T {
        items[self.below(items.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------
// Vocabulary

const CATEGORIES: &[&str] = &[
    "Electronics",
    "Books",
    "Home & Kitchen",
    "Clothing",
    "Sports & Outdoors",
    "Toys & Games",
    "Beauty",
    "Grocery",
    "Automotive",
    "Garden",
    "Office Supplies",
    "Pet Supplies",
];

const ADJECTIVES: &[&str] = &[
    "Wireless",
    "Ergonomic",
    "Compact",
    "Premium",
    "Organic",
    "Stainless",
    "Portable",
    "Vintage",
    "Smart",
    "Classic",
    "Deluxe",
    "Eco",
    "Heavy-Duty",
    "Ultra-Light",
    "Handmade",
];

const NOUNS: &[&str] = &[
    "Mouse",
    "Keyboard",
    "Water Bottle",
    "Backpack",
    "Desk Lamp",
    "Notebook",
    "Headphones",
    "Yoga Mat",
    "Coffee Grinder",
    "Phone Case",
    "Running Shoes",
    "Board Game",
    "Face Cream",
    "Tea Set",
    "Garden Hose",
    "Dog Leash",
    "Car Charger",
    "Stapler",
    "Cookbook",
    "Rain Jacket",
];

const SENTENCES: &[&str] = &[
    "Built to last with carefully selected materials.",
    "Ideal for everyday use at home, at work or on the go.",
    "Lightweight design that fits easily in a bag or drawer.",
    "Backed by a two-year manufacturer warranty.",
    "Easy to clean and simple to set up in minutes.",
    "A customer favourite for its comfort and reliability.",
    "Ships in recyclable packaging.",
    "Available while stocks last.",
    "Tested for safety and durability by an independent lab.",
    "Pairs well with other items from the same collection.",
    "Thoughtful details make it a great gift.",
    "Designed in-house and assembled with care.",
];

const SKU_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

// ---------------------------------------------------------------------------
// State

#[derive(Clone, Debug)]
enum Pid {
    Num(u64),
    Sku(String),
}

#[derive(Clone, Debug)]
struct Product {
    id: Pid,
    seller: u32,
    name: String,
    description: String,
    price_cents: i64,
    quantity: i64,
    category: &'static str,
    created_at: i64,
    updated_at: i64,
}

struct Generator {
    rng: Rng,
    sellers: u32,
    ts: i64,
    next_id: u64,
    /// Products created (or upserted) and not deleted, in creation order.
    live: Vec<Product>,
    /// Deleted products, candidates for being created again.
    deleted: Vec<Product>,
    bad_kind: usize,
}

/// The envelope, serialized with its fields in contract order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    event_id: String,
    event_type: &'a str,
    timestamp: i64,
    data: Value,
}

impl Generator {
    fn new(opts: &GenOptions) -> Generator {
        let mut rng = Rng::new(opts.seed);
        let next_id = 10_000 + rng.below(1000);
        Generator {
            rng,
            sellers: opts.sellers.max(1),
            ts: opts.start_ms,
            next_id,
            live: Vec::new(),
            deleted: Vec::new(),
            bad_kind: 0,
        }
    }

    fn event(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let roll = self.rng.below(100);
        let (event_type, product, data) = if roll < 35 || self.live.is_empty() {
            self.created()
        } else if roll < 85 {
            self.updated()
        } else {
            self.deleted()
        };
        self.write(out, event_type, &product, data)
    }

    fn write(
        &self,
        out: &mut Vec<u8>,
        event_type: &str,
        p: &Product,
        data: Value,
    ) -> io::Result<()> {
        let env = Envelope {
            event_id: format!(
                "seller-{}-{}-{}-{}",
                p.seller,
                pid_text(&p.id),
                event_type,
                self.ts
            ),
            event_type,
            timestamp: self.ts,
            data,
        };
        serde_json::to_writer(out, &env).map_err(io::Error::other)
    }

    // --- products -----------------------------------------------------------

    fn new_product(&mut self) -> Product {
        let id = if self.rng.percent(5) {
            let mut s = String::from("sku-");
            for _ in 0..6 {
                s.push(SKU_CHARS[self.rng.below(SKU_CHARS.len() as u64) as usize] as char);
            }
            Pid::Sku(s)
        } else {
            self.next_id += 1 + self.rng.below(3);
            Pid::Num(self.next_id)
        };
        // Smaller sellers are more common: the minimum of two uniform picks.
        let seller = 1 + self
            .rng
            .below(self.sellers as u64)
            .min(self.rng.below(self.sellers as u64)) as u32;
        Product {
            id,
            seller,
            name: self.name(),
            description: self.description(),
            price_cents: self.price(),
            quantity: self.quantity(),
            category: self.rng.pick(CATEGORIES),
            created_at: self.ts,
            updated_at: self.ts,
        }
    }

    fn name(&mut self) -> String {
        format!("{} {}", self.rng.pick(ADJECTIVES), self.rng.pick(NOUNS))
    }

    fn description(&mut self) -> String {
        // 60–160 chars, most of them short: the minimum of three picks. With
        // backend updates carrying the row twice, lines average ~450 bytes.
        let extra = self
            .rng
            .below(101)
            .min(self.rng.below(101))
            .min(self.rng.below(101));
        let target = 60 + extra as usize;
        let mut d = String::with_capacity(target + 80);
        while d.len() < target {
            if !d.is_empty() {
                d.push(' ');
            }
            d.push_str(self.rng.pick(SENTENCES));
        }
        // Cut at a word boundary at or before the target, but keep ≥ 60.
        if d.len() > target {
            let cut = d[..target]
                .rfind(' ')
                .filter(|&c| c >= 60)
                .unwrap_or(target);
            d.truncate(cut);
            if !d.ends_with('.') {
                d.push('.');
            }
        }
        d
    }

    /// 1.00–999.99, most under 100.
    fn price(&mut self) -> i64 {
        match self.rng.below(10) {
            0..=5 => self.rng.range(100, 4_999),
            6..=8 => self.rng.range(5_000, 19_999),
            _ => self.rng.range(20_000, 99_999),
        }
    }

    /// 0–500, about a quarter below 10.
    fn quantity(&mut self) -> i64 {
        if self.rng.percent(25) {
            self.rng.range(0, 9)
        } else {
            self.rng.range(10, 500)
        }
    }

    // --- events -------------------------------------------------------------

    fn created(&mut self) -> (&'static str, Product, Value) {
        let mut p = if !self.deleted.is_empty() && self.rng.percent(5) {
            // A deleted product comes back: same id and seller, new listing.
            let i = self.rng.below(self.deleted.len() as u64) as usize;
            let old = self.deleted.swap_remove(i);
            Product {
                price_cents: self.price(),
                quantity: self.quantity(),
                description: self.description(),
                ..old
            }
        } else {
            self.new_product()
        };
        p.created_at = self.ts;
        p.updated_at = self.ts;
        let data = self.created_data(&p);
        self.live.push(p.clone());
        ("ProductCreated", p, data)
    }

    fn updated(&mut self) -> (&'static str, Product, Value) {
        let (old, slot) = if self.rng.percent(2) {
            // An update for a product this stream never created: an upsert.
            let mut p = self.new_product();
            p.created_at = self.ts - self.rng.range(86_400_000, 30 * 86_400_000);
            p.updated_at = p.created_at;
            self.live.push(p.clone());
            (p, self.live.len() - 1)
        } else {
            let i = self.rng.below(self.live.len() as u64) as usize;
            (self.live[i].clone(), i)
        };
        let mut new = old.clone();
        let (change_price, change_quantity) = match self.rng.below(3) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        if change_price {
            let p = (old.price_cents * self.rng.range(70, 130) / 100).clamp(100, 99_999);
            new.price_cents = if p != old.price_cents {
                p
            } else if old.price_cents < 99_999 {
                old.price_cents + 1
            } else {
                old.price_cents - 1
            };
        }
        if change_quantity {
            new.quantity = loop {
                let q = if self.rng.percent(30) {
                    self.rng.range(0, 9)
                } else {
                    self.rng.range(0, 500)
                };
                if q != old.quantity {
                    break q;
                }
            };
        }
        if self.rng.percent(8) {
            new.category = loop {
                let c = self.rng.pick(CATEGORIES);
                if c != old.category {
                    break c;
                }
            };
        }
        if self.rng.percent(8) {
            new.name = self.name();
        }
        new.updated_at = self.ts;
        self.live[slot] = new.clone();

        let data = if self.rng.percent(50) {
            let mut changes = Map::new();
            if new.price_cents != old.price_cents {
                changes.insert(
                    "price".into(),
                    json!({"old": price_num(old.price_cents), "new": price_num(new.price_cents)}),
                );
            }
            if new.quantity != old.quantity {
                changes.insert(
                    "quantity".into(),
                    json!({"old": old.quantity, "new": new.quantity}),
                );
            }
            if new.category != old.category {
                changes.insert(
                    "category".into(),
                    json!({"old": old.category, "new": new.category}),
                );
            }
            if new.name != old.name {
                changes.insert("name".into(), json!({"old": old.name, "new": new.name}));
            }
            json!({
                "productId": self.pid_json(&new.id),
                "sellerId": seller_id(new.seller),
                "changes": changes,
                "updatedAt": iso(new.updated_at),
            })
        } else {
            let mut data = self.backend_product(&new);
            data["previousData"] = backend_row(&old);
            data
        };
        ("ProductUpdated", new, data)
    }

    fn deleted(&mut self) -> (&'static str, Product, Value) {
        let p = if self.rng.percent(2) {
            // A delete of a product never seen: counts as one deleted product.
            let mut p = self.new_product();
            p.created_at = self.ts - self.rng.range(86_400_000, 30 * 86_400_000);
            p.updated_at = p.created_at;
            p
        } else {
            let i = self.rng.below(self.live.len() as u64) as usize;
            self.live.swap_remove(i)
        };
        self.deleted.push(p.clone());
        let data = if self.rng.percent(50) {
            json!({
                "productId": self.pid_json(&p.id),
                "sellerId": seller_id(p.seller),
                "name": p.name,
                "category": p.category,
                "deletedAt": iso(self.ts),
            })
        } else {
            self.backend_product(&p)
        };
        ("ProductDeleted", p, data)
    }

    /// The product as the backend serializes it: camelCase, price as the
    /// numeric string node-postgres returns for NUMERIC.
    fn backend_product(&mut self, p: &Product) -> Value {
        json!({
            "productId": self.pid_json(&p.id),
            "sellerId": seller_id(p.seller),
            "name": p.name,
            "description": p.description,
            "price": price_str(p.price_cents),
            "quantity": p.quantity,
            "category": p.category,
            "createdAt": iso(p.created_at),
            "updatedAt": iso(p.updated_at),
        })
    }

    /// A numeric id is sometimes sent as a string of digits.
    /// The `data` of a ProductCreated event: the full product, camelCase,
    /// price as a JSON number.
    fn created_data(&mut self, p: &Product) -> Value {
        json!({
            "productId": self.pid_json(&p.id),
            "sellerId": seller_id(p.seller),
            "name": p.name,
            "description": p.description,
            "price": price_num(p.price_cents),
            "quantity": p.quantity,
            "category": p.category,
            "createdAt": iso(p.created_at),
            "updatedAt": iso(p.updated_at),
        })
    }

    fn pid_json(&mut self, id: &Pid) -> Value {
        match id {
            Pid::Num(n) if self.rng.percent(10) => Value::String(n.to_string()),
            Pid::Num(n) => json!(n),
            Pid::Sku(s) => Value::String(s.clone()),
        }
    }

    // --- bad input ----------------------------------------------------------

    /// One malformed line; generator state other than the clock and the id
    /// counter is left alone, so the well-formed stream stays consistent.
    fn malformed(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        const KINDS: usize = 8;
        let kind = self.bad_kind % KINDS;
        self.bad_kind += 1;
        let p = self.new_product();
        let mut data = self.created_data(&p);
        let mut event_type = "ProductCreated";
        match kind {
            0 => {
                let text = format!(
                    "ProductCreated,{},{},{},{}",
                    seller_id(p.seller),
                    pid_text(&p.id),
                    p.name,
                    price_str(p.price_cents)
                );
                out.extend_from_slice(text.as_bytes());
                return Ok(());
            }
            1 => {
                self.write(out, event_type, &p, data)?;
                let cut = out.len() / 2;
                out.truncate(cut);
                return Ok(());
            }
            2 => {
                data.as_object_mut().expect("object").remove("productId");
            }
            3 => event_type = "ProductArchived",
            4 => data["quantity"] = json!(-1 - self.rng.range(0, 49)),
            5 => data["price"] = json!({"amount": price_num(p.price_cents), "currency": "USD"}),
            6 => {
                data.as_object_mut().expect("object").remove("sellerId");
            }
            _ => return Ok(()), // an empty line
        }
        self.write(out, event_type, &p, data)
    }
}

/// The previous row as the backend reads it from Postgres: snake_case,
/// NUMERIC price as a string.
fn backend_row(p: &Product) -> Value {
    let id = match &p.id {
        Pid::Num(n) => json!(n),
        Pid::Sku(s) => json!(s),
    };
    json!({
        "id": id,
        "seller_id": seller_id(p.seller),
        "name": p.name,
        "description": p.description,
        "price": price_str(p.price_cents),
        "quantity": p.quantity,
        "category": p.category,
        "created_at": iso(p.created_at),
        "updated_at": iso(p.updated_at),
    })
}

fn seller_id(n: u32) -> String {
    format!("seller-{n}")
}

fn pid_text(id: &Pid) -> String {
    match id {
        Pid::Num(n) => n.to_string(),
        Pid::Sku(s) => s.clone(),
    }
}

/// A price as a JSON number with (at most) two decimals: `29.99`.
fn price_num(cents: i64) -> Value {
    // cents / 100 is the nearest f64 to the decimal, and serde_json prints
    // the shortest representation that round-trips, i.e. the decimal.
    json!(cents as f64 / 100.0)
}

/// A price as node-postgres returns NUMERIC(10,2): `"29.99"`.
fn price_str(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// Milliseconds since the epoch as an ISO-8601 UTC string with milliseconds.
fn iso(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen_bytes(opts: &GenOptions) -> (Vec<u8>, GenSummary) {
        let mut out = Vec::new();
        let summary = generate(opts, &mut out).unwrap();
        (out, summary)
    }

    fn opts(events: u64, seed: u64, bad_every: u64) -> GenOptions {
        GenOptions {
            events,
            seed,
            bad_every,
            ..GenOptions::default()
        }
    }

    fn lines(bytes: &[u8]) -> Vec<&str> {
        let text = std::str::from_utf8(bytes).unwrap();
        assert!(text.ends_with('\n'));
        text[..text.len() - 1].split('\n').collect()
    }

    fn is_price(v: &Value) -> bool {
        match v {
            Value::Number(n) => n.as_f64().is_some_and(|p| (1.0..=999.99).contains(&p)),
            Value::String(s) => s.parse::<f64>().is_ok_and(|p| (1.0..=999.99).contains(&p)),
            _ => false,
        }
    }

    fn is_quantity(v: &Value) -> bool {
        v.as_i64().is_some_and(|q| (0..=500).contains(&q))
    }

    fn is_product_id(v: &Value) -> bool {
        v.as_u64().is_some() || v.as_str().is_some_and(|s| !s.is_empty())
    }

    /// What a consumer would check before applying an event; panics with the
    /// reason when the line is not a well-formed event. Returns the dialect.
    fn check_well_formed(line: &str) -> &'static str {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let ts = v["timestamp"].as_i64().expect("timestamp");
        let ty = v["eventType"].as_str().expect("eventType");
        let d = &v["data"];
        assert!(is_product_id(&d["productId"]), "productId: {line}");
        let seller = d["sellerId"].as_str().expect("sellerId");
        assert!(seller.starts_with("seller-"));
        let pid = match &d["productId"] {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => unreachable!(),
        };
        assert_eq!(
            v["eventId"].as_str().unwrap(),
            format!("{seller}-{pid}-{ty}-{ts}")
        );
        let full = |d: &Value| {
            for f in ["name", "description", "category", "createdAt", "updatedAt"] {
                assert!(d[f].is_string(), "{f}: {line}");
            }
            assert!(is_price(&d["price"]), "price: {line}");
            assert!(is_quantity(&d["quantity"]), "quantity: {line}");
            let n = d["description"].as_str().unwrap().len();
            assert!((60..=161).contains(&n), "description of {n} chars");
        };
        match ty {
            "ProductCreated" => {
                assert!(d["price"].is_number());
                full(d);
                "created"
            }
            "ProductUpdated" if d.get("changes").is_some() => {
                let changes = d["changes"].as_object().unwrap();
                assert!(!changes.is_empty());
                for (k, c) in changes {
                    assert!(
                        ["price", "quantity", "category", "name"].contains(&k.as_str()),
                        "{k}"
                    );
                    assert!(c.get("old").is_some() && c.get("new").is_some(), "{line}");
                }
                if let Some(p) = changes.get("price") {
                    assert!(is_price(&p["new"]) && is_price(&p["old"]));
                }
                if let Some(q) = changes.get("quantity") {
                    assert!(is_quantity(&q["new"]) && is_quantity(&q["old"]));
                }
                assert!(d["updatedAt"].is_string());
                "update-contract"
            }
            "ProductUpdated" => {
                full(d);
                assert!(d["price"].is_string(), "backend price is a string");
                let prev = &d["previousData"];
                for f in [
                    "id",
                    "seller_id",
                    "name",
                    "description",
                    "price",
                    "quantity",
                    "category",
                ] {
                    assert!(prev.get(f).is_some(), "previousData.{f}: {line}");
                }
                assert!(prev["created_at"].is_string() && prev["updated_at"].is_string());
                assert_eq!(
                    prev["seller_id"], d["sellerId"],
                    "a product never changes seller"
                );
                "update-backend"
            }
            "ProductDeleted" if d.get("price").is_some() => {
                full(d);
                "delete-backend"
            }
            "ProductDeleted" => {
                assert!(
                    d["name"].is_string()
                        && d["category"].is_string()
                        && d["deletedAt"].is_string()
                );
                "delete-contract"
            }
            other => panic!("eventType {other}"),
        }
    }

    #[test]
    fn same_seed_same_bytes() {
        let (a, _) = gen_bytes(&opts(3000, 7, 13));
        let (b, _) = gen_bytes(&opts(3000, 7, 13));
        assert_eq!(a, b);
    }

    #[test]
    fn different_seed_different_bytes() {
        let (a, _) = gen_bytes(&opts(500, 1, 0));
        let (b, _) = gen_bytes(&opts(500, 2, 0));
        assert_ne!(a, b);
    }

    #[test]
    fn average_line_length_is_realistic() {
        let (bytes, summary) = gen_bytes(&opts(2000, 1, 0));
        assert_eq!(
            summary,
            GenSummary {
                lines: 2000,
                malformed: 0
            }
        );
        let avg = bytes.len() as f64 / 2000.0;
        assert!(
            (400.0..=500.0).contains(&avg),
            "average line is {avg:.1} bytes"
        );
    }

    #[test]
    fn every_kth_line_is_malformed() {
        let (bytes, summary) = gen_bytes(&opts(2000, 3, 10));
        assert_eq!(
            summary,
            GenSummary {
                lines: 2000,
                malformed: 200
            }
        );
        let lines = lines(&bytes);
        assert_eq!(lines.len(), 2000);
        let mut bad = 0;
        for (i, line) in lines.iter().enumerate() {
            let well_formed = std::panic::catch_unwind(|| check_well_formed(line)).is_ok();
            if (i + 1) % 10 == 0 {
                assert!(!well_formed, "line {} should be malformed: {line}", i + 1);
                bad += 1;
            } else {
                assert!(well_formed, "line {} should be well formed: {line}", i + 1);
            }
        }
        assert_eq!(bad, summary.malformed);
        // Every kind appears: an empty line, non-JSON, and JSON variants.
        assert!(lines.iter().any(|l| l.is_empty()));
        assert!(lines.iter().any(|l| l.contains("ProductArchived")));
        assert!(lines.iter().any(|l| l.contains("\"currency\"")));
    }

    #[test]
    fn the_fold_decoder_rejects_exactly_the_malformed_lines() {
        // The real consumer agrees with the generator about which lines are
        // bad, for every dialect and every malformed kind.
        let (bytes, summary) = gen_bytes(&opts(4000, 9, 10));
        let mut rejected = 0;
        for (i, line) in lines(&bytes).iter().enumerate() {
            let res = crate::decode::decode(line.as_bytes(), 1 << 20);
            let bad = (i + 1) % 10 == 0;
            assert_eq!(res.is_err(), bad, "line {}: {line}", i + 1);
            rejected += u64::from(res.is_err());
        }
        assert_eq!(rejected, summary.malformed);
    }

    #[test]
    fn well_formed_lines_have_the_contract_fields() {
        let (bytes, _) = gen_bytes(&opts(5000, 11, 0));
        let mut seen = std::collections::BTreeMap::<&str, usize>::new();
        let mut last_ts = i64::MIN;
        let mut low_stock = 0;
        let mut sku = 0;
        let mut string_num_ids = 0;
        for line in lines(&bytes) {
            *seen.entry(check_well_formed(line)).or_default() += 1;
            let v: Value = serde_json::from_str(line).unwrap();
            let ts = v["timestamp"].as_i64().unwrap();
            assert!(ts > last_ts, "timestamps strictly increase");
            assert!(last_ts == i64::MIN || ts - last_ts <= 500);
            last_ts = ts;
            if v["data"]["quantity"].as_i64().is_some_and(|q| q < 10) {
                low_stock += 1;
            }
            match v["data"]["productId"].as_str() {
                Some(s) if s.starts_with("sku-") => sku += 1,
                Some(_) => string_num_ids += 1,
                None => {}
            }
        }
        for dialect in [
            "created",
            "update-contract",
            "update-backend",
            "delete-contract",
            "delete-backend",
        ] {
            assert!(
                seen.get(dialect).copied().unwrap_or(0) > 100,
                "{dialect}: {seen:?}"
            );
        }
        let creates = seen["created"] as f64 / 5000.0;
        let updates = (seen["update-contract"] + seen["update-backend"]) as f64 / 5000.0;
        assert!((0.30..0.42).contains(&creates), "{seen:?}");
        assert!((0.44..0.56).contains(&updates), "{seen:?}");
        assert!(low_stock > 250, "low stock {low_stock}");
        assert!(
            sku > 20 && string_num_ids > 50,
            "sku {sku}, string ids {string_num_ids}"
        );
    }

    #[test]
    fn products_keep_their_seller_and_deletes_target_known_products() {
        let (bytes, _) = gen_bytes(&opts(5000, 5, 0));
        let mut seller_of = std::collections::HashMap::<String, String>::new();
        let mut created_before = std::collections::HashSet::<String>::new();
        let (mut targeted, mut unseen, mut recreated) = (0, 0, 0);
        let mut deleted = std::collections::HashSet::<String>::new();
        for line in lines(&bytes) {
            let v: Value = serde_json::from_str(line).unwrap();
            let d = &v["data"];
            let pid = match &d["productId"] {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                _ => unreachable!(),
            };
            let seller = d["sellerId"].as_str().unwrap().to_string();
            if let Some(s) = seller_of.insert(pid.clone(), seller.clone()) {
                assert_eq!(s, seller, "product {pid} changed seller");
            }
            if v["eventType"] == "ProductCreated" {
                if deleted.remove(&pid) {
                    recreated += 1;
                }
                created_before.insert(pid);
            } else {
                if created_before.contains(&pid) {
                    targeted += 1;
                } else {
                    unseen += 1;
                }
                if v["eventType"] == "ProductDeleted" {
                    deleted.insert(pid);
                }
            }
        }
        let share = unseen as f64 / (targeted + unseen) as f64;
        assert!((0.005..0.05).contains(&share), "unseen share {share}");
        assert!(recreated > 0);
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso(1_696_176_060_000), "2023-10-01T16:01:00.000Z");
        assert_eq!(iso(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(price_str(2999), "29.99");
        assert_eq!(price_str(100), "1.00");
        assert_eq!(price_num(2999).to_string(), "29.99");
    }
}
