//! The media pipeline on the calling thread: demux → (decode → scale/resample → encode | copy) → mux
//! MPEG-TS in memory → cut → sign → sink.
//!
//! Time: every packet and frame is put on one **media clock** in µs: its timestamp minus the first
//! timestamp the input produced, plus the length of earlier loops of a looped file. Video is encoded at
//! a fixed rate (`pts = round(t · fps)`; frames that land on an already used slot are dropped), audio is
//! resampled to 48 kHz stereo in 1024-sample frames. Every frame remembers the wall-clock time it came
//! out of the decoder (its **capture time**); a chunk carries the capture time of its first frame, and
//! the time from there to the chunk being signed is the ingest-to-signed delay in the stats.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crowdsurf_proto::chunk::{Flags, Verified};
use crowdsurf_proto::keys::StreamKey;
use ffmpeg::channel_layout::ChannelLayout;
use ffmpeg::format::{Pixel, Sample, sample};
use ffmpeg::{Dictionary, Packet, Rational, codec, decoder, encoder, filter, format, frame, media, software};
use ffmpeg_next as ffmpeg;

use crate::chunker::{Chunker, Cut, PacketMeta, annexb_has_sps, is_annexb};
use crate::config::{Config, Input};
use crate::input::{self, Opened};
use crate::sink::SinkError;
use crate::stats::{Stats, percentile};
use crate::{BroadcastError, EndReason, Summary};

const MICROS: Rational = Rational(1, 1_000_000);
const AUDIO_RATE: i32 = 48_000;

/// Wall clock, µs since the Unix epoch.
pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn rescale(value: i64, from: Rational, to: Rational) -> i64 {
    use ffmpeg::Rescale;
    value.rescale(from, to)
}

/// The muxer's output buffer, shared with FFmpeg's custom I/O callback.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The media clock: maps input timestamps to µs since the start of the broadcast.
#[derive(Debug, Default)]
struct Clock {
    zero_us: Option<i64>,
    /// The earliest time seen relative to `zero_us` (another stream may start before the first packet).
    min_raw_us: i64,
    loop_offset_us: i64,
    end_us: i64,
}

impl Clock {
    fn media_us(&mut self, ts: i64, tb: Rational) -> i64 {
        let us = rescale(ts, tb, MICROS);
        let zero = *self.zero_us.get_or_insert(us);
        let raw = us - zero;
        self.min_raw_us = self.min_raw_us.min(raw);
        raw + self.loop_offset_us
    }
    /// Where the next loop of a looped file starts: after everything seen so far, on every stream.
    fn next_loop_offset(&self) -> i64 {
        self.end_us - self.min_raw_us
    }
    fn saw(&mut self, end_us: i64) {
        self.end_us = self.end_us.max(end_us);
    }
}

/// Remembers the capture time of each frame sent to an encoder, by encoder pts.
#[derive(Debug, Default)]
struct Captures(VecDeque<(i64, u64)>);

impl Captures {
    fn push(&mut self, pts: i64, capture_us: u64) {
        self.0.push_back((pts, capture_us));
        if self.0.len() > 1024 {
            self.0.pop_front();
        }
    }
    /// The capture time of the latest frame at or before `pts`.
    fn take(&mut self, pts: i64) -> u64 {
        while self.0.len() > 1 && self.0.get(1).is_some_and(|(p, _)| *p <= pts) {
            self.0.pop_front();
        }
        self.0.front().map_or_else(now_us, |(_, c)| *c)
    }
}

/// Added to every muxed timestamp, so that encoder priming (AAC starts 1024 samples early) and
/// streams that begin before the first packet never make a negative timestamp.
const MUX_OFFSET_US: i64 = 1_000_000;

struct Muxer {
    octx: format::context::Output,
    buf: SharedBuf,
    chunker: Chunker,
    cuts: Vec<Cut>,
    has_video: bool,
    /// Whether the first video keyframe has been written; until then nothing is (a stream starts at a
    /// random-access point).
    started: bool,
}

impl Muxer {
    /// After an interruption of the input: the stale part-chunk from before it is dropped, the next
    /// chunk is flagged discontinuity, and (with video) nothing is written until the next video
    /// keyframe, so the stream resumes at a random-access point. Returns the bytes dropped.
    fn resume_at_keyframe(&mut self) -> usize {
        self.started = false;
        self.chunker.mark_discontinuity()
    }

    /// Writes one packet whose timestamps are in the output stream's time base, starting at 0.
    fn write(&mut self, packet: &mut Packet, meta: &PacketMeta, tb: Rational) -> Result<(), BroadcastError> {
        if !self.started {
            if self.has_video && !(meta.video && meta.key) {
                return Ok(());
            }
            self.started = true;
        }
        let offset = rescale(MUX_OFFSET_US, MICROS, tb);
        packet.set_pts(packet.pts().map(|p| p + offset));
        packet.set_dts(packet.dts().map(|d| d + offset));
        packet.write(&mut self.octx).map_err(|source| BroadcastError::Mux { source })?;
        let bytes = self.buf.take();
        self.chunker.push(&bytes, meta, &mut self.cuts);
        Ok(())
    }
}

