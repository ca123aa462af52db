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
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
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
        std::env::var("ANALYTICS_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
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
         (scripts/test does), or point ANALYTICS_TEST_KAFKA_BROKERS at one"
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
    produced: std::cell::Cell<usize>,
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
            produced: std::cell::Cell::new(0),
            brokers,
        };
        let out = Command::new(ANALYTICS)
            .args(["produce", "--kafka-brokers", &t.brokers])
            .args(["--kafka-topics", &t.topics_arg()])
            .args(["--create-topics", &format!("{},{}", t.topics_arg(), t.dlq)])
            .stdin(Stdio::null())
            .output()
            .expect("run analytics produce");
        assert!(
            out.status.success(),
            "creating topics failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn topics_arg(&self) -> String {
        format!("{},{},{}", self.created, self.updated, self.deleted)
    }

    fn all(&self) -> [&str; 3] {
        [&self.created, &self.updated, &self.deleted]
    }

    /// Publishes lines with `analytics produce` (as the catalogue backend),
    /// one record per batch, so that a restarted consumer can resume at any
    /// offset on tansu (see src/produce.rs).
    fn produce(&self, lines: &[&str]) {
        self.produce_batched(lines, 1);
    }

    /// The same in batches of up to `records`: much faster on tansu, for
    /// tests whose consumer never resumes mid-stream.
    fn produce_batched(&self, lines: &[&str], records: u32) {
        let mut child = Command::new(ANALYTICS)
            .args(["produce", "--kafka-brokers", &self.brokers])
            .args(["--kafka-topics", &self.topics_arg()])
            .args(["--batch-records", &records.to_string()])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run analytics produce");
        {
            use std::io::Write;
            let mut stdin = std::io::BufWriter::new(child.stdin.take().expect("stdin"));
            for l in lines {
                writeln!(stdin, "{l}").expect("write to produce");
            }
        }
        let out = child.wait_with_output().expect("wait for produce");
        self.produced.set(self.produced.get() + lines.len());
        assert!(
            out.status.success(),
            "produce failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Offsets the service's group committed, summed over the topics'
    /// partitions. Offsets start at 0 and are contiguous here, so the sum is
    /// the number of events the service made durable. (tansu's high
    /// watermarks lag behind at times, so they are not used.)
    fn committed(&self) -> i64 {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .create()
            .expect("Kafka consumer");
        let mut tpl = TopicPartitionList::new();
        for t in self.all() {
            for p in 0..PARTITIONS {
                tpl.add_partition(t, p);
            }
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum()
    }

    /// Waits until the group committed every event produced so far.
    fn wait_until_committed(&self, run: &mut Child) {
        let produced = self.produced.get() as i64;
        let deadline = Instant::now() + RUN_DEADLINE;
        loop {
            let done = self.committed();
            assert!(
                done <= produced,
                "committed {done} offsets of {produced} events"
            );
            if done == produced {
                return;
            }
            if let Ok(Some(status)) = run.try_wait() {
                panic!("the service exited ({status}) having committed {done} of {produced}");
            }
            assert!(
                Instant::now() < deadline,
                "the service committed {done} of {produced} within {RUN_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every dead letter: (key, reason header, source.topic header).
    fn dead_letters(&self, expected: usize) -> Vec<(String, String, String)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("{}-dlq-reader", self.group))
            .set("fetch.wait.max.ms", "5")
            .create()
            .expect("Kafka consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(&self.dlq, p, Offset::Beginning)
                .expect("dlq partition");
        }
        consumer.assign(&tpl).expect("assign dlq");
        let mut out = Vec::new();
        // Read until `expected` arrived, then a little longer for extras.
        let mut deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if out.len() == expected {
                deadline = deadline.min(Instant::now() + Duration::from_secs(1));
            }
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
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(service_log())
        .spawn()
        .expect("spawn analytics run")
}

/// The service's log: appended to `$ANALYTICS_TEST_SERVICE_LOG` when set
/// (for debugging a failure), else captured with the run.
fn service_log() -> Stdio {
    std::env::var_os("ANALYTICS_TEST_SERVICE_LOG")
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .map_or_else(Stdio::piped, Stdio::from)
}

/// SIGTERM, then the run must exit 0; its stdout.
fn stop(run: Child) -> String {
    signal(run.id() as i32, Signal::SIGTERM);
    String::from_utf8_lossy(&finish(run).stdout).into_owned()
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
    fold_rejections(input)
        .split(", ")
        .filter_map(|part| {
            let (reason, n) = part.rsplit_once(' ')?;
            Some((reason.to_string(), n.parse().ok()?))
        })
        .collect()
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
    topics.produce_batched(&refs, 10_000);
    topics.wait_until_committed(&mut run);
    let stdout = stop(run);

    assert_same_records(&export(&data), &fold(&input), "export vs fold");

    let expected = rejections_by_reason(&input);
    let letters = topics.dead_letters(expected.values().sum());
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
    topics.produce_batched(&with_copies, 10_000);
    topics.wait_until_committed(&mut run);
    stop(run);
    assert_same_records(&export(&data), &fold(&input), "export vs fold");
}

#[test]
fn sigkill_of_a_worker_storage_and_the_whole_service_mid_stream_loses_and_doubles_nothing() {
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
    // Early: often before or while the shards restore.
    let workers = wait_for_children(pid, "analytics-worker", 2);
    signal(workers[0], Signal::SIGKILL);
    topics.produce(&refs[quarter..2 * quarter]);
    let storage = wait_for_children(pid, " storage ", 1);
    signal(storage[0], Signal::SIGKILL);
    topics.produce(&refs[2 * quarter..3 * quarter]);
    // The whole service dies (its children with it); systemd would start it
    // again, and the new one resumes from the store's positions.
    signal(pid as i32, Signal::SIGKILL);
    let _ = run.wait();

    let mut run = start(&topics, &data);
    topics.produce(&refs[3 * quarter..]);
    topics.wait_until_committed(&mut run);
    stop(run);

    assert_same_records(&export(&data), &fold(&input), "export vs fold");
    let expected: usize = rejections_by_reason(&input).values().sum();
    let letters = topics.dead_letters(expected);
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
