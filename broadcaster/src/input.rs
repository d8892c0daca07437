//! Opening the media source: the built-in test source (an FFmpeg lavfi graph), a file, a URL or a
//! device, with an interrupt callback that ends blocking reads when the caller asks to stop, when a URL
//! does not answer within the open timeout, or when a stall of an open input outlasts the give-up time.

use std::ffi::CString;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ffmpeg::{Dictionary, format};
use ffmpeg_next as ffmpeg;

use crate::BroadcastError;
use crate::config::{Config, Input};

/// The read deadline shared with FFmpeg's interrupt callback, and the stall watch of the current read.
///
/// A read that blocks past the stall threshold is a **stall**: the callback logs it (once per stall)
/// and lets the read go on blocking, so the input is not torn down and the swarm stays up; only the
/// give-up deadline (or the stop flag) interrupts it. The caller learns afterwards how long the read
/// blocked ([`Deadline::end_read`]), which also works for inputs opened without the callback.
#[derive(Debug, Clone)]
pub(crate) struct Deadline {
    base: Instant,
    /// Interrupt once past this, ms since `base`; 0: never.
    at_ms: Arc<AtomicU64>,
    /// When the current read began, ms since `base` + 1; 0: no read in progress.
    read_since_ms: Arc<AtomicU64>,
    /// A read blocked this long is a stall, ms; 0: no stall watch.
    stall_ms: Arc<AtomicU64>,
    /// Whether the current stall has been logged.
    warned: Arc<AtomicBool>,
}

impl Deadline {
    fn new() -> Self {
        Deadline {
            base: Instant::now(),
            at_ms: Arc::new(AtomicU64::new(0)),
            read_since_ms: Arc::new(AtomicU64::new(0)),
            stall_ms: Arc::new(AtomicU64::new(0)),
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Reads from now on must finish within `within` (`None`: no limit).
    pub(crate) fn arm(&self, within: Option<Duration>) {
        let at = within.map_or(0, |d| (self.base.elapsed() + d).as_millis().max(1) as u64);
        self.at_ms.store(at, Ordering::Relaxed);
    }

    /// A read begins: past `stall` it counts as a stall (logged, not interrupted); past `give_up`
    /// (`None`: never) it is interrupted.
    pub(crate) fn begin_read(&self, stall: Duration, give_up: Option<Duration>) {
        self.stall_ms.store(stall.as_millis() as u64, Ordering::Relaxed);
        self.warned.store(false, Ordering::Relaxed);
        self.read_since_ms.store(self.now_ms() + 1, Ordering::Relaxed);
        self.arm(give_up);
    }

    /// The read ended. Returns how long it blocked if that was a stall.
    pub(crate) fn end_read(&self) -> Option<Duration> {
        self.arm(None);
        let since = self.read_since_ms.swap(0, Ordering::Relaxed);
        let stall = self.stall_ms.load(Ordering::Relaxed);
        let blocked = self.now_ms().saturating_sub(since.saturating_sub(1));
        (since != 0 && stall != 0 && blocked >= stall).then(|| Duration::from_millis(blocked))
    }

    /// Whether the deadline has passed.
    pub(crate) fn expired(&self) -> bool {
        let at = self.at_ms.load(Ordering::Relaxed);
        at != 0 && self.base.elapsed().as_millis() as u64 > at
    }

    /// What the interrupt callback asks: logs a stall once, and says whether to interrupt.
    fn poll(&self, input: &str) -> bool {
        let since = self.read_since_ms.load(Ordering::Relaxed);
        let stall = self.stall_ms.load(Ordering::Relaxed);
        if since != 0 && stall != 0 {
            let blocked = self.now_ms().saturating_sub(since - 1);
            if blocked >= stall && !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    input,
                    after_s = blocked as f64 / 1000.0,
                    "input stalled: no data; the stream stays up and waits for it"
                );
            }
        }
        self.expired()
    }
}

/// An open input.
pub(crate) struct Opened {
    pub(crate) ctx: format::context::Input,
    pub(crate) deadline: Deadline,
    /// Read at the pace of the timestamps (files), not as fast as possible.
    pub(crate) paced: bool,
    pub(crate) looped: bool,
}

/// The lavfi graph of the built-in test source at `width`x`height`, `fps`, with or without the burned-in
/// clock text (drawtext needs FreeType and a font).
pub(crate) fn test_source_graph(width: u32, height: u32, fps: u32, text: bool) -> String {
    let mut video = format!(
        "testsrc2=size={width}x{height}:rate={fps},realtime,format=yuv420p,\
         drawbox=enable='lt(mod(t\\,1)\\,0.1)':x=0:y=0:w=iw:h=ih/8:color=white:t=fill"
    );
    if text {
        video.push_str(
            ",drawtext=font=Mono:fontsize=h/14:fontcolor=white:box=1:boxcolor=black@0.6:x=w/40:y=h/6:\
             text='%{gmtime\\:%H\\\\\\:%M\\\\\\:%S}.%{eif\\:mod(floor(time(0)*1000)\\,1000)\\:d\\:3} UTC  \
             frame %{frame_num}'",
        );
    }
    let audio = "aevalsrc=exprs='0.1*sin(2*PI*440*t)*gte(mod(t\\,1)\\,0.1)+0.5*sin(2*PI*1000*t)*lt(mod(t\\,1)\\,0.1)'\
                 :s=48000:c=stereo:n=1024,arealtime";
    format!("{video}[out0];{audio}[out1]")
}

