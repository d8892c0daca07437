//! Real-time decoding of the released chunks: an FFmpeg MPEG-TS demuxer fed from memory, H.264 and
//! AAC decoders, display timing and the headless figures.
//!
//! The decoder runs on its own thread (FFmpeg calls block). Chunks arrive from the [`Pacer`] shortly
//! before their deadlines ([`crate::DECODE_LEAD`]) through a channel; a [`FeedReader`] hands their
//! bytes to the demuxer through `ffmpeg::format::context::StreamIo` (custom I/O, no pipe), with the
//! last PES packet of each stream closed ([`crate::pes`]) so that no picture waits in the demuxer for
//! the next chunk.
//!
//! **Runs and gaps.** Decoding happens in *runs*: a run starts at a random-access chunk (PAT/PMT,
//! SPS/PPS and a keyframe) with a fresh demuxer and fresh decoders, and lasts until a gap (a skipped
//! chunk), a discontinuity flagged by the broadcaster, a chunk that fails to demux or decode, or the
//! end of input. The reader then reports end of file to the demuxer, the decoders are drained, and
//! chunks are dropped until the next random-access chunk starts the next run. Nothing restarts the
//! process or the node.
//!
//! **Display timing.** Each video packet is traced back to the chunk it came in (by its byte position
//! in the demuxer's input). The chunk's first frame was captured at the chunk's `capture_us` and is due
//! on screen at the chunk's deadline (capture + latency); a later frame of the chunk was captured and
//! is due its PTS offset from that first frame later. A frame is *presented* at `max(decoded_at, due)`:
//! the moment it is on screen if the screen shows each picture when due, or the moment it exists if
//! decoding was late. **Display latency** is measured, not derived from the setting: presented minus
//! the frame's own capture time, brought onto our clock with the node's estimate of the origin's
//! clock offset. It comes out above the configured latency by however late the frame was (a late
//! chunk, a deadline pushed back to keep releases in order, slow decoding, a demuxer holding a
//! packet back), and never below it.
//!
//! [`Pacer`]: crate::pacer::Pacer

use std::collections::VecDeque;
use std::io::Read;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use ffmpeg_next as ffmpeg;
use hdrhistogram::Histogram;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::pacer::{Playout, Released};
use crate::pes::close_last_pes;

/// Wall clock, µs since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Where decoded frames go besides the statistics (the window).
pub trait FrameSink: Send {
    /// A decoded video frame, due on screen at `due_us` (wall clock, µs), captured at `capture_us`
    /// (on the same clock).
    fn video(&mut self, frame: &ffmpeg::frame::Video, due_us: u64, capture_us: u64);
    /// A decoded audio frame, due at the speaker at `due_us` (wall clock, µs).
    fn audio(&mut self, frame: &ffmpeg::frame::Audio, due_us: u64);
    /// A run ended (gap or error): drop queued media.
    fn reset(&mut self) {}
}

/// Settings of the decoder thread.
pub struct DecoderOptions {
    /// The configured playback latency, µs.
    pub latency_us: u64,
    /// When the player started (for the startup time).
    pub start: Instant,
    /// Optional destination for frames (the window).
    pub sink: Option<Box<dyn FrameSink>>,
}

/// The headless figures, as written by `--stats-json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DecodeReport {
    /// Video frames decoded and presented by the end of the run.
    pub frames_decoded: u64,
    /// Frames the stream's frame rate promises over the time played (first frame to the end).
    pub frames_expected: u64,
    /// `frames_decoded / frames_expected`.
    pub frames_ratio: f64,
    /// The stream's video frame rate, frames per second.
    pub frame_rate: f64,
    /// Audio frames decoded.
    pub audio_frames_decoded: u64,
    /// Chunks the node skipped (missed their deadline).
    pub chunks_skipped: u64,
    /// Chunks handed to the decoder (shortly before their deadline).
    pub chunks_played: u64,
    /// Chunks dropped while waiting for a random-access chunk (after start, a gap or an error).
    pub chunks_dropped_waiting: u64,
    /// Times the picture froze for more than three frame durations (or 200 ms).
    pub stalls: u64,
    /// Packets or runs that failed to demux/decode (each resumes at the next random-access chunk).
    pub decode_errors: u64,
    /// Decoding runs started (1 + restarts after gaps, discontinuities or errors).
    pub runs: u64,
    /// Start of the player to its first presented video frame (decoded and due), seconds.
    pub startup_s: Option<f64>,
    /// Capture time to presentation, per video frame.
    pub display_latency: Latency,
    /// Video size, e.g. "320x240".
    pub video_size: Option<String>,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
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

