//! The fold engine of the analytics service.
//!
//! Layout:
//! - [`decode`]: one raw event value → a typed [`decode::Event`] or a
//!   [`decode::Rejection`] with a reason code.
//! - [`scan`]: the fast path of decoding, a one-pass scanner for well-formed
//!   events (serde_json takes the rest).
//! - [`fold`]: product state as last-writer-wins registers and exact
//!   per-shard seller/category totals; changes out, restores in.
//! - [`archive`]: the raw event archive's objects, built from the events
//!   as they are folded.
//! - [`intern`]: 4-byte symbols for repeated strings.
//! - [`records`]: the metric record format every output shares.
//! - [`serve`]: the worker process: the fold behind a proto channel.
//! - [`generate`]: a deterministic generator of realistic events.

pub mod archive;
pub mod decode;
pub mod fold;
pub mod generate;
pub mod intern;
pub mod records;
pub mod scan;
pub mod serve;
