//! The Kafka side of the integration tests: one test's topics and consumer
//! group on the local broker, the store the service writes to (embedded or
//! DynamoDB/S3 on the local moto), and `analytics run` on them.

use super::*;
use nix::sys::signal::Signal;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};

/// Partitions per topic, as the catalogue's topics have.
pub const PARTITIONS: i32 = 4;

/// Fails the test with a clear message unless something accepts TCP
/// connections at one of `addrs` (host:port, comma separated).
fn assert_reachable(addrs: &str, what: &str, hint: &str) {
    use std::net::ToSocketAddrs;
    let reachable = addrs.split(',').any(|b| {
        b.to_socket_addrs()
            .ok()
            .into_iter()
            .flatten()
            .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
    });
    assert!(reachable, "no {what} answers at {addrs}: {hint}");
}

pub fn brokers() -> String {
    let brokers =
        std::env::var("ANALYTICS_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    assert_reachable(
        &brokers,
        "Kafka broker",
        "start the local stack with `scripts/stack up` (scripts/test does), \
         or point ANALYTICS_TEST_KAFKA_BROKERS at one",
    );
    brokers
}

/// The moto endpoint (`ANALYTICS_TEST_AWS_ENDPOINT`), checked to answer.
pub fn aws_endpoint() -> String {
    let ep = std::env::var("ANALYTICS_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:5000".into());
    let hostport = ep
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    assert_reachable(
        &hostport,
        "DynamoDB/S3 server (moto)",
        "start the local stack with `scripts/stack up` (scripts/test does), \
         or point ANALYTICS_TEST_AWS_ENDPOINT at one",
    );
    ep
}

/// A name unique to this test and moment, valid for topics, tables and
/// buckets (lower case, digits, dashes).
pub fn unique_tag(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 10_000_000_000)
            .unwrap_or(0)
    )
}

/// Where the service under test keeps its metrics.
#[derive(Clone)]
pub enum Sink {
    /// The embedded store in this data directory.
    Embedded(PathBuf),
    /// DynamoDB and S3 on the local moto; the data directory is unused but
    /// given (the service must not need it).
    Aws {
        endpoint: String,
        tag: String,
        data: PathBuf,
    },
}

impl Sink {
    pub fn embedded(data: PathBuf) -> Sink {
        Sink::Embedded(data)
    }

    /// Tables and bucket of their own, named after `tag`.
    pub fn aws(tag: &str, data: PathBuf) -> Sink {
        Sink::Aws {
            endpoint: aws_endpoint(),
            tag: tag.to_lowercase(),
            data,
        }
    }

    /// The AWS endpoint of an AWS sink.
    pub fn endpoint(&self) -> &str {
        match self {
            Sink::Aws { endpoint, .. } => endpoint,
            Sink::Embedded(_) => panic!("an embedded sink has no AWS endpoint"),
        }
    }

    /// The same tables and bucket through another endpoint (a proxy).
    pub fn with_endpoint(&self, endpoint: String) -> Sink {
        let mut s = self.clone();
        if let Sink::Aws { endpoint: e, .. } = &mut s {
            *e = endpoint;
        }
        s
    }

    /// The same store with another data directory (a second instance).
    pub fn with_data_dir(&self, dir: PathBuf) -> Sink {
        match self.clone() {
            Sink::Embedded(_) => Sink::Embedded(dir),
            Sink::Aws { endpoint, tag, .. } => Sink::Aws {
                endpoint,
                tag,
                data: dir,
            },
        }
    }

    /// The store's flags, for `run`, `export` and `query`.
    pub fn args(&self) -> Vec<String> {
        match self {
            Sink::Embedded(data) => vec!["--data-dir".into(), data.display().to_string()],
            Sink::Aws {
                endpoint,
                tag,
                data,
            } => vec![
                "--data-dir".into(),
                data.display().to_string(),
                "--store".into(),
                "aws".into(),
                "--aws-endpoint".into(),
                endpoint.clone(),
                "--dynamodb-table".into(),
                format!("{tag}-metrics"),
                "--state-table".into(),
                format!("{tag}-state"),
                "--s3-bucket".into(),
                format!("{tag}-archive"),
            ],
        }
    }

