//! `analytics`: the product analytics service.
//!
//! - `analytics run`: the process tree on the embedded default (DESIGN §8).
//! - `analytics query …` / `analytics export`: read the metrics back.
//! - `analytics config check`: validate the configuration, print it.
//! - `analytics storage`: the storage process, spawned by `run` (internal).

use analytics::aws_store::{AwsConfig, AwsStore};
use analytics::backend::{Backend, BackendConfig};
use analytics::config::{self, ConfigFile};
use analytics::logging::{LogArgs, Role};
use analytics::query;
use analytics::storage::now_ms;
use analytics::store::{EmbeddedStore, StoreOptions};
use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use supervisor::endpoint;
use supervisor::kafka::KafkaSettings;
use supervisor::notify::Notifier;
use supervisor::restart::RestartPolicy;
use supervisor::service::Service;
use supervisor::source::{FileSource, Input, is_resumable, stream_name};
use supervisor::telemetry::Telemetry;
use supervisor::tree::{Source, TreeConfig, run};

/// Virtual partitions of a file source. Fixed: shard state in the store is
/// keyed by it.
const FILE_SHARDS: u32 = 16;

#[derive(Parser)]
#[command(
    name = "analytics",
    version,
    about = "Exact seller and category metrics from catalogue product events",
    after_long_help = "\
Settings come from flags, then ANALYTICS_* environment variables, then the TOML
file (/etc/analytics/analytics.toml, or --config FILE), then built-in defaults.
File settings are named like the flags of `analytics run` (flush_interval_ms);
librdkafka properties go in its [kafka_properties] table. `analytics config
check` prints the effective settings. AWS credentials come from the standard
provider chain (AWS_* variables, profile, instance role).

Under systemd (analytics.service) the data directory is
/var/lib/analytics/analytics-data, and
/etc/analytics/analytics.env may set ANALYTICS_* variables."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
    /// TOML file of settings, named like the flags (`flush_interval_ms =
    /// 500`); flags and ANALYTICS_* variables win over it. Read from
    /// /etc/analytics/analytics.toml when that exists.
    #[arg(long, global = true, env = config::ENV_CONFIG, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Global: `analytics query seller ID --data-dir D` works as well as
/// `analytics query --data-dir D seller ID`.
#[derive(Args, Clone)]
struct StoreArgs {
    /// Where metrics and the service's state live: `embedded` (a redb file
    /// and an archive directory in --data-dir) or `aws` (DynamoDB and S3).
    #[arg(long, global = true, env = "ANALYTICS_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    store: StoreKind,
    /// Directory of the embedded store, dead letters and archive.
    #[arg(
        long,
        global = true,
        env = "ANALYTICS_DATA_DIR",
        default_value = "./analytics-data"
    )]
    data_dir: PathBuf,
    #[command(flatten)]
    aws: AwsArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Embedded,
    Aws,
}

/// The AWS store's settings. Credentials and, unless given here, the region
/// come from the standard provider chain (AWS_* environment, profile,
/// instance role).
#[derive(Args, Clone)]
struct AwsArgs {
    /// Endpoint override for a local stack (e.g. moto on
    /// http://127.0.0.1:5000); S3 then uses path-style addressing.
    #[arg(long, global = true, env = "ANALYTICS_AWS_ENDPOINT")]
    aws_endpoint: Option<String>,
    #[arg(long, global = true, env = "ANALYTICS_AWS_REGION")]
    aws_region: Option<String>,
    /// DynamoDB table of the metric items (DESIGN §6).
    #[arg(
        long,
        global = true,
        env = "ANALYTICS_DYNAMODB_TABLE",
        default_value = "analytics-metrics"
    )]
    dynamodb_table: String,
    /// DynamoDB table of the service's own state (never expires).
    #[arg(
        long,
        global = true,
        env = "ANALYTICS_STATE_TABLE",
        default_value = "analytics-state"
    )]
    state_table: String,
    /// S3 bucket of the archive and the state checkpoints.
    #[arg(
        long,
        global = true,
        env = "ANALYTICS_S3_BUCKET",
        default_value = "analytics-archive"
    )]
    s3_bucket: String,
}

