//! The node: drives the sans-IO [`Swarm`] state machine with real QUIC connections and a real clock.
//!
//! [`Node::bind`] gives a [`Node`] (the driver, whose [`Node::run`] future the caller runs: the library
//! spawns nothing behind your back) and a [`NodeHandle`] (cheap to clone: publish chunks on the origin,
//! read stats, shut down). Chunks delivered in order at the playback cursor come out of
//! [`Node::take_deliveries`] for an embedding player.
//!
//! Inside `run`, one task per connection moves bytes: it writes the control messages the state machine
//! asks for, reads control messages, and reads and **verifies** every incoming chunk (hash and
//! signature, on the connection's task so verification of different neighbours runs in parallel)
//! before the state machine ever sees it. A chunk that fails verification, or a malformed message,
//! is reported as misbehaviour and the state machine bans the sender. All these tasks live in a
//! `JoinSet` owned by `run`, so they end when it does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crowdsurf_proto::chunk::{Verified, Verifier};
use crowdsurf_proto::swarm::{self, ConnId, Misbehaviour, Output, Swarm};
use crowdsurf_proto::wire::{GoodbyeReason, Message, NodeAddr};
use crowdsurf_proto::{NodeId, NodeKey, StreamId, Ticket};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{Instrument, debug, info, info_span, trace, warn};

use crate::net::{Connection, Endpoint, EndpointConfig, NetError};
use crate::stats::{NodeStats, StatsCell};

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's own key (its identity).
    pub key: NodeKey,
    /// The stream carried.
    pub stream: StreamId,
    /// QUIC endpoint settings (listen address, upload cap, ...).
    pub endpoint: EndpointConfig,
    /// Swarm settings (role, neighbours, latency, ...).
    pub swarm: swarm::Config,
    /// Nodes to dial first (from the ticket).
    pub bootstrap: Vec<NodeAddr>,
    /// The longest a single chunk may take to arrive once its stream has opened.
    pub chunk_read_timeout: Duration,
    /// The most chunk streams read at once from one neighbour; more are refused unread.
    pub max_chunk_reads_per_neighbour: usize,
    /// An address to announce instead of the bound one (e.g. 127.0.0.1 when bound to 0.0.0.0).
    pub announce: Option<SocketAddr>,
    /// The most chunk streams being sent to one neighbour at once; a chunk for a neighbour that is
    /// this far behind is not queued (a reader that never drains cannot make us buffer without end).
    pub max_chunk_sends_per_neighbour: usize,
    /// A chunk not delivered to a neighbour within this is abandoned (its deadline has passed).
    pub chunk_send_timeout: Duration,
    /// The most handshakes in progress at once. Beyond it, attempts from a validated address are
    /// refused (one CONNECTION_REFUSED packet, no state); unvalidated ones get a Retry (see
    /// `retry_above_handshakes`).
    pub max_pending_handshakes: usize,
    /// With this many handshakes in progress, an attempt whose source address is not yet validated
    /// is answered with a stateless QUIC Retry instead of a handshake: a spoofed-source flood then
    /// costs one small packet per attempt and holds no handshake slot, while a real dialer comes
    /// back with the token one round trip later. Below it, handshakes start at once (no extra round
    /// trip in normal times). Zero: always ask for validation.
    pub retry_above_handshakes: usize,
}

impl NodeConfig {
    /// Defaults for a node of `stream` with key `key`, listening on `listen`.
    pub fn new(key: NodeKey, stream: StreamId, listen: SocketAddr) -> Self {
        let mut endpoint = EndpointConfig::new(listen);
        // A live stream cannot wait long for a neighbour that vanished without a goodbye: with chunks
        // or announcements flowing several times a second, 3 s of silence means it is gone.
        endpoint.idle_timeout = Duration::from_secs(3);
        endpoint.keep_alive = Duration::from_millis(750);
        NodeConfig {
            key,
            stream,
            endpoint,
            swarm: swarm::Config::default(),
            bootstrap: Vec::new(),
            chunk_read_timeout: Duration::from_secs(5),
            max_chunk_reads_per_neighbour: 32,
            announce: None,
            max_chunk_sends_per_neighbour: 32,
            chunk_send_timeout: Duration::from_secs(3),
            max_pending_handshakes: 64,
            retry_above_handshakes: 16,
        }
    }
}

