//! crowdsurf-peer: the QUIC swarm node.
