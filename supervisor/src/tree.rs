//! The process tree: one storage process and N workers, the file source, and
//! the loop that routes events, flushes, acknowledges and restarts.
//!
//! Invariants:
//! - a shard is folded by one worker (`worker_for_shard`), which receives the
//!   shard's events only after its durable state was restored;
//! - every batch stays in the [`Ledger`] until storage acknowledged a write
//!   covering it, so a replacement worker is sent it again;
//! - writes are answered in order; one not yet answered is sent again to a
//!   replacement storage process, and loads queue behind earlier writes;
//! - a worker is asked for its next flush only while fewer than
//!   [`WRITES_AHEAD_PER_WORKER`] of its writes await storage, so a slow store
//!   gets fewer, larger writes (a changed entity is written once per write,
//!   however many events changed it) instead of a growing queue of small ones.

use crate::kafka::{KafkaHandle, KafkaSettings, RevokeDone, SourceCmd};
use crate::ledger::Ledger;
use crate::restart::{Intensity, RestartPolicy, TooManyRestarts};
use crate::route::worker_for_shard;
use crate::service::{Health, Service};
use crate::shutdown::Shutdown;
use crate::source::{FileSource, SourceMsg};
use crate::spawn::spawn_child;
use proto::frame::{FrameError, encode_exact};
use proto::{
    FromStorage, FromWorker, Offset, Position, RequestId, Role, Shard, ShardChanges, ToStorage,
    ToWorker, WorkerConfig,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Unacknowledged writes a worker may have when it is asked for the next
/// flush: one being stored and one queued behind it keeps storage busy
/// while the worker answers. Without a bound, flushes every interval into a
/// store slower than that queued writes without end: 347 of ~18 events each
/// behind a DynamoDB revoke once, 87 s of writes before the partitions could
/// be released.
const WRITES_AHEAD_PER_WORKER: usize = 2;

/// Event bytes of one shard sent to its worker since the worker was last
/// asked to flush, at which it is asked. A flush answer carries each shard's
/// changes whole, in one frame of at most 64 MiB, and a dead letter carries
/// its event's bytes: without this bound 80 malformed lines of 1 MB (all
/// routed to shard 0, having no seller) made every answer too large, and the
/// worker was restarted until the run gave up.
const FLUSH_SHARD_BYTES: usize = 24 << 20;
/// While a flush is held back (the previous answer or two writes still
/// pending), reading pauses once a shard has this much unflushed: one more
/// batch (8 MiB and at most one event) keeps its answer below a frame.
const MAX_UNFLUSHED_SHARD_BYTES: usize = 32 << 20;

#[derive(Clone, Debug)]
pub struct TreeConfig {
    pub workers: usize,
    pub shards: u32,
    pub worker_program: PathBuf,
    pub worker_args: Vec<OsString>,
    pub storage_program: PathBuf,
    pub storage_args: Vec<OsString>,
    /// Environment of the storage process only (secrets stay off argv).
    pub storage_env: Vec<(OsString, OsString)>,
    pub worker: WorkerConfig,
    pub flush_interval: Duration,
    pub flush_max_events: u64,
    pub max_buffered_bytes: usize,
    pub restart: RestartPolicy,
    pub shutdown_timeout: Duration,
    pub handshake_timeout: Duration,
    /// A flush or storage request unanswered for longer than this means the
    /// pipeline is wedged: watchdog pings stop, and systemd restarts us.
    pub stall_timeout: Duration,
    /// Environment of every child (log settings).
    pub child_env: Vec<(OsString, OsString)>,
    /// Archive a metric snapshot this often while running (DESIGN §6
    /// `archive_interval`); `None`: only at the end of a clean stop.
    pub snapshot_interval: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("starting {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("handshake with {what}: {source}")]
    Handshake { what: String, source: FrameError },
    #[error("{what} did not answer the handshake within {timeout:?}")]
    HandshakeTimeout { what: String, timeout: Duration },
    #[error(transparent)]
    TooManyRestarts(#[from] TooManyRestarts),
    #[error("storage refused a write it cannot retry: {0}")]
    StorageFatal(String),
    #[error("reading the input: {0}")]
    Source(std::io::Error),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaSourceError),
    #[error(
        "shutdown did not finish within {0:?}; unacknowledged events will be redone by the next run"
    )]
    ShutdownTimeout(Duration),
}

#[derive(Debug, Default)]
pub struct RunSummary {
    /// Lines in the input (when it was read to the end).
    pub lines: Option<u64>,
    /// First line this run read (earlier ones were already durable).
    pub resumed_from: Offset,
    pub rejected: BTreeMap<String, u64>,
    pub restarts: u64,
    /// Events that moved a product into a shard from another seller, whose
    /// shard may still count it (README, "Known limits").
    pub products_moved_in: u64,
    pub snapshot: Option<String>,
    pub interrupted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Worker(usize),
    Storage,
}

impl Peer {
    /// The `process` label of its telemetry.
    fn process_name(&self) -> String {
        match self {
            Peer::Worker(i) => format!("worker-{i}"),
            Peer::Storage => "storage".to_string(),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Worker(i) => write!(f, "worker {i}"),
            Peer::Storage => f.write_str("storage"),
        }
    }
}

enum Incoming {
    Worker(FromWorker),
    Storage(FromStorage),
    /// The child's channel failed or the process exited.
    Lost(String),
}

/// A live child: frames go out through `tx`; `pid` to kill it.
struct Link {
    tx: mpsc::UnboundedSender<Arc<Vec<u8>>>,
    pid: i32,
}

impl Link {
    fn send(&self, frame: Arc<Vec<u8>>) {
        // A failed send means the child is gone; its reader reports that.
        let _ = self.tx.send(frame);
    }

    fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

struct Slot {
    link: Option<Link>,
    generation: u64,
    restart_at: Option<Instant>,
    /// Failures since the child last made progress (for backoff).
    failures: u32,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            link: None,
            generation: 0,
            restart_at: None,
            failures: 0,
        }
    }
}

