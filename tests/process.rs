//! Process tests: the real binaries, real signals (DESIGN §4, §5, §9).
//! Every scenario ends by comparing `analytics export` with
//! `analytics-worker fold` of the same events.
//!
//! "Mid-run" is made deterministic without test hooks: either the input is a
//! pipe the test holds open (the run cannot end before the test closes it),
//! or the workers are SIGSTOPped (backpressure then pauses reading after
//! `--max-buffered-mb 1` of a much larger file).

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::*;

/// `analytics run` with quick flushes, so that crashes land between flushes.
fn run_cmd(data: &Path) -> Command {
    let mut c = Command::new(ANALYTICS);
    // File mode, whatever the developer's shell exports.
    c.env_remove("ANALYTICS_KAFKA_BROKERS");
    c.arg("run")
        .arg("--data-dir")
        .arg(data)
        .args([
            "--workers",
            "2",
            "--flush-interval-ms",
            "20",
            "--flush-max-events",
            "2000",
            "--max-buffered-mb",
            "1",
            // Every shard's changes in a part of their own: each flush is
            // answered in many parts, and each part written on its own.
            "--answer-part-bytes",
            "1",
        ])
        .env("RUST_LOG", "warn");
    c
}

/// `analytics run` over a whole file, which must succeed.
fn run_file(data: &Path, input: &Path) -> Output {
    finish(
        run_cmd(data)
            .arg("--input")
            .arg(input)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn run"),
    )
}

fn summary_line(out: &Output, prefix: &str) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_default()
        .to_string()
}

fn dead_letters(data: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data.join("dead-letters.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("dead letter is JSON"))
        .collect()
}

/// Feeds the first `split` lines of `input` to a piped child, then calls
/// `midway`, then the rest, then closes the pipe.
fn feed_in_two_parts(child: &mut Child, input: &Path, split: usize, midway: impl FnOnce()) {
    let text = std::fs::read_to_string(input).expect("read input");
    let lines: Vec<&str> = text.lines().collect();
    let mut stdin = child.stdin.take().expect("piped stdin");
    for l in &lines[..split] {
        writeln!(stdin, "{l}").expect("write to run");
    }
    stdin.flush().expect("flush");
    midway();
    for l in &lines[split..] {
        writeln!(stdin, "{l}").expect("write to run");
    }
}

#[test]
fn embedded_run_equals_the_straight_fold_and_a_rerun_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 20_000, 250);
    let data = dir.path().join("data");
    let expected = fold(&input);
    assert!(
        expected.lines().count() > 100,
        "the trace should produce many records"
    );

    let out = run_file(&data, &input);
    assert_eq!(export(&data), expected);
    // Every malformed line is counted once, by the same reasons as the
    // straight fold gives.
    let reasons = fold_rejections(&input);
    assert_eq!(
        summary_line(&out, "rejected:"),
        format!(
            "rejected: 80 ({reasons}) -> {}",
            data.canonicalize()
                .unwrap()
                .join("dead-letters.jsonl")
                .display()
        )
    );
    let dls = dead_letters(&data);
    assert_eq!(dls.len(), 80, "one dead letter per malformed line");
    assert!(
        dls.iter()
            .all(|d| d["line"].as_u64().is_some_and(|l| l % 250 == 0) && d["reason"].is_string())
    );
    assert!(summary_line(&out, "snapshot:").contains("metrics/dt="));

    let again = run_file(&data, &input);
    assert_eq!(
        summary_line(&again, "input:"),
        "input: 20000 lines, all read by an earlier run: nothing new"
    );
    assert_eq!(
        export(&data),
        expected,
        "a re-run leaves the metrics unchanged"
    );
    assert_eq!(
        dead_letters(&data).len(),
        80,
        "a re-run adds no dead letters"
    );
}

