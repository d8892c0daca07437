//! A discrete-event simulator: many [`Swarm`] state machines in virtual time.
//!
//! The network model is deliberately simple and written down here so results can be read against it:
//!
//! - Every node has a position in a unit square (a synthetic geography). The one-way delay between two
//!   nodes is `base_delay_us + distance × distance_delay_us` plus uniform jitter up to `jitter_us`.
//! - Every node has an upload rate. Chunk streams leave a node one after another at that rate (a FIFO
//!   uplink); control messages are small and skip the queue (QUIC interleaves streams). Download is
//!   unlimited, and there is no packet loss or congestion inside the network.
//! - A chunk's real payload is small (so signing and hashing cost little), but it occupies the uplink
//!   for `chunk_bytes`, the size a chunk of the configured bitrate would have.
//! - Connections come up after one round trip. A node that leaves without a goodbye is noticed by its
//!   neighbours after `idle_timeout_us`, as QUIC's idle timeout would.
//!
//! Honest nodes pass [`Verified`] chunks to each other (a simulated link does not corrupt bytes);
//! adversaries send raw [`Received`] chunks that the receiving side verifies, exactly as the real
//! driver does, so a forged chunk is caught by the same code path.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;

use super::agenda::Agenda;
use super::{Config, ConnId, Misbehaviour, Output, Path, Swarm, Time};
use crate::chunk::{Flags, Received, Verified, Verifier};
use crate::keys::{NodeId, NodeKey, StreamKey};
use crate::wire::{Message, NodeAddr, Role};

/// How a simulated node misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adversary {
    /// Every chunk it sends has one payload byte flipped (hash mismatch).
    ForgePayload,
    /// Every chunk it sends is signed by another key.
    WrongKey,
    /// Accepts subscriptions and announces chunks, but never sends a chunk.
    Silent,
}

/// One simulated node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Upload rate, bits per second.
    pub upload_bps: u64,
    /// Position in the unit square.
    pub pos: (f64, f64),
    /// When it joins, µs of virtual time.
    pub join_at: Time,
    /// When it leaves without a goodbye, if it does.
    pub leave_at: Option<Time>,
    /// Misbehaviour, if any.
    pub adversary: Option<Adversary>,
}

/// The whole scenario.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed for everything random.
    pub seed: u64,
    /// How long the stream runs, µs.
    pub duration_us: Time,
    /// Chunk duration, µs.
    pub chunk_us: u32,
    /// Stream bitrate, bits per second (gives the modelled chunk size).
    pub bitrate_bps: u64,
    /// A random-access chunk every this many chunks.
    pub random_access_every: u64,
    /// Fixed part of the one-way delay, µs.
    pub base_delay_us: u64,
    /// Delay per unit of distance, µs.
    pub distance_delay_us: u64,
    /// Uniform jitter bound, µs.
    pub jitter_us: u64,
    /// How long until a vanished neighbour is noticed, µs.
    pub idle_timeout_us: u64,
    /// The origin's upload rate, bits per second.
    pub origin_upload_bps: u64,
    /// The origin's position.
    pub origin_pos: (f64, f64),
    /// Settings of every node (role and seed are set per node).
    pub swarm: Config,
    /// The nodes other than the origin.
    pub nodes: Vec<NodeSpec>,
    /// How many early-joining nodes the ticket names besides the origin.
    pub extra_bootstrap: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            duration_us: 20_000_000,
            chunk_us: 250_000,
            bitrate_bps: 2_500_000,
            random_access_every: 4,
            base_delay_us: 10_000,
            distance_delay_us: 40_000,
            jitter_us: 2_000,
            idle_timeout_us: 3_000_000,
            origin_upload_bps: 20_000_000,
            origin_pos: (0.5, 0.5),
            swarm: Config::default(),
            nodes: Vec::new(),
            extra_bootstrap: 0,
        }
    }
}