#[derive(Debug)]
struct Figures {
    latency: Histogram<u64>,
    frames: u64,
    audio_frames: u64,
    recent_presented: VecDeque<u64>,
    first_presented_us: Option<u64>,
    last_presented_us: Option<u64>,
    frame_rate: f64,
    chunks_skipped: u64,
    chunks_played: u64,
    dropped_waiting: u64,
    stalls: u64,
    decode_errors: u64,
    runs: u64,
    startup: Option<Duration>,
    video_size: Option<String>,
}

/// Shared, live view of the decoder's figures. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DecodeStats(Arc<Mutex<Figures>>);

impl Default for DecodeStats {
    fn default() -> Self {
        // 1 µs .. 1 h, 3 significant digits: cannot fail for these bounds.
        #[allow(clippy::expect_used)]
        let latency = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid");
        DecodeStats(Arc::new(Mutex::new(Figures {
            latency,
            frames: 0,
            audio_frames: 0,
            recent_presented: VecDeque::new(),
            first_presented_us: None,
            last_presented_us: None,
            frame_rate: 0.0,
            chunks_skipped: 0,
            chunks_played: 0,
            dropped_waiting: 0,
            stalls: 0,
            decode_errors: 0,
            runs: 0,
            startup: None,
            video_size: None,
        })))
    }
}

impl DecodeStats {
    fn lock(&self) -> MutexGuard<'_, Figures> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The figures as of wall-clock `end_us`: frames due after it are not counted, and the time played
    /// runs from the first presented frame to it.
    pub fn report(&self, end_us: u64) -> DecodeReport {
        let f = self.lock();
        let late = f.recent_presented.iter().filter(|&&t| t > end_us).count() as u64;
        let decoded = f.frames.saturating_sub(late);
        let played_s = f.first_presented_us.map_or(0.0, |first| end_us.saturating_sub(first) as f64 / 1e6);
        let expected = (played_s * f.frame_rate).round() as u64;
        let q = |p: f64| f.latency.value_at_quantile(p) as f64 / 1000.0;
        DecodeReport {
            frames_decoded: decoded,
            frames_expected: expected,
            frames_ratio: if expected > 0 { decoded as f64 / expected as f64 } else { 0.0 },
            frame_rate: f.frame_rate,
            audio_frames_decoded: f.audio_frames,
            chunks_skipped: f.chunks_skipped,
            chunks_played: f.chunks_played,
            chunks_dropped_waiting: f.dropped_waiting,
            stalls: f.stalls,
            decode_errors: f.decode_errors,
            runs: f.runs,
            startup_s: f.startup.map(|d| d.as_secs_f64()),
            display_latency: Latency {
                count: f.latency.len(),
                p50_ms: q(0.5),
                p90_ms: q(0.9),
                p99_ms: q(0.99),
                max_ms: f.latency.max() as f64 / 1000.0,
            },
            video_size: f.video_size.clone(),
        }
    }

    /// Frames presented so far and the current display latency median, for status lines.
    pub fn brief(&self) -> (u64, f64) {
        let f = self.lock();
        (f.frames, f.latency.value_at_quantile(0.5) as f64 / 1000.0)
    }