/// Feeds half the input through a held-open pipe, SIGKILLs the first child
/// whose command line contains `which`, feeds the rest: exactly one restart,
/// and the same records and dead letters as the straight fold.
fn sigkill_child_mid_input(which: &str, present: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 30_000, 300);
    let data = dir.path().join("data");
    let mut run = run_cmd(&data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let sup = run.id();
    feed_in_two_parts(&mut run, &input, 15_000, || {
        let victims = wait_for_children(sup, which, present);
        std::thread::sleep(Duration::from_millis(500));
        signal(victims[0], Signal::SIGKILL);
    });
    let out = finish(run);
    assert_eq!(
        summary_line(&out, "worker/storage restarts:"),
        "worker/storage restarts: 1"
    );
    assert_eq!(export(&data), fold(&input));
    assert_eq!(dead_letters(&data).len(), 100);
}

#[test]
fn sigkill_of_a_worker_mid_input_loses_and_doubles_nothing() {
    sigkill_child_mid_input("serve", 2);
}

#[test]
fn sigkill_of_the_storage_process_mid_input_loses_and_doubles_nothing() {
    sigkill_child_mid_input("storage", 1);
}

/// Freezes a file run mid-input, once something is durable (dead letters
/// are appended only with a committed write): workers stopped, reading
/// paused by backpressure. Returns the supervisor pid and the worker pids.
fn freeze_mid_input(run: &Child, data: &Path) -> (u32, Vec<i32>) {
    let sup = run.id();
    let workers = wait_for_children(sup, "serve", 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead_letters(data).len() < 2 {
        assert!(Instant::now() < deadline, "no durable progress after 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    for &w in &workers {
        signal(w, Signal::SIGSTOP);
    }
    std::thread::sleep(Duration::from_millis(200));
    (sup, workers)
}

#[test]
fn sigterm_mid_input_exits_cleanly_and_a_rerun_resumes_without_double_counting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 60_000, 400);
    let data = dir.path().join("data");
    let run = run_cmd(&data)
        .arg("--input")
        .arg(&input)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let (sup, workers) = freeze_mid_input(&run, &data);
    signal(sup as i32, Signal::SIGTERM);
    for &w in &workers {
        signal(w, Signal::SIGCONT);
    }
    let out = finish(run);
    assert!(
        summary_line(&out, "input:").contains("interrupted"),
        "{}",
        summary_line(&out, "input:")
    );
    let partial = export(&data);
    assert!(
        partial != fold(&input),
        "the interrupted run stopped before the end"
    );

    let again = run_file(&data, &input);
    let resumed = summary_line(&again, "input:");
    assert!(
        !resumed.ends_with("read from line 1"),
        "the re-run resumes: {resumed}"
    );
    assert_eq!(export(&data), fold(&input));
    assert_eq!(
        dead_letters(&data).len(),
        150,
        "no dead letter is written twice"
    );
}

