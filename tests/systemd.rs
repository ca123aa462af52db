//! The systemd unit (DESIGN §9, issue #4): systemd's own checker accepts it,
//! its settings agree with the service's, and its sandbox does not break the
//! service: every system call and socket family the whole process tree uses
//! (supervisor, workers, storage; file and Kafka modes, metrics endpoint,
//! notify socket) is allowed by the unit, and nothing maps memory writable
//! and executable (MemoryDenyWriteExecute).
//!
//! Needs `systemd-analyze` (package systemd) and `strace`; scripts/test
//! installs them when missing.

use nix::sys::signal::Signal;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod support;
use support::ops::*;
use support::*;

const INSTALLED_EXEC: &str = "ExecStart=/usr/bin/analytics run";

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/analytics.service")
}

fn unit_text() -> String {
    std::fs::read_to_string(unit_path()).expect("read systemd/analytics.service")
}

/// `Key=value` settings of the unit, in order (repeated keys kept).
fn settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn setting<'a>(all: &'a [(String, String)], key: &str) -> Option<&'a str> {
    all.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn tool(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): install it (scripts/test does: systemd, strace)")
        })
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_agrees_with_the_service() {
    let unit = unit_text();
    assert!(
        unit.lines().any(|l| l == INSTALLED_EXEC),
        "the installed unit runs /usr/bin/analytics"
    );
    // verify checks that ExecStart exists: point it at the binary we built.
    let dir = tempfile::tempdir().expect("tempdir");
    let rendered = dir.path().join("analytics.service");
    std::fs::write(
        &rendered,
        unit.replace(INSTALLED_EXEC, &format!("ExecStart={ANALYTICS} run")),
    )
    .expect("write the rendered unit");
    let path = rendered.to_str().expect("utf-8 path");
    let out = tool("systemd-analyze", &["verify", "--man=no", path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values; it only complains.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );

    let all = settings(&unit);
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("KillMode", "mixed"),
        ("DynamicUser", "yes"),
        ("StateDirectory", "analytics"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(setting(&all, key), Some(want), "{key}");
    }
    assert!(setting(&all, "WatchdogSec").is_some());
    // The service's own shutdown (25 s by default) plus the 5 s it gives its
    // children must end before systemd kills everything.
    let secs = |v: &str| -> u64 {
        v.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("expected whole seconds: {v}"))
    };
    let stop = secs(setting(&all, "TimeoutStopSec").expect("TimeoutStopSec"));
    assert!(stop > 25 + 5, "TimeoutStopSec={stop}s");

    // The exposure score the README reports.
    let out = tool(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            unit_path().to_str().expect("utf-8"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for analytics.service: "))
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(
        score <= 1.5,
        "exposure {score} (README reports 1.1)\n{text}"
    );
}

/// The system call groups systemd knows, as `@group` → members (which may
/// name other groups).
fn syscall_groups() -> BTreeMap<String, Vec<String>> {
    let out = tool("systemd-analyze", &["syscall-filter"]);
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = line.strip_prefix('@') {
            let name = format!("@{}", name.split_whitespace().next().unwrap_or(name));
            groups.entry(name.clone()).or_default();
            current = Some(name);
        } else if let Some(member) = line.strip_prefix("    ") {
            let member = member.trim();
            if let Some(g) = &current
                && !member.is_empty()
                && !member.starts_with('#')
            {
                groups
                    .entry(g.clone())
                    .or_default()
                    .push(member.to_string());
            }
        } else if line.trim().is_empty() {
            current = None;
        }
    }
    assert!(
        groups.get("@system-service").is_some_and(|g| !g.is_empty()),
        "systemd-analyze syscall-filter listed no @system-service"
    );
    groups
}

fn expand(item: &str, groups: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
    match groups.get(item) {
        Some(members) => members.iter().for_each(|m| expand(m, groups, out)),
        None => {
            out.insert(item.to_string());
        }
    }
}

/// The system calls the unit's `SystemCallFilter=` lines allow: the allow
/// list, minus every `~` deny list after it.
fn allowed_syscalls(unit: &str) -> BTreeSet<String> {
    let groups = syscall_groups();
    // In order, as systemd merges them after an allow list: a `~` line
    // takes calls out, a later plain line puts calls back.
    let mut allowed = BTreeSet::new();
    for (k, v) in settings(unit) {
        if k != "SystemCallFilter" {
            continue;
        }
        let mut calls = BTreeSet::new();
        let (deny, list) = match v.strip_prefix('~') {
            Some(list) => (true, list),
            None => (false, v.as_str()),
        };
        list.split_whitespace()
            .for_each(|i| expand(i, &groups, &mut calls));
        if deny {
            allowed = &allowed - &calls;
        } else {
            allowed.extend(calls);
        }
    }
    // @default is always allowed.
    expand("@default", &groups, &mut allowed);
    allowed
}

/// Runs `analytics args…` under `strace -f`, with a notify socket and a
/// watchdog; `during` gets the socket while the run's stdin is held open,
/// and says whether to stop the run with SIGTERM then. Returns the strace
/// log.
fn traced(
    dir: &Path,
    name: &str,
    args: &[String],
    during: impl FnOnce(&NotifySocket) -> bool,
) -> String {
    let log = dir.join(format!("{name}.strace"));
    let notify = NotifySocket::bind_abstract();
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-s", "0", "-o"])
        .arg(&log)
        .arg("--")
        .arg(ANALYTICS)
        .args(args)
        .env_remove("ANALYTICS_KAFKA_BROKERS")
        .env("RUST_LOG", "warn")
        .env("NOTIFY_SOCKET", &notify.address)
        .env("WATCHDOG_USEC", "2000000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run strace ({e}): install it (scripts/test does)"));
    let stdin = strace.stdin.take();
    if during(&notify) {
        // strace's child is the supervisor (same pid before and after exec).
        let sup = wait_for_children(strace.id(), "analytics", 1)[0];
        // If it is gone already, finish() below says how it ended.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup), Signal::SIGTERM);
    }
    drop(stdin);
    finish(strace);
    std::fs::read_to_string(&log).expect("read the strace log")
}

