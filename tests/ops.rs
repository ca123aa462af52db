//! Operations tests (DESIGN §9, issue #4): the real `analytics run` talking
//! to a notify socket the test binds (as systemd would), scraped over HTTP,
//! and its logs read back. File input only: no Kafka broker is needed (the
//! log test points the Kafka client at a closed loopback port).
//!
//! Timing is only used for liveness: "within N seconds", and "no watchdog
//! ping for 2 s while a child is stopped" (pings are due every 200 ms).

use nix::sys::signal::Signal;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::ops::*;
use support::*;

/// `analytics run` in file mode with quick flushes, stderr to `dir/stderr.log`,
/// and nothing from the developer's environment that changes what is tested.
fn run_cmd(dir: &Path) -> Command {
    let mut c = Command::new(ANALYTICS);
    for var in [
        "ANALYTICS_KAFKA_BROKERS",
        "ANALYTICS_METRICS_ADDR",
        "ANALYTICS_LOG_FORMAT",
        "ANALYTICS_LOG_LEVEL",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
    ] {
        c.env_remove(var);
    }
    c.arg("run")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--workers", "2", "--flush-interval-ms", "20"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(File::create(dir.join("stderr.log")).expect("stderr file"));
    c
}

fn stderr_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
}

fn lines_of(input: &Path) -> Vec<String> {
    std::fs::read_to_string(input)
        .expect("read input")
        .lines()
        .map(str::to_string)
        .collect()
}

fn feed(stdin: &mut std::process::ChildStdin, lines: &[String]) {
    for l in lines {
        writeln!(stdin, "{l}").expect("write to run");
    }
    stdin.flush().expect("flush");
}

fn environ(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

/// SIGKILLs the run if the test panics before it ends, so no tree outlives
/// a failed test.
struct Reaper(i32);

impl Drop for Reaper {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (kid, _) in children(self.0 as u32) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(kid), Signal::SIGCONT);
            }
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

#[test]
fn notify_ready_watchdog_status_and_stopping_follow_the_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = NotifySocket::bind_path(dir.path());
    let input = generate(dir.path(), 4_000, 0);
    let lines = lines_of(&input);
    let mut run = run_cmd(dir.path())
        .args(["--stall-timeout-secs", "2"])
        .env("NOTIFY_SOCKET", &notify.address)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let sup = run.id();
    let _reaper = Reaper(sup as i32);
    let mut stdin = run.stdin.take().expect("piped stdin");

    let before = notify.wait_for_line("READY=1", Duration::from_secs(30));
    assert_eq!(count_line(&before, "WATCHDOG=1"), 0, "no ping before READY");
    // READY came once storage and both workers were up.
    let kids = children(sup);
    assert_eq!(
        kids.iter().filter(|(_, c)| c.contains(" storage ")).count(),
        1,
        "{kids:?}"
    );
    assert_eq!(
        kids.iter().filter(|(_, c)| c.contains(" serve ")).count(),
        2,
        "{kids:?}"
    );
    // Only the supervisor may notify.
    for (pid, cmd) in &kids {
        let env = environ(*pid);
        assert!(
            !env.contains("NOTIFY_SOCKET=") && !env.contains("WATCHDOG_USEC="),
            "{cmd} inherited the notify variables"
        );
    }

    // Busy and healthy: pings keep coming, with a status line.
    feed(&mut stdin, &lines[..2_000]);
    let healthy = notify.collect(Duration::from_secs(2));
    assert!(
        count_line(&healthy, "WATCHDOG=1") >= 3,
        "pings every 200 ms while healthy: {healthy:?}"
    );
    let status = healthy
        .iter()
        .flat_map(|m| m.lines())
        .find(|l| l.starts_with("STATUS=ready: "))
        .unwrap_or_else(|| panic!("a STATUS line: {healthy:?}"));
    assert!(
        status.contains(" events/s") && status.ends_with(" 0 restarts"),
        "{status}"
    );

    // A wedged worker (it cannot answer its flush) stops the pings.
    let workers = wait_for_children(sup, "serve", 2);
    signal(workers[0], Signal::SIGSTOP);
    notify.wait_for_prefix("STATUS=stalled (worker", Duration::from_secs(20));
    let quiet = notify.collect(Duration::from_secs(2));
    assert_eq!(
        count_line(&quiet, "WATCHDOG=1"),
        0,
        "no ping while a worker is wedged: {quiet:?}"
    );
    signal(workers[0], Signal::SIGCONT);
    notify.wait_for_line("WATCHDOG=1", Duration::from_secs(20));

    // A storage process that does not answer a write stops them too.
    let storage = wait_for_children(sup, "storage", 1)[0];
    signal(storage, Signal::SIGSTOP);
    feed(&mut stdin, &lines[2_000..]);
    notify.wait_for_prefix("STATUS=stalled (storage", Duration::from_secs(20));
    let quiet = notify.collect(Duration::from_secs(2));
    assert_eq!(
        count_line(&quiet, "WATCHDOG=1"),
        0,
        "no ping while storage is stuck: {quiet:?}"
    );
    signal(storage, Signal::SIGCONT);
    notify.wait_for_line("WATCHDOG=1", Duration::from_secs(20));

    // SIGTERM: STOPPING=1, then a clean exit with everything stored.
    signal(sup as i32, Signal::SIGTERM);
    notify.wait_for_line("STOPPING=1", Duration::from_secs(20));
    drop(stdin);
    finish(run);
    assert_same_records(
        &export(&dir.path().join("data")),
        &fold(&input),
        "after the wedges",
    );
}

