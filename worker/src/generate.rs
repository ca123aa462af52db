//! A deterministic generator of realistic catalogue events (DESIGN §2), for
//! the shipped example, tests and benchmarks. Both producer dialects, thin
//! and full deletes, string and numeric ids, upserts of unseen products,
//! re-creations, and optionally malformed lines of every kind.

use serde_json::{Value, json};
use std::io::Write;

#[derive(Clone, Debug)]
pub struct GenOptions {
    pub events: u64,
    pub sellers: u32,
    pub seed: u64,
    /// 0 = none; otherwise every K-th line is malformed.
    pub bad_every: u64,
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

#[derive(clap::Args, Debug)]
pub struct GenArgs {
    /// Number of lines to write.
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    #[arg(long, default_value_t = 200)]
    pub sellers: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Make every K-th line malformed (0 = none).
    #[arg(long, default_value_t = 0)]
    pub bad_every: u64,
    /// Output file (default stdout).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

pub fn run_cli(args: GenArgs) -> std::io::Result<()> {
    let opts = GenOptions {
        events: args.events,
        sellers: args.sellers.max(1),
        seed: args.seed,
        bad_every: args.bad_every,
        ..GenOptions::default()
    };
    let out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(std::fs::File::create(p)?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    generate(&opts, &mut out)?;
    out.flush()
}

/// splitmix64: tiny, fast, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const CATEGORIES: &[&str] = &[
    "Electronics",
    "Books",
    "Games",
    "Home & Kitchen",
    "Toys",
    "Sports",
    "Beauty",
    "Garden",
    "Automotive",
    "Clothing",
    "Music",
    "Office",
];
const ADJECTIVES: &[&str] = &[
    "Wireless",
    "Ergonomic",
    "Compact",
    "Premium",
    "Smart",
    "Classic",
    "Portable",
    "Deluxe",
    "Eco",
    "Rugged",
];
const NOUNS: &[&str] = &[
    "Mouse",
    "Keyboard",
    "Lamp",
    "Backpack",
    "Kettle",
    "Headphones",
    "Notebook",
    "Drone",
    "Speaker",
    "Chair",
];
const WORDS: &[&str] = &[
    "durable",
    "lightweight",
    "designed",
    "for",
    "everyday",
    "use",
    "with",
    "a",
    "two-year",
    "warranty",
    "and",
    "fast",
    "shipping",
    "made",
    "from",
    "recycled",
    "materials",
    "perfect",
    "gift",
    "customers",
    "love",
    "it",
];

#[derive(Clone)]
struct Product {
    id: Value,
    seller: String,
    name: String,
    description: String,
    category: &'static str,
    price_cents: i64,
    quantity: i64,
    created_at: String,
    deleted: bool,
}

impl Product {
    fn camel(&self, updated_at: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("productId".into(), self.id.clone());
        m.insert("sellerId".into(), json!(self.seller));
        m.insert("name".into(), json!(self.name));
        m.insert("description".into(), json!(self.description));
        m.insert("price".into(), json!(money_text(self.price_cents)));
        m.insert("quantity".into(), json!(self.quantity));
        m.insert("category".into(), json!(self.category));
        m.insert("createdAt".into(), json!(self.created_at));
        m.insert("updatedAt".into(), json!(updated_at));
        m
    }

