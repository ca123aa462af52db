//! The production path end to end against the real local stack (Kafka on
//! tansu, DynamoDB and S3 on moto; `scripts/stack up`, which the test
//! command runs): the service consumes the catalogue's topics into the AWS
//! store, and the metrics read back from DynamoDB (`analytics export
//! --store aws`) must equal `analytics-worker fold` of the same events,
//! whatever is killed, redelivered, rebalanced or unreachable. A missing
//! server fails every test with a clear message.
//!
//! Each test has its own topics, consumer group, tables and bucket.

mod support;

use nix::sys::signal::Signal;
use std::time::{Duration, Instant};
use support::kafka::*;
use support::proxy::Proxy;
use support::*;

/// One test at a time: they share one moto, which serves one request at a
/// time, and two of them at once starved each other (the kill test once
/// committed 5,571 of 40,000 in 300 s beside the two-instance test; alone it
/// takes 30 s).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Case {
    _turn: std::sync::MutexGuard<'static, ()>,
    topics: Topics,
    sink: Sink,
    input: std::path::PathBuf,
    lines: Vec<String>,
    dir: tempfile::TempDir,
}

impl Case {
    fn new(name: &str, events: u64, bad_every: u64) -> Case {
        // A test that failed poisons the lock; the next one still runs.
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let tag = unique_tag(name);
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = Sink::aws(&tag, dir.path().join("data"));
        let input = generate(dir.path(), events, bad_every);
        Case {
            _turn: turn,
            topics: Topics::new(&tag),
            sink,
            lines: read_lines(&input),
            input,
            dir,
        }
    }

    fn lines(&self) -> Vec<&str> {
        self.lines.iter().map(String::as_str).collect()
    }

    /// Metrics equal the fold, and S3 archived every event exactly once.
    fn assert_exact(&self) {
        assert_same_records(&self.sink.export(), &fold(&self.input), "DynamoDB vs fold");
        self.sink
            .assert_event_archive_exactly_once(&self.topics, self.topics.produced());
    }
}

/// A pseudo-random pause of up to `max_ms`, so kills land at different
/// moments from run to run (the seed is printed to reproduce one).
fn random_pause(max_ms: u64) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let ms = nanos % (max_ms + 1);
    eprintln!("pausing {ms} ms before the next kill");
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn a_realistic_trace_into_dynamodb_equals_the_straight_fold_with_every_bad_event_in_the_dlq() {
    let case = Case::new("ddb-trace", 100_000, 1000);
    let mut run = start(&case.topics, &case.sink);
    case.topics.produce_batched(&case.lines(), 10_000);
    case.topics.wait_until_committed(&mut [&mut run]);
    let stdout = stop(run);

    case.assert_exact();
    let expected = rejections_by_reason(&case.input);
    assert!(!expected.is_empty(), "the trace has malformed events");
    let letters = case.topics.dead_letters(expected.values().sum());
    assert_eq!(
        letters_by_reason(&letters),
        expected,
        "dead letters by reason"
    );
    // A clean shutdown archives a metric snapshot to S3.
    assert!(stdout.contains("snapshot: s3://"), "run summary: {stdout}");
}

