//! Loopback swarms of real nodes over real QUIC on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crowdsurf_peer::source::SyntheticSource;
use crowdsurf_peer::{Delivery, Node, NodeConfig, NodeHandle};
use crowdsurf_proto::wire::Role;
use crowdsurf_proto::{NodeKey, StreamKey};
use tokio::sync::mpsc;

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct Swarm {
    origin: NodeHandle,
    relays: Vec<(NodeHandle, mpsc::UnboundedReceiver<Delivery>)>,
    tasks: tokio::task::JoinSet<()>,
    stream: StreamKey,
}

fn node_config(seed: u8, stream: &StreamKey, role: Role) -> NodeConfig {
    let mut cfg = NodeConfig::new(NodeKey::from_secret_bytes([seed; 32]), stream.id(), loopback());
    cfg.swarm.role = role;
    cfg.swarm.seed = u64::from(seed);
    cfg.swarm.target_latency_us = 1_000_000;
    cfg
}

async fn start(relays: usize) -> Swarm {
    let stream = StreamKey::from_secret_bytes([200; 32]);
    let mut tasks = tokio::task::JoinSet::new();
    let (origin_node, origin) = Node::bind(node_config(1, &stream, Role::Origin)).unwrap();
    let boot = origin.node_addr();
    tasks.spawn(async move {
        origin_node.run().await.unwrap();
    });
    let mut out = Vec::new();
    for i in 0..relays {
        let mut cfg = node_config(10 + i as u8, &stream, Role::Relay);
        cfg.bootstrap = vec![boot.clone()];
        let (mut node, handle) = Node::bind(cfg).unwrap();
        let rx = node.take_deliveries().unwrap();
        tasks.spawn(async move {
            node.run().await.unwrap();
        });
        out.push((handle, rx));
    }
    Swarm { origin, relays: out, tasks, stream }
}

/// Publishes `count` chunks at real-time pace (250 ms each) from the origin; returns their seqs.
async fn publish(origin: &NodeHandle, key: &StreamKey, first: u64, count: u64) -> Vec<u64> {
    let mut source = SyntheticSource::new(key.clone(), first, 250, 2_500_000, 4);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut seqs = Vec::new();
    for _ in 0..count {
        tick.tick().await;
        let chunk = source.next_chunk(now_us());
        seqs.push(chunk.seq());
        assert!(origin.publish(chunk));
    }
    seqs
}

/// Waits until the relay has delivered `last` (or skipped it), collecting what it delivered.
async fn collect_until(rx: &mut mpsc::UnboundedReceiver<Delivery>, last: u64) -> (Vec<u64>, Vec<u64>) {
    let mut delivered = Vec::new();
    let mut skipped = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(d)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        let seq = match d {
            Delivery::Chunk(c) => {
                delivered.push(c.seq());
                c.seq()
            }
            Delivery::Skip(s) => {
                skipped.push(s);
                s
            }
        };
        if seq >= last {
            break;
        }
    }
    (delivered, skipped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_relays_receive_every_chunk_in_order() {
    let mut swarm = start(20).await;
    let seqs = publish(&swarm.origin, &swarm.stream, 4000, 80).await;
    let last = *seqs.last().unwrap();
    for (i, (handle, rx)) in swarm.relays.iter_mut().enumerate() {
        let (delivered, skipped) = collect_until(rx, last).await;
        assert_eq!(delivered.last().max(skipped.last()), Some(&last), "relay {i} did not reach the end");
        // In order, each chunk once, and every sequence number from its start point on accounted for.
        let mut all: Vec<u64> = delivered.iter().chain(&skipped).copied().collect();
        all.sort_unstable();
        let first = all[0];
        assert_eq!(all, (first..=last).collect::<Vec<_>>(), "relay {i} has holes or repeats");
        assert!(delivered.windows(2).all(|w| w[0] < w[1]), "relay {i} delivered out of order");
        // It joined in the first second, so it must have started within the first few chunks.
        assert!(first <= 4000 + 8, "relay {i} started late at {first}");
        assert!(skipped.is_empty(), "relay {i} skipped {skipped:?}");
        let stats = handle.stats();
        assert_eq!(stats.counters.skipped as usize, skipped.len());
    }
    let origin = swarm.origin.stats();
    let stream_bytes: u64 = 80 * (2_500_000 / 8 / 4);
    let ratio = origin.counters.chunk_bytes_up as f64 / stream_bytes as f64;
    eprintln!("origin upload {ratio:.2}x the stream");
    assert!(ratio < 3.0, "origin uploaded {ratio:.2}x the stream");
    swarm.origin.shutdown();
    for (h, _) in &swarm.relays {
        h.shutdown();
    }
    while swarm.tasks.join_next().await.is_some() {}
}
