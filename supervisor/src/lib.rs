//! The supervisor of the analytics process tree (DESIGN §4, §5).
//!
//! Layout:
//! - [`tree`]: the loop that spawns, routes, flushes, acknowledges and
//!   restarts;
//! - [`ledger`]: what was sent but not yet made durable, per shard;
//! - [`source`]: the embedded source, a JSON-lines file or stdin;
//! - [`kafka`]: the Kafka source, a consumer in a consumer group;
//! - [`route`]: the backend's partitioner and shard → worker routing;
//! - [`spawn`]: starting a child on a private socketpair;
//! - [`restart`]: backoff and restart intensity;
//! - [`shutdown`]: SIGTERM/SIGINT as one shutdown signal;
//! - [`service`]: readiness, watchdog and status for the service manager;
//! - [`notify`]: the systemd notify protocol (`NOTIFY_SOCKET`);
//! - [`telemetry`]: the metrics and their Prometheus text format;
//! - [`throttle`]: a repeated log line at most once per window;
//! - [`endpoint`]: the HTTP endpoint serving `/metrics`, `/health`, `/ready`.

pub mod endpoint;
pub mod kafka;
pub mod ledger;
pub mod notify;
pub mod restart;
pub mod route;
pub mod service;
pub mod shutdown;
pub mod source;
pub mod spawn;
pub mod telemetry;
pub mod throttle;
pub mod tree;
