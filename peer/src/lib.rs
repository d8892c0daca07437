//! crowdsurf-peer: the QUIC swarm node.
pub mod net;
