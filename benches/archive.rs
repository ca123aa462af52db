//! The raw event archive's encoding (DESIGN §6): every consumed event
//! becomes a JSON line and is gzipped, in the storage process, on the Kafka
//! path. Events/s on one core, for the generator's events of ~450 bytes.
//!
//! `cargo bench --bench archive`

use analytics::archive::{EventRange, encode_event_range};
use analytics_worker::generate::{GenOptions, generate};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proto::EventBatch;
use std::hint::black_box;

/// Ranges of 20,000 events, about what one topic-partition contributes to
/// a write at the default flush size.
fn ranges(events: u64) -> (Vec<EventRange>, u64) {
    let mut bytes = Vec::new();
    let opts = GenOptions {
        events,
        ..GenOptions::default()
    };
    generate(&opts, &mut bytes).expect("generate into memory");
    let fresh = || EventBatch::new(3, "product.updated".into());
    let (mut out, mut range, mut n) = (Vec::new(), fresh(), 0);
    for (i, line) in bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        range.push_at(i as i64, 1_700_000_000_000 + i as i64, line);
        n += 1;
        if range.len() == 20_000 {
            out.push(std::mem::replace(&mut range, fresh()).into());
        }
    }
    out.push(range.into());
    (out, n)
}

fn archive_throughput(c: &mut Criterion) {
    let (ranges, n) = ranges(100_000);
    let mut group = c.benchmark_group("archive");
    group.throughput(Throughput::Elements(n));
    group.sample_size(10);
    group.bench_function("encode_event_range", |b| {
        b.iter(|| {
            for range in &ranges {
                black_box(encode_event_range(range).expect("encode in memory"));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, archive_throughput);
criterion_main!(benches);
