//! Kafka integration tests against the real local broker (`scripts/stack up`,
//! which the test command runs), with the embedded store as the sink: the
//! service consumes the catalogue's topics in a consumer group, and its
//! metrics must equal `analytics-worker fold` of the same events whatever
//! is killed. A missing broker fails every test with a clear message.
//! (tests/dynamodb.rs runs the same service into DynamoDB and S3.)
//!
//! Each test gets its own topics, consumer group and data directory, so the
//! tests can share one broker. Each also checks the raw event archive (the
//! data directory's `archive/events/`): every consumed event exactly once.

mod support;

use nix::sys::signal::Signal;
use support::kafka::*;
use support::*;

#[test]
fn a_realistic_trace_through_kafka_equals_the_straight_fold_with_every_bad_event_in_the_dlq() {
    let topics = Topics::new(&unique_tag("trace"));
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 100_000, 1000);
    let lines = read_lines(&input);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let sink = Sink::embedded(dir.path().join("data"));

    let mut run = start(&topics, &sink);
    topics.produce_batched(&refs, 10_000);
    topics.wait_until_committed(&mut [&mut run]);
    let stdout = stop(run);

    assert_same_records(&sink.export(), &fold(&input), "export vs fold");
    sink.assert_event_archive_exactly_once(&topics, lines.len());

    let expected = rejections_by_reason(&input);
    let letters = topics.dead_letters(expected.values().sum());
    assert!(!expected.is_empty(), "the trace has malformed events");
    assert_eq!(
        letters_by_reason(&letters),
        expected,
        "dead letters by reason"
    );
    let total: usize = expected.values().sum();
    assert!(
        stdout.contains(&format!("rejected: {total} (")),
        "run summary: {stdout}"
    );
}

#[test]
fn sigkill_of_a_worker_storage_and_the_whole_service_mid_stream_loses_and_doubles_nothing() {
    let topics = Topics::new(&unique_tag("kill"));
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 60_000, 2000);
    let lines = read_lines(&input);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let sink = Sink::embedded(dir.path().join("data"));
    let quarter = refs.len() / 4;

    let run = start(&topics, &sink);
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
    run.kill();

    let mut run = start(&topics, &sink);
    topics.produce(&refs[3 * quarter..]);
    topics.wait_until_committed(&mut [&mut run]);
    stop(run);

    assert_same_records(&sink.export(), &fold(&input), "export vs fold");
    // The raw event archive too: what a crash left uncommitted was replaced.
    sink.assert_event_archive_exactly_once(&topics, lines.len());
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

#[test]
fn a_service_that_gives_up_exits_with_an_error_instead_of_hanging() {
    // Giving up (here: a worker dies with no restarts allowed) ends the
    // process tree; the Kafka consumer thread must end with it even when no
    // message arrives, so that systemd sees the failure and restarts us.
    let topics = Topics::new(&unique_tag("give-up"));
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::embedded(dir.path().join("data"));
    let mut args = sink.args();
    args.extend(["--max-restarts".into(), "0".into()]);
    let mut run = start_with_args(&topics, &args, ServiceLog::new());
    let input = generate(dir.path(), 1_000, 0);
    let lines = read_lines(&input);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    topics.produce(&refs);
    topics.wait_until_committed(&mut [&mut run]);

    let workers = wait_for_children(run.id(), "analytics-worker", 2);
    signal(workers[0], Signal::SIGKILL);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = run.try_wait() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service still runs 60 s after giving up; log:\n{}",
            run.log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(!status.success(), "giving up exits non-zero: {status}");
    assert!(
        run.log_tail().contains("giving up"),
        "the log says why; log:\n{}",
        run.log_tail()
    );
}

