//! The relays' side of a lab run: the joins of the initial ramp, churn and flash crowds, for one
//! share of the peers.
//!
//! Every share runs the whole schedule and acts only on its own part of it: join number `j` (counted
//! from 1 over the run, initial peers first) belongs to share `(j - 1) % shares`, and so does churn
//! departure number `j`. Each share draws every peer's upload level, its own or not (keys come from
//! the join number), so a run
//! split over several processes gives each peer the key and uplink it has in one process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crowdsurf_proto::{NodeKey, Ticket};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{LabConfig, LabError, fastrand_like, key};
use crate::node::{Node, NodeConfig, NodeHandle};
use crate::report::{Event, EventKind, PeerRaw};
use crate::stats::NodeStats;

/// What one share of the relays runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    /// The run (its `feed` is not carried: the relays only need `ticket`).
    pub cfg: LabConfig,
    /// Whom the relays bootstrap from, as a ticket's text.
    pub ticket: String,
    /// The run's start, µs since the Unix epoch (every process on the host shares the clock).
    pub start_us: u64,
    /// Which share this is, of `shares`.
    pub share: usize,
    /// How many shares the relays are split into.
    pub shares: usize,
    /// Each relay's window in chunks (None: the relay default).
    pub window: Option<usize>,
    /// Record every delivered chunk's header: the stream is not ours, so the report measures it.
    pub measure_stream: bool,
}

/// A share's figures so far, for the progress line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Progress {
    /// Relays present.
    pub present: usize,
    /// Chunks delivered at one relay at least.
    pub chunks: u64,
    /// Lowest continuity among them.
    pub worst_continuity: f64,
    /// Highest p99 arrival latency among them, ms.
    pub worst_p99_ms: f64,
}

impl Default for Progress {
    fn default() -> Self {
        // Nothing heard yet is nothing missed.
        Progress { present: 0, chunks: 0, worst_continuity: 1.0, worst_p99_ms: 0.0 }
    }
}

/// A chunk some relay delivered, as its header describes it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct ChunkSeen {
    pub seq: u64,
    pub bytes: u64,
    pub duration_us: u32,
    pub capture_us: u64,
    pub random_access: bool,
}

/// What a share hands back at the end.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Outcome {
    /// (join number, figures) of every relay it ran.
    pub peers: Vec<(u64, PeerRaw)>,
    /// Its joins and departures.
    pub events: Vec<Event>,
    /// Every chunk its relays delivered.
    pub chunks: Vec<ChunkSeen>,
    /// Chunk bytes its relays received straight from an origin.
    pub from_origin: u64,
    /// The same by the warm-up (None if the run ended first).
    pub from_origin_at_warm_up: Option<u64>,
    /// CPU seconds of the worker process (0 when run inside the lab's own process).
    pub cpu_s: f64,
    /// Scheduler lag of the worker process as (µs, count) pairs (empty inside the lab's process).
    pub lag: Vec<(u64, u64)>,
}

struct Peer {
    index: u64,
    handle: NodeHandle,
    upload_bps: Option<u64>,
    joined: Instant,
    left: Option<Instant>,
    /// Set by the peer's delivery reader the moment its first chunk is handed on.
    first_delivery: Arc<OnceLock<Instant>>,
    abort: tokio::task::AbortHandle,
    final_stats: Option<NodeStats>,
}

impl Peer {
    fn stats(&self) -> NodeStats {
        self.final_stats.clone().unwrap_or_else(|| self.handle.stats())
    }
}