/// Signs cuts and hands them to the sink.
struct Signer<'a> {
    key: &'a StreamKey,
    sink: &'a mut dyn FnMut(Verified) -> Result<(), SinkError>,
    next_seq: u64,
}

impl Signer<'_> {
    fn emit(&mut self, cut: Cut, stats: &mut Stats) -> Result<(), BroadcastError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let len = cut.payload.len();
        let random_access = cut.flags.contains(Flags::RANDOM_ACCESS);
        let chunk = Verified::sign(self.key, seq, cut.capture_us, cut.duration_us, cut.flags, cut.payload);
        let signed = now_us();
        let delay = (cut.capture_us > 0).then(|| signed.saturating_sub(cut.capture_us));
        stats.chunk(len, delay, random_access);
        tracing::debug!(seq, len, duration_us = cut.duration_us, flags = cut.flags.bits(), delay_us = ?delay, "chunk");
        (self.sink)(chunk)?;
        Ok(())
    }
}

struct VideoEncode {
    decoder: decoder::Video,
    in_tb: Rational,
    scaler: Option<(software::scaling::Context, (Pixel, u32, u32))>,
    encoder: encoder::Video,
    fps: i64,
    width: u32,
    height: u32,
    last_slot: Option<i64>,
    captures: Captures,
    /// Encode the next frame as a keyframe (the input stalled before it).
    force_key: bool,
}

struct AudioEncode {
    decoder: decoder::Audio,
    in_tb: Rational,
    graph: Option<filter::Graph>,
    encoder: encoder::Audio,
    captures: Captures,
}

struct Copy {
    in_tb: Rational,
    /// Annex B parameter sets to put ahead of keyframes that lack them.
    parameter_sets: Option<Vec<u8>>,
}

enum VideoPath {
    Encode(Box<VideoEncode>),
    Copy(Copy),
}

enum AudioPath {
    Encode(Box<AudioEncode>),
    Copy(Copy),
}

struct Streams {
    video: Option<(usize, usize, VideoPath)>,
    audio: Option<(usize, usize, AudioPath)>,
    video_out_tb: Rational,
    audio_out_tb: Rational,
}

/// Extradata of a stream's codec parameters.
#[allow(unsafe_code)]
fn extradata(params: &codec::Parameters) -> Vec<u8> {
    // SAFETY: `as_ptr` points to the stream's live AVCodecParameters for as long as `params` lives;
    // FFmpeg guarantees `extradata` is either null or `extradata_size` readable bytes.
    unsafe {
        let p = params.as_ptr();
        let data = (*p).extradata;
        let size = (*p).extradata_size;
        if data.is_null() || size <= 0 {
            return Vec::new();
        }
        std::slice::from_raw_parts(data, size as usize).to_vec()
    }
}

fn open_x264(config: &Config, width: u32, height: u32, fps: i64) -> Result<encoder::Video, BroadcastError> {
    let codec = encoder::find_by_name("libx264").ok_or(BroadcastError::MissingComponent("libx264 encoder"))?;
    let err = |source| BroadcastError::Encoder { what: "libx264", source };
    let mut enc = codec::context::Context::new_with_codec(codec).encoder().video().map_err(err)?;
    let fps32 = i32::try_from(fps).unwrap_or(30);
    let kbps = config.video.bitrate_kbps.max(50);
    let gop = ((config.video.keyframe_interval.as_secs_f64() * fps as f64).round() as u32).max(1);
    enc.set_width(width);
    enc.set_height(height);
    enc.set_format(Pixel::YUV420P);
    enc.set_time_base(Rational(1, fps32));
    enc.set_frame_rate(Some(Rational(fps32, 1)));
    enc.set_bit_rate(kbps as usize * 1000);
    enc.set_max_bit_rate(kbps as usize * 1000);
    enc.set_gop(gop);
    enc.set_max_b_frames(0);
    let mut opts = Dictionary::new();
    opts.set("preset", &config.video.preset);
    opts.set("tune", "zerolatency");
    opts.set(
        "x264-params",
        &format!("keyint={gop}:min-keyint={gop}:scenecut=0:vbv-maxrate={kbps}:vbv-bufsize={kbps}:repeat-headers=1"),
    );
    enc.open_with(opts).map_err(err)
}

fn open_aac(config: &Config) -> Result<encoder::Audio, BroadcastError> {
    let codec = encoder::find(codec::Id::AAC).ok_or(BroadcastError::MissingComponent("AAC encoder"))?;
    let err = |source| BroadcastError::Encoder { what: "aac", source };
    let mut enc = codec::context::Context::new_with_codec(codec).encoder().audio().map_err(err)?;
    enc.set_rate(AUDIO_RATE);
    enc.set_channel_layout(ChannelLayout::STEREO);
    enc.set_channels(2);
    enc.set_format(Sample::F32(sample::Type::Planar));
    enc.set_bit_rate(config.audio_bitrate_kbps.max(16) as usize * 1000);
    enc.set_time_base(Rational(1, AUDIO_RATE));
    enc.open_with(Dictionary::new()).map_err(err)
}

