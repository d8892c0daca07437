//! The swarm state machine: membership, push trees, pull repair and playback order, with no I/O.
//!
//! A [`Swarm`] is one node's view of the swarm. It is driven like `quinn-proto`'s `Connection`:
//!
//! - **inputs** are `handle_*` calls (a connection came up or went down, a control message or a verified
//!   chunk arrived, a timer fired) and, on the origin, [`Swarm::publish`];
//! - **outputs** come out of [`Swarm::poll_output`] (send a message, push a chunk on its own stream,
//!   connect, disconnect, deliver a chunk to the local player) and [`Swarm::poll_timeout`] (when to call
//!   [`Swarm::handle_timeout`] next).
//!
//! Time is a plain `u64` of microseconds on the caller's clock (wall-clock µs since the Unix epoch in
//! the real node, virtual µs in the simulator); randomness comes from a seed in [`Config`]. After any
//! `handle_*` call, drain `poll_output` until it returns `None`, then re-arm the timer from
//! `poll_timeout`.
//!
//! ## How chunks spread
//!
//! - **Push trees.** The stream is split into `K` substreams (`seq % K`). For each substream a node picks
//!   one neighbour as its *parent* and sends it `Subscribe`; the parent pushes every chunk of that
//!   substream the moment it has verified it. Every node tells its neighbours, in `Tree`, its depth
//!   in each substream's tree and how many more children it would take; a node subscribes to a
//!   neighbour with room, the shallowest first, then the one whose `Have` announcements arrive
//!   earliest (a moving average of their lag behind the first news of each chunk). A feasibility
//!   bound on the parent's depth keeps the trees free of loops (see `docs/protocol.md`). A parent
//!   that lags, refuses or loses its own path to the origin is replaced. Children that relay are
//!   pushed to first, and a full parent lets a leaf child (one that cannot relay) go when a relay
//!   asks, so relays sit high in the trees and leaves at their edges. A node accepts at
//!   most [`Config::push_slots`] child subscriptions (its upload budget in substreams); the origin only
//!   [`Config::origin_fanout`] per substream, which keeps its upload a small constant multiple of the
//!   bitrate however large the audience.
//! - **Pull repair.** Every node announces each new chunk with `Have`. A chunk a neighbour has but the
//!   push tree has not brought within a grace period is requested: earliest deadline first when its
//!   deadline is near, rarest first otherwise, at most a few requests in flight per neighbour; a
//!   request that times out is sent elsewhere.
//! - **Window and playback.** Chunks live in a [`Window`] of the last `window` sequence numbers. A
//!   playback cursor starts `target_latency` behind the live edge at a random-access chunk, hands
//!   chunks on in order as soon as they are present ([`Output::Deliver`]), and skips a chunk whose
//!   deadline (capture time + target latency) has passed ([`Output::Skip`]).
//!
//! ## Membership
//!
//! Bootstrap nodes come from the ticket; more come from `Peers` messages and from the peers a full node
//! suggests when it refuses us. A node keeps dialling until it has `target_neighbours`, accepts inbound
//! connections up to `max_neighbours` and refuses beyond that with a list of its neighbours, so a flash
//! crowd spreads out. A neighbour that sends a forged chunk, a malformed message or floods requests is
//! disconnected and banned for [`Config::ban_duration_us`].
//!
//! ## Keeping the trees healthy
//!
//! - **Make before break.** A working parent is replaced only after its successor has been asked and
//!   has had a round trip (plus a tick) to refuse; until then the old parent keeps pushing. A refusal
//!   (the origin is usually full) therefore costs nothing, where it used to orphan the substream.
//!   Refused nodes are asked again after a random 2–6 s (the origin after 0.5–2.5 s, since its slots
//!   rotate), so nodes refused together do not come back together.
//! - **Misses.** Any chunk of a substream that had to be pulled counts as a miss of that substream's
//!   parent (whether or not the parent had announced it), so a parent that is itself starved is
//!   replaced, not only one that announces and withholds. A push from the parent resets the count.
//! - **Credit and distrust.** Each neighbour has a credit: +1 for each chunk it sends us, −1 for each
//!   request of ours it lets time out. A parent whose push is merely late is not charged: on a
//!   constrained uplink pushes queue behind each other, and distrusting a slow but honest parent
//!   dropped it for 30 s and moved its whole subtree (misses, above, replace a parent that keeps
//!   failing). At −3 it is distrusted for 15 s: its announcements are ignored (not news, not a holder to
//!   request from, not a parent candidate), and it comes back one failure away from distrust. Repair
//!   requests prefer neighbours with positive credit, i.e. ones that have delivered before, so an
//!   unproven node (possibly a free rider) is asked only when nobody proven has the chunk. The
//!   origin is exempt (it declines repair by design).
//! - **First-tier rotation (origin).** The origin cannot see whether a child relays: its children's
//!   subscriptions are visible only to it. It can see the consequence. Nodes ask the origin for a
//!   chunk only when no other neighbour offers it, so requests for chunks published more than 400 ms
//!   ago mean that substream's first tier is not spreading. The origin serves one such copy per chunk
//!   beyond its repair budget (`origin_free_repairs`), and declines the rest with `Cancel` so the
//!   requester asks elsewhere at once. The same holds at once, without the 400 ms, for a chunk pushed
//!   to a first-tier child whose connection went within the second after: the chunk may have died
//!   with it, and then the origin is the only node that has it; and for a chunk whose whole first
//!   tier has stopped taking what the origin sends (a push in flight, and neither a delivery nor a
//!   message back for 500 ms: cut off, while the connections still look open). A request for a
//!   young chunk that the origin declines waits, unanswered, rather than being refused: if the
//!   chunk turns out orphaned in either way while the requester still waits, it is answered then
//!   (without that, the requester would time out and not ask the origin for it again, and nobody
//!   else might have it). A joiner, whose first requests go to the origin because it is often
//!   its only neighbour for a moment, is not reached by the tree that the wait is for: until it has
//!   started playing it moves such a request to any other neighbour that has the chunk (telling
//!   the origin with `Cancel`), instead of waiting out the request timeout. When, within 2 s,
//!   `origin_rotate_demand` distinct nodes asked for late chunks of one substream (a vanished
//!   child's chunks do not count: its slot is simply refilled), the substream is *opened* (one node
//!   asking for two late chunks used to be enough; in a swarm of slow uplinks that rotated a working
//!   first tier every few seconds and orphaned its subtrees): the next node that subscribes to it
//!   takes the longest-held slot (held for at least 2 s), and the released child may not take that
//!   substream again for 30 s. Rotations are
//!   at least 3 s apart per substream. A working child is thus only replaced by a node that wants the
//!   slot, never left empty.
//! - **Spread first tier (origin).** A node holds at most `origin_slots_per_node` first-tier slots
//!   (more only in a substream that has had no child for 2 s) and takes one only in a least-served
//!   substream, so the first tier spans several nodes.
//! - **Paying back (origin, `origin_pay_back`, off by default).** Rescue copies and the start-up
//!   burst take the origin beyond `origin_max_upload` times the stream. With pay-back on, once no
//!   rescue has been needed for 2 s, a new chunk bound for two or more first-tier children is
//!   pushed to all but the last of them (the one with the fewest children), at most once a second
//!   and the same child at most once in 5 s, until the debt is gone. That child still gets the
//!   `Have`, so it pulls the chunk from a neighbour; if nobody else has it, it asks the origin,
//!   which sends it (and pauses paying back as after a rescue). Over a whole event the origin then
//!   uploads no more than the budget, for a pull's delay on those chunks in one subtree.

#[cfg(any(test, feature = "sim"))]
mod agenda;
mod neighbour;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

use crate::chunk::Verified;
use crate::keys::{NodeId, StreamId};
use crate::window::{Insert, Window};
use crate::wire::{GoodbyeReason, Hello, MAX_PEERS, MAX_REQUEST, Message, NO_DEPTH, NodeAddr, Role, TreePlace};
pub use neighbour::{ConnId, NeighbourStats};
use neighbour::{Neighbour, TokenBucket};

/// Time on the caller's clock, in microseconds.
pub type Time = u64;

/// Settings of one node.
#[derive(Debug, Clone)]
pub struct Config {
    /// What this node is.
    pub role: Role,
    /// Where this node accepts connections (told to neighbours for peer exchange).
    pub listen: Vec<SocketAddr>,
    /// How many neighbours to dial up to.
    pub target_neighbours: usize,
    /// How many neighbours in all (inbound included) before refusing.
    pub max_neighbours: usize,
    /// Into how many substreams the stream is split (`K`).
    pub substreams: u16,
    /// On the origin: how many children per substream (the first tier).
    pub origin_fanout: usize,
    /// How many (child, substream) subscriptions this node serves: its push upload is about
    /// `push_slots / substreams` times the bitrate.
    pub push_slots: usize,
    /// Window length, in chunks.
    pub window: usize,
    /// Playback point behind the live edge, µs.
    pub target_latency_us: u64,
    /// How long a chunk announced by a neighbour may wait for the push tree before it is pulled, µs.
    pub pull_grace_us: u64,
    /// A request not answered within this is sent elsewhere, µs.
    pub request_timeout_us: u64,
    /// Most requests in flight to one neighbour.
    pub max_requests_per_neighbour: usize,
    /// Chunk streams queued for upload beyond which requests are declined (so the requester asks
    /// someone less busy instead of waiting behind our queue).
    pub max_upload_queue: usize,
    /// How long a misbehaving node stays banned, µs.
    pub ban_duration_us: u64,
    /// Housekeeping period (repair, parent choice, dialling), µs.
    pub tick_us: u64,
    /// Seed for the node's random choices.
    pub seed: u64,
    /// A working parent is replaced only by a neighbour whose news is this much earlier than the
    /// parent's pushes land, µs (hysteresis, so trees stay stable).
    pub parent_switch_margin_us: u64,
    /// A parent is kept at least this long unless it fails (misses pushes, refuses, leaves), µs.
    pub parent_min_dwell_us: u64,
    /// Pushes a parent may miss in a row (chunks it announced that had to be pulled) before it is
    /// replaced.
    pub parent_max_misses: u32,
    /// On the origin: repair answers per second (each is one chunk of upload).
    pub origin_repair_per_s: f64,
    /// On the origin: repair copies of each chunk served beyond the `origin_repair_per_s` budget
    /// when the chunk has been out for a while (its first tier evidently did not spread it).
    pub origin_free_repairs: u8,
    /// On the origin: distinct nodes asking it, within two seconds, for chunks of one substream
    /// that its first tier should long have spread, before it rotates a first-tier slot of that
    /// substream.
    pub origin_rotate_demand: usize,
    /// On the origin: first-tier slots one node may hold (more only in a substream nobody else
    /// takes), so the first tier spans several nodes.
    pub origin_slots_per_node: usize,
    /// On the origin: its chunk upload stays within this multiple of the stream it has published,
    /// first-tier pushes included. Repair answers, catch-up pushes to a new child and pushes to a
    /// leaf it let go for a relay come out of what the first tier leaves unused (slots not yet
    /// taken, rotations, children that left), so the broadcaster's upload stays flat; the
    /// exceptions are an allowance of two chunks beyond the budget (for the first 5 s only with
    /// `origin_pay_back`) and a rescue copy (`origin_free_repairs`) of a chunk its first tier
    /// failed to spread; `origin_pay_back` pays both back.
    pub origin_max_upload: f64,
    /// On the origin: pay back what a rescue copy or the start-up burst sent beyond
    /// `origin_max_upload`, by leaving out a first-tier push now and then while the swarm is calm,
    /// so that over a whole event the broadcaster uploads no more than that multiple of the
    /// stream. The child left out pulls that chunk from a neighbour, and its subtree gets it that
    /// much later: a strict budget for a little latency on a few chunks. Off by default.
    pub origin_pay_back: bool,
    /// Most nodes remembered (from tickets, peer exchange, refusals), connected or not: enough to
    /// refill a neighbourhood of `max_neighbours` many times over, few enough that a node in a
    /// swarm of thousands does not spend its memory and its housekeeping on a directory of the
    /// whole swarm. Once full, a newly named node takes the place of one we are neither connected
    /// to nor dialing and have not banned, so the table keeps up with the swarm.
    pub max_known: usize,
}

impl Config {
    /// The push budget (`push_slots`) for a node whose uplink carries `upload_bps` of a stream of
    /// `bitrate_bps`: each (child, substream) slot costs bitrate / K and 80 % of the upload goes to
    /// pushes, at most twice the default budget. A node that cannot upload the whole stream once
    /// takes no children at all: every chunk it pushed would spend longer on its uplink than the
    /// chunk lasts, and everyone below it would fall behind; it still relays by answering requests.
    pub fn push_slots_for_upload(&self, upload_bps: u64, bitrate_bps: u64) -> usize {
        if bitrate_bps == 0 {
            return self.push_slots;
        }
        if upload_bps < bitrate_bps {
            return 0;
        }
        let per_slot = bitrate_bps as f64 / f64::from(self.substreams.max(1));
        let slots = (upload_bps as f64 * 0.8 / per_slot).floor() as usize;
        slots.min(self.push_slots.max(1) * 2)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            role: Role::Relay,
            listen: Vec::new(),
            target_neighbours: 8,
            max_neighbours: 32,
            substreams: 4,
            origin_fanout: 2,
            push_slots: 16,
            window: 40,
            target_latency_us: 1_000_000,
            pull_grace_us: 150_000,
            request_timeout_us: 600_000,
            max_requests_per_neighbour: 8,
            max_upload_queue: 6,
            ban_duration_us: 600_000_000,
            tick_us: 25_000,
            seed: 0,
            parent_switch_margin_us: 200_000,
            parent_min_dwell_us: 5_000_000,
            parent_max_misses: 3,
            origin_repair_per_s: 1.0,
            origin_free_repairs: 1,
            origin_rotate_demand: 4,
            origin_slots_per_node: 4,
            origin_max_upload: 2.0,
            origin_pay_back: false,
            max_known: 1024,
        }
    }
}

/// On the origin: what to do with one requested chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OriginAnswer {
    /// Send it; `rescue` when it is the rescue copy of a chunk that may have reached nobody else.
    Serve { rescue: bool },
    /// Say no (`Cancel`), so the requester asks elsewhere at once.
    Decline,
    /// Say nothing yet: it is probably on its way by push.
    Wait,
}

/// How a chunk reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Published here (origin).
    Local,
    /// Pushed by a parent or a neighbour without being asked.
    Push,
    /// Answer to our request.
    Pull,
}

/// Something the driver must do, or should know.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send a control message.
    Send {
        /// On which connection.
        conn: ConnId,
        /// What.
        message: Message,
    },
    /// Send a chunk on a new unidirectional stream of this priority (higher is more urgent).
    SendChunk {
        /// To whom.
        conn: ConnId,
        /// The chunk.
        chunk: Verified,
        /// Stream priority.
        priority: i32,
    },
    /// Abort an in-flight chunk stream (the receiver has it already).
    CancelChunk {
        /// On which connection.
        conn: ConnId,
        /// Which chunk.
        seq: u64,
    },
    /// Dial this node, then report `handle_connected` or `handle_connect_failed`.
    Connect(NodeAddr),
    /// Close this connection (a goodbye has been queued before it where there was something to say).
    Disconnect {
        /// Which.
        conn: ConnId,
        /// Why (the QUIC close code).
        reason: GoodbyeReason,
    },
    /// The next chunk at the playback cursor, in order.
    Deliver(Verified),
    /// The chunk at the playback cursor missed its deadline and is skipped.
    Skip {
        /// Which chunk.
        seq: u64,
    },
    /// A verified chunk was stored for the first time (for measurement).
    Arrived {
        /// Sequence number.
        seq: u64,
        /// Capture time from its header.
        capture_us: u64,
        /// Payload bytes.
        bytes: usize,
        /// How it came.
        path: Path,
    },
}

/// Why the driver reports a neighbour as misbehaving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// A chunk failed verification (forged, corrupt, or of another stream).
    BadChunk,
    /// A control message could not be decoded.
    Malformed,
    /// Too many streams or bytes.
    Flood,
}

