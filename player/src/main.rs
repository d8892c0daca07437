//! `crowdsurf-player`: the command line around [`crowdsurf_player::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use crowdsurf_peer::keyfile;
use crowdsurf_player::{PlayerConfig, PlayerReport};
use crowdsurf_proto::{NodeKey, Ticket};
use tracing_subscriber::EnvFilter;

/// Watch a crowdsurf live stream. Joins the swarm named by the ticket as a peer (passing chunks on to
/// other viewers unless --no-relay), plays each chunk `--latency` after it was captured, and shows it
/// in a window, serves it to local players over HTTP, writes it to stdout or a file, or just decodes
/// it and reports (--headless). Outputs combine freely.
///
/// Examples:
///   crowdsurf-player crowdsurfaeaq...                          # window with sound
///   crowdsurf-player crowdsurfaeaq... --http 127.0.0.1:8080    # then: mpv http://127.0.0.1:8080/stream.ts
///                                                              #   or: open http://127.0.0.1:8080/live.m3u8
///   crowdsurf-player crowdsurfaeaq... --output - | mpv -
///   crowdsurf-player crowdsurfaeaq... --record show.ts --no-relay
///   crowdsurf-player crowdsurfaeaq... --headless --duration 30s --stats-json stats.json
///
/// In the window: F toggles fullscreen, O (or Tab) the overlay with latency, neighbours, buffer and
/// rates, Q or Esc quits.
#[derive(Debug, Parser)]
#[command(version, about, verbatim_doc_comment)]
struct Args {
    /// The ticket printed by the broadcaster (or by any relay of the stream).
    #[arg(env = "CROWDSURF_TICKET")]
    ticket: String,
    /// Playback point behind capture: every chunk is played this long after it was captured, e.g. 1s
    /// or 500ms. Lower is closer to live but leaves the swarm less time to bring each chunk.
    #[arg(long, env = "CROWDSURF_LATENCY", default_value = "1s", value_parser = parse_duration)]
    latency: Duration,
    /// Decode and discard (no window): for servers and measurement, with --duration and --stats-json.
    #[arg(long, env = "CROWDSURF_HEADLESS")]
    headless: bool,
    /// Serve the stream on this local address: /stream.ts (MPEG-TS for vlc/mpv/ffplay) and /live.m3u8
    /// (HLS for browsers and TVs), to any number of players at once.
    #[arg(long, env = "CROWDSURF_HTTP")]
    http: Option<SocketAddr>,
    /// Write the live MPEG-TS to stdout: `--output -` (pipe it into `mpv -` or `ffplay -`).
    #[arg(long, short, env = "CROWDSURF_OUTPUT")]
    output: Option<String>,
    /// Record the live MPEG-TS to this file.
    #[arg(long, env = "CROWDSURF_RECORD")]
    record: Option<PathBuf>,
    /// Stop after this long (e.g. 30s, 10m); runs until Ctrl-C otherwise.
    #[arg(long, env = "CROWDSURF_DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Write the figures as JSON here at the end (frames decoded/expected, skipped chunks, stalls,
    /// display latency percentiles, startup time, node stats). Implies decoding.
    #[arg(long, env = "CROWDSURF_STATS_JSON")]
    stats_json: Option<PathBuf>,
    /// Watch without relaying: serve no chunks to others (no push children, pull requests declined,
    /// no inbound neighbours beyond those dialled).
    #[arg(long, env = "CROWDSURF_NO_RELAY")]
    no_relay: bool,
    /// UDP address of the embedded swarm node.
    #[arg(long, env = "CROWDSURF_LISTEN", default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    /// Neighbours to dial up to.
    #[arg(long, default_value_t = 8)]
    neighbours: usize,
    /// Node key file (created with mode 0600 if missing); a fresh identity each run when omitted.
    #[arg(long, env = "CROWDSURF_NODE_KEY")]
    key: Option<PathBuf>,
    /// Seconds between status lines in the log.
    #[arg(long, default_value_t = 5)]
    status_every: u64,
}

/// Parses "1s", "500ms", "2m", "1.5s".
fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = real_main(args) {
        let mut line = String::new();
        for cause in e.chain() {
            let text = cause.to_string();
            if !line.contains(&text) {
                if !line.is_empty() {
                    line.push_str(": ");
                }
                line.push_str(&text);
            }
        }
        eprintln!("error: {line}");
        std::process::exit(1);
    }
}

