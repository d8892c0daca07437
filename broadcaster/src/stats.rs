//! Running statistics: what the log says every few seconds and what [`crate::Summary`] reports.

use std::time::{Duration, Instant};

/// Counters for the whole run and for the current log window.
#[derive(Debug)]
pub(crate) struct Stats {
    started: Instant,
    interval: Duration,
    pub(crate) video_in: u64,
    pub(crate) audio_in: u64,
    pub(crate) video_out: u64,
    pub(crate) audio_out: u64,
    pub(crate) skipped: u64,
    pub(crate) stalls: u64,
    pub(crate) encode_busy: Duration,
    pub(crate) encode_frames: u64,
    pub(crate) chunks: u64,
    pub(crate) ra_chunks: u64,
    pub(crate) bytes: u64,
    pub(crate) delays_us: Vec<u64>,
    pub(crate) media_us: i64,
    window: Window,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    media_start_us: i64,
    video_in: u64,
    encode_busy: Duration,
    encode_frames: u64,
    chunks: u64,
    bytes: u64,
    max_chunk: usize,
    delays_us: Vec<u64>,
}

impl Window {
    fn new(now: Instant, media_us: i64) -> Self {
        Window {
            start: now,
            media_start_us: media_us,
            video_in: 0,
            encode_busy: Duration::ZERO,
            encode_frames: 0,
            chunks: 0,
            bytes: 0,
            max_chunk: 0,
            delays_us: Vec::new(),
        }
    }
}

/// The median of `values` (sorted in place), or `None` if empty.
pub(crate) fn percentile(values: &mut [u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((values.len() - 1) as f64 * p).round() as usize;
    values.get(rank.min(values.len() - 1)).copied()
}

impl Stats {
    pub(crate) fn new(interval: Duration) -> Self {
        let now = Instant::now();
        Stats {
            started: now,
            interval,
            video_in: 0,
            audio_in: 0,
            video_out: 0,
            audio_out: 0,
            skipped: 0,
            stalls: 0,
            encode_busy: Duration::ZERO,
            encode_frames: 0,
            chunks: 0,
            ra_chunks: 0,
            bytes: 0,
            delays_us: Vec::new(),
            media_us: 0,
            window: Window::new(now, 0),
        }
    }

    pub(crate) fn wall_time(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn video_frame_in(&mut self) {
        self.video_in += 1;
        self.window.video_in += 1;
    }

    pub(crate) fn encoded(&mut self, frames: u64, busy: Duration) {
        self.encode_busy += busy;
        self.encode_frames += frames;
        self.window.encode_busy += busy;
        self.window.encode_frames += frames;
    }

    pub(crate) fn chunk(&mut self, len: usize, delay_us: Option<u64>, random_access: bool) {
        self.chunks += 1;
        self.bytes += len as u64;
        if random_access {
            self.ra_chunks += 1;
        }
        self.window.chunks += 1;
        self.window.bytes += len as u64;
        self.window.max_chunk = self.window.max_chunk.max(len);
        if let Some(d) = delay_us {
            self.delays_us.push(d);
            self.window.delays_us.push(d);
        }
    }

    /// Encoder capacity: frames per second of encoder busy time.
    pub(crate) fn encoder_fps(&self) -> Option<f64> {
        (self.encode_frames > 0 && !self.encode_busy.is_zero())
            .then(|| self.encode_frames as f64 / self.encode_busy.as_secs_f64())
    }

    /// Logs the window if it is due.
    pub(crate) fn maybe_log(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.window.start);
        if elapsed < self.interval {
            return;
        }
        let secs = elapsed.as_secs_f64();
        let w = &mut self.window;
        let encode_fps = if w.encode_frames > 0 && !w.encode_busy.is_zero() {
            w.encode_frames as f64 / w.encode_busy.as_secs_f64()
        } else {
            0.0
        };
        let speed = (self.media_us - w.media_start_us) as f64 / 1e6 / secs;
        let delay_median_ms = percentile(&mut w.delays_us, 0.5).map(|d| d as f64 / 1000.0).unwrap_or(0.0);
        let avg_chunk_kb = if w.chunks > 0 { w.bytes as f64 / w.chunks as f64 / 1024.0 } else { 0.0 };
        tracing::info!(
            input_fps = format_args!("{:.1}", w.video_in as f64 / secs),
            encoder_fps = format_args!("{encode_fps:.0}"),
            speed = format_args!("{speed:.2}x"),
            chunks_per_s = format_args!("{:.2}", w.chunks as f64 / secs),
            avg_chunk_kb = format_args!("{avg_chunk_kb:.1}"),
            max_chunk_kb = format_args!("{:.1}", w.max_chunk as f64 / 1024.0),
            kbit_per_s = format_args!("{:.0}", w.bytes as f64 * 8.0 / 1000.0 / secs),
            delay_median_ms = format_args!("{delay_median_ms:.1}"),
            "stats"
        );
        self.window = Window::new(now, self.media_us);
    }
}