/// What one node saw.
#[derive(Debug, Clone, Default)]
pub struct NodeResult {
    /// Index in [`SimConfig::nodes`] (the origin is not listed).
    pub index: usize,
    /// Whether it was an adversary.
    pub adversary: bool,
    /// When it joined.
    pub joined_at: Time,
    /// Whether it was still there at the end.
    pub present_at_end: bool,
    /// Arrival latency (arrival − capture) of every chunk it stored, µs, in arrival order.
    pub latencies_us: Vec<(Time, u64)>,
    /// Chunks delivered in order at its playback cursor.
    pub delivered: u64,
    /// Chunks skipped at their deadline.
    pub skipped: u64,
    /// Delivered chunks that were not the origin's (must be zero).
    pub forged_delivered: u64,
    /// Time of its first delivered chunk.
    pub first_delivery_at: Option<Time>,
    /// The state machine's counters at the end.
    pub counters: super::Counters,
    /// Most chunks held at once in its window.
    pub max_window_len: usize,
    /// Its playback cursor and live edge at the end.
    pub cursor_and_edge: (Option<u64>, Option<u64>),
    /// Its node id, short form.
    pub id: String,
    /// Its push-tree depth at the end (hops from the origin along parents), if it could be traced.
    pub depth: Option<u32>,
    /// Its substream-0 parent at the end (short id), and the modelled one-way delay from it, µs.
    pub parent: Option<(String, u64)>,
    /// Chunk bytes it uploaded, at the modelled chunk size.
    pub chunk_bytes_up: u64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct SimResult {
    /// Per node (adversaries included, flagged).
    pub nodes: Vec<NodeResult>,
    /// Chunks published.
    pub published: u64,
    /// Chunk payload bytes (modelled) the origin uploaded.
    pub origin_bytes_up: u64,
    /// Stream bytes (modelled) published.
    pub stream_bytes: u64,
    /// Control bytes sent by all nodes.
    pub control_bytes: u64,
    /// Chunk bytes (modelled) sent by all nodes.
    pub chunk_bytes: u64,
    /// Chunks from adversaries that any honest node relayed or delivered (must be zero).
    pub forged_relayed: u64,
    /// Events processed.
    pub events: u64,
    /// The origin's short id.
    pub origin_id: String,
    /// Virtual time at the start, µs (subtract from event times).
    pub start_us: Time,
    /// (node, substream) pairs at the end whose chain of parents loops back on itself (must be zero).
    pub parent_loops: u64,
    /// The origin's counters at the end.
    pub origin_counters: super::Counters,
}

/// How far a run has got, handed to the callback of [`Sim::run_with_progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Virtual time since the run started, µs.
    pub elapsed_us: Time,
    /// Virtual time the whole run takes, µs (the stream, then a drain for the last chunks).
    pub total_us: Time,
    /// Events processed so far.
    pub events: u64,
    /// Relays present now (joined and not left; adversaries included).
    pub present: usize,
    /// Chunks delivered at the relays' playback cursors so far.
    pub delivered: u64,
    /// Chunks the relays skipped at their deadline so far.
    pub skipped: u64,
    /// Chunks published so far.
    pub published: u64,
    /// Chunk bytes (modelled) the origin has uploaded so far.
    pub origin_bytes_up: u64,
}

/// What travels on a simulated connection. Every queued event is the size of the largest, so the
/// rare large one (a forged chunk) is boxed.
enum Payload {
    Message(Message),
    Chunk(Verified),
    Raw(Box<Received>),
}

enum Event {
    Publish,
    Timer(usize),
    Join(usize),
    Leave(usize),
    Connected { node: usize, conn: ConnId, peer: usize, outbound: bool },
    ConnectFailed { node: usize, peer: NodeId },
    Arrive { to: usize, conn: ConnId, payload: Payload },
    Closed { node: usize, conn: ConnId },
    Sent { node: usize, conn: ConnId, seq: u64, delivered: bool },
    UplinkFree(usize),
}

/// One end of a simulated connection.
#[derive(Clone, Copy)]
struct ConnEnd {
    owner: usize,
    peer: usize,
    peer_conn: ConnId,
    /// One-way delay to the peer before jitter, µs.
    delay_us: Time,
    /// Latest arrival scheduled at this end: a connection delivers in order.
    last_arrival: Option<Time>,
}