#[test]
fn an_abstract_notify_socket_gets_ready_and_stopping_and_no_unasked_pings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = NotifySocket::bind_abstract();
    let input = generate(dir.path(), 2_000, 0);
    finish(
        run_cmd(dir.path())
            .arg("--input")
            .arg(&input)
            .env("NOTIFY_SOCKET", &notify.address)
            .spawn()
            .expect("spawn run"),
    );
    let got = notify.collect(Duration::from_millis(300));
    let ready = got.iter().position(|m| m.starts_with("READY=1\n"));
    let stopping = got.iter().position(|m| m.starts_with("STOPPING=1"));
    assert!(
        matches!((ready, stopping), (Some(r), Some(s)) if r < s),
        "READY=1, then STOPPING=1 when the input ended: {got:?}"
    );
    assert_eq!(
        count_line(&got, "WATCHDOG=1"),
        0,
        "no WATCHDOG_USEC, no pings"
    );
}

/// Polls /metrics until `done` holds for the body (or 60 s pass).
fn scrape_until(port: u16, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http_get(port, "/metrics");
        assert_eq!(status, 200);
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} not reached:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn value(body: &str, series: &str) -> f64 {
    sample(body, series).unwrap_or(-1.0)
}

/// Rejections by reason from the exposition, as `fold` prints them
/// ("invalid_json 3, missing_field 2").
fn rejected_by_reason(body: &str) -> String {
    body.lines()
        .filter_map(|l| l.strip_prefix("analytics_events_rejected_total{reason=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn durable(body: &str) -> f64 {
    value(body, "analytics_events_applied_total")
        + body
            .lines()
            .filter(|l| l.starts_with("analytics_events_rejected_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
}

/// A `run_cmd` run with its metrics endpoint on a free port and a notify
/// socket, reading stdin, that said READY=1.
struct ScrapedRun {
    run: std::process::Child,
    stdin: std::process::ChildStdin,
    sup: u32,
    port: u16,
    _reaper: Reaper,
}

fn start_scraped(dir: &Path) -> ScrapedRun {
    let notify = NotifySocket::bind_path(dir);
    let port = free_port();
    let mut run = run_cmd(dir)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("NOTIFY_SOCKET", &notify.address)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let sup = run.id();
    let reaper = Reaper(sup as i32);
    let stdin = run.stdin.take().expect("piped stdin");
    notify.wait_for_line("READY=1", Duration::from_secs(30));
    ScrapedRun {
        run,
        stdin,
        sup,
        port,
        _reaper: reaper,
    }
}

#[test]
fn the_metrics_endpoint_counts_what_the_run_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 20_000, 250);
    let lines = lines_of(&input);
    let mut scraped = start_scraped(dir.path());
    let (sup, port) = (scraped.sup, scraped.port);
    assert_eq!(http_get(port, "/ready").0, 200, "ready after READY=1");
    assert_eq!(http_get(port, "/health").0, 200);
    assert_eq!(http_get(port, "/nothing").0, 404);

    // Counters move with the input, and end where the input says.
    feed(&mut scraped.stdin, &lines[..10_000]);
    let half = scrape_until(port, "the first half durable", |b| {
        value(b, "analytics_events_consumed_total") == 10_000.0 && durable(b) == 10_000.0
    });
    feed(&mut scraped.stdin, &lines[10_000..]);
    let all = scrape_until(port, "the whole input durable", |b| {
        value(b, "analytics_events_consumed_total") == 20_000.0 && durable(b) == 20_000.0
    });
    assert!(
        value(&all, "analytics_events_applied_total")
            > value(&half, "analytics_events_applied_total")
    );
    assert_eq!(rejected_by_reason(&all), fold_rejections(&input));
    assert_eq!(value(&all, "analytics_events_applied_total"), 19_920.0);
    assert_eq!(value(&all, "analytics_dead_letters_written_total"), 80.0);
    assert!(value(&all, "analytics_flush_duration_seconds_count") >= 2.0);
    assert_eq!(
        value(&all, "analytics_flush_duration_seconds_bucket{le=\"+Inf\"}"),
        value(&all, "analytics_flush_duration_seconds_count")
    );
    assert_eq!(value(&all, "analytics_worker_restarts_total"), 0.0);
    assert_eq!(value(&all, "analytics_ready"), 1.0);
    for process in ["supervisor", "storage", "worker-0", "worker-1"] {
        let rss = value(
            &all,
            &format!("analytics_process_resident_memory_bytes{{process=\"{process}\"}}"),
        );
        assert!(rss > 1e6, "RSS of {process}: {rss}\n{all}");
    }

    // A killed worker is counted as a restart (when it is lost, which also
    // drops its memory gauge). Wait for the new worker's gauge too, which
    // appears once it has shaken hands: a worker stopped below before its
    // handshake would be killed when the handshake times out (seen in CI:
    // SIGCONT found no such process).
    signal(wait_for_children(sup, "serve", 2)[0], Signal::SIGKILL);
    scrape_until(port, "one worker restart, and the new worker up", |b| {
        value(b, "analytics_worker_restarts_total") == 1.0
            && ["worker-0", "worker-1"].iter().all(|w| {
                value(
                    b,
                    &format!("analytics_process_resident_memory_bytes{{process=\"{w}\"}}"),
                ) > 0.0
            })
    });

    // While draining, /ready says 503 and /health stays 200. The workers are
    // stopped so that the drain cannot end before we look.
    let workers = wait_for_children(sup, "serve", 2);
    for &w in &workers {
        signal(w, Signal::SIGSTOP);
    }
    signal(sup as i32, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "/ready").0 != 503 {
        assert!(Instant::now() < deadline, "/ready still 200 after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http_get(port, "/health").0, 200);
    for &w in &workers {
        signal(w, Signal::SIGCONT);
    }
    drop(scraped.stdin);
    finish(scraped.run);
    assert_same_records(
        &export(&dir.path().join("data")),
        &fold(&input),
        "metrics run",
    );
}

/// While storage answers nothing, flushes go on every 20 ms, but each worker
/// has at most 2 writes waiting; what arrives meanwhile goes into the next,
/// larger write, and the result is still the straight fold.
#[test]
fn a_store_that_does_not_answer_gets_at_most_two_writes_per_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 6_000, 0);
    let lines = lines_of(&input);
    let mut scraped = start_scraped(dir.path());
    let (sup, port) = (scraped.sup, scraped.port);

    let storage = wait_for_children(sup, "storage", 1)[0];
    signal(storage, Signal::SIGSTOP);
    // 20 portions over 2 s: about 100 flush ticks, each with new events.
    let mut most: f64 = 0.0;
    for part in lines.chunks(300) {
        feed(&mut scraped.stdin, part);
        std::thread::sleep(Duration::from_millis(100));
        let (_, body) = http_get(port, "/metrics");
        most = most.max(value(&body, "analytics_storage_writes_pending"));
    }
    let consumed = scrape_until(port, "the whole input consumed", |b| {
        value(b, "analytics_events_consumed_total") == 6_000.0
    });
    most = most.max(value(&consumed, "analytics_storage_writes_pending"));
    assert!(
        (1.0..=4.0).contains(&most),
        "writes pending while storage is stopped: at most {most}, expected 1 to 4"
    );
    signal(storage, Signal::SIGCONT);
    scrape_until(port, "the whole input durable", |b| {
        durable(b) == 6_000.0 && value(b, "analytics_storage_writes_pending") == 0.0
    });
    signal(sup as i32, Signal::SIGTERM);
    drop(scraped.stdin);
    finish(scraped.run);
    assert_same_records(
        &export(&dir.path().join("data")),
        &fold(&input),
        "after storage stood still",
    );
}

/// The `(role, pid)` of each child, from the supervisor's "child started"
/// lines (JSON).
fn started_children(log: &str) -> Vec<(String, i64)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "child started")
        .filter_map(|v| {
            let role = v["peer"].as_str()?.split(' ').next()?.to_string();
            Some((role, v["pid"].as_i64()?))
        })
        .collect()
}

