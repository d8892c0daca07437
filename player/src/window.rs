//! The SDL2 window (feature `window`): video scaled to the window, sound resampled to the device,
//! both scheduled by PTS on the player's display clock, a fullscreen key and a status overlay.
//!
//! The decoder thread hands frames to a [`WindowSink`] together with the wall-clock moment each is due
//! (see [`crate::decode`]); the sink copies the picture planes and resamples the sound, and sends both
//! over bounded channels to the window's loop, which runs on the thread that opened the window (SDL
//! wants the main thread). The loop shows the newest picture that is due, queues sound on the device
//! when it is due, and drops what came too late. Keys: F fullscreen, O or Tab overlay, Q or Esc quit.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use ffmpeg_next as ffmpeg;
use sdl2::audio::{AudioQueue, AudioSpecDesired};
use sdl2::event::{Event, WindowEvent};
use sdl2::keyboard::Keycode;
use sdl2::pixels::{Color, PixelFormatEnum};
use sdl2::rect::Rect;
use sdl2::video::FullscreenType;
use tracing::{debug, info, warn};

use crate::StatusLine;
use crate::decode::{FrameSink, now_us};

/// Audio is played at this rate, stereo, 32-bit float.
const AUDIO_RATE: i32 = 48_000;
/// Fonts tried for the overlay, in order.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf",
];

/// Why the window could not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WindowError {
    /// SDL could not start its video part (usually: no display).
    #[error("cannot open a window ({0})")]
    Sdl(String),
}

struct Picture {
    width: u32,
    height: u32,
    planes: [Vec<u8>; 3],
    strides: [usize; 3],
    due_us: u64,
    capture_us: u64,
}

struct Sound {
    samples: Vec<f32>,
    due_us: u64,
}

enum Media {
    Picture(Picture),
    Sound(Sound),
    Reset,
}

/// An open window, before its loop runs.
pub struct Window {
    sdl: sdl2::Sdl,
    canvas: sdl2::render::Canvas<sdl2::video::Window>,
    audio: Option<AudioQueue<f32>>,
    tx: SyncSender<Media>,
    rx: Receiver<Media>,
    status: StatusLine,
}