/// Counters of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Chunks stored after arriving by push.
    pub push: u64,
    /// Chunks stored after arriving by pull.
    pub pull: u64,
    /// Chunks that arrived when already stored.
    pub duplicates: u64,
    /// Chunks handed on in order.
    pub delivered: u64,
    /// Chunks skipped at their deadline.
    pub skipped: u64,
    /// Chunks published (origin).
    pub published: u64,
    /// Chunk payload bytes queued for sending.
    pub chunk_bytes_up: u64,
    /// Chunk payload bytes received.
    pub chunk_bytes_down: u64,
    /// The part of [`Counters::chunk_bytes_down`] that came straight from an origin: what the
    /// broadcaster uploaded to us, which a lab fed by someone else's stream adds up over its nodes.
    pub chunk_bytes_from_origin: u64,
    /// Control messages sent.
    pub messages_sent: u64,
    /// Control-message bytes sent (approximate: encoded frame sizes).
    pub control_bytes_up: u64,
    /// Requests sent.
    pub requests_sent: u64,
    /// Requests that timed out.
    pub request_timeouts: u64,
    /// Requests we declined because our upload was busy.
    pub requests_declined: u64,
    /// Neighbours dropped for misbehaviour.
    pub bans: u64,
    /// Parent changes.
    pub parent_changes: u64,
    /// On the origin: first-tier children released because their substream was not spreading.
    pub tier_rotations: u64,
    /// On the origin: first-tier pushes left out to pay back copies sent beyond its budget.
    pub pushes_left_out: u64,
    /// On the origin: of those, chunks the child then had to ask the origin for after all.
    pub left_out_served: u64,
}

/// Neighbours that refused to be our parent in one substream (or that we gave up on), each until
/// a time. Expired entries go when the earliest of them is due: sweeping the table every tick
/// was a good part of a large simulation's time, and the entries last seconds.
#[derive(Debug, Clone, Default)]
struct Refusals {
    until: HashMap<ConnId, Time>,
    /// No entry expires before this.
    next_expiry: Time,
}

impl Refusals {
    fn insert(&mut self, conn: ConnId, until: Time) {
        if self.until.is_empty() || until < self.next_expiry {
            self.next_expiry = until;
        }
        self.until.insert(conn, until);
    }

    /// Drops the entries that have run out by `now`.
    fn expire(&mut self, now: Time) {
        if self.until.is_empty() || now < self.next_expiry {
            return;
        }
        self.until.retain(|_, until| *until > now);
        self.next_expiry = self.until.values().copied().min().unwrap_or(Time::MAX);
    }

    fn contains(&self, conn: ConnId) -> bool {
        self.until.contains_key(&conn)
    }

    fn remove(&mut self, conn: &ConnId) {
        // (`next_expiry` stays a lower bound.)
        self.until.remove(conn);
    }
}

/// What we know of a node we are not necessarily connected to.
#[derive(Debug, Clone)]
struct Known {
    addrs: Vec<SocketAddr>,
    banned_until: Time,
    failures: u32,
    retry_at: Time,
    /// Whether it is in `by_node` (connected, hello done) and in `dialing`: a node short of
    /// neighbours sifts every known node for dialable ones, and this spares it two hash lookups
    /// per node. Kept by the helpers that change those tables.
    connected: bool,
    dialing: bool,
}

impl Known {
    fn new(id: NodeId, now: Time, by_node: &HashMap<NodeId, ConnId>, dialing: &HashSet<NodeId>) -> Self {
        Known {
            addrs: Vec::new(),
            banned_until: 0,
            failures: 0,
            retry_at: now,
            connected: by_node.contains_key(&id),
            dialing: dialing.contains(&id),
        }
    }
}

/// One node's state machine. See the module docs.
#[derive(Debug)]
pub struct Swarm {
    config: Config,
    stream: StreamId,
    me: NodeId,
    rng: fastrand::Rng,
    chunks: Window<Verified>,
    neighbours: BTreeMap<ConnId, Neighbour>,
    by_node: HashMap<NodeId, ConnId>,
    known: HashMap<NodeId, Known>,
    dialing: HashSet<NodeId>,
    /// No known node can be worth dialing before this (every one is connected, being dialed, or
    /// waiting out a retry or a ban); 0 when that is not known. Anything that could make a node
    /// dialable sooner resets it (see [`Self::dial_again`]).
    dial_idle_until: Time,
    /// When we first heard of each recent sequence number (from any Have, or its arrival). A window
    /// rather than a map: it is read and written for every announcement, and stays bounded even
    /// while a joiner, with nothing verified yet, hears claims it cannot check.
    first_news: Window<Time>,
    /// Requests in flight: seq -> (conn, deadline).
    requests: HashMap<u64, (ConnId, Time)>,
    /// Whether the last recount of each neighbour's requests in flight found none at all.
    requests_counted_none: bool,
    /// Parent per substream.
    parents: Vec<Option<ConnId>>,
    /// Per substream: a better parent asked while the current one keeps pushing, and when to
    /// take it on if it has not refused.
    switching: Vec<Option<(ConnId, Time)>>,
    /// Per substream: since when the current parent has been ours.
    parent_since: Vec<Time>,
    /// Per substream: pushes the current parent announced but that had to be pulled, in a row.
    parent_misses: Vec<u32>,
    /// Per substream, neighbours that refused to be our parent, until when.
    refused: Vec<Refusals>,
    live_edge: Option<u64>,
    /// A recent chunk's (seq, capture_us, duration_us): estimates the capture time of chunks not seen.
    reference: Option<(u64, u64, u32)>,
    cursor: Option<u64>,
    cursor_started: bool,
    origin_offset: (i64, u64),
    origin_repair: TokenBucket,
    /// On the origin: repair copies served per recent chunk.
    origin_repaired: BTreeMap<u64, u8>,
    /// On the origin, per substream: recent (time, requester) of requests for chunks its first tier
    /// should have spread.
    tier_demand: Vec<VecDeque<(Time, ConnId, u64)>>,
    /// On the origin, per substream: nodes released from its first tier, not taken back before then.
    tier_probation: Vec<HashMap<NodeId, Time>>,
    /// On the origin, per substream: when a first-tier slot was last rotated.
    tier_rotated_at: Vec<Time>,
    /// On the origin, per substream: the next new subscriber replaces the longest-held child.
    tier_open: Vec<bool>,
    /// On the origin, per substream: since when it has had no first-tier child.
    tier_empty_since: Vec<Option<Time>>,
    /// On the origin, per substream: when a first-tier child last vanished (its connection closed
    /// or was dropped). Chunks of the substream published before then may have died with it.
    tier_lost_at: Vec<Option<Time>>,
    /// On the origin: requests for young chunks let wait, (when, requester, seq), oldest first.
    parked: VecDeque<(Time, ConnId, u64)>,
    /// On the origin: when it last sent a rescue copy (see [`Self::origin_answer`]).
    last_rescue: Option<Time>,
    /// On the origin: first-tier pushes lately left out to pay back its budget, (when, child,
    /// seq), oldest first (see [`Self::origin_leave_out`]); the seq is taken once the child has
    /// been sent the chunk after all, the rest kept for the spacing rules.
    left_out: VecDeque<(Time, ConnId, Option<u64>)>,
    /// Our place in each substream's tree as last told to the neighbours, and when.
    tree_sent: Vec<TreePlace>,
    tree_sent_at: Time,
    /// Per substream: the feasibility bound — the least depth we have had since we last had no
    /// children there. A new parent must be no deeper than this, which no descendant of ours can be,
    /// so a parent switch never closes a loop (the feasibility condition of Babel and DUAL).
    feasible: Vec<u8>,
    /// Per substream: since when we have had children there but no parent we may take.
    stranded_since: Vec<Option<Time>>,
    /// Per substream: since when our parent has had no path to the origin itself.
    parent_cut_since: Vec<Option<Time>>,
    /// Per substream: when to look again for a better parent than the working one.
    parent_review_at: Vec<Time>,
    /// On the origin: payload bytes published.
    published_bytes: u64,
    /// On the origin: when it published its first chunk.
    first_published: Option<Time>,
    /// Chunk streams handed to the driver and not yet reported sent.
    uploads_in_flight: usize,
    counters: Counters,
    outputs: VecDeque<Output>,
    next_tick: Option<Time>,
    next_peer_exchange: Time,
    next_ping: Time,
    nonce: u64,
    ended: bool,
}

impl Swarm {
    /// A node of `stream` with id `me`.
    pub fn new(config: Config, stream: StreamId, me: NodeId) -> Self {
        let k = usize::from(config.substreams.clamp(1, crate::wire::MAX_SUBSTREAMS));
        let mut config = config;
        config.substreams = k as u16;
        Swarm {
            rng: fastrand::Rng::with_seed(config.seed),
            chunks: Window::new(config.window, 0),
            neighbours: BTreeMap::new(),
            by_node: HashMap::new(),
            known: HashMap::new(),
            dialing: HashSet::new(),
            dial_idle_until: 0,
            first_news: Window::new(config.window * 2, 0),
            requests: HashMap::new(),
            requests_counted_none: true,
            parents: vec![None; k],
            parent_since: vec![0; k],
            switching: vec![None; k],
            parent_misses: vec![0; k],
            refused: vec![Refusals::default(); k],
            live_edge: None,
            reference: None,
            cursor: None,
            cursor_started: false,
            origin_offset: if config.role == Role::Origin { (0, 0) } else { (0, u64::MAX) },
            origin_repair: TokenBucket::new(config.origin_repair_per_s, config.origin_repair_per_s.max(1.0) * 2.0),
            origin_repaired: BTreeMap::new(),
            tier_demand: vec![VecDeque::new(); k],
            tier_probation: vec![HashMap::new(); k],
            tier_rotated_at: vec![0; k],
            tier_open: vec![false; k],
            tier_empty_since: vec![None; k],
            tier_lost_at: vec![None; k],
            parked: VecDeque::new(),
            last_rescue: None,
            left_out: VecDeque::new(),
            tree_sent: Vec::new(),
            tree_sent_at: 0,
            feasible: vec![NO_DEPTH; k],
            stranded_since: vec![None; k],
            parent_cut_since: vec![None; k],
            parent_review_at: vec![0; k],
            published_bytes: 0,
            first_published: None,
            uploads_in_flight: 0,
            counters: Counters::default(),
            outputs: VecDeque::new(),
            next_tick: Some(0),
            next_peer_exchange: 0,
            next_ping: 0,
            nonce: 0,
            ended: false,
            config,
            stream,
            me,
        }
    }