#[test]
fn journal_logs_are_json_lines_naming_their_child_and_never_carry_secrets() {
    const KAFKA_SECRET: &str = "kafka-pw-8f3a1c77e2";
    const AWS_SECRET: &str = "aws-sk-51d0b9e4c6";
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = NotifySocket::bind_path(dir.path());
    // systemd names the journal stream stderr is connected to; this file
    // plays the journal.
    let stderr = File::create(dir.path().join("stderr.log")).expect("stderr file");
    let journal_stream = {
        use std::os::unix::fs::MetadataExt;
        let m = stderr.metadata().expect("stat");
        format!("{}:{}", m.dev(), m.ino())
    };
    // Kafka mode, so the credentials are really handed to the Kafka clients
    // (consumer here, dead-letter producer in storage), against a closed
    // port so that the client has failures to log.
    let run = run_cmd(dir.path())
        .args([
            "--kafka-brokers",
            &format!("127.0.0.1:{}", free_port()),
            "--kafka-property",
            "sasl.username=analytics",
            "--kafka-property",
            &format!("sasl.password={KAFKA_SECRET}"),
        ])
        .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        .env("JOURNAL_STREAM", &journal_stream)
        .env("RUST_LOG", "trace")
        .env("NOTIFY_SOCKET", &notify.address)
        .stderr(stderr)
        .spawn()
        .expect("spawn run");
    let sup = run.id();
    let _reaper = Reaper(sup as i32);
    notify.wait_for_line("READY=1", Duration::from_secs(30));

    // No child carries a secret on its command line (which every user can
    // read).
    let kids = children(sup);
    assert_eq!(kids.len(), 3, "{kids:?}");
    for (_, cmd) in &kids {
        assert!(
            !cmd.contains(KAFKA_SECRET) && !cmd.contains(AWS_SECRET) && !cmd.contains("sasl"),
            "{cmd}"
        );
    }
    // Let the client fail to connect a few times, then stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stderr_of(dir.path()).contains("librdkafka") {
        assert!(Instant::now() < deadline, "the Kafka client logged nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(sup as i32, Signal::SIGTERM);
    let out = finish(run);

    let log = stderr_of(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for secret in [KAFKA_SECRET, AWS_SECRET] {
        assert!(
            !log.contains(secret) && !stdout.contains(secret),
            "a secret was logged"
        );
    }
    let started = started_children(&log);
    assert_eq!(started.len(), 3, "{log}");
    let mut tagged = std::collections::BTreeSet::new();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["message"].is_string() && v["level"].is_string(), "{line}");
        // One type per field, for log indexes: the supervisor names the
        // child a line is about in `peer`, a child names itself in `child`.
        if let Some(child) = v.get("child") {
            assert!(child.is_object(), "`child` is not an object: {line}");
            let who = (
                child["role"].as_str().unwrap_or_default().to_string(),
                child["pid"].as_i64().unwrap_or_default(),
            );
            assert!(started.contains(&who), "{line} names no child: {started:?}");
            tagged.insert(who);
        }
    }
    assert_eq!(
        tagged.len(),
        3,
        "every child's lines name it (storage and both workers log their start): {tagged:?}"
    );
}

