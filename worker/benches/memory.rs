//! Resident memory of one worker's fold per product (issue #2 target: at most
//! 250 bytes of state per product).
//!
//! `cargo bench -p analytics-worker --bench memory` folds one million
//! ProductCreated events with distinct ids (realistic names, 200 sellers, 12
//! categories, some on the low-stock list) and prints the growth of the
//! process's resident set divided by the number of products.

use analytics_worker::fold::Fold;
use proto::EventBatch;

const PRODUCTS: u64 = 1_000_000;
const CATEGORIES: [&str; 12] = [
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

fn rss_bytes() -> u64 {
    // /proc/self/statm: size resident shared … in pages.
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let mut fold = Fold::new(10, 1 << 20);
    let before = rss_bytes();
    let mut batch = EventBatch::new(0, "memory".into());
    for i in 0..PRODUCTS {
        let event = format!(
            r#"{{"eventType":"ProductCreated","timestamp":{ts},"data":{{"productId":{id},"sellerId":"seller-{seller}","name":"Wireless Mouse {i}","price":"{p}.99","quantity":{q},"category":"{c}"}}}}"#,
            ts = 1_696_176_000_000u64 + i,
            id = 100_000 + i,
            seller = i % 200,
            p = i % 500,
            q = i % 50,
            c = CATEGORIES[(i % 12) as usize],
        );
        batch.push(i as i64, event.as_bytes());
        if batch.len() == 4096 {
            fold.apply_batch(&batch);
            batch = EventBatch::new(0, "memory".into());
        }
    }
    fold.apply_batch(&batch);
    drop(batch);
    // Measured before any flush: a flush builds owned copies of the changed
    // states, which the allocator keeps around afterwards and which would be
    // counted here as if they were state.
    let after = rss_bytes();
    let products = fold.product_count() as u64;
    println!(
        "products: {products}; resident set grew by {:.1} MiB; {:.0} bytes per product",
        (after.saturating_sub(before)) as f64 / (1 << 20) as f64,
        after.saturating_sub(before) as f64 / products as f64
    );
}