impl StoreArgs {
    fn backend_config(&self, ttl_days: u64) -> BackendConfig {
        match self.store {
            StoreKind::Embedded => BackendConfig::Embedded {
                data_dir: self.data_dir.clone(),
            },
            StoreKind::Aws => BackendConfig::Aws(AwsConfig {
                endpoint: self.aws.aws_endpoint.clone(),
                region: self.aws.aws_region.clone(),
                metrics_table: self.aws.dynamodb_table.clone(),
                state_table: self.aws.state_table.clone(),
                bucket: self.aws.s3_bucket.clone(),
                ttl: Duration::from_secs(ttl_days.saturating_mul(24 * 3600)),
                ..AwsConfig::default()
            }),
        }
    }

    /// The same settings as command-line arguments, for the storage
    /// process (none of them is a secret).
    fn to_args(&self, data_dir: &Path) -> Vec<OsString> {
        // Always the store kind: the child inherits the environment, and an
        // ANALYTICS_STORE there must not override `run --store embedded`.
        let kind = match self.store {
            StoreKind::Embedded => "embedded",
            StoreKind::Aws => "aws",
        };
        let mut args: Vec<OsString> = vec![
            "--data-dir".into(),
            data_dir.into(),
            "--store".into(),
            kind.into(),
        ];
        if self.store == StoreKind::Aws {
            let aws = &self.aws;
            for (flag, value) in [
                ("--aws-endpoint", &aws.aws_endpoint),
                ("--aws-region", &aws.aws_region),
            ] {
                if let Some(v) = value {
                    args.extend([flag.into(), v.into()]);
                }
            }
            for (flag, value) in [
                ("--dynamodb-table", &aws.dynamodb_table),
                ("--state-table", &aws.state_table),
                ("--s3-bucket", &aws.s3_bucket),
            ] {
                args.extend([flag.into(), value.into()]);
            }
        }
        args
    }
}

#[derive(Subcommand)]
enum Command {
    /// Fold events into the store with worker processes, until the input ends
    /// or SIGTERM/SIGINT.
    Run(Box<RunArgs>),
    /// Print stored metrics as a table (or JSON lines).
    Query {
        #[command(flatten)]
        store: StoreArgs,
        /// JSON lines instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        what: QueryWhat,
    },
    /// Print every current metric record as JSON lines, sorted by key.
    Export {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Publish a JSON-lines file to Kafka the way the catalogue backend does
    /// (topic by eventType, key sellerId, partition by the backend's hash):
    /// for tests, benchmarks and demos against a local broker.
    Produce {
        #[arg(long, env = "ANALYTICS_KAFKA_BROKERS")]
        kafka_brokers: String,
        #[command(flatten)]
        topics: TopicArgs,
        /// Partitions of the topics (the backend's modulus).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
        partitions: u32,
        /// Records per produce batch. 1 (the default) because tansu cannot
        /// serve a fetch that starts inside a batch (see src/produce.rs);
        /// raise it against a real Kafka.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch_records: u32,
        /// Create these topics first, with `--partitions` partitions
        /// (existing ones are kept).
        #[arg(long, value_delimiter = ',')]
        create_topics: Vec<String>,
        /// JSON-lines file of event values; stdin without it.
        input: Option<PathBuf>,
    },
    /// Check the configuration (file, environment, defaults) and print
    /// the settings `run` would use, with secrets redacted.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Write man pages (analytics.1, analytics-run.1, …) from the same
    /// definitions as --help into DIR (for packaging).
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// The storage process (spawned by `run`).
    #[command(hide = true)]
    Storage {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=36_500))]
        ttl_days: u64,
        /// Publish dead letters to this Kafka topic instead of the local file
        /// (brokers and client properties come from the environment).
        #[arg(long)]
        dlq_topic: Option<String>,
        #[arg(long)]
        ipc_fd: i32,
        #[arg(long)]
        parent_pid: i32,
    },
}

/// The storage process's environment: Kafka settings for the dead-letter
/// producer (properties may hold credentials, so never on the command line).
const ENV_DLQ_BROKERS: &str = "ANALYTICS_DLQ_BROKERS";
const ENV_DLQ_PROPERTIES: &str = "ANALYTICS_DLQ_KAFKA_PROPERTIES";

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate, then print the effective settings of `run` as TOML, each
    /// with where it came from (flag, env, file, default).
    Check,
}

