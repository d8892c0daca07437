//! The swarm lab: N real nodes over real QUIC on 127.0.0.1, in this process or spread over worker
//! processes, fed by a synthetic origin or by a live stream's ticket, measured, and summarised in a
//! JSON report.
//!
//! **Feed.** By default an origin in the lab's own process publishes a signed random payload at the
//! configured bitrate ([`Feed::Synthetic`]). Given a ticket ([`Feed::Ticket`]), the relays join a
//! stream that is already live (a real broadcaster, started apart): the report then takes the
//! bitrate and chunk length from the chunks, and the origin's upload from what the relays received
//! straight from it (the broadcaster's own counters are in another process, perhaps another host).
//!
//! **Processes.** With [`LabConfig::processes`] above 1 the relays are split over that many worker
//! processes (`crowdsurf-peer lab-worker`, see [`worker`]), each with its own runtime; the origin and
//! the schedule's clock stay here. Each worker runs the whole schedule and acts on its share of it
//! ([`crowd`]), and hands its peers' figures back at the end.
//!
//! Latency is arrival time − capture time, both on the host's clock: exact for the synthetic origin
//! and for a broadcaster on the same host; fed by a broadcaster elsewhere, it carries the two
//! clocks' offset (keep them in NTP sync, and read the figures with that in mind). Scenarios: steady
//! (everyone joins within the first [`LabConfig::ramp`]), churn (peers leave without a goodbye and new ones join at a given
//! rate) and flash crowd (a batch of peers joins within a short time mid-run).
//!
//! **Links.** With a delay, jitter, loss or an upload mix, every node (the origin included) sends
//! through an emulated link ([`crate::net::emulate`]): each direction of each connection gets the
//! one-way delay, so a round trip is twice it. An upload mix gives each relay an upload level drawn
//! as the simulator draws it ([`crate::simulate::upload_factor`]) and applies it twice:
//!
//! - as the **link's bottleneck**, 10 % above the level (room for QUIC, UDP and control bytes): the
//!   physical limit, which also slows control messages, acknowledgements and retransmissions; and
//! - as the node's **chunk shaper** at the level itself: the node knows its upload (as a real peer
//!   told `--max-upload` does), sends urgent chunks first across all connections, and keeps the
//!   bottleneck queue short, so control messages are not stuck behind a buffer of chunk data. This is
//!   also what the simulator models (one priority-ordered uplink at the upload rate, control skipping
//!   the queue), and the swarm's push budget (`push_slots`) is derived from the level the same way.
//!
//! With the link cap alone, QUIC's congestion control would fill the bottleneck buffer and every
//! control message would wait behind it: a real effect of a misconfigured peer, not the one the lab
//! means to measure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crowdsurf_proto::wire::Role;
use crowdsurf_proto::{NodeKey, StreamKey, Ticket};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::net::LinkModel;
use crate::node::{Node, NodeConfig};
use crate::report::{Report, RunTotals, Scenario};
use crate::source::SyntheticSource;
use crate::stats::LatencySummary;

mod crowd;
pub mod worker;

/// Where a lab's stream comes from.
#[derive(Debug, Clone, Default)]
pub enum Feed {
    /// An origin in the lab's process publishes a signed random payload at
    /// [`LabConfig::bitrate_bps`] in [`LabConfig::chunk_ms`] chunks.
    #[default]
    Synthetic,
    /// The relays join the live stream this ticket names (a broadcaster started apart).
    Ticket(Ticket),
}

