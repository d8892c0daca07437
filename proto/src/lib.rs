//! # crowdsurf-proto
//!
//! The shared language of crowdsurf, a peer-to-peer live-streaming system: everything two nodes must
//! agree on, and nothing that touches a socket, a clock or a global random number generator.
//!
//! - [`keys`]: stream keys and node keys (ed25519), and the ids derived from them.
//! - [`chunk`]: the signed chunk. A [`chunk::Received`] chunk must be verified into a
//!   [`chunk::Verified`] one before it can be stored, relayed or played; the types make the mistake of
//!   skipping that step impossible to compile.
//! - [`ticket`]: the short string a viewer pastes to join a stream.
//! - [`wire`]: the control-stream messages and their codec, with explicit size limits.
//! - [`window`]: the sliding window of recent sequence numbers and its compact buffer map.
//! - [`swarm`]: the swarm state machine (membership, push trees, pull repair, playback order), and
//!   behind the `sim` feature a discrete-event simulator that runs thousands of them in virtual time.
//!
//! The byte layout of every structure is written down in `docs/protocol.md` at the repository root.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod chunk;
pub mod keys;
pub mod swarm;
pub mod ticket;
pub mod window;
pub mod wire;

pub use chunk::{Flags, Header, Received, Verified};
pub use keys::{NodeId, NodeKey, StreamId, StreamKey};
pub use ticket::Ticket;

/// The protocol version this crate speaks. It travels in the hello message and in tickets.
pub const PROTOCOL_VERSION: u16 = 1;

/// The ALPN string that identifies the protocol on a QUIC connection.
pub const ALPN: &[u8] = b"crowdsurf/1";
