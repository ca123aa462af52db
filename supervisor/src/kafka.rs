//! The Kafka source (DESIGN §2, §5): an rdkafka consumer in a consumer group,
//! polled on its own thread.
//!
//! - A shard is a partition number: partition `p` of every subscribed topic
//!   is shard `p`, one stream per topic. The range assignor (librdkafka's
//!   default, forced here) hands partition `p` of all three topics to the same
//!   member, so one seller's created/updated/deleted events meet in one worker.
//! - Offsets are committed only when the tree says storage holds them
//!   ([`SourceCmd::Commit`]); auto-commit is off.
//! - On a revoke the thread hands over what it holds, asks the tree to make
//!   the revoked shards durable and waits, then commits what the tree reports,
//!   all before librdkafka releases the partitions.
//! - When the tree stops taking batches (the pipeline is behind, or storage
//!   is down), handing over blocks, so the thread stops polling: memory stays
//!   bounded by one batch per partition plus librdkafka's prefetch queue, and
//!   consumption resumes by itself. (Pausing the partitions instead, to keep
//!   polling, lost messages against tansu: it serves no fetch that starts
//!   inside a record batch, and a resume fetches from the middle of one;
//!   see src/produce.rs.) A stall longer than
//!   `max.poll.interval.ms` (default 5 min) makes librdkafka leave the group
//!   and rejoin afterwards; nothing is lost, since offsets are committed only
//!   for what storage holds.

use crate::source::SourceMsg;
use crate::throttle::LogThrottle;
use proto::{EventBatch, NO_TIMESTAMP, Offset, Position, Shard};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Events per batch handed to the tree.
const BATCH_EVENTS: usize = 1024;
/// A batch is handed over once its payload reaches this many bytes, so its
/// frame stays far below the frame limit even with large messages.
const BATCH_BYTES: usize = 8 << 20;
/// Room reserved for a new batch's payload: events of up to 1 KiB fill a
/// batch without growing it (each growth copied the payload so far into
/// fresh pages).
const BATCH_RESERVE_BYTES: usize = 1 << 20;
/// A partly filled batch is handed over after this long.
const BATCH_LINGER: Duration = Duration::from_millis(20);

/// The same Kafka error is logged at most once per this window.
const ERROR_LOG_WINDOW: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    /// librdkafka properties passed through (`--kafka-property k=v`); they win
    /// over our defaults.
    pub properties: Vec<(String, String)>,
    /// How often consumer lag is reported.
    pub stats_interval: Duration,
    /// How long a revoke waits for the tree to make the revoked shards
    /// durable (default 120 s). Past it the partitions are released
    /// uncommitted (safe: the next owner replays from the last commit and
    /// skips what storage already holds).
    pub revoke_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    #[error("creating the Kafka consumer: {}", shown(.0))]
    Create(KafkaError),
    #[error("subscribing to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
    #[error("starting the consumer thread: {0}")]
    Thread(std::io::Error),
}

/// A Kafka error as it may be printed or logged. librdkafka's
/// configuration errors carry the property's value (rdkafka's Display
/// prints it), and that may be a password: `ssl.key.password` is refused
/// by this build, value and all.
pub fn shown(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, description, key, value) => {
            let description = match value.is_empty() {
                true => description.clone(),
                false => description.replace(value.as_str(), "<redacted>"),
            };
            format!("Client config error: {description} (property {key})")
        }
        e => e.to_string(),
    }
}

/// Commands from the tree to the consumer thread.
#[derive(Debug)]
pub enum SourceCmd {
    /// Storage holds these shards up to these positions (last applied
    /// offsets): commit offset + 1.
    Commit(Vec<(Shard, Position)>),
}

/// The tree's answer to a revoke: the shards are durable and their commits
/// were queued; the consumer may release them.
pub type RevokeDone = std_mpsc::SyncSender<()>;

impl KafkaSettings {
    /// The consumer configuration: our defaults, then the pass-through
    /// properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("partition.assignment.strategy", "range")
            // A long fetch wait makes consumers crawl against small brokers
            // (DESIGN §10: ~60k msg/s at the default, ~1M at 5 ms).
            .set("fetch.wait.max.ms", "5")
            // When the tree holds input back, this thread stops polling and
            // librdkafka's prefetch queue fills; by default it then waits
            // 1 s before fetching again, and consumption stalled ~0.8 s
            // after each such pause (1M events on tansu: 382k events/s).
            .set("fetch.queue.backoff.ms", "10")
            .set(
                "statistics.interval.ms",
                self.stats_interval.as_millis().max(1).to_string(),
            )
            .set_log_level(RDKafkaLogLevel::Warning);
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }
}