    fn snake(&self) -> Value {
        json!({"id": self.id, "seller_id": self.seller, "name": self.name, "description": self.description,
            "price": money_text(self.price_cents), "quantity": self.quantity, "category": self.category,
            "created_at": self.created_at, "updated_at": self.created_at})
    }
}

fn money_text(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// A price as a JSON number whose text is the exact decimal (e.g. 29.99).
fn money_number(cents: i64) -> Value {
    money_text(cents)
        .parse::<f64>()
        .map(|f| json!(f))
        .unwrap_or(Value::Null)
}

fn iso(ms: i64) -> String {
    // Seconds precision is plenty for example data.
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil-from-days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

const MALFORMED_KINDS: u64 = 8;

/// Writes `opts.events` lines.
pub fn generate(opts: &GenOptions, out: &mut impl Write) -> std::io::Result<GenSummary> {
    let mut rng = Rng(opts.seed ^ 0x5EED_0F_A11);
    let mut products: Vec<Product> = Vec::new();
    let mut next_id: u64 = 10_000;
    let mut ts = opts.start_ms;
    let mut summary = GenSummary::default();
    for line_no in 1..=opts.events {
        ts += 1 + rng.below(500) as i64;
        if opts.bad_every > 0 && line_no % opts.bad_every == 0 {
            let kind = (line_no / opts.bad_every - 1) % MALFORMED_KINDS;
            writeln!(out, "{}", malformed(kind, ts))?;
            summary.malformed += 1;
            summary.lines += 1;
            continue;
        }
        let roll = rng.below(100);
        let event = if products.is_empty() || roll < 35 {
            let p = new_product(&mut rng, &mut next_id, opts.sellers, ts);
            let e = created(&p, ts);
            products.push(p);
            e
        } else if roll < 85 {
            if rng.chance(2) {
                // An update for a product never seen: an upsert.
                let p = new_product(&mut rng, &mut next_id, opts.sellers, ts);
                let e = updated_backend(&p, &p, ts);
                products.push(p);
                e
            } else {
                let i = rng.below(products.len() as u64) as usize;
                let before = products[i].clone();
                let p = &mut products[i];
                if p.deleted && rng.chance(50) {
                    p.deleted = false; // re-created after a delete
                    created(p, ts)
                } else {
                    mutate(&mut rng, p);
                    if rng.chance(50) {
                        updated_contract(&before, p, ts)
                    } else {
                        updated_backend(&before, p, ts)
                    }
                }
            }
        } else {
            let i = rng.below(products.len() as u64) as usize;
            let p = &mut products[i];
            p.deleted = true;
            deleted(&mut rng, p, ts)
        };
        serde_json::to_writer(&mut *out, &event)?;
        out.write_all(b"\n")?;
        summary.lines += 1;
    }
    Ok(summary)
}

fn new_product(rng: &mut Rng, next_id: &mut u64, sellers: u32, ts: i64) -> Product {
    *next_id += 1 + rng.below(3);
    let id = if rng.chance(5) {
        json!(format!("sku-{:06x}", *next_id))
    } else {
        json!(*next_id)
    };
    let mut description = String::new();
    let target = 150 + rng.below(100) as usize;
    while description.len() < target {
        if !description.is_empty() {
            description.push(' ');
        }
        description.push_str(rng.pick(WORDS));
    }
    Product {
        id,
        seller: format!("seller-{}", rng.below(sellers as u64)),
        name: format!("{} {}", rng.pick(ADJECTIVES), rng.pick(NOUNS)),
        description,
        category: CATEGORIES[rng.below(CATEGORIES.len() as u64) as usize],
        price_cents: 100 + rng.below(99_900) as i64,
        quantity: if rng.chance(20) {
            rng.below(10) as i64
        } else {
            rng.below(501) as i64
        },
        created_at: iso(ts),
        deleted: false,
    }
}

fn mutate(rng: &mut Rng, p: &mut Product) {
    let mut changed = false;
    while !changed {
        if rng.chance(50) {
            p.price_cents = 100 + rng.below(99_900) as i64;
            changed = true;
        }
        if rng.chance(60) {
            p.quantity = if rng.chance(30) {
                rng.below(10) as i64
            } else {
                rng.below(501) as i64
            };
            changed = true;
        }
        if rng.chance(10) {
            p.category = CATEGORIES[rng.below(CATEGORIES.len() as u64) as usize];
            changed = true;
        }
        if rng.chance(5) {
            p.name = format!("{} {}", rng.pick(ADJECTIVES), rng.pick(NOUNS));
            changed = true;
        }
    }
}

fn envelope(kind: &str, p: &Product, ts: i64, data: Value) -> Value {
    json!({"eventId": format!("{}-{}-{kind}-{ts}", p.seller, id_text(&p.id)), "eventType": kind, "timestamp": ts, "data": data})
}

fn id_text(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Numeric ids are sometimes sent as digit strings.
fn maybe_string_id(rng_bit: bool, id: &Value) -> Value {
    match id {
        Value::Number(n) if rng_bit => json!(n.to_string()),
        other => other.clone(),
    }
}

fn created(p: &Product, ts: i64) -> Value {
    let mut data = p.camel(&iso(ts));
    data.insert("price".into(), money_number(p.price_cents));
    envelope("ProductCreated", p, ts, Value::Object(data))
}

fn updated_contract(before: &Product, after: &Product, ts: i64) -> Value {
    let mut changes = serde_json::Map::new();
    if before.price_cents != after.price_cents {
        changes.insert("price".into(), json!({"old": money_number(before.price_cents), "new": money_number(after.price_cents)}));
    }
    if before.quantity != after.quantity {
        changes.insert(
            "quantity".into(),
            json!({"old": before.quantity, "new": after.quantity}),
        );
    }
    if before.category != after.category {
        changes.insert(
            "category".into(),
            json!({"old": before.category, "new": after.category}),
        );
    }
    if before.name != after.name {
        changes.insert(
            "name".into(),
            json!({"old": before.name, "new": after.name}),
        );
    }
    let id = maybe_string_id(ts % 3 == 0, &after.id);
    envelope(
        "ProductUpdated",
        after,
        ts,
        json!({"productId": id, "sellerId": after.seller, "changes": changes, "updatedAt": iso(ts)}),
    )
}

fn updated_backend(before: &Product, after: &Product, ts: i64) -> Value {
    let mut data = after.camel(&iso(ts));
    data.insert("previousData".into(), before.snake());
    envelope("ProductUpdated", after, ts, Value::Object(data))
}

fn deleted(rng: &mut Rng, p: &Product, ts: i64) -> Value {
    if rng.chance(50) {
        let id = maybe_string_id(rng.chance(30), &p.id);
        envelope(
            "ProductDeleted",
            p,
            ts,
            json!({"productId": id, "sellerId": p.seller, "name": p.name, "category": p.category, "deletedAt": iso(ts)}),
        )
    } else {
        let mut data = p.camel(&iso(ts));
        data.insert("deletedAt".into(), json!(iso(ts)));
        envelope("ProductDeleted", p, ts, Value::Object(data))
    }
}

/// One malformed line of the given kind (rotating through every reason).
fn malformed(kind: u64, ts: i64) -> String {
    let data =
        r#""productId":1,"sellerId":"seller-0","price":"1.00","quantity":1,"category":"Books""#;
    match kind {
        0 => "this is not JSON".to_string(),
        1 => format!(r#"{{"eventType":"ProductCreated","timestamp":{ts},"data":{{"productId":1"#),
        2 => format!(
            r#"{{"eventType":"ProductCreated","timestamp":{ts},"data":{{"sellerId":"seller-0"}}}}"#
        ),
        3 => format!(r#"{{"eventType":"ProductExploded","timestamp":{ts},"data":{{{data}}}}}"#),
        4 => format!(
            r#"{{"eventType":"ProductCreated","timestamp":{ts},"data":{{"productId":1,"sellerId":"seller-0","quantity":-5}}}}"#
        ),
        5 => format!(
            r#"{{"eventType":"ProductCreated","timestamp":{ts},"data":{{"productId":1,"sellerId":"seller-0","price":{{"amount":1}}}}}}"#
        ),
        6 => format!(
            r#"{{"eventType":"ProductCreated","timestamp":{ts},"data":{{"productId":1,"price":"1.00"}}}}"#
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(opts: &GenOptions) -> (Vec<u8>, GenSummary) {
        let mut buf = Vec::new();
        let s = generate(opts, &mut buf).unwrap();
        (buf, s)
    }

    #[test]
    fn deterministic_per_seed() {
        let a = lines(&GenOptions {
            events: 500,
            ..GenOptions::default()
        })
        .0;
        let b = lines(&GenOptions {
            events: 500,
            ..GenOptions::default()
        })
        .0;
        let c = lines(&GenOptions {
            events: 500,
            seed: 2,
            ..GenOptions::default()
        })
        .0;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn realistic_shape_and_both_dialects() {
        let (buf, s) = lines(&GenOptions {
            events: 2_000,
            ..GenOptions::default()
        });
        assert_eq!(
            s,
            GenSummary {
                lines: 2_000,
                malformed: 0
            }
        );
        let text = String::from_utf8(buf).unwrap();
        let avg = text.len() / 2_000;
        assert!((350..=550).contains(&avg), "average line {avg} bytes");
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let has = |f: &dyn Fn(&Value) -> bool| events.iter().any(f);
        assert!(
            has(&|e| e["data"]["changes"].is_object()),
            "contract updates"
        );
        assert!(
            has(&|e| e["data"]["previousData"].is_object()),
            "backend updates"
        );
        assert!(
            has(&|e| e["eventType"] == "ProductDeleted" && e["data"]["price"].is_null()),
            "thin deletes"
        );
        assert!(
            has(&|e| e["eventType"] == "ProductDeleted" && e["data"]["price"].is_string()),
            "full deletes"
        );
        assert!(has(&|e| e["data"]["productId"].is_string()), "string ids");
        for e in &events {
            assert!(
                e["timestamp"].is_i64()
                    && e["data"]["sellerId"].is_string()
                    && e["eventId"].is_string()
            );
        }
    }

    #[test]
    fn malformed_lines_every_k() {
        let (buf, s) = lines(&GenOptions {
            events: 1_000,
            bad_every: 10,
            ..GenOptions::default()
        });
        assert_eq!(
            s,
            GenSummary {
                lines: 1_000,
                malformed: 100
            }
        );
        let text = String::from_utf8(buf).unwrap();
        for (i, line) in text.split('\n').take(1_000).enumerate() {
            let bad = crate::decode::decode(line.as_bytes(), 1 << 20).is_err();
            assert_eq!(bad, (i + 1) % 10 == 0, "line {}: {line}", i + 1);
        }
    }
}