    // ----- getters -----

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// The stream carried.
    pub fn stream(&self) -> StreamId {
        self.stream
    }
    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.me
    }
    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    /// The stored chunks.
    pub fn window(&self) -> &Window<Verified> {
        &self.chunks
    }
    /// The highest sequence number known to exist.
    pub fn live_edge(&self) -> Option<u64> {
        self.live_edge
    }
    /// The next sequence number the playback cursor waits for.
    pub fn playback_cursor(&self) -> Option<u64> {
        self.cursor
    }
    /// Estimated (origin clock − our clock) in µs, and its uncertainty (u64::MAX when unknown).
    pub fn origin_offset(&self) -> (i64, u64) {
        self.origin_offset
    }
    /// Connected neighbours that have said hello, with their stats.
    pub fn neighbours(&self) -> impl Iterator<Item = (ConnId, NodeId, &NeighbourStats)> + '_ {
        self.neighbours.iter().filter_map(|(c, n)| n.node.map(|id| (*c, id, &n.stats)))
    }
    /// How many neighbours have said hello.
    pub fn neighbour_count(&self) -> usize {
        self.neighbours.values().filter(|n| n.hello_done()).count()
    }
    /// The parent per substream, as node ids.
    pub fn parents(&self) -> Vec<Option<NodeId>> {
        self.parents.iter().map(|p| p.and_then(|c| self.neighbours.get(&c)?.node)).collect()
    }
    /// How many (child, substream) subscriptions this node serves.
    pub fn children(&self) -> usize {
        self.neighbours.values().map(|n| n.child_of.len()).sum()
    }
    /// Whether the end-of-stream chunk has been delivered.
    pub fn ended(&self) -> bool {
        self.ended
    }

    // ----- outputs -----

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }
    /// When to call [`Self::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.next_tick
    }

    // ----- inputs -----

    /// Adds nodes to dial (from a ticket, or learned elsewhere).
    pub fn add_peers(&mut self, now: Time, peers: impl IntoIterator<Item = NodeAddr>) {
        for p in peers {
            self.learn(now, p);
        }
        self.next_tick = Some(now);
    }

    /// A connection is up (TLS has authenticated `node`). Says hello.
    pub fn handle_connected(&mut self, now: Time, conn: ConnId, node: NodeId, addr: SocketAddr, outbound: bool) {
        self.stop_dialing(node);
        self.dial_again();
        if let Some(k) = self.known.get_mut(&node) {
            if k.banned_until > now {
                self.outputs.push_back(Output::Disconnect { conn, reason: GoodbyeReason::Misbehaved });
                return;
            }
            k.failures = 0;
        }
        let mut n = Neighbour::new(now, addr, outbound, self.config.window);
        n.expected = Some(node);
        self.neighbours.insert(conn, n);
        let hello = Message::Hello(Box::new(Hello {
            version: crate::PROTOCOL_VERSION,
            stream: self.stream,
            node: self.me,
            role: self.config.role,
            listen: self.config.listen.clone(),
            have: self.chunks.buffer_map(),
        }));
        self.send(conn, hello);
    }

    /// A dial failed.
    pub fn handle_connect_failed(&mut self, now: Time, node: NodeId) {
        self.stop_dialing(node);
        self.dial_again();
        if let Some(k) = self.known.get_mut(&node) {
            k.failures += 1;
            k.retry_at = now + (1_000_000u64 << k.failures.min(6));
            if k.failures > 8 {
                self.known.remove(&node);
            }
        }
    }

    /// A connection has gone (closed by either side, timed out, or failed).
    pub fn handle_disconnected(&mut self, now: Time, conn: ConnId) {
        let Some(n) = self.neighbours.remove(&conn) else { return };
        if self.config.role == Role::Origin {
            for s in n.child_of.iter() {
                if let Some(t) = self.tier_lost_at.get_mut(usize::from(s)) {
                    *t = Some(now);
                }
            }
        }
        if let Some(id) = n.node {
            if self.by_node.get(&id) == Some(&conn) {
                self.by_node.remove(&id);
                if let Some(k) = self.known.get_mut(&id) {
                    k.connected = false;
                }
            }
            if let Some(k) = self.known.get_mut(&id) {
                k.retry_at = now + 2_000_000;
            }
            self.dial_again();
        }
        for p in self.parents.iter_mut() {
            if *p == Some(conn) {
                *p = None;
            }
        }
        for r in self.refused.iter_mut() {
            r.remove(&conn);
        }
        for w in self.switching.iter_mut() {
            if w.is_some_and(|(c, _)| c == conn) {
                *w = None;
            }
        }
        // Requests to it go elsewhere at once.
        self.requests.retain(|_, (c, _)| *c != conn);
        self.next_tick = Some(now);
    }

    /// The driver caught a neighbour misbehaving: disconnect and ban it.
    pub fn handle_misbehaviour(&mut self, now: Time, conn: ConnId, what: Misbehaviour) {
        let _ = what;
        self.ban(now, conn);
    }

    /// A control message arrived.
    pub fn handle_message(&mut self, now: Time, conn: ConnId, message: Message) {
        let Some(n) = self.neighbours.get_mut(&conn) else { return };
        n.stats.messages_received += 1;
        n.last_heard = now;
        if !n.hello_done() {
            match message {
                Message::Hello(hello) => self.on_hello(now, conn, *hello),
                _ => self.ban(now, conn),
            }
            return;
        }
        match message {
            Message::Hello(_) => self.ban(now, conn),
            Message::BufferMap(map) => {
                for seq in map.iter() {
                    self.on_have(now, conn, seq);
                }
            }
            Message::Have { seq } => self.on_have(now, conn, seq),
            Message::Request { seqs } => self.on_request(now, conn, seqs),
            Message::Cancel { seq } => {
                if self.requests.get(&seq).is_some_and(|(c, _)| *c == conn) {
                    // It declined our request: ask someone else, and give it a rest.
                    self.requests.remove(&seq);
                    if let Some(n) = self.neighbours.get_mut(&conn) {
                        n.busy_until = now + 2 * self.config.tick_us + n.stats.rtt_us.unwrap_or(0);
                    }
                    self.next_tick = Some(now);
                } else {
                    // It has the chunk already: stop sending it.
                    if let Some(n) = self.neighbours.get_mut(&conn) {
                        n.have.insert(seq, ());
                    }
                    self.outputs.push_back(Output::CancelChunk { conn, seq });
                }
            }
            Message::Subscribe { substream, substreams, from_seq } => {
                self.on_subscribe(now, conn, substream, substreams, from_seq)
            }
            Message::Unsubscribe { substream } => self.on_unsubscribe(now, conn, substream),
            Message::Peers(peers) => {
                for p in peers.into_iter().take(MAX_PEERS) {
                    self.learn(now, p);
                }
            }
            Message::Goodbye { reason, peers, .. } => {
                for p in peers.into_iter().take(MAX_PEERS) {
                    self.learn(now, p);
                }
                if let Some(id) = self.neighbours.get(&conn).and_then(|n| n.node)
                    && let Some(k) = self.known.get_mut(&id)
                {
                    // A full node is worth retrying later, not now.
                    k.retry_at = now + if reason == GoodbyeReason::Full { 10_000_000 } else { 5_000_000 };
                    self.dial_again();
                }
                self.outputs.push_back(Output::Disconnect { conn, reason: GoodbyeReason::Leaving });
                self.handle_disconnected(now, conn);
            }
            Message::Ping { nonce, sent_us } => {
                let (origin_offset_us, origin_offset_error_us) = self.origin_offset;
                self.send(
                    conn,
                    Message::Pong {
                        nonce,
                        ping_sent_us: sent_us,
                        reply_us: now,
                        origin_offset_us,
                        origin_offset_error_us,
                    },
                );
            }
            Message::Pong { ping_sent_us, reply_us, origin_offset_us, origin_offset_error_us, .. } => {
                self.on_pong(now, conn, ping_sent_us, reply_us, origin_offset_us, origin_offset_error_us)
            }
            Message::Tree(mut places) => {
                places.truncate(usize::from(self.config.substreams));
                if let Some(n) = self.neighbours.get_mut(&conn) {
                    n.tree = places;
                }
            }
        }
    }

    /// A chunk arrived on `conn` and the driver has verified it against the stream key.
    pub fn handle_chunk(&mut self, now: Time, conn: ConnId, chunk: Verified) {
        let seq = chunk.seq();
        let requested = self.requests.get(&seq).map(|(c, _)| *c);
        let path = if requested == Some(conn) { Path::Pull } else { Path::Push };
        let bytes = chunk.payload().len();
        self.counters.chunk_bytes_down += bytes as u64;
        let mut news = false;
        if let Some(n) = self.neighbours.get_mut(&conn) {
            if n.role == Role::Origin {
                self.counters.chunk_bytes_from_origin += bytes as u64;
            }
            n.timeouts_in_a_row = 0;
            n.kept_promise();
            news = n.have.insert(seq, ()) != Insert::Duplicate;
            n.stats.chunks_received += 1;
            n.stats.bytes_received += bytes as u64;
            n.last_useful = now;
            n.last_heard = now;
        }
        if news {
            self.note_news(now, conn, seq);
        }
        // A parent is judged by when its pushes land, not by when it announces: an announcement
        // says it has the chunk, the push arriving says its uplink can deliver it to us.
        let s = (seq % u64::from(self.config.substreams)) as usize;
        if self.parents[s] == Some(conn) && !self.chunks.contains(seq) {
            let first = self.first_news.get(seq).copied().unwrap_or(now);
            if let Some(n) = self.neighbours.get_mut(&conn) {
                n.note_push_lag(s, now.saturating_sub(first));
            }
            self.parent_misses[s] = 0;
        }
        self.store(now, chunk, path, Some(conn));
    }

    /// A chunk stream asked for with [`Output::SendChunk`] has finished: `delivered` when the
    /// receiver took all of it (or stopped it, having the chunk already), not when it was cancelled
    /// or failed. Keeps the upload queue estimate that decides whether to take on repair requests,
    /// and tells a receiver that is taking what we send from one that has gone quiet.
    pub fn handle_chunk_sent(&mut self, now: Time, conn: ConnId, _seq: u64, delivered: bool) {
        self.uploads_in_flight = self.uploads_in_flight.saturating_sub(1);
        if let Some(n) = self.neighbours.get_mut(&conn) {
            n.uploads = n.uploads.saturating_sub(1);
            if delivered {
                n.last_delivered = now;
            }
        }
    }

    /// On the origin: a new chunk, signed by the stream key. Pushes it to the first tier.
    pub fn publish(&mut self, now: Time, chunk: Verified) {
        self.counters.published += 1;
        self.published_bytes += chunk.payload().len() as u64;
        self.first_published.get_or_insert(now);
        self.first_news_at(chunk.seq(), now);
        self.store(now, chunk, Path::Local, None);
    }

    /// The timer armed by [`Self::poll_timeout`] fired (calling it early is harmless).
    pub fn handle_timeout(&mut self, now: Time) {
        if self.next_tick.is_some_and(|t| now < t) {
            return;
        }
        self.next_tick = Some(now + self.config.tick_us);
        self.expire_requests(now);
        self.advance_playback(now);
        self.repair(now);
        if self.config.role != Role::Origin {
            self.choose_parents(now);
        } else {
            self.revisit_parked(now);
            self.rotate_tier(now);
        }
        self.maintain_membership(now);
        self.advertise_tree(now);
        if now >= self.next_ping {
            self.next_ping = now + 2_000_000;
            for conn in self.ready_neighbours() {
                self.nonce += 1;
                self.send(conn, Message::Ping { nonce: self.nonce, sent_us: now });
            }
        }
    }

    // ----- internals -----

    fn send(&mut self, conn: ConnId, message: Message) {
        self.counters.messages_sent += 1;
        self.counters.control_bytes_up += approx_frame_len(&message) as u64;
        self.outputs.push_back(Output::Send { conn, message });
    }

    fn ready_neighbours(&self) -> Vec<ConnId> {
        let mut v: Vec<ConnId> = self.neighbours.iter().filter(|(_, n)| n.hello_done()).map(|(c, _)| *c).collect();
        v.sort_unstable();
        v
    }

    fn learn(&mut self, now: Time, p: NodeAddr) {
        if p.id == self.me || p.addrs.is_empty() {
            return;
        }
        if self.known.len() >= self.config.max_known && !self.known.contains_key(&p.id) && !self.forget_one(now) {
            return;
        }
        let (by_node, dialing) = (&self.by_node, &self.dialing);
        let k = self.known.entry(p.id).or_insert_with(|| {
            // A node we did not know: worth dialing.
            self.dial_idle_until = 0;
            Known::new(p.id, now, by_node, dialing)
        });
        k.addrs = p.addrs;
        k.addrs.truncate(crate::wire::MAX_ADDRS);
    }

    /// Makes room in a full table of known nodes for one just named, by forgetting one we are
    /// neither connected to nor dialing and have not banned: of the first few such (in the
    /// table's order, which the hasher makes random), the one that failed most often, else the
    /// one we may dial again last (it refused us lately). Without this a node that learnt its fill
    /// of names early (in a crowd of newcomers, from neighbours as lost as itself) could never
    /// learn of anyone else, and stayed among them. False if every node is connected, being
    /// dialed or banned.
    fn forget_one(&mut self, now: Time) -> bool {
        let victim = self
            .known
            .iter()
            .filter(|(_, k)| !k.connected && !k.dialing && k.banned_until <= now)
            .take(FORGET_CANDIDATES)
            .max_by_key(|(_, k)| (k.failures, k.retry_at))
            .map(|(id, _)| *id);
        victim.is_some_and(|id| self.known.remove(&id).is_some())
    }

    fn ban(&mut self, now: Time, conn: ConnId) {
        self.counters.bans += 1;
        let id = self.neighbours.get(&conn).and_then(|n| n.node.or(n.expected));
        if let Some(id) = id {
            let (by_node, dialing) = (&self.by_node, &self.dialing);
            let k = self.known.entry(id).or_insert_with(|| Known::new(id, now, by_node, dialing));
            k.banned_until = now + self.config.ban_duration_us;
        }
        self.send(
            conn,
            Message::Goodbye { reason: GoodbyeReason::Misbehaved, peers: Vec::new(), message: String::new() },
        );
        self.outputs.push_back(Output::Disconnect { conn, reason: GoodbyeReason::Misbehaved });
        self.handle_disconnected(now, conn);
    }

    fn goodbye(&mut self, now: Time, conn: ConnId, reason: GoodbyeReason, message: &str) {
        let peers = if reason == GoodbyeReason::Full { self.sample_peers(conn, 16) } else { Vec::new() };
        self.send(conn, Message::Goodbye { reason, peers, message: message.to_owned() });
        self.outputs.push_back(Output::Disconnect { conn, reason });
        self.handle_disconnected(now, conn);
    }

    fn sample_peers(&mut self, except: ConnId, max: usize) -> Vec<NodeAddr> {
        // Chosen by id and connection, and only the chosen ones' addresses copied: a full node
        // turning away a crowd of joiners does this for every one of them.
        let mut peers: Vec<(NodeId, ConnId)> = self
            .neighbours
            .iter()
            .filter(|(c, n)| **c != except && !n.listen.is_empty())
            .filter_map(|(c, n)| Some((n.node?, *c)))
            .collect();
        peers.sort_by_key(|p| p.0);
        self.rng.shuffle(&mut peers);
        peers.truncate(max);
        peers
            .into_iter()
            .filter_map(|(id, c)| Some(NodeAddr { id, addrs: self.neighbours.get(&c)?.listen.clone() }))
            .collect()
    }

    fn on_hello(&mut self, now: Time, conn: ConnId, hello: Hello) {
        if hello.version != crate::PROTOCOL_VERSION {
            return self.goodbye(now, conn, GoodbyeReason::UnsupportedVersion, "unsupported protocol version");
        }
        if hello.stream != self.stream {
            return self.goodbye(now, conn, GoodbyeReason::WrongStream, "this node carries another stream");
        }
        let Some(n) = self.neighbours.get(&conn) else { return };
        if n.expected.is_some_and(|e| e != hello.node) {
            // The hello must name the node TLS authenticated.
            return self.ban(now, conn);
        }
        if hello.node == self.me {
            return self.goodbye(now, conn, GoodbyeReason::Duplicate, "connected to self");
        }
        if let Some(&other) = self.by_node.get(&hello.node) {
            // Two connections between the same pair: keep the one dialled by the smaller id.
            let this_outbound = n.outbound;
            let keep_this = (self.me < hello.node) == this_outbound;
            let drop = if keep_this { other } else { conn };
            self.goodbye(now, drop, GoodbyeReason::Duplicate, "already connected");
            if drop == conn {
                return;
            }
        }
        let ready = self.neighbour_count();
        let outbound = self.neighbours.get(&conn).is_some_and(|n| n.outbound);
        if !outbound && ready >= self.config.max_neighbours {
            return self.goodbye(now, conn, GoodbyeReason::Full, "no room; try these peers");
        }
        let Some(n) = self.neighbours.get_mut(&conn) else { return };
        n.node = Some(hello.node);
        n.role = hello.role;
        n.listen = hello.listen.clone();
        n.listen.truncate(crate::wire::MAX_ADDRS);
        self.by_node.insert(hello.node, conn);
        if let Some(k) = self.known.get_mut(&hello.node) {
            k.connected = true;
        }
        if !hello.listen.is_empty() {
            self.learn(now, NodeAddr { id: hello.node, addrs: hello.listen });
        }
        for seq in hello.have.iter() {
            self.on_have(now, conn, seq);
        }
        // Peer exchange right away, so a newcomer learns the swarm quickly; and where we stand in the
        // trees, so it can choose parents.
        let peers = self.sample_peers(conn, 16);
        if !peers.is_empty() {
            self.send(conn, Message::Peers(peers));
        }
        let places = self.tree_places(now);
        self.send(conn, Message::Tree(places));
        self.next_tick = Some(now);
    }

    /// When we first heard of `seq`: now, if this is the first time.
    fn first_news_at(&mut self, seq: u64, now: Time) -> Time {
        match self.first_news.get(seq) {
            Some(&t) => t,
            None => {
                self.first_news.insert(seq, now);
                now
            }
        }
    }

    fn note_news(&mut self, now: Time, conn: ConnId, seq: u64) {
        if seq < self.chunks.base() {
            return;
        }
        let first = self.first_news_at(seq, now);
        let k = u64::from(self.config.substreams);
        if let Some(n) = self.neighbours.get_mut(&conn) {
            n.note_lag((seq % k) as usize, now.saturating_sub(first));
        }
        if self.live_edge.is_none_or(|e| seq > e) {
            // A claim moves the edge only a little beyond what we have verified ourselves: otherwise
            // one liar announcing a run of numbers could walk the edge (and our start point) into the
            // future. Before the first verified chunk a joiner has nothing better than claims.
            let plausible = match self.reference {
                Some((verified, _, _)) => seq <= verified + 8,
                None => self.live_edge.is_none_or(|e| seq <= e + self.config.window as u64),
            };
            if plausible {
                self.live_edge = Some(seq);
            }
        }
    }

    /// Whether `seq` cannot have been captured yet: beyond the live edge our clock predicts from a
    /// chunk we verified, with a margin for clock-offset error. Claims of such chunks are ignored: a
    /// neighbour that announces the future would otherwise look like the best parent in the swarm.
    /// (A restarted broadcaster's new numbers look like the future too, until its first chunk is
    /// verified here: they arrive by push, and the reference moves with them.)
    fn is_from_the_future(&self, now: Time, seq: u64) -> bool {
        self.newest_possible(now).is_some_and(|newest| seq > newest)
    }

    /// The highest sequence number that can exist by now, from a verified chunk's capture time and our
    /// clock, with a margin for clock-offset error (at most a second: a worse estimate, or none, must
    /// not open the door to lies; if clocks really disagree by more, honest claims of the newest
    /// chunks are ignored too, which costs nothing since verified chunks move the reference anyway).
    fn newest_possible(&self, now: Time) -> Option<u64> {
        let (ref_seq, ref_capture, dur) = self.reference?;
        if dur == 0 {
            return None;
        }
        let (offset, error) = self.origin_offset;
        let error = error.min(1_000_000);
        let origin_now = i128::from(now) + i128::from(offset);
        let elapsed = u64::try_from(origin_now - i128::from(ref_capture)).unwrap_or(0);
        Some(ref_seq.saturating_add(elapsed / u64::from(dur)).saturating_add(2 + error / u64::from(dur)))
    }

    fn on_have(&mut self, now: Time, conn: ConnId, seq: u64) {
        let future = self.is_from_the_future(now, seq);
        let Some(n) = self.neighbours.get_mut(&conn) else { return };
        if n.have.insert(seq, ()) == Insert::Duplicate || !n.trusted(now) || future {
            // A claim from the future is remembered (so the chunk can be asked for once it can
            // exist) but moves nothing: not the live edge, not the neighbour's standing as a parent.
            return;
        }
        self.note_news(now, conn, seq);
    }

    fn on_request(&mut self, now: Time, conn: ConnId, seqs: Vec<u64>) {
        let mut served = Vec::new();
        // Bytes of `served`, so the origin's budget counts this request's earlier answers.
        let mut served_bytes = 0;
        for seq in seqs.into_iter().take(MAX_REQUEST) {
            let Some(n) = self.neighbours.get_mut(&conn) else { return };
            if !n.requests_in.take(now, 1.0) {
                n.stats.requests_refused += 1;
                if n.stats.requests_refused > 4 * self.config.window as u64 {
                    // Far beyond any honest need: a flood.
                    return self.ban(now, conn);
                }
                continue;
            }
            // Asking says it does not have the chunk, whatever it said before (a `Cancel` of a
            // request it took back reads as "got it").
            n.have.remove(seq);
            let Some(chunk) = self.chunks.get(seq) else {
                self.send(conn, Message::Cancel { seq });
                continue;
            };
            let chunk = chunk.clone();
            if self.config.role == Role::Origin {
                match self.origin_answer(now, conn, seq, served_bytes + chunk.payload().len()) {
                    OriginAnswer::Serve { rescue } => {
                        served_bytes += chunk.payload().len();
                        served.push((chunk, rescue));
                        continue;
                    }
                    OriginAnswer::Decline => {
                        self.send(conn, Message::Cancel { seq });
                        continue;
                    }
                    OriginAnswer::Wait => {
                        if self.parked.len() >= MAX_PARKED {
                            self.parked.pop_front();
                        }
                        self.parked.push_back((now, conn, seq));
                        continue;
                    }
                }
            }
            served_bytes += chunk.payload().len();
            served.push((chunk, false));
        }
        self.serve(now, conn, served);
    }

    /// Queues repair answers to `conn`, declining those the upload queue has no room for. A rescue
    /// (the origin's copy of a chunk nobody else may have, see [`Self::origin_answer`]) always goes:
    /// there is at most one per chunk, and the queue may be full of pushes to a first tier that
    /// is cut off.
    fn serve(&mut self, now: Time, conn: ConnId, chunks: Vec<(Verified, bool)>) {
        let newest = self.chunks.end();
        for (chunk, rescue) in chunks {
            // Fairness: one neighbour may hold at most half the repair queue, so a greedy one (even
            // within its request budget) cannot keep everyone else's repairs waiting.
            let share = (self.config.max_upload_queue / 2).max(1);
            let mine = self.neighbours.get(&conn).map_or(0, |n| n.uploads);
            if !rescue && (self.upload_queue(now) >= self.config.max_upload_queue || mine >= share) {
                self.counters.requests_declined += 1;
                if let Some(copies) = self.origin_repaired.get_mut(&chunk.seq()) {
                    // (Not sent after all, so it does not use up a rescue.)
                    *copies = copies.saturating_sub(1);
                }
                self.send(conn, Message::Cancel { seq: chunk.seq() });
                continue;
            }
            let priority = urgency(newest, chunk.seq()) + 1;
            self.send_chunk(now, conn, chunk, priority);
        }
    }

    /// On the origin: whether to answer `conn`'s request for `seq` (of `bytes`, with what this request
    /// has been served so far) now, decline it, or let it wait.
    fn origin_answer(&mut self, now: Time, conn: ConnId, seq: u64, bytes: usize) -> OriginAnswer {
        if let Some(entry) = self.left_out.iter_mut().find(|(_, c, s)| *c == conn && *s == Some(seq)) {
            // The push we left out, and the child found nobody else with it: it gets its copy now
            // (the debt stays), and paying back waits for a calmer moment.
            entry.2 = None;
            self.counters.left_out_served += 1;
            self.last_rescue = Some(now);
            return OriginAnswer::Serve { rescue: true };
        }
        // An origin with first-tier slots to spare has upload to spare: its budget is the slots,
        // whoever they serve (a small swarm, or one re-forming after a restart).
        let spare = self.children() < self.config.origin_fanout * usize::from(self.config.substreams);
        // Demand for a chunk that has been out for a while means its substream's first tier is not
        // spreading it: serve a copy anyway, and note who asked (that is what rotates the tier).
        let s = (seq % u64::from(self.config.substreams)) as usize;
        let late = self.first_news.get(seq).is_some_and(|&t| now >= t + OLD_AT_ORIGIN_US);
        if late {
            self.tier_demand[s].push_back((now, conn, seq));
        }
        let unspread = late || self.orphaned(now, seq);
        let over_budget = self.origin_over_budget(now, bytes);
        // (Counted when answered, not when sent: one request may name a chunk twice.)
        let copies = self.origin_repaired.entry(seq).or_insert(0);
        // A rescue copy of an unspread chunk is served even beyond the budget: without it a first
        // tier of free riders (or one that just left) would starve the swarm.
        let rescue = unspread && *copies < self.config.origin_free_repairs;
        let free = spare || rescue;
        if over_budget && !rescue || !free && !self.origin_repair.take(now, 1.0) {
            // Declined. For an unspread chunk, say so, so the requester asks elsewhere at once. A
            // young one is likely on its way by push (an early answer would only make the requester
            // pull a duplicate elsewhere): that request waits, and is answered if the chunk turns
            // out not to be spreading (see `revisit_parked`).
            return if unspread { OriginAnswer::Decline } else { OriginAnswer::Wait };
        }
        *copies = copies.saturating_add(1);
        if rescue {
            self.last_rescue = Some(now);
        }
        OriginAnswer::Serve { rescue }
    }

    /// On the origin: whether `seq` may have reached nobody but us. So it may when it was pushed to a
    /// first-tier child that vanished within the second after (it may have died with that child; its
    /// slot is simply refilled, which is no reason to rotate the tier), and when every first-tier
    /// child of its substream has stopped taking what we send (cut off, while the connections still
    /// look open).
    fn orphaned(&self, now: Time, seq: u64) -> bool {
        let s = (seq % u64::from(self.config.substreams)) as usize;
        let Some(&published) = self.first_news.get(seq) else { return false };
        if self.tier_lost_at[s].is_some_and(|lost| lost >= published && lost < published + ORPHAN_US) {
            return true;
        }
        let s16 = s as u16;
        let mut tier = self.neighbours.values().filter(|n| n.child_of.contains(s16)).peekable();
        tier.peek().is_some() && tier.all(|n| n.stalled(now, SILENT_US))
    }

    /// On the origin: requests for young chunks that were let wait. Once the chunk turns out to be
    /// orphaned (see [`Self::orphaned`]), such a request is answered like any request for an
    /// unspread chunk, rather than left to time out: a requester whose request timed out does not
    /// ask the origin for that chunk again, and with the whole first tier cut off nobody else has it.
    fn revisit_parked(&mut self, now: Time) {
        if self.parked.is_empty() {
            return;
        }
        let timeout = self.config.request_timeout_us;
        let mut parked = std::mem::take(&mut self.parked);
        let mut due = Vec::new();
        parked.retain(|&(asked, conn, seq)| {
            // Gone, given up (timed out), or it has the chunk now (it cancels a request that a
            // push overtook, which marks the chunk as one it has).
            let wanted = self.neighbours.get(&conn).is_some_and(|n| !n.have.contains(seq));
            if !wanted || now >= asked + timeout || !self.chunks.contains(seq) {
                return false;
            }
            let orphaned = self.orphaned(now, seq);
            if orphaned {
                due.push((conn, seq));
            }
            !orphaned
        });
        self.parked = parked;
        for (conn, seq) in due {
            let Some(chunk) = self.chunks.get(seq).cloned() else { continue };
            match self.origin_answer(now, conn, seq, chunk.payload().len()) {
                OriginAnswer::Serve { rescue } => self.serve(now, conn, vec![(chunk, rescue)]),
                // (An orphaned chunk is never let wait.)
                OriginAnswer::Decline | OriginAnswer::Wait => self.send(conn, Message::Cancel { seq }),
            }
        }
    }

    /// On the origin: whether sending `bytes` more would take its upload beyond
    /// [`Config::origin_max_upload`] times what it has published, give or take a burst of
    /// [`ORIGIN_BURST_CHUNKS`] chunks (so a swarm forming around a fresh stream can be helped before
    /// the average has built up).
    /// With [`Config::origin_pay_back`] the burst is only for the stream's first
    /// [`REPAY_BURST_US`]: later, room that paying back frees would only be spent again on
    /// repair answers, and the debt never go.
    fn origin_over_budget(&self, now: Time, bytes: usize) -> bool {
        let published = self.counters.published.max(1);
        let settled = self.config.origin_pay_back && self.first_published.is_some_and(|t| now >= t + REPAY_BURST_US);
        let burst = if settled { 0 } else { ORIGIN_BURST_CHUNKS * self.published_bytes / published };
        let budget = self.config.origin_max_upload * self.published_bytes as f64 + burst as f64;
        (self.counters.chunk_bytes_up + bytes as u64) as f64 > budget
    }

    /// On the origin: the first-tier child, if any, whose push of a new chunk (of `bytes`) to leave
    /// out. A rescue copy and the start-up burst (see [`Self::origin_over_budget`]) take the
    /// origin's upload beyond [`Config::origin_max_upload`] times the stream; this pays them back, one
    /// copy at a time, so that over a whole event the broadcaster uploads no more than that. Only
    /// while the swarm is calm (no rescue for [`REPAY_QUIET_US`]), at most one copy per
    /// [`REPAY_GAP_US`] and the same child at most once per [`REPAY_CHILD_GAP_US`], and only a
    /// copy of a chunk that at least one other live first-tier child (not stuck, not silent) is
    /// pushed: the one left out is the child with the fewest children of its own, which pulls the
    /// chunk from a neighbour in the other subtree (it still hears our `Have`, and if nobody else
    /// has it we send it when asked).
    fn origin_leave_out(&self, now: Time, children: &[(ConnId, bool)], bytes: usize) -> Option<ConnId> {
        if !self.config.origin_pay_back {
            return None;
        }
        // The children that will really be sent this chunk: not let go, and taking what we send.
        let live = |c: &ConnId| {
            self.neighbours.get(c).is_some_and(|n| n.uploads < STUCK_UPLOADS && !n.stalled(now, SILENT_US))
        };
        let tier: Vec<ConnId> =
            children.iter().filter(|(_, released)| !released).map(|&(c, _)| c).filter(live).collect();
        // (At least two copies, and the last child in push order is the one with the fewest children.)
        let [_, .., candidate] = tier[..] else { return None };
        let up = self.counters.chunk_bytes_up + (tier.len() * bytes) as u64;
        if up as f64 <= self.config.origin_max_upload * self.published_bytes as f64 {
            return None;
        }
        let calm = self.last_rescue.is_none_or(|t| now >= t + REPAY_QUIET_US);
        let spaced = self.left_out.back().is_none_or(|&(t, _, _)| now >= t + REPAY_GAP_US);
        let rested = !self.left_out.iter().any(|&(t, c, _)| c == candidate && now < t + REPAY_CHILD_GAP_US);
        (calm && spaced && rested).then_some(candidate)
    }

    /// On the origin: the push of `seq` to `conn` is left out (see [`Self::origin_leave_out`]).
    /// Entries older than [`REPAY_CHILD_GAP_US`] no longer matter to the spacing rules and go.
    fn note_left_out(&mut self, now: Time, conn: ConnId, seq: u64) {
        self.counters.pushes_left_out += 1;
        while self.left_out.front().is_some_and(|&(t, _, _)| now >= t + REPAY_CHILD_GAP_US) {
            self.left_out.pop_front();
        }
        self.left_out.push_back((now, conn, Some(seq)));
    }

    /// Stops pushing anything to `conn`, telling it so.
    fn drop_child(&mut self, now: Time, conn: ConnId) {
        let substreams: Vec<u16> = self
            .neighbours
            .get_mut(&conn)
            .map(|n| std::mem::take(&mut n.child_of).iter().collect())
            .unwrap_or_default();
        for substream in substreams {
            if self.config.role == Role::Origin
                && let Some(t) = self.tier_lost_at.get_mut(usize::from(substream))
            {
                // What we pushed it lately may have gone nowhere.
                *t = Some(now);
            }
            self.send(conn, Message::Unsubscribe { substream });
        }
    }

    /// Chunk streams in flight to neighbours that are taking them. A stuck neighbour's do not count
    /// (they wait on its flow control, not on our uplink), nor do those of a child that has stalled
    /// (cut off: our pushes to it wait for acknowledgements that do not come, not for our uplink;
    /// counted, they would have us decline every request while the network to our children is
    /// down). A neighbour that is only waiting for repair answers is not judged so: its answers may
    /// really be queued behind others on a slow uplink.
    fn upload_queue(&self, now: Time) -> usize {
        self.neighbours
            .values()
            .filter(|n| n.uploads < STUCK_UPLOADS && !(n.child_of.len() > 0 && n.stalled(now, SILENT_US)))
            .map(|n| n.uploads)
            .sum()
    }

    fn send_chunk(&mut self, now: Time, conn: ConnId, chunk: Verified, priority: i32) {
        let bytes = chunk.payload().len() as u64;
        if let Some(n) = self.neighbours.get_mut(&conn) {
            if n.uploads == 0 {
                n.uploads_since = now;
            }
            n.uploads += 1;
            n.have.insert(chunk.seq(), ());
            n.stats.chunks_sent += 1;
            n.stats.bytes_sent += bytes;
        }
        self.counters.chunk_bytes_up += bytes;
        self.uploads_in_flight += 1;
        self.outputs.push_back(Output::SendChunk { conn, chunk, priority });
    }

    fn on_subscribe(&mut self, now: Time, conn: ConnId, substream: u16, substreams: u16, from_seq: u64) {
        let refuse = substreams != self.config.substreams || substream >= substreams || {
            let taken_here = self.neighbours.values().filter(|n| n.child_of.contains(substream)).count();
            let taken = self.children();
            let already = self.neighbours.get(&conn).is_some_and(|n| n.child_of.contains(substream));
            let on_probation = self.neighbours.get(&conn).and_then(|n| n.node).is_some_and(|id| {
                self.tier_probation.get(usize::from(substream)).and_then(|p| p.get(&id)).is_some_and(|&t| t > now)
            });
            !already
                && if self.config.role == Role::Origin {
                    on_probation
                        || !self.origin_may_take(now, conn, substream)
                        || taken_here >= self.config.origin_fanout
                            && !self.evict_leaf_for(now, conn, substream)
                            && !(self.tier_open.get(usize::from(substream)) == Some(&true)
                                && self.release_tier_slot(now, usize::from(substream)))
                } else {
                    // Spread the slots over the substreams: a chunk pushed to many children at once
                    // makes the last of them wait for all the others on our uplink.
                    let per_substream = self.per_substream_cap();
                    self.parents.get(usize::from(substream)) == Some(&Some(conn))
                        || self.config.push_slots == 0
                        || (taken >= self.config.push_slots || taken_here >= per_substream)
                            && !self.evict_leaf_for(now, conn, substream)
                }
        };
        if refuse {
            return self.send(conn, Message::Unsubscribe { substream });
        }
        let k = u64::from(substreams);
        let newest = self.chunks.end();
        let Some(n) = self.neighbours.get_mut(&conn) else { return };
        if n.child_of.insert(substream) {
            n.child_since.insert(substream, now);
        }
        // Catch the child up on what it lacks of this substream from `from_seq` on.
        let backlog: Vec<Verified> = self
            .chunks
            .iter()
            .filter(|(seq, _)| *seq >= from_seq && seq % k == u64::from(substream) && !n.have.contains(*seq))
            .map(|(_, c)| c.clone())
            .collect();
        for chunk in backlog {
            if self.config.role == Role::Origin && self.origin_over_budget(now, chunk.payload().len()) {
                // The origin's upload stays within its budget; the child can pull the rest elsewhere.
                break;
            }
            let p = urgency(newest, chunk.seq());
            self.send_chunk(now, conn, chunk, p);
        }
    }

    /// Full in `substream`, asked by `conn`: when `conn` can relay there and one of our children
    /// there cannot (it has no room for children of its own and none), lets that leaf go so the
    /// relay takes its place. Relays high in the tree and leaves at the bottom make the tree
    /// shallower for everyone; the leaf re-attaches further down at no cost to anyone below it.
    fn evict_leaf_for(&mut self, now: Time, conn: ConnId, substream: u16) -> bool {
        let s = usize::from(substream);
        let relay = self.neighbours.get(&conn).and_then(|n| n.tree_place(s)).is_some_and(|p| p.relays());
        if !relay {
            return false;
        }
        let Some((_, leaf)) = self.releasable_leaves(s, now).min() else { return false };
        if let Some(n) = self.neighbours.get_mut(&leaf) {
            n.child_of.remove(substream);
            n.child_since.remove(&substream);
            n.released.retain(|_, until| *until > now);
            n.released.insert(substream, now + LEAF_RELEASE_US);
        }
        self.send(leaf, Message::Unsubscribe { substream });
        true
    }

    fn on_unsubscribe(&mut self, now: Time, conn: ConnId, substream: u16) {
        let s = usize::from(substream);
        if let Some(n) = self.neighbours.get_mut(&conn) {
            n.child_of.remove(substream);
            n.child_since.remove(&substream);
        }
        let refused_switch = self.switching.get(s).is_some_and(|w| w.is_some_and(|(c, _)| c == conn));
        if self.parents.get(s) == Some(&Some(conn)) || refused_switch {
            if refused_switch {
                self.switching[s] = None;
            } else {
                self.parents[s] = None;
                self.next_tick = Some(now);
            }
            // It refused or dropped us: look elsewhere for a while (a spread of times, so that
            // nodes refused together do not all come back together).
            // The origin is asked again sooner: its first-tier slots rotate.
            let origin = self.neighbours.get(&conn).is_some_and(|n| n.role == Role::Origin);
            let back = if origin { 500_000 + self.rng.u64(..2_000_000) } else { 2_000_000 + self.rng.u64(..4_000_000) };
            self.refused[s].insert(conn, now + back);
        }
    }

    fn on_pong(&mut self, now: Time, conn: ConnId, sent: u64, reply: u64, their_offset: i64, their_error: u64) {
        if sent > now {
            return;
        }
        let rtt = now - sent;
        // NTP with one remote timestamp: their clock at `reply` matches ours at the midpoint.
        let offset_to_them = reply as i64 - (sent + rtt / 2) as i64;
        if let Some(n) = self.neighbours.get_mut(&conn) {
            n.stats.rtt_us = Some(rtt);
        }
        if their_error == u64::MAX || self.config.role == Role::Origin {
            return;
        }
        let error = their_error.saturating_add(rtt / 2);
        // Keep the best estimate, letting it age so a better path can replace it.
        let current = self.origin_offset.1.saturating_add(1_000);
        if error <= current {
            self.origin_offset = (offset_to_them.saturating_add(their_offset), error);
        } else {
            self.origin_offset.1 = current;
        }
    }

    /// Stores a verified chunk (first copy only), pushes it to children, announces it, and feeds
    /// playback.
    fn store(&mut self, now: Time, chunk: Verified, path: Path, from: Option<ConnId>) {
        let seq = chunk.seq();
        if self.chunks.contains(seq) {
            self.counters.duplicates += 1;
            if let Some(n) = from.and_then(|c| self.neighbours.get_mut(&c)) {
                n.stats.duplicates_received += 1;
            }
            return;
        }
        if seq < self.chunks.base() {
            return;
        }
        // A chunk far ahead of everything (stream restart, or a big gap) re-bases the window.
        if self.chunks.is_empty() && self.chunks.base() == 0 {
            self.chunks.advance_to(seq.saturating_sub(self.config.window as u64 / 2));
        }
        self.chunks.insert(seq, chunk.clone());
        let base = self.chunks.base();
        self.first_news.advance_to(base);
        if !self.origin_repaired.is_empty() {
            self.origin_repaired = self.origin_repaired.split_off(&base);
        }
        match path {
            Path::Push => self.counters.push += 1,
            Path::Pull => self.counters.pull += 1,
            Path::Local => {}
        }
        if let Some((c, _)) = self.requests.get(&seq).copied() {
            self.requests.remove(&seq);
            if Some(c) != from {
                // It came another way: the request is moot.
                self.send(c, Message::Cancel { seq });
            }
        }
        // Our parent for this substream announced it and may still be pushing it: tell it to stop.
        let k = u64::from(self.config.substreams);
        let substream = (seq % k) as u16;
        if path == Path::Pull
            && let Some(p) = self.parents[usize::from(substream)]
            && Some(p) != from
        {
            // The parent did not bring it in time (whether or not it had it): a miss.
            self.parent_misses[usize::from(substream)] += 1;
        }
        if path != Path::Local
            && let Some(p) = self.parents[usize::from(substream)]
            && Some(p) != from
            && self.neighbours.get(&p).is_some_and(|n| n.have.contains(seq))
        {
            self.send(p, Message::Cancel { seq });
        }
        let h = *chunk.header();
        if self.reference.is_none_or(|(s, _, _)| seq >= s) {
            self.reference = Some((seq, h.capture_us, h.duration_us));
        }
        if self.live_edge.is_none_or(|e| seq > e) {
            self.live_edge = Some(seq);
        }
        self.outputs.push_back(Output::Arrived { seq, capture_us: h.capture_us, bytes: chunk.payload().len(), path });

        // Announce it to every neighbour that lacks it, children included (so a child knows the push
        // is on its way and does not pull it elsewhere), then push it to the children of its substream.
        let newest = self.chunks.end();
        let mut children = Vec::new();
        for conn in self.ready_neighbours() {
            let Some(n) = self.neighbours.get(&conn) else { continue };
            if Some(conn) == from || n.have.contains(seq) {
                continue;
            }
            if n.child_of.contains(substream) {
                children.push((conn, false));
            } else if n.released.get(&substream).is_some_and(|&until| now < until) {
                children.push((conn, true));
            }
            self.send(conn, Message::Have { seq });
        }
        // Children that relay go first: the chunk reaches their subtrees a whole transmission
        // earlier, and leaves lose only that one transmission (as in a binomial broadcast tree).
        // A leaf let go for a relay (still pushed to while it moves) comes after the real children.
        children.sort_by_key(|&(c, released)| {
            let grandchildren =
                self.neighbours.get(&c).and_then(|n| n.tree_place(usize::from(substream))).map_or(0, |p| p.children);
            (released, std::cmp::Reverse(grandchildren))
        });
        let origin = self.config.role == Role::Origin;
        let leave_out = if origin { self.origin_leave_out(now, &children, chunk.payload().len()) } else { None };
        if let Some(conn) = leave_out {
            self.note_left_out(now, conn, seq);
        }
        for (place, (conn, released)) in children.into_iter().enumerate() {
            if Some(conn) == leave_out {
                continue;
            }
            if origin && released && self.origin_over_budget(now, chunk.payload().len()) {
                // The origin's first tier is its budget: a leaf it let go is pushed to only from
                // what the tier leaves unused, and pulls what it misses while it moves.
                continue;
            }
            if self.neighbours.get(&conn).is_some_and(|n| n.uploads >= STUCK_UPLOADS) {
                // A child that does not take what we send (a slow or hostile reader) would tie up our
                // uplink and queue chunks without end: stop pushing to it; it can subscribe elsewhere.
                self.drop_child(now, conn);
                continue;
            }
            self.send_chunk(now, conn, chunk.clone(), push_priority(newest, seq, place));
        }
        self.advance_playback(now);
    }

    /// The capture time of `seq`, exact when stored, else estimated from a reference chunk.
    fn capture_estimate(&self, seq: u64) -> Option<u64> {
        if let Some(c) = self.chunks.get(seq) {
            return Some(c.header().capture_us);
        }
        let (s, cap, dur) = self.reference?;
        let d = i128::from(seq) - i128::from(s);
        let t = i128::from(cap) + d * i128::from(dur);
        u64::try_from(t).ok()
    }

    /// The deadline of `seq` on our clock: capture time (origin clock) + target latency − origin offset.
    fn deadline(&self, seq: u64) -> Option<Time> {
        let cap = self.capture_estimate(seq)?;
        let t = i128::from(cap) + i128::from(self.config.target_latency_us) - i128::from(self.origin_offset.0);
        u64::try_from(t).ok()
    }

    fn advance_playback(&mut self, now: Time) {
        if self.config.role == Role::Origin {
            return;
        }
        if self.cursor.is_none() {
            let (Some(claimed), Some((_, _, dur))) = (self.live_edge, self.reference) else { return };
            // Claims heard before our first verified chunk may be lies: never start beyond the edge
            // the clock allows.
            let edge = self.newest_possible(now).map_or(claimed, |newest| claimed.min(newest));
            if edge < claimed {
                self.live_edge = Some(edge);
            }
            // Start as far back as the target latency allows while leaving time to fetch the chunk:
            // the first chunk whose deadline is at least a quarter of the latency away.
            let back = self.config.target_latency_us / u64::from(dur.max(1));
            let margin = self.config.target_latency_us / 4;
            let first = edge.saturating_sub(back).max(self.chunks.base());
            let start = match (first..=edge).find(|&seq| self.deadline(seq).is_some_and(|d| d > now + margin)) {
                Some(start) => start,
                // Everything we know of is already too late. If the clock says newer chunks exist
                // (we only hold a backlog, e.g. just after a broadcaster restart), wait for them
                // rather than start on chunks that will be skipped; otherwise the swarm is simply
                // slower than the target latency: start at the edge.
                None if self.newest_possible(now).is_some_and(|n| n > edge + back + 2) => return,
                None => edge,
            };
            self.cursor = Some(start);
        }
        if !self.cursor_started
            && let Some(from) = self.cursor
        {
            // Not playing yet: start at the first random-access chunk we hold from the cursor on,
            // rather than waiting for the one at the cursor itself.
            if let Some((seq, _)) = self.chunks.iter().find(|(seq, c)| {
                *seq >= from && c.header().is_random_access() && self.deadline(*seq).is_none_or(|d| d > now)
            }) {
                self.cursor = Some(seq);
            }
        }
        let mut guard = 0;
        while let Some(seq) = self.cursor {
            guard += 1;
            if guard > 2 * self.config.window + 8 {
                break;
            }
            if seq + self.config.window as u64 <= self.chunks.base() {
                // The stream jumped by more than a window (the broadcaster restarted, or we were cut
                // off for long): that is a discontinuity, not a run of missed chunks. Mark the gap once
                // and start again at the next random-access chunk.
                if self.cursor_started {
                    self.outputs.push_back(Output::Skip { seq });
                }
                // Start again like a joiner: target latency behind the live edge.
                self.cursor_started = false;
                self.cursor = None;
                self.next_tick = Some(now);
                break;
            }
            if seq < self.chunks.base() {
                // Fell out of the window: everything up to the base was missed.
                if self.cursor_started {
                    self.counters.skipped += 1;
                    self.outputs.push_back(Output::Skip { seq });
                }
                self.cursor = Some(seq + 1);
                continue;
            }
            if let Some(chunk) = self.chunks.get(seq) {
                if !self.cursor_started {
                    if !chunk.header().is_random_access() {
                        self.cursor = Some(seq + 1);
                        continue;
                    }
                    self.cursor_started = true;
                }
                let chunk = chunk.clone();
                self.ended |= chunk.header().flags.contains(crate::chunk::Flags::END_OF_STREAM);
                self.counters.delivered += 1;
                self.outputs.push_back(Output::Deliver(chunk));
                self.cursor = Some(seq + 1);
                continue;
            }
            match self.deadline(seq) {
                // Skip only a chunk that surely exists: one we have verified a later chunk than.
                // Claims are not enough (a liar could make us skip chunks the broadcaster has not
                // made yet, e.g. during an input stall), and a deadline alone is not either (the
                // broadcaster may have paused).
                Some(d) if now > d && self.reference.is_some_and(|(verified, _, _)| verified > seq) => {
                    if self.cursor_started {
                        self.counters.skipped += 1;
                        self.outputs.push_back(Output::Skip { seq });
                    }
                    self.cursor = Some(seq + 1);
                }
                _ => break,
            }
        }
    }

    /// Whether `conn` is the origin.
    fn is_origin(&self, conn: ConnId) -> bool {
        self.neighbours.get(&conn).is_some_and(|n| n.role == Role::Origin)
    }

    fn expire_requests(&mut self, now: Time) {
        if self.requests.is_empty() {
            return;
        }
        let expired: Vec<(u64, ConnId)> =
            self.requests.iter().filter(|(_, (_, t))| *t <= now).map(|(s, (c, _))| (*s, *c)).collect();
        for (seq, conn) in expired {
            self.requests.remove(&seq);
            self.counters.request_timeouts += 1;
            if let Some(n) = self.neighbours.get_mut(&conn) {
                n.stats.request_timeouts += 1;
                n.timeouts_in_a_row += 1;
                if n.role != Role::Origin {
                    // (The origin declines repair by design; it is not a broken promise.)
                    n.broke_promise(now);
                }
                // It claimed to have it but did not deliver: stop believing that claim, and after
                // repeated failures stop asking it for a while.
                n.have.remove(seq);
                if n.timeouts_in_a_row >= 3 {
                    n.busy_until = now + 10 * self.config.request_timeout_us;
                }
            }
        }
    }

    /// Pull repair: request chunks that neighbours have and the push tree has not brought.
    fn repair(&mut self, now: Time) {
        if self.config.role == Role::Origin {
            return;
        }
        let Some(edge) = self.live_edge else { return };
        // Until playback has started, fetch what the cursor needs at once rather than wait for the
        // push tree to form: the start point must be a random-access chunk, and with `K` a divisor
        // of the random-access period those all travel in one substream, whose parent may be slow.
        let bootstrapping = !self.cursor_started;
        let start = self.cursor.unwrap_or(edge.saturating_sub(2)).max(self.chunks.base());
        let k = u64::from(self.config.substreams);
        struct Want {
            seq: u64,
            urgent: bool,
            slack: i128,
            holders: usize,
            /// Outstanding at the origin (see below): ask anyone but it, and only then take it back.
            at_origin: Option<ConnId>,
        }
        let mut wants = Vec::new();
        for seq in start..=edge {
            if self.chunks.contains(seq) {
                continue;
            }
            let mut at_origin = None;
            if let Some(&(asked, _)) = self.requests.get(&seq) {
                // A joiner's first requests go to the origin, often its only neighbour for a moment,
                // and the origin lets requests for young chunks wait for its push tree, which does not
                // reach a node that has no parent yet. Once another neighbour can serve the chunk,
                // ask it instead of waiting out the request timeout (most of a joiner's startup).
                if !bootstrapping || !self.is_origin(asked) {
                    continue;
                }
                at_origin = Some(asked);
            }
            let s = (seq % k) as usize;
            let deadline = self.deadline(seq).map_or(i128::MAX, i128::from);
            let slack = deadline - i128::from(now);
            // Give the parent's push the time its pushes usually take to land, and a little more: up
            // to a request timeout, or up to two fifths of the target latency when that is longer
            // (a deep tree in a swarm of slow uplinks is slow, not broken, and a pull racing the
            // push only adds a duplicate to an uplink that is already the bottleneck).
            let parent = self.parents[s].and_then(|p| self.neighbours.get(&p));
            let patience = self.config.request_timeout_us.max(self.config.target_latency_us * 2 / 5);
            let grace = match parent {
                _ if bootstrapping => 0,
                Some(p) => p
                    .push_lag(s)
                    .map_or(self.config.pull_grace_us, |l| l + l / 2 + 50_000)
                    .clamp(self.config.pull_grace_us, patience.max(self.config.pull_grace_us)),
                None => 0,
            };
            let urgent = slack < i128::from(self.config.target_latency_us / 4);
            let waiting = |heard: Time| now < heard + grace && !urgent;
            // (Most chunks missing at any moment are still on their way by push: that test goes
            // before counting holders, which is the costly part.)
            let news = self.first_news.get(seq).copied();
            if news.is_some_and(waiting) {
                continue;
            }
            let holders = self
                .neighbours
                .values()
                .filter(|n| n.hello_done() && n.trusted(now) && n.have.contains(seq))
                .filter(|n| at_origin.is_none() || n.role != Role::Origin)
                .count();
            if holders == 0 {
                continue;
            }
            // A chunk announced while it looked like the future has no news time yet: it is news now.
            if news.is_none() {
                self.first_news.insert(seq, now);
                if waiting(now) {
                    continue;
                }
            }
            wants.push(Want { seq, urgent, slack, holders, at_origin });
        }
        // Earliest deadline first near the deadline, rarest first further out.
        wants.sort_by_key(|w| (!w.urgent, if w.urgent { w.slack } else { w.holders as i128 }, w.seq));
        let mut batches: BTreeMap<ConnId, Vec<u64>> = BTreeMap::new();
        for w in wants {
            let best = self
                .neighbours
                .iter()
                .filter(|(_, n)| n.hello_done() && n.trusted(now) && n.have.contains(w.seq) && n.busy_until <= now)
                .filter(|(_, n)| !(w.at_origin.is_some() && n.role == Role::Origin))
                .filter(|(c, n)| {
                    n.requests_out + batches.get(c).map_or(0, Vec::len) < self.config.max_requests_per_neighbour
                })
                .map(|(c, n)| {
                    let load = n.requests_out + batches.get(c).map_or(0, Vec::len);
                    // A neighbour we have not heard from for a while may be gone (cut off, crashed:
                    // QUIC takes seconds to say so); a request to it would eat most of the budget.
                    // Then: the origin serves repair only when nobody else can; among the rest, one that
                    // has delivered before (an unproven one may be a free rider), the least loaded,
                    // then a random one, so repair load spreads instead of piling on one node.
                    let silent = now.saturating_sub(n.last_heard) > SILENT_US;
                    ((silent, n.role == Role::Origin, n.credit <= 0, load, self.rng.u32(..)), *c)
                })
                .min()
                .map(|(_, c)| c);
            if let Some(c) = best {
                if let Some(origin) = w.at_origin {
                    // Taken back only now that someone else is asked: "got it elsewhere, stop".
                    self.requests.remove(&w.seq);
                    self.send(origin, Message::Cancel { seq: w.seq });
                }
                batches.entry(c).or_default().push(w.seq);
            }
        }
        for (conn, seqs) in batches {
            for &seq in &seqs {
                self.requests.insert(seq, (conn, now + self.config.request_timeout_us));
            }
            self.counters.requests_sent += seqs.len() as u64;
            if let Some(n) = self.neighbours.get_mut(&conn) {
                n.requests_out += seqs.len();
            }
            self.send(conn, Message::Request { seqs });
        }
        // Recount in-flight requests per neighbour (never drifts). With none in flight now and none
        // at the last count, every count is zero already.
        if self.requests.is_empty() && self.requests_counted_none {
            return;
        }
        self.requests_counted_none = self.requests.is_empty();
        for n in self.neighbours.values_mut() {
            n.requests_out = 0;
        }
        for (c, _) in self.requests.values() {
            if let Some(n) = self.neighbours.get_mut(c) {
                n.requests_out += 1;
            }
        }
    }

    /// On the origin: releases a first-tier slot of a substream that is not spreading.
    ///
    /// The origin cannot see whether a child relays (its children's subscriptions are visible only
    /// to it), but it can see the consequence: many distinct nodes asking *it* for chunks of one
    /// substream well after publishing (nodes ask the origin only when no other neighbour offers
    /// the chunk). Then the longest-serving child of that substream is released and kept out of
    /// it for a while, so another node can take the slot; one rotation per substream at a time,
    /// with a pause to see whether it helped.
    fn rotate_tier(&mut self, now: Time) {
        for s in 0..self.tier_demand.len() {
            let s16 = s as u16;
            if self.neighbours.values().any(|n| n.child_of.contains(s16)) {
                self.tier_empty_since[s] = None;
            } else {
                self.tier_empty_since[s].get_or_insert(now);
            }
            let demand = &mut self.tier_demand[s];
            while demand.front().is_some_and(|(t, _, _)| *t + 2_000_000 < now) {
                demand.pop_front();
            }
            self.tier_probation[s].retain(|_, t| *t > now);
            let askers: HashSet<ConnId> = demand.iter().map(|(_, c, _)| *c).collect();
            if self.tier_open[s]
                || askers.len() < self.config.origin_rotate_demand
                || now < self.tier_rotated_at[s] + 3_000_000
            {
                continue;
            }
            // Open the substream: the next node to ask for a slot gets the longest-held one.
            self.tier_rotated_at[s] = now;
            self.tier_demand[s].clear();
            self.tier_open[s] = true;
        }
    }

    /// On the origin: whether `conn` may hold a first-tier slot of `substream` as far as spreading
    /// the first tier goes. Each node holds at most `origin_slots_per_node` slots (more only in a
    /// substream that has had no child for two seconds: a small swarm), in one of the least-served
    /// substreams, so one free rider or one departure hurts fewer substreams.
    fn origin_may_take(&self, now: Time, conn: ConnId, substream: u16) -> bool {
        let held = self.neighbours.get(&conn).map_or(0, |n| n.child_of.len());
        // A second slot only for a substream nobody else has taken for a while (a small swarm).
        let starved =
            self.tier_empty_since.get(usize::from(substream)).is_some_and(|t| t.is_some_and(|t| now >= t + 2_000_000));
        if held >= self.config.origin_slots_per_node && !starved {
            return false;
        }
        let per = self.children_per_substream();
        let least = per.iter().copied().min().unwrap_or(0);
        per.get(usize::from(substream)).is_some_and(|&c| c <= least || c >= self.config.origin_fanout)
    }

    /// On the origin: releases the longest-held first-tier slot of substream `s` (held at least a
    /// little while) and keeps its holder out of `s` for a while. Whether one was released.
    fn release_tier_slot(&mut self, now: Time, s: usize) -> bool {
        let s16 = s as u16;
        let oldest = self
            .neighbours
            .iter()
            .filter(|(_, n)| n.child_of.contains(s16))
            .filter_map(|(c, n)| Some((*n.child_since.get(&s16)?, *c, n.node?)))
            .filter(|(since, _, _)| now >= since + 2_000_000)
            .min();
        let Some((_, conn, id)) = oldest else { return false };
        self.tier_open[s] = false;
        self.tier_rotated_at[s] = now;
        self.tier_demand[s].clear();
        self.tier_probation[s].insert(id, now + 30_000_000);
        self.counters.tier_rotations += 1;
        if let Some(n) = self.neighbours.get_mut(&conn) {
            n.child_of.remove(s16);
            n.child_since.remove(&s16);
        }
        self.send(conn, Message::Unsubscribe { substream: s16 });
        true
    }

    /// Our depth in substream `s`: one more than our parent's, 0 on the origin, [`NO_DEPTH`] with no
    /// path of parents to the origin.
    fn depth(&self, s: usize) -> u8 {
        if self.config.role == Role::Origin {
            return 0;
        }
        let parent = self.parents[s].and_then(|p| self.neighbours.get(&p)).and_then(|n| n.tree_place(s));
        match parent {
            Some(p) if p.depth < NO_DEPTH - 1 => p.depth + 1,
            _ => NO_DEPTH,
        }
    }

    /// Most children a relay takes in one substream: its slots spread over the substreams, since a
    /// chunk pushed to many children at once makes the last of them wait for all the others.
    fn per_substream_cap(&self) -> usize {
        self.config.push_slots / usize::from(self.config.substreams) + 1
    }

    /// Children per substream, counted in one pass over the neighbours.
    fn children_per_substream(&self) -> Vec<usize> {
        let mut per = vec![0usize; self.parents.len()];
        for n in self.neighbours.values() {
            for s in n.child_of.iter() {
                if let Some(c) = per.get_mut(usize::from(s)) {
                    *c += 1;
                }
            }
        }
        per
    }

    /// More children we would take in substream `s` now (the rules of `on_subscribe`), given the
    /// children per substream and how many of our leaf children in `s` a relay may displace.
    fn spare(&self, s: usize, per: &[usize], releasable: usize) -> u8 {
        let taken_here = per.get(s).copied().unwrap_or(0);
        let spare = if self.config.role == Role::Origin {
            let free = self.config.origin_fanout.saturating_sub(taken_here);
            if free == 0 && self.tier_open[s] { 1 } else { free }
        } else {
            let per_substream = self.per_substream_cap();
            if self.config.push_slots == 0 {
                0
            } else {
                let taken: usize = per.iter().sum();
                self.config.push_slots.saturating_sub(taken).min(per_substream.saturating_sub(taken_here))
            }
        };
        // A relay may also take the place of a leaf child (see `evict_leaf_for`).
        let spare = if spare == 0 { releasable } else { spare };
        spare.min(usize::from(u8::MAX)) as u8
    }

    /// Our leaf children in substream `s` that have held their place for [`LEAF_TENURE_US`], with
    /// since when: the ones a relay may take the place of.
    fn releasable_leaves(&self, s: usize, now: Time) -> impl Iterator<Item = (Time, ConnId)> + '_ {
        let s16 = s as u16;
        self.neighbours
            .iter()
            .filter(move |(_, n)| n.child_of.contains(s16) && releasable_leaf(n, s, now))
            .filter_map(move |(c, n)| Some((*n.child_since.get(&s16)?, *c)))
    }

    fn tree_places(&self, now: Time) -> Vec<TreePlace> {
        // Children and releasable leaves per substream in one pass over the neighbours (this runs
        // every tick once the last announcement is old enough).
        let k = self.parents.len();
        let (mut per, mut releasable) = (vec![0usize; k], vec![0usize; k]);
        for n in self.neighbours.values() {
            for s16 in n.child_of.iter() {
                let s = usize::from(s16);
                let Some(c) = per.get_mut(s) else { continue };
                *c += 1;
                if releasable_leaf(n, s, now) {
                    releasable[s] += 1;
                }
            }
        }
        (0..k)
            .map(|s| TreePlace {
                depth: self.depth(s),
                children: per[s].min(255) as u8,
                spare: self.spare(s, &per, releasable[s]),
            })
            .collect()
    }

    /// Tells the neighbours where we stand in the trees when that has changed (at most every
    /// [`TREE_INTERVAL_US`]).
    fn advertise_tree(&mut self, now: Time) {
        if now < self.tree_sent_at + TREE_INTERVAL_US {
            return;
        }
        let places = self.tree_places(now);
        // What a neighbour acts on: the depth, whether there is room, whether there are children
        // (exact counts ride along, but a count going from 3 to 2 is not worth a message to all).
        let gist = |p: &TreePlace| (p.depth, p.spare > 0, p.children > 0);
        if places.len() == self.tree_sent.len() && places.iter().zip(&self.tree_sent).all(|(a, b)| gist(a) == gist(b)) {
            return;
        }
        self.tree_sent_at = now;
        self.tree_sent = places.clone();
        for conn in self.ready_neighbours() {
            self.send(conn, Message::Tree(places.clone()));
        }
    }

    /// Picks or replaces the parent of each substream.
    ///
    /// Candidates are neighbours with room for another child there (they say so in `Tree`) and a
    /// path to the origin no longer than our feasibility bound (so the new edge cannot close a loop),
    /// ranked by depth, then by how early their news arrives. The current parent is judged by when
    /// its pushes land, which adds the wait on its uplink; it is replaced when it keeps missing
    /// pushes or loses its own path to the origin, or, after a minimum dwell, when a candidate is
    /// clearly shallower or its news clearly earlier than the parent's pushes. A node that has
    /// children but has found no parent it may take for a while releases them, so they re-attach
    /// elsewhere.
    fn choose_parents(&mut self, now: Time) {
        let k = self.parents.len();
        let per = self.children_per_substream();
        for s in 0..k {
            self.refused[s].expire(now);
            let s16 = s as u16;
            let has_children = per.get(s).is_some_and(|&c| c > 0);
            // The parent, looked up once: (whether we trust it, its depth).
            let parent = self.parents[s].map(|p| {
                self.neighbours
                    .get(&p)
                    .map_or((false, NO_DEPTH), |n| (n.trusted(now), n.tree_place(s).map_or(NO_DEPTH, |t| t.depth)))
            });
            let depth = match parent {
                Some((_, d)) if d < NO_DEPTH - 1 => d + 1,
                _ => NO_DEPTH,
            };
            debug_assert_eq!(depth, self.depth(s));
            if !has_children {
                self.feasible[s] = NO_DEPTH;
            } else if depth != NO_DEPTH {
                self.feasible[s] = self.feasible[s].min(depth);
            }
            if let Some(p) = self.parents[s]
                && (self.parent_misses[s] >= self.config.parent_max_misses
                    || parent.is_some_and(|(trusted, _)| !trusted))
            {
                // It announces chunks and does not push them: a stalled or free-riding parent.
                self.refused[s].insert(p, now + 30_000_000);
                self.drop_parent(s);
            }
            // A switch under way: the new parent has had time to refuse; if it has not, it is ours.
            if let Some((c, at)) = self.switching[s] {
                if !self.neighbours.contains_key(&c) || self.refused[s].contains(c) {
                    self.switching[s] = None;
                } else if now >= at || self.parents[s].is_none() {
                    self.switching[s] = None;
                    self.drop_parent(s);
                    self.parents[s] = Some(c);
                    self.parent_since[s] = now;
                    self.parent_misses[s] = 0;
                    self.parent_cut_since[s] = None;
                    continue;
                } else {
                    continue;
                }
            }
            if let Some(p) = self.parents[s] {
                // A working parent is reviewed now and then, not every tick (it is the hot path of
                // a large simulation): at once when it has lost its own path, else after the dwell.
                // (Still the parent looked up above: a change of parent ends this round.)
                let parent_depth = parent.map_or(NO_DEPTH, |(_, d)| d);
                debug_assert_eq!(
                    parent_depth,
                    self.neighbours.get(&p).and_then(|n| n.tree_place(s)).map_or(NO_DEPTH, |t| t.depth)
                );
                let cut_off = if parent_depth == NO_DEPTH {
                    now >= *self.parent_cut_since[s].get_or_insert(now) + PARENT_CUT_PATIENCE_US
                } else {
                    self.parent_cut_since[s] = None;
                    false
                };
                let settled = now >= self.parent_since[s] + self.config.parent_min_dwell_us;
                if !(cut_off || settled && now >= self.parent_review_at[s]) {
                    continue;
                }
                self.parent_review_at[s] = now + PARENT_REVIEW_US;
            }
            let bound = self.feasible[s];
            let best = self
                .neighbours
                .iter()
                .filter(|(c, n)| {
                    n.hello_done()
                        && n.trusted(now)
                        && Some(**c) != self.parents[s]
                        && !n.child_of.contains(s16)
                        && !self.refused[s].contains(**c)
                })
                .filter_map(|(c, n)| {
                    let place = n.tree_place(s)?;
                    let feasible = place.depth != NO_DEPTH && (bound == NO_DEPTH || place.depth <= bound);
                    (feasible && place.spare > 0).then(|| ((place.depth, n.lag_score(s), *c), *c))
                })
                .min();
            let Some(((best_depth, best_score, _), best)) = best else {
                if self.parents[s].is_none() && has_children {
                    // Stranded: nobody we may take as a parent. After a while let the children go,
                    // which lifts our bound (and theirs) so everyone can re-attach.
                    let since = *self.stranded_since[s].get_or_insert(now);
                    if now >= since + STRANDED_US {
                        self.stranded_since[s] = None;
                        self.release_children(s16);
                    }
                }
                continue;
            };
            self.stranded_since[s] = None;
            // Ask only for what playback still needs; a node that has not started asks from the edge.
            let from_seq = self.cursor.or(self.live_edge).unwrap_or(u64::MAX).max(self.chunks.base());
            let subscribe = Message::Subscribe { substream: s16, substreams: self.config.substreams, from_seq };
            if let Some(p) = self.parents[s] {
                let Some(n) = self.neighbours.get(&p) else { continue };
                let parent_depth = n.tree_place(s).map_or(NO_DEPTH, |t| t.depth);
                let score = n.push_lag(s).unwrap_or(0).max(n.lag_score(s));
                let settled = now >= self.parent_since[s] + self.config.parent_min_dwell_us;
                // A parent that lost its own parent usually finds another within a round trip or
                // two: it was given a moment (above) before the whole subtree moves.
                let cut_off = parent_depth == NO_DEPTH;
                let shallower = u16::from(best_depth) + 1 < u16::from(parent_depth);
                let earlier = best_depth <= parent_depth
                    && score > best_score.saturating_add(self.config.parent_switch_margin_us);
                if !(cut_off || settled && (shallower || earlier)) {
                    continue;
                }
                // Make before break: keep the working parent until the new one has not refused
                // within a round trip (a refusal is an `Unsubscribe`).
                let rtt = self.neighbours.get(&best).and_then(|n| n.stats.rtt_us).unwrap_or(200_000);
                self.switching[s] = Some((best, now + 2 * rtt + self.config.tick_us));
                self.send(best, subscribe);
                continue;
            }
            self.parents[s] = Some(best);
            self.parent_since[s] = now;
            self.parent_misses[s] = 0;
            self.parent_cut_since[s] = None;
            self.send(best, subscribe);
        }
    }

    /// Stops pushing substream `s` to all our children there, telling them so.
    fn release_children(&mut self, s: u16) {
        let children: Vec<ConnId> =
            self.neighbours.iter().filter(|(_, n)| n.child_of.contains(s)).map(|(c, _)| *c).collect();
        for conn in children {
            if let Some(n) = self.neighbours.get_mut(&conn) {
                n.child_of.remove(s);
                n.child_since.remove(&s);
            }
            self.send(conn, Message::Unsubscribe { substream: s });
        }
    }

    /// Leaves the parent of substream `s`.
    fn drop_parent(&mut self, s: usize) {
        if let Some(old) = self.parents[s].take() {
            self.counters.parent_changes += 1;
            if let Some(n) = self.neighbours.get_mut(&old) {
                n.reset_push_lag(s);
            }
            self.send(old, Message::Unsubscribe { substream: s as u16 });
        }
    }

    /// We are no longer dialing `node` (the dial ended either way).
    fn stop_dialing(&mut self, node: NodeId) {
        self.dialing.remove(&node);
        if let Some(k) = self.known.get_mut(&node) {
            k.dialing = false;
        }
    }

    /// Something changed that may make a known node worth dialing before `dial_idle_until`.
    fn dial_again(&mut self) {
        self.dial_idle_until = 0;
    }

    fn maintain_membership(&mut self, now: Time) {
        // Dial until we have enough neighbours.
        let have = self.neighbours.len() + self.dialing.len();
        if have < self.config.target_neighbours && now >= self.dial_idle_until {
            // (A node short of neighbours would otherwise sift every node it knows, every tick.)
            let mut next = Time::MAX;
            let mut candidates = Vec::new();
            for (id, k) in &self.known {
                debug_assert_eq!((k.connected, k.dialing), (self.by_node.contains_key(id), self.dialing.contains(id)));
                if k.banned_until > now || k.retry_at > now {
                    next = next.min(k.banned_until.max(k.retry_at));
                } else if !k.connected && !k.dialing {
                    candidates.push(*id);
                }
            }
            let need = self.config.target_neighbours - have;
            // All of them dialed now: nobody else until a wait runs out or something changes.
            self.dial_idle_until = if candidates.len() <= need { next } else { 0 };
            candidates.sort_unstable();
            self.rng.shuffle(&mut candidates);
            for id in candidates.into_iter().take(need) {
                let Some(k) = self.known.get_mut(&id) else { continue };
                k.retry_at = now + 3_000_000;
                k.dialing = true;
                self.dialing.insert(id);
                self.outputs.push_back(Output::Connect(NodeAddr { id, addrs: k.addrs.clone() }));
            }
        }
        // Periodic peer exchange and buffer-map refresh.
        if now >= self.next_peer_exchange {
            self.next_peer_exchange = now + 5_000_000;
            for conn in self.ready_neighbours() {
                let peers = self.sample_peers(conn, 8);
                if !peers.is_empty() {
                    self.send(conn, Message::Peers(peers));
                }
            }
        }
        // Drop handshakes that never completed.
        let stale: Vec<ConnId> = self
            .neighbours
            .iter()
            .filter(|(_, n)| !n.hello_done() && now.saturating_sub(n.since) > 10_000_000)
            .map(|(c, _)| *c)
            .collect();
        for c in stale {
            self.goodbye(now, c, GoodbyeReason::Useless, "no hello");
        }
    }
}

