//! `crowdsurf-broadcaster`: the command line around [`crowdsurf_broadcaster::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use crowdsurf_broadcaster::sink::{ChunksDirSink, RecordSink};
use crowdsurf_broadcaster::{Config, EndReason, Input, SinkError, VideoSettings, load_or_create_key, run};
use crowdsurf_proto::chunk::Verified;

/// Turn live media into signed MPEG-TS chunks for a crowdsurf swarm.
///
/// With no input it broadcasts a built-in 1280x720 30 fps test source (moving pattern, UTC clock in ms
/// and frame number burned in, a tone with a beep each second). Examples:
///
///   crowdsurf-broadcaster --key stream.key --record out.ts --duration 20
///
///   crowdsurf-broadcaster --key stream.key --file concert.mp4 --loop --chunks-dir chunks/
///
///   crowdsurf-broadcaster --key stream.key --url 'srt://0.0.0.0:9000?mode=listener' --copy
///
///   crowdsurf-broadcaster --key stream.key --url rtmp://0.0.0.0:1935/live --input-option listen=1
///
///   crowdsurf-broadcaster --key stream.key --input-format v4l2 --url /dev/video0
///
/// OBS: Settings → Stream → Service "Custom…", Server `srt://HOST:9000?mode=caller` (or
/// `rtmp://HOST:1935/live`, key anything); Output → Keyframe interval 1 s, x264 tune zerolatency, so
/// `--copy` keeps the latency low.
#[derive(Debug, Parser)]
#[command(version, about, verbatim_doc_comment)]
struct Args {
    /// Stream key file: 64 hex digits (or 32 raw bytes), mode 0600. Created when missing; the same file
    /// continues the same stream.
    #[arg(long, env = "CROWDSURF_KEY", default_value = "crowdsurf-stream.key")]
    key: PathBuf,

    /// A media file to broadcast, paced at real time.
    #[arg(long, env = "CROWDSURF_FILE", conflicts_with = "url")]
    file: Option<PathBuf>,

    /// Start the file again at its end.
    #[arg(long = "loop", requires = "file")]
    looped: bool,

    /// An FFmpeg input URL: srt://0.0.0.0:9000?mode=listener, rtmp://0.0.0.0:1935/live (with
    /// --input-option listen=1),
    /// udp://0.0.0.0:5000, tcp://…, or a device path with --input-format.
    #[arg(long, env = "CROWDSURF_URL")]
    url: Option<String>,

    /// Force the demuxer or input device (mpegts, flv, v4l2, alsa, pulse, lavfi, …).
    #[arg(long, env = "CROWDSURF_INPUT_FORMAT")]
    input_format: Option<String>,

    /// Extra FFmpeg input option, KEY=VALUE (repeatable), e.g. video_size=640x480.
    #[arg(long = "input-option", value_parser = parse_kv)]
    input_options: Vec<(String, String)>,

    /// Remux H.264/AAC input without re-encoding.
    #[arg(long, env = "CROWDSURF_COPY")]
    copy: bool,

    /// Video size WxH (default: the input's; 1280x720 for the test source).
    #[arg(long, env = "CROWDSURF_SIZE", value_parser = parse_size)]
    size: Option<(u32, u32)>,

    /// Video frame rate (default: the input's; 30 for the test source).
    #[arg(long, env = "CROWDSURF_FPS")]
    fps: Option<u32>,

    /// Video bitrate, kbit/s.
    #[arg(long, env = "CROWDSURF_BITRATE", default_value_t = 2500)]
    bitrate: u32,

    /// x264 preset: ultrafast, superfast, veryfast, faster, fast, medium.
    #[arg(long, env = "CROWDSURF_PRESET", default_value = "veryfast")]
    preset: String,

    /// Keyframe interval in milliseconds (each keyframe starts a random-access chunk).
    #[arg(long, env = "CROWDSURF_KEYINT_MS", default_value_t = 1000)]
    keyint_ms: u64,

    /// Audio bitrate, kbit/s.
    #[arg(long, env = "CROWDSURF_AUDIO_BITRATE", default_value_t = 128)]
    audio_bitrate: u32,

    /// Leave the video out.
    #[arg(long)]
    no_video: bool,

    /// Leave the audio out.
    #[arg(long)]
    no_audio: bool,