/// Runs this share of the relays from `start` to the end of the run and one playback latency more.
pub(crate) async fn run(plan: &Plan, start: Instant, progress: &watch::Sender<Progress>) -> Result<Outcome, LabError> {
    let cfg = &plan.cfg;
    let ticket: Ticket = plan.ticket.parse().map_err(|e| LabError::Config(format!("the relays' ticket: {e}")))?;
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let latency_us = cfg.latency.as_micros() as u64;
    let start_us = plan.start_us;
    let mut tasks = tokio::task::JoinSet::new();
    let seen: Arc<Mutex<BTreeMap<u64, ChunkSeen>>> = Arc::default();
    let mut events: Vec<Event> = Vec::new();
    let mut peers: Vec<Peer> = Vec::new();
    // Join numbers so far, read by the churn below while `join` holds it.
    let next_key = std::sync::atomic::AtomicU64::new(1);
    let mut upload_rng = fastrand::Rng::with_seed(cfg.seed ^ 0x0b10ad);
    let shares = plan.shares.max(1) as u64;
    let ours = |j: u64| (j - 1) % shares == plan.share as u64;
    let mut join = |tasks: &mut tokio::task::JoinSet<()>, peers: &mut Vec<Peer>| -> Result<(), LabError> {
        let index = next_key.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Drawn for every peer, ours or not, so each gets the same uplink however the run is split.
        let upload_bps = cfg.upload_mean.map(|mean| {
            let factor = crate::simulate::upload_factor(&mut upload_rng, mean, cfg.slow_share);
            (factor * cfg.bitrate_bps as f64) as u64
        });
        if !ours(index) {
            return Ok(());
        }
        let mut c = NodeConfig::new(NodeKey::from_secret_bytes(key(cfg.seed, index)), ticket.stream, loopback);
        c.swarm.seed = cfg.seed ^ index;
        c.swarm.target_latency_us = latency_us;
        if let Some(window) = plan.window {
            c.swarm.window = window;
        }
        c.endpoint.max_upload_bytes_per_sec = cfg.max_upload;
        if let Some(bps) = upload_bps {
            c.endpoint.max_upload_bytes_per_sec = Some((bps / 8).max(1));
            c.swarm.push_slots = c.swarm.push_slots_for_upload(bps, cfg.bitrate_bps);
        }
        c.endpoint.link = cfg.link(upload_bps, cfg.seed ^ (index + 1).wrapping_mul(0x9E37_79B9));
        let upload_bps = upload_bps.or(cfg.max_upload.map(|b| b * 8));
        c.bootstrap = ticket.bootstrap.clone();
        let (mut node, handle) = Node::bind(c)?;
        let mut rx = node.take_deliveries().unwrap_or_else(|| unreachable!("taken once, right here"));
        let joined = Instant::now();
        let abort = tasks.spawn(async move {
            let _ = node.run().await;
        });
        // Startup is timed by a reader of its own, woken by the delivery itself: the loop below
        // only wakes every 200 ms, which would put up to 200 ms on a startup of under a second.
        let first_delivery = Arc::new(OnceLock::new());
        let first = first_delivery.clone();
        let seen = plan.measure_stream.then(|| seen.clone());
        tasks.spawn(async move {
            while let Some(d) = rx.recv().await {
                let crate::Delivery::Chunk(chunk) = d else { continue };
                if first.get().is_none() {
                    let _ = first.set(Instant::now());
                }
                let Some(seen) = &seen else { continue };
                let h = chunk.header();
                seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(h.seq).or_insert(ChunkSeen {
                    seq: h.seq,
                    bytes: u64::from(h.payload_len),
                    duration_us: h.duration_us,
                    capture_us: h.capture_us,
                    random_access: h.is_random_access(),
                });
            }
        });
        peers.push(Peer { index, handle, upload_bps, joined, left: None, first_delivery, abort, final_stats: None });
        Ok(())
    };
    tokio::time::sleep_until(start.into()).await;
    // Peers present at the start joined so far; with a ramp the rest join inside the loop below.
    let mut initial = 0usize;
    if cfg.ramp.is_zero() {
        while initial < cfg.peers {
            join(&mut tasks, &mut peers)?;
            initial += 1;
        }
    }
    let initial_due = |k: usize| start + cfg.ramp.mul_f64(k as f64 / cfg.peers.max(1) as f64);
    let mut update = tokio::time::interval(cfg.progress.unwrap_or(Duration::from_secs(3600)));
    let mut churn_tick = tokio::time::interval(Duration::from_millis(200));
    // Paused during the ramp; no burst of missed ticks after it.
    churn_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let churn_per_tick = cfg.churn_per_min * cfg.peers as f64 * 0.2 / 60.0;
    let mut churn_debt = 0.0;
    let mut departures = 0u64;
    let mut flash_joined = 0usize;
    let mut rng = fastrand_like(cfg.seed ^ 0xc0ffee);
    let end = start + cfg.duration;
    let warm_up = start + Duration::from_secs_f64(crate::report::WARM_UP_S);
    let mut from_origin_at_warm_up = None;
    let from_origin = |peers: &[Peer]| peers.iter().map(|p| p.stats().counters.chunk_bytes_from_origin).sum::<u64>();
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(end.into()) => break,
            () = tokio::time::sleep_until(warm_up.into()), if from_origin_at_warm_up.is_none() => {
                from_origin_at_warm_up = Some(from_origin(&peers));
            }
            () = tokio::time::sleep_until(initial_due(initial).into()), if initial < cfg.peers => {
                while initial < cfg.peers && Instant::now() >= initial_due(initial) {
                    join(&mut tasks, &mut peers)?;
                    initial += 1;
                }
            }
            _ = churn_tick.tick(), if initial >= cfg.peers => {
                churn_debt += churn_per_tick;
                while churn_debt >= 1.0 {
                    churn_debt -= 1.0;
                    departures += 1;
                    if ours(departures) {
                        let present: Vec<usize> = (0..peers.len()).filter(|&i| peers[i].left.is_none()).collect();
                        if let Some(&victim) = present.get((rng() % present.len().max(1) as u64) as usize) {
                            let p = &mut peers[victim];
                            p.final_stats = Some(p.handle.stats());
                            p.abort.abort();
                            p.left = Some(Instant::now());
                            events.push(Event { t_s: start.elapsed().as_secs_f64(), kind: EventKind::Leave });
                        }
                    }
                    if ours(next_key.load(std::sync::atomic::Ordering::Relaxed)) {
                        events.push(Event { t_s: start.elapsed().as_secs_f64(), kind: EventKind::Join });
                    }
                    join(&mut tasks, &mut peers)?;
                }
                let elapsed = start.elapsed();
                if cfg.flash > flash_joined && elapsed >= cfg.flash_at {
                    let share = ((elapsed - cfg.flash_at).as_secs_f64() / cfg.flash_over.as_secs_f64().max(0.001)).min(1.0);
                    let due = (share * cfg.flash as f64).ceil() as usize;
                    if flash_joined == 0 && plan.share == 0 {
                        events.push(Event { t_s: elapsed.as_secs_f64(), kind: EventKind::Flash });
                    }
                    while flash_joined < due {
                        join(&mut tasks, &mut peers)?;
                        flash_joined += 1;
                    }
                }
            }
            _ = update.tick(), if cfg.progress.is_some() => {
                let s: Vec<NodeStats> = peers.iter().filter(|p| p.left.is_none()).map(|p| p.handle.stats()).collect();
                let chunks = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len() as u64;
                progress.send_replace(Progress {
                    present: s.len(),
                    chunks,
                    worst_continuity: s.iter().map(|x| x.continuity).fold(1.0, f64::min),
                    worst_p99_ms: s.iter().map(|x| x.arrival_latency.p99_ms).fold(0.0, f64::max),
                });
            }
        }
    }
    // Let the last chunks land (one target latency), then collect.
    tokio::time::sleep(cfg.latency).await;
    let link_delay_us = cfg.link_delay.as_micros() as u64;
    let raw = peers
        .iter()
        .map(|p| {
            let stats = p.stats();
            let c = &stats.counters;
            let raw = PeerRaw {
                node: stats.node.clone(),
                joined_at_s: (p.joined - start).as_secs_f64(),
                left_at_s: p.left.map(|l| (l - start).as_secs_f64()),
                startup_s: p.first_delivery.get().map(|f| (*f - p.joined).as_secs_f64()),
                arrivals: p
                    .handle
                    .stats_cell()
                    .arrival_samples()
                    .into_iter()
                    .map(|(t, lat)| (t.saturating_sub(start_us) as f64 / 1e6, lat))
                    .collect(),
                delivered: c.delivered,
                skipped: c.skipped,
                push: c.push,
                pull: c.pull,
                duplicates: c.duplicates,
                chunk_bytes_up: c.chunk_bytes_up,
                control_bytes_up: c.control_bytes_up,
                parent: stats.parent_ids.first().cloned().flatten(),
                upload_bps: p.upload_bps,
                parent_delay_us: link_delay_us,
                adversary: false,
            };
            (p.index, raw)
        })
        .collect();
    let outcome = Outcome {
        peers: raw,
        events,
        chunks: seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values().copied().collect(),
        from_origin: from_origin(&peers),
        from_origin_at_warm_up,
        cpu_s: 0.0,
        lag: Vec::new(),
    };
    for p in &peers {
        p.handle.shutdown();
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), async { while tasks.join_next().await.is_some() {} }).await;
    tasks.shutdown().await;
    Ok(outcome)
}
