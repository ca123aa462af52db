//! The supervisor's metrics, and their Prometheus text exposition (format
//! 0.0.4). The tree updates them; the endpoint renders them on each scrape.
//!
//! Names follow one scheme (DESIGN §11): counters are
//! `analytics_<noun>_<verb>_total`, gauges carry no `_total`, durations are
//! in seconds. The registry is a handful of atomics and one histogram, so it
//! is written here rather than pulled in as a crate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Consumer lag per (topic, partition), shared with the Kafka source.
pub type LagTable = Arc<Mutex<BTreeMap<(String, i32), i64>>>;

/// Upper bounds of the flush latency buckets, in seconds.
const FLUSH_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
pub struct Telemetry {
    events_consumed: AtomicU64,
    events_applied: AtomicU64,
    events_rejected: Mutex<BTreeMap<String, u64>>,
    products_moved_in: AtomicU64,
    dead_letters_written: AtomicU64,
    storage_retries: AtomicU64,
    storage_throttles: AtomicU64,
    storage_requests: Mutex<BTreeMap<String, u64>>,
    worker_restarts: AtomicU64,
    storage_restarts: AtomicU64,
    buffered_bytes: AtomicU64,
    writes_pending: AtomicU64,
    /// Unix time in ms of storage's last acknowledged write (0: none yet).
    last_write_ms: AtomicU64,
    flush: Mutex<Histogram>,
    ready: AtomicBool,
    stopping: AtomicBool,
    /// Live processes of the tree by name (`worker-0`, `storage`).
    children: Mutex<BTreeMap<String, i32>>,
    lag: Mutex<Option<LagTable>>,
}

struct Histogram {
    /// Observations at or below each bound (not cumulative here).
    buckets: [u64; FLUSH_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; FLUSH_BUCKETS.len()],
            count: 0,
            sum: 0.0,
        }
    }
}