    fn presented(&self, presented_us: u64, latency_us: u64) {
        let mut f = self.lock();
        f.frames += 1;
        let _ = f.latency.record(latency_us.max(1));
        f.first_presented_us.get_or_insert(presented_us);
        if let Some(last) = f.last_presented_us {
            let frame_us = if f.frame_rate > 0.0 { 1e6 / f.frame_rate } else { 40_000.0 };
            let gap = presented_us.saturating_sub(last) as f64;
            if gap > (3.0 * frame_us).max(200_000.0) {
                f.stalls += 1;
                debug!(gap_ms = gap / 1000.0, "picture stalled");
            }
        }
        f.last_presented_us = Some(presented_us.max(f.last_presented_us.unwrap_or(0)));
        f.recent_presented.push_back(presented_us);
        while f.recent_presented.len() > 256 {
            f.recent_presented.pop_front();
        }
    }
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    /// A chunk was skipped.
    Gap,
    /// A chunk needs a fresh demuxer (discontinuity); it is stashed to start the next run.
    Discontinuity,
    /// Demuxing or decoding failed.
    Error,
    /// The broadcaster's last chunk was read: flush everything (nothing follows to push the last
    /// picture out of the demuxer).
    EndOfStream,
    /// The pacer is gone: the player is stopping.
    Closed,
}

/// The channel end and the bytes in flight, shared by the run loop and the demuxer's reader.
struct Feed {
    rx: Receiver<Playout>,
    pending: Bytes,
    /// Bytes handed to the demuxer in this run so far (including `pending`).
    taken: u64,
    /// Where each chunk of this run starts in the demuxer's byte stream, newest last.
    marks: VecDeque<Mark>,
    end: Option<RunEnd>,
    stash: Option<Arc<Released>>,
    /// Pictures decoded in this run: a run that reaches the next random-access chunk without one is
    /// stuck on bad data and is restarted there.
    pictures_in_run: u64,
    stats: DecodeStats,
}

/// One chunk's place in the demuxer's byte stream and its timing.
#[derive(Debug, Clone, Copy)]
struct Mark {
    start: u64,
    deadline_us: u64,
    capture_local_us: u64,
    first_video_pts: Option<i64>,
}

impl Mark {
    fn of(chunk: &Released, start: u64) -> Self {
        Mark { start, deadline_us: chunk.deadline_us, capture_local_us: chunk.capture_local_us, first_video_pts: None }
    }
}

/// When a frame is due on screen and when it was captured, our wall clock, µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameTimes {
    due_us: u64,
    capture_us: u64,
}

impl Feed {
    fn push_mark(&mut self, mark: Mark) {
        self.marks.push_back(mark);
        while self.marks.len() > 64 {
            self.marks.pop_front();
        }
    }
}

/// Hands released chunks to FFmpeg's demuxer; reports end of file at the end of a run.
struct FeedReader(Arc<Mutex<Feed>>);

impl Read for FeedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut feed = self.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if !feed.pending.is_empty() {
                let n = buf.len().min(feed.pending.len());
                buf[..n].copy_from_slice(&feed.pending[..n]);
                feed.pending.advance(n);
                return Ok(n);
            }
            if feed.end.is_some() {
                return Ok(0);
            }
            match feed.rx.recv() {
                Ok(Playout::Gap { seq }) => {
                    feed.stats.lock().chunks_skipped += 1;
                    debug!(seq, "gap: ending the decoding run");
                    feed.end = Some(RunEnd::Gap);
                }
                Ok(Playout::Chunk(chunk)) if chunk.breaks_continuity() => {
                    feed.stash = Some(chunk);
                    feed.end = Some(RunEnd::Discontinuity);
                }
                Ok(Playout::Chunk(chunk)) if chunk.random_access && feed.pictures_in_run == 0 => {
                    debug!(seq = chunk.seq, "a whole GOP without a picture: restarting at this chunk");
                    feed.stash = Some(chunk);
                    feed.end = Some(RunEnd::Error);
                }
                Ok(Playout::Chunk(chunk)) => {
                    tracing::trace!(
                        seq = chunk.seq,
                        bytes = chunk.payload.len(),
                        after_deadline_ms = now_us().saturating_sub(chunk.deadline_us) as f64 / 1000.0,
                        "chunk to the demuxer"
                    );
                    feed.stats.lock().chunks_played += 1;
                    feed.pending = close_last_pes(&chunk.payload);
                    let start = feed.taken;
                    feed.taken += feed.pending.len() as u64;
                    feed.push_mark(Mark::of(&chunk, start));
                    if chunk.end_of_stream {
                        feed.end = Some(RunEnd::EndOfStream);
                    }
                }
                Err(_) => feed.end = Some(RunEnd::Closed),
            }
        }
    }
}

