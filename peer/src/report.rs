//! One report format for the lab (real nodes) and the simulator (virtual time), and its SVG plots.
//!
//! Both fill a [`Report`] from per-peer raw figures ([`PeerRaw`]); everything derived (percentiles,
//! CDF, time series, tree depth, lower bounds) is computed here once, so lab and simulator figures are
//! comparable by construction.
//!
//! **Lower bound** for a peer: the store-and-forward time along its path in the push tree, hop by hop
//! (one-way link delay + chunk size / the sender's upload rate), the path being its substream-0 parent
//! chain up to the origin. Capture times are stamped when a chunk is published, so the chunk's own
//! duration is not part of either side of the ratio.

use std::collections::HashMap;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::stats::LatencySummary;

/// The scenario a report describes.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Scenario {
    /// Peers at the start.
    pub peers: usize,
    /// Stream seconds.
    pub duration_s: f64,
    /// Stream bitrate, bits per second.
    pub bitrate_bps: u64,
    /// Chunk duration, ms.
    pub chunk_ms: u32,
    /// Keyframe (random-access chunk) interval, ms: where a joiner may start.
    pub keyint_ms: u64,
    /// Mean one-way link delay, ms.
    pub link_delay_ms: f64,
    /// Jitter bound, ms.
    pub jitter_ms: f64,
    /// Packet loss share (lab only).
    pub loss: f64,
    /// Share of peers replaced per minute.
    pub churn_per_min: f64,
    /// Flash crowd size.
    pub flash: usize,
    /// When the flash crowd starts, seconds from the start.
    pub flash_at_s: f64,
    /// Over how long the flash crowd joins, seconds.
    pub flash_over_s: f64,
    /// Over how long the peers present at the start join, seconds.
    pub ramp_s: f64,
    /// Every peer's playback point behind the live edge, ms.
    pub latency_ms: f64,
    /// Upload mix: mean peer upload as a multiple of the bitrate (None: unlimited, lab only).
    pub upload_mean: Option<f64>,
    /// Upload mix: share of peers uploading below the bitrate (None where uploads are unlimited).
    pub slow_share: Option<f64>,
    /// One upload cap for every peer, bits per second (lab `--max-upload`; None: none, or the mix).
    pub max_upload_bps: Option<u64>,
    /// The origin's upload as a multiple of the bitrate (None: unlimited).
    pub origin_upload: Option<f64>,
    /// The origin paid back what it sent beyond twice the stream (`--strict-upload`, the swarm's
    /// `origin_pay_back`).
    pub strict_upload: bool,
    /// Most peers each node remembers (`max_known`).
    pub known_peers: usize,
    /// Every pair of peers exactly `link_delay_ms` apart, jitter aside (the lab always is; the
    /// simulator otherwise draws delays from its geography).
    pub uniform_delay: bool,
    /// Seed.
    pub seed: u64,
    /// Where the stream came from: "synthetic" (an origin in the lab or simulator publishing a
    /// signed random payload) or "ticket" (a live stream already running, joined by its ticket;
    /// bitrate and chunk length are then measured from its chunks).
    pub feed: &'static str,
    /// Lab only: the operating-system processes the relays ran in.
    pub processes: Option<usize>,
}

/// Something that happened during the run, marked on the time plot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Seconds from the start.
    pub t_s: f64,
    /// What happened.
    pub kind: EventKind,
}

/// What an [`Event`] was ("join", "leave" or "flash" in the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A peer joined after the start (churn).
    Join,
    /// A peer left without a goodbye (churn).
    Leave,
    /// A flash crowd began to arrive.
    Flash,
}