fn codec_name(params: &codec::Parameters) -> String {
    params.id().name().to_string()
}

/// Sets up decoders/encoders (or copy) and the output streams.
fn setup(
    config: &Config,
    ictx: &format::context::Input,
    octx: &mut format::context::Output,
) -> Result<Streams, BroadcastError> {
    let input = config.input.describe();
    let video_in = if config.no_video { None } else { ictx.streams().best(media::Type::Video) };
    let audio_in = if config.no_audio { None } else { ictx.streams().best(media::Type::Audio) };
    if video_in.is_none() && audio_in.is_none() {
        return Err(BroadcastError::NoMedia { input });
    }
    let mut streams = Streams { video: None, audio: None, video_out_tb: MICROS, audio_out_tb: MICROS };
    let mut next_out = 0;
    if let Some(ist) = video_in {
        let params = ist.parameters();
        let path = if config.copy {
            if params.id() != codec::Id::H264 {
                return Err(BroadcastError::CopyNeedsH264Aac { input, found: codec_name(&params) });
            }
            let extra = extradata(&params);
            let mut ost =
                octx.add_stream(encoder::find(codec::Id::None)).map_err(|source| BroadcastError::Mux { source })?;
            ost.set_parameters(params);
            let parameter_sets = (is_annexb(&extra) && annexb_has_sps(&extra)).then_some(extra);
            VideoPath::Copy(Copy { in_tb: ist.time_base(), parameter_sets })
        } else {
            let ctx = codec::context::Context::from_parameters(params.clone()).map_err(|source| {
                BroadcastError::Decoder { input: input.clone(), codec: codec_name(&params), source }
            })?;
            let decoder = ctx.decoder().video().map_err(|source| BroadcastError::Decoder {
                input: input.clone(),
                codec: codec_name(&params),
                source,
            })?;
            let default_size = match config.input {
                Input::TestSource => (1280, 720),
                _ => (decoder.width(), decoder.height()),
            };
            let (w, h) = config.video.size.unwrap_or(default_size);
            let (w, h) = (w.max(2) & !1, h.max(2) & !1);
            let fps = match (config.video.fps, &config.input) {
                (Some(f), _) => i64::from(f.max(1)),
                (None, Input::TestSource) => 30,
                (None, _) => {
                    let r = ist.avg_frame_rate();
                    let r = if r.numerator() > 0 && r.denominator() > 0 { r } else { ist.rate() };
                    if r.numerator() > 0 && r.denominator() > 0 {
                        (f64::from(r).round() as i64).clamp(1, 120)
                    } else {
                        30
                    }
                }
            };
            let encoder = open_x264(config, w, h, fps)?;
            let mut ost =
                octx.add_stream(encoder::find(codec::Id::H264)).map_err(|source| BroadcastError::Mux { source })?;
            ost.set_parameters(&encoder);
            ost.set_time_base(Rational(1, fps as i32));
            tracing::info!(width = w, height = h, fps, kbps = config.video.bitrate_kbps, preset = %config.video.preset, "video: H.264");
            VideoPath::Encode(Box::new(VideoEncode {
                decoder,
                in_tb: ist.time_base(),
                scaler: None,
                encoder,
                fps,
                width: w,
                height: h,
                last_slot: None,
                captures: Captures::default(),
                force_key: false,
            }))
        };
        streams.video = Some((ist.index(), next_out, path));
        next_out += 1;
    }
    if let Some(ist) = audio_in {
        let params = ist.parameters();
        let path = if config.copy {
            if params.id() != codec::Id::AAC {
                return Err(BroadcastError::CopyNeedsH264Aac { input, found: codec_name(&params) });
            }
            let mut ost =
                octx.add_stream(encoder::find(codec::Id::None)).map_err(|source| BroadcastError::Mux { source })?;
            ost.set_parameters(params);
            AudioPath::Copy(Copy { in_tb: ist.time_base(), parameter_sets: None })
        } else {
            let ctx = codec::context::Context::from_parameters(params.clone()).map_err(|source| {
                BroadcastError::Decoder { input: input.clone(), codec: codec_name(&params), source }
            })?;
            let decoder = ctx.decoder().audio().map_err(|source| BroadcastError::Decoder {
                input: input.clone(),
                codec: codec_name(&params),
                source,
            })?;
            let encoder = open_aac(config)?;
            let mut ost =
                octx.add_stream(encoder::find(codec::Id::AAC)).map_err(|source| BroadcastError::Mux { source })?;
            ost.set_parameters(&encoder);
            ost.set_time_base(Rational(1, AUDIO_RATE));
            tracing::info!(kbps = config.audio_bitrate_kbps, "audio: AAC 48 kHz stereo");
            AudioPath::Encode(Box::new(AudioEncode {
                decoder,
                in_tb: ist.time_base(),
                graph: None,
                encoder,
                captures: Captures::default(),
            }))
        };
        streams.audio = Some((ist.index(), next_out, path));
    }
    Ok(streams)
}