/// Why a node could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The stream id is not a valid ed25519 public key.
    #[error("the stream id is not a valid public key")]
    BadStreamId,
}

/// What the node hands an embedding player, in order.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// The next chunk at the playback cursor (verified).
    Chunk(Verified),
    /// This chunk missed its deadline and will not come.
    Skip(u64),
}

enum Command {
    Publish(Verified),
    Shutdown,
}

/// What a node did with incoming connection attempts, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandshakeStats {
    /// Attempts seen (each first packet of a new connection, counting retried ones again when they
    /// come back with their token).
    pub attempts: u64,
    /// Answered with a Retry (address validation asked, no state kept).
    pub retried: u64,
    /// Refused with CONNECTION_REFUSED: validated, but the handshake cap was reached.
    pub refused: u64,
    /// Handshakes started.
    pub started: u64,
    /// Of those, completed (the dialer proved its node key).
    pub completed: u64,
    /// Of those, failed or timed out.
    pub failed: u64,
    /// The most handshakes in progress at once.
    pub peak_pending: u64,
}

/// A neighbour the node reported as misbehaving: who, and what it did (the driver's own record,
/// kept beside the state machine's ban list so tests and operators can see who sent what).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offence {
    /// The neighbour's node id (from its TLS handshake).
    pub node: NodeId,
    /// What it did.
    pub what: Misbehaviour,
}

/// The most offences a node remembers (the oldest are forgotten first).
const MAX_OFFENCES: usize = 4096;

#[derive(Debug, Default)]
struct HandshakeCounters {
    pending: AtomicUsize,
    attempts: AtomicU64,
    retried: AtomicU64,
    refused: AtomicU64,
    started: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    peak_pending: AtomicU64,
}

impl HandshakeCounters {
    fn snapshot(&self) -> HandshakeStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HandshakeStats {
            attempts: get(&self.attempts),
            retried: get(&self.retried),
            refused: get(&self.refused),
            started: get(&self.started),
            completed: get(&self.completed),
            failed: get(&self.failed),
            peak_pending: get(&self.peak_pending),
        }
    }
    fn bump(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}

/// Controls a running node. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    commands: mpsc::UnboundedSender<Command>,
    stats: StatsCell,
    addr: NodeAddr,
    handshakes: Arc<HandshakeCounters>,
    offences: Arc<std::sync::Mutex<std::collections::VecDeque<Offence>>>,
    link: Option<crate::net::emulate::LinkHandle>,
}

impl NodeHandle {
    /// On the origin: publish a signed chunk to the swarm. Returns false if the node has stopped.
    pub fn publish(&self, chunk: Verified) -> bool {
        self.commands.send(Command::Publish(chunk)).is_ok()
    }
    /// Asks the node to say goodbye to its neighbours and stop.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
    /// A snapshot of the node's figures.
    pub fn stats(&self) -> NodeStats {
        self.stats.snapshot()
    }
    /// The shared stats cell (for the HTTP endpoint).
    pub fn stats_cell(&self) -> StatsCell {
        self.stats.clone()
    }
    /// This node's id and announced address, as a bootstrap entry for a ticket.
    pub fn node_addr(&self) -> NodeAddr {
        self.addr.clone()
    }
    /// What the node did with incoming connection attempts so far.
    pub fn handshakes(&self) -> HandshakeStats {
        self.handshakes.snapshot()
    }
    /// The emulated link under the node's endpoint (see [`crate::net::EndpointConfig::link`]): to
    /// read its counters or cut the node off the network for a while.
    pub fn link(&self) -> Option<crate::net::emulate::LinkHandle> {
        self.link.clone()
    }
    /// Every neighbour reported as misbehaving so far (the latest 4096), oldest first: e.g. the
    /// senders of chunks that failed verification.
    pub fn offences(&self) -> Vec<Offence> {
        self.offences.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }
}

