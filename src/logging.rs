//! Logging for every process of the tree (DESIGN §9, §11): `tracing` to
//! stderr, human-readable on a terminal, JSON lines under systemd (stderr is
//! the journal, `JOURNAL_STREAM`) or when asked; the level from `RUST_LOG`,
//! else `--log-level`.
//!
//! Every line a child writes names the child (`child{role, pid}`), from
//! whatever thread wrote it (librdkafka logs from its own threads), so the
//! supervisor's stderr, which the children share, stays readable.

use clap::{Args, ValueEnum};
use std::ffi::OsString;
use std::fmt;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

const ENV_FORMAT: &str = "ANALYTICS_LOG_FORMAT";
const ENV_LEVEL: &str = "ANALYTICS_LOG_LEVEL";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human on a terminal, JSON when stderr is the systemd journal.
    Auto,
    Human,
    Json,
}

/// The logging settings every binary of the tree accepts.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = ENV_FORMAT, value_enum, default_value_t = LogFormat::Auto, global = true)]
    pub log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `warn,supervisor=debug`);
    /// RUST_LOG, when set, wins.
    #[arg(long, env = ENV_LEVEL, global = true)]
    pub log_level: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("--log-level {value:?} is not a level or filter: {source}")]
    Level {
        value: String,
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Which process is logging.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    /// The supervisor, and the one-shot commands (`query`, `export`, …).
    Main,
    Child(&'static str),
}

/// Installs the global subscriber. Returns the environment the children
/// need to log the same way (the format as resolved here, and the level).
pub fn init(role: Role, args: &LogArgs) -> Result<Vec<(OsString, OsString)>, LoggingError> {
    use std::io::IsTerminal;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&v).ok(),
        _ => None,
    };
    let filter = match (filter, &args.log_level) {
        (Some(f), _) => f,
        (None, Some(level)) => {
            tracing_subscriber::EnvFilter::try_new(level).map_err(|source| LoggingError::Level {
                value: level.clone(),
                source,
            })?
        }
        (None, None) => tracing_subscriber::EnvFilter::new("info"),
    };
    let terminal = std::io::stderr().is_terminal();
    let json = match args.log_format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !terminal && stderr_is_journal(),
    };
    let tag = match role {
        Role::Main => None,
        Role::Child(role) => Some(ChildTag {
            role,
            pid: std::process::id(),
        }),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(Tagged {
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_target(false),
                tag,
                json: true,
            })
            .init();
    } else {
        builder
            .with_ansi(terminal)
            .event_format(Tagged {
                inner: tracing_subscriber::fmt::format().with_target(false),
                tag,
                json: false,
            })
            .init();
    }
    let mut child_env = vec![(
        OsString::from(ENV_FORMAT),
        OsString::from(if json { "json" } else { "human" }),
    )];
    if let Some(level) = &args.log_level {
        child_env.push((ENV_LEVEL.into(), level.into()));
    }
    Ok(child_env)
}

/// systemd connects stderr to the journal and says so in `JOURNAL_STREAM`
/// (`device:inode` of that stream); a stderr redirected elsewhere since
/// does not match.
fn stderr_is_journal() -> bool {
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(2) else {
        return false;
    };
    expected.to_string_lossy() == format!("{}:{}", stat.st_dev, stat.st_ino)
}

struct ChildTag {
    role: &'static str,
    pid: u32,
}

/// A format that names the child on every line.
struct Tagged<F> {
    inner: F,
    tag: Option<ChildTag>,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for Tagged<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some(tag) = &self.tag else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "child{{role={} pid={}}} ", tag.role, tag.pid)?;
            return self.inner.format_event(ctx, writer, event);
        }
        // The JSON object gets a `child` member first.
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"child\":{{\"role\":\"{}\",\"pid\":{}}},{rest}",
                tag.role, tag.pid
            ),
            None => writer.write_str(&line),
        }
    }
}