    /// Target chunk duration, milliseconds.
    #[arg(long, env = "CROWDSURF_CHUNK_MS", default_value_t = 250)]
    chunk_ms: u64,

    /// Stop after this many seconds of media (fractions allowed), flushing the last chunk.
    #[arg(long, env = "CROWDSURF_DURATION")]
    duration: Option<f64>,

    /// First sequence number (default: wall clock in ms, which never repeats across restarts).
    #[arg(long)]
    first_seq: Option<u64>,

    /// Seconds a URL may take to answer (listeners wait forever).
    #[arg(long, default_value_t = 10.0)]
    open_timeout: f64,

    /// Seconds without input data before the input counts as stalled. A stall does not end the
    /// broadcast: it is logged, the swarm stays up (viewers see a pause), and the stream resumes at a
    /// keyframe, flagged discontinuity, when data comes back.
    #[arg(long, env = "CROWDSURF_STALL_TIMEOUT", default_value_t = 2.0)]
    stall_timeout: f64,

    /// Seconds a stall may last before the broadcast ends (with an end-of-stream chunk); 0: wait for
    /// the input forever.
    #[arg(long, env = "CROWDSURF_STALL_GIVE_UP", default_value_t = 120.0)]
    stall_give_up: f64,

    /// Seconds between stats lines in the log.
    #[arg(long, default_value_t = 5.0)]
    stats_interval: f64,

    /// Write the concatenated chunk payloads here (a plain .ts file).
    #[arg(long, env = "CROWDSURF_RECORD")]
    record: Option<PathBuf>,

    /// Write each signed chunk (header + signature + payload) to its own file here.
    #[arg(long, env = "CROWDSURF_CHUNKS_DIR")]
    chunks_dir: Option<PathBuf>,

    /// Seed the stream into the swarm: accept viewers' and relays' QUIC connections on this UDP address
    /// (e.g. 0.0.0.0:4433). The ticket viewers paste is printed on start.
    #[arg(long, env = "CROWDSURF_LISTEN")]
    listen: Option<std::net::SocketAddr>,

    /// Address to put in the ticket instead of the bound one (your public IP and port, or a LAN
    /// address when --listen is 0.0.0.0).
    #[arg(long, env = "CROWDSURF_ANNOUNCE", requires = "listen")]
    announce: Option<std::net::SocketAddr>,

    /// Also write the ticket to this file.
    #[arg(long, env = "CROWDSURF_TICKET_FILE", requires = "listen")]
    ticket_file: Option<PathBuf>,

    /// Serve the origin's /metrics and /stats on this local TCP address.
    #[arg(long, env = "CROWDSURF_HTTP", requires = "listen")]
    http: Option<std::net::SocketAddr>,

    /// Upload cap for the origin, bytes per second with an optional k/M/G suffix (the origin sends
    /// each chunk to a few first-tier peers, about twice the stream bitrate).
    #[arg(long, env = "CROWDSURF_MAX_UPLOAD", requires = "listen", value_parser = parse_bytes_rate)]
    max_upload: Option<u64>,

    /// Keep the origin's upload over the whole event within twice the stream: what it sends
    /// beyond that (a start-up burst, a rescue copy of a chunk the swarm failed to spread) is paid
    /// back by now and then leaving out one first-tier push while the swarm is calm. Those few
    /// chunks reach part of the swarm a pull later (in the lab, p99 after the warm-up +80 ms).
    #[arg(long, env = "CROWDSURF_STRICT_UPLOAD", requires = "listen")]
    strict_upload: bool,

    /// The origin's node key file (created with mode 0600 if missing); a fresh node identity otherwise.
    #[arg(long, env = "CROWDSURF_NODE_KEY", requires = "listen")]
    node_key: Option<PathBuf>,

    /// FFmpeg's own log level: quiet, panic, fatal, error, warning, info, verbose, debug.
    #[arg(long, env = "CROWDSURF_FFMPEG_LOG", default_value = "error")]
    ffmpeg_log: String,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    Ok((k.to_string(), v.to_string()))
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("expected WxH, got {s:?}"))?;
    let w: u32 = w.parse().map_err(|_| format!("bad width in {s:?}"))?;
    let h: u32 = h.parse().map_err(|_| format!("bad height in {s:?}"))?;
    if !(16..=8192).contains(&w) || !(16..=8192).contains(&h) {
        return Err(format!("size {s} out of range 16..8192"));
    }
    Ok((w, h))
}