    /// Every object under `events/` in the archive (the archive directory,
    /// or the S3 bucket), as (key, gunzipped contents).
    pub fn event_archive(&self) -> Vec<(String, String)> {
        let gunzip = |bytes: &[u8]| {
            let mut text = String::new();
            flate2::read::GzDecoder::new(bytes)
                .read_to_string(&mut text)
                .expect("an archived event range is gzip text");
            text
        };
        match self {
            Sink::Embedded(data) => {
                let root = data.join("archive");
                let mut out = Vec::new();
                let mut dirs = vec![root.join("events")];
                while let Some(dir) = dirs.pop() {
                    let Ok(entries) = std::fs::read_dir(&dir) else {
                        continue;
                    };
                    for entry in entries {
                        let path = entry.expect("archive entry").path();
                        if path.is_dir() {
                            dirs.push(path);
                        } else {
                            let key = path.strip_prefix(&root).expect("under the archive");
                            let bytes = std::fs::read(&path).expect("read an archived range");
                            out.push((key.display().to_string(), gunzip(&bytes)));
                        }
                    }
                }
                out
            }
            Sink::Aws { endpoint, tag, .. } => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                runtime.block_on(async {
                    // In-process, the SDK reads credentials from the
                    // environment (setting it here would race other threads).
                    assert!(
                        std::env::var_os("AWS_ACCESS_KEY_ID").is_some(),
                        "reading S3 here needs the stack's AWS_* variables in the \
                         environment: run scripts/test, or eval \"$(scripts/stack env | sed 's/^/export /')\""
                    );
                    let cfg = analytics::aws_store::AwsConfig {
                        endpoint: Some(endpoint.clone()),
                        region: Some("us-east-1".into()),
                        metrics_table: format!("{tag}-metrics"),
                        state_table: format!("{tag}-state"),
                        bucket: format!("{tag}-archive"),
                        ..Default::default()
                    };
                    let bucket = cfg.bucket.clone();
                    let store = analytics::aws_store::AwsStore::connect(cfg)
                        .await
                        .expect("connect to moto");
                    let (_, s3) = store.clients();
                    let mut out = Vec::new();
                    let mut token = None;
                    loop {
                        let page = s3
                            .list_objects_v2()
                            .bucket(&bucket)
                            .prefix("events/")
                            .set_continuation_token(token)
                            .send()
                            .await
                            .expect("list the event archive");
                        for object in page.contents() {
                            let key = object.key().expect("object key").to_string();
                            let body = s3
                                .get_object()
                                .bucket(&bucket)
                                .key(&key)
                                .send()
                                .await
                                .expect("get an archived range")
                                .body
                                .collect()
                                .await
                                .expect("read an archived range")
                                .into_bytes();
                            out.push((key, gunzip(&body)));
                        }
                        token = page.next_continuation_token().map(str::to_owned);
                        if token.is_none() {
                            return out;
                        }
                    }
                })
            }
        }
    }

    /// Checks that the event archive holds every one of the `produced`
    /// events of `topics` exactly once: per topic-partition, offsets 0..n
    /// without a gap or a repeat, each object named after what it holds.
    pub fn assert_event_archive_exactly_once(&self, topics: &Topics, produced: usize) {
        let mut offsets: BTreeMap<(String, u64), Vec<i64>> = BTreeMap::new();
        let objects = self.event_archive();
        for (key, text) in &objects {
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{key}: {e}: {l}")))
                .collect();
            let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
                panic!("{key} is empty");
            };
            let topic = first["topic"].as_str().expect("topic").to_string();
            let partition = first["partition"].as_u64().expect("partition");
            let name = format!(
                "/{topic}-{partition}-{}-{}.jsonl.gz",
                first["offset"], last["offset"]
            );
            assert!(
                key.starts_with("events/dt=") && key.ends_with(&name),
                "{key} holds {name}"
            );
            assert!(
                topics.all().contains(&topic.as_str()),
                "{key}: topic {topic}"
            );
            for l in &lines {
                assert!(
                    l["timestamp"].as_i64().is_some(),
                    "{key}: no timestamp in {l}"
                );
                assert!(
                    l.get("value").is_some() || l.get("raw").is_some() || l.get("rawHex").is_some(),
                    "{key}: no event in {l}"
                );
                assert_eq!(l["topic"], first["topic"], "{key}");
                assert_eq!(l["partition"], first["partition"], "{key}");
                offsets
                    .entry((topic.clone(), partition))
                    .or_default()
                    .push(l["offset"].as_i64().expect("offset"));
            }
        }
        let mut total = 0;
        for ((topic, partition), mut got) in offsets {
            got.sort_unstable();
            let want: Vec<i64> = (0..got.len() as i64).collect();
            assert!(
                got == want,
                "{topic}-{partition}: archived offsets are not 0..{} exactly once: {:?}",
                got.len(),
                first_difference(&got, &want)
            );
            total += got.len();
        }
        assert_eq!(
            total,
            produced,
            "archived events in {} objects",
            objects.len()
        );
    }

    /// `analytics export` of this store.
    pub fn export(&self) -> String {
        let mut cmd = Command::new(ANALYTICS);
        cmd.arg("export").args(self.args());
        aws_env(&mut cmd);
        stdout_of(&mut cmd, "analytics export")
    }
}

