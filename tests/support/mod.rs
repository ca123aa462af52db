//! Helpers shared by the process, Kafka and DynamoDB tests: the real binaries, their
//! output, and the process tree of a running service.
#![allow(dead_code)] // each test binary uses a different subset

pub mod kafka;
pub mod ops;
pub mod proxy;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub const ANALYTICS: &str = env!("CARGO_BIN_EXE_analytics");
pub const WORKER: &str = env!("CARGO_BIN_EXE_analytics-worker");

pub fn generate(dir: &Path, events: u64, bad_every: u64) -> PathBuf {
    let path = dir.join("events.jsonl");
    let status = Command::new(WORKER)
        .args([
            "generate",
            "--events",
            &events.to_string(),
            "--seed",
            "7",
            "--bad-every",
            &bad_every.to_string(),
            "--out",
        ])
        .arg(&path)
        .status()
        .expect("run analytics-worker generate");
    assert!(status.success(), "generate failed");
    path
}

/// Runs a command that must succeed; its stdout.
pub fn stdout_of(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 records")
}

pub fn fold(input: &Path) -> String {
    stdout_of(
        Command::new(WORKER).arg("fold").arg(input),
        "analytics-worker fold",
    )
}

pub fn export(data: &Path) -> String {
    stdout_of(
        Command::new(ANALYTICS)
            .arg("export")
            .arg("--data-dir")
            .arg(data),
        "analytics export",
    )
}

/// A run that wedges must fail the test, not hang it: past this, the run is
/// killed and the assertion below reports it.
pub const RUN_DEADLINE: Duration = Duration::from_secs(300);

pub fn wait_with_deadline(child: Child) -> Output {
    let pid = child.id() as i32;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx.recv_timeout(RUN_DEADLINE).is_err() {
            eprintln!("analytics run {pid} still running after {RUN_DEADLINE:?}: killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    });
    let out = child.wait_with_output().expect("wait for analytics run");
    let _ = done_tx.send(());
    out
}

/// Child processes of `pid`: (pid, command line).
pub fn children(pid: u32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.to_string()) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z")
            || fields.get(1).and_then(|f| f.parse::<u32>().ok()) != Some(pid)
        {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        out.push((p, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
    }
    out
}

pub fn wait_for_children(pid: u32, what: &str, count: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<i32> = children(pid)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(what))
            .map(|(p, _)| p)
            .collect();
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {count} '{what}' children of {pid} after 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("{sig} to {pid}: {e} (did the run end too early?)"));
}

/// Asserts two record dumps are equal, showing only the lines that differ.
pub fn assert_same_records(got: &str, want: &str, what: &str) {
    if got == want {
        return;
    }
    let g: std::collections::BTreeSet<&str> = got.lines().collect();
    let w: std::collections::BTreeSet<&str> = want.lines().collect();
    let extra: Vec<&&str> = g.difference(&w).take(8).collect();
    let missing: Vec<&&str> = w.difference(&g).take(8).collect();
    panic!(
        "{what}: {} records vs {} expected\nonly in ours:\n{}\nonly in expected:\n{}",
        got.lines().count(),
        want.lines().count(),
        extra
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
        missing
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
}

/// Waits for a run, which must have succeeded; its output.
pub fn finish(child: Child) -> Output {
    let out = wait_with_deadline(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "run failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The reasons part of `fold`'s stderr summary ("invalid_json 3, …").
pub fn fold_rejections(input: &Path) -> String {
    let out = Command::new(WORKER)
        .arg("fold")
        .arg(input)
        .output()
        .expect("run analytics-worker fold");
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .trim()
        .split_once(" lines: ")
        .map(|(_, r)| r.to_string())
        .unwrap_or_default()
}
