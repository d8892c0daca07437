//! `crowdsurf-peer`: a headless swarm node (a relay, a seedbox for a stream).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use crowdsurf_peer::{Node, NodeConfig, http, keyfile};
use crowdsurf_proto::wire::Role;
use crowdsurf_proto::{NodeKey, Ticket};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than the system allocator: a node allocates a little for every message, and a
/// large simulation does that hundreds of millions of times (10,000 peers at 100 ms chunks run about
/// a quarter faster with it, for about a quarter more memory). Built not to ask for transparent huge
/// pages (`no_thp`): with them a lab of 100 relays spent an eighth of its CPU in the kernel zeroing
/// 2 MB pages and held 850 MB instead of 510 MB, while the simulator runs about as fast either way.
/// On a host whose THP setting is `always` rather than `madvise`, set `MIMALLOC_ALLOW_THP=0` too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Relay a crowdsurf live stream: join the swarm named by a ticket, receive every chunk, verify it,
/// and pass it on to other viewers. Shows a one-line live status on a terminal.
///
/// Example: crowdsurf-peer crowdsurfaeaq... --listen 0.0.0.0:4433 --http 127.0.0.1:9100 --max-upload 10M
#[derive(Debug, Parser)]
#[command(version, about, long_about, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    relay: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Measure a swarm: N real relays over QUIC on 127.0.0.1, in this process or several, fed by a
    /// synthetic origin or by a live stream's ticket; prints progress and writes a JSON report.
    ///
    /// Example: crowdsurf-peer lab --peers 50 --duration 30s --report lab.json
    Lab(LabArgs),
    /// A share of a lab's relays in a process of its own, driven by `lab --processes` over stdin and
    /// stdout (not for use by hand).
    #[command(hide = true)]
    LabWorker,
    /// Simulate a swarm: the same state machine in virtual time, thousands of peers, seeded and
    /// reproducible; prints progress every 5 s and writes the same report as `lab`.
    ///
    /// Example: crowdsurf-peer sim --peers 10000 --duration 60s --delay-ms 30 --upload-mean 3 --slow-share 0.2
    Sim(SimArgs),
    /// Plot origin upload and p99 latency against audience size from several reports.
    ///
    /// Example: crowdsurf-peer plot sim100.json sim1000.json sim10000.json --plots plots/
    Plot {
        /// Reports written by `lab` or `sim`.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Where to write origin_upload_vs_peers.svg.
        #[arg(long, default_value = "plots")]
        plots: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct SimArgs {
    /// Peers at the start.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Stream duration (virtual).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Stream bitrate in bits per second (k/M suffixes).
    #[arg(long, default_value = "2.5M", value_parser = parse_bits)]
    bitrate: u64,
    /// Chunk duration in ms (1 to 10000).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    chunk_ms: u32,
    /// Keyframe interval in ms, as the broadcaster's: every chunk this often is a random-access one
    /// (a joiner starts at one).
    #[arg(long, default_value_t = 1000)]
    keyint_ms: u32,
    /// Every peer's playback point behind the live edge; continuity counts the chunks present by it.
    /// With uplinks near the bitrate a large swarm needs 2–2.5 s (trees get deep; see the README).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    latency: Duration,
    /// Mean one-way delay between peers, ms.
    #[arg(long, default_value_t = 30.0)]
    delay_ms: f64,
    /// Every pair of peers exactly --delay-ms apart (as the lab's links) instead of the geography.
    #[arg(long)]
    uniform_delay: bool,
    /// The origin's upload as a multiple of the bitrate.
    #[arg(long, default_value_t = 8.0)]
    origin_upload: f64,
    /// Peers at the start join spread over this long.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    ramp: Duration,
    /// Jitter bound, ms.
    #[arg(long, default_value_t = 2.0)]
    jitter_ms: f64,
    /// Mean upload as a multiple of the bitrate.
    #[arg(long, default_value_t = 3.0)]
    upload_mean: f64,
    /// Share of peers whose upload is below the bitrate.
    #[arg(long, default_value_t = 0.2)]
    slow_share: f64,
    /// Churn: share of the peers replaced per minute, e.g. 20%/min.
    #[arg(long, default_value = "0", value_parser = parse_churn)]
    churn: f64,
    /// Flash crowd: N peers joining within T, e.g. 1000/2s (starts 10 s in).
    #[arg(long, value_parser = parse_flash)]
    flash: Option<(usize, Duration)>,
    /// The origin pays back what it sent beyond twice the stream (start-up, rescue copies) by now
    /// and then leaving out a first-tier push, so its upload over the whole run stays within 2x;
    /// the few chunks left out reach part of the swarm a pull later.
    #[arg(long)]
    strict_upload: bool,
    /// Most peers each node remembers from peer exchange (a real node: 1024). Their table is the
    /// largest part of a simulated node's memory: 256 takes a third off it (see the README).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(16..=65_536))]
    known_peers: u64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write SVG plots here.
    #[arg(long)]
    plots: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct LabArgs {
    /// Relays at the start.
    #[arg(long, default_value_t = 20)]
    peers: usize,
    /// How long the stream runs.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Stream bitrate in bits per second (k/M suffixes), e.g. 2.5M.
    #[arg(long, default_value = "2.5M", value_parser = parse_bits)]
    bitrate: u64,
    /// Chunk duration in ms (1 to 10000).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    chunk_ms: u32,
    /// Keyframe interval in ms, as the broadcaster's: every chunk this often is a random-access one
    /// (a joiner starts at one).
    #[arg(long, default_value_t = 1000)]
    keyint_ms: u32,
    /// Every peer's playback point behind the live edge; continuity counts the chunks present by it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    latency: Duration,
    /// The relays present at the start join spread over this long, while the stream runs (as in the
    /// simulator); 0s: all at once, as the first chunk is published.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    ramp: Duration,
    /// Per-relay upload cap (bytes/s with k/M/G, or bits with a trailing "bit"): the node's chunk shaper only.
    /// The same for every relay; --upload-mean, when given, sets each relay's cap instead.
    #[arg(long, value_parser = parse_rate)]
    max_upload: Option<u64>,
    /// One-way delay of every link (emulated under each node's QUIC socket), e.g. 20ms.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    delay: Duration,
    /// Uniform jitter bound added to the delay, per datagram, e.g. 2ms.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    jitter: Duration,
    /// Datagrams lost on every link, e.g. 0.5% (or 0.005).
    #[arg(long, default_value = "0", value_parser = parse_share)]
    loss: f64,
    /// Upload mix: mean relay upload as a multiple of the bitrate, e.g. 3 (each relay's link capped).
    #[arg(long)]
    upload_mean: Option<f64>,
    /// Upload mix: share of relays between 0.5x and 0.9x the bitrate, e.g. 0.2 or 20%.
    #[arg(long, default_value = "0.2", value_parser = parse_share)]
    slow_share: f64,
    /// The origin's upload as a multiple of the bitrate (unlimited when omitted), e.g. 8.
    #[arg(long)]
    origin_upload: Option<f64>,
    /// The origin pays back what it sent beyond twice the stream (start-up, rescue copies) by now
    /// and then leaving out a first-tier push, so its upload over the whole run stays within 2x;
    /// the few chunks left out reach part of the swarm a pull later. (A real broadcaster: its own
    /// --strict-upload.)
    #[arg(long)]
    strict_upload: bool,
    /// Churn: share of the peers replaced per minute, e.g. 20%/min (or 0.2).
    #[arg(long, default_value = "0", value_parser = parse_churn)]
    churn: f64,
    /// Flash crowd: N peers joining within T, e.g. 100/2s (starts 5 s into the run).
    #[arg(long, value_parser = parse_flash)]
    flash: Option<(usize, Duration)>,
    /// Seed for keys and choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Feed the relays from this live stream (a broadcaster's or relay's ticket) instead of the
    /// lab's synthetic origin. The report then gives the stream's bitrate, chunk length and
    /// key-frame interval as measured from its chunks; --bitrate only sets what --upload-mean is a
    /// multiple of (give it the stream's), and --chunk-ms, --keyint-ms, --origin-upload and
    /// --strict-upload do not apply (give the broadcaster its own --strict-upload).
    #[arg(long, conflicts_with_all = ["chunk_ms", "keyint_ms", "origin_upload", "strict_upload"])]
    ticket: Option<Ticket>,
    /// Run the relays in this many worker processes (1: all in this one, beside the origin).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    processes: u32,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write SVG plots here (latency CDF, latency over time, latency against tree depth).
    #[arg(long)]
    plots: Option<PathBuf>,
}

/// Parses a bitrate in bits per second: "2.5M", "800k", "2500000", "2.5Mbit".
fn parse_bits(s: &str) -> Result<u64, String> {
    parse_rate(&format!("{}bit", s.trim().trim_end_matches("bps").trim_end_matches("bit"))).map(|bytes| bytes * 8)
}

/// Parses a share: "0.5%" or "0.005".
fn parse_share(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("not a share: {s:?} (try 0.5% or 0.005)"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("share {s:?} is not between 0 and 100 %"));
    }
    Ok(v)
}

fn parse_churn(s: &str) -> Result<f64, String> {
    let s = s.trim().trim_end_matches("/min");
    match s.strip_suffix('%') {
        Some(p) => p.parse::<f64>().map(|v| v / 100.0).map_err(|_| format!("not a churn rate: {s:?} (try 20%/min)")),
        None => s.parse::<f64>().map_err(|_| format!("not a churn rate: {s:?} (try 20%/min)")),
    }
}

fn parse_flash(s: &str) -> Result<(usize, Duration), String> {
    let (n, t) = s.split_once('/').ok_or_else(|| format!("not a flash crowd: {s:?} (try 100/2s)"))?;
    Ok((n.trim().parse().map_err(|_| format!("not a peer count: {n:?}"))?, parse_duration(t)?))
}

#[derive(Debug, clap::Args)]
struct Args {
    /// The ticket printed by the broadcaster (or any viewer's ticket for the same stream).
    #[arg(env = "CROWDSURF_TICKET", required = true)]
    ticket: Option<Ticket>,
    /// UDP address to accept other peers on.
    #[arg(long, env = "CROWDSURF_LISTEN", default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    /// Address to tell other peers (when --listen is 0.0.0.0 or behind a port forward).
    #[arg(long, env = "CROWDSURF_ANNOUNCE")]
    announce: Option<SocketAddr>,
    /// Serve /metrics (Prometheus) and /stats (JSON) on this local TCP address.
    #[arg(long, env = "CROWDSURF_HTTP")]
    http: Option<SocketAddr>,
    /// Upload cap for chunk data, bytes per second, with an optional k/M/G suffix (e.g. 10M); bits with
    /// a trailing "bit" (e.g. 20Mbit).
    #[arg(long, env = "CROWDSURF_MAX_UPLOAD", value_parser = parse_rate)]
    max_upload: Option<u64>,
    /// Node key file (created with mode 0600 if missing); a fresh identity each run when omitted.
    #[arg(long, env = "CROWDSURF_NODE_KEY")]
    key: Option<PathBuf>,
    /// Playback point behind the live edge (the deadline for every chunk), e.g. 1s or 500ms.
    #[arg(long, env = "CROWDSURF_LATENCY", default_value = "1s", value_parser = parse_duration)]
    latency: Duration,
    /// Neighbours to dial up to.
    #[arg(long, default_value_t = 8)]
    neighbours: usize,
    /// Most neighbours in all before refusing newcomers (with a list of other peers).
    #[arg(long, default_value_t = 32)]
    max_neighbours: usize,
    /// Stop after this long (e.g. 30s, 10m); runs until Ctrl-C otherwise.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// No live status line, only logs.
    #[arg(long, short)]
    quiet: bool,
}

/// Parses "10M", "500k", "2500000" (bytes/s) or "20Mbit" (bits/s).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, bits) = match s.strip_suffix("bit") {
        Some(n) => (n, true),
        None => (s.strip_suffix('B').unwrap_or(s), false),
    };
    let (digits, mult) = match num.chars().last() {
        Some('k' | 'K') => (&num[..num.len() - 1], 1_000.0),
        Some('M' | 'm') => (&num[..num.len() - 1], 1_000_000.0),
        Some('G' | 'g') => (&num[..num.len() - 1], 1_000_000_000.0),
        _ => (num, 1.0),
    };
    let v: f64 = digits.trim().parse().map_err(|_| format!("not a rate: {s:?} (try 10M or 20Mbit)"))?;
    let bytes = if bits { v * mult / 8.0 } else { v * mult };
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("rate {s:?} is too small"));
    }
    Ok(bytes as u64)
}