struct WorkerState {
    slot: Slot,
    /// Shards whose restore is under way; their events wait in the ledger.
    restoring: BTreeSet<Shard>,
    flush_pending: bool,
    /// Shards released while the pending flush was unanswered: its answer
    /// may carry their changes from before the release, stale once the
    /// shard is loaded again, so they are dropped from it.
    released_in_flush: BTreeSet<Shard>,
    /// When the pending flush was asked for.
    flush_sent_at: Option<Instant>,
    /// A flush was asked for while one was pending: send it on the answer.
    flush_wanted: bool,
    /// Events sent to this worker process, and how many of them its last
    /// flush answer covered: the difference is its backlog.
    sent_events: u64,
    flush_mark: u64,
    answered_events: u64,
    /// Event bytes per shard sent since the last flush request.
    unflushed_bytes: BTreeMap<Shard, usize>,
    /// Event frames waiting to be sent, oldest first: after a restore, the
    /// shard's unacknowledged events, and every later batch behind them;
    /// with the events each adds to `sent_events` once sent.
    replay: VecDeque<(Shard, Arc<Vec<u8>>, u64)>,
}

struct PendingWrite {
    /// The worker whose flush answer it is.
    worker: usize,
    frame: Arc<Vec<u8>>,
    positions: Vec<(Shard, Vec<Position>)>,
    reasons: Vec<Box<str>>,
    /// Seller moves into its shards (counted once it is durable, so a
    /// replay after a crash does not count them twice).
    moved_in: u64,
    /// When it was sent to the current storage process.
    sent_at: Instant,
    /// When the flush that produced it was asked for.
    flush_started: Option<Instant>,
}

struct PendingLoad {
    frame: Arc<Vec<u8>>,
    sent_at: Instant,
    worker: usize,
    generation: u64,
    shard: Shard,
}

/// Where events come from.
pub enum Source {
    /// A JSON-lines file or stdin: every shard is ours from the start, and
    /// the run ends with the input.
    File(FileSource),
    /// Topics of a consumer group: shards come and go with the group's
    /// assignment, and the run ends only on shutdown.
    Kafka(KafkaSettings),
}

/// Runs the tree until the input is consumed and everything is durable, or
/// until shutdown is requested.
pub async fn run(
    mut cfg: TreeConfig,
    source: Source,
    shutdown: Shutdown,
    service: Service,
) -> Result<RunSummary, TreeError> {
    // Consumed events are archived (DESIGN §6); the workers build the
    // objects, storage stores them with the writes that cover them.
    cfg.worker.archive_events = matches!(source, Source::Kafka(_));
    let stream = match &source {
        Source::File(f) => f.stream.clone(),
        Source::Kafka(_) => String::new(),
    };
    let owned: BTreeSet<Shard> = match &source {
        Source::File(_) => (0..cfg.shards).collect(),
        Source::Kafka(_) => BTreeSet::new(),
    };
    let mut tree = Tree::new(cfg, stream, owned, service);
    let result = tree.run(source, shutdown).await;
    tree.service.stopping();
    // A revoke still waiting for durability is answered now (its reply
    // channel closes, and the partitions go uncommitted): the consumer
    // thread would otherwise wait out the revoke timeout (120 s) before it
    // lets go, past the shutdown timeout and systemd's.
    tree.revoking.clear();
    tree.stop_children().await;
    // The consumer commits what is still queued once the channel closes.
    if let Some(handle) = tree.kafka.take() {
        drop(handle.commands);
        let joined = tokio::task::spawn_blocking(move || handle.thread.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("the Kafka consumer thread failed");
        }
    }
    result
}

struct Tree {
    cfg: TreeConfig,
    stream: Arc<str>,
    incoming_tx: mpsc::UnboundedSender<(Peer, u64, Incoming)>,
    incoming_rx: mpsc::UnboundedReceiver<(Peer, u64, Incoming)>,
    storage: Slot,
    workers: Vec<WorkerState>,
    ledger: Ledger,
    intensity: Intensity,
    next_id: RequestId,
    writes: BTreeMap<RequestId, PendingWrite>,
    loads: BTreeMap<RequestId, PendingLoad>,
    /// Durable position of the source stream per shard, from the first loads.
    resume: BTreeMap<Shard, Offset>,
    /// Shards this instance folds: all of a file's, or the group's assignment.
    owned: BTreeSet<Shard>,
    /// Revokes waiting until their shards are durable.
    revoking: Vec<(BTreeSet<Shard>, RevokeDone)>,
    kafka: Option<KafkaHandle>,
    /// Stream names as shared strings, for the ledger.
    streams: std::collections::HashMap<Box<str>, Arc<str>>,
    /// Shards owned at the start whose first restore has not finished: the
    /// input is read once there are none. (A count was decremented again
    /// when a restarted worker restored a shard a second time, so reading
    /// could start while another shard was still loading.)
    initial_restores: BTreeSet<Shard>,
    events_since_flush: u64,
    /// Events left in the input, as a regular file's source estimates
    /// them; `None` for stdin and Kafka (no end in sight).
    events_left: Option<u64>,
    summary: RunSummary,
    snapshot_requested: Option<RequestId>,
    /// The periodic snapshot storage is taking, if any.
    periodic_snapshot: Option<RequestId>,
    /// When the final snapshot request went to the current storage process.
    snapshot_sent_at: Option<Instant>,
    /// When storage last answered anything: it serves requests in order,
    /// so an answer is progress even while older requests wait behind.
    storage_answered_at: Option<Instant>,
    events_of_last_batch: u64,
    /// The input ended or shutdown began: flush until everything is durable.
    draining: bool,
    service: Service,
}

impl Tree {
    fn new(cfg: TreeConfig, stream: String, owned: BTreeSet<Shard>, service: Service) -> Tree {
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let workers = (0..cfg.workers)
            .map(|_| WorkerState {
                slot: Slot::new(),
                restoring: BTreeSet::new(),
                flush_pending: false,
                flush_sent_at: None,
                flush_wanted: false,
                sent_events: 0,
                flush_mark: 0,
                answered_events: 0,
                unflushed_bytes: BTreeMap::new(),
                replay: VecDeque::new(),
                released_in_flush: BTreeSet::new(),
            })
            .collect();
        Tree {
            intensity: Intensity::new(cfg.restart.clone()),
            initial_restores: owned.clone(),
            owned,
            revoking: Vec::new(),
            kafka: None,
            streams: std::collections::HashMap::new(),
            cfg,
            stream: stream.into(),
            incoming_tx,
            incoming_rx,
            storage: Slot::new(),
            workers,
            ledger: Ledger::default(),
            next_id: 1,
            writes: BTreeMap::new(),
            loads: BTreeMap::new(),
            resume: BTreeMap::new(),
            events_since_flush: 0,
            events_left: None,
            summary: RunSummary::default(),
            snapshot_requested: None,
            periodic_snapshot: None,
            snapshot_sent_at: None,
            storage_answered_at: None,
            events_of_last_batch: 0,
            draining: false,
            service,
        }
    }