/// Raw figures of one peer, as the lab or the simulator collects them.
///
/// Both list the peers in the order they joined: the first [`Scenario::peers`] are the ones present
/// at the start, the rest are **joiners** (churn replacements, flash crowds), whose startup the report
/// gives separately.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerRaw {
    /// Short node id.
    pub node: String,
    /// Seconds from the start.
    pub joined_at_s: f64,
    /// Seconds from the start, if it left.
    pub left_at_s: Option<f64>,
    /// Join to first delivered chunk, seconds.
    pub startup_s: Option<f64>,
    /// (seconds from the start, arrival latency µs) of every chunk it stored.
    pub arrivals: Vec<(f64, u64)>,
    /// Chunks delivered in order.
    pub delivered: u64,
    /// Chunks skipped at their deadline.
    pub skipped: u64,
    /// Chunks stored after a push / a pull, duplicates received.
    pub push: u64,
    /// See `push`.
    pub pull: u64,
    /// See `push`.
    pub duplicates: u64,
    /// Chunk and control bytes it sent.
    pub chunk_bytes_up: u64,
    /// See `chunk_bytes_up`.
    pub control_bytes_up: u64,
    /// Its substream-0 parent (short id), for tree depth.
    pub parent: Option<String>,
    /// Its upload rate, bits per second (None: unlimited).
    pub upload_bps: Option<u64>,
    /// One-way delay to its parent, µs (lab: the configured link delay).
    pub parent_delay_us: u64,
    /// Whether it misbehaved on purpose (excluded from the honest figures).
    pub adversary: bool,
}

/// One peer in the report.
#[derive(Debug, Clone, Serialize)]
pub struct PeerEntry {
    /// Short node id.
    pub node: String,
    /// Seconds from the start.
    pub joined_at_s: f64,
    /// Seconds from the start, if it left.
    pub left_at_s: Option<f64>,
    /// Join to first delivered chunk, seconds.
    pub startup_s: Option<f64>,
    /// Arrival latency.
    pub arrival_latency: LatencySummary,
    /// Delivered / (delivered + skipped).
    pub continuity: f64,
    /// Chunks skipped.
    pub skipped: u64,
    /// Hops from the origin along substream-0 parents (None if the chain is broken).
    pub depth: Option<u32>,
    /// Store-and-forward lower bound, ms.
    pub lower_bound_ms: Option<f64>,
    /// Observed p50 / lower bound.
    pub observed_over_bound_p50: Option<f64>,
}