#[derive(Subcommand)]
enum QueryWhat {
    /// A seller's current metrics and daily history.
    Seller { id: String },
    /// A category's current metrics and daily history.
    Category { name: String },
    /// Products low on stock.
    LowStock {
        #[arg(long)]
        seller: Option<String>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// JSON-lines file of event values; `-` or none reads stdin (when no
    /// Kafka brokers are set). Wins over --kafka-brokers (the brokers are
    /// then ignored, with a warning).
    #[arg(long, env = "ANALYTICS_INPUT")]
    input: Option<PathBuf>,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// Worker processes [default: one per core].
    #[arg(long, env = "ANALYTICS_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
    /// Nice levels the workers run below the supervisor and storage (0 to
    /// 19): when the cores are busy, the processes that feed the workers
    /// and acknowledge their writes go first.
    #[arg(long, env = "ANALYTICS_WORKER_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    worker_nice: i32,
    /// How often workers hand their changes to storage.
    #[arg(long, env = "ANALYTICS_FLUSH_INTERVAL_MS", default_value_t = 1000)]
    flush_interval_ms: u64,
    /// Bytes of changes per part of a worker's flush answer (a shard's
    /// changes are never split). Tests set it low to have every flush
    /// answered in many parts.
    #[arg(long, hide = true, default_value_t = 16 << 20, value_parser = clap::value_parser!(u32).range(1..=32 << 20))]
    answer_part_bytes: u32,
    /// Flush sooner once this many events arrived since the last flush.
    #[arg(long, env = "ANALYTICS_FLUSH_MAX_EVENTS", default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    flush_max_events: u64,
    /// Active products with fewer units are on the low-stock list.
    #[arg(long, env = "ANALYTICS_LOW_STOCK_THRESHOLD", default_value_t = 10)]
    low_stock_threshold: i64,
    /// Larger events are dead-lettered as `too_large`.
    #[arg(long, env = "ANALYTICS_MAX_EVENT_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(64..=16 << 20))]
    max_event_bytes: u32,
    /// Lifetime of metric items after their last write (1 to 36,500 days;
    /// current items are refreshed daily, or four times per lifetime when
    /// that is more often).
    #[arg(long, env = "ANALYTICS_TTL_DAYS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=36_500))]
    ttl_days: u64,
    /// Pause reading while this much unacknowledged input is buffered.
    #[arg(long, env = "ANALYTICS_MAX_BUFFERED_MB", default_value_t = 256)]
    max_buffered_mb: usize,
    /// More child restarts than this within --restart-window-secs stops the
    /// service (exit 1) so systemd can restart it.
    #[arg(long, env = "ANALYTICS_MAX_RESTARTS", default_value_t = 10)]
    max_restarts: u32,
    #[arg(long, env = "ANALYTICS_RESTART_WINDOW_SECS", default_value_t = 60)]
    restart_window_secs: u64,
    /// Give up a graceful shutdown after this long (exit 1; nothing is lost).
    #[arg(long, env = "ANALYTICS_SHUTDOWN_TIMEOUT_SECS", default_value_t = 25)]
    shutdown_timeout_secs: u64,
    /// A worker flush or storage request unanswered this long means the
    /// pipeline is wedged: the systemd watchdog pings stop.
    #[arg(long, env = "ANALYTICS_STALL_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    stall_timeout_secs: u64,
    /// Archive a snapshot of every metric record this often while running
    /// (gzip JSON lines under metrics/dt=…/ in the archive); 0: only when
    /// the run stops cleanly, which always takes one.
    #[arg(long, env = "ANALYTICS_ARCHIVE_INTERVAL_SECS", default_value_t = 3600)]
    archive_interval_secs: u64,
    /// Serve /metrics, /health and /ready over HTTP on this address
    /// (e.g. 127.0.0.1:9464); off when unset.
    #[arg(long, env = "ANALYTICS_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Args)]
struct TopicArgs {
    /// Topics of created, updated and deleted events.
    #[arg(
        long,
        env = "ANALYTICS_KAFKA_TOPICS",
        value_delimiter = ',',
        default_value = "product.created,product.updated,product.deleted"
    )]
    kafka_topics: Vec<String>,
}