#[test]
fn ids_categories_and_names_beyond_dynamodbs_limits_go_to_the_dlq_and_the_rest_is_stored() {
    // DynamoDB refuses a key over 2048 (partition) or 1024 (sort) bytes and
    // an item over 400 KB, for good: one such event used to fail every
    // write of its partition. The service rejects them at decoding instead
    // (the same in every store), and stores values right at its limits.
    let mut case = Case::new("ddb-limits", 2_000, 0);
    let event = |id: &str, seller: &str, category: &str, name: &str| {
        format!(
            r#"{{"eventId":"limits","eventType":"ProductCreated","timestamp":1700000000000,"data":{{"productId":{id},"sellerId":"{seller}","name":"{name}","category":"{category}","price":"2.50","quantity":2}}}}"#
        )
    };
    let key = "k".repeat(1000);
    let longer = "k".repeat(1001);
    let (quoted_key, quoted_longer) = (format!("\"{key}\""), format!("\"{longer}\""));
    let name = "n".repeat(16 * 1024);
    let huge_name = "n".repeat(500_000);
    let extra = [
        // Right at the limits, and on the low-stock list (quantity 2).
        event(&quoted_key, &key, &key, &name),
        event(&quoted_longer, "seller-1", "Books", "a"),
        event("1", &longer, "Books", "a"),
        event("2", "seller-1", &longer, "a"),
        event("3", "seller-1", "Books", &huge_name),
        format!(
            r#"{{"eventType":"ProductUpdated","timestamp":1700000000001,"data":{{"productId":4,"sellerId":"seller-1","changes":{{"category":{{"old":"{longer}","new":"Books"}}}}}}}}"#
        ),
    ];
    case.lines.extend(extra);
    std::fs::write(&case.input, case.lines.join("\n") + "\n").expect("write the input");

    let mut run = start(&case.topics, &case.sink);
    case.topics.produce_batched(&case.lines(), 10_000);
    case.topics.wait_until_committed(&mut [&mut run]);
    stop(run);

    case.assert_exact();
    let export = case.sink.export();
    assert!(
        export.contains(&format!(r#""productId":"{key}""#)),
        "the product at the limits is stored, with its low-stock item"
    );
    let expected = rejections_by_reason(&case.input);
    assert_eq!(expected.values().sum::<usize>(), 5, "{expected:?}");
    let letters = case.topics.dead_letters(5);
    assert_eq!(
        letters_by_reason(&letters),
        expected,
        "dead letters by reason"
    );
}

#[test]
fn redelivered_messages_change_nothing_in_dynamodb() {
    let case = Case::new("ddb-dup", 20_000, 0);
    let lines = case.lines();
    // A producer retry: every 7th message is delivered twice, the copy a
    // little later in its partition.
    let mut with_copies = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        with_copies.push(*l);
        if i % 7 == 0 {
            with_copies.push(*l);
        }
    }
    let mut run = start(&case.topics, &case.sink);
    case.topics.produce_batched(&with_copies, 10_000);
    case.topics.wait_until_committed(&mut [&mut run]);
    stop(run);
    case.assert_exact();
}

#[test]
fn sigkill_of_a_worker_storage_and_supervisor_at_random_moments_loses_and_doubles_nothing() {
    let case = Case::new("ddb-kill", 40_000, 2000);
    let lines = case.lines();
    let quarter = lines.len() / 4;
    let topics = &case.topics;

    let run = start(topics, &case.sink);
    let pid = run.id();
    topics.produce(&lines[..quarter]);
    random_pause(500);
    let workers = wait_for_children(pid, "analytics-worker", 2);
    signal(workers[0], Signal::SIGKILL);
    topics.produce(&lines[quarter..2 * quarter]);
    random_pause(500);
    let storage = wait_for_children(pid, " storage ", 1);
    signal(storage[0], Signal::SIGKILL);
    topics.produce(&lines[2 * quarter..3 * quarter]);
    random_pause(500);
    // The supervisor dies (its children with it); systemd would start the
    // service again, and the new one resumes from DynamoDB's state.
    run.kill();

    let mut run = start(topics, &case.sink);
    topics.produce(&lines[3 * quarter..]);
    topics.wait_until_committed(&mut [&mut run]);
    stop(run);

    case.assert_exact();
    let expected: usize = rejections_by_reason(&case.input).values().sum();
    let letters = topics.dead_letters(expected);
    let mut distinct: Vec<&String> = letters.iter().map(|(k, _, _)| k).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        expected,
        "every bad event has a dead letter"
    );
}

