//! Fold throughput of one worker on one core (issue #2 target: ≥ 1,000,000
//! events/s for events of about 450 bytes).
//!
//! `cargo bench -p analytics-worker --bench fold`

use analytics_worker::decode::decode;
use analytics_worker::fold::Fold;
use analytics_worker::generate::{GenOptions, generate};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use proto::EventBatch;
use std::hint::black_box;

fn batches(events: u64) -> (Vec<EventBatch>, u64, usize) {
    let mut bytes = Vec::new();
    let opts = GenOptions {
        events,
        ..GenOptions::default()
    };
    generate(&opts, &mut bytes).expect("generate into memory");
    let mut out = Vec::new();
    let mut batch = EventBatch::new(0, "bench".into());
    let mut n = 0u64;
    for (i, line) in bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        batch.push(i as i64, line);
        n += 1;
        if batch.len() == 4096 {
            out.push(std::mem::replace(
                &mut batch,
                EventBatch::new(0, "bench".into()),
            ));
        }
    }
    out.push(batch);
    (out, n, bytes.len())
}

fn fold_throughput(c: &mut Criterion) {
    let (batches, n, total_bytes) = batches(200_000);
    eprintln!(
        "{n} events, {} bytes per event on average",
        total_bytes as u64 / n
    );
    let mut group = c.benchmark_group("fold");
    group.throughput(Throughput::Elements(n));
    group.sample_size(10);
    group.bench_function("decode_only", |b| {
        b.iter(|| {
            for batch in &batches {
                for (_, bytes) in batch.iter() {
                    let _ = black_box(decode(bytes, 1 << 20));
                }
            }
        })
    });
    // A worker folds into one long-lived state and hands out its changes
    // at each flush; it never drops the state. So each iteration folds the
    // events into a new state and takes the changes (a flush), and the
    // state is dropped outside the measurement.
    group.bench_function("decode_and_fold", |b| {
        b.iter_batched(
            || Fold::new(10, 1 << 20),
            |mut fold| {
                for batch in &batches {
                    black_box(fold.apply_batch(batch));
                }
                black_box(fold.take_changes().expect("changes encode").len());
                fold
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, fold_throughput);
criterion_main!(benches);