/// The report (JSON schema shared by `crowdsurf-peer lab` and `crowdsurf-peer sim`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// "lab" or "sim".
    pub kind: &'static str,
    /// What ran.
    pub scenario: Scenario,
    /// Peers that ever joined.
    pub peers_total: usize,
    /// Chunks published.
    pub published: u64,
    /// Arrival latency over all honest peers' first copies.
    pub arrival_latency: LatencySummary,
    /// The same over the arrivals from [`WARM_UP_S`] after the start on: the swarm once its
    /// connections are up, without the start-up of the peers present from the beginning.
    pub arrival_latency_after_warm_up: LatencySummary,
    /// Lowest continuity among honest peers present at the end.
    pub continuity_min: f64,
    /// Continuity over all honest peers present at the end (delivered / due).
    pub continuity: f64,
    /// Chunks skipped at honest peers present at the end.
    pub skipped_total: u64,
    /// Startup (join to first delivery) p50, seconds.
    pub startup_p50_s: f64,
    /// Slowest startup, seconds.
    pub startup_max_s: f64,
    /// Honest peers that joined after the start (churn, flash crowd).
    pub joiners: usize,
    /// Joiners' startup (join to first delivery) p50, seconds; 0 without joiners.
    pub joiner_startup_p50_s: f64,
    /// Joiners' startup p99, seconds.
    pub joiner_startup_p99_s: f64,
    /// The slowest joiner's startup, seconds.
    pub joiner_startup_max_s: f64,
    /// Joiners present at the end that never delivered a chunk although they joined at least
    /// [`STARTUP_GRACE_S`] before the stream ended (not counted in the startups).
    pub joiners_never_started: usize,
    /// The origin's chunk upload / stream bytes.
    pub origin_upload_ratio: f64,
    /// The same from [`WARM_UP_S`] on: chunk bytes the origin sent after it over the stream bytes
    /// published after it (its steady upload, without the start-up's repairs; None for a run
    /// shorter than the warm-up).
    pub origin_upload_ratio_after_warm_up: Option<f64>,
    /// Duplicates / chunks stored.
    pub duplicate_ratio: f64,
    /// Share of stored chunks that came by push.
    pub push_share: f64,
    /// Control bytes / chunk bytes sent.
    pub control_overhead: f64,
    /// Mean push-tree depth.
    pub depth_mean: f64,
    /// Largest push-tree depth.
    pub depth_max: u32,
    /// Observed p50 over lower bound: median over peers.
    pub bound_ratio_p50: f64,
    /// Observed p50 over lower bound: 99th percentile over peers.
    pub bound_ratio_p99: f64,
    /// Process CPU per peer, share of one core (lab only).
    pub cpu_per_peer: Option<f64>,
    /// Lab only: how late a 10 ms timer fired in the lab's runtime, sampled all through the run. All
    /// nodes share the process's cores, so when it is more than a few ms the nodes were waiting for a
    /// CPU and the lab's latency measures the machine, not the swarm (the simulator has no CPU cost).
    pub scheduler_lag: Option<LatencySummary>,
    /// Wall-clock seconds the run took (interesting for the simulator).
    pub wall_s: f64,
    /// Latency CDF points: (ms, share of chunks at or below).
    pub latency_cdf: Vec<(f64, f64)>,
    /// Per second of the run: (t, p50 ms, p99 ms, max ms) of arrivals in that second.
    pub latency_over_time: Vec<(f64, f64, f64, f64)>,
    /// Joins, leaves, flash crowds.
    pub events: Vec<Event>,
    /// Every peer.
    pub per_peer: Vec<PeerEntry>,
}

/// Global figures a report needs besides the peers.
#[derive(Debug, Clone, Default)]
pub struct RunTotals {
    /// Chunks published.
    pub published: u64,
    /// Modelled or real chunk size, bytes.
    pub chunk_bytes: u64,
    /// The origin's chunk bytes sent.
    pub origin_bytes_up: u64,
    /// Chunks published and the origin's chunk bytes sent by [`WARM_UP_S`] into the run (None if
    /// the run ended first).
    pub at_warm_up: Option<(u64, u64)>,
    /// The origin's short id.
    pub origin: String,
    /// The origin's upload, bits per second (None: unlimited).
    pub origin_upload_bps: Option<u64>,
    /// CPU per peer (lab).
    pub cpu_per_peer: Option<f64>,
    /// Wall seconds.
    pub wall_s: f64,
}

/// Seconds from the start after which arrivals count as warmed up (see
/// [`Report::arrival_latency_after_warm_up`]). In the lab the first two seconds carry every initial
/// peer's QUIC handshakes and slow start at once, which the simulator does not model.
pub const WARM_UP_S: f64 = 5.0;