fn audio_graph(frame: &frame::Audio) -> Result<filter::Graph, ffmpeg::Error> {
    let mut graph = filter::Graph::new();
    let layout = if frame.channel_layout().bits() != 0 {
        frame.channel_layout()
    } else {
        ChannelLayout::default(i32::from(frame.channels().max(1)))
    };
    let args = format!(
        "time_base=1/1000000:sample_rate={}:sample_fmt={}:channel_layout=0x{:x}",
        frame.rate(),
        frame.format().name(),
        layout.bits()
    );
    let abuffer = filter::find("abuffer").ok_or(ffmpeg::Error::FilterNotFound)?;
    let abuffersink = filter::find("abuffersink").ok_or(ffmpeg::Error::FilterNotFound)?;
    graph.add(&abuffer, "in", &args)?;
    graph.add(&abuffersink, "out", "")?;
    graph
        .output("in", 0)?
        .input("out", 0)?
        .parse(&format!("aresample={AUDIO_RATE},aformat=sample_fmts=fltp:channel_layouts=stereo"))?;
    graph.validate()?;
    if let Some(mut out) = graph.get("out") {
        out.sink().set_frame_size(1024);
    }
    Ok(graph)
}

/// Everything the loop mutates, so helpers can borrow it as one.
struct State<'a> {
    config: &'a Config,
    clock: Clock,
    stats: Stats,
    muxer: Muxer,
    signer: Signer<'a>,
    streams: Streams,
    limit_us: Option<i64>,
}

