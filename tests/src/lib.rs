//! # crowdsurf-tests
//!
//! Harness for end-to-end tests: a [`Swarm`] of real nodes over QUIC on 127.0.0.1 (an origin fed by a
//! synthetic source and honest relays whose deliveries are checked against what the origin
//! published), and an [`adversary`] kit of real QUIC clients that speak the protocol badly on purpose.

pub mod adversary;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crowdsurf_peer::source::SyntheticSource;
use crowdsurf_peer::{Delivery, Node, NodeConfig, NodeHandle};
use crowdsurf_proto::chunk::Verified;
use crowdsurf_proto::wire::{NodeAddr, Role};
use crowdsurf_proto::{NodeKey, StreamKey};
use tokio::task::{AbortHandle, JoinSet};

/// Wall clock, µs since the epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Sends the nodes' `tracing` output to the test's output, filtered by `RUST_LOG` (errors only when it
/// is unset), so `RUST_LOG=crowdsurf_proto=debug cargo test ...` shows what a failing swarm did.
/// Idempotent: every test may call it.
pub fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// 127.0.0.1 with a free port.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// What an honest relay received, checked against the origin's chunks.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Sequence numbers delivered in order.
    pub delivered: Vec<u64>,
    /// Sequence numbers skipped.
    pub skipped: Vec<u64>,
    /// Delivered chunks that differ from the origin's in any byte: header, signature or payload
    /// (must stay zero).
    pub forged: u64,
}

impl Tally {
    /// Delivered / (delivered + skipped) from the first delivery on.
    pub fn continuity(&self) -> f64 {
        let due = self.delivered.len() + self.skipped.len();
        if due == 0 { 0.0 } else { self.delivered.len() as f64 / due as f64 }
    }
}

/// A relay under test.
pub struct Relay {
    /// Its handle.
    pub handle: NodeHandle,
    /// What it delivered so far.
    pub tally: Arc<Mutex<Tally>>,
    /// Kills it without a goodbye.
    pub kill: AbortHandle,
}

/// An origin and honest relays on loopback.
pub struct Swarm {
    /// The origin.
    pub origin: NodeHandle,
    /// The stream key.
    pub stream: StreamKey,
    /// Honest relays.
    pub relays: Vec<Relay>,
    /// The origin's address, for bootstrapping.
    pub boot: NodeAddr,
    published: Arc<Mutex<HashMap<u64, Verified>>>,
    edge: Arc<AtomicU64>,
    source: SyntheticSource,
    tick: tokio::time::Interval,
    last: u64,
    tasks: JoinSet<()>,
}