/// A joiner that has not delivered a chunk this long after joining counts as never started (one that
/// joined later than this before the end is not judged).
pub const STARTUP_GRACE_S: f64 = 2.0;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!("static bounds are valid"))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Report {
    /// Builds the report from raw per-peer figures.
    pub fn build(
        kind: &'static str,
        scenario: Scenario,
        totals: &RunTotals,
        peers: &[PeerRaw],
        events: Vec<Event>,
    ) -> Report {
        let honest: Vec<&PeerRaw> = peers.iter().filter(|p| !p.adversary).collect();
        let present: Vec<&PeerRaw> = honest.iter().copied().filter(|p| p.left_at_s.is_none()).collect();
        let mut all = histogram();
        let mut warm = histogram();
        let mut per_second: HashMap<u64, Histogram<u64>> = HashMap::new();
        for p in &honest {
            for &(t, lat) in &p.arrivals {
                all.saturating_record(lat);
                if t >= WARM_UP_S {
                    warm.saturating_record(lat);
                }
                per_second.entry(t.max(0.0) as u64).or_insert_with(histogram).saturating_record(lat);
            }
        }
        let ms = |v: u64| v as f64 / 1000.0;
        let latency_cdf = (0..=100)
            .map(|i| {
                let q = f64::from(i) / 100.0;
                (ms(all.value_at_quantile(q)), q)
            })
            .collect();
        let mut seconds: Vec<u64> = per_second.keys().copied().collect();
        seconds.sort_unstable();
        let latency_over_time = seconds
            .iter()
            .map(|s| {
                let h = &per_second[s];
                (*s as f64, ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.99)), ms(h.max()))
            })
            .collect();

        // Tree depth and lower bound along substream-0 parents.
        let by_id: HashMap<&str, &PeerRaw> = peers.iter().map(|p| (p.node.as_str(), p)).collect();
        let chunk_bits = totals.chunk_bytes * 8;
        let hop_cost = |upload: Option<u64>| upload.map_or(0.0, |bps| chunk_bits as f64 * 1e6 / bps.max(1) as f64);
        let path = |p: &PeerRaw| -> Option<(u32, f64)> {
            let mut depth = 0u32;
            let mut bound_us = 0.0;
            let mut at = p;
            loop {
                let parent = at.parent.as_deref()?;
                depth += 1;
                bound_us += at.parent_delay_us as f64;
                if parent == totals.origin {
                    bound_us += hop_cost(totals.origin_upload_bps);
                    return Some((depth, bound_us));
                }
                let next = by_id.get(parent)?;
                bound_us += hop_cost(next.upload_bps);
                at = next;
                if depth > 64 {
                    return None;
                }
            }
        };
        let mut depths = Vec::new();
        let mut ratios = Vec::new();
        let per_peer: Vec<PeerEntry> = peers
            .iter()
            .map(|p| {
                let mut h = histogram();
                for &(_, lat) in &p.arrivals {
                    h.saturating_record(lat);
                }
                let summary = LatencySummary::of(&h);
                let route = if p.adversary { None } else { path(p) };
                let lower_bound_ms = route.map(|(_, b)| b / 1000.0).filter(|b| *b > 0.0);
                let ratio = lower_bound_ms.filter(|_| summary.count > 0).map(|b| summary.p50_ms / b);
                if let Some((d, _)) = route
                    && p.left_at_s.is_none()
                {
                    depths.push(d);
                }
                if let Some(r) = ratio
                    && p.left_at_s.is_none()
                {
                    ratios.push(r);
                }
                let due = p.delivered + p.skipped;
                PeerEntry {
                    node: p.node.clone(),
                    joined_at_s: p.joined_at_s,
                    left_at_s: p.left_at_s,
                    startup_s: p.startup_s,
                    arrival_latency: summary,
                    continuity: if due == 0 { 1.0 } else { p.delivered as f64 / due as f64 },
                    skipped: p.skipped,
                    depth: route.map(|(d, _)| d),
                    lower_bound_ms,
                    observed_over_bound_p50: ratio,
                }
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        let mut startups: Vec<f64> = honest.iter().filter_map(|p| p.startup_s).collect();
        startups.sort_by(f64::total_cmp);
        let joiners: Vec<&PeerRaw> = peers.iter().skip(scenario.peers).filter(|p| !p.adversary).collect();
        let mut joiner_startups: Vec<f64> = joiners.iter().filter_map(|p| p.startup_s).collect();
        joiner_startups.sort_by(f64::total_cmp);
        let joiners_never_started = joiners
            .iter()
            .filter(|p| {
                p.startup_s.is_none() && p.left_at_s.is_none() && p.joined_at_s + STARTUP_GRACE_S <= scenario.duration_s
            })
            .count();
        let delivered: u64 = present.iter().map(|p| p.delivered).sum();
        let skipped: u64 = present.iter().map(|p| p.skipped).sum();
        let continuity_min = present
            .iter()
            .filter(|p| p.delivered + p.skipped > 0)
            .map(|p| p.delivered as f64 / (p.delivered + p.skipped) as f64)
            .fold(1.0, f64::min);
        let sum = |f: fn(&PeerRaw) -> u64| honest.iter().map(|p| f(p)).sum::<u64>();
        let (push, pull, dups) = (sum(|p| p.push), sum(|p| p.pull), sum(|p| p.duplicates));
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let chunk_up = sum(|p| p.chunk_bytes_up) + totals.origin_bytes_up;
        Report {
            kind,
            scenario,
            peers_total: peers.len(),
            published: totals.published,
            arrival_latency: LatencySummary::of(&all),
            arrival_latency_after_warm_up: LatencySummary::of(&warm),
            continuity_min,
            continuity: if delivered + skipped == 0 { 0.0 } else { delivered as f64 / (delivered + skipped) as f64 },
            skipped_total: skipped,
            startup_p50_s: percentile(&startups, 0.5),
            startup_max_s: startups.last().copied().unwrap_or(0.0),
            joiners: joiners.len(),
            joiner_startup_p50_s: percentile(&joiner_startups, 0.5),
            joiner_startup_p99_s: percentile(&joiner_startups, 0.99),
            joiner_startup_max_s: joiner_startups.last().copied().unwrap_or(0.0),
            joiners_never_started,
            origin_upload_ratio: ratio(totals.origin_bytes_up, totals.published * totals.chunk_bytes),
            origin_upload_ratio_after_warm_up: totals.at_warm_up.and_then(|(published, bytes_up)| {
                let after = totals.published.checked_sub(published).filter(|&n| n > 0)?;
                Some(ratio(totals.origin_bytes_up.saturating_sub(bytes_up), after * totals.chunk_bytes))
            }),
            duplicate_ratio: ratio(dups, push + pull),
            push_share: ratio(push, push + pull),
            control_overhead: ratio(sum(|p| p.control_bytes_up), chunk_up),
            depth_mean: if depths.is_empty() {
                0.0
            } else {
                f64::from(depths.iter().sum::<u32>()) / depths.len() as f64
            },
            depth_max: depths.iter().copied().max().unwrap_or(0),
            bound_ratio_p50: percentile(&ratios, 0.5),
            bound_ratio_p99: percentile(&ratios, 0.99),
            cpu_per_peer: totals.cpu_per_peer,
            scheduler_lag: None,
            wall_s: totals.wall_s,
            latency_cdf,
            latency_over_time,
            events,
            per_peer,
        }
    }

    /// One line for the terminal (with the joiners' startup when peers joined after the start).
    pub fn headline(&self) -> String {
        let mut line = format!(
            "arrival latency p50 {:.0} ms p90 {:.0} ms p99 {:.0} ms max {:.0} ms | continuity {:.3} % (min {:.3} %) | origin upload {:.2}x | duplicates {:.2} % | push {:.1} % | depth mean {:.1} max {} | startup p50 {:.2} s max {:.2} s",
            self.arrival_latency.p50_ms,
            self.arrival_latency.p90_ms,
            self.arrival_latency.p99_ms,
            self.arrival_latency.max_ms,
            self.continuity * 100.0,
            self.continuity_min * 100.0,
            self.origin_upload_ratio,
            self.duplicate_ratio * 100.0,
            self.push_share * 100.0,
            self.depth_mean,
            self.depth_max,
            self.startup_p50_s,
            self.startup_max_s,
        );
        // A run shorter than the warm-up has nothing after it: say nothing rather than "0 ms".
        if self.arrival_latency_after_warm_up.count > 0 {
            line.push_str(&format!(
                " | after {WARM_UP_S:.0} s: p50 {:.0} ms p99 {:.0} ms",
                self.arrival_latency_after_warm_up.p50_ms, self.arrival_latency_after_warm_up.p99_ms
            ));
            if let Some(origin) = self.origin_upload_ratio_after_warm_up {
                line.push_str(&format!(" origin {origin:.3}x"));
            }
        }
        if let Some(lag) = &self.scheduler_lag {
            line.push_str(&format!(" | scheduler lag p99 {:.1} ms max {:.0} ms", lag.p99_ms, lag.max_ms));
        }
        if self.joiners > 0 {
            line.push_str(&format!(
                " | joiners {}: startup p50 {:.2} s p99 {:.2} s max {:.2} s, {} never started",
                self.joiners,
                self.joiner_startup_p50_s,
                self.joiner_startup_p99_s,
                self.joiner_startup_max_s,
                self.joiners_never_started,
            ));
        }
        line
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }
}

