//! Loopback swarms of real nodes over real QUIC on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crowdsurf_peer::source::SyntheticSource;
use crowdsurf_peer::{Delivery, Node, NodeConfig, NodeHandle};
use crowdsurf_proto::wire::Role;
use crowdsurf_proto::{NodeKey, StreamKey};
use tokio::sync::mpsc;

/// These tests run real-time swarms; run them one at a time so they do not starve each other of CPU
/// on a small machine (a starved node misses deadlines for reasons that have nothing to do with the
/// protocol).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct Swarm {
    origin: NodeHandle,
    relays: Vec<(NodeHandle, mpsc::UnboundedReceiver<Delivery>)>,
    /// Per relay, its task, to kill it without a goodbye.
    kill: Vec<tokio::task::AbortHandle>,
    tasks: tokio::task::JoinSet<()>,
    stream: StreamKey,
    boot: crowdsurf_proto::wire::NodeAddr,
}

impl Swarm {
    /// Adds a relay to the running swarm.
    fn join(&mut self, seed: u8) -> usize {
        let mut cfg = node_config(seed, &self.stream, Role::Relay);
        cfg.bootstrap = vec![self.boot.clone()];
        let (mut node, handle) = Node::bind(cfg).unwrap();
        let rx = node.take_deliveries().unwrap();
        let abort = self.tasks.spawn(async move {
            node.run().await.unwrap();
        });
        self.relays.push((handle, rx));
        self.kill.push(abort);
        self.relays.len() - 1
    }

    async fn stop(mut self) {
        self.origin.shutdown();
        for (h, _) in &self.relays {
            h.shutdown();
        }
        while self.tasks.join_next().await.is_some() {}
    }
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
    let mut swarm = Swarm { origin, relays: Vec::new(), kill: Vec::new(), tasks, stream, boot };
    for i in 0..relays {
        swarm.join(10 + i as u8);
    }
    swarm
}

/// Publishes chunks at real-time pace (250 ms each) from the origin.
struct Publisher {
    source: SyntheticSource,
    tick: tokio::time::Interval,
    last: u64,
}

impl Publisher {
    fn new(key: &StreamKey, first: u64) -> Self {
        Publisher {
            source: SyntheticSource::new(key.clone(), first, 250, 2_500_000, 4),
            tick: tokio::time::interval(Duration::from_millis(250)),
            last: 0,
        }
    }

    /// Publishes `count` more chunks; returns the last seq.
    async fn publish(&mut self, origin: &NodeHandle, count: u64) -> u64 {
        for _ in 0..count {
            self.tick.tick().await;
            let chunk = self.source.next_chunk(now_us());
            self.last = chunk.seq();
            assert!(origin.publish(chunk));
        }
        self.last
    }
}

async fn publish(origin: &NodeHandle, key: &StreamKey, first: u64, count: u64) -> Vec<u64> {
    let mut p = Publisher::new(key, first);
    p.publish(origin, count).await;
    (first..first + count).collect()
}