#[test]
fn two_instances_in_one_group_one_killed_mid_run_sum_categories_exactly() {
    let case = Case::new("ddb-two", 40_000, 0);
    let lines = case.lines();
    let third = lines.len() / 3;
    let topics = &case.topics;
    // Two instances: one group, one set of tables, their own data dirs.
    let other = case.dir.path().join("other");
    let log_a = case.dir.path().join("a.log");
    let log_b = case.dir.path().join("b.log");
    let mut a = start_with(topics, &case.sink.args(), ServiceLog::at(&log_a));
    let mut b = start_with(
        topics,
        &case.sink.with_data_dir(other).args(),
        ServiceLog::at(&log_b),
    );
    topics.produce(&lines[..third]);
    topics.wait_until_committed(&mut [&mut a, &mut b]);
    // Both instances own partitions (so both write category parts).
    for log in [&log_a, &log_b] {
        let text = std::fs::read_to_string(log).expect("read a log");
        let owned = text
            .lines()
            .rfind(|l| l.contains("partitions assigned"))
            .unwrap_or_default();
        assert!(
            owned.contains("shards={") && !owned.contains("shards={}"),
            "{} owns no partition: {owned:?}",
            log.display()
        );
    }
    topics.produce(&lines[third..2 * third]);
    random_pause(1000);
    a.kill();
    // b takes over a's partitions after the session timeout and restores
    // them from DynamoDB/S3.
    topics.produce(&lines[2 * third..]);
    topics.wait_until_committed(&mut [&mut b]);
    stop(b);
    case.assert_exact();
}