    /// One frame of `msg`, in a buffer of exactly its size (see
    /// [`encode_exact`]), shared by every link and queue that sends it.
    fn encode<T: serde::Serialize>(&self, msg: &T) -> Arc<Vec<u8>> {
        // Messages of the wire's own types always encode; a failure here is a
        // frame above the maximum, which chunking upstream prevents. An
        // empty frame writes nothing.
        Arc::new(encode_exact(msg).unwrap_or_else(|e| {
            tracing::error!(error = %e, "message does not encode");
            Vec::new()
        }))
    }

    fn id(&mut self) -> RequestId {
        self.next_id += 1;
        self.next_id
    }

    async fn run(
        &mut self,
        source: Source,
        mut shutdown: Shutdown,
    ) -> Result<RunSummary, TreeError> {
        // The first start goes through the restart path: a child that dies
        // while starting counts toward the restart limit like any other
        // failure, instead of failing the whole tree at once.
        let now = Instant::now();
        self.storage.restart_at = Some(now);
        for w in &mut self.workers {
            w.slot.restart_at = Some(now);
        }
        self.restart_due().await?;
        let (source_tx, mut source_rx) = mpsc::channel::<SourceMsg>(32);
        let source_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut source = match source {
            Source::File(f) => Some((f, source_tx)),
            Source::Kafka(settings) => {
                let handle = crate::kafka::start(&settings, source_tx, source_stop.clone())?;
                self.service.telemetry().set_lag_table(handle.lag.clone());
                self.kafka = Some(handle);
                None
            }
        };
        let mut source_open = true;
        let mut stopping_deadline: Option<Instant> = None;
        // How long a stopping source may take to hand over what it read (it
        // may be blocked reading stdin).
        let mut source_stop_deadline: Option<Instant> = None;
        let mut flush_tick = tokio::time::interval(self.cfg.flush_interval);
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_snapshot = self.cfg.snapshot_interval.map(|every| now + every);
        let mut paused: Option<(&'static str, Instant)> = None;
        let mut service_tick = tokio::time::interval(self.service.tick_interval());
        service_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if self.initial_restores.is_empty()
                && stopping_deadline.is_none()
                && let Some((src, tx)) = source.take()
            {
                let from = (0..self.cfg.shards)
                    .map(|s| self.resume.get(&s).map_or(0, |&o| o + 1))
                    .min()
                    .unwrap_or(0);
                self.summary.resumed_from = from;
                tracing::info!(stream = %self.stream, from_line = from + 1, "reading input");
                tracing::debug!(resume = ?self.resume, "durable positions of the input per shard");
                src.start(from, tx, source_stop.clone())
                    .map_err(TreeError::Source)?;
            }
            if !self.service.is_ready() && source.is_none() && self.children_up() {
                let what = match &self.kafka {
                    Some(_) => "Kafka consumer subscribed",
                    None => "reading the input",
                };
                self.service.up(&format!(
                    "{what}; {} workers and storage up, shards restored",
                    self.workers.len()
                ));
            }
            let finishing = !source_open || stopping_deadline.is_some();
            if finishing && !self.draining {
                self.draining = true;
                self.flush();
            }
            if finishing && self.is_quiet() {
                match (self.snapshot_requested, &self.summary.snapshot) {
                    (None, _) => {
                        let id = self.id();
                        let frame = self.encode(&ToStorage::Snapshot { id });
                        self.snapshot_requested = Some(id);
                        if let Some(l) = &self.storage.link {
                            l.send(frame);
                            self.snapshot_sent_at = Some(Instant::now());
                        }
                        return_free_memory();
                    }
                    (Some(_), Some(_)) => return Ok(std::mem::take(&mut self.summary)),
                    (Some(_), None) => {}
                }
            }
            if !self.revoking.is_empty() {
                self.finish_revokes();
            }
            let next_restart = self.next_restart();
            // While stopping, the source hands over its last partial batches
            // regardless of backpressure (a bounded amount).
            let held_back = if stopping_deadline.is_some() {
                None
            } else {
                self.held_back()
            };
            let may_read = source_open && source.is_none() && held_back.is_none();
            if source_open && source.is_none() {
                paused = log_pause(paused, held_back, &self.ledger);
            }
            tokio::select! {
                _ = shutdown.requested(), if stopping_deadline.is_none() => {
                    self.service.stopping();
                    stopping_deadline = Some(Instant::now() + self.cfg.shutdown_timeout);
                    self.summary.interrupted = source_open;
                    source_stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    if source.is_some() {
                        source_open = false; // never started
                    }
                    source_stop_deadline = Some(Instant::now() + Duration::from_secs(1));
                    self.flush();
                }
                msg = source_rx.recv(), if may_read => match msg {
                    Some(SourceMsg::Batch(batch)) => self.on_batch(batch),
                    Some(SourceMsg::End { lines }) => {
                        self.summary.lines = Some(lines);
                        source_open = false;
                        self.flush();
                    }
                    Some(SourceMsg::Stopped) | None => {
                        source_open = false;
                        self.flush();
                    }
                    Some(SourceMsg::Remaining { events }) => self.events_left = events,
                    Some(SourceMsg::Failed(e)) => return Err(TreeError::Source(e)),
                    Some(SourceMsg::Assigned(shards)) => self.assign(shards),
                    Some(SourceMsg::Revoked { shards, done }) => {
                        self.revoking.push((shards.into_iter().collect(), done));
                        self.flush();
                        self.finish_revokes();
                    }
                },
                _ = sleep_until(source_stop_deadline), if source_open && source_stop_deadline.is_some() => {
                    tracing::warn!("the input did not stop within 1 s; what it still held is read again next run");
                    source_rx.close();
                    source_open = false;
                }
                Some((peer, generation, msg)) = self.incoming_rx.recv() => self.on_incoming(peer, generation, msg)?,
                _ = flush_tick.tick() => {
                    tracing::debug!(
                        buffered_bytes = self.ledger.buffered_bytes(),
                        writes = self.writes.len(),
                        loads = self.loads.len(),
                        flushes = self.workers.iter().filter(|w| w.flush_pending).count(),
                        "flush tick"
                    );
                    self.flush()
                }
                _ = sleep_until(next_restart), if next_restart.is_some() => self.restart_due().await?,
                _ = sleep_until(next_snapshot), if next_snapshot.is_some() && !finishing => {
                    next_snapshot = self.cfg.snapshot_interval.map(|every| Instant::now() + every);
                    self.periodic_snapshot();
                }
                _ = service_tick.tick() => {
                    self.service.telemetry().set_buffered_bytes(self.ledger.buffered_bytes());
                    let health = Health {
                        stall: self.stall(Instant::now()),
                        restarts: self.intensity.total,
                    };
                    self.service.tick(health);
                }
                _ = sleep_until(stopping_deadline), if stopping_deadline.is_some() => {
                    return Err(TreeError::ShutdownTimeout(self.cfg.shutdown_timeout));
                }
            }
        }
    }