/// Starts the decoder thread. It ends when the sending side of `rx` is dropped.
pub fn spawn(
    rx: Receiver<Playout>,
    options: DecoderOptions,
) -> std::io::Result<(std::thread::JoinHandle<()>, DecodeStats)> {
    let stats = DecodeStats::default();
    let feed = Arc::new(Mutex::new(Feed {
        rx,
        pending: Bytes::new(),
        taken: 0,
        marks: VecDeque::new(),
        end: None,
        stash: None,
        pictures_in_run: 0,
        stats: stats.clone(),
    }));
    let thread_stats = stats.clone();
    let handle = std::thread::Builder::new()
        .name("decoder".into())
        .spawn(move || Decoder { feed, has_video: false, options, stats: thread_stats }.run())?;
    Ok((handle, stats))
}

struct Decoder {
    feed: Arc<Mutex<Feed>>,
    /// Whether this stream has shown video in any run so far.
    has_video: bool,
    options: DecoderOptions,
    stats: DecodeStats,
}

/// Per-run display clock: maps PTS to wall-clock due and capture times.
struct Anchor {
    times: FrameTimes,
    pts: Option<i64>,
    last_pts: Option<i64>,
    time_base: ffmpeg::Rational,
}

impl Anchor {
    fn new(first: &Released, time_base: ffmpeg::Rational) -> Self {
        Anchor {
            times: FrameTimes { due_us: first.deadline_us, capture_us: first.capture_local_us },
            pts: None,
            last_pts: None,
            time_base,
        }
    }

    fn times(&mut self, pts: i64) -> FrameTimes {
        let anchor_pts = *self.pts.get_or_insert(pts);
        let delta = i128::from(pts - anchor_pts) * i128::from(self.time_base.numerator()) * 1_000_000
            / i128::from(self.time_base.denominator().max(1));
        let at = |t: u64| u64::try_from((i128::from(t) + delta).max(0)).unwrap_or(u64::MAX);
        FrameTimes { due_us: at(self.times.due_us), capture_us: at(self.times.capture_us) }
    }
}

impl Decoder {
    fn feed(&self) -> MutexGuard<'_, Feed> {
        self.feed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(mut self) {
        loop {
            let Some(first) = self.next_start() else { break };
            self.stats.lock().runs += 1;
            let end = self.play_run(&first);
            if let Some(sink) = &mut self.options.sink {
                sink.reset();
            }
            match end {
                RunEnd::Closed => break,
                RunEnd::Gap => {
                    info!(run_from = first.seq, "gap in the stream: resuming at the next random-access chunk")
                }
                RunEnd::Discontinuity => debug!("discontinuity: restarting the demuxer"),
                RunEnd::EndOfStream => info!("end of the stream: decoder flushed"),
                RunEnd::Error => {
                    self.stats.lock().decode_errors += 1;
                    warn!("a chunk failed to decode: skipping to the next random-access chunk");
                }
            }
        }
        debug!("decoder stopped");
    }