fn real_main(args: Args) -> Result<()> {
    let ticket: Ticket =
        args.ticket.parse().context("bad ticket (copy the whole line the broadcaster printed after `ticket: `)")?;
    let stdout = match args.output.as_deref() {
        None => false,
        Some("-") => true,
        Some(other) => bail!("--output takes only `-` (stdout); to write a file use --record {other}"),
    };
    ffmpeg_next::init().context("cannot initialise FFmpeg")?;
    ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Fatal);
    let secret = match &args.key {
        Some(path) => keyfile::load_or_create(path)?.0,
        None => keyfile::random_secret()?,
    };
    let mut config = PlayerConfig::new(ticket, NodeKey::from_secret_bytes(secret));
    config.listen = args.listen;
    config.latency = args.latency;
    config.relay = !args.no_relay;
    config.neighbours = args.neighbours.max(1);
    config.http = args.http;
    config.stdout = stdout;
    config.record = args.record.clone();
    config.duration = args.duration;
    config.status_every = Duration::from_secs(args.status_every.max(1));
    let other_outputs = config.http.is_some() || stdout || config.record.is_some();
    config.decode = args.headless || args.stats_json.is_some();
    // The window comes on top of any other output unless --headless; without a display the other
    // outputs go on alone.
    let want_window = !args.headless;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    let report = if want_window { run_window(&runtime, config, other_outputs)? } else { run_plain(&runtime, config)? };
    print_summary(&report);
    if let Some(path) = &args.stats_json {
        let json = serde_json::to_string_pretty(&report).context("cannot encode the figures")?;
        std::fs::write(path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(())
}

async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
    eprintln!("\nleaving the swarm...");
}

fn run_plain(runtime: &tokio::runtime::Runtime, config: PlayerConfig) -> Result<PlayerReport> {
    if !config.decode && config.http.is_none() && !config.stdout && config.record.is_none() {
        bail!("nothing to do: choose --headless, --http ADDR, --output - or --record FILE");
    }
    runtime.block_on(crowdsurf_player::run(config, ctrl_c())).context("player failed")
}

#[cfg(not(feature = "window"))]
fn run_window(runtime: &tokio::runtime::Runtime, config: PlayerConfig, other_outputs: bool) -> Result<PlayerReport> {
    if other_outputs {
        return run_plain(runtime, config);
    }
    bail!(
        "this build has no window (built without the `window` feature): use --http 127.0.0.1:8080 and open \
         http://127.0.0.1:8080/stream.ts in mpv or VLC, or --output - | mpv -, or --headless"
    )
}

#[cfg(feature = "window")]
fn run_window(
    runtime: &tokio::runtime::Runtime,
    mut config: PlayerConfig,
    other_outputs: bool,
) -> Result<PlayerReport> {
    use crowdsurf_player::window;
    let window = match window::Window::open() {
        Ok(w) => w,
        Err(e) if other_outputs => {
            tracing::info!("{e}: no window here; the other outputs go on (--headless silences this)");
            return run_plain(runtime, config);
        }
        Err(e) => bail!(
            "{e}: there is no display here. Use --http 127.0.0.1:8080 and open http://127.0.0.1:8080/stream.ts in \
             mpv or VLC on a machine with a screen, or --output - | mpv -, or --headless"
        ),
    };
    config.decode = true;
    config.sink = Some(Box::new(window.sink()));
    config.status = Some(window.status_line());
    let (quit_tx, quit_rx) = tokio::sync::oneshot::channel::<()>();
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let player_finished = finished.clone();
    let player = runtime.spawn(async move {
        let report = crowdsurf_player::run(config, async move {
            tokio::select! {
                _ = quit_rx => {}
                _ = ctrl_c() => {}
            }
        })
        .await;
        // --duration, Ctrl-C or a fatal error: close the window too.
        player_finished.store(true, std::sync::atomic::Ordering::Relaxed);
        report
    });
    window.run(&finished);
    let _ = quit_tx.send(());
    runtime.block_on(player).context("player task failed")?.context("player failed")
}

fn print_summary(report: &PlayerReport) {
    let n = &report.node;
    eprintln!(
        "done after {:.1} s: {} chunks delivered, {} skipped, arrival latency p50 {:.0} ms p99 {:.0} ms",
        report.ran_s, n.counters.delivered, n.counters.skipped, n.arrival_latency.p50_ms, n.arrival_latency.p99_ms
    );
    if let Some(d) = &report.decode {
        eprintln!(
            "decoded {} of {} expected frames ({:.1} %), {} stalls, display latency p50 {:.0} ms p99 {:.0} ms max {:.0} ms, startup {}",
            d.frames_decoded,
            d.frames_expected,
            d.frames_ratio * 100.0,
            d.stalls,
            d.display_latency.p50_ms,
            d.display_latency.p99_ms,
            d.display_latency.max_ms,
            d.startup_s.map_or("never".to_string(), |s| format!("{:.0} ms", s * 1000.0)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("soon").is_err());
    }
}
