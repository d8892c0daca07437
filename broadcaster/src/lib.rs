//! crowdsurf-broadcaster: live media in, signed chunks out.
//!
//! [`run`] drives one FFmpeg pipeline on the calling thread: it reads the input ([`config::Input`]: the
//! built-in test source, a file paced at real time, any FFmpeg URL such as an SRT or RTMP listener, or a
//! capture device), encodes H.264 (libx264, zero-latency) and AAC or remuxes H.264/AAC as it is
//! (`copy`), muxes MPEG-TS in memory, cuts it into chunks of about `chunk_duration` at TS packet
//! boundaries ([`chunker`]), signs each chunk with the stream key and hands it to a sink the moment it
//! is signed. The broadcaster's own outputs (`--record`, `--chunks-dir`) are sinks ([`sink`]); the swarm
//! origin is another.
//!
//! ```no_run
//! use std::sync::{Arc, atomic::AtomicBool};
//! use crowdsurf_broadcaster::{Config, load_or_create_key, run, sink::RecordSink};
//!
//! let key = load_or_create_key("stream.key")?;
//! let mut record = RecordSink::create("out.ts")?;
//! let stop = Arc::new(AtomicBool::new(false));
//! let config = Config { duration: Some(std::time::Duration::from_secs(10)), ..Config::default() };
//! let summary = run(&config, &key, &mut |chunk| record.write(&chunk), &stop)?;
//! println!("{} chunks", summary.chunks);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Sequence numbers start at the wall clock in milliseconds unless [`Config::first_seq`] says
//! otherwise, so a restarted broadcaster with the same key never repeats one (see that field).

pub mod chunker;
pub mod config;
mod input;
pub mod keyfile;
mod pipeline;
pub mod sink;
mod stats;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crowdsurf_proto::chunk::Verified;
use crowdsurf_proto::keys::{StreamId, StreamKey};
use ffmpeg_next as ffmpeg;

pub use config::{Config, Input, VideoSettings};
pub use keyfile::{KeyFileError, load_or_create_key};
pub use pipeline::sign_cut;
pub use sink::SinkError;

/// Why a broadcast could not start or could not go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BroadcastError {
    /// The input file is missing or unreadable.
    #[error("cannot read input {input}: {source}")]
    InputFile {
        /// The input.
        input: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The input is unusable before FFmpeg even sees it.
    #[error("bad input {input}: {reason}")]
    BadInput {
        /// The input.
        input: String,
        /// Why.
        reason: String,
    },
    /// FFmpeg could not open the input (unknown format, connection refused, bad URL, …).
    #[error("cannot open input {input}: {source}")]
    OpenInput {
        /// The input.
        input: String,
        /// FFmpeg's error.
        source: ffmpeg::Error,
    },
    /// The input URL did not answer within the open timeout.
    #[error("input {input} did not answer within {after:?}")]
    OpenTimeout {
        /// The input.
        input: String,
        /// The open timeout.
        after: Duration,
    },
    /// The input has neither a video nor an audio stream (or both were switched off).
    #[error("input {input} has no video or audio stream to broadcast")]
    NoMedia {
        /// The input.
        input: String,
    },
    /// No decoder for the input's codec.
    #[error("cannot decode {codec} from {input}: {source}")]
    Decoder {
        /// The input.
        input: String,
        /// The codec's name.
        codec: String,
        /// FFmpeg's error.
        source: ffmpeg::Error,
    },
    /// `copy` was asked for, but the input is not H.264 video / AAC audio.
    #[error("--copy needs H.264 video and AAC audio, but {input} has {found}")]
    CopyNeedsH264Aac {
        /// The input.
        input: String,
        /// The codec found.
        found: String,
    },
    /// An encoder could not be opened with the settings given.
    #[error("cannot open the {what} encoder: {source}")]
    Encoder {
        /// Which encoder.
        what: &'static str,
        /// FFmpeg's error.
        source: ffmpeg::Error,
    },
    /// The system FFmpeg lacks a component the broadcaster needs.
    #[error("FFmpeg lacks the {0}")]
    MissingComponent(&'static str),
    /// Scaling or resampling failed.
    #[error("scaling/resampling failed: {source}")]
    Filter {
        /// FFmpeg's error.
        source: ffmpeg::Error,
    },
    /// The MPEG-TS muxer failed.
    #[error("MPEG-TS muxing failed: {source}")]
    Mux {
        /// FFmpeg's error.
        source: ffmpeg::Error,
    },
    /// No data arrived from the input for the give-up time ([`Config::stall_give_up`]).
    #[error("input {input} stalled: no data for {after:?}; giving up")]
    InputStalled {
        /// The input.
        input: String,
        /// The give-up time.
        after: Duration,
    },
    /// Reading the input failed.
    #[error("reading input {input} failed: {source}")]
    InputRead {
        /// The input.
        input: String,
        /// FFmpeg's error.
        source: ffmpeg::Error,
    },
    /// The configuration is inconsistent.
    #[error("bad configuration: {0}")]
    Config(String),
    /// The sink refused a chunk.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Why a broadcast ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The configured duration of media was sent.
    Duration,
    /// The caller set the stop flag.
    Stopped,
    /// The input ended (end of a file, or the sender hung up).
    InputEnded,
}

/// What a finished broadcast did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The stream id (public key).
    pub stream_id: StreamId,
    /// Why it ended.
    pub end: EndReason,
    /// The first sequence number used.
    pub first_seq: u64,
    /// One past the last sequence number used.
    pub next_seq: u64,
    /// Chunks signed and handed to the sink.
    pub chunks: u64,
    /// Of those, random-access chunks.
    pub random_access_chunks: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Video frames that came out of the decoder (packets, with copy).
    pub video_frames_in: u64,
    /// Video packets muxed.
    pub video_frames_out: u64,
    /// Audio packets muxed.
    pub audio_frames_out: u64,
    /// Input packets skipped as corrupt or undecodable.
    pub skipped_packets: u64,
    /// Input stalls the broadcast rode out (each resumed at a keyframe, flagged discontinuity).
    pub stalls: u64,
    /// Media time covered.
    pub media_duration: Duration,
    /// Wall time of the run.
    pub wall_time: Duration,
    /// Median time from a chunk's first frame leaving the decoder to the chunk being signed.
    pub delay_median: Option<Duration>,
    /// 90th percentile of the same.
    pub delay_p90: Option<Duration>,
    /// Maximum of the same.
    pub delay_max: Option<Duration>,
    /// Video encoder capacity: frames per second of encoder busy time (not with copy).
    pub encoder_fps: Option<f64>,
}

/// Runs a broadcast on the calling thread until the input ends, the configured duration is reached,
/// `stop` is set, or an error. Every chunk goes to `sink` the moment it is signed; the last one is
/// flagged end of stream (also when the input fails, as far as the pipeline can still be flushed).
///
/// `stop` is shared with FFmpeg's interrupt callback, so setting it also ends a blocking read.
pub fn run(
    config: &Config,
    stream_key: &StreamKey,
    sink: &mut dyn FnMut(Verified) -> Result<(), SinkError>,
    stop: &Arc<AtomicBool>,
) -> Result<Summary, BroadcastError> {
    pipeline::run(config, stream_key, sink, stop)
}