#[test]
fn a_20_second_dynamodb_outage_mid_run_is_waited_out_and_loses_nothing() {
    let case = Case::new("ddb-outage", 20_000, 0);
    let lines = case.lines();
    let half = lines.len() / 2;
    let topics = &case.topics;
    let target: std::net::SocketAddr = case
        .sink
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("moto endpoint host:port");
    let proxy = Proxy::start(target);
    let store_args = case.sink.with_endpoint(proxy.endpoint()).args();

    let mut run = start_with(topics, &store_args, ServiceLog::new());
    topics.produce_batched(&lines[..half], 10_000);
    topics.wait_until_committed(&mut [&mut run]);
    let before = topics.committed();

    proxy.down();
    topics.produce_batched(&lines[half..], 10_000);
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(20) {
        // The service waits: it neither exits nor commits what it could
        // not store.
        assert!(
            run.try_wait().is_none(),
            "the service exited during the outage"
        );
        assert_eq!(
            topics.committed(),
            before,
            "committed offsets during the outage"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    proxy.up();
    topics.wait_until_committed(&mut [&mut run]);
    let stdout = stop(run);
    assert!(
        stdout.contains("worker/storage restarts: 0"),
        "the outage is waited out, not crashed through: {stdout}"
    );
    case.assert_exact();
}

/// `products` products of 20 sellers in 5 categories, each created with
/// its final price and quantity (`updates` = 0), or created with others and
/// then updated `updates` times, the last update setting the final ones.
fn catalogue(products: u64, updates: u64) -> Vec<String> {
    let mut lines = Vec::new();
    // 2023-11-14T12:00:00Z: the updates (up to 2.5 h later) stay within the
    // UTC day, whose end would take the shards' changes apart.
    let t0: u64 = 1_699_963_200_000;
    for p in 0..products {
        let seller = format!("seller-{}", p % 20);
        let category = format!("Category {}", p % 5);
        let (price, quantity) = (10 + p % 90, 50 + p % 50);
        let first = if updates == 0 {
            (price, quantity)
        } else {
            (1, 11)
        };
        lines.push(format!(
            r#"{{"eventId":"c-{p}","eventType":"ProductCreated","timestamp":{t},"data":{{"productId":"{p}","sellerId":"{seller}","name":"Product {p}","category":"{category}","price":{}.00,"quantity":{}}}}}"#,
            first.0,
            first.1,
            t = t0 + p,
        ));
        for u in 1..=updates {
            let (new_price, new_quantity) = if u == updates {
                (price, quantity)
            } else {
                (1 + u, 11 + u)
            };
            let (old_price, old_quantity) = if u == 1 { first } else { (u, 10 + u) };
            lines.push(format!(
                r#"{{"eventId":"u-{p}-{u}","eventType":"ProductUpdated","timestamp":{t},"data":{{"productId":"{p}","sellerId":"{seller}","changes":{{"price":{{"old":{old_price}.00,"new":{new_price}.00}},"quantity":{{"old":{old_quantity},"new":{new_quantity}}}}}}}}}"#,
                t = t0 + p + u * 1_000_000,
            ));
        }
    }
    lines
}

/// Runs `lines` through the service in one flush (the flush interval is
/// longer than the test; the flush comes with the stop); the storage
/// requests by operation from `run`'s summary, and the objects of the raw
/// event archive (one per topic-partition the flush covered).
fn requests_of_one_flush(
    name: &str,
    lines: &[String],
) -> (std::collections::BTreeMap<String, u64>, u64) {
    let case = Case::new(name, 1, 0);
    let input = case.dir.path().join("catalogue.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").expect("write the input");
    let port = support::ops::free_port();
    let mut args = case.sink.args();
    args.extend(
        [
            "--flush-interval-ms",
            "3600000",
            "--flush-max-events",
            "200000",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ]
        .map(String::from),
    );
    let run = start_with_args(&case.topics, &args, ServiceLog::new());
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    case.topics.produce(&refs);
    let deadline = Instant::now() + RUN_DEADLINE;
    loop {
        let (_, body) = support::ops::http_get(port, "/metrics");
        let consumed =
            support::ops::sample(&body, "analytics_events_consumed_total").unwrap_or(0.0);
        if consumed >= lines.len() as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumed {consumed} of {}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = stop(run);
    case.sink
        .assert_event_archive_exactly_once(&case.topics, lines.len());
    let archived = case.sink.event_archive().len() as u64;
    assert_same_records(&case.sink.export(), &fold(&input), "DynamoDB vs fold");
    let summary = out
        .lines()
        .find_map(|l| l.strip_prefix("storage requests: "))
        .unwrap_or_else(|| panic!("no storage requests in the summary:\n{out}"));
    let requests = summary
        .split(", ")
        .map(|op| {
            let (name, n) = op.rsplit_once(' ').expect("`operation count`");
            (name.to_string(), n.parse().expect("a count"))
        })
        .collect();
    (requests, archived)
}

/// Requests that write metrics and state (what grows with the data; reads
/// and the start-up checks are the same for both runs), without the event
/// archive's `archived` puts, which follow the topic-partitions a flush
/// covers.
fn writes((requests, archived): &(std::collections::BTreeMap<String, u64>, u64)) -> u64 {
    const WRITES: [&str; 6] = [
        "DynamoDB.BatchWriteItem",
        "DynamoDB.TransactWriteItems",
        "DynamoDB.PutItem",
        "DynamoDB.UpdateItem",
        "DynamoDB.DeleteItem",
        "S3.PutObject",
    ];
    WRITES
        .iter()
        .filter_map(|op| requests.get(*op))
        .sum::<u64>()
        - archived
}

#[test]
fn storage_writes_grow_with_changed_entities_not_with_repeated_updates() {
    // 500 products, then the same 500 reaching the same state through ten
    // times the events.
    let once = requests_of_one_flush("ddb-writes-once", &catalogue(500, 0));
    let repeated = requests_of_one_flush("ddb-writes-repeated", &catalogue(500, 9));
    eprintln!("500 events: {once:?}\n5,000 events: {repeated:?}");
    assert!(writes(&once) > 0, "{once:?}");
    assert_eq!(
        writes(&repeated),
        writes(&once),
        "ten times the events for the same entities changed the writes:\n{once:?}\n{repeated:?}"
    );
    // 25 sellers/categories and their daily items fit a few batches.
    assert!(writes(&once) < 100, "{once:?}");
    // One archive object per topic-partition: created only, then all but
    // deletes (4 partitions each).
    assert!(
        once.1 <= 4 && repeated.1 <= 8,
        "archived objects: {} and {}",
        once.1,
        repeated.1
    );
}