struct SimNode {
    swarm: Option<Swarm>,
    key: NodeKey,
    pos: (f64, f64),
    upload_bps: u64,
    /// Chunk streams waiting for the uplink: (priority, order) -> (conn, seq, payload).
    uplink: std::collections::BTreeMap<(Reverse<i32>, u64), (ConnId, u64, Payload)>,
    uplink_busy: bool,
    timer: Option<Time>,
    adversary: Option<Adversary>,
}

/// The simulator. Build with [`Sim::new`], run with [`Sim::run`].
pub struct Sim {
    cfg: SimConfig,
    rng: fastrand::Rng,
    now: Time,
    /// Pending events by time, ties in order of scheduling.
    queue: Agenda<Event>,
    next_event: u64,
    nodes: Vec<SimNode>,
    by_id: HashMap<NodeId, usize>,
    /// Open connection ends, indexed by `ConnId` (ids are handed out in sequence). Each keeps the
    /// latest arrival scheduled on it, so a connection stays in order (QUIC's control stream is
    /// ordered; chunk streams are not, but a chunk is never reordered with itself).
    conns: Vec<Option<ConnEnd>>,
    /// Which `conns` are open, one bit each: every arrival asks, and the table itself is too big
    /// to stay in cache.
    open: Vec<u64>,
    /// The next `ConnId` to hand out (two per connection, one for each end).
    next_conn: u64,
    stream_key: StreamKey,
    verifier: Verifier,
    forger: StreamKey,
    next_seq: u64,
    results: Vec<NodeResult>,
    out: SimResult,
    /// Running totals for [`Progress`].
    progress: Progress,
    chunk_bytes: u64,
    origin_chunks: HashMap<u64, [u8; 32]>,
}

/// Virtual time at the start of every run, µs (a plausible wall clock: Unix time in late 2023).
const SIM_EPOCH_US: Time = 1_700_000_000_000_000;

/// The fake address of simulated node `i` (never used on a real socket).
pub fn sim_addr(i: usize) -> SocketAddr {
    let i = i as u32 + 1;
    SocketAddr::from((Ipv4Addr::new(127, (i >> 16) as u8, (i >> 8) as u8, i as u8), 4433))
}