/// A poisoned lock only means a panic elsewhere mid-update of a metric; the
/// numbers are still worth showing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Telemetry {
    pub fn new() -> Arc<Telemetry> {
        Arc::new(Telemetry::default())
    }

    pub fn events_consumed(&self, n: u64) {
        self.events_consumed.fetch_add(n, Ordering::Relaxed);
    }

    pub fn consumed(&self) -> u64 {
        self.events_consumed.load(Ordering::Relaxed)
    }

    pub fn events_applied(&self, n: u64) {
        self.events_applied.fetch_add(n, Ordering::Relaxed);
    }

    pub fn event_rejected(&self, reason: &str) {
        *lock(&self.events_rejected)
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// Events (durable) that moved a product into a shard from another
    /// seller, whose shard may still count it.
    pub fn products_moved_in(&self, n: u64) {
        self.products_moved_in.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dead_letters_written(&self, n: u64) {
        self.dead_letters_written.fetch_add(n, Ordering::Relaxed);
    }

    pub fn storage_retries(&self, n: u64) {
        self.storage_retries.fetch_add(n, Ordering::Relaxed);
    }

    pub fn storage_throttles(&self, n: u64) {
        self.storage_throttles.fetch_add(n, Ordering::Relaxed);
    }

    /// Requests storage sent to its backing services so far, by operation.
    pub fn storage_requests_by_operation(&self) -> Vec<(String, u64)> {
        lock(&self.storage_requests)
            .iter()
            .map(|(op, n)| (op.clone(), *n))
            .collect()
    }

    /// Requests storage sent to its backing services, by operation.
    pub fn storage_requests(&self, counts: &[(Box<str>, u64)]) {
        let mut all = lock(&self.storage_requests);
        for (operation, n) in counts {
            *all.entry(operation.to_string()).or_default() += n;
        }
    }

    pub fn worker_restarted(&self) {
        self.worker_restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn storage_restarted(&self) {
        self.storage_restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_buffered_bytes(&self, n: usize) {
        self.buffered_bytes.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_writes_pending(&self, n: usize) {
        self.writes_pending.store(n as u64, Ordering::Relaxed);
    }

    /// Storage acknowledged a write at `now_ms` (Unix time).
    pub fn write_acknowledged(&self, now_ms: u64) {
        self.last_write_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn flush_completed(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let mut h = lock(&self.flush);
        if let Some(i) = FLUSH_BUCKETS.iter().position(|&b| secs <= b) {
            h.buckets[i] += 1;
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Ready and not stopping: what `/ready` answers.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Relaxed)
    }

    pub fn child_started(&self, name: String, pid: i32) {
        lock(&self.children).insert(name, pid);
    }

    pub fn child_gone(&self, name: &str) {
        lock(&self.children).remove(name);
    }

    pub fn set_lag_table(&self, lag: LagTable) {
        *lock(&self.lag) = Some(lag);
    }

    /// Total consumer lag over the partitions, once librdkafka reported it.
    pub fn total_lag(&self) -> Option<i64> {
        let table = lock(&self.lag).clone()?;
        let lag = lock(&table);
        (!lag.is_empty()).then(|| lag.values().sum())
    }

    /// The whole registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let value = |out: &mut String, name: &str, help: &str, kind: &str, v: &AtomicU64| {
            header(out, name, help, kind);
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            value(out, name, help, "counter", v);
        };
        counter(
            &mut out,
            "analytics_events_consumed_total",
            "Events read from the source (file lines or Kafka messages).",
            &self.events_consumed,
        );
        counter(
            &mut out,
            "analytics_events_applied_total",
            "Events folded and acknowledged by storage, rejected ones excluded.",
            &self.events_applied,
        );
        header(
            &mut out,
            "analytics_events_rejected_total",
            "Malformed events dead-lettered and acknowledged by storage, by reason.",
            "counter",
        );
        for (reason, n) in lock(&self.events_rejected).iter() {
            let _ = writeln!(
                out,
                "analytics_events_rejected_total{{reason=\"{}\"}} {n}",
                escape(reason)
            );
        }
        counter(
            &mut out,
            "analytics_products_moved_in_total",
            "Events, acknowledged by storage, that moved a product into a partition from another seller, whose partition may still count it: above 0, totals can differ from a straight fold (README, Known limits).",
            &self.products_moved_in,
        );
        counter(
            &mut out,
            "analytics_dead_letters_written_total",
            "Dead letters written by storage (to the dead-letter file or topic).",
            &self.dead_letters_written,
        );
        counter(
            &mut out,
            "analytics_storage_retries_total",
            "Storage calls that failed retryably and were tried again.",
            &self.storage_retries,
        );
        counter(
            &mut out,
            "analytics_storage_throttles_total",
            "Storage calls the backing service throttled (DynamoDB, S3).",
            &self.storage_throttles,
        );
        header(
            &mut out,
            "analytics_storage_requests_total",
            "Requests storage sent to DynamoDB and S3, by operation, retries included (what AWS bills).",
            "counter",
        );
        for (operation, n) in lock(&self.storage_requests).iter() {
            let _ = writeln!(
                out,
                "analytics_storage_requests_total{{operation=\"{}\"}} {n}",
                escape(operation)
            );
        }
        counter(
            &mut out,
            "analytics_worker_restarts_total",
            "Worker processes lost and restarted.",
            &self.worker_restarts,
        );
        counter(
            &mut out,
            "analytics_storage_restarts_total",
            "Storage processes lost and restarted.",
            &self.storage_restarts,
        );
        self.render_flush(&mut out);
        value(
            &mut out,
            "analytics_buffered_bytes",
            "Event bytes read but not yet acknowledged by storage.",
            "gauge",
            &self.buffered_bytes,
        );
        value(
            &mut out,
            "analytics_storage_writes_pending",
            "Writes sent to storage and not yet acknowledged.",
            "gauge",
            &self.writes_pending,
        );
        header(
            &mut out,
            "analytics_storage_last_write_timestamp_seconds",
            "Unix time of storage's last acknowledged write, 0 before the first: far behind time() while events are buffered means the pipeline is stuck.",
            "gauge",
        );
        let ms = self.last_write_ms.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "analytics_storage_last_write_timestamp_seconds {}.{:03}",
            ms / 1000,
            ms % 1000
        );
        header(
            &mut out,
            "analytics_ready",
            "1 once the consumer, workers and storage are up, 0 before and while stopping.",
            "gauge",
        );
        let _ = writeln!(out, "analytics_ready {}", u8::from(self.is_ready()));
        self.render_lag(&mut out);
        self.render_memory(&mut out);
        out
    }

    fn render_flush(&self, out: &mut String) {
        let name = "analytics_flush_duration_seconds";
        header(
            out,
            name,
            "From asking a worker for its changes to storage acknowledging them (flushes that changed something).",
            "histogram",
        );
        let h = lock(&self.flush);
        let mut cumulative = 0;
        for (bound, n) in FLUSH_BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", h.sum);
        let _ = writeln!(out, "{name}_count {}", h.count);
    }

    fn render_lag(&self, out: &mut String) {
        let Some(table) = lock(&self.lag).clone() else {
            return;
        };
        header(
            out,
            "analytics_consumer_lag",
            "Messages behind the partition's high watermark (librdkafka statistics).",
            "gauge",
        );
        for ((topic, partition), lag) in lock(&table).iter() {
            let _ = writeln!(
                out,
                "analytics_consumer_lag{{topic=\"{}\",partition=\"{partition}\"}} {lag}",
                escape(topic)
            );
        }
    }

    fn render_memory(&self, out: &mut String) {
        header(
            out,
            "analytics_process_resident_memory_bytes",
            "Resident set size of each process of the tree (VmRSS).",
            "gauge",
        );
        let children = lock(&self.children).clone();
        let processes =
            std::iter::once(("supervisor".to_string(), std::process::id() as i32)).chain(children);
        for (name, pid) in processes {
            if let Some(bytes) = resident_bytes(pid) {
                let _ = writeln!(
                    out,
                    "analytics_process_resident_memory_bytes{{process=\"{}\"}} {bytes}",
                    escape(&name)
                );
            }
        }
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// VmRSS of a process, from /proc/<pid>/status; `None` if it is gone.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_string)
    }

    #[test]
    fn counters_labels_and_the_histogram_render_in_the_text_format() {
        let t = Telemetry::new();
        t.events_consumed(5);
        t.events_applied(3);
        t.event_rejected("invalid_json");
        t.event_rejected("invalid_json");
        t.event_rejected("weird \"one\"");
        t.flush_completed(Duration::from_millis(3));
        t.flush_completed(Duration::from_millis(40));
        t.flush_completed(Duration::from_secs(100));
        t.storage_requests(&[
            ("DynamoDB.BatchWriteItem".into(), 2),
            ("S3.PutObject".into(), 1),
        ]);
        t.storage_requests(&[("DynamoDB.BatchWriteItem".into(), 3)]);
        t.products_moved_in(2);
        assert_eq!(
            sample(
                &t.render(),
                "analytics_storage_last_write_timestamp_seconds"
            )
            .as_deref(),
            Some("0.000")
        );
        t.write_acknowledged(1_796_000_000_042);
        let text = t.render();
        assert_eq!(
            sample(&text, "analytics_products_moved_in_total").as_deref(),
            Some("2")
        );
        assert_eq!(
            sample(&text, "analytics_storage_last_write_timestamp_seconds").as_deref(),
            Some("1796000000.042")
        );
        assert_eq!(
            sample(
                &text,
                "analytics_storage_requests_total{operation=\"DynamoDB.BatchWriteItem\"}"
            )
            .as_deref(),
            Some("5")
        );
        assert_eq!(
            sample(
                &text,
                "analytics_storage_requests_total{operation=\"S3.PutObject\"}"
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(&text, "analytics_events_consumed_total").as_deref(),
            Some("5")
        );
        assert_eq!(
            sample(
                &text,
                "analytics_events_rejected_total{reason=\"invalid_json\"}"
            )
            .as_deref(),
            Some("2")
        );
        assert_eq!(
            sample(
                &text,
                "analytics_events_rejected_total{reason=\"weird \\\"one\\\"\"}"
            )
            .as_deref(),
            Some("1")
        );
        let bucket = |le: &str| {
            sample(
                &text,
                &format!("analytics_flush_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.005").as_deref(), Some("1"));
        assert_eq!(bucket("0.05").as_deref(), Some("2"));
        assert_eq!(bucket("30").as_deref(), Some("2"));
        assert_eq!(bucket("+Inf").as_deref(), Some("3"));
        assert_eq!(
            sample(&text, "analytics_flush_duration_seconds_count").as_deref(),
            Some("3")
        );
        // Every sample line belongs to a declared family.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                declared.iter().any(|d| name.starts_with(d)),
                "undeclared: {line}"
            );
        }
    }

    #[test]
    fn readiness_lag_and_memory() {
        let t = Telemetry::new();
        assert!(!t.is_ready());
        t.set_ready(true);
        assert!(t.is_ready());
        assert!(t.render().contains("analytics_ready 1"));
        t.set_buffered_bytes(4096);
        t.set_writes_pending(3);
        let text = t.render();
        assert!(
            text.contains("# TYPE analytics_buffered_bytes gauge\nanalytics_buffered_bytes 4096\n")
        );
        assert!(text.contains(
            "# TYPE analytics_storage_writes_pending gauge\nanalytics_storage_writes_pending 3\n"
        ));
        t.set_stopping();
        assert!(!t.is_ready());

        assert_eq!(t.total_lag(), None);
        let lag: LagTable = Arc::default();
        t.set_lag_table(lag.clone());
        lag.lock().unwrap().insert(("product.created".into(), 2), 7);
        lag.lock().unwrap().insert(("product.updated".into(), 0), 5);
        assert_eq!(t.total_lag(), Some(12));
        let text = t.render();
        assert!(
            text.contains("analytics_consumer_lag{topic=\"product.created\",partition=\"2\"} 7")
        );

        let rss = sample(
            &text,
            "analytics_process_resident_memory_bytes{process=\"supervisor\"}",
        )
        .and_then(|v| v.parse::<u64>().ok());
        assert!(rss.is_some_and(|b| b > 0), "{text}");
        t.child_started("worker-0".into(), i32::MAX);
        assert!(
            !t.render().contains("worker-0"),
            "a process that is gone is left out"
        );
    }
}