/// Dummy AWS credentials and region for moto, used unless the environment
/// has real ones; no instance-metadata probing.
pub const AWS_TEST_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// [`AWS_TEST_ENV`] on a command, where the environment lacks them.
pub fn aws_env(cmd: &mut Command) {
    for (k, v) in AWS_TEST_ENV {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
}

/// One test's topics and group.
pub struct Topics {
    pub brokers: String,
    pub created: String,
    pub updated: String,
    pub deleted: String,
    pub dlq: String,
    pub group: String,
    produced: std::cell::Cell<usize>,
}

impl Topics {
    pub fn new(tag: &str) -> Topics {
        let brokers = brokers();
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

    /// Events published to the three topics so far.
    pub fn produced(&self) -> usize {
        self.produced.get()
    }

    pub fn topics_arg(&self) -> String {
        format!("{},{},{}", self.created, self.updated, self.deleted)
    }

    pub fn all(&self) -> [&str; 3] {
        [&self.created, &self.updated, &self.deleted]
    }

    /// Publishes lines with `analytics produce` (as the catalogue backend),
    /// one record per batch, so that a restarted consumer can resume at any
    /// offset on tansu (see src/produce.rs).
    pub fn produce(&self, lines: &[&str]) {
        self.produce_batched(lines, 1);
    }

    /// The same in batches of up to `records`: much faster on tansu, for
    /// tests whose consumer never resumes mid-stream.
    pub fn produce_batched(&self, lines: &[&str], records: u32) {
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
    pub fn committed(&self) -> i64 {
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
        // A busy broker may time out a request now and then: ask again.
        let mut attempts = 0;
        let committed = loop {
            match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                Ok(c) => break c,
                Err(e) if attempts < 5 => {
                    eprintln!("reading committed offsets: {e}; asking again");
                    attempts += 1;
                }
                Err(e) => panic!("reading committed offsets: {e}"),
            }
        };
        committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum()
    }

    /// Waits until the group committed every event produced so far; fails
    /// if every one of `runs` exited first.
    pub fn wait_until_committed(&self, runs: &mut [&mut Service]) {
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
            let exited: Vec<String> = runs
                .iter_mut()
                .filter_map(|r| r.try_wait().map(|s| s.to_string()))
                .collect();
            let logs = || {
                let mut logs: Vec<String> = runs.iter().map(|r| r.log_tail()).collect();
                logs.push(self.broker_log());
                logs.join("\n")
            };
            assert!(
                exited.len() < runs.len(),
                "the service exited ({}) having committed {done} of {produced}\n{}",
                exited.join(", "),
                logs()
            );
            assert!(
                Instant::now() < deadline,
                "the service committed {done} of {produced} within {RUN_DEADLINE:?}\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The broker's log lines about this test's group (tansu logs evictions
    /// and new leaders at info: scripts/stack), for a failure message.
    pub fn broker_log(&self) -> String {
        let Ok(path) = std::env::var("ANALYTICS_TEST_BROKER_LOG") else {
            return "--- no broker log (ANALYTICS_TEST_BROKER_LOG unset) ---".into();
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&self.group)).collect();
        let from = lines.len().saturating_sub(20);
        format!(
            "--- the broker's last {} lines about {} ({path}) ---\n{}",
            lines.len() - from,
            self.group,
            lines[from..].join("\n")
        )
    }

    /// Every dead letter: (key, reason header, source.topic header).
    pub fn dead_letters(&self, expected: usize) -> Vec<(String, String, String)> {
        self.dead_letter_records(expected)
            .into_iter()
            .map(|r| {
                let header = |name: &str| r.headers.get(name).cloned().unwrap_or_default();
                (r.key, header("reason"), header("source.topic"))
            })
            .collect()
    }

    /// The DLQ's messages, whole.
    pub fn dead_letter_records(&self, expected: usize) -> Vec<DlqRecord> {
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
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .filter_map(|x| {
                                let v = String::from_utf8_lossy(x.value?).into_owned();
                                Some((x.key.to_string(), v))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(DlqRecord {
                    key: m
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default(),
                    headers,
                    payload: m.payload().unwrap_or_default().to_vec(),
                });
            }
        }
        out
    }
}

/// One message of the dead-letter topic.
pub struct DlqRecord {
    pub key: String,
    pub headers: BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

/// A running `analytics run`, SIGKILLed (with its children, which die with
/// it) if the test ends without stopping it: a failed test must not leave
/// a service behind that loads the shared stack.
pub struct Service {
    child: Option<Child>,
    log: ServiceLog,
}

impl Service {
    pub fn id(&self) -> u32 {
        self.child().id()
    }

    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("a running service")
    }

    /// The run's exit status, if it ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id() as i32, Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// The last lines of the run's log, for a failure message.
    pub fn log_tail(&self) -> String {
        self.log.tail(40)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where a run's stderr goes: always a file, never a pipe. Nothing reads a
/// pipe while the service runs, so a long run would fill it (64 KiB) and
/// block on its next log line. The file is `$ANALYTICS_TEST_SERVICE_LOG`
/// (appended) when set, a named file of the test's when given, else a
/// temporary file; a failed wait shows its tail either way.
pub struct ServiceLog {
    path: std::path::PathBuf,
    _temporary: Option<tempfile::TempPath>,
}

impl ServiceLog {
    /// `$ANALYTICS_TEST_SERVICE_LOG` when set, else a temporary file.
    pub fn new() -> ServiceLog {
        match std::env::var_os("ANALYTICS_TEST_SERVICE_LOG") {
            Some(p) => ServiceLog::at(Path::new(&p)),
            None => {
                let t = tempfile::NamedTempFile::new()
                    .expect("a temporary service log")
                    .into_temp_path();
                ServiceLog {
                    path: t.to_path_buf(),
                    _temporary: Some(t),
                }
            }
        }
    }

    /// A log at `path`, which the test reads afterwards.
    pub fn at(path: &Path) -> ServiceLog {
        ServiceLog {
            path: path.to_path_buf(),
            _temporary: None,
        }
    }

    fn stderr(&self) -> Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map(Stdio::from)
            .unwrap_or_else(|e| panic!("open the service log {}: {e}", self.path.display()))
    }

    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- last {} lines of {} ---\n{}",
            all.len() - start,
            self.path.display(),
            all[start..].join("\n")
        )
    }
}

/// `analytics run` on the test's topics into `store_args`, with quick
/// flushes (100 ms: many writes, so that kills land between and inside them)
/// and a short session timeout (a killed instance's partitions move on
/// within seconds).
pub fn start_with(topics: &Topics, store_args: &[String], log: ServiceLog) -> Service {
    let mut args = store_args.to_vec();
    args.extend(["--flush-interval-ms".into(), "100".into()]);
    start_with_args(topics, &args, log)
}

/// `start_with`, but the caller chooses the flush settings too.
pub fn start_with_args(topics: &Topics, args: &[String], log: ServiceLog) -> Service {
    let mut cmd = Command::new(ANALYTICS);
    cmd.arg("run")
        .args(args)
        .args(["--workers", "2"])
        .args(["--kafka-brokers", &topics.brokers])
        .args(["--kafka-group-id", &topics.group])
        .args(["--kafka-topics", &topics.topics_arg()])
        .args(["--dlq-topic", &topics.dlq])
        .args(["--kafka-stats-interval-ms", "1000"])
        .args(["--kafka-property", "session.timeout.ms=6000"])
        .args(["--kafka-property", "heartbeat.interval.ms=500"])
        // `ANALYTICS_TEST_RUST_LOG=info,analytics::storage=debug,supervisor=debug`
        // logs every write and flush tick, for a failure that needs them.
        .env(
            "RUST_LOG",
            std::env::var("ANALYTICS_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(log.stderr());
    aws_env(&mut cmd);
    Service {
        child: Some(cmd.spawn().expect("spawn analytics run")),
        log,
    }
}

pub fn start(topics: &Topics, sink: &Sink) -> Service {
    start_with(topics, &sink.args(), ServiceLog::new())
}

/// SIGTERM, then the run must exit 0; its stdout.
pub fn stop(mut run: Service) -> String {
    signal(run.id() as i32, Signal::SIGTERM);
    let child = run.child.take().expect("a running service");
    let out = wait_with_deadline(child);
    assert!(
        out.status.success(),
        "run failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        run.log_tail()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read events")
        .lines()
        .map(String::from)
        .collect()
}

/// Lines `fold` rejects, by reason, from its stderr summary.
pub fn rejections_by_reason(input: &Path) -> BTreeMap<String, usize> {
    fold_rejections(input)
        .split(", ")
        .filter_map(|part| {
            let (reason, n) = part.rsplit_once(' ')?;
            Some((reason.to_string(), n.parse().ok()?))
        })
        .collect()
}

/// Dead letters by reason; each key names its source topic.
pub fn letters_by_reason(letters: &[(String, String, String)]) -> BTreeMap<String, usize> {
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for (key, reason, source) in letters {
        *got.entry(reason.clone()).or_default() += 1;
        assert!(
            key.starts_with(&format!("{source}/")),
            "{key} from {source}"
        );
    }
    got
}

/// Where two sorted offset lists first differ: (index, got, want).
fn first_difference(got: &[i64], want: &[i64]) -> (usize, Option<i64>, Option<i64>) {
    let i = got.iter().zip(want).take_while(|(g, w)| g == w).count();
    (i, got.get(i).copied(), want.get(i).copied())
}