/// Asserts a relay delivered every chunk from its start to `last`, in order, with no skip; returns
/// the first chunk it delivered.
async fn assert_complete(i: usize, handle: &NodeHandle, rx: &mut mpsc::UnboundedReceiver<Delivery>, last: u64) -> u64 {
    let (delivered, skipped) = collect_until(rx, last).await;
    // On failure, say what the relay saw: its counters, parents and latencies tell a slow repair
    // from a lost parent from a starved machine.
    assert!(skipped.is_empty(), "relay {i} skipped {skipped:?}; its stats: {:#?}", handle.stats());
    assert_eq!(delivered.last(), Some(&last), "relay {i} did not reach the end");
    let first = delivered[0];
    assert_eq!(delivered, (first..=last).collect::<Vec<_>>(), "relay {i} out of order or with holes");
    first
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
    let _serial = SERIAL.lock().await;
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
    swarm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_third_of_the_relays_loses_nothing_at_the_survivors() {
    let _serial = SERIAL.lock().await;
    let mut swarm = start(15).await;
    let mut publisher = Publisher::new(&swarm.stream, 8000);
    publisher.publish(&swarm.origin, 20).await;
    // Kill every third relay mid-stream: no goodbye, no hand-over; its task is dropped where it
    // stands (QUIC closes its connections, so the others notice at once, chunks in flight and all).
    for i in (0..15).step_by(3) {
        swarm.kill[i].abort();
    }
    let last = publisher.publish(&swarm.origin, 40).await;
    for (i, (handle, rx)) in swarm.relays.iter_mut().enumerate() {
        if i % 3 == 0 {
            continue;
        }
        let first = assert_complete(i, handle, rx, last).await;
        assert!(first <= 8000 + 8, "relay {i} started late at {first}");
    }
    swarm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_relay_starts_at_a_random_access_chunk_within_its_latency() {
    let _serial = SERIAL.lock().await;
    let mut swarm = start(6).await;
    let mut publisher = Publisher::new(&swarm.stream, 12000);
    let edge = publisher.publish(&swarm.origin, 16).await;
    let late = swarm.join(99);
    let last = publisher.publish(&swarm.origin, 16).await;
    let (delivered, skipped) = {
        let rx = &mut swarm.relays[late].1;
        let mut chunks = Vec::new();
        let mut skipped = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Some(d)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            match d {
                Delivery::Chunk(c) => {
                    let done = c.seq() >= last;
                    chunks.push(c);
                    if done {
                        break;
                    }
                }
                Delivery::Skip(s) => skipped.push(s),
            }
        }
        (chunks, skipped)
    };
    assert!(skipped.is_empty(), "late relay skipped {skipped:?}");
    let first = delivered.first().expect("late relay delivered something");
    assert!(first.header().is_random_access(), "late relay started at {} which is not random access", first.seq());
    // Started no further back than its target latency (4 chunks) and no later than one keyframe
    // interval (4 chunks) after the live edge it found.
    assert!(first.seq() + 4 >= edge, "started at {} too far behind the edge {edge}", first.seq());
    assert!(first.seq() <= edge + 5, "started at {} long after the edge {edge}", first.seq());
    let seqs: Vec<u64> = delivered.iter().map(|c| c.seq()).collect();
    assert_eq!(seqs, (first.seq()..=last).collect::<Vec<_>>());
    swarm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forging_neighbour_is_dropped_banned_and_its_chunk_never_delivered() {
    let _serial = SERIAL.lock().await;
    use crowdsurf_peer::net::{Endpoint, EndpointConfig, NetError};
    use crowdsurf_proto::chunk::{Flags, Verified};
    use crowdsurf_proto::window::BufferMap;
    use crowdsurf_proto::wire::{GoodbyeReason, Hello, Message};

    let mut swarm = start(1).await;
    let mut publisher = Publisher::new(&swarm.stream, 20000);
    publisher.publish(&swarm.origin, 4).await;
    let relay = swarm.relays[0].0.node_addr();

    // A neighbour that speaks the protocol but forges chunk 20006 with its own key.
    let forger_key = NodeKey::from_secret_bytes([66; 32]);
    let endpoint = Endpoint::bind(&forger_key, EndpointConfig::new(loopback())).unwrap();
    let conn = endpoint.connect(&relay).await.unwrap();
    let (mut send, mut recv) = conn.open_control().await.unwrap();
    send.send(&Message::Hello(Box::new(Hello {
        version: crowdsurf_proto::PROTOCOL_VERSION,
        stream: swarm.stream.id(),
        node: forger_key.id(),
        role: Role::Relay,
        listen: vec![],
        have: BufferMap::empty(0),
    })))
    .await
    .unwrap();
    assert!(matches!(recv.recv().await.unwrap(), Some(Message::Hello(_))));
    let fake_stream = StreamKey::from_secret_bytes([67; 32]);
    let forged = Verified::sign(&fake_stream, 20006, now_us(), 250_000, Flags::RANDOM_ACCESS, vec![0x47; 188].into());
    let forged_payload = forged.payload().clone();
    let _ = conn.send_chunk(&forged, 1).await;
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("relay did not drop the forger") {
        NetError::ClosedByPeer { reason, .. } => assert_eq!(reason, Some(GoodbyeReason::Misbehaved)),
        other => panic!("unexpected close: {other}"),
    }
    // Coming back with the same identity is refused.
    if let Ok(again) = endpoint.connect(&relay).await {
        let (mut send, _recv) = again.open_control().await.unwrap();
        let _ = send.send(&Message::Ping { nonce: 1, sent_us: 0 }).await;
        let closed =
            tokio::time::timeout(Duration::from_secs(5), again.closed()).await.expect("banned node let back in");
        assert!(matches!(closed, NetError::ClosedByPeer { reason: Some(GoodbyeReason::Misbehaved), .. }), "{closed}");
    }
    // The honest stream goes on, and the real chunk 20006 is what gets delivered.
    let last = publisher.publish(&swarm.origin, 8).await;
    let rx = &mut swarm.relays[0].1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut saw_20006 = false;
    while let Ok(Some(d)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        if let Delivery::Chunk(c) = d {
            assert_ne!(c.payload(), &forged_payload, "a forged payload was delivered");
            saw_20006 |= c.seq() == 20006;
            if c.seq() >= last {
                break;
            }
        }
    }
    assert!(saw_20006, "the honest chunk 20006 never arrived");
    assert!(swarm.relays[0].0.stats().counters.bans >= 1);
    endpoint.close();
    swarm.stop().await;
}