fn seconds(what: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("--{what} must be a non-negative number of seconds"))
}

fn ffmpeg_log_level(name: &str) -> anyhow::Result<ffmpeg_next::util::log::Level> {
    use ffmpeg_next::util::log::Level;
    Ok(match name {
        "quiet" => Level::Quiet,
        "panic" => Level::Panic,
        "fatal" => Level::Fatal,
        "error" => Level::Error,
        "warning" => Level::Warning,
        "info" => Level::Info,
        "verbose" => Level::Verbose,
        "debug" => Level::Debug,
        other => bail!("unknown --ffmpeg-log level {other:?}"),
    })
}

fn config(args: &Args) -> anyhow::Result<Config> {
    let input = match (&args.file, &args.url) {
        (Some(path), _) => Input::File { path: path.clone(), looped: args.looped },
        (None, Some(url)) => Input::Url(url.clone()),
        (None, None) => Input::TestSource,
    };
    if args.chunk_ms == 0 {
        bail!("--chunk-ms must be above zero");
    }
    Ok(Config {
        input,
        input_format: args.input_format.clone(),
        input_options: args.input_options.clone(),
        copy: args.copy,
        video: VideoSettings {
            size: args.size,
            fps: args.fps,
            bitrate_kbps: args.bitrate,
            preset: args.preset.clone(),
            keyframe_interval: Duration::from_millis(args.keyint_ms.max(1)),
        },
        audio_bitrate_kbps: args.audio_bitrate,
        no_video: args.no_video,
        no_audio: args.no_audio,
        chunk_duration: Duration::from_millis(args.chunk_ms),
        duration: args.duration.map(|d| seconds("duration", d)).transpose()?,
        first_seq: args.first_seq,
        open_timeout: Some(seconds("open-timeout", args.open_timeout)?),
        stall_timeout: seconds("stall-timeout", args.stall_timeout)?,
        stall_give_up: match seconds("stall-give-up", args.stall_give_up)? {
            d if d.is_zero() => None,
            d => Some(d),
        },
        stats_interval: seconds("stats-interval", args.stats_interval)?,
    })
}

/// Parses "10M", "500k", "2500000" (bytes per second).
fn parse_bytes_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('M' | 'm') => (&s[..s.len() - 1], 1e6),
        Some('G' | 'g') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = digits.trim().parse().map_err(|_| format!("not a rate: {s:?} (try 10M)"))?;
    if !(v * mult >= 1.0 && (v * mult).is_finite()) {
        return Err(format!("rate {s:?} is too small"));
    }
    Ok((v * mult) as u64)
}

/// The swarm side of the broadcaster: an origin node on its own tokio runtime.
struct Seeder {
    runtime: tokio::runtime::Runtime,
    handle: crowdsurf_peer::NodeHandle,
    node: tokio::task::JoinHandle<Result<(), crowdsurf_peer::NodeError>>,
    http: Option<tokio::task::JoinHandle<()>>,
}

impl Seeder {
    fn start(args: &Args, key: &crowdsurf_proto::StreamKey) -> anyhow::Result<Seeder> {
        use crowdsurf_peer::{Node, NodeConfig, http, keyfile};
        let Some(listen) = args.listen else { anyhow::bail!("no --listen address") };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("swarm")
            .enable_all()
            .build()
            .context("cannot start the network runtime")?;
        let secret = match &args.node_key {
            Some(path) => keyfile::load_or_create(path).context("node key")?.0,
            None => keyfile::random_secret()?,
        };
        let mut config = NodeConfig::new(crowdsurf_proto::NodeKey::from_secret_bytes(secret), key.id(), listen);
        config.announce = args.announce;
        config.endpoint.max_upload_bytes_per_sec = args.max_upload;
        config.swarm.role = crowdsurf_proto::wire::Role::Origin;
        config.swarm.origin_pay_back = args.strict_upload;
        let _guard = runtime.enter();
        let (node, handle) = Node::bind(config).with_context(|| format!("cannot listen on {listen}"))?;
        let ticket = node.ticket();
        println!("ticket: {ticket}");
        if let Some(path) = &args.ticket_file {
            std::fs::write(path, format!("{ticket}\n")).with_context(|| format!("cannot write {}", path.display()))?;
        }
        let http = match args.http {
            Some(addr) => {
                let listener =
                    runtime.block_on(http::bind(addr)).with_context(|| format!("cannot listen for HTTP on {addr}"))?;
                Some(runtime.spawn(http::serve(listener, handle.stats_cell())))
            }
            None => None,
        };
        let node = runtime.spawn(node.run());
        Ok(Seeder { runtime, handle, node, http })
    }