impl Window {
    /// Opens the window (and the sound device, if there is one). Fails without a display: SDL's
    /// stand-in drivers that show nothing (`offscreen`, `dummy`) count as none unless asked for by
    /// name in `SDL_VIDEODRIVER`.
    pub fn open() -> Result<Window, WindowError> {
        let sdl = sdl2::init().map_err(WindowError::Sdl)?;
        let video = sdl.video().map_err(WindowError::Sdl)?;
        let driver = video.current_video_driver();
        if matches!(driver, "offscreen" | "dummy") && std::env::var_os("SDL_VIDEODRIVER").is_none() {
            return Err(WindowError::Sdl(format!("no display, only SDL's {driver} driver")));
        }
        debug!(driver, "video driver");
        let window = video
            .window("crowdsurf", 960, 540)
            .position_centered()
            .resizable()
            .build()
            .map_err(|e| WindowError::Sdl(e.to_string()))?;
        let canvas = window.into_canvas().present_vsync().build().map_err(|e| WindowError::Sdl(e.to_string()))?;
        let audio = match sdl.audio() {
            Ok(subsystem) => {
                let desired = AudioSpecDesired { freq: Some(AUDIO_RATE), channels: Some(2), samples: Some(1024) };
                match subsystem.open_queue::<f32, _>(None, &desired) {
                    Ok(queue) => {
                        queue.resume();
                        Some(queue)
                    }
                    Err(e) => {
                        warn!(error = %e, "no sound device: playing without sound");
                        None
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "no sound: playing without it");
                None
            }
        };
        let (tx, rx) = sync_channel(256);
        Ok(Window { sdl, canvas, audio, tx, rx, status: StatusLine::default() })
    }

    /// The sink to give the decoder.
    pub fn sink(&self) -> WindowSink {
        let rate = self.audio.as_ref().map_or(AUDIO_RATE, |q| q.spec().freq);
        WindowSink { tx: self.tx.clone(), resampler: None, rate: rate.max(8000) as u32, warned: false }
    }

    /// The status line the player keeps up to date, shown in the overlay.
    pub fn status_line(&self) -> StatusLine {
        self.status.clone()
    }

    /// Runs the window until it is closed (or Q/Esc), or until `stop` is set (the player finished).
    pub fn run(mut self, stop: &std::sync::atomic::AtomicBool) {
        let mut events = match self.sdl.event_pump() {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "no event pump; closing the window");
                return;
            }
        };
        let ttf = sdl2::ttf::init().map_err(|e| warn!(error = %e, "no font rendering; the overlay is off")).ok();
        let font = ttf.as_ref().and_then(|t| FONTS.iter().find_map(|path| t.load_font(path, 18).ok()));
        if ttf.is_some() && font.is_none() {
            warn!("no font found (install fonts-dejavu-core); the overlay is off");
        }
        let creator = self.canvas.texture_creator();
        let mut texture: Option<(sdl2::render::Texture<'_>, u32, u32)> = None;
        let mut pictures: VecDeque<Picture> = VecDeque::new();
        let mut sounds: VecDeque<Sound> = VecDeque::new();
        let mut overlay = true;
        let mut dirty = true;
        let mut last_overlay = 0u64;
        let mut shown = 0u64;
        let mut late_dropped = 0u64;
        // Capture to the moment a picture went to the screen (after `present`), µs.
        let mut on_screen = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).ok();
        let mut presenting: Option<u64> = None;
        info!("window open: F fullscreen, O overlay, Q quit");
        'outer: loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            for event in events.poll_iter() {
                match event {
                    Event::Quit { .. } => break 'outer,
                    Event::KeyDown { keycode: Some(key), .. } => match key {
                        Keycode::Q | Keycode::Escape => break 'outer,
                        Keycode::F => {
                            let w = self.canvas.window_mut();
                            let next = if w.fullscreen_state() == FullscreenType::Off {
                                FullscreenType::Desktop
                            } else {
                                FullscreenType::Off
                            };
                            if let Err(e) = w.set_fullscreen(next) {
                                warn!(error = %e, "cannot switch fullscreen");
                            }
                            dirty = true;
                        }
                        Keycode::O | Keycode::Tab => {
                            overlay = !overlay;
                            dirty = true;
                        }
                        _ => {}
                    },
                    Event::Window { win_event: WindowEvent::Exposed | WindowEvent::SizeChanged(..), .. } => {
                        dirty = true
                    }
                    _ => {}
                }
            }
            while let Ok(m) = self.rx.try_recv() {
                match m {
                    Media::Picture(p) => pictures.push_back(p),
                    Media::Sound(s) => sounds.push_back(s),
                    Media::Reset => {
                        pictures.clear();
                        sounds.clear();
                        if let Some(q) = &self.audio {
                            q.clear();
                        }
                    }
                }
            }
            let now = now_us();
            // Video: the newest picture that is due; older due ones are skipped.
            let mut due_picture = None;
            while pictures.front().is_some_and(|p| p.due_us <= now) {
                if due_picture.replace(pictures.pop_front()).is_some() {
                    late_dropped += 1;
                }
            }
            if let Some(Some(p)) = due_picture {
                let fits = texture.as_ref().is_some_and(|(_, w, h)| *w == p.width && *h == p.height);
                if !fits {
                    texture = creator
                        .create_texture_streaming(PixelFormatEnum::IYUV, p.width, p.height)
                        .map(|t| (t, p.width, p.height))
                        .map_err(|e| warn!(error = %e, "cannot create the video texture"))
                        .ok();
                }
                if let Some((t, _, _)) = &mut texture {
                    let r = t.update_yuv(
                        None,
                        &p.planes[0],
                        p.strides[0],
                        &p.planes[1],
                        p.strides[1],
                        &p.planes[2],
                        p.strides[2],
                    );
                    if let Err(e) = r {
                        debug!(error = %e, "texture update failed");
                    }
                }
                shown += 1;
                presenting = Some(p.capture_us);
                dirty = true;
            }
            // Sound: queue each block when it is due; if the device runs far behind, start over.
            if let Some(q) = &self.audio {
                while sounds.front().is_some_and(|s| s.due_us <= now + 10_000) {
                    if let Some(s) = sounds.pop_front() {
                        let _ = q.queue_audio(&s.samples);
                    }
                }
                let queued_ms = u64::from(q.size()) * 1000 / (8 * q.spec().freq.max(1) as u64);
                if queued_ms > 400 {
                    debug!(queued_ms, "sound fell behind; resynchronising");
                    q.clear();
                }
            } else {
                sounds.retain(|s| s.due_us > now);
            }
            if overlay && now.saturating_sub(last_overlay) > 250_000 {
                last_overlay = now;
                dirty = true;
            }
            if dirty {
                dirty = false;
                self.canvas.set_draw_color(Color::RGB(0, 0, 0));
                self.canvas.clear();
                let (ww, wh) = self.canvas.output_size().unwrap_or((960, 540));
                if let Some((t, w, h)) = &texture {
                    let scale = (f64::from(ww) / f64::from(*w)).min(f64::from(wh) / f64::from(*h));
                    let (dw, dh) = ((f64::from(*w) * scale) as u32, (f64::from(*h) * scale) as u32);
                    let dst = Rect::new(((ww - dw) / 2) as i32, ((wh - dh) / 2) as i32, dw.max(1), dh.max(1));
                    let _ = self.canvas.copy(t, None, dst);
                }
                if overlay && let Some(font) = &font {
                    let status = self.status.lock().map(|s| s.clone()).unwrap_or_default();
                    let mut lines = vec![format!("now {} UTC", utc_clock(now_us()))];
                    lines.extend(status.lines().map(str::to_owned));
                    if texture.is_none() {
                        lines.push("waiting for the stream...".into());
                    }
                    // Bottom left, so the clock a test source burns in at the top stays visible beside it.
                    let rendered: Vec<_> = lines
                        .iter()
                        .filter(|l| !l.is_empty())
                        .filter_map(|line| font.render(line).blended(Color::RGB(255, 255, 255)).ok())
                        .collect();
                    let total: u32 = rendered.iter().map(|s| s.height() + 6).sum();
                    let mut y = wh.saturating_sub(total + 8) as i32;
                    self.canvas.set_blend_mode(sdl2::render::BlendMode::Blend);
                    for surface in rendered {
                        let Ok(t) = creator.create_texture_from_surface(&surface) else { continue };
                        let (w, h) = (surface.width(), surface.height());
                        self.canvas.set_draw_color(Color::RGBA(0, 0, 0, 170));
                        let _ = self.canvas.fill_rect(Rect::new(4, y - 2, w + 8, h + 4));
                        let _ = self.canvas.copy(&t, None, Rect::new(8, y, w, h));
                        y += h as i32 + 6;
                    }
                }
                self.canvas.present();
                if let (Some(capture_us), Some(h)) = (presenting.take(), &mut on_screen) {
                    let _ = h.record(now_us().saturating_sub(capture_us).max(1));
                }
            }
            let next = pictures.front().map_or(10_000, |p| p.due_us.saturating_sub(now_us())).clamp(1_000, 10_000);
            std::thread::sleep(Duration::from_micros(next));
        }
        let q = |p: f64| on_screen.as_ref().map_or(0, |h| h.value_at_quantile(p) / 1000);
        info!(
            shown,
            late_dropped,
            capture_to_screen_p50_ms = q(0.5),
            capture_to_screen_p99_ms = q(0.99),
            "window closed"
        );
    }
}

