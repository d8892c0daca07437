//! `make demo`: a live swarm on this machine. An origin publishes a synthetic 2.5 Mbit/s stream of
//! signed 250 ms chunks; relays join over QUIC on 127.0.0.1, verify and pass on every chunk; every
//! second a table shows each node's neighbours, latency and continuity.
//!
//! Options (environment): DEMO_RELAYS (default 8), DEMO_SECONDS (default 20).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use crowdsurf_peer::source::SyntheticSource;
use crowdsurf_peer::{Node, NodeConfig, keyfile};
use crowdsurf_proto::wire::Role;
use crowdsurf_proto::{NodeKey, StreamKey, Ticket};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let relays = env("DEMO_RELAYS", 8) as usize;
    let seconds = env("DEMO_SECONDS", 20);
    let stream = StreamKey::from_secret_bytes(keyfile::random_secret()?);
    let loopback = "127.0.0.1:0".parse()?;
    let mut origin_cfg = NodeConfig::new(NodeKey::from_secret_bytes(keyfile::random_secret()?), stream.id(), loopback);
    origin_cfg.swarm.role = Role::Origin;
    let (origin_node, origin) = Node::bind(origin_cfg).context("origin")?;
    let ticket = origin_node.ticket();
    println!("stream {} — ticket:\n  {ticket}\n", stream.id().fmt_short());
    println!("(a relay elsewhere on this machine can join with: cargo run -p crowdsurf-peer -- {ticket})\n");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(origin_node.run());
    let mut handles = Vec::new();
    for i in 0..relays {
        let mut cfg = NodeConfig::new(NodeKey::from_secret_bytes(keyfile::random_secret()?), stream.id(), loopback);
        cfg.bootstrap = Ticket::clone(&ticket).bootstrap;
        cfg.swarm.seed = i as u64;
        let (node, handle) = Node::bind(cfg).context("relay")?;
        tasks.spawn(node.run());
        handles.push(handle);
    }
    let now_us = || SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let first_seq = now_us() / 1000;
    let mut source = SyntheticSource::new(stream, first_seq, 250, 2_500_000, 4);
    let mut chunk_tick = tokio::time::interval(Duration::from_millis(250));
    let mut report_tick = tokio::time::interval(Duration::from_secs(2));
    let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while tokio::time::Instant::now() < end {
        tokio::select! {
            _ = chunk_tick.tick() => { origin.publish(source.next_chunk(now_us())); }
            _ = report_tick.tick() => print_table(&origin, &handles),
        }
    }
    print_table(&origin, &handles);
    origin.shutdown();
    for h in &handles {
        h.shutdown();
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

fn print_table(origin: &crowdsurf_peer::NodeHandle, relays: &[crowdsurf_peer::NodeHandle]) {
    let o = origin.stats();
    let published = o.counters.published.max(1);
    println!(
        "origin {}: published {} chunks, uploaded {:.2}x the stream",
        o.node,
        o.counters.published,
        o.counters.chunk_bytes_up as f64 / (published * 2_500_000 / 8 / 4) as f64
    );
    println!("  node        nbrs  p50 ms  p99 ms  continuity  push %  dup %");
    for h in relays {
        let s = h.stats();
        println!(
            "  {}  {:>4}  {:>6.0}  {:>6.0}  {:>9.2}%  {:>5.1}  {:>5.1}",
            s.node,
            s.neighbours,
            s.arrival_latency.p50_ms,
            s.arrival_latency.p99_ms,
            s.continuity * 100.0,
            s.push_share * 100.0,
            s.duplicate_ratio * 100.0
        );
    }
    println!();
}