/// (system call names, socket families) in an `strace -f` log.
fn calls_and_families(log: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut calls = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in log.lines() {
        // "<pid> name(args) = result"; "<pid> <... name resumed>" repeats one.
        let Some((_, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        calls.insert(name.to_string());
        if name == "socket" || name == "socketpair" {
            let family = args.split(',').next().unwrap_or_default().to_string();
            // glibc's getaddrinfo probes the host's addresses over netlink
            // (AI_ADDRCONFIG); denied, it assumes both IPv4 and IPv6 and
            // resolution works as before. So this one may be refused.
            let netlink_probe = family == "AF_NETLINK" && args.contains("NETLINK_ROUTE");
            if !netlink_probe {
                families.insert(family);
            }
        }
        let wx = (name == "mmap" || name == "mprotect" || name == "pkey_mprotect")
            && args.contains("PROT_EXEC")
            && (name != "mmap" || args.contains("PROT_WRITE"));
        assert!(!wx, "MemoryDenyWriteExecute would refuse: {line}");
    }
    (calls, families)
}

#[test]
fn the_process_tree_stays_inside_the_units_sandbox() {
    let unit = unit_text();
    let allowed = allowed_syscalls(&unit);
    let allowed_families: BTreeSet<String> = setting(&settings(&unit), "RestrictAddressFamilies")
        .expect("RestrictAddressFamilies")
        .split_whitespace()
        .map(str::to_string)
        .collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let input = generate(dir.path(), 3_000, 100);
    let data = dir.path().join("data");
    let port = free_port();
    // File mode with everything an operator turns on: metrics (scraped),
    // notify with a watchdog, JSON logs.
    let file_mode = traced(
        dir.path(),
        "file",
        &[
            "run".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--input".into(),
            "-".into(),
            "--workers".into(),
            "2".into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
            "--log-format".into(),
            "json".into(),
        ],
        |notify| {
            notify.wait_for_line("READY=1", Duration::from_secs(60));
            assert_eq!(http_get(port, "/metrics").0, 200);
            true
        },
    );
    // The pipeline under load: a whole file, with malformed lines.
    let with_input = traced(
        dir.path(),
        "input",
        &[
            "run".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--input".into(),
            input.display().to_string(),
            "--workers".into(),
            "2".into(),
        ],
        |_| false,
    );
    // Kafka mode: the consumer and the dead-letter producer, against a
    // closed port (so connect, fail and retry).
    let kafka_mode = traced(
        dir.path(),
        "kafka",
        &[
            "run".into(),
            "--data-dir".into(),
            dir.path().join("kafka-data").display().to_string(),
            "--kafka-brokers".into(),
            format!("localhost:{}", free_port()),
            "--workers".into(),
            "1".into(),
        ],
        |notify| {
            notify.wait_for_line("READY=1", Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(500));
            true
        },
    );
    let mut calls = BTreeSet::new();
    let mut families = BTreeSet::new();
    for log in [&file_mode, &with_input, &kafka_mode] {
        let (c, f) = calls_and_families(log);
        calls.extend(c);
        families.extend(f);
    }
    assert!(
        calls.contains("socketpair") && calls.contains("execve") && calls.contains("bind"),
        "the trace saw the tree: {calls:?}"
    );
    let refused: Vec<&String> = calls.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "system calls the unit's SystemCallFilter refuses: {refused:?}"
    );
    let refused: Vec<&String> = families.difference(&allowed_families).collect();
    assert!(
        refused.is_empty(),
        "socket families RestrictAddressFamilies refuses: {refused:?}"
    );
}