/// Whether `n`, a child of ours in substream `s`, is a leaf there that has held its place for
/// [`LEAF_TENURE_US`]: one a relay may take the place of.
fn releasable_leaf(n: &Neighbour, s: usize, now: Time) -> bool {
    let leaf = n.tree_place(s).is_some_and(|p| !p.relays());
    leaf && n.child_since.get(&(s as u16)).is_some_and(|since| now >= since + LEAF_TENURE_US)
}

/// How many forgettable known nodes a full table compares to choose the one it forgets.
const FORGET_CANDIDATES: usize = 8;

/// On the origin: chunks it may send beyond its upload budget in a burst.
const ORIGIN_BURST_CHUNKS: u64 = 2;

/// On the origin: no first-tier push is left out to pay back its budget until this long after
/// the last rescue copy, µs (a swarm that needed one is not calm yet).
const REPAY_QUIET_US: Time = 2_000_000;

/// With [`Config::origin_pay_back`], the origin may go beyond its budget by the start-up burst only
/// this long after its first chunk, µs (the reports' warm-up).
const REPAY_BURST_US: Time = 5_000_000;

/// On the origin: least time between two first-tier pushes left out to pay back its budget, µs.
const REPAY_GAP_US: Time = 1_000_000;

/// On the origin: least time between two pushes left out to the same first-tier child, µs, so
/// its children never see it miss twice in a row.
const REPAY_CHILD_GAP_US: Time = 5_000_000;