impl State<'_> {
    fn flush_cuts(&mut self) -> Result<(), BroadcastError> {
        for cut in std::mem::take(&mut self.muxer.cuts) {
            self.signer.emit(cut, &mut self.stats)?;
        }
        Ok(())
    }

    /// The input came back after a stall of `blocked`: the stream picks up again at a keyframe
    /// (forced when re-encoding), flagged discontinuity.
    fn resume_after_stall(&mut self, blocked: Duration) -> Result<(), BroadcastError> {
        let dropped = self.muxer.resume_at_keyframe();
        tracing::info!(
            input = %self.config.input.describe(),
            stalled_s = blocked.as_secs_f64(),
            dropped_stale_bytes = dropped,
            "input back after a stall; resuming at a keyframe, flagged discontinuity"
        );
        self.stats.stalls += 1;
        if let Some((_, _, VideoPath::Encode(enc))) = &mut self.streams.video {
            enc.force_key = true;
        }
        self.flush_cuts()
    }

    fn past_limit(&self, t_us: i64) -> bool {
        self.limit_us.is_some_and(|l| t_us >= l)
    }

    /// One packet from the input.
    fn packet(&mut self, packet: &Packet, read_at_us: u64) -> Result<(), BroadcastError> {
        let index = packet.stream();
        let limit = self.limit_us;
        let past_limit = |t: i64| limit.is_some_and(|l| t >= l);
        if let Some((in_index, out_index, path)) = &mut self.streams.video
            && *in_index == index
        {
            let out_index = *out_index;
            match path {
                VideoPath::Copy(copy) => {
                    let (pts, dts, dur) = copy_times(&mut self.clock, copy, packet);
                    if past_limit(pts) {
                        return Ok(());
                    }
                    self.stats.video_frame_in();
                    let mut out = match &copy.parameter_sets {
                        Some(ps) if packet.is_key() && !packet.data().is_some_and(annexb_has_sps) => {
                            let mut data = ps.clone();
                            data.extend_from_slice(packet.data().unwrap_or_default());
                            let mut p = Packet::copy(&data);
                            p.set_flags(packet.flags());
                            p
                        }
                        _ => packet.clone(),
                    };
                    out.set_pts(Some(pts));
                    out.set_dts(Some(dts));
                    out.set_duration(dur);
                    out.set_position(-1);
                    out.set_stream(out_index);
                    out.rescale_ts(MICROS, self.streams.video_out_tb);
                    let meta = PacketMeta {
                        video: true,
                        key: packet.is_key(),
                        pts_us: pts,
                        dur_us: dur,
                        capture_us: read_at_us,
                    };
                    self.stats.encoded(1, Duration::ZERO);
                    self.stats.video_out += 1;
                    self.stats.media_us = self.stats.media_us.max(pts);
                    self.muxer.write(&mut out, &meta, self.streams.video_out_tb)?;
                }
                VideoPath::Encode(enc) => {
                    if let Err(e) = enc.decoder.send_packet(packet) {
                        self.stats.skipped += 1;
                        tracing::warn!(error = %e, "skipped a video packet the decoder refused");
                        return Ok(());
                    }
                    self.drain_video_decoder()?;
                }
            }
        } else if let Some((in_index, out_index, path)) = &mut self.streams.audio
            && *in_index == index
        {
            let out_index = *out_index;
            match path {
                AudioPath::Copy(copy) => {
                    let (pts, dts, dur) = copy_times(&mut self.clock, copy, packet);
                    if past_limit(pts) {
                        return Ok(());
                    }
                    self.stats.audio_in += 1;
                    let mut out = packet.clone();
                    out.set_pts(Some(pts));
                    out.set_dts(Some(dts));
                    out.set_duration(dur);
                    out.set_position(-1);
                    out.set_stream(out_index);
                    out.rescale_ts(MICROS, self.streams.audio_out_tb);
                    let meta = PacketMeta { video: false, key: true, pts_us: pts, dur_us: dur, capture_us: read_at_us };
                    self.stats.audio_out += 1;
                    if self.streams.video.is_none() {
                        self.stats.media_us = self.stats.media_us.max(pts);
                    }
                    self.muxer.write(&mut out, &meta, self.streams.audio_out_tb)?;
                }
                AudioPath::Encode(enc) => {
                    if let Err(e) = enc.decoder.send_packet(packet) {
                        self.stats.skipped += 1;
                        tracing::warn!(error = %e, "skipped an audio packet the decoder refused");
                        return Ok(());
                    }
                    self.drain_audio_decoder()?;
                }
            }
        }
        self.flush_cuts()
    }

    fn drain_video_decoder(&mut self) -> Result<(), BroadcastError> {
        let Some((_, out_index, VideoPath::Encode(enc))) = &mut self.streams.video else {
            return Ok(());
        };
        let out_index = *out_index;
        let mut decoded = frame::Video::empty();
        loop {
            match enc.decoder.receive_frame(&mut decoded) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => break,
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::util::error::EAGAIN => break,
                Err(e) => {
                    self.stats.skipped += 1;
                    tracing::warn!(error = %e, "video decoding error; frame skipped");
                    break;
                }
            }
            let capture = now_us();
            self.stats.video_frame_in();
            let Some(ts) = decoded.timestamp().or(decoded.pts()) else {
                continue;
            };
            let t_us = self.clock.media_us(ts, enc.in_tb);
            self.clock.saw(t_us + 1_000_000 / enc.fps);
            if self.limit_us.is_some_and(|l| t_us >= l) {
                continue;
            }
            let slot = (t_us as f64 * enc.fps as f64 / 1e6).round() as i64;
            if enc.last_slot.is_some_and(|last| slot <= last) {
                continue;
            }
            enc.last_slot = Some(slot);
            let src = (decoded.format(), decoded.width(), decoded.height());
            let mut scaled;
            let input_frame = if src == (Pixel::YUV420P, enc.width, enc.height) {
                &mut decoded
            } else {
                if enc.scaler.as_ref().is_none_or(|(_, s)| *s != src) {
                    let ctx = software::scaling::Context::get(
                        src.0,
                        src.1,
                        src.2,
                        Pixel::YUV420P,
                        enc.width,
                        enc.height,
                        software::scaling::Flags::BILINEAR,
                    )
                    .map_err(|source| BroadcastError::Filter { source })?;
                    enc.scaler = Some((ctx, src));
                }
                scaled = frame::Video::empty();
                if let Some((scaler, _)) = &mut enc.scaler {
                    scaler.run(&decoded, &mut scaled).map_err(|source| BroadcastError::Filter { source })?;
                }
                &mut scaled
            };
            input_frame.set_pts(Some(slot));
            let kind =
                if std::mem::take(&mut enc.force_key) { ffmpeg::picture::Type::I } else { ffmpeg::picture::Type::None };
            input_frame.set_kind(kind);
            enc.captures.push(slot, capture);
            let started = Instant::now();
            if let Err(e) = enc.encoder.send_frame(input_frame) {
                tracing::warn!(error = %e, "video encoder refused a frame");
                continue;
            }
            let busy = started.elapsed();
            self.stats.encoded(1, busy);
            self.stats.media_us = self.stats.media_us.max(t_us);
            receive_video(enc, out_index, self.streams.video_out_tb, &mut self.muxer, &mut self.stats)?;
        }
        Ok(())
    }

    fn drain_audio_decoder(&mut self) -> Result<(), BroadcastError> {
        let Some((_, out_index, AudioPath::Encode(enc))) = &mut self.streams.audio else {
            return Ok(());
        };
        let out_index = *out_index;
        let mut decoded = frame::Audio::empty();
        loop {
            match enc.decoder.receive_frame(&mut decoded) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => break,
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::util::error::EAGAIN => break,
                Err(e) => {
                    self.stats.skipped += 1;
                    tracing::warn!(error = %e, "audio decoding error; frame skipped");
                    break;
                }
            }
            let capture = now_us();
            self.stats.audio_in += 1;
            let Some(ts) = decoded.timestamp().or(decoded.pts()) else {
                continue;
            };
            let t_us = self.clock.media_us(ts, enc.in_tb);
            let dur_us = decoded.samples() as i64 * 1_000_000 / i64::from(decoded.rate().max(1));
            self.clock.saw(t_us + dur_us);
            if self.limit_us.is_some_and(|l| t_us >= l) {
                continue;
            }
            if self.streams.video.is_none() {
                self.stats.media_us = self.stats.media_us.max(t_us);
            }
            if enc.graph.is_none() {
                enc.graph = Some(audio_graph(&decoded).map_err(|source| BroadcastError::Filter { source })?);
            }
            decoded.set_pts(Some(t_us));
            enc.captures.push(rescale(t_us, MICROS, Rational(1, AUDIO_RATE)), capture);
            if let Some(graph) = &mut enc.graph
                && let Some(mut src) = graph.get("in")
                && let Err(e) = src.source().add(&decoded)
            {
                tracing::warn!(error = %e, "audio resampler refused a frame");
                continue;
            }
            pump_audio(enc, out_index, self.streams.audio_out_tb, &mut self.muxer, &mut self.stats)?;
        }
        Ok(())
    }

    /// End of input: drain decoders, filters and encoders into the muxer.
    fn drain_all(&mut self) -> Result<(), BroadcastError> {
        if let Some((_, _, VideoPath::Encode(enc))) = &mut self.streams.video {
            let _ = enc.decoder.send_eof();
        }
        self.drain_video_decoder()?;
        if let Some((_, out_index, VideoPath::Encode(enc))) = &mut self.streams.video {
            let _ = enc.encoder.send_eof();
            receive_video(enc, *out_index, self.streams.video_out_tb, &mut self.muxer, &mut self.stats)?;
        }
        if let Some((_, _, AudioPath::Encode(enc))) = &mut self.streams.audio {
            let _ = enc.decoder.send_eof();
        }
        self.drain_audio_decoder()?;
        if let Some((_, out_index, AudioPath::Encode(enc))) = &mut self.streams.audio {
            if let Some(graph) = &mut enc.graph
                && let Some(mut src) = graph.get("in")
            {
                let _ = src.source().flush();
            }
            pump_audio(enc, *out_index, self.streams.audio_out_tb, &mut self.muxer, &mut self.stats)?;
            let _ = enc.encoder.send_eof();
            receive_audio(enc, *out_index, self.streams.audio_out_tb, &mut self.muxer, &mut self.stats)?;
        }
        self.flush_cuts()
    }

    /// Before looping a file: push out what the decoders hold and reset them.
    fn restart_decoders(&mut self) -> Result<(), BroadcastError> {
        if let Some((_, _, VideoPath::Encode(enc))) = &mut self.streams.video {
            let _ = enc.decoder.send_eof();
        }
        self.drain_video_decoder()?;
        if let Some((_, _, VideoPath::Encode(enc))) = &mut self.streams.video {
            enc.decoder.flush();
        }
        if let Some((_, _, AudioPath::Encode(enc))) = &mut self.streams.audio {
            let _ = enc.decoder.send_eof();
        }
        self.drain_audio_decoder()?;
        if let Some((_, _, AudioPath::Encode(enc))) = &mut self.streams.audio {
            enc.decoder.flush();
        }
        self.flush_cuts()
    }
}