/// Events from connection tasks to the driver. `Sent` says whether the receiver took the whole
/// chunk stream (or stopped it, having the chunk already).
enum ConnEvent {
    Up { conn: Connection, outbound: bool },
    DialFailed { node: NodeId, error: NetError },
    Message { id: ConnId, message: Message },
    Chunk { id: ConnId, chunk: Verified },
    Misbehaved { id: ConnId, what: Misbehaviour, why: String },
    Sent { id: ConnId, seq: u64, delivered: bool },
    Down { id: ConnId, why: String },
}

enum ConnCommand {
    Send(Message),
    Close(GoodbyeReason),
}

/// The driver. Run it with [`Node::run`].
pub struct Node {
    config: NodeConfig,
    endpoint: Endpoint,
    swarm: Swarm,
    verifier: Arc<Verifier>,
    commands: mpsc::UnboundedReceiver<Command>,
    stats: StatsCell,
    deliveries: Option<mpsc::UnboundedSender<Delivery>>,
    delivery_rx: Option<mpsc::UnboundedReceiver<Delivery>>,
    clock: Clock,
    handshakes: Arc<HandshakeCounters>,
    offences: Arc<std::sync::Mutex<std::collections::VecDeque<Offence>>>,
}

/// Wall-clock microseconds, made monotonic: chunk capture times are wall clock, but timers must never
/// run backwards when the system clock is stepped.
#[derive(Debug, Clone, Copy)]
struct Clock {
    base_instant: Instant,
    base_us: u64,
}

impl Clock {
    fn new() -> Self {
        let base_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        Clock { base_instant: Instant::now(), base_us }
    }
    fn now_us(&self) -> u64 {
        self.base_us + self.base_instant.elapsed().as_micros() as u64
    }
    fn instant_at(&self, us: u64) -> Instant {
        self.base_instant + Duration::from_micros(us.saturating_sub(self.base_us))
    }
}

