//! The simulator front end: a scenario in the lab's terms, run through the proto crate's
//! discrete-event simulator (the same swarm state machine, in virtual time), summarised in the same
//! [`Report`] as the lab.
//!
//! Geography: peers sit uniformly in a unit square with the origin in the middle; the one-way delay is
//! a fixed part plus a part proportional to distance, scaled so the mean over peer pairs is
//! `delay_ms` — or, with `uniform_delay`, every pair is exactly `delay_ms` apart (plus jitter), as in
//! the lab where every emulated link has the same delay. Upload: a share `slow_share` of peers upload between 0.5x and 0.9x the bitrate, the rest
//! uniformly around the level that makes the overall mean `upload_mean` times the bitrate.

use std::time::{Duration, Instant};

use crowdsurf_proto::swarm::sim::{NodeSpec, Progress, Sim, SimConfig};

use crate::report::{Event, EventKind, PeerRaw, Report, RunTotals, Scenario};

/// A simulated scenario.
#[derive(Debug, Clone)]
pub struct SimScenario {
    /// Peers at the start.
    pub peers: usize,
    /// Stream duration.
    pub duration: Duration,
    /// Bitrate, bits per second.
    pub bitrate_bps: u64,
    /// Chunk duration, ms.
    pub chunk_ms: u32,
    /// Random-access chunk every this many chunks.
    pub random_access_every: u64,
    /// Target latency.
    pub latency: Duration,
    /// Mean one-way delay between peers, ms.
    pub delay_ms: f64,
    /// Every pair of nodes exactly `delay_ms` apart (the lab's links) instead of the geography.
    pub uniform_delay: bool,
    /// The origin's upload as a multiple of the bitrate.
    pub origin_upload: f64,
    /// Jitter bound, ms.
    pub jitter_ms: f64,
    /// Mean upload as a multiple of the bitrate.
    pub upload_mean: f64,
    /// Share of peers with upload below the bitrate.
    pub slow_share: f64,
    /// Share of peers replaced per minute.
    pub churn_per_min: f64,
    /// Flash crowd: peers joining over `flash_over` from `flash_at`.
    pub flash: usize,
    /// When the flash crowd starts.
    pub flash_at: Duration,
    /// Over how long it joins.
    pub flash_over: Duration,
    /// How long peers take to join at the start (they arrive spread over this).
    pub ramp: Duration,
    /// The origin pays back what it sends beyond twice the stream (the swarm's `origin_pay_back`).
    pub strict_upload: bool,
    /// Most peers each node remembers ([`crowdsurf_proto::swarm::Config::max_known`]): the largest
    /// share of a simulated node's memory.
    pub known_peers: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for SimScenario {
    fn default() -> Self {
        SimScenario {
            peers: 100,
            duration: Duration::from_secs(60),
            bitrate_bps: 2_500_000,
            chunk_ms: 250,
            random_access_every: 4,
            latency: Duration::from_secs(1),
            delay_ms: 30.0,
            uniform_delay: false,
            origin_upload: 8.0,
            jitter_ms: 2.0,
            upload_mean: 3.0,
            slow_share: 0.2,
            churn_per_min: 0.0,
            flash: 0,
            flash_at: Duration::from_secs(10),
            flash_over: Duration::from_secs(2),
            ramp: Duration::from_secs(2),
            strict_upload: false,
            known_peers: crowdsurf_proto::swarm::Config::default().max_known,
            seed: 1,
        }
    }
}

/// Mean distance between two uniform points in the unit square.
const MEAN_DISTANCE: f64 = 0.5214;

/// One peer's upload as a multiple of the bitrate, for a mix with mean `upload_mean` in which a share
/// `slow_share` of the peers upload between 0.5x and 0.9x; the others are uniform on [0.6, 1.4] × the
/// level that makes the overall mean right (at least 1x). The lab draws its upload caps with this too.
pub fn upload_factor(rng: &mut fastrand::Rng, upload_mean: f64, slow_share: f64) -> f64 {
    let fast_mean =
        if slow_share < 1.0 { ((upload_mean - slow_share * 0.7) / (1.0 - slow_share)).max(1.0) } else { 0.7 };
    if rng.f64() < slow_share { 0.5 + 0.4 * rng.f64() } else { fast_mean * (0.6 + 0.8 * rng.f64()) }
}

/// Runs the scenario and reports.
pub fn run(sc: &SimScenario) -> Report {
    run_with_progress(sc, |_| {})
}

/// Runs the scenario and reports, calling `on_progress` after every 100 ms of virtual time.
pub fn run_with_progress(sc: &SimScenario, mut on_progress: impl FnMut(&Progress)) -> Report {
    let mut rng = fastrand::Rng::with_seed(sc.seed);
    let bitrate = sc.bitrate_bps as f64;
    let spec = |join_at: u64, rng: &mut fastrand::Rng| {
        let factor = upload_factor(rng, sc.upload_mean, sc.slow_share);
        NodeSpec {
            upload_bps: (bitrate * factor) as u64,
            pos: (rng.f64(), rng.f64()),
            join_at,
            leave_at: None,
            adversary: None,
        }
    };
    let ramp = sc.ramp.as_micros() as u64;
    let mut nodes: Vec<NodeSpec> = (0..sc.peers)
        .map(|i| {
            let at = 100_000 + ramp * i as u64 / sc.peers.max(1) as u64;
            spec(at, &mut rng)
        })
        .collect();
    let mut events = Vec::new();
    let duration = sc.duration.as_micros() as u64;
    // Churn: every so often a present peer leaves without a goodbye and a new one joins.
    if sc.churn_per_min > 0.0 && sc.peers > 0 {
        let per_us = sc.churn_per_min * sc.peers as f64 / 60e6;
        let mut t = ramp + 2_000_000;
        while t < duration {
            t += (1.0 / per_us) as u64;
            if t >= duration {
                break;
            }
            let present: Vec<usize> =
                (0..nodes.len()).filter(|&i| nodes[i].join_at < t && nodes[i].leave_at.is_none()).collect();
            if let Some(&victim) = present.get(rng.usize(..present.len().max(1))) {
                nodes[victim].leave_at = Some(t);
                events.push(Event { t_s: t as f64 / 1e6, kind: EventKind::Leave });
            }
            nodes.push(spec(t, &mut rng));
            events.push(Event { t_s: t as f64 / 1e6, kind: EventKind::Join });
        }
    }
    if sc.flash > 0 {
        let at = sc.flash_at.as_micros() as u64;
        let over = sc.flash_over.as_micros() as u64;
        events.push(Event { t_s: at as f64 / 1e6, kind: EventKind::Flash });
        for i in 0..sc.flash {
            nodes.push(spec(at + over * i as u64 / sc.flash as u64, &mut rng));
        }
    }
    let (base_us, distance_delay_us) = if sc.uniform_delay {
        ((sc.delay_ms * 1000.0) as u64, 0)
    } else {
        let base_us = (sc.delay_ms * 1000.0 / 3.0) as u64;
        (base_us, ((sc.delay_ms * 1000.0 - base_us as f64) / MEAN_DISTANCE) as u64)
    };
    let mut swarm =
        crowdsurf_proto::swarm::Config { target_latency_us: sc.latency.as_micros() as u64, ..Default::default() };
    swarm.window = (10_000 / sc.chunk_ms.max(1)).max(8) as usize;
    swarm.max_known = sc.known_peers;
    swarm.origin_pay_back = sc.strict_upload;
    let cfg = SimConfig {
        seed: sc.seed,
        duration_us: duration,
        chunk_us: sc.chunk_ms * 1000,
        random_access_every: sc.random_access_every,
        bitrate_bps: sc.bitrate_bps,
        base_delay_us: base_us,
        distance_delay_us,
        jitter_us: (sc.jitter_ms * 1000.0) as u64,
        origin_upload_bps: (sc.bitrate_bps as f64 * sc.origin_upload) as u64,
        swarm,
        nodes: nodes.clone(),
        extra_bootstrap: 0,
        ..Default::default()
    };
    let chunk_bytes = cfg.bitrate_bps * u64::from(cfg.chunk_us) / 8 / 1_000_000;
    let origin_upload = cfg.origin_upload_bps;
    let wall = Instant::now();
    let warm_up_us = (crate::report::WARM_UP_S * 1e6) as u64;
    let mut at_warm_up = None;
    let result = Sim::new(cfg).run_with_progress(100_000, |p| {
        if at_warm_up.is_none() && p.elapsed_us >= warm_up_us && warm_up_us < duration {
            at_warm_up = Some((p.published, p.origin_bytes_up));
        }
        on_progress(p);
    });
    let start = result.start_us;
    let raw: Vec<PeerRaw> = result
        .nodes
        .iter()
        .map(|r| {
            let spec = &nodes[r.index];
            PeerRaw {
                node: r.id.clone(),
                joined_at_s: r.joined_at as f64 / 1e6,
                left_at_s: (!r.present_at_end).then(|| spec.leave_at.unwrap_or(duration) as f64 / 1e6),
                startup_s: r.first_delivery_at.map(|t| (t.saturating_sub(start) as f64 - r.joined_at as f64) / 1e6),
                arrivals: r.latencies_us.iter().map(|&(t, l)| (t.saturating_sub(start) as f64 / 1e6, l)).collect(),
                delivered: r.delivered,
                skipped: r.skipped,
                push: r.counters.push,
                pull: r.counters.pull,
                duplicates: r.counters.duplicates,
                chunk_bytes_up: r.chunk_bytes_up,
                control_bytes_up: r.counters.control_bytes_up,
                parent: r.parent.as_ref().map(|p| p.0.clone()),
                upload_bps: Some(spec.upload_bps),
                parent_delay_us: r.parent.as_ref().map_or(0, |p| p.1),
                adversary: r.adversary,
            }
        })
        .collect();
    let scenario = Scenario {
        peers: sc.peers,
        duration_s: sc.duration.as_secs_f64(),
        bitrate_bps: sc.bitrate_bps,
        chunk_ms: sc.chunk_ms,
        keyint_ms: sc.random_access_every * u64::from(sc.chunk_ms),
        link_delay_ms: sc.delay_ms,
        jitter_ms: sc.jitter_ms,
        loss: 0.0,
        churn_per_min: sc.churn_per_min,
        flash: sc.flash,
        flash_at_s: sc.flash_at.as_secs_f64(),
        flash_over_s: sc.flash_over.as_secs_f64(),
        ramp_s: sc.ramp.as_secs_f64(),
        latency_ms: sc.latency.as_secs_f64() * 1000.0,
        upload_mean: Some(sc.upload_mean),
        slow_share: Some(sc.slow_share),
        max_upload_bps: None,
        origin_upload: Some(sc.origin_upload),
        strict_upload: sc.strict_upload,
        known_peers: sc.known_peers,
        uniform_delay: sc.uniform_delay,
        seed: sc.seed,
        feed: "synthetic",
        processes: None,
    };
    let totals = RunTotals {
        published: result.published,
        chunk_bytes,
        origin_bytes_up: result.origin_bytes_up,
        at_warm_up,
        origin: result.origin_id.clone(),
        origin_upload_bps: Some(origin_upload),
        cpu_per_peer: None,
        wall_s: wall.elapsed().as_secs_f64(),
    };
    Report::build("sim", scenario, &totals, &raw, events)
}
