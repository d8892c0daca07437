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

    /// Seconds without input data before the input counts as stalled.
    #[arg(long, env = "CROWDSURF_STALL_TIMEOUT", default_value_t = 5.0)]
    stall_timeout: f64,

    /// Seconds between stats lines in the log.
    #[arg(long, default_value_t = 5.0)]
    stats_interval: f64,

    /// Write the concatenated chunk payloads here (a plain .ts file).
    #[arg(long, env = "CROWDSURF_RECORD")]
    record: Option<PathBuf>,

    /// Write each signed chunk (header + signature + payload) to its own file here.
    #[arg(long, env = "CROWDSURF_CHUNKS_DIR")]
    chunks_dir: Option<PathBuf>,

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
        stats_interval: seconds("stats-interval", args.stats_interval)?,
    })
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

    let mut record = args.record.as_ref().map(RecordSink::create).transpose().context("--record")?;
    let mut chunks_dir = args.chunks_dir.as_ref().map(ChunksDirSink::create).transpose().context("--chunks-dir")?;
    let mut sink = |chunk: Verified| -> Result<(), SinkError> {
        if let Some(r) = &mut record {
            r.write(&chunk)?;
        }
        if let Some(d) = &mut chunks_dir {
            d.write(&chunk)?;
        }
        Ok(())
    };

    let stop = Arc::new(AtomicBool::new(false));
    install_ctrl_c(&stop);
    let summary = run(&config, &key, &mut sink, &stop)?;
    let ms = |d: Option<Duration>| d.map_or_else(|| "-".to_string(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0));
    println!(
        "summary: end={:?} chunks={} (random access {}) bytes={} seq={}..{} media={:.2}s wall={:.2}s video_frames={} \
         audio_frames={} skipped={} delay_ms median={} p90={} max={} encoder_fps={}",
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