#[derive(Args)]
struct KafkaArgs {
    /// Consume from these Kafka brokers (host:port,...) instead of a file.
    #[arg(long, env = "ANALYTICS_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Consumer group; every instance of the service joins the same one.
    #[arg(
        long,
        env = "ANALYTICS_KAFKA_GROUP_ID",
        default_value = "analytics-service-group"
    )]
    kafka_group_id: String,
    #[command(flatten)]
    topics: TopicArgs,
    /// A librdkafka client property, `key=value` (repeatable); wins over ours.
    #[arg(long = "kafka-property", value_parser = parse_property)]
    kafka_properties: Vec<(String, String)>,
    /// Topic for rejected events.
    #[arg(long, env = "ANALYTICS_DLQ_TOPIC", default_value = "analytics-dlq")]
    dlq_topic: String,
    /// How often consumer lag is logged.
    #[arg(
        long,
        env = "ANALYTICS_KAFKA_STATS_INTERVAL_MS",
        default_value_t = 10_000
    )]
    kafka_stats_interval_ms: u64,
    /// How long a revoke waits for the revoked partitions to be made
    /// durable before they are released uncommitted. Tests set it low.
    #[arg(long, hide = true, default_value_t = 120_000)]
    revoke_timeout_ms: u64,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let location = config::locate(&argv, std::env::var_os(config::ENV_CONFIG));
    // The storage process gets every setting from `run` on its command
    // line; reading the file again would let an edit made while the service
    // runs (even a broken one) reach a restarted child.
    let is_storage = argv.get(1).is_some_and(|a| a == "storage");
    let file = match is_storage {
        true => Ok(ConfigFile::default()),
        false => ConfigFile::load(&location, &Cli::command()),
    };
    let file = match file {
        Ok(file) => file,
        Err(e) => {
            eprintln!("analytics: {e}");
            return ExitCode::from(2);
        }
    };
    let mut cmd = file.apply(Cli::command());
    let cli = match cmd
        .try_get_matches_from_mut(&argv)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => match config::env_value_error(&e, &cmd, &argv, is_env_set) {
            Some(message) => {
                eprintln!("analytics: {message}");
                return ExitCode::from(2);
            }
            None => e.exit(),
        },
    };
    let role = match cli.command {
        Command::Storage { .. } => Role::Child("storage"),
        _ => Role::Main,
    };
    let child_env = match analytics::logging::init(role, &cli.log) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("analytics: {e}");
            return ExitCode::from(2);
        }
    };
    if matches!(role, Role::Main) {
        let unknown = config::unknown_env_settings(&cmd, std::env::vars_os().map(|(k, _)| k));
        if !unknown.is_empty() {
            tracing::warn!(
                variables = unknown.join(", "),
                "ANALYTICS_* variables that are not settings (a typo?) are ignored"
            );
        }
    }
    let result = match cli.command {
        Command::Run(args) => run_tree(*args, &file, child_env),
        Command::Config {
            action: ConfigAction::Check,
        } => config_check(&file, &argv),
        Command::Query { store, json, what } => return query_cmd(&store, json, what),
        Command::Export { store } => export_cmd(&store),
        Command::Man { dir } => write_man_pages(&dir),
        Command::Produce {
            kafka_brokers,
            topics,
            partitions,
            batch_records,
            create_topics,
            input,
        } => produce_cmd(
            &kafka_brokers,
            &topics.kafka_topics,
            (partitions, batch_records),
            create_topics,
            input,
        ),
        Command::Storage {
            store,
            ttl_days,
            dlq_topic,
            ipc_fd,
            parent_pid,
        } => storage_cmd(&store, ttl_days, dlq_topic, ipc_fd, parent_pid),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.is::<UsageError>() => {
            eprintln!("analytics: {e}");
            ExitCode::from(2)
        }
        // A child's last words go through the log, so they name the child.
        Err(e) if matches!(role, Role::Child(_)) => {
            tracing::error!(error = format!("{e:#}"), "exiting on an error");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("analytics: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// librdkafka checks each property as it is set (names, values, what this
/// build supports, e.g. no TLS): the consumer would refuse it at once.
fn check_kafka_properties(kafka: &KafkaSettings) -> Result<(), UsageError> {
    match kafka.client_config().create_native_config() {
        Ok(_) => Ok(()),
        Err(e) => Err(UsageError(format!(
            "Kafka client properties: {}",
            supervisor::kafka::shown(&e)
        ))),
    }
}

/// A setting the operator gave is wrong: exit 2, as for a bad flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn is_env_set(name: &str) -> bool {
    std::env::var_os(name).is_some()
}

/// Output piped into `head` and closed early is not a failure.
/// Only stdout's: a broken pipe to a child (a handshake, say) is a failure.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<StdoutError>()
        .is_some_and(|StdoutError(io)| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Writing what a command prints failed.
#[derive(Debug, thiserror::Error)]
#[error("writing to stdout: {0}")]
struct StdoutError(std::io::Error);

fn to_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| StdoutError(e).into())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

impl RunArgs {
    /// The Kafka source's settings (none for a file source), after the
    /// checks that span several settings; `config check` makes them too.
    fn kafka_settings(&self, file: &ConfigFile) -> anyhow::Result<Option<KafkaSettings>> {
        let properties =
            config::merge_properties(&file.kafka_properties, &self.kafka.kafka_properties);
        // A named input wins: brokers may come from the environment or the
        // configuration file, and a run told to read a file reads it.
        let brokers = match &self.input {
            Some(_) => None,
            None => self.kafka.kafka_brokers.as_ref(),
        };
        let kafka = brokers.map(|brokers| KafkaSettings {
            brokers: brokers.clone(),
            group_id: self.kafka.kafka_group_id.clone(),
            topics: self.kafka.topics.kafka_topics.clone(),
            properties: properties.into_iter().map(|(k, v, _)| (k, v)).collect(),
            stats_interval: Duration::from_millis(self.kafka.kafka_stats_interval_ms.max(100)),
            revoke_timeout: Duration::from_millis(self.kafka.revoke_timeout_ms),
        });
        if let Some(k) = &kafka {
            anyhow::ensure!(
                !k.topics.is_empty() && k.topics.iter().all(|t| !t.trim().is_empty()),
                "kafka_topics (--kafka-topics) must name at least one topic"
            );
        }
        anyhow::ensure!(
            self.store.store == StoreKind::Embedded || kafka.is_some(),
            "store = aws (--store aws) needs the Kafka source, kafka_brokers (--kafka-brokers) without input (--input): a file source keeps its dead letters in the embedded store"
        );
        Ok(kafka)
    }
}

/// `analytics config check`: the settings `run` would get from this file,
/// the environment and the defaults (flags are per command, so none).
fn config_check(file: &ConfigFile, argv: &[OsString]) -> anyhow::Result<()> {
    let mut cmd = file.apply(Cli::command());
    // Builds the global options (logging) into `run` too.
    cmd.build();
    let mut run_argv: Vec<OsString> = vec![argv[0].clone(), "run".into()];
    if let Some(path) = &file.path {
        run_argv.extend(["--config".into(), path.into()]);
    }
    let matches = cmd.clone().try_get_matches_from(&run_argv).map_err(|e| {
        match config::env_value_error(&e, &cmd, &run_argv, is_env_set) {
            Some(message) => anyhow::Error::new(UsageError(message)),
            None => e.into(),
        }
    })?;
    let run_matches = matches
        .subcommand_matches("run")
        .context("no run subcommand")?;
    let args = RunArgs::from_arg_matches(run_matches)?;
    if let Some(kafka) = args.kafka_settings(file)? {
        check_kafka_properties(&kafka)?;
    }
    // The options in their declared order (a file's settings moved theirs).
    let mut pristine = Cli::command();
    pristine.build();
    let run_cmd = pristine
        .find_subcommand("run")
        .context("no run subcommand")?;
    let source = match &file.path {
        Some(path) => format!("file {}", path.display()),
        None => format!("no file ({} does not exist)", config::DEFAULT_PATH),
    };
    let mut out = String::new();
    writeln!(
        out,
        "# The effective configuration of `analytics run`: {source},"
    )?;
    writeln!(
        out,
        "# the ANALYTICS_* environment, built-in defaults. Valid."
    )?;
    write!(
        out,
        "{}",
        config::render_effective(run_cmd, run_matches, file, &args.kafka.kafka_properties)
    )?;
    to_stdout(out.as_bytes())
}

fn run_tree(
    args: RunArgs,
    file: &ConfigFile,
    child_env: Vec<(OsString, OsString)>,
) -> anyhow::Result<()> {
    let kafka = args.kafka_settings(file)?;
    if let (Some(input), Some(_)) = (&args.input, &args.kafka.kafka_brokers) {
        tracing::warn!(
            input = %input.display(),
            "reading the input named by --input; the Kafka brokers setting is ignored"
        );
    }
    // Before the data directory is made: a mistyped --input, or a Kafka
    // property this build refuses, must not leave a store behind.
    let source = match kafka {
        Some(settings) => {
            check_kafka_properties(&settings)?;
            Source::Kafka(settings)
        }
        None => {
            let input = match &args.input {
                Some(p) if p.as_os_str() != "-" => Input::File(p.clone()),
                _ => Input::Stdin,
            };
            let stream = stream_name(&input).with_context(|| match &args.input {
                Some(path) => format!("cannot read the input {}", path.display()),
                None => "cannot read the input".to_string(),
            })?;
            Source::File(FileSource {
                input,
                stream,
                shards: FILE_SHARDS,
                max_event_bytes: args.max_event_bytes as usize,
            })
        }
    };
    std::fs::create_dir_all(&args.store.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.store.data_dir.display()
        )
    })?;
    let data_dir = std::fs::canonicalize(&args.store.data_dir)?;
    // Shards mean different things to a file (16 virtual partitions) and to
    // Kafka (partitions): one store must never mix the two.
    let scheme = match &source {
        Source::Kafka(_) => "kafka-partitions".to_string(),
        Source::File(_) => format!("file-{FILE_SHARDS}-virtual-partitions"),
    };
    // A previous instance's storage process may still be exiting (it dies
    // with its supervisor, a moment later): wait for its lock a little.
    // (The AWS store is keyed by Kafka partitions only.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    if args.store.store == StoreKind::Embedded {
        loop {
            match EmbeddedStore::open(&data_dir, StoreOptions::default())
                .and_then(|store| store.claim_shard_scheme(&scheme))
            {
                Ok(()) => break,
                Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                    tracing::info!(error = %e, "the store is busy; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("the store in {}", data_dir.display()));
                }
            }
        }
    }
    let me = std::env::current_exe().context("cannot find our own executable")?;
    let worker_program = match std::env::var_os("ANALYTICS_WORKER_BIN") {
        Some(p) => PathBuf::from(p),
        None => me.with_file_name("analytics-worker"),
    };
    anyhow::ensure!(
        worker_program.is_file(),
        "the worker program {} is missing: build it with `cargo build --release --bins` (or set ANALYTICS_WORKER_BIN)",
        worker_program.display()
    );
    // One per core: the workers run below the supervisor and storage
    // (`--worker-nice`), which take a core when they need one.
    let workers = args
        .workers
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let mut storage_args = vec![OsString::from("storage")];
    storage_args.extend(args.store.to_args(&data_dir));
    storage_args.extend(["--ttl-days".into(), args.ttl_days.to_string().into()]);
    let mut storage_env = Vec::new();
    if let Source::Kafka(k) = &source {
        storage_args.extend(["--dlq-topic".into(), args.kafka.dlq_topic.clone().into()]);
        let properties: Vec<String> = k
            .properties
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        storage_env.push((ENV_DLQ_BROKERS.into(), k.brokers.clone().into()));
        storage_env.push((ENV_DLQ_PROPERTIES.into(), properties.join("\n").into()));
    }
    let cfg = TreeConfig {
        workers,
        shards: FILE_SHARDS,
        worker_program,
        worker_args: vec![
            "serve".into(),
            "--nice".into(),
            args.worker_nice.to_string().into(),
        ],
        storage_program: me,
        storage_args,
        storage_env,
        worker: proto::WorkerConfig {
            low_stock_threshold: args.low_stock_threshold,
            max_event_bytes: args.max_event_bytes,
            answer_part_bytes: args.answer_part_bytes,
            // Set by the tree from its source.
            archive_events: false,
        },
        flush_interval: Duration::from_millis(args.flush_interval_ms.max(1)),
        flush_max_events: args.flush_max_events,
        max_buffered_bytes: args.max_buffered_mb.max(1) << 20,
        restart: RestartPolicy {
            max_restarts: args.max_restarts,
            window: Duration::from_secs(args.restart_window_secs),
            ..RestartPolicy::default()
        },
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
        handshake_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(args.stall_timeout_secs),
        child_env,
        snapshot_interval: (args.archive_interval_secs > 0)
            .then(|| Duration::from_secs(args.archive_interval_secs)),
    };
    let is_kafka = matches!(source, Source::Kafka(_));
    let resumable = matches!(&source, Source::File(f) if is_resumable(&f.stream));
    // A taken port is an error before anything starts.
    let metrics = args.metrics_addr.map(endpoint::bind).transpose()?;
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "not notifying the service manager");
        Notifier::disabled()
    });
    let telemetry = Telemetry::new();
    let service = Service::new(notifier, telemetry.clone());
    // The tree runs in `block_on`, on this (the main) thread; the tasks
    // that move frames to and from the children run on two runtime
    // threads, so event frames keep flowing to the workers while the tree
    // handles a flush answer (tens of MB checked and passed on; on one
    // thread the worker ran dry for ~30 ms at every flush). The tree also
    // forks the children here: a child's PR_SET_PDEATHSIG fires when the
    // *thread* that forked it ends, so that must not be a runtime thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let summary = rt.block_on(async {
        let shutdown = supervisor::shutdown::listen()?;
        // The endpoint outlives the shutdown signal (so /ready can say 503
        // while draining) and stops when the tree is done.
        let (endpoint_stop, endpoint_done) = supervisor::shutdown::Shutdown::manual();
        let server = metrics.map(|listener| {
            tokio::spawn(endpoint::serve(listener, telemetry.clone(), endpoint_done))
        });
        let result = run(cfg, source, shutdown, service).await;
        let _ = endpoint_stop.send(true);
        if let Some(server) = server
            && let Ok(Err(e)) = server.await
        {
            tracing::warn!(error = %e, "metrics endpoint failed");
        }
        anyhow::Ok(result?)
    })?;

    // Written whole at the end: a closed stdout (`| head`) is then one
    // error of its own kind, not a panic of println!.
    let mut out = String::new();
    let rejected: u64 = summary.rejected.values().sum();
    if is_kafka {
        writeln!(
            out,
            "kafka: stopped; every acknowledged offset was committed"
        )?;
    } else {
        let from = summary.resumed_from + 1;
        match summary.lines {
            _ if summary.interrupted && !resumable => writeln!(
                out,
                "input: read from line {from}, interrupted (stdin or a pipe cannot be resumed)"
            )?,
            _ if summary.interrupted => writeln!(
                out,
                "input: read from line {from}, interrupted: a re-run resumes after the last \
                 acknowledged line"
            )?,
            Some(lines) if summary.resumed_from > 0 && i128::from(lines) < i128::from(from) => {
                writeln!(
                    out,
                    "input: {lines} lines, all read by an earlier run: nothing new"
                )?
            }
            Some(lines) => writeln!(out, "input: {lines} lines, read from line {from}")?,
            None => writeln!(out, "input: read from line {from}")?,
        }
    }
    let dead_letters = if is_kafka {
        format!("topic {}", args.kafka.dlq_topic)
    } else {
        data_dir
            .join(analytics::store::DEAD_LETTER_FILE)
            .display()
            .to_string()
    };
    if rejected > 0 {
        let by_reason: Vec<String> = summary
            .rejected
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        writeln!(
            out,
            "rejected: {rejected} ({}) -> {}",
            by_reason.join(", "),
            dead_letters
        )?;
    } else {
        writeln!(out, "rejected: 0")?;
    }
    writeln!(out, "worker/storage restarts: {}", summary.restarts)?;
    if summary.products_moved_in > 0 {
        writeln!(
            out,
            "products moved in from another partition's seller: {} (the previous sellers may still count them: README, Known limits)",
            summary.products_moved_in
        )?;
    }
    let requests = telemetry.storage_requests_by_operation();
    if !requests.is_empty() {
        let by_operation: Vec<String> =
            requests.iter().map(|(op, n)| format!("{op} {n}")).collect();
        writeln!(out, "storage requests: {}", by_operation.join(", "))?;
    }
    if let Some(key) = summary.snapshot {
        match args.store.store {
            StoreKind::Embedded => writeln!(
                out,
                "snapshot: {}",
                analytics::archive::archive_dir(&data_dir)
                    .join(key)
                    .display()
            )?,
            StoreKind::Aws => writeln!(out, "snapshot: s3://{}/{key}", args.store.aws.s3_bucket)?,
        }
    }
    to_stdout(out.as_bytes())
}

