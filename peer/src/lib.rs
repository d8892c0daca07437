//! # crowdsurf-peer
//!
//! The swarm node of crowdsurf: QUIC connections to a handful of neighbours, a sliding window of recent
//! chunks, verification of every byte before it is relayed, and the push/pull scheduler of
//! [`crowdsurf_proto::swarm`] driven with a real clock.
//!
//! - [`net`]: the QUIC transport (identity, control stream, one stream per chunk, upload cap).
//! - [`node`]: the driver that runs the state machine over [`net`]; the caller runs its future.
//! - [`stats`]: latency histograms and counters, as JSON and Prometheus text.
//! - [`http`]: the optional local `/metrics` and `/stats` listener.
//! - [`lab`]: N real nodes on loopback, measured; [`report`]: the report and plots shared with the
//!   simulator.
//! - [`keyfile`]: node and stream keys kept in files with owner-only permissions.

pub mod http;
pub mod keyfile;
pub mod lab;
pub mod net;
pub mod node;
pub mod report;
pub mod simulate;
pub mod source;
pub mod stats;

pub use node::{Delivery, Node, NodeConfig, NodeError, NodeHandle};