#[test]
fn sigkill_of_the_supervisor_leaves_no_orphans_and_a_rerun_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 60_000, 400);
    let data = dir.path().join("data");
    let mut run = run_cmd(&data)
        .arg("--input")
        .arg(&input)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let (sup, _) = freeze_mid_input(&run, &data);
    let kids: Vec<i32> = children(sup).into_iter().map(|(p, _)| p).collect();
    assert_eq!(kids.len(), 3, "two workers and storage");
    signal(sup as i32, Signal::SIGKILL);
    let _ = run.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while kids
        .iter()
        .any(|&k| kill(Pid::from_raw(k), None).is_ok() && !is_zombie(k))
    {
        assert!(
            Instant::now() < deadline,
            "children outlived the supervisor: {kids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    run_file(&data, &input);
    assert_eq!(export(&data), fold(&input));
    assert_eq!(dead_letters(&data).len(), 150);
}

/// The nice value of a process (field 19 of `/proc/PID/stat`).
fn niceness(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    let (_, after_name) = stat.rsplit_once(')').expect("stat has a name");
    after_name
        .split_whitespace()
        .nth(16)
        .and_then(|n| n.parse().ok())
        .expect("stat has a nice value")
}

/// Workers run `--worker-nice` levels (default 10) below the supervisor,
/// storage at the supervisor's own: when the cores are busy, the processes
/// that feed the workers and acknowledge their writes go first.
#[test]
fn workers_run_below_the_supervisor_and_storage() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (flag, lower) in [(None, 10), (Some("3"), 3)] {
        let mut cmd = run_cmd(&dir.path().join("data"));
        if let Some(n) = flag {
            cmd.args(["--worker-nice", n]);
        }
        let mut run = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn run");
        let sup = run.id() as i32;
        let own = niceness(sup);
        let storage = wait_for_children(run.id(), "storage", 1)[0];
        assert_eq!(
            niceness(storage),
            own,
            "storage runs at the supervisor's priority"
        );
        // A worker lowers its priority as it starts serving.
        let want = (own + lower).min(19);
        let deadline = Instant::now() + Duration::from_secs(20);
        for worker in wait_for_children(run.id(), "serve", 2) {
            while niceness(worker) != want {
                assert!(
                    Instant::now() < deadline,
                    "worker {worker} at nice {}, not {want} (flag {flag:?})",
                    niceness(worker)
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        drop(run.stdin.take());
        finish(run);
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn too_many_worker_restarts_stop_the_service_with_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let run = run_cmd(&data)
        .args(["--max-restarts", "2"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let sup = run.id();
    let mut killed = Vec::new();
    for _ in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let victim = loop {
            let fresh: Vec<i32> = children(sup)
                .into_iter()
                .filter(|(p, c)| c.contains("serve") && !killed.contains(p))
                .map(|(p, _)| p)
                .collect();
            if let Some(&p) = fresh.first() {
                break p;
            }
            if Instant::now() >= deadline {
                let _ = kill(Pid::from_raw(sup as i32), Signal::SIGKILL);
                let out = run.wait_with_output().expect("wait");
                panic!(
                    "no fresh worker to kill; run ended {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        signal(victim, Signal::SIGKILL);
        killed.push(victim);
    }
    let out = wait_with_deadline(run);
    assert!(
        !out.status.success(),
        "three restarts with --max-restarts 2 must fail the run"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("restarts within"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_second_sigint_exits_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut run = run_cmd(&data)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let sup = run.id();
    let mut stdin = run.stdin.take().expect("piped stdin");
    writeln!(
        stdin,
        r#"{{"eventType":"ProductCreated","timestamp":1,"data":{{"productId":1,"sellerId":"s","category":"c","price":1,"quantity":1}}}}"#
    )
    .expect("write");
    // Workers stopped: the graceful shutdown the first SIGINT starts cannot
    // finish, so only the second one can end the run.
    let workers = wait_for_children(sup, "serve", 2);
    for &w in &workers {
        signal(w, Signal::SIGSTOP);
    }
    signal(sup as i32, Signal::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        run.try_wait().expect("try_wait").is_none(),
        "the first SIGINT drains, it does not exit"
    );
    let sent = Instant::now();
    signal(sup as i32, Signal::SIGINT);
    let out = wait_with_deadline(run);
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "the second SIGINT exits at once"
    );
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The stopped workers die with the supervisor.
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers
        .iter()
        .any(|&w| kill(Pid::from_raw(w), None).is_ok() && !is_zombie(w))
    {
        assert!(Instant::now() < deadline, "workers outlived the supervisor");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn query_prints_a_known_seller_and_fails_on_an_unknown_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 2_000, 0);
    let data = dir.path().join("data");
    run_file(&data, &input);
    let query = |args: &[&str]| {
        Command::new(ANALYTICS)
            .arg("query")
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .output()
            .expect("run query")
    };
    let known = query(&["--json", "seller", "seller-1"]);
    assert!(known.status.success());
    let first: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&known.stdout)
            .lines()
            .next()
            .unwrap_or_default(),
    )
    .expect("JSON line");
    assert_eq!(first["sellerId"], "seller-1");
    let exported = export(&data);
    let line = exported
        .lines()
        .find(|l| l.contains(r#""sellerId":"seller-1","totalProducts""#))
        .expect("exported seller");
    let exported: serde_json::Value = serde_json::from_str(line).expect("JSON");
    assert_eq!(first["totalValue"], exported["totalValue"]);
    let table = query(&["seller", "seller-1"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("seller-1"));
    let unknown = query(&["seller", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stdout).contains("nobody"));
    // JSON lines keep stdout for records: the miss is said on stderr.
    let unknown = query(&["--json", "seller", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(unknown.stdout.is_empty());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no seller named \"nobody\""));
    // The store's flags may follow the subcommand too.
    let after = Command::new(ANALYTICS)
        .args(["query", "seller", "seller-1", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run query");
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    assert_eq!(after.stdout, known.stdout);
    // A running service holds the store: a read says so, once.
    let busy = run_cmd(&data)
        .args(["--input", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start run");
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let out = query(&["seller", "seller-1"]);
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the running service never took the store"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    finish(busy); // stdin closed: the run ends
    assert!(
        refused.contains("is in use by another process"),
        "{refused}"
    );
    assert_eq!(refused.matches("in use").count(), 1, "{refused}");
}

#[test]
fn an_oversized_line_is_dead_lettered_with_its_prefix_and_the_rest_flows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("big.jsonl");
    let good = r#"{"eventType":"ProductCreated","timestamp":1,"data":{"productId":1,"sellerId":"s","category":"c","price":"1.00","quantity":1}}"#;
    let big = format!(
        r#"{{"eventType":"ProductCreated","pad":"{}"}}"#,
        "x".repeat(5_000)
    );
    std::fs::write(
        &input,
        format!(
            "{good}\n{big}\n{}\n",
            good.replace(r#""productId":1"#, r#""productId":2"#)
        ),
    )
    .expect("write input");
    let data = dir.path().join("data");
    let out = finish(
        run_cmd(&data)
            .args(["--max-event-bytes", "1024", "--input"])
            .arg(&input)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn run"),
    );
    assert!(summary_line(&out, "rejected:").starts_with("rejected: 1 (too_large 1)"));
    let dls = dead_letters(&data);
    assert_eq!(dls.len(), 1);
    assert_eq!(dls[0]["line"], 2);
    let raw = dls[0]["raw"].as_str().unwrap_or_default();
    assert_eq!(raw.len(), 1025, "the first max+1 bytes are kept");
    assert!(big.starts_with(raw));
    assert!(
        export(&data).contains(r#""totalProducts":2"#),
        "both good events were applied"
    );
}

/// A product moved to a seller of another shard is upserted there while
/// its old shard still counts it (README, "Known limits"): the run says
/// how many such moves it applied, and says nothing when there were none.
#[test]
fn a_seller_move_across_shards_is_reported_when_the_run_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    // "s1" and "s2" are in file shards 14 and 15 (javaStringHash % 16).
    let created = r#"{"eventType":"ProductCreated","timestamp":1000,"data":{"productId":7,"sellerId":"s1","category":"c","price":"1.00","quantity":3}}"#;
    let moved = r#"{"eventType":"ProductUpdated","timestamp":2000,"data":{"productId":7,"sellerId":"s2","changes":{"sellerId":{"old":"s1","new":"s2"}}}}"#;
    for (name, lines, expected) in [
        ("still.jsonl", vec![created], None),
        (
            "moved.jsonl",
            vec![created, moved],
            Some("products moved in from another partition's seller: 1 "),
        ),
    ] {
        let input = dir.path().join(name);
        std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
        let out = run_file(&dir.path().join(name).with_extension("data"), &input);
        let line = summary_line(&out, "products moved in");
        match expected {
            Some(prefix) => assert!(line.starts_with(prefix), "{name}: {line:?}"),
            None => assert_eq!(line, "", "{name}"),
        }
    }
}

/// A good event, `lines` lines made by `line`, a good event; all in one
/// shard. Returns the file.
fn burst(dir: &Path, lines: usize, line: impl Fn(usize) -> String) -> std::path::PathBuf {
    let input = dir.join("burst.jsonl");
    let good = |id: usize| created(id, "c");
    let mut text = good(1_000_000_001) + "\n";
    for i in 0..lines {
        text.push_str(&line(i));
        text.push('\n');
    }
    text.push_str(&good(1_000_000_002));
    text.push('\n');
    std::fs::write(&input, text).expect("write input");
    input
}

/// A product of seller `s` created with this name (quantity 100: not on the
/// low-stock list).
fn created(id: usize, name: &str) -> String {
    format!(
        r#"{{"eventType":"ProductCreated","timestamp":1,"data":{{"productId":{id},"sellerId":"s","category":"c","name":"{name}","price":"1.00","quantity":100}}}}"#
    )
}

/// Products with names of the largest size accepted (16 KiB,
/// `MAX_NAME_BYTES` of the worker's decoder), about `megabytes` of them:
/// each product's state is about as large as its event, and the states of
/// one shard's flush, not its dead letters, outgrow a frame unless the
/// supervisor bounds what a shard takes between flush requests.
fn large_names(dir: &Path, megabytes: usize) -> std::path::PathBuf {
    let name = "n".repeat(16 * 1024);
    burst(dir, megabytes * 1_000_000 / name.len(), |i| {
        created(i, &name)
    })
}

/// `analytics run` over `input` with the default flush settings.
fn run_with_defaults(data: &Path, input: &Path) -> Command {
    let mut c = Command::new(ANALYTICS);
    c.env_remove("ANALYTICS_KAFKA_BROKERS")
        .env_remove("ANALYTICS_METRICS_ADDR")
        .env("RUST_LOG", "warn")
        .args(["run", "--data-dir"])
        .arg(data)
        .arg("--input")
        .arg(input)
        .stdout(Stdio::piped());
    c
}

/// A run that reads two days of events in one flush window still files
/// each seller's and category's `DAY#` item of the first day with its
/// values at the end of that day: a worker takes a shard's changes where
/// its events reach a new UTC day (by event time), and a category's item
/// sums every shard's value as it stood at its own day end (the shards of
/// both workers reach midnight at different moments). Without the cut the
/// item of a seller with events on both days was missing; without the
/// daily parts a category's item mixed in other shards' second day.
#[test]
fn daily_items_hold_their_values_at_the_end_of_the_day() {
    let dir = tempfile::tempdir().expect("tempdir");
    let generated = generate(dir.path(), 3_000, 0);
    // The events 1 s apart, crossing midnight half way.
    let midnight: i64 = 1_696_204_800_000; // 2023-10-02T00:00:00Z
    let (mut both_days, mut first_day) = (String::new(), String::new());
    let text = std::fs::read_to_string(&generated).expect("read events");
    for (i, line) in text.lines().enumerate() {
        let mut event: serde_json::Value = serde_json::from_str(line).expect("generated JSON");
        let at = midnight - 1_500_000 + 1000 * i as i64;
        event["timestamp"] = at.into();
        let line = event.to_string() + "\n";
        both_days.push_str(&line);
        if at < midnight {
            first_day.push_str(&line);
        }
    }
    let (both, first) = (
        dir.path().join("both.jsonl"),
        dir.path().join("first.jsonl"),
    );
    std::fs::write(&both, both_days).expect("write");
    std::fs::write(&first, first_day).expect("write");
    let data = dir.path().join("data");
    finish(
        run_with_defaults(&data, &both)
            .args(["--flush-interval-ms", "600000", "--workers", "2"])
            .spawn()
            .expect("spawn run"),
    );

    let (mut sellers, mut categories) = (0, 0);
    for record in fold(&first).lines() {
        let want: serde_json::Value = serde_json::from_str(record).expect("fold JSON");
        let (kind, id) = match want["type"].as_str() {
            Some("seller") => ("seller", &want["sellerId"]),
            Some("category") => ("category", &want["category"]),
            _ => continue,
        };
        let id = id.as_str().expect("an id");
        let out = Command::new(ANALYTICS)
            .args(["query", "--json", kind, id, "--data-dir"])
            .arg(&data)
            .output()
            .expect("run query");
        let history = String::from_utf8_lossy(&out.stdout);
        let mut day: serde_json::Value = history
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("query JSON"))
            .find(|l| l["day"] == "2023-10-01")
            .unwrap_or_else(|| panic!("no item of 2023-10-01 for {kind} {id}:\n{history}"));
        day.as_object_mut().expect("an object").remove("day");
        assert_eq!(day, want, "{kind} {id} at the end of 2023-10-01");
        match kind {
            "seller" => sellers += 1,
            _ => categories += 1,
        }
    }
    assert!(
        sellers > 100 && categories > 5,
        "only {sellers} sellers and {categories} categories had events on the first day"
    );
}

/// `analytics run` with the default flush settings over `input` rejects
/// nothing, restarts nothing, and stores the straight fold's records.
fn assert_runs_cleanly(data: &Path, input: &Path) {
    let out = finish(run_with_defaults(data, input).spawn().expect("spawn run"));
    assert_eq!(summary_line(&out, "rejected:"), "rejected: 0");
    assert_burst_folded(&out, data, input, 0);
}

/// The run had `restarts` restarts and the straight fold's records.
fn assert_burst_folded(out: &Output, data: &Path, input: &Path, restarts: u32) {
    assert_eq!(
        summary_line(out, "worker/storage restarts:"),
        format!("worker/storage restarts: {restarts}")
    );
    assert_same_records(&export(data), &fold(input), "export after the burst");
}

#[test]
fn a_burst_of_products_with_large_names_is_flushed_in_frames_that_fit() {
    // 72 MB of states in one shard, more than one frame (64 MiB) can
    // carry: the supervisor asks for a flush every 24 MiB of a shard's events.
    let dir = tempfile::tempdir().expect("tempdir");
    let input = large_names(dir.path(), 72);
    assert_runs_cleanly(&dir.path().join("data"), &input);
}

#[test]
fn a_shard_of_large_states_is_restored_in_chunks_that_fit() {
    // 72 MB of product states in one shard: loaded back in chunks of
    // 50,000 products only, the shard outgrew a frame and could never be
    // restored (the second run gave up after 11 restarts).
    let dir = tempfile::tempdir().expect("tempdir");
    let input = large_names(dir.path(), 72);
    let data = dir.path().join("data");
    for _ in 0..2 {
        assert_runs_cleanly(&data, &input);
    }
}

#[test]
fn small_updates_of_products_with_large_names_are_answered_in_frames_that_fit() {
    // 72 MB of products with 16 KiB names, then a price update of ~200
    // bytes for each: under 1 MB of events that change 72 MB of states in
    // one shard within one flush, which restarted the worker until the run
    // gave up. The worker now takes its changes every 16 MiB of changed
    // states.
    let dir = tempfile::tempdir().expect("tempdir");
    let name = "n".repeat(16 * 1024);
    let products = 72_000_000 / name.len();
    let input = burst(dir.path(), 2 * products, |i| {
        match i.checked_sub(products) {
            None => created(i, &name),
            Some(id) => format!(
                r#"{{"eventType":"ProductUpdated","timestamp":2,"data":{{"productId":{id},"sellerId":"s","changes":{{"price":{{"old":"1.00","new":"2.00"}}}}}}}}"#
            ),
        }
    });
    assert_runs_cleanly(&dir.path().join("data"), &input);
}

#[test]
fn half_a_million_small_malformed_lines_are_answered_in_frames_that_fit() {
    // They have no seller (shard 0), and their dead letters take ~300 bytes
    // each once decoded: the 200,000 to 400,000 of one flush would be
    // 60-120 MB, more than a frame. The worker takes its changes early
    // every 16 MiB of dead letters.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = "x".repeat(100);
    let input = burst(dir.path(), 500_000, |_| bad.clone());
    let data = dir.path().join("data");
    let out = finish(run_with_defaults(&data, &input).spawn().expect("spawn run"));
    assert_eq!(
        summary_line(&out, "rejected:").split(" -> ").next(),
        Some("rejected: 500000 (invalid_json 500000)")
    );
    let dls = dead_letters(&data);
    assert_eq!(dls.len(), 500_000);
    assert!(dls.iter().all(|d| d["raw"].as_str() == Some(bad.as_str())));
    assert_burst_folded(&out, &data, &input, 0);
}

#[test]
fn a_restarted_workers_replay_of_a_burst_is_flushed_in_frames_that_fit() {
    // Storage is stopped while 150 MB of products with large names are read:
    // the first flush's answer makes two writes (the worker takes its
    // changes every 16 MiB of changed states), which stay pending; the
    // next flush is held back, and reading pauses at 32 MiB unflushed,
    // ~59 MB unacknowledged in all. Then the worker is killed and storage
    // resumed: its replacement is sent those ~59 MB again, paced by flush
    // requests, and splits them by itself too.
    let dir = tempfile::tempdir().expect("tempdir");
    let input = large_names(dir.path(), 150);
    let data = dir.path().join("data");
    let port = support::ops::free_port();
    let run = run_with_defaults(&data, &input)
        .args([
            "--workers",
            "1",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .spawn()
        .expect("spawn run");
    let sup = run.id();
    let storage = wait_for_children(sup, "storage", 1)[0];
    let metric_reaches = |series: &str, at_least: f64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, body) = support::ops::http_get(port, "/metrics");
            if support::ops::sample(&body, series).is_some_and(|v| v >= at_least) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} never reached {at_least}:\n{body}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Once the shards are restored (reading starts), storage stops.
    metric_reaches("analytics_events_consumed_total", 1.0);
    signal(storage, Signal::SIGSTOP);
    metric_reaches("analytics_buffered_bytes", 50e6);
    signal(wait_for_children(sup, "serve", 1)[0], Signal::SIGKILL);
    signal(storage, Signal::SIGCONT);
    let out = finish(run);
    assert_burst_folded(&out, &data, &input, 1);
}

#[test]
fn worker_fold_summarises_rejections_on_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 2_000, 100);
    let out = Command::new(WORKER)
        .arg("fold")
        .arg(&input)
        .output()
        .expect("run fold");
    assert!(out.status.success());
    // The generator rotates through 8 malformed kinds (20 lines: kinds 0-3
    // three times, 4-7 twice): not JSON (0), truncated JSON (1) and an empty
    // line (7) are invalid_json; no productId (2) and no sellerId (6) are
    // missing_field; unknown eventType (3); negative quantity (4); price
    // object (5).
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "rejected 20 of 2000 lines: invalid_field 2, invalid_json 8, missing_field 5, negative_value 2, unknown_event_type 3"
    );
    let missing = Command::new(WORKER)
        .arg("fold")
        .arg(dir.path().join("nope.jsonl"))
        .output()
        .expect("run fold");
    assert!(!missing.status.success(), "an unreadable input is an error");
}

/// The metric snapshots in the archive, by file name, each as its sorted
/// lines.
fn snapshots(data: &Path) -> Vec<(String, Vec<String>)> {
    use std::io::Read;
    let mut found = Vec::new();
    let Ok(days) = std::fs::read_dir(data.join("archive/metrics")) else {
        return found;
    };
    for day in days.flatten() {
        for file in std::fs::read_dir(day.path())
            .expect("a day directory")
            .flatten()
        {
            let name = file.file_name().to_string_lossy().into_owned();
            if !name.starts_with("snapshot-") {
                continue; // a snapshot being written
            }
            let mut text = String::new();
            flate2::read::GzDecoder::new(std::fs::File::open(file.path()).expect("open"))
                .read_to_string(&mut text)
                .expect("a gzip snapshot");
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            found.push((name, lines));
        }
    }
    found.sort();
    found
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[test]
fn metric_snapshots_are_archived_every_interval_while_running_and_at_the_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 20_000, 500);
    let text = std::fs::read_to_string(&input).expect("read input");
    let half: Vec<&str> = text.lines().take(10_000).collect();
    let first_half = dir.path().join("first-half.jsonl");
    std::fs::write(&first_half, half.join("\n") + "\n").expect("write");
    let want_midway = sorted_lines(&fold(&first_half));
    let data = dir.path().join("data");
    let mut run = run_cmd(&data)
        .args(["--archive-interval-secs", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn run");
    feed_in_two_parts(&mut run, &input, 10_000, || {
        // The input is held open: only a periodic snapshot can show the
        // first half's metrics.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !snapshots(&data).iter().any(|(_, s)| *s == want_midway) {
            assert!(
                Instant::now() < deadline,
                "no snapshot of the first half within 60 s: {:?}",
                snapshots(&data)
                    .iter()
                    .map(|(n, s)| (n, s.len()))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let out = finish(run);
    let want = fold(&input);
    assert_eq!(export(&data), want);
    let last = summary_line(&out, "snapshot:");
    let name = last
        .rsplit('/')
        .next()
        .expect("a snapshot path")
        .to_string();
    let all = snapshots(&data);
    let (_, final_snapshot) = all
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("the final snapshot {name} is not in the archive"));
    assert_eq!(*final_snapshot, sorted_lines(&want));
    assert!(all.len() >= 2, "{} snapshots", all.len());
}

/// Output piped into `head`, which closes its end early, is not an error:
/// every command that prints ends quietly with 0 (it panicked, or said
/// "Broken pipe" and exited 2).
#[test]
fn output_closed_by_its_reader_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let input = generate(dir.path(), 2_000, 0);
    let data_arg = data.to_str().unwrap();
    let input_arg = input.to_str().unwrap();
    let config = dir.path().join("analytics.toml");
    std::fs::write(&config, "").unwrap();
    let commands: [(&str, Vec<&str>); 5] = [
        (WORKER, vec!["fold", input_arg]),
        (WORKER, vec!["generate", "--events", "1000"]),
        (
            ANALYTICS,
            vec!["run", "--input", input_arg, "--data-dir", data_arg],
        ),
        (ANALYTICS, vec!["export", "--data-dir", data_arg]),
        (ANALYTICS, vec!["config", "check"]),
    ];
    for (bin, args) in commands {
        let mut child = Command::new(bin)
            .args(&args)
            .env_remove("ANALYTICS_KAFKA_BROKERS")
            .env("ANALYTICS_CONFIG", &config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let out = wait_with_deadline(child);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?}\n{stderr}", out.status);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
    }
}

/// A mistyped --input is an error that names the path, and leaves no empty
/// store behind (`export` would then print nothing and exit 0).
#[test]
fn a_missing_input_is_an_error_before_the_data_directory_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let missing = dir.path().join("no-such-events.jsonl");
    let out = Command::new(ANALYTICS)
        .arg("run")
        .arg("--input")
        .arg(&missing)
        .arg("--data-dir")
        .arg(&data)
        .env_remove("ANALYTICS_KAFKA_BROKERS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read the input {}", missing.display())),
        "{stderr}"
    );
    assert!(!data.exists(), "the data directory was made");
}

/// A pipe as --input (`<(zcat …)`) is read whole: naming the stream used
/// to hash its first 4 KiB, which the source then never saw.
#[test]
fn a_pipe_as_input_is_read_from_its_first_byte() {
    let dir = tempfile::tempdir().unwrap();
    let input = generate(dir.path(), 3_000, 0);
    let fifo = dir.path().join("events.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let data = dir.path().join("data");
    let run = run_cmd(&data)
        .arg("--input")
        .arg(&fifo)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let bytes = std::fs::read(&input).unwrap();
    // Opening for writing waits for the reader, the run's source.
    std::fs::write(&fifo, bytes).unwrap();
    let out = finish(run);
    assert_eq!(
        summary_line(&out, "input:"),
        "input: 3000 lines, read from line 1"
    );
    assert_same_records(&export(&data), &fold(&input), "a pipe's export");
}

/// The storage process inherits the environment: an ANALYTICS_STORE there
/// must not override `run --store embedded` (storage went to AWS).
#[test]
fn the_store_given_to_run_is_the_one_its_storage_process_uses() {
    let dir = tempfile::tempdir().unwrap();
    let input = generate(dir.path(), 2_000, 0);
    let data = dir.path().join("data");
    finish(
        run_cmd(&data)
            .args(["--store", "embedded", "--input"])
            .arg(&input)
            .env("ANALYTICS_STORE", "aws")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn run"),
    );
    assert_same_records(&export(&data), &fold(&input), "the embedded store");
}