    /// Waits for a random-access chunk to start a run at, dropping others.
    fn next_start(&mut self) -> Option<Arc<Released>> {
        let mut feed = self.feed();
        if let Some(chunk) = feed.stash.take()
            && chunk.random_access
        {
            return Some(chunk);
        }
        loop {
            match feed.rx.recv_timeout(Duration::from_secs(3600)) {
                Ok(Playout::Gap { .. }) => feed.stats.lock().chunks_skipped += 1,
                Ok(Playout::Chunk(chunk)) if chunk.random_access => return Some(chunk),
                Ok(Playout::Chunk(_)) => feed.stats.lock().dropped_waiting += 1,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn play_run(&mut self, first: &Released) -> RunEnd {
        {
            let mut feed = self.feed();
            feed.pending = close_last_pes(&first.payload);
            feed.taken = feed.pending.len() as u64;
            feed.marks.clear();
            feed.push_mark(Mark::of(first, 0));
            feed.end = None;
            feed.pictures_in_run = 0;
            if first.end_of_stream {
                feed.end = Some(RunEnd::EndOfStream);
            }
            feed.stats.lock().chunks_played += 1;
        }
        let end = match self.demux_and_decode(first) {
            Ok(()) => None,
            Err(e) => {
                debug!(error = %e, seq = first.seq, "run failed");
                Some(RunEnd::Error)
            }
        };
        let mut feed = self.feed();
        // On an error, later chunks of this run are dropped by `next_start` until a random-access one.
        let end = end.or(feed.end).unwrap_or(RunEnd::Error);
        feed.end = None;
        feed.pending = Bytes::new();
        end
    }

    fn demux_and_decode(&mut self, first: &Released) -> Result<(), ffmpeg::Error> {
        let io = ffmpeg::format::context::StreamIo::from_read_with_capacity(FeedReader(self.feed.clone()), 32 * 1024)?;
        let mut options = ffmpeg::Dictionary::new();
        // Live start-up: read no more than the first chunk or two to learn the streams.
        options.set("probesize", "8192");
        // Chunks carry MPEG-TS and nothing else: never let a damaged start pass for another format.
        options.set("format_whitelist", "mpegts");
        options.set("analyzeduration", "200000");
        // Do not wait for 20 frames to guess the frame rate: the SPS timing info gives it.
        options.set("fpsprobesize", "0");
        // The broadcaster's muxer puts one access unit in each PES packet, so the H.264 parser (which
        // holds every frame back until the next one starts) only adds delay.
        options.set("fflags", "+noparse+nofillin");
        let mut input = ffmpeg::format::input_from_stream(io, None, Some(options))?;
        if input.format().name() != "mpegts"
            || input.streams().best(ffmpeg::media::Type::Video).is_none()
                && input.streams().best(ffmpeg::media::Type::Audio).is_none()
        {
            return Err(ffmpeg::Error::StreamNotFound);
        }
        let video = input.streams().best(ffmpeg::media::Type::Video).map(|s| {
            let rate = if s.avg_frame_rate().numerator() > 0 { s.avg_frame_rate() } else { s.rate() };
            (s.index(), s.time_base(), s.parameters(), rate)
        });
        let audio =
            input.streams().best(ffmpeg::media::Type::Audio).map(|s| (s.index(), s.time_base(), s.parameters()));
        let mut vdec = match &video {
            Some((_, _, params, rate)) => {
                let mut ctx = ffmpeg::codec::context::Context::from_parameters(params.clone())?;
                // Frame threading holds back one frame per extra thread; slices cost no delay.
                ctx.set_threading(ffmpeg::codec::threading::Config {
                    kind: ffmpeg::codec::threading::Type::Slice,
                    count: 0,
                    ..Default::default()
                });
                // Pictures come out as soon as they are decoded (the stream has no B-frames to reorder).
                ctx.set_flags(ffmpeg::codec::Flags::LOW_DELAY);
                let dec = ctx.decoder().video()?;
                let mut f = self.stats.lock();
                if rate.numerator() > 0 && rate.denominator() > 0 {
                    f.frame_rate = f64::from(rate.numerator()) / f64::from(rate.denominator());
                }
                if dec.width() > 0 {
                    f.video_size = Some(format!("{}x{}", dec.width(), dec.height()));
                }
                Some(dec)
            }
            None => None,
        };
        let mut adec = match &audio {
            Some((_, _, params)) => {
                let ctx = ffmpeg::codec::context::Context::from_parameters(params.clone())?;
                Some(ctx.decoder().audio()?)
            }
            None => None,
        };
        let mut vanchor = Anchor::new(first, video.as_ref().map_or(ffmpeg::Rational(1, 90_000), |v| v.1));
        let mut aanchor = Anchor::new(first, audio.as_ref().map_or(ffmpeg::Rational(1, 90_000), |a| a.1));
        // Both media share one clock: anchor audio to the video's first PTS when there is video.
        let vindex = video.as_ref().map(|v| v.0);
        if self.has_video && vindex.is_none() {
            // The stream has pictures, so a start without them is a damaged start.
            return Err(ffmpeg::Error::StreamNotFound);
        }
        self.has_video |= vindex.is_some();
        let aindex = audio.as_ref().map(|a| a.0);
        let mut frame_v = ffmpeg::frame::Video::empty();
        let mut frame_a = ffmpeg::frame::Audio::empty();
        let mut packet = ffmpeg::Packet::empty();
        let mut timing = Timing::default();
        loop {
            match packet.read(&mut input) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => break,
                Err(ffmpeg::Error::InvalidData) => continue,
                Err(e) => return Err(e),
            }
            if Some(packet.stream()) == vindex
                && let Some(dec) = &mut vdec
            {
                if let (Some(pts), Ok(pos)) = (packet.pts(), u64::try_from(packet.position())) {
                    self.note_video_packet(&mut timing, pts, pos, vanchor.time_base);
                }
                tracing::trace!(pts = packet.pts(), pos = packet.position(), "video packet");
                dec.send_packet(&packet)?;
                self.drain_video(dec, &mut frame_v, &mut vanchor, &mut aanchor, &mut timing)?;
            } else if Some(packet.stream()) == aindex
                && let Some(dec) = &mut adec
            {
                dec.send_packet(&packet)?;
                self.drain_audio(dec, &mut frame_a, &mut aanchor, vindex.is_some() && vanchor.pts.is_none())?;
            }
        }
        if let Some(dec) = &mut vdec {
            let _ = dec.send_eof();
            let _ = self.drain_video(dec, &mut frame_v, &mut vanchor, &mut aanchor, &mut timing);
        }
        if let Some(dec) = &mut adec {
            let _ = dec.send_eof();
            let _ = self.drain_audio(dec, &mut frame_a, &mut aanchor, false);
        }
        Ok(())
    }

    fn drain_video(
        &mut self,
        dec: &mut ffmpeg::decoder::Video,
        frame: &mut ffmpeg::frame::Video,
        anchor: &mut Anchor,
        audio_anchor: &mut Anchor,
        timing: &mut Timing,
    ) -> Result<(), ffmpeg::Error> {
        loop {
            match dec.receive_frame(frame) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => return Ok(()),
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::util::error::EAGAIN => return Ok(()),
                Err(e) => return Err(e),
            }
            let now = now_us();
            let Some(pts) = frame.timestamp().or(frame.pts()) else { continue };
            // Due at its own chunk's deadline plus its offset in that chunk; the run's anchor when the
            // packet's position was unknown.
            let times = timing.take(pts).unwrap_or_else(|| anchor.times(pts));
            let due = times.due_us;
            anchor.pts.get_or_insert(pts);
            // Audio follows the pictures' clock.
            audio_anchor.times = times;
            audio_anchor.pts = Some(rescale(pts, anchor.time_base, audio_anchor.time_base));
            if let Some(last) = anchor.last_pts.replace(pts)
                && pts > last
            {
                let mut f = self.stats.lock();
                if f.frame_rate <= 0.0 {
                    // No frame rate in the stream headers: take it from the frame spacing.
                    let tb = anchor.time_base;
                    f.frame_rate = f64::from(tb.denominator()) / (f64::from(tb.numerator()) * (pts - last) as f64);
                }
            }
            let presented = now.max(due);
            // Measured from the frame's capture, not from its deadline: a deadline later than capture +
            // latency (pushed back to keep releases in order) shows here.
            let latency_us = presented.saturating_sub(times.capture_us);
            tracing::trace!(
                pts,
                late_ms = (presented - due) as f64 / 1000.0,
                early_ms = due.saturating_sub(now) as f64 / 1000.0,
                "frame"
            );
            {
                let mut f = self.stats.lock();
                if f.startup.is_none() {
                    // Until the first picture is presented, not merely decoded (decoding runs ahead).
                    let startup = self.options.start.elapsed() + Duration::from_micros(presented - now);
                    f.startup = Some(startup);
                    info!(startup_ms = startup.as_millis() as u64, "first picture presented");
                }
                if f.video_size.is_none() {
                    f.video_size = Some(format!("{}x{}", frame.width(), frame.height()));
                }
            }
            self.stats.presented(presented, latency_us);
            self.feed().pictures_in_run += 1;
            if let Some(sink) = &mut self.options.sink {
                sink.video(frame, due, times.capture_us);
            }
        }
    }

    fn drain_audio(
        &mut self,
        dec: &mut ffmpeg::decoder::Audio,
        frame: &mut ffmpeg::frame::Audio,
        anchor: &mut Anchor,
        before_video: bool,
    ) -> Result<(), ffmpeg::Error> {
        loop {
            match dec.receive_frame(frame) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => return Ok(()),
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::util::error::EAGAIN => return Ok(()),
                Err(e) => return Err(e),
            }
            self.stats.lock().audio_frames += 1;
            if !self.has_video {
                // Audio-only stream: sound is what proves the run is decoding.
                self.feed().pictures_in_run += 1;
            }
            if before_video {
                // Audio ahead of the run's first picture has no clock yet; a player starts on the picture.
                continue;
            }
            let Some(pts) = frame.timestamp().or(frame.pts()) else { continue };
            let due = anchor.times(pts).due_us;
            if let Some(sink) = &mut self.options.sink {
                sink.audio(frame, due);
            }
        }
    }
}