impl Node {
    /// Binds the endpoint. Must be called inside a tokio runtime.
    pub fn bind(config: NodeConfig) -> Result<(Node, NodeHandle), NodeError> {
        let verifier = Verifier::new(config.stream).map_err(|_| NodeError::BadStreamId)?;
        let endpoint = Endpoint::bind(&config.key, config.endpoint.clone())?;
        let mut local = endpoint.local_addr();
        if local.ip().is_unspecified() {
            local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let announce = config.announce.unwrap_or(local);
        let mut swarm_config = config.swarm.clone();
        swarm_config.listen = vec![announce];
        let swarm = Swarm::new(swarm_config, config.stream, config.key.id());
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = StatsCell::new(config.key.id(), config.swarm.role);
        let handshakes = Arc::new(HandshakeCounters::default());
        let offences = Arc::default();
        let handle = NodeHandle {
            commands: tx,
            stats: stats.clone(),
            addr: NodeAddr { id: config.key.id(), addrs: vec![announce] },
            handshakes: handshakes.clone(),
            offences: Arc::clone(&offences),
            link: endpoint.link(),
        };
        let (dtx, drx) = mpsc::unbounded_channel();
        info!(node = %config.key.id().fmt_short(), addr = %announce, role = ?config.swarm.role, "node listening");
        let node = Node {
            config,
            endpoint,
            swarm,
            verifier: Arc::new(verifier),
            commands: rx,
            stats,
            deliveries: Some(dtx),
            delivery_rx: Some(drx),
            clock: Clock::new(),
            handshakes,
            offences,
        };
        Ok((node, handle))
    }

    /// The receiving end of in-order deliveries (take it once, before `run`). If nobody takes it,
    /// deliveries are dropped.
    pub fn take_deliveries(&mut self) -> Option<mpsc::UnboundedReceiver<Delivery>> {
        self.delivery_rx.take()
    }

    /// The bound socket address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// A ticket for this node's stream that bootstraps through this node.
    pub fn ticket(&self) -> Ticket {
        Ticket::new(
            self.config.stream,
            vec![NodeAddr { id: self.config.key.id(), addrs: self.swarm.config().listen.clone() }],
        )
    }

    /// Runs the node until [`NodeHandle::shutdown`] (or until every handle is dropped).
    pub async fn run(self) -> Result<(), NodeError> {
        let span = info_span!("node", id = %self.config.key.id().fmt_short());
        self.drive().instrument(span).await
    }

    async fn drive(mut self) -> Result<(), NodeError> {
        if self.delivery_rx.take().is_some() {
            // Nobody took the deliveries: do not queue them.
            self.deliveries = None;
        }
        let (events_tx, mut events) = mpsc::unbounded_channel::<ConnEvent>();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut conns: HashMap<ConnId, (mpsc::UnboundedSender<ConnCommand>, Connection)> = HashMap::new();
        let mut sends: HashMap<(ConnId, u64), AbortHandle> = HashMap::new();
        let mut next_conn = 1u64;
        // Chunks handed to the state machine since the last pump, for their arrival latency.
        let mut arrivals: HashMap<u64, (Verified, u64)> = HashMap::new();
        let now = self.clock.now_us();
        self.swarm.add_peers(now, self.config.bootstrap.clone());
        let mut stats_at = Instant::now();
        loop {
            self.pump(&events_tx, &mut tasks, &mut conns, &mut sends, &mut arrivals);
            arrivals.clear();
            if stats_at.elapsed() >= Duration::from_millis(200) {
                stats_at = Instant::now();
                self.stats.update_from(&self.swarm, self.clock.now_us());
            }
            let wake = self
                .swarm
                .poll_timeout()
                .map_or_else(|| Instant::now() + Duration::from_secs(1), |t| self.clock.instant_at(t));
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {
                    self.swarm.handle_timeout(self.clock.now_us());
                }
                command = self.commands.recv() => match command {
                    Some(Command::Publish(chunk)) => self.swarm.publish(self.clock.now_us(), chunk),
                    Some(Command::Shutdown) | None => break,
                },
                incoming = self.endpoint.accept_incoming() => {
                    let Some(incoming) = incoming else { break };
                    self.admit(incoming, &events_tx, &mut tasks);
                }
                Some(event) = events.recv() => {
                    let now = self.clock.now_us();
                    match event {
                        ConnEvent::Up { conn, outbound } => {
                            let id = ConnId(next_conn);
                            next_conn += 1;
                            let (tx, rx) = mpsc::unbounded_channel();
                            let node = conn.remote_id();
                            let addr = conn.remote_addr();
                            conns.insert(id, (tx, conn.clone()));
                            let span = info_span!("peer", id = %node.fmt_short(), conn = id.0);
                            tasks.spawn(connection_task(ConnTask {
                                id,
                                conn,
                                outbound,
                                commands: rx,
                                events: events_tx.clone(),
                                verifier: self.verifier.clone(),
                                read_timeout: self.config.chunk_read_timeout,
                                max_reads: self.config.max_chunk_reads_per_neighbour,
                            }).instrument(span));
                            debug!(peer = %node.fmt_short(), %addr, outbound, conn = id.0, "connected");
                            self.swarm.handle_connected(now, id, node, addr, outbound);
                        }
                        ConnEvent::DialFailed { node, error } => {
                            debug!(peer = %node.fmt_short(), %error, "dial failed");
                            self.swarm.handle_connect_failed(now, node);
                        }
                        ConnEvent::Message { id, message } => self.swarm.handle_message(now, id, message),
                        ConnEvent::Chunk { id, chunk } => {
                            // Its arrival latency is recorded when the state machine stores it
                            // (`Output::Arrived`): duplicates and replays of chunks long gone do
                            // not count, or a replayer could skew the figures.
                            arrivals.insert(chunk.seq(), (chunk.clone(), now));
                            self.swarm.handle_chunk(now, id, chunk);
                        }
                        ConnEvent::Misbehaved { id, what, why } => {
                            let node = conns.get(&id).map(|(_, c)| c.remote_id());
                            warn!(conn = id.0, peer = ?node.map(|n| n.fmt_short()), ?what, %why, "neighbour misbehaved; dropping and banning it");
                            if let Some(node) = node {
                                let mut offences = self.offences.lock().unwrap_or_else(|p| p.into_inner());
                                if offences.len() >= MAX_OFFENCES {
                                    offences.pop_front();
                                }
                                offences.push_back(Offence { node, what });
                            }
                            self.swarm.handle_misbehaviour(now, id, what);
                        }
                        ConnEvent::Sent { id, seq, delivered } => {
                            sends.remove(&(id, seq));
                            self.swarm.handle_chunk_sent(now, id, seq, delivered);
                        }
                        ConnEvent::Down { id, why } => {
                            if conns.remove(&id).is_some() {
                                debug!(conn = id.0, %why, "disconnected");
                                self.swarm.handle_disconnected(now, id);
                            }
                        }
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        // Say goodbye, give the goodbyes a moment to leave, then close.
        for (tx, _) in conns.values() {
            let _ = tx.send(ConnCommand::Send(Message::Goodbye {
                reason: GoodbyeReason::Leaving,
                peers: Vec::new(),
                message: "shutting down".into(),
            }));
            let _ = tx.send(ConnCommand::Close(GoodbyeReason::Leaving));
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), async { while tasks.join_next().await.is_some() {} })
            .await;
        tasks.shutdown().await;
        self.stats.update_from(&self.swarm, self.clock.now_us());
        self.endpoint.close();
        info!(node = %self.config.key.id().fmt_short(), "node stopped");
        Ok(())
    }

    /// Decides what to do with one connection attempt: start its handshake, ask it to prove its
    /// address (Retry), or refuse it. Never waits.
    fn admit(
        &self,
        incoming: crate::net::Accepting,
        events: &mpsc::UnboundedSender<ConnEvent>,
        tasks: &mut JoinSet<()>,
    ) {
        let counters = &self.handshakes;
        HandshakeCounters::bump(&counters.attempts);
        let pending = counters.pending.load(Ordering::Relaxed);
        let from = incoming.remote_addr();
        let incoming = if pending >= self.config.retry_above_handshakes && !incoming.remote_address_validated() {
            match incoming.retry() {
                Ok(()) => {
                    HandshakeCounters::bump(&counters.retried);
                    trace!(%from, pending, "many handshakes at once; asked for address validation");
                    return;
                }
                Err(incoming) => *incoming,
            }
        } else {
            incoming
        };
        if pending >= self.config.max_pending_handshakes {
            HandshakeCounters::bump(&counters.refused);
            debug!(%from, pending, "too many handshakes at once; refusing a validated attempt");
            incoming.refuse();
            return;
        }
        let now_pending = counters.pending.fetch_add(1, Ordering::Relaxed) + 1;
        counters.peak_pending.fetch_max(now_pending as u64, Ordering::Relaxed);
        HandshakeCounters::bump(&counters.started);
        let counters = counters.clone();
        let tx = events.clone();
        tasks.spawn(
            async move {
                let result = incoming.finish().await;
                counters.pending.fetch_sub(1, Ordering::Relaxed);
                match result {
                    Ok(conn) => {
                        HandshakeCounters::bump(&counters.completed);
                        let _ = tx.send(ConnEvent::Up { conn, outbound: false });
                    }
                    Err(e) => {
                        HandshakeCounters::bump(&counters.failed);
                        debug!(error = %e, "inbound handshake failed");
                    }
                }
            }
            .in_current_span(),
        );
    }

    /// Carries out everything the state machine wants done.
    fn pump(
        &mut self,
        events: &mpsc::UnboundedSender<ConnEvent>,
        tasks: &mut JoinSet<()>,
        conns: &mut HashMap<ConnId, (mpsc::UnboundedSender<ConnCommand>, Connection)>,
        sends: &mut HashMap<(ConnId, u64), AbortHandle>,
        arrivals: &mut HashMap<u64, (Verified, u64)>,
    ) {
        while let Some(output) = self.swarm.poll_output() {
            match output {
                Output::Send { conn, message } => {
                    if let Some((tx, _)) = conns.get(&conn) {
                        let _ = tx.send(ConnCommand::Send(message));
                    }
                }
                Output::SendChunk { conn, chunk, priority } => {
                    let seq = chunk.seq();
                    let Some((_, connection)) = conns.get(&conn) else {
                        self.swarm.handle_chunk_sent(self.clock.now_us(), conn, seq, false);
                        continue;
                    };
                    let in_flight = sends.keys().filter(|(c, _)| *c == conn).count();
                    if in_flight >= self.config.max_chunk_sends_per_neighbour {
                        debug!(
                            conn = conn.0,
                            seq, in_flight, "neighbour is not draining its chunk streams; not queueing more"
                        );
                        self.swarm.handle_chunk_sent(self.clock.now_us(), conn, seq, false);
                        continue;
                    }
                    let connection = connection.clone();
                    let tx = events.clone();
                    let timeout = self.config.chunk_send_timeout;
                    let handle = tasks.spawn(
                        async move {
                            // Past the timeout the chunk is useless to the receiver: dropping the send
                            // resets the stream.
                            let delivered =
                                match tokio::time::timeout(timeout, connection.send_chunk(&chunk, priority)).await {
                                    Ok(Ok(())) => true,
                                    // It stopped the stream: it has the chunk already (or it is
                                    // misbehaving, which is handled elsewhere); either way it is there.
                                    Ok(Err(NetError::StreamStopped { .. })) => true,
                                    Ok(Err(e)) => {
                                        trace!(seq, error = %e, "chunk send ended early");
                                        false
                                    }
                                    Err(_) => {
                                        debug!(seq, "chunk send timed out; abandoned");
                                        false
                                    }
                                };
                            let _ = tx.send(ConnEvent::Sent { id: conn, seq, delivered });
                        }
                        .in_current_span(),
                    );
                    if let Some(old) = sends.insert((conn, seq), handle) {
                        old.abort();
                    }
                }
                Output::CancelChunk { conn, seq } => {
                    if let Some(handle) = sends.remove(&(conn, seq)) {
                        // Aborting drops the send future, which resets the stream.
                        handle.abort();
                        self.swarm.handle_chunk_sent(self.clock.now_us(), conn, seq, false);
                    }
                }
                Output::Connect(addr) => {
                    let endpoint = self.endpoint.clone();
                    let tx = events.clone();
                    tasks.spawn(
                        async move {
                            let event = match endpoint.connect(&addr).await {
                                Ok(conn) => ConnEvent::Up { conn, outbound: true },
                                Err(error) => ConnEvent::DialFailed { node: addr.id, error },
                            };
                            let _ = tx.send(event);
                        }
                        .in_current_span(),
                    );
                }
                Output::Disconnect { conn, reason } => {
                    if let Some((tx, _)) = conns.remove(&conn) {
                        let _ = tx.send(ConnCommand::Close(reason));
                    }
                }
                Output::Deliver(chunk) => {
                    self.stats.record_delivery(&chunk, self.clock.now_us(), self.swarm.origin_offset().0);
                    if let Some(tx) = &self.deliveries {
                        let _ = tx.send(Delivery::Chunk(chunk));
                    }
                }
                Output::Skip { seq } => {
                    debug!(seq, "chunk missed its deadline; skipped");
                    if let Some(tx) = &self.deliveries {
                        let _ = tx.send(Delivery::Skip(seq));
                    }
                }
                Output::Arrived { seq, .. } => {
                    if let Some((chunk, at)) = arrivals.remove(&seq) {
                        self.stats.record_arrival(&chunk, at, self.swarm.origin_offset().0);
                    }
                }
            }
        }
    }
}

struct ConnTask {
    id: ConnId,
    conn: Connection,
    outbound: bool,
    commands: mpsc::UnboundedReceiver<ConnCommand>,
    events: mpsc::UnboundedSender<ConnEvent>,
    verifier: Arc<Verifier>,
    read_timeout: Duration,
    max_reads: usize,
}

/// One neighbour's bytes: control messages both ways, chunk streams in, each chunk verified here.
async fn connection_task(mut t: ConnTask) {
    let id = t.id;
    let why = run_connection(&mut t).await;
    let _ = t.events.send(ConnEvent::Down { id, why });
}

/// Ends the connection after the messages already queued (a goodbye among them) have had a moment to
/// reach the peer: it usually closes first on reading the goodbye.
async fn close(t: &ConnTask, send: crate::net::ControlSend, reason: GoodbyeReason) -> String {
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(300), t.conn.closed()).await;
    t.conn.close(reason, "");
    format!("closed by us ({reason:?})")
}

async fn run_connection(t: &mut ConnTask) -> String {
    let id = t.id;
    let control = if t.outbound { t.conn.open_control().await } else { t.conn.accept_control().await };
    let (mut send, mut recv) = match control {
        Ok(c) => c,
        Err(e) => return format!("no control stream: {e}"),
    };
    let mut reads: JoinSet<Result<Verified, (Misbehaviour, String)>> = JoinSet::new();
    loop {
        tokio::select! {
            command = t.commands.recv() => match command {
                Some(ConnCommand::Send(message)) => {
                    if let Err(e) = send.send(&message).await {
                        return format!("control send failed: {e}");
                    }
                }
                Some(ConnCommand::Close(reason)) => return close(t, send, reason).await,
                None => return close(t, send, GoodbyeReason::Leaving).await,
            },
            message = recv.recv() => match message {
                Ok(Some(message)) => {
                    let _ = t.events.send(ConnEvent::Message { id, message });
                }
                Ok(None) => return "peer ended the control stream".into(),
                Err(e) if e.is_connection_lost() => return e.to_string(),
                Err(e) => {
                    let _ = t.events.send(ConnEvent::Misbehaved { id, what: Misbehaviour::Malformed, why: e.to_string() });
                    return format!("bad control stream: {e}");
                }
            },
            incoming = t.conn.accept_chunk() => match incoming {
                Ok(incoming) if reads.len() >= t.max_reads => {
                    incoming.refuse();
                    let _ = t.events.send(ConnEvent::Misbehaved {
                        id,
                        what: Misbehaviour::Flood,
                        why: "too many chunk streams at once".into(),
                    });
                }
                Ok(incoming) => {
                    let verifier = t.verifier.clone();
                    let timeout = t.read_timeout;
                    reads.spawn(async move {
                        match incoming.read(timeout).await {
                            Ok(received) => received
                                .verify(&verifier)
                                .map_err(|e| (Misbehaviour::BadChunk, e.to_string())),
                            // Resets and timeouts happen to honest peers (cancelled duplicates).
                            Err(NetError::StreamReset { .. }) | Err(NetError::TimedOut) => {
                                Err((Misbehaviour::Flood, String::new()))
                            }
                            Err(e) if e.is_connection_lost() => Err((Misbehaviour::Flood, String::new())),
                            Err(e) => Err((Misbehaviour::Malformed, e.to_string())),
                        }
                    });
                }
                Err(e) => return e.to_string(),
            },
            Some(done) = reads.join_next(), if !reads.is_empty() => match done {
                Ok(Ok(chunk)) => {
                    let _ = t.events.send(ConnEvent::Chunk { id, chunk });
                }
                Ok(Err((_, why))) if why.is_empty() => {}
                Ok(Err((what, why))) => {
                    let _ = t.events.send(ConnEvent::Misbehaved { id, what, why });
                }
                Err(_) => {}
            },
        }
    }
}