/// Why a lab run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A node could not be set up.
    #[error(transparent)]
    Node(#[from] crate::NodeError),
    /// The options do not make a run.
    #[error("lab: {0}")]
    Config(String),
    /// A worker process could not be started.
    #[error("lab worker process ({exe}): {source}")]
    Spawn {
        /// The program started.
        exe: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The pipe between the lab and a worker process failed (in the lab: the worker's stdin or
    /// stdout; in a worker: its own).
    #[error("lab worker pipe ({what}): {source}")]
    Pipe {
        /// Which side and which stream.
        what: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A worker process failed or ended without its figures.
    #[error("lab worker {share}: {message}")]
    Worker {
        /// Which share of the relays it ran.
        share: usize,
        /// What it said, or how it ended.
        message: String,
    },
    /// Fed by a ticket, no relay delivered a single chunk.
    #[error("no relay delivered a chunk of the ticket's stream: is it live, and are its nodes reachable?")]
    NothingDelivered,
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabConfig {
    /// Relays at the start.
    pub peers: usize,
    /// The relays present at the start join spread evenly over this long, while the stream runs (the
    /// simulator's `ramp`, whose default is the same). Zero: all at once as the first chunk is
    /// published, so every QUIC handshake and slow start of the swarm falls on its first second.
    pub ramp: Duration,
    /// How long the stream runs.
    pub duration: Duration,
    /// Stream bitrate, bits per second.
    pub bitrate_bps: u64,
    /// Chunk duration, ms.
    pub chunk_ms: u32,
    /// Random-access chunk every this many chunks.
    pub random_access_every: u64,
    /// Target latency of every node.
    pub latency: Duration,
    /// Per-relay upload cap, bytes per second (the node's chunk shaper only).
    pub max_upload: Option<u64>,
    /// One-way delay of every link.
    pub link_delay: Duration,
    /// Uniform jitter bound added to the delay, per datagram.
    pub jitter: Duration,
    /// Share of datagrams lost on every link.
    pub loss: f64,
    /// Upload mix: mean relay upload as a multiple of the bitrate (None: unlimited).
    pub upload_mean: Option<f64>,
    /// Upload mix: share of relays between 0.5x and 0.9x the bitrate.
    pub slow_share: f64,
    /// The origin's upload as a multiple of the bitrate (None: unlimited).
    pub origin_upload: Option<f64>,
    /// The origin pays back what it sends beyond twice the stream (the swarm's `origin_pay_back`).
    pub strict_upload: bool,
    /// Share of the peers replaced per minute (0.2 = 20 %/min): leave without goodbye, new ones join.
    pub churn_per_min: f64,
    /// A flash crowd: this many extra peers join, spread over `flash_over`, at `flash_at`.
    pub flash: usize,
    /// When the flash crowd starts.
    pub flash_at: Duration,
    /// Over how long the flash crowd joins.
    pub flash_over: Duration,
    /// Seed for node keys and choices.
    pub seed: u64,
    /// Print a progress line this often (None: quiet).
    pub progress: Option<Duration>,
    /// Where the stream comes from (not sent to worker processes, which get a ticket).
    #[serde(skip)]
    pub feed: Feed,
    /// Operating-system processes to run the relays in: 1 runs them in this process beside the
    /// origin; more starts that many `crowdsurf-peer lab-worker` processes and splits the relays
    /// among them.
    pub processes: usize,
    /// The program a worker process runs (None: this executable, which must be `crowdsurf-peer`).
    #[serde(skip)]
    pub worker_exe: Option<PathBuf>,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            peers: 20,
            ramp: Duration::from_secs(2),
            duration: Duration::from_secs(20),
            bitrate_bps: 2_500_000,
            chunk_ms: 250,
            random_access_every: 4,
            latency: Duration::from_secs(1),
            max_upload: None,
            link_delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            upload_mean: None,
            slow_share: 0.2,
            origin_upload: None,
            strict_upload: false,
            churn_per_min: 0.0,
            flash: 0,
            flash_at: Duration::from_secs(5),
            flash_over: Duration::from_secs(2),
            seed: 1,
            progress: Some(Duration::from_secs(2)),
            feed: Feed::Synthetic,
            processes: 1,
            worker_exe: None,
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn key(seed: u64, n: u64) -> [u8; 32] {
    let mut rng = fastrand_like(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n);
    let mut k = [0u8; 32];
    for b in k.chunks_mut(8) {
        b.copy_from_slice(&rng().to_le_bytes());
    }
    k
}

/// splitmix64: deterministic key material for lab nodes (never for real keys).
fn fastrand_like(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl LabConfig {
    fn emulated(&self) -> bool {
        !self.link_delay.is_zero()
            || !self.jitter.is_zero()
            || self.loss > 0.0
            || self.upload_mean.is_some()
            || self.origin_upload.is_some()
    }

    /// The link of a node uploading `upload_bps` (bits per second of chunk data), if any.
    fn link(&self, upload_bps: Option<u64>, seed: u64) -> Option<LinkModel> {
        if !self.emulated() {
            return None;
        }
        let mut link = LinkModel::delay(self.link_delay).with_jitter(self.jitter).with_loss(self.loss).with_seed(seed);
        if let Some(bps) = upload_bps {
            link = link.with_rate((bps as f64 * LINK_HEADROOM / 8.0) as u64);
            link.queue = Duration::from_millis(200);
        }
        Some(link)
    }
}

/// The link's bottleneck over the chunk upload level: QUIC and UDP headers, control, acknowledgements.
const LINK_HEADROOM: f64 = 1.1;

/// How far ahead of now a run split over worker processes starts, so that every worker has been
/// started and has read its plan before the first relay is due (a late one catches up).
const WORKER_LEAD: Duration = Duration::from_millis(500);

/// How long after the stream ends a share's figures may take to arrive: one playback latency to let
/// the last chunks land, the collection itself, and room for a loaded machine.
const COLLECT_GRACE: Duration = Duration::from_secs(60);

/// The origin of a synthetic feed, in this process.
struct Origin {
    handle: crate::NodeHandle,
    source: SyntheticSource,
    upload_bps: Option<u64>,
}

/// One share of the relays under way, in this process or in a worker. Dropped before its figures
/// are in (another share failed, the run was cancelled), it stops: its relays end, and a worker
/// process is killed with the task that holds it.
struct Share {
    progress: watch::Receiver<crowd::Progress>,
    outcome: tokio::task::JoinHandle<Result<crowd::Outcome, LabError>>,
    /// Its figures, if it handed them in before the run's end (a worker whose clock stepped).
    early: Option<crowd::Outcome>,
}

impl Share {
    /// Its figures, or why it has none, once its task has ended (`share` names it in the error).
    async fn finish(&mut self, share: usize) -> Result<crowd::Outcome, LabError> {
        match (&mut self.outcome).await {
            Ok(result) => result,
            Err(e) => Err(LabError::Worker { share, message: format!("its task failed: {e}") }),
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.outcome.abort();
    }
}

/// The widest gap in sequence numbers between two chunks the relays played that is taken for
/// chunks nobody got; a wider one is the stream starting over (chunks in a 64-chunk row lost by
/// every relay would have shown as a continuity collapse anyway).
const MAX_SEQ_GAP: u64 = 64;

/// A ticket's stream as measured from the chunks the relays played (each once, in sequence order).
#[derive(Debug, PartialEq)]
struct StreamSeen {
    bitrate_bps: u64,
    chunk_ms: u32,
    keyint_ms: u64,
    /// Chunks published from the first seen to the last: sequence numbers are consecutive, so a
    /// chunk no relay got was published all the same (a jump beyond [`MAX_SEQ_GAP`] is not counted).
    published: u64,
    /// Of those, the ones up to the last captured before the warm-up's end.
    published_before_warm_up: u64,
    /// Mean payload bytes of a chunk.
    chunk_bytes: u64,
}

impl StreamSeen {
    /// `None` when nothing was seen.
    fn of(seen: &[&crowd::ChunkSeen], warm_up_us: u64) -> Option<StreamSeen> {
        let (first, last) = (seen.first()?.seq, seen.last()?.seq);
        let count = seen.len() as u64;
        let bytes: u64 = seen.iter().map(|c| c.bytes).sum();
        let media_us: u64 = seen.iter().map(|c| u64::from(c.duration_us)).sum();
        // Rounded: a chunk of whole video frames is a little more or less than its nominal length.
        let chunk_ms = ((media_us / count + 500) / 1000).max(1) as u32;
        // Where the numbering jumps (a broadcaster that restarted numbers its chunks afresh, from
        // its clock): the chunks in between were never published.
        let jumps: Vec<(u64, u64)> =
            seen.windows(2).map(|w| (w[0].seq, w[1].seq)).filter(|(a, b)| b.saturating_sub(*a) > MAX_SEQ_GAP).collect();
        // The median gap between key chunks, leaving out those across a jump: one key chunk that
        // nobody got does not double it.
        let keys: Vec<u64> = seen.iter().filter(|c| c.random_access).map(|c| c.seq).collect();
        let mut gaps: Vec<u64> = keys
            .windows(2)
            .filter(|w| !jumps.iter().any(|&(a, b)| w[0] <= a && b <= w[1]))
            .map(|w| w[1].saturating_sub(w[0]))
            .collect();
        gaps.sort_unstable();
        // Chunks published up to `seq`: the span from the first, less the jumps.
        let published_to = |seq: u64| {
            let skipped: u64 = jumps.iter().filter(|(_, b)| *b <= seq).map(|(a, b)| b - a - 1).sum();
            seq.saturating_sub(first) + 1 - skipped
        };
        let before = seen.iter().filter(|c| c.capture_us < warm_up_us).map(|c| c.seq).max();
        Some(StreamSeen {
            bitrate_bps: (bytes as f64 * 8.0 / (media_us.max(1) as f64 / 1e6)) as u64,
            chunk_ms,
            keyint_ms: gaps.get(gaps.len() / 2).map_or(0, |g| g.saturating_mul(u64::from(chunk_ms))),
            published: published_to(last),
            published_before_warm_up: before.map_or(0, published_to),
            chunk_bytes: bytes / count,
        })
    }
}

/// Runs the lab to the end and returns its report.
pub async fn run(cfg: LabConfig) -> Result<Report, LabError> {
    if cfg.processes == 0 {
        return Err(LabError::Config("--processes must be at least 1".into()));
    }
    let loopback: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let latency_us = cfg.latency.as_micros() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    let lag = Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .unwrap_or_else(|_| unreachable!("static bounds are valid")),
    ));
    tasks.spawn(sample_scheduler_lag(lag.clone()));
    let cpu_start = process_cpu_seconds();
    // The feed: an origin here, or a stream that is already live.
    let (origin, ticket, window) = match &cfg.feed {
        Feed::Synthetic => {
            let stream = StreamKey::from_secret_bytes(key(cfg.seed, u64::MAX));
            // Ten seconds of window whatever the chunk length, as the simulator keeps.
            let window = (10_000 / cfg.chunk_ms.max(1)).max(8) as usize;
            let mut origin_cfg = NodeConfig::new(NodeKey::from_secret_bytes(key(cfg.seed, 0)), stream.id(), loopback);
            origin_cfg.swarm.role = Role::Origin;
            origin_cfg.swarm.target_latency_us = latency_us;
            origin_cfg.swarm.window = window;
            origin_cfg.swarm.max_neighbours = 64;
            origin_cfg.swarm.origin_pay_back = cfg.strict_upload;
            let upload_bps = cfg.origin_upload.map(|m| (m * cfg.bitrate_bps as f64) as u64);
            origin_cfg.endpoint.link = cfg.link(upload_bps, cfg.seed);
            if let Some(bps) = upload_bps {
                origin_cfg.endpoint.max_upload_bytes_per_sec = Some((bps / 8).max(1));
            }
            let (origin_node, handle) = Node::bind(origin_cfg)?;
            let ticket = Ticket::new(stream.id(), vec![handle.node_addr()]);
            tasks.spawn(async move {
                let _ = origin_node.run().await;
            });
            let first_seq = now_us() / 1000;
            let source =
                SyntheticSource::new(stream, first_seq, cfg.chunk_ms, cfg.bitrate_bps, cfg.random_access_every);
            (Some(Origin { handle, source, upload_bps }), ticket, Some(window))
        }
        Feed::Ticket(ticket) => (None, ticket.clone(), None),
    };
    let shares = cfg.processes;
    let lead = if shares > 1 { WORKER_LEAD } else { Duration::ZERO };
    let start = Instant::now() + lead;
    let start_us = now_us() + lead.as_micros() as u64;
    let measure_stream = origin.is_none();
    let plan = |share| crowd::Plan {
        cfg: cfg.clone(),
        ticket: ticket.to_string(),
        start_us,
        share,
        shares,
        window,
        measure_stream,
    };
    let mut running = Vec::with_capacity(shares);
    if shares == 1 {
        let (tx, rx) = watch::channel(crowd::Progress::default());
        let plan = plan(0);
        running.push(Share {
            progress: rx,
            outcome: tokio::spawn(async move { crowd::run(&plan, start, &tx).await }),
            early: None,
        });
    } else {
        let exe = match &cfg.worker_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().map_err(|source| LabError::Spawn { exe: "this program".into(), source })?,
        };
        for share in 0..shares {
            let (tx, rx) = watch::channel(crowd::Progress::default());
            let (exe, plan) = (exe.clone(), plan(share));
            running.push(Share { progress: rx, outcome: tokio::spawn(worker::drive(exe, plan, tx)), early: None });
        }
    }
    let mut origin = origin;
    tokio::time::sleep_until(start.into()).await;
    let mut chunk_tick = tokio::time::interval(Duration::from_millis(u64::from(cfg.chunk_ms)));
    let mut progress = tokio::time::interval(cfg.progress.unwrap_or(Duration::from_secs(3600)));
    progress.tick().await;
    let end = start + cfg.duration;
    let mut published = 0u64;
    let warm_up = start + Duration::from_secs_f64(crate::report::WARM_UP_S);
    let mut at_warm_up = None;
    // A share ends before the run does when it failed: look every 200 ms, and end the run there.
    let mut watchdog = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            // Biased, so that the end wins over a chunk due at the same instant: a run publishes
            // exactly one chunk per tick before its end.
            biased;
            () = tokio::time::sleep_until(end.into()) => break,
            _ = watchdog.tick() => {
                for (share, s) in running.iter_mut().enumerate() {
                    if s.early.is_none() && s.outcome.is_finished() {
                        // An error returns at once, dropping the other shares, which stops them.
                        s.early = Some(s.finish(share).await?);
                        tracing::warn!(share, "a share handed in its figures before the run's end (its clock stepped?)");
                    }
                }
            }
            () = tokio::time::sleep_until(warm_up.into()), if at_warm_up.is_none() => {
                at_warm_up = Some((published, origin.as_ref().map_or(0, |o| o.handle.stats().counters.chunk_bytes_up)));
            }
            _ = chunk_tick.tick(), if origin.is_some() => {
                if let Some(o) = origin.as_mut() {
                    o.handle.publish(o.source.next_chunk(now_us()));
                    published += 1;
                }
            }
            _ = progress.tick(), if cfg.progress.is_some() => {
                let now: Vec<crowd::Progress> = running.iter().map(|s| s.progress.borrow().clone()).collect();
                let present: usize = now.iter().map(|p| p.present).sum();
                let chunks = now.iter().map(|p| p.chunks).max().unwrap_or(0).max(published);
                let worst = now.iter().map(|p| p.worst_continuity).fold(1.0, f64::min);
                let p99 = now.iter().map(|p| p.worst_p99_ms).fold(0.0, f64::max);
                eprintln!(
                    "[{:>5.1}s] peers {present:>4} | chunks {chunks:>5} | worst continuity {:>6.2} % | worst p99 {p99:>6.0} ms",
                    start.elapsed().as_secs_f64(), worst * 100.0
                );
            }
        }
    }
    // The shares let the last chunks land (one target latency), then collect; so does the origin.
    tokio::time::sleep(cfg.latency).await;
    let mut cpu = process_cpu_seconds() - cpu_start;
    let origin_stats = origin.as_ref().map(|o| o.handle.stats());
    let mut outcomes = Vec::with_capacity(shares);
    for (share, mut s) in running.into_iter().enumerate() {
        if let Some(outcome) = s.early.take() {
            outcomes.push(outcome);
            continue;
        }
        let outcome = tokio::time::timeout(COLLECT_GRACE, s.finish(share))
            .await
            .map_err(|_| LabError::Worker { share, message: "no figures within a minute of the end".into() })??;
        outcomes.push(outcome);
    }
    let mut lag = lag.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut peers = Vec::new();
    let mut events = Vec::new();
    let mut chunks = std::collections::BTreeMap::new();
    let (mut from_origin, mut from_origin_at_warm_up) = (0u64, Some(0u64));
    for o in outcomes {
        cpu += o.cpu_s;
        for (value, count) in o.lag {
            let _ = lag.record_n(value.max(1), count);
        }
        peers.extend(o.peers);
        events.extend(o.events);
        for c in o.chunks {
            chunks.entry(c.seq).or_insert(c);
        }
        from_origin += o.from_origin;
        from_origin_at_warm_up = from_origin_at_warm_up.zip(o.from_origin_at_warm_up).map(|(a, b)| a + b);
    }
    peers.sort_by_key(|(index, _)| *index);
    let raw: Vec<_> = peers.into_iter().map(|(_, p)| p).collect();
    events.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    let mut scenario = Scenario {
        peers: cfg.peers,
        duration_s: cfg.duration.as_secs_f64(),
        bitrate_bps: cfg.bitrate_bps,
        chunk_ms: cfg.chunk_ms,
        keyint_ms: cfg.random_access_every * u64::from(cfg.chunk_ms),
        link_delay_ms: cfg.link_delay.as_secs_f64() * 1000.0,
        jitter_ms: cfg.jitter.as_secs_f64() * 1000.0,
        loss: cfg.loss,
        churn_per_min: cfg.churn_per_min,
        flash: cfg.flash,
        flash_at_s: cfg.flash_at.as_secs_f64(),
        flash_over_s: cfg.flash_over.as_secs_f64(),
        ramp_s: cfg.ramp.as_secs_f64(),
        latency_ms: cfg.latency.as_secs_f64() * 1000.0,
        upload_mean: cfg.upload_mean,
        slow_share: cfg.upload_mean.map(|_| cfg.slow_share),
        max_upload_bps: cfg.max_upload.filter(|_| cfg.upload_mean.is_none()).map(|b| b.saturating_mul(8)),
        origin_upload: cfg.origin_upload,
        strict_upload: cfg.strict_upload,
        known_peers: crowdsurf_proto::swarm::Config::default().max_known,
        uniform_delay: true,
        seed: cfg.seed,
        feed: "synthetic",
        processes: Some(shares),
    };
    let cpu_per_peer = Some(cpu / cfg.duration.as_secs_f64() / raw.len().max(1) as f64);
    let totals = match (&origin, origin_stats) {
        (Some(o), Some(stats)) => RunTotals {
            published,
            chunk_bytes: cfg.bitrate_bps * u64::from(cfg.chunk_ms) / 8000,
            origin_bytes_up: stats.counters.chunk_bytes_up,
            at_warm_up,
            origin: stats.node.clone(),
            origin_upload_bps: o.upload_bps,
            cpu_per_peer,
            wall_s: start.elapsed().as_secs_f64(),
        },
        _ => {
            // Fed by a ticket: the stream as the relays saw it.
            let warm_up_us = start_us + (crate::report::WARM_UP_S * 1e6) as u64;
            let seen: Vec<&crowd::ChunkSeen> = chunks.values().collect();
            let stream = StreamSeen::of(&seen, warm_up_us).ok_or(LabError::NothingDelivered)?;
            scenario.feed = "ticket";
            scenario.bitrate_bps = stream.bitrate_bps;
            scenario.chunk_ms = stream.chunk_ms;
            scenario.keyint_ms = stream.keyint_ms;
            scenario.origin_upload = None;
            RunTotals {
                published: stream.published,
                chunk_bytes: stream.chunk_bytes,
                origin_bytes_up: from_origin,
                at_warm_up: from_origin_at_warm_up
                    .filter(|_| cfg.duration.as_secs_f64() > crate::report::WARM_UP_S)
                    .map(|b| (stream.published_before_warm_up, b)),
                origin: ticket.bootstrap.first().map(|n| n.id.fmt_short()).unwrap_or_default(),
                origin_upload_bps: None,
                cpu_per_peer,
                wall_s: start.elapsed().as_secs_f64(),
            }
        }
    };
    let mut report = Report::build("lab", scenario, &totals, &raw, events);
    report.scheduler_lag = Some(LatencySummary::of(&lag));
    if let Some(o) = &origin {
        o.handle.shutdown();
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), async { while tasks.join_next().await.is_some() {} }).await;
    tasks.shutdown().await;
    Ok(report)
}

/// How often the scheduler-lag probe wakes.
const LAG_PROBE: Duration = Duration::from_millis(10);

/// Records, until aborted, how much later than asked a [`LAG_PROBE`] sleep ends (µs): the time a
/// ready task waits for one of the runtime's workers, plus the timer's millisecond granularity.
async fn sample_scheduler_lag(into: Arc<std::sync::Mutex<hdrhistogram::Histogram<u64>>>) {
    loop {
        let asked = Instant::now();
        tokio::time::sleep(LAG_PROBE).await;
        let late = asked.elapsed().saturating_sub(LAG_PROBE).as_micros() as u64;
        into.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(late.max(1));
    }
}

/// CPU seconds (user + system) used by this process so far; 0 where /proc is not available.
fn process_cpu_seconds() -> f64 {
    // Fields 14 and 15 of /proc/self/stat are utime and stime in clock ticks (100 per second on Linux).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let Some(rest) = stat.rsplit(')').next() else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, capture_us: u64, random_access: bool) -> crowd::ChunkSeen {
        crowd::ChunkSeen { seq, bytes: 31_250, duration_us: 250_000, capture_us, random_access }
    }

    /// A 1 Mbit/s stream in 250 ms chunks with a key chunk every fourth: what the relays saw, with
    /// chunk 7 and key chunk 12 missing.
    #[test]
    fn a_ticket_stream_is_measured_across_the_chunks_nobody_got() {
        let seen: Vec<crowd::ChunkSeen> = (0..20u64)
            .filter(|&i| i != 7 && i != 12)
            .map(|i| chunk(100 + i, 1_000_000 + i * 250_000, i % 4 == 0))
            .collect();
        let refs: Vec<&crowd::ChunkSeen> = seen.iter().collect();
        // The warm-up ends between the captures of chunks 9 and 10.
        let stream = StreamSeen::of(&refs, 1_000_000 + 9 * 250_000 + 1).expect("chunks were seen");
        assert_eq!(
            stream,
            StreamSeen {
                bitrate_bps: 1_000_000,
                chunk_ms: 250,
                keyint_ms: 1000,
                published: 20,
                published_before_warm_up: 10,
                chunk_bytes: 31_250,
            }
        );
        assert_eq!(StreamSeen::of(&[], 0), None);
        // The broadcaster restarted after chunk 19, numbering from its clock: 5 more chunks.
        let mut restarted = seen.clone();
        restarted.extend((0..5u64).map(|i| chunk(1_000_000 + i, 6_000_000 + i * 250_000, i == 0)));
        let refs: Vec<&crowd::ChunkSeen> = restarted.iter().collect();
        let stream = StreamSeen::of(&refs, 1_000_000 + 9 * 250_000 + 1).expect("chunks were seen");
        assert_eq!((stream.published, stream.published_before_warm_up, stream.keyint_ms), (25, 10, 1000));
        // 20 ms chunks with a key chunk every 100 (2 s), restarted after chunk 249, before the
        // warm-up ends (capture time 10 s, at chunk 9 of the restarted run).
        let mut long: Vec<crowd::ChunkSeen> = (0..250u64).map(|i| chunk(100 + i, i * 20_000, i % 100 == 0)).collect();
        long.extend((0..250u64).map(|i| chunk(9_000_000 + i, 5_000_000 + i * 20_000, i % 100 == 0)));
        for c in &mut long {
            c.duration_us = 20_000;
        }
        let refs: Vec<&crowd::ChunkSeen> = long.iter().collect();
        let stream = StreamSeen::of(&refs, 5_000_000 + 9 * 20_000 + 1).expect("chunks were seen");
        assert_eq!((stream.chunk_ms, stream.keyint_ms), (20, 2000));
        assert_eq!((stream.published, stream.published_before_warm_up), (500, 260));
    }
}