    /// Gives the last chunks a moment to reach the first tier, says goodbye, and stops.
    fn finish(self) {
        std::thread::sleep(Duration::from_millis(500));
        self.handle.shutdown();
        if let Ok(Err(e)) = self.runtime.block_on(self.node) {
            tracing::warn!(error = %e, "origin node ended with an error");
        }
        if let Some(h) = self.http {
            h.abort();
        }
        let s = self.handle.stats();
        tracing::info!(
            published = s.counters.published,
            uploaded_bytes = s.counters.chunk_bytes_up,
            neighbours = s.neighbours,
            "origin stopped"
        );
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause the message above already quotes.
fn one_line(e: &anyhow::Error) -> String {
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
    line
}

fn real_main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    ffmpeg_next::util::log::set_level(ffmpeg_log_level(&args.ffmpeg_log)?);
    let config = config(&args)?;
    let key = load_or_create_key(&args.key).context("stream key")?;
    println!("stream id: {}", key.id());

    let seeder = args.listen.is_some().then(|| Seeder::start(&args, &key)).transpose()?;
    let origin = seeder.as_ref().map(|s| s.handle.clone());

    let mut record = args.record.as_ref().map(RecordSink::create).transpose().context("--record")?;
    let mut chunks_dir = args.chunks_dir.as_ref().map(ChunksDirSink::create).transpose().context("--chunks-dir")?;
    let mut sink = |chunk: Verified| -> Result<(), SinkError> {
        if let Some(r) = &mut record {
            r.write(&chunk)?;
        }
        if let Some(d) = &mut chunks_dir {
            d.write(&chunk)?;
        }
        if let Some(origin) = &origin
            && !origin.publish(chunk)
        {
            return Err(SinkError::Closed);
        }
        Ok(())
    };

    let stop = Arc::new(AtomicBool::new(false));
    install_ctrl_c(&stop);
    let result = run(&config, &key, &mut sink, &stop);
    if let Some(seeder) = seeder {
        seeder.finish();
    }
    let summary = result?;
    let ms = |d: Option<Duration>| d.map_or_else(|| "-".to_string(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0));
    println!(
        "summary: end={:?} chunks={} (random access {}) bytes={} seq={}..{} media={:.2}s wall={:.2}s video_frames={} \
         audio_frames={} skipped={} stalls={} delay_ms median={} p90={} max={} encoder_fps={}",
        summary.end,
        summary.chunks,
        summary.random_access_chunks,
        summary.bytes,
        summary.first_seq,
        summary.next_seq,
        summary.media_duration.as_secs_f64(),
        summary.wall_time.as_secs_f64(),
        summary.video_frames_out,
        summary.audio_frames_out,
        summary.skipped_packets,
        summary.stalls,
        ms(summary.delay_median),
        ms(summary.delay_p90),
        ms(summary.delay_max),
        summary.encoder_fps.map_or_else(|| "-".to_string(), |f| format!("{f:.0}")),
    );
    if summary.end == EndReason::InputEnded && !matches!(config.input, Input::File { .. }) {
        eprintln!("error: input {} ended", config.input.describe());
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C (SIGINT) and SIGTERM set the stop flag: the broadcast flushes its last chunk and ends.
fn install_ctrl_c(stop: &Arc<AtomicBool>) {
    let stop = Arc::clone(stop);
    // A tiny signal watcher without extra dependencies: tokio's signal support is in the workspace.
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        rt.block_on(async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
                else {
                    return;
                };
                for first in [true, false] {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    if first {
                        tracing::info!("stopping: flushing the last chunk (again to quit at once)");
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                std::process::exit(130);
            }
            #[cfg(not(unix))]
            {
                let _ = tokio::signal::ctrl_c().await;
                stop.store(true, Ordering::Relaxed);
            }
        });
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no signal handling: Ctrl-C will not flush the last chunk");
    }
}