fn copy_times(clock: &mut Clock, copy: &Copy, packet: &Packet) -> (i64, i64, i64) {
    let dts_raw = packet.dts().or(packet.pts()).unwrap_or(0);
    let pts_raw = packet.pts().unwrap_or(dts_raw);
    let dts = clock.media_us(dts_raw, copy.in_tb);
    let pts = clock.media_us(pts_raw, copy.in_tb);
    let dur = rescale(packet.duration(), copy.in_tb, MICROS).max(0);
    clock.saw(pts.max(dts) + dur);
    (pts, dts, dur)
}

fn receive_video(
    enc: &mut VideoEncode,
    out_index: usize,
    out_tb: Rational,
    muxer: &mut Muxer,
    stats: &mut Stats,
) -> Result<(), BroadcastError> {
    let mut packet = Packet::empty();
    loop {
        let started = Instant::now();
        let got = enc.encoder.receive_packet(&mut packet);
        stats.encoded(0, started.elapsed());
        if got.is_err() {
            return Ok(());
        }
        let pts = packet.pts().unwrap_or(0);
        let capture_us = enc.captures.take(pts);
        let enc_tb = Rational(1, enc.fps as i32);
        let meta = PacketMeta {
            video: true,
            key: packet.is_key(),
            pts_us: rescale(pts, enc_tb, MICROS),
            dur_us: 1_000_000 / enc.fps,
            capture_us,
        };
        packet.set_stream(out_index);
        packet.rescale_ts(enc_tb, out_tb);
        stats.video_out += 1;
        muxer.write(&mut packet, &meta, out_tb)?;
    }
}