/// Parses "1s", "500ms", "2m", "1.5s".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let v: f64 = num.parse().map_err(|_| format!("not a duration: {s:?} (try 1s or 500ms)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("unknown unit in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} out of range"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let default_level = if cli.command.is_some() { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Some(Command::Lab(lab)) => run_lab(lab).await,
        Some(Command::LabWorker) => lab_worker().await,
        Some(Command::Sim(sim)) => run_sim(sim),
        Some(Command::Plot { reports, plots }) => plot(&reports, &plots),
        None => relay(cli.relay).await,
    }
}

/// A lab worker exits as soon as it is done, and on the first panic in any of its tasks: tokio's
/// stdin is read on a blocking thread that a normal return would wait for, and a relay's panic
/// would otherwise leave its share running short of a relay, unnoticed.
async fn lab_worker() -> Result<()> {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(101);
    }));
    let code = match crowdsurf_peer::lab::worker::serve().await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    };
    std::process::exit(code)
}

async fn run_lab(a: LabArgs) -> Result<()> {
    let (flash, flash_over) = a.flash.unwrap_or((0, Duration::from_secs(2)));
    let cfg = crowdsurf_peer::lab::LabConfig {
        peers: a.peers,
        duration: a.duration,
        bitrate_bps: a.bitrate,
        chunk_ms: a.chunk_ms,
        random_access_every: crowdsurf_peer::source::random_access_every(a.keyint_ms, a.chunk_ms),
        latency: a.latency,
        ramp: a.ramp,
        max_upload: a.max_upload,
        link_delay: a.delay,
        jitter: a.jitter,
        loss: a.loss,
        upload_mean: a.upload_mean,
        slow_share: a.slow_share,
        origin_upload: a.origin_upload,
        strict_upload: a.strict_upload,
        churn_per_min: a.churn,
        flash,
        flash_over,
        seed: a.seed,
        feed: a.ticket.clone().map_or(crowdsurf_peer::lab::Feed::Synthetic, crowdsurf_peer::lab::Feed::Ticket),
        processes: a.processes as usize,
        ..Default::default()
    };
    let uplinks = match (a.upload_mean, a.max_upload) {
        (Some(mean), _) => format!("uploads mean {mean}x, {} % below 1x", a.slow_share * 100.0),
        (None, Some(cap)) => format!("uploads capped at {} bit/s", cap.saturating_mul(8)),
        (None, None) => "uploads unlimited".to_owned(),
    };
    let feed = match &a.ticket {
        Some(t) => format!("stream {} (by ticket)", t.stream.fmt_short()),
        None => format!("{} bit/s in {} ms chunks", a.bitrate, a.chunk_ms),
    };
    let processes = if a.processes > 1 { format!(" in {} processes", a.processes) } else { String::new() };
    eprintln!(
        "lab: {} peers{processes}, {:?}, {feed}, links {:?} ± {:?}, loss {} %, {uplinks}",
        a.peers,
        a.duration,
        a.delay,
        a.jitter,
        a.loss * 100.0,
    );
    let report = crowdsurf_peer::lab::run(cfg).await.context("lab failed")?;
    println!("{}", report.headline());
    if let Some(cpu) = report.cpu_per_peer {
        println!("CPU per relay: {:.1} % of a core", cpu * 100.0);
    }
    if let Some(path) = &a.report {
        report.write_json(path).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if let Some(dir) = &a.plots {
        crowdsurf_peer::report::write_plots(&report, dir)?;
        eprintln!("plots written to {}", dir.display());
    }
    Ok(())
}

fn run_sim(a: SimArgs) -> Result<()> {
    let (flash, flash_over) = a.flash.unwrap_or((0, Duration::from_secs(2)));
    let sc = crowdsurf_peer::simulate::SimScenario {
        peers: a.peers,
        duration: a.duration,
        bitrate_bps: a.bitrate,
        chunk_ms: a.chunk_ms,
        random_access_every: crowdsurf_peer::source::random_access_every(a.keyint_ms, a.chunk_ms),
        latency: a.latency,
        delay_ms: a.delay_ms,
        uniform_delay: a.uniform_delay,
        origin_upload: a.origin_upload,
        ramp: a.ramp,
        jitter_ms: a.jitter_ms,
        upload_mean: a.upload_mean,
        slow_share: a.slow_share,
        churn_per_min: a.churn,
        flash,
        flash_over,
        known_peers: a.known_peers as usize,
        strict_upload: a.strict_upload,
        seed: a.seed,
        ..Default::default()
    };
    eprintln!("simulating {} peers for {:?} of stream (seed {})...", a.peers, a.duration, a.seed);
    let report = crowdsurf_peer::simulate::run_with_progress(&sc, sim_status());
    println!("{}", report.headline());
    println!("simulated in {:.1} s of wall time", report.wall_s);
    if let Some(path) = &a.report {
        report.write_json(path).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if let Some(dir) = &a.plots {
        crowdsurf_peer::report::write_plots(&report, dir)?;
        eprintln!("plots written to {}", dir.display());
    }
    Ok(())
}

/// A progress line on stderr every few seconds of wall time while a simulation runs: how much virtual
/// time is done, how many relays are present, continuity so far and a rough time to go (the joins at
/// the start cost more than their share, so the first estimates run long).
fn sim_status() -> impl FnMut(&crowdsurf_proto::swarm::sim::Progress) {
    const EVERY: Duration = Duration::from_secs(5);
    let wall = std::time::Instant::now();
    let mut last = wall;
    move |p| {
        if last.elapsed() < EVERY {
            return;
        }
        last = std::time::Instant::now();
        let spent = wall.elapsed().as_secs_f64();
        let done = p.elapsed_us as f64 / p.total_us.max(1) as f64;
        let due = p.delivered + p.skipped;
        let continuity = if due == 0 { 100.0 } else { 100.0 * p.delivered as f64 / due as f64 };
        let to_go = if done > 0.0 { spent * (1.0 - done) / done } else { 0.0 };
        eprintln!(
            "[{:>6.1}s of {:.1}s] relays {:>6} | events {:>7.1} M | continuity so far {continuity:>8.4} % | {spent:>5.0} s wall, about {to_go:.0} s to go",
            p.elapsed_us as f64 / 1e6,
            p.total_us as f64 / 1e6,
            p.present,
            p.events as f64 / 1e6,
        );
    }
}

/// Reads the fields the scaling plot needs back from report files.
fn plot(paths: &[PathBuf], dir: &std::path::Path) -> Result<()> {
    let mut points = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not a JSON report", path.display()))?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let p99 = v.pointer("/arrival_latency/p99_ms").and_then(serde_json::Value::as_f64);
        match (num("peers_total"), num("origin_upload_ratio"), p99) {
            (Some(n), Some(up), Some(p99)) => points.push((n, up, p99)),
            _ => anyhow::bail!("{} is not a crowdsurf lab or sim report", path.display()),
        }
    }
    crowdsurf_peer::report::write_scaling_plot_points(&points, dir)?;
    eprintln!("plot written to {}", dir.join("origin_upload_vs_peers.svg").display());
    Ok(())
}

async fn relay(args: Args) -> Result<()> {
    let ticket = args.ticket.clone().context("a ticket is required")?;
    let secret = match &args.key {
        Some(path) => keyfile::load_or_create(path)?.0,
        None => keyfile::random_secret()?,
    };
    let mut config = NodeConfig::new(NodeKey::from_secret_bytes(secret), ticket.stream, args.listen);
    config.bootstrap = ticket.bootstrap.clone();
    config.announce = args.announce;
    config.endpoint.max_upload_bytes_per_sec = args.max_upload;
    config.swarm.role = Role::Relay;
    config.swarm.target_latency_us = args.latency.as_micros() as u64;
    config.swarm.target_neighbours = args.neighbours;
    config.swarm.max_neighbours = args.max_neighbours.max(args.neighbours);
    config.swarm.seed = u64::from_le_bytes(secret[..8].try_into().unwrap_or_default());
    let (node, handle) = Node::bind(config).context("cannot start the node")?;
    eprintln!("relaying stream {} as node {}", ticket.stream.fmt_short(), handle.node_addr().id.fmt_short());
    eprintln!("this relay's own ticket: {}", Ticket::new(ticket.stream, vec![handle.node_addr()]));
    let stats_server = match args.http {
        Some(addr) => {
            let listener = http::bind(addr).await.with_context(|| format!("cannot listen for HTTP on {addr}"))?;
            Some(tokio::spawn(http::serve(listener, handle.stats_cell())))
        }
        None => None,
    };
    let mut run = tokio::spawn(node.run());
    let status = !args.quiet && std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let stop_at = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut last = (0u64, 0u64);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let s = handle.stats();
                let (up, down) = (s.counters.chunk_bytes_up, s.counters.chunk_bytes_down);
                let rates = ((up - last.0) as f64 * 8e-6, (down - last.1) as f64 * 8e-6);
                last = (up, down);
                let line = format!(
                    "neighbours {:>2} | latency p50 {:>5.0} ms p99 {:>5.0} ms | up {:>5.2} Mbit/s down {:>5.2} Mbit/s | continuity {:>6.2} % | skipped {}",
                    s.neighbours, s.arrival_latency.p50_ms, s.arrival_latency.p99_ms, rates.0, rates.1,
                    s.continuity * 100.0, s.counters.skipped,
                );
                if status {
                    eprint!("\r\x1b[2K{line}");
                    let _ = std::io::stderr().flush();
                } else {
                    tracing::debug!("{line}");
                }
                if stop_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    handle.shutdown();
                }
            }
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\nleaving the swarm...");
                handle.shutdown();
            }
            result = &mut run => {
                if status { eprintln!(); }
                if let Some(s) = stats_server { s.abort(); }
                result.context("node task failed")?.context("node failed")?;
                let s = handle.stats();
                eprintln!(
                    "done: {} chunks delivered, {} skipped, arrival latency p50 {:.0} ms p99 {:.0} ms",
                    s.counters.delivered, s.counters.skipped, s.arrival_latency.p50_ms, s.arrival_latency.p99_ms
                );
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_durations_parse() {
        assert_eq!(parse_rate("10M"), Ok(10_000_000));
        assert_eq!(parse_rate("20Mbit"), Ok(2_500_000));
        assert_eq!(parse_bits("2.5M"), Ok(2_500_000));
        assert_eq!(parse_bits("800kbit"), Ok(800_000));
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1 fortnight").is_err());
        assert_eq!(parse_churn("20%/min"), Ok(0.2));
        assert_eq!(parse_flash("100/2s"), Ok((100, Duration::from_secs(2))));
        assert_eq!(parse_share("0.5%"), Ok(0.005));
        assert_eq!(parse_share("0.2"), Ok(0.2));
        assert!(parse_share("150%").is_err());
    }
}