/// One page for `analytics` and one per visible subcommand (nested ones
/// included, e.g. analytics-query-seller.1).
fn write_man_pages(dir: &Path) -> anyhow::Result<()> {
    fn write(cmd: &clap::Command, name: &str, dir: &Path) -> anyhow::Result<()> {
        let cmd = cmd.clone().name(name.to_string());
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        let documented = |s: &&clap::Command| !s.is_hide_set() && s.get_name() != "help";
        for sub in cmd.get_subcommands().filter(documented) {
            write(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    cmd.build();
    write(&cmd, "analytics", dir)
}

/// Opens the configured store for reading.
async fn open_backend(config: BackendConfig) -> anyhow::Result<Backend> {
    Ok(match config {
        BackendConfig::Embedded { data_dir } => {
            anyhow::ensure!(
                data_dir.join(analytics::store::DB_FILE).exists(),
                "no store in {} (run `analytics run` first)",
                data_dir.display()
            );
            let store = EmbeddedStore::open(&data_dir, StoreOptions::default())
                .with_context(|| format!("cannot open the store in {}", data_dir.display()))?;
            Backend::Embedded {
                store,
                archive_dir: analytics::archive::archive_dir(&data_dir),
            }
        }
        BackendConfig::Aws(cfg) => Backend::Aws(Box::new(
            AwsStore::open_existing(cfg)
                .await
                .context("cannot read the AWS store")?,
        )),
    })
}

fn query_cmd(store: &StoreArgs, json: bool, what: QueryWhat) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let backend = open_backend(store.backend_config(30)).await?;
            let now = now_ms();
            anyhow::Ok(match &what {
                QueryWhat::Seller { id } => {
                    let found = backend.seller(id, now).await?;
                    query::print_entity("seller", id, found, json, &mut out)
                }
                QueryWhat::Category { name } => {
                    let found = backend.category(name, now).await?;
                    query::print_entity("category", name, found, json, &mut out)
                }
                QueryWhat::LowStock { seller } => {
                    let records = backend.low_stock(seller.as_deref()).await?;
                    query::print_low_stock(&records, seller.as_deref(), json, &mut out)
                }
            })
        })
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) if e.is_not_found() => {
            // The table said so on stdout; JSON lines keep stdout for records.
            if json {
                eprintln!("analytics: {e}");
            }
            ExitCode::FAILURE
        }
        Ok(Err(query::QueryError::Output(e))) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("analytics: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("analytics: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn export_cmd(store: &StoreArgs) -> anyhow::Result<()> {
    let records = runtime()?.block_on(async {
        let backend = open_backend(store.backend_config(30)).await?;
        anyhow::Ok(backend.current_records(now_ms()).await?)
    })?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    query::export(&records, &mut out)
        .and_then(|()| out.flush())
        .map_err(StdoutError)?;
    Ok(())
}

fn produce_cmd(
    brokers: &str,
    topics: &[String],
    (partitions, batch_records): (u32, u32),
    create: Vec<String>,
    input: Option<PathBuf>,
) -> anyhow::Result<()> {
    use analytics::produce;
    if !create.is_empty() {
        produce::create_topics(brokers, &create, partitions)?;
    }
    let target = produce::Target {
        brokers,
        topics,
        partitions,
        batch_records,
    };
    let sent = match &input {
        Some(p) if p.as_os_str() != "-" => {
            let file =
                std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
            produce::produce(&target, std::io::BufReader::with_capacity(1 << 20, file))?
        }
        _ => produce::produce(&target, std::io::stdin().lock())?,
    };
    eprintln!("published {sent} events");
    Ok(())
}

fn storage_cmd(
    store: &StoreArgs,
    ttl_days: u64,
    dlq_topic: Option<String>,
    ipc_fd: i32,
    parent_pid: i32,
) -> anyhow::Result<()> {
    proto::child::die_with_parent(parent_pid)?;
    let dlq = match dlq_topic {
        Some(topic) => {
            let brokers = std::env::var(ENV_DLQ_BROKERS)
                .with_context(|| format!("--dlq-topic needs {ENV_DLQ_BROKERS}"))?;
            let properties = std::env::var(ENV_DLQ_PROPERTIES)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| parse_property(l).ok())
                .collect::<Vec<_>>();
            Some(analytics::dlq::KafkaDlq::new(
                &brokers,
                &topic,
                &properties,
            )?)
        }
        None => None,
    };
    anyhow::ensure!(
        dlq.is_some() || store.store == StoreKind::Embedded,
        "the AWS store needs a dead-letter topic"
    );
    runtime()?.block_on(async {
        // Adopt the socket first: it closes with this process whatever
        // happens next, so the supervisor learns of a failed start.
        let stream = proto::child::adopt_socket(ipc_fd)?;
        let backend = match store.backend_config(ttl_days) {
            BackendConfig::Embedded { data_dir } => Backend::Embedded {
                store: EmbeddedStore::open(
                    &data_dir,
                    StoreOptions {
                        ttl: Duration::from_secs(ttl_days * 24 * 3600),
                    },
                )?,
                archive_dir: analytics::archive::archive_dir(&data_dir),
            },
            BackendConfig::Aws(cfg) => {
                Backend::Aws(Box::new(analytics::storage::connect_aws(cfg).await?))
            }
        };
        analytics::storage::serve(stream, backend, dlq).await
    })
}