fn pump_audio(
    enc: &mut AudioEncode,
    out_index: usize,
    out_tb: Rational,
    muxer: &mut Muxer,
    stats: &mut Stats,
) -> Result<(), BroadcastError> {
    let mut resampled = frame::Audio::empty();
    loop {
        let Some(graph) = &mut enc.graph else {
            return Ok(());
        };
        let Some(mut out) = graph.get("out") else {
            return Ok(());
        };
        if out.sink().frame(&mut resampled).is_err() {
            break;
        }
        if let Err(e) = enc.encoder.send_frame(&resampled) {
            tracing::warn!(error = %e, "audio encoder refused a frame");
            continue;
        }
        receive_audio(enc, out_index, out_tb, muxer, stats)?;
    }
    Ok(())
}

fn receive_audio(
    enc: &mut AudioEncode,
    out_index: usize,
    out_tb: Rational,
    muxer: &mut Muxer,
    stats: &mut Stats,
) -> Result<(), BroadcastError> {
    let mut packet = Packet::empty();
    let enc_tb = Rational(1, AUDIO_RATE);
    while enc.encoder.receive_packet(&mut packet).is_ok() {
        let pts = packet.pts().unwrap_or(0);
        let meta = PacketMeta {
            video: false,
            key: true,
            pts_us: rescale(pts, enc_tb, MICROS),
            dur_us: rescale(packet.duration().max(1024), enc_tb, MICROS),
            capture_us: enc.captures.take(pts),
        };
        packet.set_stream(out_index);
        packet.rescale_ts(enc_tb, out_tb);
        stats.audio_out += 1;
        muxer.write(&mut packet, &meta, out_tb)?;
    }
    Ok(())
}

/// Runs the broadcast. See [`crate::run`].
pub(crate) fn run(
    config: &Config,
    key: &StreamKey,
    sink: &mut dyn FnMut(Verified) -> Result<(), SinkError>,
    stop: &Arc<AtomicBool>,
) -> Result<Summary, BroadcastError> {
    ffmpeg::init().map_err(|_| BroadcastError::MissingComponent("FFmpeg initialisation"))?;
    if config.chunk_duration.is_zero() {
        return Err(BroadcastError::Config("chunk duration must be above zero".into()));
    }
    let first_seq = config.first_seq.unwrap_or_else(|| now_us() / 1000);
    let Opened { mut ctx, deadline, paced, looped } = input::open(config, stop)?;
    tracing::info!(input = %config.input.describe(), format = ctx.format().name(), "input open");

    let buf = SharedBuf::default();
    let io = format::context::StreamIo::from_write(buf.clone()).map_err(|source| BroadcastError::Mux { source })?;
    let mut octx =
        format::output_to_stream(io, None, Some("mpegts")).map_err(|source| BroadcastError::Mux { source })?;
    let mut streams = setup(config, &ctx, &mut octx)?;
    let mut opts = Dictionary::new();
    opts.set("flush_packets", "1");
    opts.set("pes_payload_size", "0");
    opts.set("mpegts_start_pid", "0x100");
    opts.set("mpegts_pmt_start_pid", "0x1000");
    opts.set("pat_period", &format!("{}", config.video.keyframe_interval.as_secs_f64().max(0.1)));
    opts.set("sdt_period", "1000");
    {
        let unused = octx.write_header_with(opts).map_err(|source| BroadcastError::Mux { source })?;
        for (k, v) in unused.iter() {
            tracing::debug!(option = k, value = v, "muxer ignored an option");
        }
    }
    if let Some((_, out, _)) = &streams.video {
        streams.video_out_tb = octx.stream(*out).map_or(Rational(1, 90_000), |s| s.time_base());
    }
    if let Some((_, out, _)) = &streams.audio {
        streams.audio_out_tb = octx.stream(*out).map_or(Rational(1, 90_000), |s| s.time_base());
    }
    let has_video = streams.video.is_some();
    let mut chunker = Chunker::new(config.chunk_duration.as_micros() as u64, has_video);
    chunker.push_raw(&buf.take());
    let key_id = key.id();
    tracing::info!(stream = %key_id, first_seq, "broadcasting");

    let mut state = State {
        config,
        clock: Clock::default(),
        stats: Stats::new(config.stats_interval),
        muxer: Muxer { octx, buf, chunker, cuts: Vec::new(), has_video, started: false },
        signer: Signer { key, sink, next_seq: first_seq },
        streams,
        limit_us: config.duration.map(|d| d.as_micros() as i64),
    };
    let outcome = read_loop(&mut state, &mut ctx, &deadline, paced, looped, stop);

    // Flush whatever is in flight, also after an input error, so the last chunk says end of stream.
    let finish = (|| -> Result<(), BroadcastError> {
        state.drain_all()?;
        state.muxer.octx.write_trailer().map_err(|source| BroadcastError::Mux { source })?;
        let tail = state.muxer.buf.take();
        state.muxer.chunker.push_raw(&tail);
        let last = state.muxer.chunker.finish();
        state.signer.emit(last, &mut state.stats)
    })();
    let end = outcome?;
    finish?;

    let stats = &mut state.stats;
    let mut delays = std::mem::take(&mut stats.delays_us);
    let summary = Summary {
        stream_id: key_id,
        end,
        first_seq,
        next_seq: state.signer.next_seq,
        chunks: stats.chunks,
        random_access_chunks: stats.ra_chunks,
        bytes: stats.bytes,
        video_frames_in: stats.video_in,
        video_frames_out: stats.video_out,
        audio_frames_out: stats.audio_out,
        skipped_packets: stats.skipped,
        stalls: stats.stalls,
        media_duration: Duration::from_micros(stats.media_us.max(0) as u64),
        wall_time: stats.wall_time(),
        delay_median: percentile(&mut delays, 0.5).map(Duration::from_micros),
        delay_p90: percentile(&mut delays, 0.9).map(Duration::from_micros),
        delay_max: delays.last().copied().map(Duration::from_micros),
        encoder_fps: if state.config.copy { None } else { stats.encoder_fps() },
    };
    Ok(summary)
}

