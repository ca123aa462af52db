//! The raw event archive's encoding (DESIGN §6): every consumed event
//! becomes a JSON line and is gzipped, in the worker that folds it, on the
//! Kafka path. Events/s on one core, for the generator's events of ~450
//! bytes (all applied, so none is parsed again).
//!
//! `cargo bench --bench archive`

use analytics_worker::archive::RangeWriter;
use analytics_worker::generate::{GenOptions, generate};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

/// Ranges of 20,000 events, about what one topic-partition contributes to
/// a write at the default flush size.
const RANGE_EVENTS: usize = 20_000;

fn events(events: u64) -> Vec<Vec<u8>> {
    let mut bytes = Vec::new();
    let opts = GenOptions {
        events,
        ..GenOptions::default()
    };
    generate(&opts, &mut bytes).expect("generate into memory");
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn archive_throughput(c: &mut Criterion) {
    let events = events(100_000);
    let mut group = c.benchmark_group("archive");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.sample_size(10);
    group.bench_function("range_writer", |b| {
        b.iter(|| {
            for (r, range) in events.chunks(RANGE_EVENTS).enumerate() {
                let mut w = RangeWriter::new("product.updated", 3);
                for (i, e) in range.iter().enumerate() {
                    let offset = (r * RANGE_EVENTS + i) as i64;
                    w.push(offset, 1_700_000_000_000 + offset, e, true);
                }
                black_box(w.finish().expect("in memory"));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, archive_throughput);
criterion_main!(benches);