/// HH:MM:SS.mmm of a wall-clock time in µs.
fn utc_clock(us: u64) -> String {
    let ms = us / 1000;
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}", (s / 3600) % 24, (s / 60) % 60, s % 60, ms % 1000)
}

/// The decoder's side of the window.
pub struct WindowSink {
    tx: SyncSender<Media>,
    resampler: Option<(ffmpeg::software::resampling::Context, ffmpeg::format::Sample, u32)>,
    rate: u32,
    warned: bool,
}

impl WindowSink {
    fn send(&mut self, m: Media) {
        match self.tx.try_send(m) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => debug!("window is behind; dropping a frame"),
        }
    }
}

impl FrameSink for WindowSink {
    fn video(&mut self, frame: &ffmpeg::frame::Video, due_us: u64, capture_us: u64) {
        use ffmpeg::format::Pixel;
        if !matches!(frame.format(), Pixel::YUV420P | Pixel::YUVJ420P) {
            if !self.warned {
                self.warned = true;
                warn!(format = ?frame.format(), "the window shows only 4:2:0 8-bit video; this stream's pictures are skipped");
            }
            return;
        }
        let (w, h) = (frame.width(), frame.height());
        let rows = [h as usize, h.div_ceil(2) as usize, h.div_ceil(2) as usize];
        let mut planes: [Vec<u8>; 3] = Default::default();
        let mut strides = [0usize; 3];
        for i in 0..3 {
            let stride = frame.stride(i);
            let data = frame.data(i);
            let len = (stride * rows[i]).min(data.len());
            planes[i] = data[..len].to_vec();
            strides[i] = stride;
        }
        self.send(Media::Picture(Picture { width: w, height: h, planes, strides, due_us, capture_us }));
    }

    fn audio(&mut self, frame: &ffmpeg::frame::Audio, due_us: u64) {
        let fmt = frame.format();
        let rate = frame.rate();
        if self.resampler.as_ref().is_none_or(|(_, f, r)| *f != fmt || *r != rate) {
            let layout = if frame.channel_layout().bits() != 0 {
                frame.channel_layout()
            } else {
                ffmpeg::ChannelLayout::default(i32::from(frame.channels().max(1)))
            };
            match ffmpeg::software::resampling::Context::get(
                fmt,
                layout,
                rate,
                ffmpeg::format::Sample::F32(ffmpeg::format::sample::Type::Packed),
                ffmpeg::ChannelLayout::STEREO,
                self.rate,
            ) {
                Ok(ctx) => self.resampler = Some((ctx, fmt, rate)),
                Err(e) => {
                    if !self.warned {
                        self.warned = true;
                        warn!(error = %e, "cannot resample the sound; playing without it");
                    }
                    return;
                }
            }
        }
        let Some((ctx, _, _)) = &mut self.resampler else { return };
        let mut out = ffmpeg::frame::Audio::empty();
        if ctx.run(frame, &mut out).is_err() {
            return;
        }
        let n = out.samples() * 2;
        let bytes = out.data(0);
        let samples: Vec<f32> =
            bytes.chunks_exact(4).take(n).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect();
        self.send(Media::Sound(Sound { samples, due_us }));
    }

    fn reset(&mut self) {
        self.send(Media::Reset);
    }
}