/// Consumer callbacks. Runs on the consumer thread, inside `poll`.
struct Hooks {
    to_tree: mpsc::Sender<SourceMsg>,
    cmds: Mutex<std_mpsc::Receiver<SourceCmd>>,
    /// Batches not yet handed over, by (partition, topic).
    held: Mutex<Held>,
    /// The tree is gone: stop waiting for it.
    tree_gone: AtomicBool,
    lag: Arc<Mutex<BTreeMap<(String, i32), i64>>>,
    revoke_timeout: Duration,
    /// Client and consume errors repeat many times a second while the
    /// cluster is unreachable.
    errors: LogThrottle,
}

#[derive(Default)]
struct Held {
    /// Partly filled batches by (partition, topic).
    batches: BTreeMap<(Shard, Arc<str>), EventBatch>,
    /// When the oldest partial batch was started.
    since: Option<Instant>,
}

impl ClientContext for Hooks {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // Warnings and worse repeat while the cluster is unreachable.
        let loud = (level as i32) <= RDKafkaLogLevel::Warning as i32;
        let admitted = match loud {
            true => self.throttled(&format!("{level:?} {fac} {message}")),
            false => Some(0),
        };
        let Some(held_back) = admitted else {
            return;
        };
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, held_back, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(facility = fac, held_back, "librdkafka: {message}")
            }
            _ => tracing::debug!(facility = fac, held_back, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(held_back) = self.throttled(&format!("{error}: {reason}")) {
            tracing::warn!(%error, reason, held_back, "Kafka client error");
        }
    }

    fn stats(&self, stats: Statistics) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        lag.clear();
        for (topic, t) in &stats.topics {
            for (&p, part) in &t.partitions {
                // -1 (unknown) for partitions we do not consume.
                if p >= 0 && part.consumer_lag >= 0 {
                    lag.insert((topic.clone(), p), part.consumer_lag);
                }
            }
        }
        let total: i64 = lag.values().sum();
        let max = lag.iter().max_by_key(|(_, l)| **l);
        if let Some(((topic, partition), max)) = max {
            tracing::info!(
                total_lag = total,
                max_lag = max,
                topic = %topic,
                partition,
                partitions = lag.len(),
                "consumer lag"
            );
        }
    }
}

impl ConsumerContext for Hooks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let shards: BTreeSet<Shard> = tpl
            .elements()
            .iter()
            .filter_map(|e| Shard::try_from(e.partition()).ok())
            .collect();
        tracing::info!(
            ?shards,
            "partitions revoked; making them durable before release"
        );
        if self.tree_gone.load(Ordering::Relaxed) || !self.hand_over_all() {
            return;
        }
        let (done_tx, done_rx) = std_mpsc::sync_channel(1);
        let msg = SourceMsg::Revoked {
            shards: shards.iter().copied().collect(),
            done: done_tx,
        };
        if self.to_tree.blocking_send(msg).is_err() {
            self.tree_gone.store(true, Ordering::Relaxed);
            return;
        }
        match done_rx.recv_timeout(self.revoke_timeout) {
            Ok(()) => self.run_commands(consumer, CommitMode::Sync),
            Err(e) => tracing::warn!(
                error = %e,
                "revoked partitions were not made durable in time; releasing them uncommitted (the next owner replays)"
            ),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let shards: BTreeSet<Shard> = tpl
                .elements()
                .iter()
                .filter_map(|e| Shard::try_from(e.partition()).ok())
                .collect();
            tracing::info!(?shards, "partitions assigned");
            if !shards.is_empty()
                && self
                    .to_tree
                    .blocking_send(SourceMsg::Assigned(shards.into_iter().collect()))
                    .is_err()
            {
                self.tree_gone.store(true, Ordering::Relaxed);
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            // The next commit covers these offsets again; a replay is harmless.
            tracing::warn!(error = %e, partitions = offsets.count(), "offset commit failed");
        }
    }
}