impl Swarm {
    /// Starts an origin and `relays` honest relays.
    pub async fn start(relays: usize, seed: u8) -> Swarm {
        log_to_test_output();
        let stream = StreamKey::from_secret_bytes([seed; 32]);
        let mut cfg = NodeConfig::new(NodeKey::from_secret_bytes([seed.wrapping_add(1); 32]), stream.id(), loopback());
        cfg.swarm.role = Role::Origin;
        cfg.swarm.max_neighbours = 64;
        let (node, origin) = Node::bind(cfg).unwrap_or_else(|e| panic!("origin: {e}"));
        let boot = origin.node_addr();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let _ = node.run().await;
        });
        let first = now_us() / 1000;
        let mut swarm = Swarm {
            origin,
            source: SyntheticSource::new(stream.clone(), first, 250, 2_500_000, 4),
            stream,
            relays: Vec::new(),
            boot,
            published: Default::default(),
            edge: Arc::new(AtomicU64::new(0)),
            tick: {
                // A live source never catches up in a burst after a pause: it just goes on.
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            },
            last: first,
            tasks,
        };
        for i in 0..relays {
            swarm.add_relay(seed.wrapping_mul(31).wrapping_add(10 + i as u8) as u64 * 1000 + i as u64);
        }
        swarm
    }

    /// Adds an honest relay with a key derived from `seed`.
    pub fn add_relay(&mut self, seed: u64) -> usize {
        self.add_relay_with(seed, |_| {})
    }

    /// Adds an honest relay with a key derived from `seed`, its config changed by `tweak` first.
    pub fn add_relay_with(&mut self, seed: u64, tweak: impl FnOnce(&mut NodeConfig)) -> usize {
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&seed.to_le_bytes());
        secret[8] = 0xAA;
        let mut cfg = NodeConfig::new(NodeKey::from_secret_bytes(secret), self.stream.id(), loopback());
        cfg.bootstrap = vec![self.boot.clone()];
        cfg.swarm.seed = seed;
        tweak(&mut cfg);
        let (mut node, handle) = Node::bind(cfg).unwrap_or_else(|e| panic!("relay: {e}"));
        let mut rx = node.take_deliveries().unwrap_or_else(|| unreachable!("fresh node"));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (t, published) = (tally.clone(), self.published.clone());
        let kill = self.tasks.spawn(async move {
            let collector = async move {
                while let Some(d) = rx.recv().await {
                    let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                    match d {
                        Delivery::Chunk(c) => {
                            let genuine = published.lock().unwrap_or_else(|p| p.into_inner()).get(&c.seq()).cloned();
                            if genuine.as_ref() != Some(&c) {
                                t.forged += 1;
                            }
                            t.delivered.push(c.seq());
                        }
                        Delivery::Skip(s) => t.skipped.push(s),
                    }
                }
            };
            let _ = tokio::join!(node.run(), collector);
        });
        self.relays.push(Relay { handle, tally, kill });
        self.relays.len() - 1
    }

    /// Publishes `count` chunks at real-time pace; returns the last sequence number.
    pub async fn publish(&mut self, count: u64) -> u64 {
        for _ in 0..count {
            self.tick.tick().await;
            let chunk = self.source.next_chunk(now_us());
            self.published.lock().unwrap_or_else(|p| p.into_inner()).insert(chunk.seq(), chunk.clone());
            self.last = chunk.seq();
            self.edge.store(chunk.seq(), Ordering::Relaxed);
            self.origin.publish(chunk);
        }
        self.last
    }

    /// The last chunk published.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The last chunk published, shared: an attacker task that must know the live edge the moment
    /// it moves (the strongest liar) reads it here.
    pub fn live_edge(&self) -> Arc<AtomicU64> {
        self.edge.clone()
    }

    /// Waits until every relay still running has delivered or skipped `seq` (or `timeout` passes).
    pub async fn settle(&self, seq: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let done = self.relays.iter().filter(|r| !r.kill.is_finished()).all(|r| {
                let t = r.tally.lock().unwrap_or_else(|p| p.into_inner());
                t.delivered.last().is_some_and(|&s| s >= seq) || t.skipped.last().is_some_and(|&s| s >= seq)
            });
            if done || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Each live relay's tally.
    pub fn tallies(&self) -> Vec<Tally> {
        self.relays
            .iter()
            .filter(|r| !r.kill.is_finished())
            .map(|r| r.tally.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Chunks that failed verification at an honest node (origin or relay, live or not), split by
    /// who sent them: `(from honest nodes, from anyone else)`. The first is the number of forged
    /// chunks an honest node relayed (each receiver verifies before storing, so any forged chunk
    /// one honest node passed to another would be caught and counted here); it must stay zero.
    pub fn bad_chunks_received(&self) -> (u64, u64) {
        use crowdsurf_proto::swarm::Misbehaviour;
        let honest: std::collections::HashSet<_> = std::iter::once(self.origin.node_addr().id)
            .chain(self.relays.iter().map(|r| r.handle.node_addr().id))
            .collect();
        let mut counts = (0, 0);
        for handle in std::iter::once(&self.origin).chain(self.relays.iter().map(|r| &r.handle)) {
            for o in handle.offences().into_iter().filter(|o| o.what == Misbehaviour::BadChunk) {
                if honest.contains(&o.node) {
                    counts.0 += 1;
                } else {
                    counts.1 += 1;
                }
            }
        }
        counts
    }

    /// The worst continuity and the number of forged deliveries over live relays.
    pub fn summary(&self) -> (f64, u64) {
        let t = self.tallies();
        (t.iter().map(Tally::continuity).fold(1.0, f64::min), t.iter().map(|t| t.forged).sum())
    }

    /// Stops everything.
    pub async fn stop(mut self) {
        self.origin.shutdown();
        for r in &self.relays {
            r.handle.shutdown();
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), async { while self.tasks.join_next().await.is_some() {} })
            .await;
        self.tasks.shutdown().await;
    }
}