#[test]
fn a_dead_letter_too_large_for_the_dlq_is_published_with_the_first_bytes_of_its_event() {
    // librdkafka refuses messages over 1,000,000 bytes by default, below the
    // default --max-event-bytes (1 MiB): such a bad event used to fail
    // every write of its partition until the service gave up.
    let topics = Topics::new(&unique_tag("dlq-cut"));
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 1_000, 0);
    let mut lines = read_lines(&input);
    let not_json = format!("{{{}", "x".repeat(1_040_000));
    let long_name = format!(
        r#"{{"eventType":"ProductCreated","timestamp":1,"data":{{"productId":1,"sellerId":"seller-1","name":"{}","price":1,"quantity":1,"category":"c"}}}}"#,
        "n".repeat(1_040_000)
    );
    lines.push(not_json.clone());
    lines.push(long_name.clone());
    std::fs::write(&input, lines.join("\n") + "\n").expect("write the input");
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let sink = Sink::embedded(dir.path().join("data"));

    let mut run = start(&topics, &sink);
    topics.produce(&refs);
    topics.wait_until_committed(&mut [&mut run]);
    stop(run);

    assert_same_records(&sink.export(), &fold(&input), "export vs fold");
    let mut records = topics.dead_letter_records(2);
    records.sort_by(|a, b| a.headers["reason"].cmp(&b.headers["reason"]));
    assert_eq!(records.len(), 2);
    for (record, event, reason) in [
        (&records[0], &long_name, "invalid_field"),
        (&records[1], &not_json, "invalid_json"),
    ] {
        assert_eq!(record.headers["reason"], reason);
        assert_eq!(
            record.headers.get("raw.truncated").map(String::as_str),
            Some("true")
        );
        assert_eq!(record.headers["raw.bytes"], event.len().to_string());
        assert_eq!(record.payload, event.as_bytes()[..512 << 10]);
    }
}

/// Another member joins the test's group and leaves again: two rebalances.
/// Returns once it left, with the number of partitions it got.
fn join_the_group_and_leave(topics: &Topics) -> usize {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::time::{Duration, Instant};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &topics.brokers)
        .set("group.id", &topics.group)
        .set("partition.assignment.strategy", "range")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .expect("a second group member");
    consumer.subscribe(&topics.all()).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    let assigned = loop {
        // Messages it may fetch are not committed: the service reads them.
        let _ = consumer.poll(Duration::from_millis(100));
        let partitions: std::collections::BTreeSet<i32> = consumer
            .assignment()
            .map(|a| a.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        if !partitions.is_empty() {
            break partitions.len();
        }
        assert!(
            Instant::now() < deadline,
            "the second member got no partition within 60 s\n{}",
            topics.broker_log()
        );
    };
    consumer.unsubscribe();
    drop(consumer);
    assigned
}

#[test]
fn revokes_that_time_out_while_storage_is_stopped_lose_and_double_nothing() {
    let topics = Topics::new(&unique_tag("regain"));
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 8_000, 500);
    let lines = read_lines(&input);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let sink = Sink::embedded(dir.path().join("data"));
    let log = dir.path().join("run.log");
    let mut args = sink.args();
    args.extend(["--flush-interval-ms", "100", "--revoke-timeout-ms", "2000"].map(String::from));
    let mut run = start_with_args(&topics, &args, ServiceLog::at(&log));
    let half = refs.len() / 2;
    topics.produce(&refs[..half]);
    topics.wait_until_committed(&mut [&mut run]);

    // Storage stops answering: what is read from now on cannot be made
    // durable, so the revokes of the next two rebalances time out and the
    // partitions are released uncommitted, and come back to the service.
    let storage = wait_for_children(run.id(), " storage ", 1);
    signal(storage[0], Signal::SIGSTOP);
    topics.produce(&refs[half..]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let theirs = join_the_group_and_leave(&topics);
    assert!(theirs < 4, "the service kept some partitions");
    // The rebalance of the leave settles (its revoke times out too) before
    // storage answers again: after that, no rebalance comes to the rescue
    // of a partition dropped by a stale revoke.
    std::thread::sleep(std::time::Duration::from_secs(6));
    signal(storage[0], Signal::SIGCONT);

    // Every partition must be consumed to the end: none dropped when the
    // stale revokes finish. (In our runs a later rebalance also brought
    // dropped partitions back, so this passes without the tree's fix too;
    // it holds the exactness of the whole scenario.)
    topics.wait_until_committed(&mut [&mut run]);
    stop(run);
    let text = std::fs::read_to_string(&log).expect("the run's log");
    assert!(
        text.contains("releasing them uncommitted"),
        "a revoke timed out:\n{}",
        text.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    assert_same_records(&sink.export(), &fold(&input), "export vs fold");
    sink.assert_event_archive_exactly_once(&topics, lines.len());
}