    /// Asks storage for a metric snapshot, unless one is still being taken
    /// (a slow store must not pile them up) or storage is down (the next
    /// interval tries again).
    fn periodic_snapshot(&mut self) {
        if self.periodic_snapshot.is_some() || self.storage.link.is_none() {
            tracing::info!("skipping a periodic metric snapshot: storage is busy with one or down");
            return;
        }
        let id = self.id();
        let frame = self.encode(&ToStorage::Snapshot { id });
        if let Some(l) = &self.storage.link {
            l.send(frame);
        }
        self.periodic_snapshot = Some(id);
    }

    /// Why the input must not be read now, if it must not: backpressure.
    fn held_back(&self) -> Option<&'static str> {
        if self.ledger.buffered_bytes() >= self.cfg.max_buffered_bytes {
            Some("unacknowledged input at --max-buffered-mb")
        } else if self.workers_behind() {
            Some("a worker is two flushes behind")
        } else if self.shard_unflushed_full() {
            Some("a shard's unflushed events at the frame bound")
        } else {
            None
        }
    }

    /// Some worker has more unreported events than two flushes' worth: stop
    /// reading until it catches up, so that flush answers (and with them
    /// storage writes) keep flowing while it folds.
    fn workers_behind(&self) -> bool {
        let cap = 2 * self.cfg.flush_max_events;
        self.workers
            .iter()
            .any(|w| w.slot.link.is_some() && w.sent_events - w.answered_events >= cap)
    }

    /// Some shard holds so many unflushed event bytes that one more batch
    /// could make its changes too large for a frame: stop reading until its
    /// worker is asked to flush.
    fn shard_unflushed_full(&self) -> bool {
        self.workers.iter().any(|w| {
            w.unflushed_bytes
                .values()
                .any(|&b| b >= MAX_UNFLUSHED_SHARD_BYTES)
        })
    }

    /// Storage and every worker run (shook hands), and the shards owned at
    /// the start are restored.
    fn children_up(&self) -> bool {
        self.initial_restores.is_empty()
            && self.storage.link.is_some()
            && self.workers.iter().all(|w| w.slot.link.is_some())
    }

    /// Why the pipeline is wedged, if it is: a live worker that has not
    /// answered a flush, or a live storage process that has not answered a
    /// request, within `stall_timeout`. A child that died is not a stall
    /// (it is restarted, and too many restarts end the run).
    fn stall(&self, now: Instant) -> Option<String> {
        let bound = self.cfg.stall_timeout;
        let late = |t: Instant| now.saturating_duration_since(t) > bound;
        for (i, w) in self.workers.iter().enumerate() {
            if w.slot.link.is_some() && w.flush_sent_at.is_some_and(late) {
                return Some(format!(
                    "worker {i} has not answered a flush for over {bound:?}"
                ));
            }
        }
        if self.storage.link.is_some() {
            let oldest = self
                .writes
                .values()
                .map(|w| w.sent_at)
                .chain(self.loads.values().map(|l| l.sent_at))
                .chain(
                    self.snapshot_sent_at
                        .filter(|_| self.summary.snapshot.is_none()),
                )
                .min();
            // Not while it answers others: a large assignment's loads, or
            // writes queued behind a long one, wait longer than the bound
            // with storage busy on them all along.
            if oldest.is_some_and(late) && self.storage_answered_at.is_none_or(late) {
                return Some(format!(
                    "storage has not answered a request for over {bound:?}"
                ));
            }
        }
        None
    }

    /// Nothing in flight: every event acknowledged, every child idle.
    fn is_quiet(&self) -> bool {
        self.ledger.is_drained()
            && self.writes.is_empty()
            && self.loads.is_empty()
            && self.storage.link.is_some()
            && self
                .workers
                .iter()
                .all(|w| w.slot.link.is_some() && !w.flush_pending && w.restoring.is_empty())
    }

    fn next_restart(&self) -> Option<Instant> {
        std::iter::once(&self.storage)
            .chain(self.workers.iter().map(|w| &w.slot))
            .filter_map(|s| s.restart_at)
            .min()
    }

    /// Restarts children whose backoff is over. A child that fails to start
    /// counts as one more failure (so the intensity limit still applies).
    async fn restart_due(&mut self) -> Result<(), TreeError> {
        let now = Instant::now();
        if self.storage.restart_at.is_some_and(|t| t <= now)
            && let Err(e) = self.start_storage().await
        {
            self.storage.link = None;
            self.schedule_restart(Peer::Storage, -1, &e.to_string())?;
        }
        for i in 0..self.workers.len() {
            if self.workers[i].slot.restart_at.is_some_and(|t| t <= now)
                && let Err(e) = self.start_worker(i).await
            {
                self.workers[i].slot.link = None;
                self.workers[i].restoring.clear();
                self.schedule_restart(Peer::Worker(i), -1, &e.to_string())?;
            }
        }
        Ok(())
    }

    fn on_batch(&mut self, batch: proto::EventBatch) {
        let shard = batch.shard;
        let last = batch.upto;
        if !self.owned.contains(&shard) {
            // Read before a revoke took the shard away: the next owner reads
            // it again from the committed offset.
            return;
        }
        let stream = match self.streams.get(&batch.stream) {
            Some(s) => s.clone(),
            None => {
                let s: Arc<str> = Arc::from(&*batch.stream);
                self.streams.insert(batch.stream.clone(), s.clone());
                s
            }
        };
        self.events_of_last_batch = batch.len() as u64;
        self.events_since_flush += batch.len() as u64;
        let events = self.events_of_last_batch;
        self.service.telemetry().events_consumed(events);
        let payload = batch.payload.len();
        let frame = self.encode(&ToWorker::Events(batch));
        self.ledger.push(shard, stream, last, events, frame.clone());
        let i = worker_for_shard(shard, self.cfg.workers);
        let hold = self.holding_for_flush(i);
        let w = &mut self.workers[i];
        if let Some(link) = &w.slot.link
            && !w.restoring.contains(&shard)
        {
            if w.replay.is_empty() && !hold {
                link.send(frame);
                w.sent_events += events;
                *w.unflushed_bytes.entry(shard).or_default() += payload;
            } else {
                w.replay.push_back((shard, frame, events));
                self.send_replay(i);
            }
        }
        let w = &self.workers[i];
        let shard_full = w
            .unflushed_bytes
            .get(&shard)
            .is_some_and(|&b| b >= FLUSH_SHARD_BYTES);
        if shard_full
            || self.events_since_flush >= self.window_events()
            || self.ledger.buffered_bytes() >= self.cfg.max_buffered_bytes / 2
        {
            self.flush();
        }
    }

    /// Events per flush window: `--flush-max-events`, but near the end of a
    /// file no more than is left (and at least an eighth of the maximum),
    /// so the last windows shrink, storage writes them while the workers
    /// fold the rest, and the one it writes after they are done is small.
    /// With 200k-event windows to the end, writing the last took 0.25–0.35
    /// s of a 1.7 s run, the workers idle.
    fn window_events(&self) -> u64 {
        let max = self.cfg.flush_max_events;
        self.events_left
            .map_or(max, |left| left.clamp((max / 8).max(1), max))
    }

    /// Near the end of a file (less than a window left), a worker's frames
    /// wait in its queue while a flush it was asked for cannot be sent
    /// because the previous one is not answered yet: the cut then lands
    /// where it was asked for, not wherever reading had got to when the
    /// pending flush was answered, which could make the last window the
    /// whole read-ahead. Not while the flush waits for storage (writes
    /// ahead) or a restore: the worker would sit idle meanwhile.
    fn holding_for_flush(&self, i: usize) -> bool {
        let w = &self.workers[i];
        w.flush_wanted
            && w.flush_pending
            && self
                .events_left
                .is_some_and(|left| left < self.cfg.flush_max_events)
    }

    /// The group gave us shards: each is restored by its worker before its
    /// events are sent (they wait in the ledger meanwhile).
    fn assign(&mut self, shards: Vec<Shard>) {
        for shard in shards {
            // A revoke of it that has not finished (storage was slow, and the
            // consumer released the partition uncommitted after waiting) is
            // void now. Finishing it later would drop a shard the group
            // gave back to us, and every batch of it after that. What we
            // hold of it may be stale (another member may have written it
            // meanwhile), so it is released and loaded afresh, unless a
            // load of it is under way already.
            let revoked = self
                .revoking
                .iter_mut()
                .fold(false, |found, (set, _)| set.remove(&shard) || found);
            let i = worker_for_shard(shard, self.cfg.workers);
            if revoked && !self.workers[i].restoring.contains(&shard) {
                tracing::info!(shard, "partition assigned again before its revoke finished");
                self.release(shard);
            }
            if !self.owned.insert(shard) {
                continue;
            }
            if self.workers[i].slot.link.is_some() {
                self.load(i, shard);
            }
            // Otherwise the worker loads it when it (re)starts.
        }
    }

    /// Asks storage for a shard's durable state on behalf of worker `i`.
    fn load(&mut self, i: usize, shard: Shard) {
        let generation = self.workers[i].slot.generation;
        self.workers[i].restoring.insert(shard);
        let id = self.id();
        let frame = self.encode(&ToStorage::Load { id, shard });
        if let Some(l) = &self.storage.link {
            l.send(frame.clone());
        }
        self.loads.insert(
            id,
            PendingLoad {
                frame,
                sent_at: Instant::now(),
                worker: i,
                generation,
                shard,
            },
        );
    }

    /// Answers the revokes whose shards are durable (nothing unacknowledged,
    /// nothing restoring), after dropping the shards here and in the worker.
    fn finish_revokes(&mut self) {
        let mut k = 0;
        while k < self.revoking.len() {
            let durable = self.revoking[k].0.iter().all(|&s| {
                self.ledger.pending(s).next().is_none()
                    && !self.workers[worker_for_shard(s, self.cfg.workers)]
                        .restoring
                        .contains(&s)
            });
            if !durable {
                k += 1;
                continue;
            }
            let (shards, done) = self.revoking.remove(k);
            for shard in shards {
                self.release(shard);
            }
            // The consumer thread waits on this; it may have timed out.
            let _ = done.send(());
        }
    }

    /// Drops a shard here and in its worker, with its frames still queued
    /// for the worker: sent after a later restore of the shard, they would
    /// move its position past events the restore does not hold.
    fn release(&mut self, shard: Shard) {
        self.owned.remove(&shard);
        self.ledger.forget(shard);
        let frame = self.encode(&ToWorker::Release { shard });
        let w = &mut self.workers[worker_for_shard(shard, self.cfg.workers)];
        w.replay.retain(|(s, _, _)| *s != shard);
        w.unflushed_bytes.remove(&shard);
        if w.flush_pending {
            w.released_in_flush.insert(shard);
        }
        if let Some(l) = &w.slot.link {
            l.send(frame);
        }
    }

    /// Tells the Kafka consumer what storage now holds (it commits only
    /// what is assigned to it: not a topic no longer configured, which a
    /// write still carries since it carries every stream its shard saw).
    fn queue_commits<'a>(&self, acked: impl Iterator<Item = (Shard, &'a [Position])>) {
        let Some(kafka) = &self.kafka else {
            return;
        };
        let positions: Vec<(Shard, Position)> = acked
            .flat_map(|(s, ps)| ps.iter().map(move |p| (s, p.clone())))
            .collect();
        if !positions.is_empty() {
            let _ = kafka.commands.send(SourceCmd::Commit(positions));
        }
    }

    /// Asks every ready worker for its changes.
    /// Asks every worker for its changes; a worker still answering the
    /// previous flush is asked as soon as it answers.
    fn flush(&mut self) {
        self.events_since_flush = 0;
        for i in 0..self.workers.len() {
            self.workers[i].flush_wanted = true;
            self.send_flush(i);
            self.send_replay(i); // what waited for the flush to be sent
        }
    }

    /// Sends a worker its queued event frames, oldest first. Before a frame
    /// that would take a shard past `MAX_UNFLUSHED_SHARD_BYTES` since the
    /// last flush request, it asks for a flush, and waits for the answer if
    /// one is pending: a restarted worker's replay can hold far more than one
    /// answer may carry.
    fn send_replay(&mut self, i: usize) {
        if self.holding_for_flush(i) {
            self.send_flush(i); // it may go now (after a restore, say)
            if self.holding_for_flush(i) {
                return; // called again once the flush is sent
            }
        }
        while let Some((shard, bytes)) = self.workers[i]
            .replay
            .front()
            .map(|(s, f, _)| (*s, f.len()))
        {
            let unflushed = |w: &WorkerState| w.unflushed_bytes.get(&shard).copied().unwrap_or(0);
            if unflushed(&self.workers[i]) > 0
                && unflushed(&self.workers[i]) + bytes > MAX_UNFLUSHED_SHARD_BYTES
            {
                self.workers[i].flush_wanted = true;
                self.send_flush(i);
                if unflushed(&self.workers[i]) > 0 {
                    return; // held back: called again when it can go
                }
            }
            let w = &mut self.workers[i];
            let Some(link) = &w.slot.link else {
                return; // lost: its successor's restores queue the frames again
            };
            if let Some((_, frame, events)) = w.replay.pop_front() {
                link.send(frame);
                w.sent_events += events;
                *w.unflushed_bytes.entry(shard).or_default() += bytes;
            }
        }
    }

    fn send_flush(&mut self, i: usize) {
        let w = &self.workers[i];
        if !w.flush_wanted
            || w.slot.link.is_none()
            || w.flush_pending
            || !w.restoring.is_empty()
            || self.writes.values().filter(|w| w.worker == i).count() >= WRITES_AHEAD_PER_WORKER
        {
            return; // asked again when the answer or a write's ack comes
        }
        let id = self.id();
        let frame = self.encode(&ToWorker::Flush { id });
        let w = &mut self.workers[i];
        w.flush_pending = true;
        w.flush_sent_at = Some(Instant::now());
        w.flush_wanted = false;
        w.flush_mark = w.sent_events;
        w.unflushed_bytes.clear();
        if let Some(l) = &w.slot.link {
            l.send(frame);
        }
    }

    fn on_incoming(&mut self, peer: Peer, generation: u64, msg: Incoming) -> Result<(), TreeError> {
        let current = match peer {
            Peer::Storage => self.storage.generation,
            Peer::Worker(i) => self.workers[i].slot.generation,
        };
        if generation != current {
            return Ok(()); // from a child already replaced
        }
        match (peer, msg) {
            (_, Incoming::Lost(why)) => self.child_lost(peer, &why),
            (
                Peer::Worker(i),
                Incoming::Worker(FromWorker::Changes {
                    mut shards, more, ..
                }),
            ) => {
                // The states travel on as bytes: malformed ones would reach
                // the store and break every later restore of the shard.
                if let Some(e) = shards.iter().find_map(|c| c.products.check().err()) {
                    return self.child_lost(peer, &format!("sent malformed product states: {e}"));
                }
                let w = &mut self.workers[i];
                w.slot.failures = 0;
                let started = w.flush_sent_at;
                shards.retain(|c| !w.released_in_flush.contains(&c.shard));
                // Each part is written on its own; the last ends the flush.
                if !more {
                    w.flush_pending = false;
                    w.flush_sent_at = None;
                    w.answered_events = w.flush_mark;
                    w.released_in_flush.clear();
                }
                self.write(i, shards, started);
                if !more {
                    self.send_flush(i);
                    self.send_replay(i);
                }
                Ok(())
            }
            (Peer::Storage, Incoming::Storage(msg)) => self.on_storage(msg),
            (peer, _) => self.child_lost(peer, "sent a message meant for another role"),
        }
    }

    fn write(&mut self, worker: usize, changes: Vec<ShardChanges>, flush_started: Option<Instant>) {
        if changes.is_empty() {
            return;
        }
        let id = self.id();
        let positions = changes
            .iter()
            .map(|c| (c.shard, c.positions.clone()))
            .collect();
        let reasons = changes
            .iter()
            .flat_map(|c| c.dead_letters.iter().map(|d| d.reason.clone()))
            .collect();
        let moved_in = changes.iter().map(|c| c.moved_in).sum();
        let frame = self.encode(&ToStorage::Write { id, changes });
        if let Some(l) = &self.storage.link {
            l.send(frame.clone());
        }
        self.writes.insert(
            id,
            PendingWrite {
                worker,
                frame,
                positions,
                reasons,
                moved_in,
                sent_at: Instant::now(),
                flush_started,
            },
        );
        self.service
            .telemetry()
            .set_writes_pending(self.writes.len());
    }

    fn on_storage(&mut self, msg: FromStorage) -> Result<(), TreeError> {
        self.storage_answered_at = Some(Instant::now());
        match msg {
            FromStorage::Written { id, report } => {
                let telemetry = self.service.telemetry().clone();
                let removed = self.writes.remove(&id);
                telemetry.set_writes_pending(self.writes.len());
                if let Some(w) = removed {
                    telemetry.write_acknowledged(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64),
                    );
                    let mut acked = 0;
                    for (shard, positions) in &w.positions {
                        acked += self.ledger.ack(*shard, positions);
                    }
                    self.queue_commits(w.positions.iter().map(|(s, p)| (*s, p.as_slice())));
                    telemetry.events_applied(acked.saturating_sub(w.reasons.len() as u64));
                    for r in w.reasons {
                        telemetry.event_rejected(&r);
                        *self.summary.rejected.entry(r.to_string()).or_default() += 1;
                    }
                    telemetry.products_moved_in(w.moved_in);
                    self.summary.products_moved_in += w.moved_in;
                    if let Some(t) = w.flush_started {
                        telemetry.flush_completed(t.elapsed());
                    }
                }
                telemetry.dead_letters_written(report.dead_letters);
                telemetry.storage_retries(report.retries);
                telemetry.storage_throttles(report.throttles);
                telemetry.storage_requests(&report.requests);
                self.storage.failures = 0;
                if self.draining && self.writes.is_empty() && !self.ledger.is_drained() {
                    self.flush();
                }
                for i in 0..self.workers.len() {
                    self.send_flush(i); // a flush held back by the bound
                    self.send_replay(i);
                }
                self.finish_revokes();
            }
            FromStorage::Loaded { id, state } => {
                let Some(load) = self.loads.get(&id) else {
                    return Ok(());
                };
                let (worker, generation, shard, last) =
                    (load.worker, load.generation, load.shard, state.last);
                if last {
                    self.loads.remove(&id);
                }
                self.ledger.ack(shard, &state.positions);
                if let Some(p) = state.positions.iter().find(|p| *p.stream == *self.stream) {
                    self.resume.insert(shard, p.offset);
                }
                let w = &self.workers[worker];
                if w.slot.generation != generation {
                    return Ok(()); // that worker died meanwhile; its successor loads again
                }
                if !self.owned.contains(&shard) {
                    self.workers[worker].restoring.remove(&shard);
                    return Ok(()); // revoked while loading
                }
                let frame = self.encode(&ToWorker::Restore(state));
                let w = &mut self.workers[worker];
                let Some(link) = &w.slot.link else {
                    return Ok(());
                };
                link.send(frame);
                if last {
                    w.restoring.remove(&shard);
                    // Not counted as sent (see `start_worker`).
                    w.replay
                        .extend(self.ledger.pending(shard).map(|f| (shard, f.clone(), 0)));
                    self.initial_restores.remove(&shard);
                    self.send_replay(worker);
                }
            }
            FromStorage::Snapshotted { id, key } if self.periodic_snapshot == Some(id) => {
                tracing::info!(key = %key, "periodic metric snapshot archived");
                self.periodic_snapshot = None;
            }
            FromStorage::Snapshotted { key, .. } => {
                tracing::info!(key = %key, "metric snapshot archived");
                self.summary.snapshot = Some(key);
            }
            FromStorage::Failed {
                id,
                error,
                retryable,
            } => {
                if !retryable {
                    return Err(TreeError::StorageFatal(error));
                }
                // Storage could not write now: restart it, which resends
                // every unanswered request in order, after a backoff.
                self.service.telemetry().storage_retries(1);
                tracing::warn!(request = id, error = %error, "storage write failed; retrying");
                return self.child_lost(Peer::Storage, &format!("request failed: {error}"));
            }
        }
        Ok(())
    }

    /// A child died or broke the protocol: kill it and schedule its restart.
    fn child_lost(&mut self, peer: Peer, why: &str) -> Result<(), TreeError> {
        let slot = match peer {
            Peer::Storage => &mut self.storage,
            Peer::Worker(i) => {
                let w = &mut self.workers[i];
                w.flush_pending = false;
                w.flush_sent_at = None;
                w.restoring.clear();
                &mut w.slot
            }
        };
        let Some(link) = slot.link.take() else {
            return Ok(());
        };
        link.kill();
        self.service.telemetry().child_gone(&peer.process_name());
        self.schedule_restart(peer, link.pid, why)
    }

    fn schedule_restart(&mut self, peer: Peer, pid: i32, why: &str) -> Result<(), TreeError> {
        let slot = match peer {
            Peer::Storage => &mut self.storage,
            Peer::Worker(i) => &mut self.workers[i].slot,
        };
        let delay = self
            .intensity
            .on_failure(std::time::Instant::now(), slot.failures)?;
        slot.failures += 1;
        slot.restart_at = Some(Instant::now() + delay);
        self.summary.restarts = self.intensity.total;
        match peer {
            Peer::Worker(_) => self.service.telemetry().worker_restarted(),
            Peer::Storage => self.service.telemetry().storage_restarted(),
        }
        tracing::warn!(peer = %peer, pid, reason = why, restart_in_ms = delay.as_millis() as u64, "child lost");
        Ok(())
    }

    async fn start_storage(&mut self) -> Result<(), TreeError> {
        let link = self
            .start_child(
                Peer::Storage,
                self.cfg.storage_program.clone(),
                self.cfg.storage_args.clone(),
                Role::Storage,
            )
            .await?;
        // Unanswered requests, in their original order (a write with the
        // same archive objects, so the same object names).
        let mut resend: Vec<(RequestId, Arc<Vec<u8>>)> = self
            .writes
            .iter()
            .map(|(&id, w)| (id, w.frame.clone()))
            .collect();
        resend.extend(self.loads.iter().map(|(&id, l)| (id, l.frame.clone())));
        resend.sort_by_key(|(id, _)| *id);
        for (_, frame) in resend {
            link.send(frame);
        }
        // A periodic snapshot died with the old process; the next interval
        // takes one.
        self.periodic_snapshot = None;
        // The new process has had no time to answer them yet.
        let now = Instant::now();
        self.writes.values_mut().for_each(|w| w.sent_at = now);
        self.loads.values_mut().for_each(|l| l.sent_at = now);
        if let Some(id) = self
            .snapshot_requested
            .filter(|_| self.summary.snapshot.is_none())
        {
            let frame = self.encode(&ToStorage::Snapshot { id });
            link.send(frame);
            self.snapshot_sent_at = Some(now);
        }
        self.storage.link = Some(link);
        Ok(())
    }

    async fn start_worker(&mut self, i: usize) -> Result<(), TreeError> {
        let link = self
            .start_child(
                Peer::Worker(i),
                self.cfg.worker_program.clone(),
                self.cfg.worker_args.clone(),
                Role::Worker,
            )
            .await?;
        link.send(self.encode(&ToWorker::Configure(self.cfg.worker.clone())));
        let w = &mut self.workers[i];
        w.slot.link = Some(link);
        // A new process: nothing sent to it yet (replays after its restore
        // are not counted; the ledger bounds them).
        (w.sent_events, w.flush_mark, w.answered_events) = (0, 0, 0);
        w.unflushed_bytes.clear();
        w.released_in_flush.clear();
        w.replay.clear(); // queued again from the ledger after each restore
        let shards: Vec<Shard> = self
            .owned
            .iter()
            .copied()
            .filter(|&s| worker_for_shard(s, self.cfg.workers) == i)
            .collect();
        for shard in shards {
            self.load(i, shard);
        }
        Ok(())
    }

    /// Spawns a child, shakes hands, and starts its reader, writer and exit
    /// watcher tasks. Bumps the slot's generation.
    async fn start_child(
        &mut self,
        peer: Peer,
        program: PathBuf,
        args: Vec<OsString>,
        role: Role,
    ) -> Result<Link, TreeError> {
        let slot = match peer {
            Peer::Storage => &mut self.storage,
            Peer::Worker(i) => &mut self.workers[i].slot,
        };
        slot.generation += 1;
        slot.restart_at = None;
        let generation = slot.generation;
        let what = peer.to_string();
        let mut envs = self.cfg.child_env.clone();
        if peer == Peer::Storage {
            envs.extend(self.cfg.storage_env.iter().cloned());
        }
        let spawned = spawn_child(&program, &args, &envs).map_err(|source| TreeError::Spawn {
            what: what.clone(),
            source,
        })?;
        let pid = spawned.pid;
        let timeout = self.cfg.handshake_timeout;
        let incoming = self.incoming_tx.clone();
        let (tx, rx) = mpsc::unbounded_channel::<Arc<Vec<u8>>>();
        let link_io = (
            spawned.stream,
            what.clone(),
            timeout,
            rx,
            peer,
            generation,
            incoming.clone(),
        );
        match role {
            Role::Worker => {
                connect::<ToWorker, FromWorker>(link_io, Role::Worker, Incoming::Worker).await?
            }
            _ => {
                connect::<ToStorage, FromStorage>(link_io, Role::Storage, Incoming::Storage).await?
            }
        }
        let mut child = spawned.child;
        tokio::spawn(async move {
            let status = child.wait().await;
            let why = match status {
                Ok(s) => format!("process exited ({s})"),
                Err(e) => format!("waiting for the process failed: {e}"),
            };
            let _ = incoming.send((peer, generation, Incoming::Lost(why)));
        });
        tracing::info!(peer = %peer, pid, "child started");
        self.service
            .telemetry()
            .child_started(peer.process_name(), pid);
        Ok(Link { tx, pid })
    }

    /// Closes every channel (children exit on end of stream) and waits a
    /// little for them; anything left is killed.
    async fn stop_children(&mut self) {
        let links: Vec<Link> = std::iter::once(&mut self.storage)
            .chain(self.workers.iter_mut().map(|w| &mut w.slot))
            .filter_map(|s| s.link.take())
            .collect();
        let pids: Vec<i32> = links.iter().map(|l| l.pid).collect();
        drop(links);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
            // Short: every run's end waits on it (a 20 ms poll added ~10 ms
            // to each).
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for p in pids.into_iter().filter(|&p| alive(p)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

type LinkIo = (
    tokio::net::UnixStream,
    String,
    Duration,
    mpsc::UnboundedReceiver<Arc<Vec<u8>>>,
    Peer,
    u64,
    mpsc::UnboundedSender<(Peer, u64, Incoming)>,
);

/// Shakes hands with a fresh child and starts its writer and reader tasks.
async fn connect<Out, In>(io: LinkIo, role: Role, wrap: fn(In) -> Incoming) -> Result<(), TreeError>
where
    Out: serde::Serialize + Send + 'static,
    In: serde::de::DeserializeOwned + Send + 'static,
{
    let (stream, what, timeout, rx, peer, generation, incoming) = io;
    let hs = proto::handshake::<Out, In>(stream, Role::Supervisor, role);
    let (sender, receiver, _) = tokio::time::timeout(timeout, hs)
        .await
        .map_err(|_| TreeError::HandshakeTimeout {
            what: what.clone(),
            timeout,
        })?
        .map_err(|source| TreeError::Handshake { what, source })?;
    tokio::spawn(pump_out(sender, rx));
    tokio::spawn(pump_in(receiver, peer, generation, incoming, wrap));
    Ok(())
}

fn alive(pid: i32) -> bool {
    // A zombie is reaped by its watcher task; signal 0 tells if it exists.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Logs (at debug) when reading the input pauses, why, and for how long:
/// where a run waits.
fn log_pause(
    paused: Option<(&'static str, Instant)>,
    now_held_back: Option<&'static str>,
    ledger: &Ledger,
) -> Option<(&'static str, Instant)> {
    match (paused, now_held_back) {
        (None, Some(why)) => {
            tracing::debug!(
                why,
                buffered_bytes = ledger.buffered_bytes(),
                "reading paused"
            );
            Some((why, Instant::now()))
        }
        (Some((why, since)), None) => {
            tracing::debug!(
                why,
                paused_ms = since.elapsed().as_millis() as u64,
                "reading resumed"
            );
            None
        }
        (still, _) => still,
    }
}

/// Gives the heap's free pages back to the system. Called once the input
/// is all acknowledged, while storage takes the final snapshot: the
/// buffered input's pages (hundreds of MiB) are then unmapped on this
/// otherwise idle process's core, not by the kernel after the run's exit,
/// which took ~40 ms that every run waited for.
fn return_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory the allocator holds free; it
    // is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn pump_out<T>(mut sender: proto::Sender<T>, mut rx: mpsc::UnboundedReceiver<Arc<Vec<u8>>>) {
    while let Some(frame) = rx.recv().await {
        if sender.send_encoded(&frame).await.is_err() {
            return;
        }
    }
}

async fn pump_in<T: serde::de::DeserializeOwned>(
    mut receiver: proto::Receiver<T>,
    peer: Peer,
    generation: u64,
    incoming: mpsc::UnboundedSender<(Peer, u64, Incoming)>,
    wrap: fn(T) -> Incoming,
) {
    loop {
        match receiver.recv().await {
            Ok(msg) => {
                if incoming.send((peer, generation, wrap(msg))).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = incoming.send((peer, generation, Incoming::Lost(format!("channel: {e}"))));
                return;
            }
        }
    }
}