fn read_loop(
    state: &mut State<'_>,
    ctx: &mut format::context::Input,
    deadline: &input::Deadline,
    paced: bool,
    looped: bool,
    stop: &Arc<AtomicBool>,
) -> Result<EndReason, BroadcastError> {
    let input = state.config.input.describe();
    let stall = state.config.stall_timeout;
    let give_up = state.config.stall_give_up;
    let mut pace_start: Option<(Instant, i64)> = None;
    let mut packet = Packet::empty();
    let mut packets_read = 0u64;
    let primary = state.streams.video.as_ref().map(|v| v.0).or(state.streams.audio.as_ref().map(|a| a.0));
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(EndReason::Stopped);
        }
        state.stats.maybe_log();
        deadline.begin_read(stall, give_up);
        let read = packet.read(ctx);
        let stalled = deadline.end_read();
        match read {
            Ok(()) => {
                if let Some(blocked) = stalled {
                    state.resume_after_stall(blocked)?;
                    // A paced file does not rush to catch up with the wall clock after a stall.
                    pace_start = None;
                }
            }
            Err(ffmpeg::Error::Eof) => {
                if looped && state.clock.end_us > state.clock.loop_offset_us {
                    state.restart_decoders()?;
                    state.clock.loop_offset_us = state.clock.next_loop_offset();
                    ctx.seek(0, ..).map_err(|source| BroadcastError::InputRead { input: input.clone(), source })?;
                    tracing::info!(offset_s = state.clock.loop_offset_us as f64 / 1e6, "looping the input file");
                    continue;
                }
                return Ok(EndReason::InputEnded);
            }
            Err(ffmpeg::Error::InvalidData) => {
                state.stats.skipped += 1;
                tracing::warn!(input = %input, "skipped corrupt input data");
                continue;
            }
            Err(ffmpeg::Error::Exit) if stop.load(Ordering::Relaxed) => return Ok(EndReason::Stopped),
            Err(ffmpeg::Error::Exit) => {
                let after = give_up.unwrap_or(stall);
                tracing::warn!(input = %input, after_s = after.as_secs_f64(), "input stalled too long; ending the stream");
                return Err(BroadcastError::InputStalled { input, after });
            }
            // A network sender that hangs up (SRT, RTMP) shows as an I/O error: that is the input ending.
            Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::util::error::EIO && packets_read > 0 => {
                tracing::warn!(input = %input, "input connection closed");
                return Ok(EndReason::InputEnded);
            }
            Err(source) => return Err(BroadcastError::InputRead { input, source }),
        }
        packets_read += 1;
        let read_at = now_us();
        let Some(stream) = ctx.stream(packet.stream()) else {
            continue;
        };
        let tb = stream.time_base();
        let is_primary = Some(packet.stream()) == primary;
        if let Some(ts) = packet.dts().or(packet.pts())
            && (paced || is_primary)
        {
            let t_us = state.clock.media_us(ts, tb);
            if is_primary && state.past_limit(t_us) {
                return Ok(EndReason::Duration);
            }
            if paced {
                let (start, t0) = *pace_start.get_or_insert((Instant::now(), t_us));
                let due = start + Duration::from_micros((t_us - t0).max(0) as u64);
                while Instant::now() < due {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(EndReason::Stopped);
                    }
                    std::thread::sleep((due - Instant::now()).min(Duration::from_millis(50)));
                }
            }
        }
        if packet.is_corrupt() {
            tracing::warn!(input = %input, stream = packet.stream(), "input packet flagged corrupt");
        }
        state.packet(&packet, read_at)?;
    }
}

/// Signs a payload as the benchmark and tests would: exposed for the chunking benchmark.
pub fn sign_cut(key: &StreamKey, seq: u64, cut: Cut) -> Verified {
    Verified::sign(key, seq, cut.capture_us, cut.duration_us, cut.flags, cut.payload)
}