impl Hooks {
    /// `Some(repeats held back)` when a warning of this text may be logged
    /// now (see [`LogThrottle`]).
    fn throttled(&self, line: &str) -> Option<u64> {
        self.errors.admit(line, Instant::now())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands every held batch to the tree, waiting for room. False when the
    /// tree is gone.
    fn hand_over_all(&self) -> bool {
        let partial = {
            let mut held = self.held();
            held.since = None;
            std::mem::take(&mut held.batches)
        };
        partial.into_values().all(|b| self.hand_over(b))
    }

    /// Hands one batch to the tree, waiting for room.
    fn hand_over(&self, batch: EventBatch) -> bool {
        if self.to_tree.blocking_send(SourceMsg::Batch(batch)).is_err() {
            self.tree_gone.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Executes the queued commit commands in one commit.
    fn run_commands(&self, consumer: &BaseConsumer<Self>, mode: CommitMode) {
        let cmds: Vec<SourceCmd> = {
            let rx = self.cmds.lock().unwrap_or_else(|p| p.into_inner());
            rx.try_iter().collect()
        };
        commit(consumer, cmds, mode);
    }
}

/// Commits offset + 1 of the latest position per topic-partition, for
/// partitions still assigned (so never for a topic no longer configured).
/// A revoke that timed out released its
/// partitions uncommitted, and the tree goes on writing them until they
/// are durable: committing those afterwards would overwrite the new
/// owner's commits, moving its offsets back (or past its restored state).
/// A revoke's own commits run before librdkafka releases the partitions.
fn commit(consumer: &BaseConsumer<Hooks>, cmds: Vec<SourceCmd>, mode: CommitMode) {
    let mut latest: BTreeMap<(Shard, Box<str>), Offset> = BTreeMap::new();
    for SourceCmd::Commit(positions) in cmds {
        for (shard, p) in positions {
            let slot = latest.entry((shard, p.stream)).or_insert(p.offset);
            *slot = (*slot).max(p.offset);
        }
    }
    if latest.is_empty() {
        return;
    }
    let assigned = match consumer.assignment() {
        Ok(tpl) => tpl,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the assignment; the next commit covers it");
            return;
        }
    };
    let mut tpl = TopicPartitionList::new();
    for ((shard, topic), offset) in &latest {
        let Ok(partition) = i32::try_from(*shard) else {
            continue;
        };
        if assigned.find_partition(topic, partition).is_none() {
            continue;
        }
        if let Err(e) = tpl.add_partition_offset(
            topic,
            partition,
            rdkafka::Offset::Offset(offset.saturating_add(1)),
        ) {
            tracing::warn!(error = %e, topic = &**topic, partition, "cannot queue an offset commit");
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(error = %e, "offset commit failed; the next one covers it");
    }
}

/// A running consumer thread.
pub struct KafkaHandle {
    pub commands: std_mpsc::Sender<SourceCmd>,
    pub thread: std::thread::JoinHandle<()>,
    /// Consumer lag per (topic, partition), from the last statistics.
    pub lag: Arc<Mutex<BTreeMap<(String, i32), i64>>>,
}

/// Creates the consumer, subscribes, and polls on a thread until `stop` is
/// set; then hands over what it holds, sends [`SourceMsg::Stopped`], and
/// keeps committing what the tree sends until the command channel closes.
pub fn start(
    settings: &KafkaSettings,
    to_tree: mpsc::Sender<SourceMsg>,
    stop: Arc<AtomicBool>,
) -> Result<KafkaHandle, KafkaSourceError> {
    let (cmd_tx, cmd_rx) = std_mpsc::channel();
    let lag = Arc::new(Mutex::new(BTreeMap::new()));
    let hooks = Hooks {
        to_tree,
        cmds: Mutex::new(cmd_rx),
        held: Mutex::new(Held::default()),
        tree_gone: AtomicBool::new(false),
        lag: lag.clone(),
        revoke_timeout: settings.revoke_timeout,
        errors: LogThrottle::new(ERROR_LOG_WINDOW),
    };
    let consumer: BaseConsumer<Hooks> = settings
        .client_config()
        .create_with_context(hooks)
        .map_err(KafkaSourceError::Create)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| KafkaSourceError::Subscribe {
            topics: settings.topics.clone(),
            source,
        })?;
    tracing::info!(
        brokers = %settings.brokers,
        group = %settings.group_id,
        topics = ?settings.topics,
        "consuming from Kafka"
    );
    let thread = std::thread::Builder::new()
        .name("kafka".into())
        .spawn(move || poll_loop(consumer, stop))
        .map_err(KafkaSourceError::Thread)?;
    Ok(KafkaHandle {
        commands: cmd_tx,
        thread,
        lag,
    })
}

fn poll_loop(consumer: BaseConsumer<Hooks>, stop: Arc<AtomicBool>) {
    let hooks = consumer.context();
    let mut topics: BTreeMap<String, Arc<str>> = BTreeMap::new();
    // The tree drops its receiver when it ends, also when it fails: then
    // nobody sets `stop`, and an idle topic would keep this loop polling
    // (and the supervisor waiting to join it) for ever.
    while !stop.load(Ordering::Relaxed)
        && !hooks.tree_gone.load(Ordering::Relaxed)
        && !hooks.to_tree.is_closed()
    {
        hooks.run_commands(&consumer, CommitMode::Async);
        match consumer.poll(Duration::from_millis(5)) {
            Some(Ok(msg)) => {
                let Ok(shard) = Shard::try_from(msg.partition()) else {
                    continue;
                };
                // Looked up by `&str`: no allocation per message.
                let topic = match topics.get(msg.topic()) {
                    Some(t) => t.clone(),
                    None => {
                        let t: Arc<str> = Arc::from(msg.topic());
                        topics.insert(msg.topic().to_string(), t.clone());
                        t
                    }
                };
                let full = {
                    let mut held = hooks.held();
                    held.since.get_or_insert_with(Instant::now);
                    let batch = held
                        .batches
                        .entry((shard, topic.clone()))
                        .or_insert_with(|| {
                            let mut b = EventBatch::with_capacity(
                                shard,
                                Box::from(&*topic),
                                BATCH_EVENTS,
                                BATCH_RESERVE_BYTES,
                            );
                            b.timestamps.reserve(BATCH_EVENTS);
                            b
                        });
                    // A tombstone (no value) is an empty event: dead-lettered.
                    // The broker's timestamp dates the event archive's objects.
                    let timestamp = msg.timestamp().to_millis().unwrap_or(NO_TIMESTAMP);
                    batch.push_at(msg.offset(), timestamp, msg.payload().unwrap_or_default());
                    if batch.len() >= BATCH_EVENTS || batch.payload.len() >= BATCH_BYTES {
                        held.batches.remove(&(shard, topic))
                    } else {
                        None
                    }
                };
                if let Some(full) = full
                    && !hooks.hand_over(full)
                {
                    break;
                }
            }
            Some(Err(e)) => {
                if let Some(held_back) = hooks.throttled(&e.to_string()) {
                    tracing::warn!(error = %e, held_back, "Kafka consume error");
                }
            }
            None => {}
        }
        let due = hooks
            .held()
            .since
            .is_some_and(|t| t.elapsed() >= BATCH_LINGER);
        if due && !hooks.hand_over_all() {
            break;
        }
    }
    // Stopping: hand over everything (the tree reads regardless of
    // backpressure while stopping), then serve commits until the tree is done.
    if !hooks.tree_gone.load(Ordering::Relaxed) && hooks.hand_over_all() {
        let _ = hooks.to_tree.blocking_send(SourceMsg::Stopped);
    }
    loop {
        let next = {
            let rx = hooks.cmds.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv_timeout(Duration::from_millis(100)).map(|first| {
                std::iter::once(first)
                    .chain(rx.try_iter())
                    .collect::<Vec<_>>()
            })
        };
        match next {
            Ok(cmds) => commit(&consumer, cmds, CommitMode::Sync),
            // Keep the group session alive while the tree drains.
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                let _ = consumer.poll(Duration::ZERO);
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Dropping the consumer leaves the group; its revoke finds the tree gone.
    hooks.tree_gone.store(true, Ordering::Relaxed);
    tracing::info!("Kafka consumer closed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaConfRes;

    #[test]
    fn a_configuration_error_never_shows_the_value() {
        let refused = KafkaError::ClientConfig(
            RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Configuration property \"ssl.key.password\" not supported in this build".into(),
            "ssl.key.password".into(),
            "k3y-s3cret".into(),
        );
        assert!(
            refused.to_string().contains("k3y-s3cret"),
            "rdkafka prints it"
        );
        let text = shown(&refused);
        assert!(!text.contains("k3y-s3cret"), "{text}");
        assert!(text.contains("(property ssl.key.password)"), "{text}");
        // librdkafka quotes the value of some properties in its description.
        let quoted = KafkaError::ClientConfig(
            RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"s3cret\" for configuration property \"sasl.password\"".into(),
            "sasl.password".into(),
            "s3cret".into(),
        );
        assert!(!shown(&quoted).contains("s3cret"), "{}", shown(&quoted));
    }
}