#[test]
fn terminal_style_logs_name_the_child_on_every_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 1_000, 0);
    // A JOURNAL_STREAM that is not our stderr (a service that redirected
    // it) does not switch to JSON.
    finish(
        run_cmd(dir.path())
            .arg("--input")
            .arg(&input)
            .env("JOURNAL_STREAM", "1:1")
            .spawn()
            .expect("spawn run"),
    );
    let log = stderr_of(dir.path());
    assert!(!log.lines().any(|l| l.starts_with('{')), "{log}");
    // "… child started peer=worker 0 pid=123" from the supervisor.
    let started: Vec<(String, String)> = log
        .lines()
        .filter_map(|l| l.split_once("child started peer=")?.1.split_once(" pid="))
        .map(|(who, pid)| {
            let role = who.split(' ').next().unwrap_or_default().to_string();
            (role, pid.trim().to_string())
        })
        .collect();
    assert_eq!(started.len(), 3, "{log}");
    let child_lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("connected to the supervisor") || l.contains("closed the connection")
        })
        .collect();
    // Storage and two workers each say hello and goodbye.
    assert_eq!(child_lines.len(), 6, "{log}");
    for l in child_lines {
        let tag = l
            .strip_prefix("child{role=")
            .and_then(|r| r.split_once('}'))
            .and_then(|(tag, _)| tag.split_once(" pid="))
            .map(|(role, pid)| (role.to_string(), pid.to_string()))
            .unwrap_or_else(|| panic!("untagged child line: {l}"));
        assert!(started.contains(&tag), "{l} names no child: {started:?}");
    }
}

#[test]
fn a_taken_metrics_port_is_an_error_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = run_cmd(dir.path())
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let log = stderr_of(dir.path());
    assert!(log.contains("binding the metrics endpoint"), "{log}");
    assert!(!log.contains("child started"), "{log}");
}