/// Least time between two `Tree` announcements of ours, µs.
const TREE_INTERVAL_US: Time = 100_000;

/// How long a parent may have no path to the origin before its children look elsewhere, µs.
const PARENT_CUT_PATIENCE_US: Time = 1_000_000;

/// A neighbour silent for longer than this is asked for repair only when no other holder is left, µs.
/// Live neighbours announce every chunk, several times a second.
const SILENT_US: Time = 500_000;

/// How often a working parent is compared with the other candidates, µs.
const PARENT_REVIEW_US: Time = 250_000;

/// How long a node with children may go without a parent it may take before it releases them, µs.
const STRANDED_US: Time = 2_000_000;

/// On the origin: a chunk requested this long after publishing should have come through the tree, µs.
const OLD_AT_ORIGIN_US: u64 = 400_000;

/// On the origin: a chunk pushed to a first-tier child that vanished within this long may have
/// died with it (it had not yet been relayed), µs.
const ORPHAN_US: u64 = 1_000_000;

/// On the origin: most requests let wait at once (a few per neighbour and chunk in flight).
const MAX_PARKED: usize = 1024;

/// A neighbour with this many chunk streams still in flight is not taking them (flow control): it gets
/// no more pushes and its streams no longer count as load on our uplink.
const STUCK_UPLOADS: usize = 8;