/// Finds an FFmpeg demuxer or input device by name.
#[allow(unsafe_code)]
fn find_input_format(name: &str) -> Option<format::format::Input> {
    let cname = CString::new(name).ok()?;
    // SAFETY: `av_find_input_format` reads the NUL-terminated name and returns either null or a pointer
    // to a static, immutable demuxer description that lives as long as the process; `Input::wrap`
    // only stores that pointer.
    unsafe {
        let ptr = ffmpeg::ffi::av_find_input_format(cname.as_ptr());
        if ptr.is_null() { None } else { Some(format::format::Input::wrap(ptr as *mut _)) }
    }
}

fn dictionary(options: &[(String, String)]) -> Dictionary<'static> {
    let mut dict = Dictionary::new();
    for (k, v) in options {
        dict.set(k, v);
    }
    dict
}

/// Opens the configured input.
pub(crate) fn open(config: &Config, stop: &Arc<AtomicBool>) -> Result<Opened, BroadcastError> {
    let deadline = Deadline::new();
    let describe = config.input.describe();
    let open_error = |source: ffmpeg::Error| BroadcastError::OpenInput { input: describe.clone(), source };
    match &config.input {
        Input::TestSource => {
            let (w, h) = config.video.size.unwrap_or((1280, 720));
            let fps = config.video.fps.unwrap_or(30);
            if find_input_format("lavfi").is_none() {
                return Err(BroadcastError::MissingComponent("lavfi input device"));
            }
            let with_text = ffmpeg::filter::find("drawtext").is_some();
            let open = |text: bool| {
                let graph = test_source_graph(w, h, fps, text);
                let lavfi = find_input_format("lavfi").ok_or(ffmpeg::Error::DemuxerNotFound)?;
                format::open_with(&graph, &ffmpeg::Format::Input(lavfi), dictionary(&config.input_options))
            };
            let ctx = match open(with_text) {
                Ok(ctx) => ctx,
                Err(e) if with_text => {
                    tracing::warn!(error = %e, "test source without the burned-in clock (drawtext or its font failed)");
                    open(false).map_err(open_error)?
                }
                Err(e) => return Err(open_error(e)),
            };
            if !with_text {
                tracing::warn!("FFmpeg has no drawtext filter: the test source shows no clock text");
            }
            let ctx = match ctx {
                format::context::Context::Input(ctx) => ctx,
                format::context::Context::Output(_) => return Err(BroadcastError::MissingComponent("lavfi input")),
            };
            Ok(Opened { ctx, deadline, paced: false, looped: false })
        }
        Input::File { path, looped } => {
            let text = path.to_str().ok_or_else(|| BroadcastError::BadInput {
                input: describe.clone(),
                reason: "the path is not valid UTF-8".into(),
            })?;
            match std::fs::metadata(path) {
                Err(e) => return Err(BroadcastError::InputFile { input: describe.clone(), source: e }),
                Ok(m) if m.is_dir() => {
                    return Err(BroadcastError::BadInput { input: describe.clone(), reason: "is a directory".into() });
                }
                Ok(_) => {}
            }
            if let Err(e) = std::fs::File::open(path) {
                return Err(BroadcastError::InputFile { input: describe.clone(), source: e });
            }
            let ctx = open_with_format(text, config, &deadline, stop, None).map_err(open_error)?;
            Ok(Opened { ctx, deadline, paced: true, looped: *looped })
        }
        Input::Url(url) => {
            let timeout = if config.is_listener() { None } else { config.open_timeout };
            let ctx = open_with_format(url, config, &deadline, stop, timeout).map_err(|source| {
                if matches!(source, ffmpeg::Error::Exit) && deadline.expired() {
                    BroadcastError::OpenTimeout { input: describe.clone(), after: timeout.unwrap_or_default() }
                } else {
                    open_error(source)
                }
            })?;
            Ok(Opened { ctx, deadline, paced: false, looped: false })
        }
    }
}

fn open_with_format(
    target: &str,
    config: &Config,
    deadline: &Deadline,
    stop: &Arc<AtomicBool>,
    open_timeout: Option<Duration>,
) -> Result<format::context::Input, ffmpeg::Error> {
    let options = dictionary(&config.input_options);
    if let Some(name) = &config.input_format {
        let Some(fmt) = find_input_format(name) else {
            return Err(ffmpeg::Error::DemuxerNotFound);
        };
        return match format::open_with(target, &ffmpeg::Format::Input(fmt), options)? {
            format::context::Context::Input(ctx) => Ok(ctx),
            format::context::Context::Output(_) => Err(ffmpeg::Error::DemuxerNotFound),
        };
    }
    let stop = Arc::clone(stop);
    let watch = deadline.clone();
    let input = config.input.describe();
    deadline.arm(open_timeout);
    let ctx = format::input_with_interrupt_and_dictionary(
        target,
        move || stop.load(Ordering::Relaxed) || watch.poll(&input),
        options,
    )?;
    deadline.arm(None);
    Ok(ctx)
}
