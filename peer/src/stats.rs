//! A node's figures: latency histograms, continuity, chunks by path, bytes, neighbours.
//!
//! Latency of a chunk = (our clock + estimated offset to the origin's clock) − capture time. In the
//! lab all nodes share one clock and the offset is about zero; across machines the offset comes from
//! the NTP-style ping exchange in the swarm state machine, with its uncertainty alongside.

use std::sync::{Arc, Mutex, MutexGuard};

use crowdsurf_proto::NodeId;
use crowdsurf_proto::chunk::Verified;
use crowdsurf_proto::swarm::{Counters, Swarm};
use crowdsurf_proto::wire::Role;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// A snapshot of a node's figures, as `/stats` serves it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStats {
    /// Node id, short form.
    pub node: String,
    /// origin, relay or player.
    pub role: &'static str,
    /// Neighbours that have said hello.
    pub neighbours: usize,
    /// Substreams with a parent.
    pub parents: usize,
    /// The parent per substream (short node ids).
    pub parent_ids: Vec<Option<String>>,
    /// (child, substream) subscriptions served.
    pub children: usize,
    /// Highest sequence number known.
    pub live_edge: Option<u64>,
    /// Next sequence number for playback.
    pub playback_cursor: Option<u64>,
    /// Estimated origin clock − our clock, µs.
    pub origin_offset_us: i64,
    /// Uncertainty of that estimate, µs (null when unknown).
    pub origin_offset_error_us: Option<u64>,
    /// Arrival latency (first copy of each chunk).
    pub arrival_latency: LatencySummary,
    /// Latency at in-order delivery (for players: when the chunk is handed to the decoder).
    pub delivery_latency: LatencySummary,
    /// Delivered / (delivered + skipped), 1.0 before anything is due.
    pub continuity: f64,
    /// Share of stored chunks that arrived by push.
    pub push_share: f64,
    /// Chunks that arrived when already stored / chunks stored.
    pub duplicate_ratio: f64,
    /// The state machine's counters.
    pub counters: CountersView,
}

/// [`Counters`] as JSON.
#[derive(Debug, Clone, Serialize, Default)]
#[allow(missing_docs)]
pub struct CountersView {
    pub push: u64,
    pub pull: u64,
    pub duplicates: u64,
    pub delivered: u64,
    pub skipped: u64,
    pub published: u64,
    pub chunk_bytes_up: u64,
    pub chunk_bytes_down: u64,
    pub chunk_bytes_from_origin: u64,
    pub control_bytes_up: u64,
    pub requests_sent: u64,
    pub request_timeouts: u64,
    pub bans: u64,
    pub parent_changes: u64,
}

impl From<&Counters> for CountersView {
    fn from(c: &Counters) -> Self {
        CountersView {
            push: c.push,
            pull: c.pull,
            duplicates: c.duplicates,
            delivered: c.delivered,
            skipped: c.skipped,
            published: c.published,
            chunk_bytes_up: c.chunk_bytes_up,
            chunk_bytes_down: c.chunk_bytes_down,
            chunk_bytes_from_origin: c.chunk_bytes_from_origin,
            control_bytes_up: c.control_bytes_up,
            requests_sent: c.requests_sent,
            request_timeouts: c.request_timeouts,
            bans: c.bans,
            parent_changes: c.parent_changes,
        }
    }
}

/// At most this many (time, latency) arrival samples are kept for time series (about 7 hours of
/// 250 ms chunks); older ones are dropped.
const MAX_SAMPLES: usize = 100_000;

struct Inner {
    node: NodeId,
    role: Role,
    arrival: Histogram<u64>,
    samples: std::collections::VecDeque<(u64, u64)>,
    delivery: Histogram<u64>,
    swarm: Option<SwarmView>,
}

#[derive(Clone)]
struct SwarmView {
    neighbours: usize,
    parents: usize,
    parent_ids: Vec<Option<String>>,
    children: usize,
    live_edge: Option<u64>,
    cursor: Option<u64>,
    offset: (i64, u64),
    counters: Counters,
}

/// Shared, updated by the driver, read by handles and the HTTP endpoint.
#[derive(Clone)]
pub struct StatsCell(Arc<Mutex<Inner>>);

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant figures; recording saturates rather than failing.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!("static bounds are valid"))
}