/// Pushed chunks go ahead of repair answers on our uplink: the push tree is what keeps everyone fed.
const PUSH_PRIORITY: i32 = 100_000;

/// A leaf child is kept at least this long before a relay may take its place, µs.
const LEAF_TENURE_US: Time = 2_000_000;

/// A leaf let go for a relay is still pushed to for this long, while it finds another parent, µs.
const LEAF_RELEASE_US: Time = 1_500_000;

/// Stream priority of a push: above every repair answer; older chunks first, then one chunk's
/// children in the order given (a transport that shares its uplink between streams of equal
/// priority would deliver the chunk to all children late, instead of to each in turn).
fn push_priority(end: u64, seq: u64, place: usize) -> i32 {
    PUSH_PRIORITY + urgency(end, seq) * 64 - place.min(63) as i32
}

/// Stream priority for a chunk: older (closer to its deadline) is more urgent.
fn urgency(end: u64, seq: u64) -> i32 {
    end.saturating_sub(seq).min(10_000) as i32
}

fn approx_frame_len(m: &Message) -> usize {
    match m {
        Message::Have { .. } | Message::Cancel { .. } => 13,
        Message::Request { seqs } => 7 + 8 * seqs.len(),
        Message::Ping { .. } => 21,
        Message::Pong { .. } => 45,
        Message::Subscribe { .. } => 17,
        Message::Unsubscribe { .. } => 7,
        other => other.to_frame().len(),
    }
}

