//! `analytics-worker`: the fold engine as a process.
//!
//! - `analytics-worker fold [FILE]`: fold a JSON-lines file of event values
//!   (stdin without FILE) and print the metric records as JSON lines.
//! - `analytics-worker generate`: write realistic example events.
//! - `analytics-worker serve`: run as a child of `analytics run` (internal).

use analytics_worker::fold::Fold;
use analytics_worker::records::MetricRecord;
use clap::{Parser, Subcommand};
use proto::EventBatch;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "analytics-worker",
    version,
    about = "Fold product events into exact metrics"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: analytics::logging::LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Fold a JSON-lines file of event values (stdin without FILE) and print
    /// the metric records as JSON lines, sorted by key. Rejected lines are
    /// summarised on stderr.
    Fold {
        file: Option<PathBuf>,
        /// Products with fewer units than this are low on stock.
        #[arg(long, default_value_t = 10)]
        low_stock_threshold: i64,
        /// Larger events are rejected as `too_large`.
        #[arg(long, default_value_t = 1 << 20)]
        max_event_bytes: u32,
    },
    /// Write deterministic, realistic example events as JSON lines.
    Generate(analytics_worker::generate::GenArgs),
    /// Serve the supervisor on an inherited socket (internal).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        ipc_fd: i32,
        #[arg(long)]
        parent_pid: i32,
        /// Nice levels below the supervisor's CPU priority.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
        nice: i32,
    },
}

fn main() -> ExitCode {
    use analytics::logging::Role;
    let cli = Cli::parse();
    let role = match cli.command {
        Command::Serve { .. } => Role::Child("worker"),
        _ => Role::Main,
    };
    if let Err(e) = analytics::logging::init(role, &cli.log) {
        eprintln!("analytics-worker: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Fold {
            file,
            low_stock_threshold,
            max_event_bytes,
        } => fold_file(file, low_stock_threshold, max_event_bytes),
        Command::Generate(args) => {
            analytics_worker::generate::run_cli(args).map_err(anyhow::Error::from)
        }
        Command::Serve {
            ipc_fd,
            parent_pid,
            nice,
        } => serve(ipc_fd, parent_pid, nice),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A child's last words go through the log, so they name the child.
        Err(e) if matches!(role, Role::Child(_)) => {
            tracing::error!(error = format!("{e:#}"), "exiting on an error");
            ExitCode::from(2)
        }
        // Output piped into `head` and closed early is not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("analytics-worker: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Lines per batch handed to the fold; large enough to amortise, small
/// enough to keep memory flat.
const BATCH_LINES: usize = 4096;

fn fold_file(file: Option<PathBuf>, threshold: i64, max_event_bytes: u32) -> anyhow::Result<()> {
    let input: Box<dyn Read> = match &file {
        Some(path) => Box::new(
            std::fs::File::open(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let mut fold = Fold::new(threshold, max_event_bytes as usize);
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut batch = EventBatch::new(0, "input".into());
    let mut line = Vec::new();
    let mut offset = 0i64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n > 0 {
            batch.push(offset, trim_newline(&line));
            offset += 1;
        }
        if batch.len() >= BATCH_LINES || (n == 0 && !batch.is_empty()) {
            fold.apply_batch(&batch);
            for dl in fold.take_dead_letters() {
                *rejected.entry(dl.reason.to_string()).or_default() += 1;
            }
            batch = EventBatch::new(0, "input".into());
        }
        if n == 0 {
            break;
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for record in fold.records() {
        writeln!(out, "{}", MetricRecord::to_json_line(&record))?;
    }
    out.flush()?;
    let total: u64 = rejected.values().sum();
    if total > 0 {
        let by_reason: Vec<String> = rejected.iter().map(|(r, n)| format!("{r} {n}")).collect();
        eprintln!(
            "rejected {total} of {offset} lines: {}",
            by_reason.join(", ")
        );
    }
    Ok(())
}

fn trim_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn serve(ipc_fd: i32, parent_pid: i32, nice: i32) -> anyhow::Result<()> {
    proto::child::die_with_parent(parent_pid)?;
    // Before any thread starts: the archive's gzip threads inherit it. A
    // sandbox that forbids it costs speed, not correctness: run on.
    if let Err(e) = proto::child::lower_priority(nice) {
        tracing::warn!(error = %e, nice, "cannot lower the worker's CPU priority; it runs at the supervisor's");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stream = proto::child::adopt_socket(ipc_fd)?;
        analytics_worker::serve::serve(stream).await?;
        Ok(())
    })
}