impl StatsCell {
    pub(crate) fn new(node: NodeId, role: Role) -> Self {
        StatsCell(Arc::new(Mutex::new(Inner {
            node,
            role,
            arrival: histogram(),
            samples: Default::default(),
            delivery: histogram(),
            swarm: None,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the figures inconsistent in a harmful way.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record_arrival(&self, chunk: &Verified, now_us: u64, offset_us: i64) {
        let lat = latency(chunk, now_us, offset_us);
        let mut inner = self.lock();
        inner.arrival.saturating_record(lat);
        if inner.samples.len() >= MAX_SAMPLES {
            inner.samples.pop_front();
        }
        inner.samples.push_back((now_us, lat));
    }

    pub(crate) fn record_delivery(&self, chunk: &Verified, now_us: u64, offset_us: i64) {
        let lat = latency(chunk, now_us, offset_us);
        self.lock().delivery.saturating_record(lat);
    }

    pub(crate) fn update_from(&self, swarm: &Swarm, _now_us: u64) {
        let view = SwarmView {
            neighbours: swarm.neighbour_count(),
            parents: swarm.parents().iter().filter(|p| p.is_some()).count(),
            parent_ids: swarm.parents().iter().map(|p| p.map(|id| id.fmt_short())).collect(),
            children: swarm.children(),
            live_edge: swarm.live_edge(),
            cursor: swarm.playback_cursor(),
            offset: swarm.origin_offset(),
            counters: swarm.counters().clone(),
        };
        self.lock().swarm = Some(view);
    }

    /// Recent (arrival time µs, latency µs) samples, oldest first, for time series.
    pub fn arrival_samples(&self) -> Vec<(u64, u64)> {
        self.lock().samples.iter().copied().collect()
    }

    /// The arrival-latency histogram (µs), for reports that merge many nodes.
    pub fn arrival_histogram(&self) -> Histogram<u64> {
        self.lock().arrival.clone()
    }

    /// A snapshot.
    pub fn snapshot(&self) -> NodeStats {
        let inner = self.lock();
        let v = inner.swarm.clone();
        let c = v.as_ref().map(|v| v.counters.clone()).unwrap_or_default();
        let due = c.delivered + c.skipped;
        let stored = c.push + c.pull;
        NodeStats {
            node: inner.node.fmt_short(),
            role: match inner.role {
                Role::Origin => "origin",
                Role::Relay => "relay",
                Role::Player => "player",
            },
            neighbours: v.as_ref().map_or(0, |v| v.neighbours),
            parents: v.as_ref().map_or(0, |v| v.parents),
            parent_ids: v.as_ref().map_or_else(Vec::new, |v| v.parent_ids.clone()),
            children: v.as_ref().map_or(0, |v| v.children),
            live_edge: v.as_ref().and_then(|v| v.live_edge),
            playback_cursor: v.as_ref().and_then(|v| v.cursor),
            origin_offset_us: v.as_ref().map_or(0, |v| v.offset.0),
            origin_offset_error_us: v.as_ref().and_then(|v| (v.offset.1 != u64::MAX).then_some(v.offset.1)),
            arrival_latency: LatencySummary::of(&inner.arrival),
            delivery_latency: LatencySummary::of(&inner.delivery),
            continuity: if due == 0 { 1.0 } else { c.delivered as f64 / due as f64 },
            push_share: if stored == 0 { 0.0 } else { c.push as f64 / stored as f64 },
            duplicate_ratio: if stored == 0 { 0.0 } else { c.duplicates as f64 / stored as f64 },
            counters: CountersView::from(&c),
        }
    }
}

fn latency(chunk: &Verified, now_us: u64, offset_us: i64) -> u64 {
    let origin_now = i128::from(now_us) + i128::from(offset_us);
    u64::try_from(origin_now - i128::from(chunk.header().capture_us)).unwrap_or(0).max(1)
}

impl NodeStats {
    /// The figures in Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let labels = format!("node=\"{}\",role=\"{}\"", self.node, self.role);
        let mut gauge = |name: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP crowdsurf_{name} {help}\n# TYPE crowdsurf_{name} gauge");
            let _ = writeln!(out, "crowdsurf_{name}{{{labels}}} {value}");
        };
        gauge("neighbours", "Neighbours that have said hello.", self.neighbours as f64);
        gauge("parents", "Substreams with a push parent.", self.parents as f64);
        gauge("children", "Push subscriptions served.", self.children as f64);
        gauge("continuity", "Delivered / (delivered + skipped).", self.continuity);
        gauge("push_share", "Share of chunks that arrived by push.", self.push_share);
        gauge("duplicate_ratio", "Duplicate chunks per stored chunk.", self.duplicate_ratio);
        gauge("origin_offset_seconds", "Estimated origin clock minus ours.", self.origin_offset_us as f64 / 1e6);
        let c = &self.counters;
        for (name, help, v) in [
            ("chunks_push_total", "Chunks stored after a push.", c.push),
            ("chunks_pull_total", "Chunks stored after a request.", c.pull),
            ("chunks_duplicate_total", "Chunks received when already stored.", c.duplicates),
            ("chunks_delivered_total", "Chunks delivered in order.", c.delivered),
            ("chunks_skipped_total", "Chunks skipped at their deadline.", c.skipped),
            ("chunks_published_total", "Chunks published (origin).", c.published),
            ("chunk_bytes_up_total", "Chunk payload bytes sent.", c.chunk_bytes_up),
            ("chunk_bytes_down_total", "Chunk payload bytes received.", c.chunk_bytes_down),
            (
                "chunk_bytes_from_origin_total",
                "Chunk payload bytes received straight from the origin.",
                c.chunk_bytes_from_origin,
            ),
            ("control_bytes_up_total", "Control bytes sent.", c.control_bytes_up),
            ("requests_sent_total", "Repair requests sent.", c.requests_sent),
            ("request_timeouts_total", "Repair requests that timed out.", c.request_timeouts),
            ("bans_total", "Neighbours banned for misbehaviour.", c.bans),
            ("parent_changes_total", "Push parent replacements.", c.parent_changes),
        ] {
            let _ = writeln!(out, "# HELP crowdsurf_{name} {help}\n# TYPE crowdsurf_{name} counter");
            let _ = writeln!(out, "crowdsurf_{name}{{{labels}}} {v}");
        }
        for (name, l) in [("arrival", &self.arrival_latency), ("delivery", &self.delivery_latency)] {
            let _ = writeln!(
                out,
                "# HELP crowdsurf_{name}_latency_seconds Capture-to-{name} latency.\n# TYPE crowdsurf_{name}_latency_seconds summary"
            );
            for (q, v) in [("0.5", l.p50_ms), ("0.9", l.p90_ms), ("0.99", l.p99_ms), ("1", l.max_ms)] {
                let _ = writeln!(out, "crowdsurf_{name}_latency_seconds{{{labels},quantile=\"{q}\"}} {}", v / 1000.0);
            }
            let _ = writeln!(out, "crowdsurf_{name}_latency_seconds_count{{{labels}}} {}", l.count);
        }
        out
    }
}