/// Why plots could not be drawn.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// The directory could not be created or written.
    #[error("cannot write plots to {dir}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// The plotting library failed.
    #[error("drawing {plot} failed: {message}")]
    Draw {
        /// Which plot.
        plot: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// Draws `latency_cdf.svg`, `latency_over_time.svg` and `latency_vs_depth.svg` into `dir`.
pub fn write_plots(report: &Report, dir: &Path) -> Result<(), PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Io { dir: dir.display().to_string(), source })?;
    plots::cdf(report, &dir.join("latency_cdf.svg"))
        .map_err(|m| PlotError::Draw { plot: "latency CDF", message: m })?;
    plots::over_time(report, &dir.join("latency_over_time.svg"))
        .map_err(|m| PlotError::Draw { plot: "latency over time", message: m })?;
    plots::vs_depth(report, &dir.join("latency_vs_depth.svg"))
        .map_err(|m| PlotError::Draw { plot: "latency against depth", message: m })?;
    Ok(())
}

/// Draws `origin_upload_vs_peers.svg` (and p99 latency) from (peers, origin upload ratio, p99 ms) of
/// runs with different N.
pub fn write_scaling_plot_points(points: &[(f64, f64, f64)], dir: &Path) -> Result<(), PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Io { dir: dir.display().to_string(), source })?;
    plots::scaling(points, &dir.join("origin_upload_vs_peers.svg"))
        .map_err(|m| PlotError::Draw { plot: "origin upload against N", message: m })
}

