//! The swarm lab: N real nodes over real QUIC on 127.0.0.1 in this process, fed by a synthetic origin,
//! measured, and summarised in a JSON report.
//!
//! All nodes share one clock, so latency is exact: arrival time − capture time. Scenarios: steady
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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crowdsurf_proto::wire::Role;
use crowdsurf_proto::{NodeKey, StreamKey};

use crate::net::LinkModel;
use crate::node::{Node, NodeConfig, NodeHandle};
use crate::report::{Event, PeerRaw, Report, RunTotals, Scenario};
use crate::source::SyntheticSource;
use crate::stats::{LatencySummary, NodeStats};

/// What to run.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Relays at the start.
    pub peers: usize,
    /// The relays present at the start join spread evenly over this long, while the stream runs (the
    /// simulator's `ramp`, whose default is the same). Zero: all at once, before the first chunk, so
    /// every QUIC handshake and slow start of the swarm falls on its first second.
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
            churn_per_min: 0.0,
            flash: 0,
            flash_at: Duration::from_secs(5),
            flash_over: Duration::from_secs(2),
            seed: 1,
            progress: Some(Duration::from_secs(2)),
        }
    }
}

struct Peer {
    handle: NodeHandle,
    upload_bps: Option<u64>,
    joined: Instant,
    left: Option<Instant>,
    /// Set by the peer's delivery reader the moment its first chunk is handed on.
    first_delivery: Arc<OnceLock<Instant>>,
    abort: tokio::task::AbortHandle,
    final_stats: Option<NodeStats>,
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

/// Runs the lab to the end and returns its report.
pub async fn run(cfg: LabConfig) -> Result<Report, crate::NodeError> {
    let loopback: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let stream = StreamKey::from_secret_bytes(key(cfg.seed, u64::MAX));
    let stream_id = stream.id();
    let latency_us = cfg.latency.as_micros() as u64;
    // Ten seconds of window whatever the chunk length, as the simulator keeps.
    let window = (10_000 / cfg.chunk_ms.max(1)).max(8) as usize;
    let mut tasks = tokio::task::JoinSet::new();
    let mut origin_cfg = NodeConfig::new(NodeKey::from_secret_bytes(key(cfg.seed, 0)), stream.id(), loopback);
    origin_cfg.swarm.role = Role::Origin;
    origin_cfg.swarm.target_latency_us = latency_us;
    origin_cfg.swarm.window = window;
    origin_cfg.swarm.max_neighbours = 64;
    let origin_upload_bps = cfg.origin_upload.map(|m| (m * cfg.bitrate_bps as f64) as u64);
    origin_cfg.endpoint.link = cfg.link(origin_upload_bps, cfg.seed);
    if let Some(bps) = origin_upload_bps {
        origin_cfg.endpoint.max_upload_bytes_per_sec = Some((bps / 8).max(1));
    }
    let (origin_node, origin) = Node::bind(origin_cfg)?;
    let boot = origin.node_addr();
    tasks.spawn(async move {
        let _ = origin_node.run().await;
    });
    let lag = Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .unwrap_or_else(|_| unreachable!("static bounds are valid")),
    ));
    tasks.spawn(sample_scheduler_lag(lag.clone()));
    let cpu_start = process_cpu_seconds();
    let start = Instant::now();
    let start_us = now_us();
    let mut events: Vec<Event> = Vec::new();
    let mut peers: Vec<Peer> = Vec::new();
    let mut next_key = 1u64;
    let mut upload_rng = fastrand::Rng::with_seed(cfg.seed ^ 0x0b10ad);
    let mut join = |tasks: &mut tokio::task::JoinSet<()>, peers: &mut Vec<Peer>| -> Result<(), crate::NodeError> {
        let mut c = NodeConfig::new(NodeKey::from_secret_bytes(key(cfg.seed, next_key)), stream_id, loopback);
        c.swarm.seed = cfg.seed ^ next_key;
        next_key += 1;
        c.swarm.target_latency_us = latency_us;
        c.swarm.window = window;
        c.endpoint.max_upload_bytes_per_sec = cfg.max_upload;
        let upload_bps = cfg.upload_mean.map(|mean| {
            let factor = crate::simulate::upload_factor(&mut upload_rng, mean, cfg.slow_share);
            (factor * cfg.bitrate_bps as f64) as u64
        });
        if let Some(bps) = upload_bps {
            c.endpoint.max_upload_bytes_per_sec = Some((bps / 8).max(1));
            c.swarm.push_slots = c.swarm.push_slots_for_upload(bps, cfg.bitrate_bps);
        }
        c.endpoint.link = cfg.link(upload_bps, cfg.seed ^ next_key.wrapping_mul(0x9E37_79B9));
        let upload_bps = upload_bps.or(cfg.max_upload.map(|b| b * 8));
        c.bootstrap = vec![boot.clone()];
        let (mut node, handle) = Node::bind(c)?;
        let mut rx = node.take_deliveries().unwrap_or_else(|| unreachable!("taken once, right here"));
        let joined = Instant::now();
        let abort = tasks.spawn(async move {
            let _ = node.run().await;
        });
        // Startup is timed by a reader of its own, woken by the delivery itself: the main loop below
        // only wakes every 200 to 250 ms, which put up to 200 ms on a startup of under a second.
        let first_delivery = Arc::new(OnceLock::new());
        let first = first_delivery.clone();
        tasks.spawn(async move {
            while let Some(d) = rx.recv().await {
                if matches!(d, crate::Delivery::Chunk(_)) && first.get().is_none() {
                    let _ = first.set(Instant::now());
                }
            }
        });
        peers.push(Peer { handle, upload_bps, joined, left: None, first_delivery, abort, final_stats: None });
        Ok(())
    };
    // Peers present at the start joined so far; with a ramp the rest join inside the loop below.
    let mut initial = 0usize;
    if cfg.ramp.is_zero() {
        while initial < cfg.peers {
            join(&mut tasks, &mut peers)?;
            initial += 1;
        }
    }
    let initial_due = |k: usize| start + cfg.ramp.mul_f64(k as f64 / cfg.peers.max(1) as f64);
    let first_seq = now_us() / 1000;
    let mut source = SyntheticSource::new(stream, first_seq, cfg.chunk_ms, cfg.bitrate_bps, cfg.random_access_every);
    let mut chunk_tick = tokio::time::interval(Duration::from_millis(u64::from(cfg.chunk_ms)));
    let mut progress = tokio::time::interval(cfg.progress.unwrap_or(Duration::from_secs(3600)));
    progress.tick().await;
    let mut churn_tick = tokio::time::interval(Duration::from_millis(200));
    // Paused during the ramp; no burst of missed ticks after it.
    churn_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let churn_per_tick = cfg.churn_per_min * cfg.peers as f64 * 0.2 / 60.0;
    let mut churn_debt = 0.0;
    let mut flash_joined = 0usize;
    let mut rng = fastrand_like(cfg.seed ^ 0xc0ffee);
    let end = start + cfg.duration;
    let mut published = 0u64;
    let warm_up = start + Duration::from_secs_f64(crate::report::WARM_UP_S);
    let mut at_warm_up = None;
    while Instant::now() < end {
        tokio::select! {
            () = tokio::time::sleep_until(warm_up.into()), if at_warm_up.is_none() => {
                at_warm_up = Some((published, origin.stats().counters.chunk_bytes_up));
            }
            _ = chunk_tick.tick() => {
                origin.publish(source.next_chunk(now_us()));
                published += 1;
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
                    let present: Vec<usize> = (0..peers.len()).filter(|&i| peers[i].left.is_none()).collect();
                    if let Some(&victim) = present.get((rng() % present.len().max(1) as u64) as usize) {
                        let p = &mut peers[victim];
                        p.final_stats = Some(p.handle.stats());
                        p.abort.abort();
                        p.left = Some(Instant::now());
                        events.push(Event { t_s: start.elapsed().as_secs_f64(), kind: "leave" });
                    }
                    join(&mut tasks, &mut peers)?;
                    events.push(Event { t_s: start.elapsed().as_secs_f64(), kind: "join" });
                }
                let elapsed = start.elapsed();
                if cfg.flash > flash_joined && elapsed >= cfg.flash_at {
                    let share = ((elapsed - cfg.flash_at).as_secs_f64() / cfg.flash_over.as_secs_f64().max(0.001)).min(1.0);
                    let due = (share * cfg.flash as f64).ceil() as usize;
                    if flash_joined == 0 {
                        events.push(Event { t_s: elapsed.as_secs_f64(), kind: "flash" });
                    }
                    while flash_joined < due {
                        join(&mut tasks, &mut peers)?;
                        flash_joined += 1;
                    }
                }
            }
            _ = progress.tick(), if cfg.progress.is_some() => {
                let present = peers.iter().filter(|p| p.left.is_none()).count();
                let s: Vec<NodeStats> = peers.iter().filter(|p| p.left.is_none()).map(|p| p.handle.stats()).collect();
                let worst = s.iter().map(|x| x.continuity).fold(1.0, f64::min);
                let p99 = s.iter().map(|x| x.arrival_latency.p99_ms).fold(0.0, f64::max);
                eprintln!(
                    "[{:>5.1}s] peers {present:>4} | chunks {published:>5} | worst continuity {:>6.2} % | worst p99 {p99:>6.0} ms",
                    start.elapsed().as_secs_f64(), worst * 100.0
                );
            }
        }
    }
    // Let the last chunks land (one target latency), then collect.
    tokio::time::sleep(cfg.latency).await;
    let cpu = process_cpu_seconds() - cpu_start;
    let origin_stats = origin.stats();
    let link_delay_us = cfg.link_delay.as_micros() as u64;
    let raw: Vec<PeerRaw> = peers
        .iter()
        .map(|p| {
            let stats = p.final_stats.clone().unwrap_or_else(|| p.handle.stats());
            let c = &stats.counters;
            PeerRaw {
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
            }
        })
        .collect();
    let scenario = Scenario {
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
        known_peers: crowdsurf_proto::swarm::Config::default().max_known,
        uniform_delay: true,
        seed: cfg.seed,
    };
    let totals = RunTotals {
        published,
        chunk_bytes: cfg.bitrate_bps * u64::from(cfg.chunk_ms) / 8000,
        origin_bytes_up: origin_stats.counters.chunk_bytes_up,
        at_warm_up,
        origin: origin_stats.node.clone(),
        origin_upload_bps,
        cpu_per_peer: Some(cpu / cfg.duration.as_secs_f64() / peers.len().max(1) as f64),
        wall_s: start.elapsed().as_secs_f64(),
    };
    let mut report = Report::build("lab", scenario, &totals, &raw, events);
    report.scheduler_lag = Some(LatencySummary::of(&lag.lock().unwrap_or_else(|p| p.into_inner())));
    origin.shutdown();
    for p in &peers {
        p.handle.shutdown();
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
