//! The wire of the analytics process tree. Nobody else encodes bytes.
//!
//! Layout:
//! - [`model`]: the values that travel between processes (product state,
//!   entity totals, positions, dead letters).
//! - [`message`]: the messages each pair of processes exchanges, with the
//!   version handshake.
//! - [`frame`]: length-prefixed bincode frames; the declared length is checked
//!   against a maximum before anything is allocated.
//! - [`channel`]: a typed, async sender/receiver pair over a Unix stream.
//! - [`child`]: the child side of the tree: adopt the inherited socket, die
//!   with the supervisor.

pub mod channel;
pub mod child;
pub mod frame;
pub mod message;
pub mod model;

pub use channel::{Receiver, Sender, handshake};
pub use frame::{FrameError, MAX_FRAME_BYTES};
pub use message::*;
pub use model::*;