mod plots {
    use std::path::Path;

    use plotters::prelude::*;

    use super::{EventKind, Report};

    fn e<E: std::fmt::Display>(err: E) -> String {
        err.to_string()
    }

    fn title(r: &Report, what: &str) -> String {
        format!(
            "{what} — {} {} peers, {:.1} Mbit/s, {} ms chunks",
            r.kind,
            r.scenario.peers,
            r.scenario.bitrate_bps as f64 / 1e6,
            r.scenario.chunk_ms
        )
    }

    pub(super) fn cdf(r: &Report, path: &Path) -> Result<(), String> {
        let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let max = r.latency_cdf.last().map_or(1.0, |p| p.0).max(1.0) * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(title(r, "Arrival latency CDF"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..max, 0f64..1f64)
            .map_err(e)?;
        chart.configure_mesh().x_desc("latency (ms)").y_desc("share of chunks").draw().map_err(e)?;
        chart.draw_series(LineSeries::new(r.latency_cdf.iter().copied(), &BLUE)).map_err(e)?;
        root.present().map_err(e)
    }

    pub(super) fn over_time(r: &Report, path: &Path) -> Result<(), String> {
        let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let t_max = r.latency_over_time.last().map_or(1.0, |p| p.0).max(r.scenario.duration_s).max(1.0);
        let y_max = r.latency_over_time.iter().map(|p| p.3).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title(r, "Arrival latency over time"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(e)?;
        chart.configure_mesh().x_desc("time (s)").y_desc("latency (ms)").draw().map_err(e)?;
        for ev in &r.events {
            let color = match ev.kind {
                EventKind::Leave => RED.mix(0.25),
                EventKind::Flash => MAGENTA.mix(0.5),
                EventKind::Join => GREEN.mix(0.25),
            };
            chart.draw_series(LineSeries::new([(ev.t_s, 0.0), (ev.t_s, y_max)], color)).map_err(e)?;
        }
        let series = |f: fn(&(f64, f64, f64, f64)) -> f64| r.latency_over_time.iter().map(move |p| (p.0, f(p)));
        chart
            .draw_series(LineSeries::new(series(|p| p.1), &BLUE))
            .map_err(e)?
            .label("p50")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(series(|p| p.2), &RED))
            .map_err(e)?
            .label("p99")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        chart
            .draw_series(LineSeries::new(series(|p| p.3), &BLACK.mix(0.4)))
            .map_err(e)?
            .label("max")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(e)?;
        root.present().map_err(e)
    }

    pub(super) fn vs_depth(r: &Report, path: &Path) -> Result<(), String> {
        let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let points: Vec<(f64, f64, f64)> = r
            .per_peer
            .iter()
            .filter_map(|p| Some((f64::from(p.depth?), p.arrival_latency.p50_ms, p.arrival_latency.p99_ms)))
            .collect();
        let d_max = points.iter().map(|p| p.0).fold(1.0, f64::max) + 1.0;
        let y_max = points.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title(r, "Latency against push-tree depth"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..d_max, 0f64..y_max)
            .map_err(e)?;
        chart.configure_mesh().x_desc("hops from the origin").y_desc("latency (ms)").draw().map_err(e)?;
        chart
            .draw_series(points.iter().map(|p| Circle::new((p.0, p.1), 3, BLUE.filled())))
            .map_err(e)?
            .label("p50 per peer")
            .legend(|(x, y)| Circle::new((x + 10, y), 3, BLUE.filled()));
        chart
            .draw_series(points.iter().map(|p| Cross::new((p.0 + 0.1, p.2), 3, RED)))
            .map_err(e)?
            .label("p99 per peer")
            .legend(|(x, y)| Cross::new((x + 10, y), 3, RED));
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(e)?;
        root.present().map_err(e)
    }

    pub(super) fn scaling(points: &[(f64, f64, f64)], path: &Path) -> Result<(), String> {
        let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut pts: Vec<(f64, f64, f64)> = points.iter().map(|&(n, up, p99)| (n, up, p99 / 1000.0)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n_max = pts.iter().map(|p| p.0).fold(10.0, f64::max) * 1.5;
        let y_max = pts.iter().map(|p| p.1.max(p.2)).fold(2.5, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("Origin upload and p99 latency against audience size", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((1f64..n_max).log_scale(), 0f64..y_max)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("peers")
            .y_desc("origin upload (x bitrate) / p99 latency (s)")
            .draw()
            .map_err(e)?;
        chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.1)), &BLUE).point_size(4))
            .map_err(e)?
            .label("origin upload (x bitrate)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.2)), &RED).point_size(4))
            .map_err(e)?
            .label("p99 arrival latency (s)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(e)?;
        root.present().map_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin_after_warm_up(at_warm_up: Option<(u64, u64)>) -> Option<f64> {
        let totals =
            RunTotals { published: 100, chunk_bytes: 1000, origin_bytes_up: 212_000, at_warm_up, ..Default::default() };
        Report::build("sim", Scenario::default(), &totals, &[], Vec::new()).origin_upload_ratio_after_warm_up
    }

    /// The steady figure leaves out what the origin sent before the warm-up, bytes and chunks both.
    #[test]
    fn the_origin_ratio_after_the_warm_up_counts_only_what_came_after() {
        // 20 chunks and 52 kB by the warm-up; 80 chunks and 160 kB after it.
        assert_eq!(origin_after_warm_up(Some((20, 52_000))), Some(2.0));
        // Nothing published after the warm-up, or a run that ended before it: no figure.
        assert_eq!(origin_after_warm_up(Some((100, 212_000))), None);
        assert_eq!(origin_after_warm_up(None), None);
    }
}