impl Sim {
    /// Prepares a run. Node 0 is the origin; `cfg.nodes[i]` is node `i + 1`.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = fastrand::Rng::with_seed(cfg.seed);
        let mut seed_bytes = || {
            let mut b = [0u8; 32];
            for x in b.iter_mut() {
                *x = rng.u8(..);
            }
            b
        };
        let stream_key = StreamKey::from_secret_bytes(seed_bytes());
        let forger = StreamKey::from_secret_bytes(seed_bytes());
        let mut keys: Vec<NodeKey> = Vec::new();
        for _ in 0..=cfg.nodes.len() {
            keys.push(NodeKey::from_secret_bytes(seed_bytes()));
        }
        let verifier = Verifier::new(stream_key.id()).unwrap_or_else(|_| unreachable!("a generated key is valid"));
        let chunk_bytes = cfg.bitrate_bps * u64::from(cfg.chunk_us) / 8 / 1_000_000;
        let mut sim = Sim {
            rng: fastrand::Rng::with_seed(cfg.seed ^ 0x5eed),
            now: SIM_EPOCH_US,
            queue: Agenda::new(SIM_EPOCH_US),
            next_event: 0,
            nodes: Vec::new(),
            by_id: HashMap::new(),
            conns: Vec::new(),
            open: Vec::new(),
            next_conn: 1,
            stream_key,
            verifier,
            forger,
            next_seq: 1000,
            results: Vec::new(),
            out: SimResult::default(),
            progress: Progress::default(),
            chunk_bytes,
            origin_chunks: HashMap::new(),
            cfg,
        };
        let start = sim.now;
        sim.out.start_us = start;
        for (i, key) in keys.into_iter().enumerate() {
            let (pos, upload_bps, adversary) = if i == 0 {
                (sim.cfg.origin_pos, sim.cfg.origin_upload_bps, None)
            } else {
                let spec = &sim.cfg.nodes[i - 1];
                (spec.pos, spec.upload_bps, spec.adversary)
            };
            sim.by_id.insert(key.id(), i);
            sim.nodes.push(SimNode {
                swarm: None,
                key,
                pos,
                upload_bps,
                uplink: Default::default(),
                uplink_busy: false,
                timer: None,
                adversary,
            });
        }
        for i in 0..sim.cfg.nodes.len() {
            let spec = sim.cfg.nodes[i].clone();
            sim.results.push(NodeResult {
                index: i,
                adversary: spec.adversary.is_some(),
                joined_at: spec.join_at,
                ..Default::default()
            });
            sim.schedule(start + spec.join_at, Event::Join(i + 1));
            if let Some(t) = spec.leave_at {
                sim.schedule(start + t, Event::Leave(i + 1));
            }
        }
        sim.start_node(0);
        sim.schedule(start + 500_000, Event::Publish);
        sim
    }

    fn schedule(&mut self, at: Time, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(at, id, event);
    }

    /// One-way delay between two nodes before jitter: the geography.
    fn base_delay(&self, a: usize, b: usize) -> Time {
        let (pa, pb) = (self.nodes[a].pos, self.nodes[b].pos);
        let d = ((pa.0 - pb.0).powi(2) + (pa.1 - pb.1).powi(2)).sqrt();
        self.cfg.base_delay_us + (d * self.cfg.distance_delay_us as f64) as u64
    }

    /// The delay of one message or chunk over a link with one-way delay `base`: plus jitter.
    fn jittered(&mut self, base: Time) -> Time {
        base + if self.cfg.jitter_us > 0 { self.rng.u64(0..=self.cfg.jitter_us) } else { 0 }
    }

    fn conn(&self, conn: ConnId) -> Option<ConnEnd> {
        self.conns.get(conn.0 as usize).copied().flatten()
    }

    fn is_open(&self, conn: ConnId) -> bool {
        let i = conn.0 as usize;
        self.open.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set_open(&mut self, conn: ConnId, open: bool) {
        let i = conn.0 as usize;
        if self.open.len() <= i / 64 {
            self.open.resize(i / 64 + 1, 0);
        }
        if open {
            self.open[i / 64] |= 1 << (i % 64);
        } else {
            self.open[i / 64] &= !(1 << (i % 64));
        }
    }

    fn remove_conn(&mut self, conn: ConnId) -> Option<ConnEnd> {
        self.set_open(conn, false);
        self.conns.get_mut(conn.0 as usize).and_then(Option::take)
    }

    /// Schedules an arrival on `conn`, never before an earlier arrival on the same connection.
    fn arrive(&mut self, at: Time, to: usize, conn: ConnId, payload: Payload) {
        let at = match self.conns.get_mut(conn.0 as usize).and_then(Option::as_mut) {
            Some(end) => {
                let at = end.last_arrival.map_or(at, |last| at.max(last));
                end.last_arrival = Some(at);
                at
            }
            // Gone already: the arrival will find no connection and be dropped.
            None => at,
        };
        self.schedule(at, Event::Arrive { to, conn, payload });
    }

    fn bootstrap(&self) -> Vec<NodeAddr> {
        let mut v = vec![NodeAddr { id: self.nodes[0].key.id(), addrs: vec![sim_addr(0)] }];
        for i in 1..=self.cfg.extra_bootstrap.min(self.cfg.nodes.len()) {
            v.push(NodeAddr { id: self.nodes[i].key.id(), addrs: vec![sim_addr(i)] });
        }
        v
    }

    fn start_node(&mut self, i: usize) {
        let mut config = self.cfg.swarm.clone();
        config.role = if i == 0 { Role::Origin } else { Role::Relay };
        config.seed = self.cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        config.listen = vec![sim_addr(i)];
        if i != 0 {
            config.push_slots = config.push_slots_for_upload(self.nodes[i].upload_bps, self.cfg.bitrate_bps);
        }
        let mut swarm = Swarm::new(config, self.stream_key.id(), self.nodes[i].key.id());
        if i != 0 {
            let boot: Vec<NodeAddr> = self.bootstrap().into_iter().filter(|p| p.id != self.nodes[i].key.id()).collect();
            swarm.add_peers(self.now, boot);
        }
        self.nodes[i].swarm = Some(swarm);
        if i != 0 {
            self.progress.present += 1;
        }
        self.pump(i);
    }

    /// Runs to the end and returns what every node saw.
    pub fn run(self) -> SimResult {
        self.run_with_progress(Time::MAX, |_| {})
    }

    /// Runs to the end like [`Sim::run`], and calls `on_progress` each time another `every_us` of
    /// virtual time has gone by. The callback only watches: the run and its result are the same.
    pub fn run_with_progress(mut self, every_us: Time, mut on_progress: impl FnMut(&Progress)) -> SimResult {
        let begin = self.now;
        let drain = 1_500_000;
        let end = begin + self.cfg.duration_us + drain;
        self.progress.total_us = end - begin;
        let every_us = every_us.max(1);
        let mut next_report = begin.saturating_add(every_us);
        while let Some((at, _, event)) = self.queue.pop() {
            if at > end {
                break;
            }
            while at >= next_report {
                self.progress.elapsed_us = next_report - begin;
                self.progress.events = self.out.events;
                self.progress.published = self.out.published;
                self.progress.origin_bytes_up = self.out.origin_bytes_up;
                on_progress(&self.progress);
                next_report = next_report.saturating_add(every_us);
            }
            self.now = at;
            self.out.events += 1;
            self.handle(event);
        }
        self.finish()
    }

    fn handle(&mut self, event: Event) {
        let now = self.now;
        match event {
            Event::Publish => {
                let start = self.now - (self.next_seq - 1000) * u64::from(self.cfg.chunk_us);
                let _ = start;
                let seq = self.next_seq;
                self.next_seq += 1;
                let idx = seq - 1000;
                let mut flags = Flags::empty();
                if idx.is_multiple_of(self.cfg.random_access_every.max(1)) {
                    flags |= Flags::RANDOM_ACCESS;
                }
                let payload = Bytes::from(seq.to_be_bytes().to_vec());
                let chunk = Verified::sign(&self.stream_key, seq, now, self.cfg.chunk_us, flags, payload);
                self.origin_chunks.insert(seq, chunk.header().payload_hash);
                self.out.published += 1;
                self.out.stream_bytes += self.chunk_bytes;
                if let Some(s) = self.nodes[0].swarm.as_mut() {
                    s.publish(now, chunk);
                }
                self.pump(0);
                let published_for = idx * u64::from(self.cfg.chunk_us);
                if published_for + u64::from(self.cfg.chunk_us) < self.cfg.duration_us {
                    self.schedule(now + u64::from(self.cfg.chunk_us), Event::Publish);
                }
            }
            Event::Timer(i) => {
                if self.nodes[i].timer == Some(now) {
                    self.nodes[i].timer = None;
                    if let Some(s) = self.nodes[i].swarm.as_mut() {
                        s.handle_timeout(now);
                    }
                    self.pump(i);
                }
            }
            Event::Join(i) => self.start_node(i),
            Event::Leave(i) => {
                if let Some(s) = self.nodes[i].swarm.take() {
                    self.record_end(i, &s, false);
                    self.progress.present -= 1;
                }
                let gone: Vec<ConnId> = (0..self.conns.len())
                    .filter(|&c| self.conns[c].is_some_and(|end| end.owner == i))
                    .map(|c| ConnId(c as u64))
                    .collect();
                for c in gone {
                    if let Some(end) = self.remove_conn(c) {
                        let t = now + self.cfg.idle_timeout_us;
                        self.schedule(t, Event::Closed { node: end.peer, conn: end.peer_conn });
                    }
                }
            }
            Event::Connected { node, conn, peer, outbound } => {
                if !self.is_open(conn) {
                    return;
                }
                let peer_id = self.nodes[peer].key.id();
                let addr = sim_addr(peer);
                if let Some(s) = self.nodes[node].swarm.as_mut() {
                    s.handle_connected(now, conn, peer_id, addr, outbound);
                }
                self.pump(node);
            }
            Event::ConnectFailed { node, peer } => {
                if let Some(s) = self.nodes[node].swarm.as_mut() {
                    s.handle_connect_failed(now, peer);
                }
                self.pump(node);
            }
            Event::Arrive { to, conn, payload } => {
                if !self.is_open(conn) || self.nodes[to].swarm.is_none() {
                    return;
                }
                match payload {
                    Payload::Message(m) => {
                        if let Some(s) = self.nodes[to].swarm.as_mut() {
                            s.handle_message(now, conn, m);
                        }
                    }
                    Payload::Chunk(c) => {
                        if let Some(s) = self.nodes[to].swarm.as_mut() {
                            s.handle_chunk(now, conn, c);
                        }
                    }
                    Payload::Raw(r) => match r.verify(&self.verifier) {
                        Ok(c) => {
                            if let Some(s) = self.nodes[to].swarm.as_mut() {
                                s.handle_chunk(now, conn, c);
                            }
                        }
                        Err(_) => {
                            if let Some(s) = self.nodes[to].swarm.as_mut() {
                                s.handle_misbehaviour(now, conn, Misbehaviour::BadChunk);
                            }
                        }
                    },
                }
                self.pump(to);
            }
            Event::Sent { node, conn, seq, delivered } => {
                if let Some(s) = self.nodes[node].swarm.as_mut() {
                    s.handle_chunk_sent(now, conn, seq, delivered);
                }
                self.pump(node);
            }
            Event::UplinkFree(i) => {
                self.nodes[i].uplink_busy = false;
                self.start_upload(i);
            }
            Event::Closed { node, conn } => {
                self.remove_conn(conn);
                if let Some(s) = self.nodes[node].swarm.as_mut() {
                    s.handle_disconnected(now, conn);
                }
                self.pump(node);
            }
        }
    }

    /// Carries out everything node `i` wants done.
    fn pump(&mut self, i: usize) {
        let now = self.now;
        loop {
            let Some(output) = self.nodes[i].swarm.as_mut().and_then(Swarm::poll_output) else { break };
            match output {
                Output::Send { conn, message } => {
                    let Some(end) = self.conn(conn) else { continue };
                    let d = self.jittered(end.delay_us);
                    self.arrive(now + d, end.peer, end.peer_conn, Payload::Message(message));
                }
                Output::SendChunk { conn, chunk, priority } => {
                    let seq = chunk.seq();
                    if !self.is_open(conn) {
                        self.schedule(now, Event::Sent { node: i, conn, seq, delivered: false });
                        continue;
                    };
                    let payload = match self.nodes[i].adversary {
                        None => Payload::Chunk(chunk),
                        Some(Adversary::Silent) => {
                            self.schedule(now, Event::Sent { node: i, conn, seq, delivered: true });
                            continue;
                        }
                        Some(Adversary::ForgePayload) => {
                            let mut r = chunk.into_received();
                            let mut p = r.payload.to_vec();
                            if let Some(b) = p.first_mut() {
                                *b ^= 0xff;
                            }
                            r.payload = Bytes::from(p);
                            Payload::Raw(Box::new(r))
                        }
                        Some(Adversary::WrongKey) => {
                            let h = *chunk.header();
                            let forged = Verified::sign(
                                &self.forger,
                                h.seq,
                                h.capture_us,
                                h.duration_us,
                                h.flags,
                                chunk.payload().clone(),
                            );
                            Payload::Raw(Box::new(forged.into_received()))
                        }
                    };
                    let order = self.next_event;
                    self.next_event += 1;
                    self.nodes[i].uplink.insert((Reverse(priority), order), (conn, seq, payload));
                    self.start_upload(i);
                }
                Output::CancelChunk { conn, seq } => {
                    // Only a chunk still waiting for the uplink can be taken back.
                    let queued =
                        self.nodes[i].uplink.iter().find(|(_, (c, s, _))| *c == conn && *s == seq).map(|(k, _)| *k);
                    if let Some(k) = queued {
                        self.nodes[i].uplink.remove(&k);
                        self.schedule(now, Event::Sent { node: i, conn, seq, delivered: false });
                    }
                }
                Output::Connect(addr) => {
                    let Some(&peer) = self.by_id.get(&addr.id) else { continue };
                    if self.nodes[peer].swarm.is_none() {
                        self.schedule(now + 1_000_000, Event::ConnectFailed { node: i, peer: addr.id });
                        continue;
                    }
                    let (a, b) = (ConnId(self.next_conn), ConnId(self.next_conn + 1));
                    self.next_conn += 2;
                    let base = self.base_delay(i, peer);
                    let d = self.jittered(base);
                    // Nothing reaches the dialer before its handshake completes.
                    let ends = [
                        ConnEnd { owner: i, peer, peer_conn: b, delay_us: base, last_arrival: Some(now + 2 * d) },
                        ConnEnd { owner: peer, peer: i, peer_conn: a, delay_us: base, last_arrival: Some(now + d) },
                    ];
                    if self.conns.len() <= b.0 as usize {
                        self.conns.resize(b.0 as usize + 1, None);
                    }
                    self.conns[a.0 as usize] = Some(ends[0]);
                    self.conns[b.0 as usize] = Some(ends[1]);
                    self.set_open(a, true);
                    self.set_open(b, true);
                    self.schedule(now + d, Event::Connected { node: peer, conn: b, peer: i, outbound: false });
                    self.schedule(now + 2 * d, Event::Connected { node: i, conn: a, peer, outbound: true });
                }
                Output::Disconnect { conn, .. } => {
                    if let Some(end) = self.remove_conn(conn) {
                        // A close does not overtake what was sent before it (the goodbye first).
                        let d = self.jittered(end.delay_us);
                        let last = self.conn(end.peer_conn).and_then(|e| e.last_arrival);
                        let at = last.map_or(now + d, |last| (now + d).max(last + 1));
                        self.schedule(at, Event::Closed { node: end.peer, conn: end.peer_conn });
                    }
                }
                Output::Deliver(chunk) => {
                    if i > 0 {
                        let r = &mut self.results[i - 1];
                        r.delivered += 1;
                        r.first_delivery_at.get_or_insert(now);
                        self.progress.delivered += 1;
                        if self.origin_chunks.get(&chunk.seq()) != Some(&chunk.header().payload_hash) {
                            r.forged_delivered += 1;
                        }
                    }
                }
                Output::Skip { .. } => {
                    if i > 0 {
                        self.results[i - 1].skipped += 1;
                        self.progress.skipped += 1;
                    }
                }
                Output::Arrived { seq, capture_us, path, .. } => {
                    if i > 0 && path != Path::Local {
                        let r = &mut self.results[i - 1];
                        r.latencies_us.push((now, now.saturating_sub(capture_us)));
                        if !self.origin_chunks.contains_key(&seq) {
                            self.out.forged_relayed += 1;
                        }
                    }
                }
            }
        }
        if let Some(s) = self.nodes[i].swarm.as_ref() {
            if i > 0 {
                let r = &mut self.results[i - 1];
                r.max_window_len = r.max_window_len.max(s.window().len());
            }
            if let Some(t) = s.poll_timeout() {
                let t = t.max(now);
                if self.nodes[i].timer.is_none_or(|old| t < old || old < now) {
                    self.nodes[i].timer = Some(t);
                    self.schedule(t, Event::Timer(i));
                }
            }
        }
    }

    /// Starts sending the most urgent queued chunk if node `i`'s uplink is idle.
    fn start_upload(&mut self, i: usize) {
        if self.nodes[i].uplink_busy {
            return;
        }
        let Some((_, (conn, seq, payload))) = self.nodes[i].uplink.pop_first() else { return };
        let now = self.now;
        let bits = self.chunk_bytes * 8;
        let finish = now + bits * 1_000_000 / self.nodes[i].upload_bps.max(1);
        self.nodes[i].uplink_busy = true;
        self.schedule(finish, Event::UplinkFree(i));
        // (Once on the wire it is as good as delivered: links here do not lose what they carry.)
        self.schedule(finish, Event::Sent { node: i, conn, seq, delivered: true });
        self.out.chunk_bytes += self.chunk_bytes;
        if i == 0 {
            self.out.origin_bytes_up += self.chunk_bytes;
        } else {
            self.results[i - 1].chunk_bytes_up += self.chunk_bytes;
        }
        if let Some(end) = self.conn(conn) {
            let d = self.jittered(end.delay_us);
            self.arrive(finish + d, end.peer, end.peer_conn, payload);
        }
    }

    fn record_end(&mut self, i: usize, s: &Swarm, present: bool) {
        if i == 0 {
            return;
        }
        let r = &mut self.results[i - 1];
        r.present_at_end = present;
        r.counters = s.counters().clone();
        r.cursor_and_edge = (s.playback_cursor(), s.live_edge());
        r.id = s.node_id().fmt_short();
        if let Some(parent) = s.parents().first().copied().flatten()
            && let Some(&p) = self.by_id.get(&parent)
        {
            let (pa, pb) = (self.nodes[i].pos, self.nodes[p].pos);
            let d = ((pa.0 - pb.0).powi(2) + (pa.1 - pb.1).powi(2)).sqrt();
            let delay = self.cfg.base_delay_us + (d * self.cfg.distance_delay_us as f64) as u64;
            r.parent = Some((parent.fmt_short(), delay));
        }
        self.out.control_bytes += s.counters().control_bytes_up;
    }

    fn depth_of(&self, i: usize) -> Option<u32> {
        // Follow substream 0's parents up to the origin.
        let mut at = i;
        for d in 0..64u32 {
            if at == 0 {
                return Some(d);
            }
            let parent = self.nodes[at].swarm.as_ref()?.parents().first().copied().flatten()?;
            at = *self.by_id.get(&parent)?;
        }
        None
    }

    /// Counts (node, substream) pairs whose chain of parents comes back to a node already on it.
    fn parent_loops(&self) -> u64 {
        let k = usize::from(self.cfg.swarm.substreams.max(1));
        let mut loops = 0;
        for i in 1..self.nodes.len() {
            for s in 0..k {
                let mut seen = std::collections::HashSet::new();
                let mut at = i;
                while at != 0 && seen.insert(at) {
                    let parent = self.nodes[at].swarm.as_ref().and_then(|sw| sw.parents().get(s).copied().flatten());
                    match parent.and_then(|p| self.by_id.get(&p)) {
                        Some(&p) => at = p,
                        None => break,
                    }
                }
                if at != 0 && seen.contains(&at) && self.nodes[at].swarm.is_some() {
                    let parent = self.nodes[at].swarm.as_ref().and_then(|sw| sw.parents().get(s).copied().flatten());
                    if parent.and_then(|p| self.by_id.get(&p)).is_some_and(|p| seen.contains(p)) {
                        loops += 1;
                    }
                }
            }
        }
        loops
    }

    fn finish(mut self) -> SimResult {
        for i in 0..self.nodes.len() {
            if let Some(s) = self.nodes[i].swarm.take() {
                if i == 0 {
                    self.out.control_bytes += s.counters().control_bytes_up;
                    self.out.origin_counters = s.counters().clone();
                }
                self.record_end(i, &s, true);
                self.nodes[i].swarm = Some(s);
            }
        }
        for i in 1..self.nodes.len() {
            let depth = self.depth_of(i);
            self.results[i - 1].depth = depth;
        }
        self.out.parent_loops = self.parent_loops();
        self.out.nodes = std::mem::take(&mut self.results);
        self.out.origin_id = self.nodes[0].key.id().fmt_short();
        self.out
    }
}
