//! Everything a broadcast can be told. The binary builds a [`Config`] from its command line; a library
//! user builds one directly (start from [`Config::default`], the built-in test source).

use std::path::PathBuf;
use std::time::Duration;

/// Where the media comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Input {
    /// The built-in live test source: a moving test pattern with the wall-clock time (UTC, ms) and
    /// frame number burned in and a white bar flashing at each second, plus a 440 Hz tone with a
    /// 1 kHz beep in the first 100 ms of every second. Generated at the configured size and rate.
    #[default]
    TestSource,
    /// A media file, read at real time (paced by its timestamps).
    File {
        /// The file.
        path: PathBuf,
        /// Start again from the beginning at the end, forever.
        looped: bool,
    },
    /// Any FFmpeg input URL, read as fast as it arrives: `srt://0.0.0.0:9000?mode=listener`,
    /// `rtmp://0.0.0.0:1935/live` with the option `listen=1`, `udp://0.0.0.0:5000`, `tcp://host:port`, `http://...`; or a
    /// capture device together with [`Config::input_format`] (`v4l2` with `/dev/video0`, `alsa` with
    /// `default`, `pulse` with `default`).
    Url(String),
}

/// Video encoding settings (ignored with [`Config::copy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoSettings {
    /// Output size; `None` keeps the input's (1280x720 for the test source).
    pub size: Option<(u32, u32)>,
    /// Output frame rate; `None` keeps the input's (30 for the test source).
    pub fps: Option<u32>,
    /// Target bitrate, kbit/s.
    pub bitrate_kbps: u32,
    /// x264 preset (`ultrafast` … `medium`); zero-latency tuning is always on.
    pub preset: String,
    /// Keyframe interval: every random-access point, so also how long a joining viewer waits at most.
    pub keyframe_interval: Duration,
}

impl Default for VideoSettings {
    fn default() -> Self {
        VideoSettings {
            size: None,
            fps: None,
            bitrate_kbps: 2500,
            preset: "veryfast".into(),
            keyframe_interval: Duration::from_secs(1),
        }
    }
}

/// All options of a broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The media source.
    pub input: Input,
    /// Force the FFmpeg demuxer or input device (`mpegts`, `v4l2`, `alsa`, `pulse`, `lavfi`, …).
    /// A forced format opens without the open/stall timeouts (FFmpeg's safe API has no way to combine
    /// them); devices and lavfi graphs do not need them.
    pub input_format: Option<String>,
    /// Extra FFmpeg input options (`key=value`), e.g. `video_size=640x480` for v4l2, `latency=…` for SRT.
    pub input_options: Vec<(String, String)>,
    /// Remux H.264/AAC input without re-encoding (parameter sets are put ahead of every keyframe).
    pub copy: bool,
    /// Video encoding.
    pub video: VideoSettings,
    /// AAC bitrate, kbit/s.
    pub audio_bitrate_kbps: u32,
    /// Leave out the input's video.
    pub no_video: bool,
    /// Leave out the input's audio.
    pub no_audio: bool,
    /// Target chunk duration.
    pub chunk_duration: Duration,
    /// Stop after this much media (measured on the media clock, so the frame count is exact).
    pub duration: Option<Duration>,
    /// The first sequence number. `None`: the wall clock in milliseconds at start, so a restarted
    /// broadcaster never reuses a number as long as it makes fewer than 1000 chunks a second (it makes
    /// about 4) and the clock does not step back.
    pub first_seq: Option<u64>,
    /// How long opening a URL may take before it counts as not answering. `None` waits forever, which
    /// listeners (`?listen=1`, `mode=listener`, `udp://`) do by default.
    pub open_timeout: Option<Duration>,
    /// How long a read may block once the input is open before it counts as a stall. A stall does
    /// not end the broadcast: it is logged at warn level, the swarm node stays up (viewers see a
    /// pause), and when data comes back the next chunk starts at a keyframe and is flagged
    /// discontinuity (with `copy`, input up to the next keyframe is dropped; re-encoding forces one).
    pub stall_timeout: Duration,
    /// How long a stall may last before the broadcast ends with [`crate::BroadcastError::InputStalled`]
    /// (after an end-of-stream chunk). `None`: wait for the input as long as it takes.
    pub stall_give_up: Option<Duration>,
    /// How often stats are logged.
    pub stats_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            input: Input::TestSource,
            input_format: None,
            input_options: Vec::new(),
            copy: false,
            video: VideoSettings::default(),
            audio_bitrate_kbps: 128,
            no_video: false,
            no_audio: false,
            chunk_duration: Duration::from_millis(250),
            duration: None,
            first_seq: None,
            open_timeout: Some(Duration::from_secs(10)),
            stall_timeout: Duration::from_secs(2),
            stall_give_up: Some(Duration::from_secs(120)),
            stats_interval: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// Whether the input waits for a sender to connect: a listener URL (see [`Input::is_listener`]) or
    /// the FFmpeg option `listen=1` (RTMP's way: `rtmp://0.0.0.0:1935/live` with `listen=1`).
    pub fn is_listener(&self) -> bool {
        self.input.is_listener() || self.input_options.iter().any(|(k, v)| k == "listen" && v != "0")
    }
}

impl Input {
    /// A short description for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Input::TestSource => "test source".into(),
            Input::File { path, .. } => path.display().to_string(),
            Input::Url(url) => url.clone(),
        }
    }

    /// Whether the input waits for someone to connect (so opening it has no timeout by default).
    pub fn is_listener(&self) -> bool {
        match self {
            Input::Url(url) => {
                url.contains("listen=1")
                    || url.contains("mode=listener")
                    || url.starts_with("udp://")
                    || url.starts_with("rtp://")
            }
            _ => false,
        }
    }
}