#[cfg(test)]
mod tests;

/// Tests that drive one node by hand: neighbours' messages in, its outputs checked.
#[cfg(test)]
mod one_node {
    use std::net::SocketAddr;

    use bytes::Bytes;

    use super::*;
    use crate::chunk::Flags;
    use crate::keys::{NodeKey, StreamKey};
    use crate::wire::TreePlace;

    const RELAY: TreePlace = TreePlace { depth: 3, children: 0, spare: 2 };
    const LEAF: TreePlace = TreePlace { depth: 3, children: 0, spare: 0 };

    /// A swarm with neighbours on conns 1.. that have said hello and where they stand.
    fn swarm_with(config: Config, places: &[TreePlace]) -> (Swarm, StreamKey) {
        let stream_key = StreamKey::from_secret_bytes([1; 32]);
        let k = usize::from(config.substreams);
        let mut swarm = Swarm::new(config, stream_key.id(), NodeKey::from_secret_bytes([2; 32]).id());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!());
        for (i, place) in places.iter().enumerate() {
            let conn = ConnId(i as u64 + 1);
            let node = NodeKey::from_secret_bytes([i as u8 + 3; 32]).id();
            swarm.handle_connected(0, conn, node, addr, false);
            swarm.handle_message(
                0,
                conn,
                Message::Hello(Box::new(Hello {
                    version: crate::PROTOCOL_VERSION,
                    stream: stream_key.id(),
                    node,
                    role: Role::Relay,
                    listen: Vec::new(),
                    have: crate::window::BufferMap::empty(0),
                })),
            );
            swarm.handle_message(0, conn, Message::Tree(vec![*place; k]));
        }
        drain(&mut swarm);
        (swarm, stream_key)
    }

    fn drain(swarm: &mut Swarm) -> Vec<Output> {
        std::iter::from_fn(|| swarm.poll_output()).collect()
    }

    /// Drains the outputs, every chunk sent counted as delivered at `now` (for tests that are not
    /// about the uplink).
    fn drain_sent(swarm: &mut Swarm, now: Time) -> Vec<Output> {
        let out = drain(swarm);
        for o in &out {
            if let Output::SendChunk { conn, chunk, .. } = o {
                swarm.handle_chunk_sent(now, *conn, chunk.seq(), true);
            }
        }
        out
    }

    fn subscribe(swarm: &mut Swarm, now: Time, conn: ConnId) -> Vec<Output> {
        swarm.handle_message(now, conn, Message::Subscribe { substream: 0, substreams: 4, from_seq: u64::MAX });
        drain(swarm)
    }

    fn unsubscribed(out: &[Output]) -> Vec<ConnId> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { conn, message: Message::Unsubscribe { substream: 0 } } => Some(*conn),
                _ => None,
            })
            .collect()
    }

    fn pushed_to(out: &[Output]) -> Vec<ConnId> {
        out.iter()
            .filter_map(|o| match o {
                Output::SendChunk { conn, .. } => Some(*conn),
                _ => None,
            })
            .collect()
    }

    /// An origin with one first-tier child per substream (conn 1; conn 2 is another relay) and an
    /// upload budget of one copy of the stream, that has published `seqs` at `now` and pushed each
    /// to the child, all of it delivered.
    fn origin_with_a_first_tier(now: Time, seqs: &[u64]) -> (Swarm, StreamKey) {
        let config = Config { role: Role::Origin, origin_fanout: 1, origin_max_upload: 1.0, ..Config::default() };
        let (mut swarm, key) = swarm_with(config, &[RELAY; 2]);
        let first = ConnId(1);
        subscribe(&mut swarm, now, first);
        for &seq in seqs {
            let chunk = Verified::sign(&key, seq, now, 250_000, Flags::RANDOM_ACCESS, Bytes::from_static(b"x"));
            swarm.publish(now, chunk);
            assert_eq!(pushed_to(&drain(&mut swarm)), vec![first]);
            swarm.handle_chunk_sent(now, first, seq, true);
        }
        (swarm, key)
    }

    /// Connects a neighbour of `role` on `conn` (we dialled it) that says hello and announces `have`.
    fn connect(swarm: &mut Swarm, stream_key: &StreamKey, now: Time, conn: u64, role: Role, have: &[u64]) {
        let node = NodeKey::from_secret_bytes([conn as u8 + 3; 32]).id();
        let hello = Hello {
            version: crate::PROTOCOL_VERSION,
            stream: stream_key.id(),
            node,
            role,
            listen: Vec::new(),
            have: crate::window::BufferMap::empty(0),
        };
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!());
        swarm.handle_connected(now, ConnId(conn), node, addr, true);
        swarm.handle_message(now, ConnId(conn), Message::Hello(Box::new(hello)));
        for &seq in have {
            swarm.handle_message(now, ConnId(conn), Message::Have { seq });
        }
    }

    /// Full, we let a leaf child go for a relay (once the leaf has held its place a while), keep
    /// pushing to the leaf for a moment so it misses nothing while it re-attaches, and never let
    /// a leaf go for another leaf.
    #[test]
    fn a_relay_takes_the_place_of_a_leaf_child() {
        let (source, leaf, relay, other_leaf) = (ConnId(1), ConnId(2), ConnId(3), ConnId(4));
        let config = Config { push_slots: 1, ..Config::default() };
        let (mut swarm, key) = swarm_with(config, &[RELAY, LEAF, RELAY, LEAF]);
        assert!(unsubscribed(&subscribe(&mut swarm, 0, leaf)).is_empty(), "a free slot was refused");
        // Too soon: the leaf keeps its place and the relay is refused.
        assert_eq!(unsubscribed(&subscribe(&mut swarm, 1_000_000, relay)), vec![relay]);
        // A leaf never displaces a leaf.
        assert_eq!(unsubscribed(&subscribe(&mut swarm, LEAF_TENURE_US, other_leaf)), vec![other_leaf]);
        let at = LEAF_TENURE_US + 1;
        assert_eq!(unsubscribed(&subscribe(&mut swarm, at, relay)), vec![leaf], "the leaf was not let go");
        let chunk = |seq: u64, now: Time| {
            Verified::sign(&key, seq, now, 250_000, Flags::RANDOM_ACCESS, Bytes::from_static(b"x"))
        };
        swarm.handle_chunk(at + 100_000, source, chunk(1000, at));
        assert_eq!(pushed_to(&drain(&mut swarm)), vec![relay, leaf], "relay first, then the leaf while it moves");
        let later = at + LEAF_RELEASE_US + 1;
        swarm.handle_chunk(later, source, chunk(1004, later));
        assert_eq!(pushed_to(&drain(&mut swarm)), vec![relay]);
    }

    /// The origin lets a leaf go for a relay like any node, but its pushes to the leaf while it
    /// moves come out of the upload budget: with the budget spent on its first tier, only the relay
    /// that took the place gets the chunk; with room left, the leaf gets it too.
    #[test]
    fn the_origin_pushes_to_a_leaf_it_let_go_only_within_its_budget() {
        let (leaf, relay, asker) = (ConnId(1), ConnId(2), ConnId(3));
        let pushes_after_release = |origin_max_upload: f64| {
            let config = Config { role: Role::Origin, origin_fanout: 1, origin_max_upload, ..Config::default() };
            let (mut swarm, key) = swarm_with(config, &[LEAF, RELAY, RELAY]);
            let chunk = |seq: u64, now: Time| {
                Verified::sign(&key, seq, now, 250_000, Flags::RANDOM_ACCESS, Bytes::from_static(b"x"))
            };
            assert!(unsubscribed(&subscribe(&mut swarm, 0, leaf)).is_empty(), "a free slot was refused");
            for seq in [1000, 1004] {
                swarm.publish(0, chunk(seq, 0));
                assert_eq!(pushed_to(&drain(&mut swarm)), vec![leaf]);
            }
            // Two repair answers spend the burst allowance.
            swarm.handle_message(1, asker, Message::Request { seqs: vec![1000, 1004] });
            assert_eq!(pushed_to(&drain(&mut swarm)), vec![asker, asker]);
            let at = LEAF_TENURE_US + 1;
            assert_eq!(unsubscribed(&subscribe(&mut swarm, at, relay)), vec![leaf], "the leaf was not let go");
            swarm.publish(at, chunk(1008, at));
            pushed_to(&drain(&mut swarm))
        };
        // One copy of the stream: every byte went to the first tier (and the allowance).
        assert_eq!(pushes_after_release(1.0), vec![relay], "the origin went over its budget for a leaf");
        // Two copies: half the budget is unused, and the leaf is pushed to while it moves.
        assert_eq!(pushes_after_release(2.0), vec![relay, leaf]);
    }

    /// With `origin_pay_back`, the copies a rescue sent beyond the budget are paid back: once the
    /// swarm has been calm for a while, one first-tier push of a new chunk is left out (the child
    /// still hears of it, and gets it when it asks), and then no more until the debt is back. Off,
    /// the first tier always gets every copy.
    #[test]
    fn the_origin_pays_back_a_rescue_by_leaving_out_one_first_tier_push() {
        let (first, second, asker) = (ConnId(1), ConnId(2), ConnId(3));
        let t0: Time = 1_000_000;
        let run = |origin_pay_back: bool| {
            // One substream, so both first-tier slots are in it.
            let config = Config { role: Role::Origin, origin_pay_back, substreams: 1, ..Config::default() };
            let (mut swarm, key) = swarm_with(config, &[RELAY; 3]);
            for child in [first, second] {
                swarm.handle_message(t0, child, Message::Subscribe { substream: 0, substreams: 1, from_seq: u64::MAX });
            }
            assert!(unsubscribed(&drain(&mut swarm)).is_empty(), "a first-tier slot was refused");
            let publish = |swarm: &mut Swarm, seq: u64, now: Time| {
                swarm.publish(
                    now,
                    Verified::sign(&key, seq, now, 250_000, Flags::RANDOM_ACCESS, Bytes::from_static(b"x")),
                );
                drain_sent(swarm, now)
            };
            let mut pushes = vec![pushed_to(&publish(&mut swarm, 1000, t0))];
            // Still missing 500 ms on: a rescue copy, one beyond the two the budget allows.
            swarm.handle_message(t0 + 500_000, asker, Message::Request { seqs: vec![1000] });
            assert_eq!(pushed_to(&drain_sent(&mut swarm, t0 + 500_000)), vec![asker], "no rescue");
            // Too soon after the rescue to pay it back.
            pushes.push(pushed_to(&publish(&mut swarm, 1004, t0 + 1_000_000)));
            let out = publish(&mut swarm, 1008, t0 + 3_000_000);
            pushes.push(pushed_to(&out));
            let told = |conn| {
                out.iter()
                    .any(|o| matches!(o, Output::Send { conn: c, message: Message::Have { seq: 1008 } } if *c == conn))
            };
            assert!(told(first) && told(second), "a first-tier child was not told of the chunk");
            if origin_pay_back {
                // The child left out asks for it: it gets it, and that is not paid back again at once.
                swarm.handle_message(t0 + 3_200_000, second, Message::Request { seqs: vec![1008] });
                assert_eq!(pushed_to(&drain_sent(&mut swarm, t0 + 3_200_000)), vec![second]);
            }
            pushes.push(pushed_to(&publish(&mut swarm, 1012, t0 + 4_500_000)));
            // Calm again and still in debt, but the same child is not left out twice within 5 s
            // (being served after all does not count as having been pushed to).
            pushes.push(pushed_to(&publish(&mut swarm, 1016, t0 + 5_600_000)));
            (pushes, swarm.counters().pushes_left_out, swarm.counters().left_out_served)
        };
        let both = vec![first, second];
        assert_eq!(run(false), (vec![both.clone(); 5], 0, 0));
        assert_eq!(run(true), (vec![both.clone(), both.clone(), vec![first], both.clone(), both], 1, 1));
    }

    /// Paying back never leaves out the one push of a chunk that will really go out: a first-tier
    /// child that is not taking what the origin sends does not count as the other copy.
    #[test]
    fn paying_back_leaves_no_chunk_without_a_live_first_tier_child() {
        let (first, second, asker) = (ConnId(1), ConnId(2), ConnId(3));
        let t0: Time = 1_000_000;
        let config = Config { role: Role::Origin, origin_pay_back: true, substreams: 1, ..Config::default() };
        let (mut swarm, key) = swarm_with(config, &[RELAY; 3]);
        for child in [first, second] {
            swarm.handle_message(t0, child, Message::Subscribe { substream: 0, substreams: 1, from_seq: u64::MAX });
        }
        assert!(unsubscribed(&drain(&mut swarm)).is_empty(), "a first-tier slot was refused");
        let chunk = |seq: u64, now: Time| {
            Verified::sign(&key, seq, now, 250_000, Flags::RANDOM_ACCESS, Bytes::from_static(b"x"))
        };
        swarm.publish(t0, chunk(1000, t0));
        drain_sent(&mut swarm, t0);
        // A rescue copy puts the origin in debt.
        swarm.handle_message(t0 + 500_000, asker, Message::Request { seqs: vec![1000] });
        assert_eq!(pushed_to(&drain_sent(&mut swarm, t0 + 500_000)), vec![asker], "no rescue");
        // `first` stops taking chunks: its pushes pile up until it counts as stuck.
        for (i, seq) in (1001..1001 + STUCK_UPLOADS as u64).enumerate() {
            let now = t0 + 600_000 + i as u64 * 50_000;
            swarm.publish(now, chunk(seq, now));
            assert_eq!(pushed_to(&drain(&mut swarm)), vec![first, second]);
            swarm.handle_chunk_sent(now, second, seq, true);
        }
        // Calm and in debt, but `second` is the only child that will be sent the chunk.
        let now = t0 + 3_000_000;
        swarm.publish(now, chunk(1100, now));
        assert_eq!(pushed_to(&drain(&mut swarm)), vec![second], "the chunk went to nobody");
        assert_eq!(swarm.counters().pushes_left_out, 0);
    }

    /// `Tree` goes out when what neighbours act on changes (room or none, children or none, depth),
    /// not on every change of a count.
    #[test]
    fn tree_is_sent_when_room_or_children_change_not_on_every_count() {
        let config = Config { push_slots: 8, ..Config::default() };
        let (mut swarm, _) = swarm_with(config, &[RELAY; 8]);
        let cap = swarm.per_substream_cap();
        assert!(cap < 8, "more neighbours than the substream takes");
        let mut now = 1_000_000;
        let mut trees_after = Vec::new();
        for child in 0..cap {
            subscribe(&mut swarm, now, ConnId(child as u64 + 2));
            now += 200_000;
            swarm.handle_timeout(now);
            let sent = drain(&mut swarm).iter().any(|o| matches!(o, Output::Send { message: Message::Tree(_), .. }));
            trees_after.push(sent);
        }
        // First child (children 0 -> 1) and the one that fills the substream (spare -> 0) only.
        let mut expected = vec![false; cap];
        expected[0] = true;
        expected[cap - 1] = true;
        assert_eq!(trees_after, expected);
    }

    /// Over its upload budget the origin lets a young chunk's request wait for the push tree; but a
    /// chunk whose first-tier child has vanished since may have died with it, and is served at once.
    #[test]
    fn the_origin_rescues_a_chunk_its_vanished_first_tier_child_had() {
        let (first, asker) = (ConnId(1), ConnId(2));
        let now = 1_000_000;
        let (mut swarm, _) = origin_with_a_first_tier(now, &[1000, 1004, 1008]);
        // Two repair answers use up the burst allowance; the third request waits for the tree.
        swarm.handle_message(now, asker, Message::Request { seqs: vec![1000, 1004, 1008] });
        let out = drain_sent(&mut swarm, now);
        assert_eq!(pushed_to(&out), vec![asker, asker]);
        assert!(!out.iter().any(|o| matches!(o, Output::Send { message: Message::Cancel { .. }, .. })));
        // A first-tier child goes (crashed, say) before relaying the chunk: now it is served.
        swarm.handle_disconnected(now + 30_000, first);
        swarm.handle_message(now + 40_000, asker, Message::Request { seqs: vec![1008] });
        assert_eq!(pushed_to(&drain_sent(&mut swarm, now + 40_000)), vec![asker], "the orphaned chunk was not served");
    }

    /// A requester that takes a waiting request back (`Cancel`: it asked a relay instead) and later
    /// asks the origin again, because the relay let it down, is waited for and rescued like anyone:
    /// a request says the requester does not have the chunk, whatever its `Cancel` said before.
    #[test]
    fn a_request_taken_back_and_made_again_still_waits_for_a_rescue() {
        let (first, asker) = (ConnId(1), ConnId(2));
        let now = 1_000_000;
        let (mut swarm, _) = origin_with_a_first_tier(now, &[1000, 1004, 1008]);
        // Two answers use up the burst allowance; the request for 1008 waits.
        swarm.handle_message(now, asker, Message::Request { seqs: vec![1000, 1004, 1008] });
        assert_eq!(pushed_to(&drain(&mut swarm)), vec![asker, asker]);
        swarm.handle_message(now + 5_000, asker, Message::Cancel { seq: 1008 });
        swarm.handle_message(now + 10_000, asker, Message::Request { seqs: vec![1008] });
        swarm.handle_timeout(now + 20_000);
        assert!(pushed_to(&drain(&mut swarm)).is_empty(), "a young chunk was served over the budget");
        // The first-tier child goes before relaying it: the waiting request is answered.
        swarm.handle_disconnected(now + 30_000, first);
        swarm.handle_timeout(now + 40_000);
        assert_eq!(pushed_to(&drain(&mut swarm)), vec![asker], "the request made again was forgotten");
    }

    /// A request for a young chunk that the origin lets wait is answered once the chunk's whole first
    /// tier stops taking what the origin sends (cut off, with the connections still open): then
    /// nobody else may have the chunk, and the requester would not ask the origin again after its
    /// request timed out. While the tier takes its pushes, the request just waits.
    #[test]
    fn the_origin_answers_a_waiting_request_once_its_first_tier_goes_quiet() {
        let answers_to_waiting_request = |tier_takes_pushes: bool| {
            let (first, asker) = (ConnId(1), ConnId(2));
            let now = 1_000_000;
            let (mut swarm, key) = origin_with_a_first_tier(now, &[1000, 1004, 1008]);
            // The next push is the one the tier may not take.
            let chunk = Verified::sign(&key, 1012, now, 250_000, Flags::RANDOM_ACCESS, Bytes::from_static(b"x"));
            swarm.publish(now + 100_000, chunk);
            assert_eq!(pushed_to(&drain(&mut swarm)), vec![first]);
            if tier_takes_pushes {
                swarm.handle_chunk_sent(now + 150_000, first, 1012, true);
            }
            // Two answers use up the burst allowance; the request for 1008 waits, silently.
            swarm.handle_message(now + 200_000, asker, Message::Request { seqs: vec![1000, 1004, 1008] });
            let out = drain(&mut swarm);
            assert_eq!(pushed_to(&out), vec![asker, asker]);
            assert!(!out.iter().any(|o| matches!(o, Output::Send { message: Message::Cancel { .. }, .. })));
            // Not quiet for long enough yet.
            swarm.handle_timeout(now + 500_000);
            assert!(pushed_to(&drain(&mut swarm)).is_empty());
            // Half a second since the push went out with nothing back.
            swarm.handle_timeout(now + 650_000);
            pushed_to(&drain(&mut swarm))
        };
        assert_eq!(answers_to_waiting_request(false), vec![ConnId(2)], "the waiting request was not answered");
        assert!(answers_to_waiting_request(true).is_empty(), "answered although the tier takes its pushes");
    }

    /// The origin's rescue copy of a chunk that has not spread goes out even when its upload queue
    /// is full, as it is of pushes to a first tier that has been cut off (they are never
    /// acknowledged): declining it would leave the chunk with nobody but the origin.
    #[test]
    fn the_origin_sends_a_rescue_copy_past_a_full_upload_queue() {
        let config = Config { role: Role::Origin, origin_fanout: 1, ..Config::default() };
        let queue = config.max_upload_queue;
        let (mut swarm, key) = swarm_with(config, &[RELAY; 2]);
        let (first, asker) = (ConnId(1), ConnId(2));
        let now = 1_000_000;
        subscribe(&mut swarm, now, first);
        // Pushes that never complete fill the queue.
        let seqs: Vec<u64> = (0..queue as u64).map(|i| 1000 + 4 * i).collect();
        for &seq in &seqs {
            let chunk = Verified::sign(&key, seq, now, 250_000, Flags::RANDOM_ACCESS, Bytes::from_static(b"x"));
            swarm.publish(now, chunk);
            assert_eq!(pushed_to(&drain(&mut swarm)), vec![first]);
        }
        assert_eq!(swarm.upload_queue(now), queue);
        // Long after publishing, a chunk is asked for: its first tier did not spread it.
        let last = *seqs.last().unwrap_or_else(|| unreachable!());
        swarm.handle_message(now + 700_000, asker, Message::Request { seqs: vec![last] });
        assert_eq!(pushed_to(&drain(&mut swarm)), vec![asker], "the rescue copy was declined");
    }

    /// A relay whose child has stopped acknowledging its pushes (cut off, the connection still open)
    /// does not count those pushes as load on its uplink: it still answers other neighbours'
    /// requests. It used to decline them all while the network to its child was down.
    #[test]
    fn pushes_to_a_stalled_child_do_not_fill_the_upload_queue() {
        let config = Config::default();
        let queue = config.max_upload_queue as u64;
        let (mut swarm, key) = swarm_with(config, &[RELAY; 3]);
        let (child, source, asker) = (ConnId(1), ConnId(2), ConnId(3));
        let now = 1_000_000;
        assert!(unsubscribed(&subscribe(&mut swarm, now, child)).is_empty(), "a free slot was refused");
        for i in 0..queue {
            let seq = 1000 + 4 * i;
            let chunk = Verified::sign(&key, seq, now, 250_000, Flags::RANDOM_ACCESS, Bytes::from_static(b"x"));
            swarm.handle_chunk(now, source, chunk);
            assert_eq!(pushed_to(&drain(&mut swarm)), vec![child]);
        }
        // Nothing back from the child for well over half a second.
        swarm.handle_message(now + 700_000, asker, Message::Request { seqs: vec![1000] });
        assert_eq!(pushed_to(&drain(&mut swarm)), vec![asker], "declined behind pushes going nowhere");
    }

    /// A neighbour that asks for a whole window at once fills at most half our repair queue; another
    /// neighbour's request that arrives right after is still answered.
    #[test]
    fn a_greedy_neighbour_cannot_take_the_whole_repair_queue() {
        let (mut swarm, stream_key) = swarm_with(Config::default(), &[RELAY; 3]);
        let (source, greedy, honest) = (ConnId(1), ConnId(2), ConnId(3));
        let now = 10_000_000;
        for seq in 100..120u64 {
            let chunk = Verified::sign(&stream_key, seq, now, 250_000, Flags::RANDOM_ACCESS, Bytes::from_static(b"x"));
            swarm.handle_chunk(now, source, chunk);
        }
        while swarm.poll_output().is_some() {}
        swarm.handle_message(now, greedy, Message::Request { seqs: (100..120).collect() });
        swarm.handle_message(now, honest, Message::Request { seqs: vec![110] });
        let mut sent = HashMap::new();
        while let Some(out) = swarm.poll_output() {
            if let Output::SendChunk { conn, .. } = out {
                *sent.entry(conn).or_insert(0) += 1;
            }
        }
        let share = Config::default().max_upload_queue / 2;
        assert!(sent.get(&greedy).copied().unwrap_or(0) <= share, "greedy neighbour got {sent:?}");
        assert_eq!(sent.get(&honest).copied(), Some(1), "the other neighbour was not served: {sent:?}");
    }

    /// A joiner's first request goes to the origin, its only neighbour at first, which lets requests
    /// for young chunks wait. Once a relay announces the chunk, the joiner asks the relay (and tells
    /// the origin it need not answer) instead of waiting out the request timeout.
    #[test]
    fn a_joiner_takes_its_first_requests_back_from_the_origin_once_a_relay_has_the_chunk() {
        let stream_key = StreamKey::from_secret_bytes([1; 32]);
        let mut swarm = Swarm::new(Config::default(), stream_key.id(), NodeKey::from_secret_bytes([2; 32]).id());
        let requested_from = |out: &[Output], seq: u64| -> Vec<ConnId> {
            out.iter()
                .filter_map(|o| match o {
                    Output::Send { conn, message: Message::Request { seqs } } if seqs.contains(&seq) => Some(*conn),
                    _ => None,
                })
                .collect()
        };
        let seq = 1_000;
        connect(&mut swarm, &stream_key, 0, 1, Role::Origin, &[]);
        swarm.handle_message(1_000, ConnId(1), Message::Have { seq });
        let mut now = 1_000;
        let mut out = Vec::new();
        while requested_from(&out, seq).is_empty() && now < 200_000 {
            now += 5_000;
            swarm.handle_timeout(now);
            out = drain(&mut swarm);
        }
        assert_eq!(requested_from(&out, seq), vec![ConnId(1)], "the first request goes to the origin");
        // The origin says nothing (it lets the request wait); a relay connects and has the chunk.
        connect(&mut swarm, &stream_key, now, 2, Role::Relay, &[seq]);
        let asked_origin_at = now;
        let mut out = Vec::new();
        while requested_from(&out, seq).is_empty() && now < asked_origin_at + 1_000_000 {
            now += 5_000;
            swarm.handle_timeout(now);
            out = drain(&mut swarm);
        }
        assert_eq!(requested_from(&out, seq), vec![ConnId(2)], "the request was not moved to the relay");
        assert!(
            now - asked_origin_at < Config::default().request_timeout_us / 2,
            "moved only after {} µs, as a timed-out request would be",
            now - asked_origin_at
        );
        assert!(
            out.iter().any(
                |o| matches!(o, Output::Send { conn: ConnId(1), message: Message::Cancel { seq: s } } if *s == seq)
            ),
            "the origin was not told to drop the request"
        );
    }

    /// The joiner takes a request back from the origin only for a neighbour it actually asks
    /// instead: with more chunks to move than the relay has request slots, the rest stay asked of
    /// the origin rather than being cancelled there and left unasked.
    #[test]
    fn a_joiner_takes_back_from_the_origin_only_what_another_neighbour_is_asked_for() {
        let stream_key = StreamKey::from_secret_bytes([1; 32]);
        let config = Config { max_requests_per_neighbour: 2, ..Config::default() };
        let mut swarm = Swarm::new(config, stream_key.id(), NodeKey::from_secret_bytes([2; 32]).id());
        let (origin, relay) = (ConnId(1), ConnId(2));
        // The origin has 1000 and 1001; the joiner asks it for both (its whole allowance there).
        connect(&mut swarm, &stream_key, 0, 1, Role::Origin, &[1000, 1001]);
        let mut now = 0;
        let mut asked_origin = Vec::new();
        while asked_origin.len() < 2 && now < 200_000 {
            now += 5_000;
            swarm.handle_timeout(now);
            for o in drain(&mut swarm) {
                if let Output::Send { conn, message: Message::Request { seqs } } = o {
                    assert_eq!(conn, origin);
                    asked_origin.extend(seqs);
                }
            }
        }
        assert_eq!(asked_origin, vec![1000, 1001]);
        // A relay with room for two requests has those and 999, which only it has: 999 and one of
        // the origin's two go to it, and the other stays with the origin.
        connect(&mut swarm, &stream_key, now, 2, Role::Relay, &[999, 1000, 1001]);
        let (mut cancelled, mut moved) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            now += 5_000;
            swarm.handle_timeout(now);
            for o in drain(&mut swarm) {
                match o {
                    Output::Send { conn, message: Message::Cancel { seq } } if conn == origin => cancelled.push(seq),
                    Output::Send { conn, message: Message::Request { seqs } } if conn == relay => moved.extend(seqs),
                    _ => {}
                }
            }
        }
        moved.sort_unstable();
        assert_eq!(moved, vec![999, 1000], "the relay was not asked for what it alone has, or not first");
        assert_eq!(cancelled, vec![1000], "the origin was told to drop a request nobody else was asked for");
    }

    /// A node remembers at most `max_known` peers however many it is told of. Once its table is
    /// full, a newly named node takes the place of one it is not connected to, so a node that
    /// filled its table early still learns of the rest of the swarm; but a banned node is never
    /// forgotten (a flood of names cannot lift a ban), nor one it is connected to.
    #[test]
    fn a_full_table_of_known_peers_makes_room_but_keeps_neighbours_and_bans() {
        let config = Config { max_known: 10, ..Config::default() };
        let (mut swarm, _) = swarm_with(config, &[RELAY, RELAY]);
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!());
        let named = |i: u16| NodeAddr { id: NodeKey::from_secret_bytes([i as u8 + 100; 32]).id(), addrs: vec![addr] };
        // Neighbour 1 is known (it told us where it listens); neighbour 2 misbehaves and is banned.
        let neighbour = NodeKey::from_secret_bytes([3; 32]).id();
        swarm.learn(0, NodeAddr { id: neighbour, addrs: vec![addr] });
        if let Some(k) = swarm.known.get_mut(&neighbour) {
            k.connected = true;
        }
        swarm.ban(0, ConnId(2));
        let banned = NodeKey::from_secret_bytes([4; 32]).id();
        assert!(swarm.known.contains_key(&banned));
        let told: Vec<NodeAddr> = (0..crate::wire::MAX_PEERS as u16).map(named).collect();
        swarm.handle_message(1_000, ConnId(1), Message::Peers(told[..30].to_vec()));
        swarm.handle_message(2_000, ConnId(1), Message::Peers(told[30..].to_vec()));
        assert_eq!(swarm.known.len(), 10, "known peers beyond the cap");
        assert!(swarm.known.contains_key(&neighbour), "a neighbour was forgotten");
        assert!(swarm.known.contains_key(&banned), "a ban was forgotten");
        // The last name was learnt: the table did not freeze with the first ones.
        assert!(swarm.known.contains_key(&told[told.len() - 1].id), "the table stopped learning");
        // With nothing left to forget, nothing new is learnt.
        for k in swarm.known.values_mut() {
            k.connected = true;
        }
        swarm.handle_message(3_000, ConnId(1), Message::Peers(vec![named(150)]));
        assert!(!swarm.known.contains_key(&named(150).id));
        assert_eq!(swarm.known.len(), 10);
    }
}
