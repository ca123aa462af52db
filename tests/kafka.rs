//! Kafka integration tests against the real local broker (`scripts/stack up`,
//! which the test command runs): the service consumes the catalogue's topics
//! in a consumer group, with the embedded store as its sink, and its metrics
//! must equal `analytics-worker fold` of the same events whatever is killed
//! or redelivered. A missing broker fails every test with a clear message.
//!
//! Each test gets its own topics, consumer group and data directory, so the
//! tests can share one broker.

mod support;

use nix::sys::signal::Signal;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Partitions per topic, as the catalogue's topics have.
const PARTITIONS: i32 = 4;

fn brokers() -> String {
    let brokers =
        std::env::var("ANALYTICS_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let reachable = brokers.split(',').any(|b| {
        use std::net::ToSocketAddrs;
        b.to_socket_addrs()
            .ok()
            .into_iter()
            .flatten()
            .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
    });
    assert!(
        reachable,
        "no Kafka broker answers at {brokers}: start the local stack with `scripts/stack up` \
         (scripts/test does), or point ANALYTICS_KAFKA_BROKERS at one"
    );
    brokers
}

/// One test's topics and group.
struct Topics {
    brokers: String,
    created: String,
    updated: String,
    deleted: String,
    dlq: String,
    group: String,
}

impl Topics {
    fn new(name: &str) -> Topics {
        let brokers = brokers();
        let tag = format!(
            "{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        );
        let t = Topics {
            created: format!("{tag}.product.created"),
            updated: format!("{tag}.product.updated"),
            deleted: format!("{tag}.product.deleted"),
            dlq: format!("{tag}.dlq"),
            group: format!("{tag}.group"),
            brokers,
        };
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &t.brokers)
            .create()
            .expect("Kafka admin client");
        let names = [&t.created, &t.updated, &t.deleted, &t.dlq];
        let new: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)))
            .collect();
        let results =
            block_on(admin.create_topics(&new, &AdminOptions::new())).expect("create topics");
        for r in results {
            r.unwrap_or_else(|(topic, e)| panic!("create topic {topic}: {e}"));
        }
        t
    }

    fn topics_arg(&self) -> String {
        format!("{},{},{}", self.created, self.updated, self.deleted)
    }

    fn all(&self) -> [&str; 3] {
        [&self.created, &self.updated, &self.deleted]
    }

    /// The topic the catalogue backend publishes a line to; malformed
    /// lines go to `created`.
    fn topic_of(&self, line: &str) -> &str {
        let kind = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| {
                v.get("eventType")
                    .and_then(|t| t.as_str())
                    .map(String::from)
            });
        match kind.as_deref() {
            Some("ProductUpdated") => &self.updated,
            Some("ProductDeleted") => &self.deleted,
            _ => &self.created,
        }
    }

    /// Publishes lines as the backend does: key sellerId, partition
    /// abs(javaStringHash(sellerId)) % 4 (a line without a seller: by its
    /// number).
    fn produce(&self, lines: &[&str]) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .expect("Kafka producer");
        for (i, line) in lines.iter().enumerate() {
            let key = supervisor::route::seller_key(line.as_bytes()).map(|k| k.into_owned());
            let partition = match &key {
                Some(k) => supervisor::route::shard_for_key(k, PARTITIONS as u32) as i32,
                None => (i % PARTITIONS as usize) as i32,
            };
            let mut record = BaseRecord::to(self.topic_of(line))
                .payload(line.as_bytes())
                .partition(partition);
            if let Some(k) = &key {
                record = record.key(k.as_bytes());
            }
            let mut record = record;
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
        }
        producer
            .flush(Duration::from_secs(60))
            .expect("flush produced events");
    }

    /// Offsets the service's group committed, and the ends of the
    /// partitions, for every topic-partition.
    fn progress(&self) -> (i64, i64) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .create()
            .expect("Kafka consumer");
        let mut tpl = TopicPartitionList::new();
        let mut end = 0;
        for t in self.all() {
            for p in 0..PARTITIONS {
                tpl.add_partition(t, p);
                let (_, high) = consumer
                    .fetch_watermarks(t, p, Duration::from_secs(10))
                    .expect("watermarks");
                end += high;
            }
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        let done: i64 = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum();
        (done, end)
    }

    /// Waits until the group committed every event produced so far.
    fn wait_until_committed(&self, run: &mut Child) {
        let deadline = Instant::now() + RUN_DEADLINE;
        loop {
            let (done, end) = self.progress();
            if done == end {
                return;
            }
            if let Ok(Some(status)) = run.try_wait() {
                panic!("the service exited ({status}) before committing everything: {done}/{end}");
            }
            assert!(
                Instant::now() < deadline,
                "the service committed {done} of {end} offsets within {RUN_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every dead letter: (key, reason header, source.topic header).
    fn dead_letters(&self) -> Vec<(String, String, String)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("{}-dlq-reader", self.group))
            .set("fetch.wait.max.ms", "5")
            .create()
            .expect("Kafka consumer");
        let mut tpl = TopicPartitionList::new();
        let mut expected = 0;
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(&self.dlq, p, Offset::Beginning)
                .expect("dlq partition");
            expected += consumer
                .fetch_watermarks(&self.dlq, p, Duration::from_secs(10))
                .expect("watermarks")
                .1;
        }
        consumer.assign(&tpl).expect("assign dlq");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (out.len() as i64) < expected && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let header = |name: &str| {
                    m.headers()
                        .and_then(|h| {
                            h.iter().find(|x| x.key == name).and_then(|x| {
                                x.value.map(|v| String::from_utf8_lossy(v).into_owned())
                            })
                        })
                        .unwrap_or_default()
                };
                let key = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                out.push((key, header("reason"), header("source.topic")));
            }
        }
        out
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// `analytics run` on the test's topics, with quick flushes.
fn start(topics: &Topics, data: &Path) -> Child {
    Command::new(ANALYTICS)
        .arg("run")
        .arg("--data-dir")
        .arg(data)
        .args(["--workers", "2", "--flush-interval-ms", "100"])
        .args(["--kafka-brokers", &topics.brokers])
        .args(["--kafka-group-id", &topics.group])
        .args(["--kafka-topics", &topics.topics_arg()])
        .args(["--dlq-topic", &topics.dlq])
        .args(["--kafka-stats-interval-ms", "1000"])
        // A killed instance's partitions move on within seconds, not 45 s.
        .args(["--kafka-property", "session.timeout.ms=6000"])
        .args(["--kafka-property", "heartbeat.interval.ms=500"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn analytics run")
}

/// SIGTERM, then the run must exit 0; its stdout.
fn stop(run: Child) -> String {
    let pid = run.id() as i32;
    signal(pid, Signal::SIGTERM);
    let out = wait_with_deadline(run);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "run failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read events")
        .lines()
        .map(String::from)
        .collect()
}

/// Lines `fold` rejects, by reason, from its stderr summary.
fn rejections_by_reason(input: &Path) -> BTreeMap<String, usize> {
    let out = Command::new(WORKER)
        .arg("fold")
        .arg(input)
        .output()
        .expect("run analytics-worker fold");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut by = BTreeMap::new();
    if let Some((_, reasons)) = stderr.trim().split_once(" lines: ") {
        for part in reasons.split(", ") {
            if let Some((reason, n)) = part.rsplit_once(' ')
                && let Ok(n) = n.parse()
            {
                by.insert(reason.to_string(), n);
            }
        }
    }
    by
}

#[test]
fn a_realistic_trace_through_kafka_equals_the_straight_fold_with_every_bad_event_in_the_dlq() {
    let topics = Topics::new("trace");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 100_000, 1000);
    let lines = read_lines(&input);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let data = dir.path().join("data");

    let mut run = start(&topics, &data);
    topics.produce(&refs);
    topics.wait_until_committed(&mut run);
    let stdout = stop(run);

    assert_eq!(export(&data), fold(&input), "metrics differ from the fold");

    let expected = rejections_by_reason(&input);
    let letters = topics.dead_letters();
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for (key, reason, source) in &letters {
        *got.entry(reason.clone()).or_default() += 1;
        assert!(
            key.starts_with(&format!("{source}/")),
            "{key} from {source}"
        );
    }
    assert!(!expected.is_empty(), "the trace has malformed events");
    assert_eq!(got, expected, "dead letters by reason");
    let total: usize = expected.values().sum();
    assert!(
        stdout.contains(&format!("rejected: {total} (")),
        "run summary: {stdout}"
    );
}

