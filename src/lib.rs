//! The analytics service: CLI, configuration, storage process, embedded store.
//!
//! Layout:
//! - [`store`]: the embedded store, one redb file with the DynamoDB item model
//!   (metric items with TTL) and the service's own durable state.
//! - [`backend`]: the configured store, embedded or AWS, behind one API.
//! - [`storage`]: the storage process, serving the supervisor's load, write
//!   and snapshot requests over the proto channel.
//! - [`archive`]: the archive's keys and format (metric snapshots, raw
//!   event ranges; gzip JSON lines), and the archive directory that holds
//!   them in embedded mode.
//! - [`dlq`]: the dead-letter topic of the Kafka mode.
//! - [`produce`]: `analytics produce`, publishing a file as the catalogue does.
//! - [`query`]: `analytics query` and `analytics export` output.
//! - [`logging`]: log format, level and child tagging for every process.
//! - [`daily_parts`]: each shard's contribution to an entity at the end of
//!   each day, which both stores sum into exact `DAY#` items.
//! - [`aws_store`]: the same store on DynamoDB and S3 (DESIGN §5, §6): state
//!   as a checkpoint log in S3 committed by a conditional pointer, entity
//!   items summed from per-shard parts.

pub mod archive;
pub mod aws_store;
pub mod backend;
pub mod config;
pub mod daily_parts;
pub mod dlq;
pub mod logging;
pub mod produce;
pub mod query;
pub mod storage;
pub mod store;