/// Due times of video packets by PTS, from the chunk each packet came in.
#[derive(Debug, Default)]
struct Timing(std::collections::BTreeMap<i64, FrameTimes>);

impl Timing {
    fn take(&mut self, pts: i64) -> Option<FrameTimes> {
        let due = self.0.remove(&pts);
        // Older entries belong to frames the decoder dropped.
        self.0 = self.0.split_off(&pts);
        due
    }
}

impl Decoder {
    /// Records when a video packet is due: its chunk's deadline plus its PTS offset from the chunk's
    /// first video packet.
    fn note_video_packet(&self, timing: &mut Timing, pts: i64, pos: u64, time_base: ffmpeg::Rational) {
        let mut feed = self.feed();
        let Some(mark) = feed.marks.iter_mut().rev().find(|m| m.start <= pos) else { return };
        tracing::trace!(pts, pos, mark_start = mark.start, deadline_us = mark.deadline_us, "video packet's chunk");
        let first = *mark.first_video_pts.get_or_insert(pts);
        let offset_us = rescale(pts - first, time_base, ffmpeg::Rational(1, 1_000_000));
        let at = |t: u64| u64::try_from(i128::from(t) + i128::from(offset_us));
        if let (Ok(due_us), Ok(capture_us)) = (at(mark.deadline_us), at(mark.capture_local_us)) {
            timing.0.insert(pts, FrameTimes { due_us, capture_us });
        }
        if timing.0.len() > 1024 {
            timing.0.pop_first();
        }
    }
}

fn rescale(v: i64, from: ffmpeg::Rational, to: ffmpeg::Rational) -> i64 {
    let num = i128::from(v) * i128::from(from.numerator()) * i128::from(to.denominator());
    let den = i128::from(from.denominator()) * i128::from(to.numerator());
    if den == 0 { v } else { i64::try_from(num / den).unwrap_or(v) }
}