#[test]
fn redelivered_messages_change_nothing() {
    let topics = Topics::new("dup");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 20_000, 0);
    let lines = read_lines(&input);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let data = dir.path().join("data");

    let mut run = start(&topics, &data);
    // A producer retry: every 7th message is delivered twice, the copy a
    // little later in its partition.
    let mut with_copies = Vec::new();
    for (i, l) in refs.iter().enumerate() {
        with_copies.push(*l);
        if i % 7 == 0 {
            with_copies.push(*l);
        }
    }
    topics.produce(&with_copies);
    topics.wait_until_committed(&mut run);
    stop(run);
    assert_eq!(export(&data), fold(&input));
}

#[test]
fn sigkill_of_a_worker_storage_and_the_supervisor_mid_stream_loses_and_doubles_nothing() {
    let topics = Topics::new("kill");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 60_000, 2000);
    let lines = read_lines(&input);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let data = dir.path().join("data");
    let quarter = refs.len() / 4;

    let mut run = start(&topics, &data);
    let pid = run.id();
    topics.produce(&refs[..quarter]);
    let workers = wait_for_children(pid, "analytics-worker", 2);
    signal(workers[0], Signal::SIGKILL);
    topics.produce(&refs[quarter..2 * quarter]);
    let storage = wait_for_children(pid, " storage ", 1);
    signal(storage[0], Signal::SIGKILL);
    topics.produce(&refs[2 * quarter..3 * quarter]);
    // The whole service dies; systemd would start it again.
    signal(pid as i32, Signal::SIGKILL);
    let _ = run.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !children(pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "children outlived the supervisor"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut run = start(&topics, &data);
    topics.produce(&refs[3 * quarter..]);
    topics.wait_until_committed(&mut run);
    stop(run);
    assert_eq!(export(&data), fold(&input));
    let expected: usize = rejections_by_reason(&input).values().sum();
    let letters = topics.dead_letters();
    let mut distinct: Vec<&String> = letters.iter().map(|(k, _, _)| k).collect();
    distinct.sort();
    distinct.dedup();
    // At least once: a crash between publishing and committing publishes
    // again, under the same key.
    assert_eq!(
        distinct.len(),
        expected,
        "every bad event has a dead letter"
    );
}
