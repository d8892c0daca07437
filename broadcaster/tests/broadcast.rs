//! End-to-end tests of the broadcaster library: real FFmpeg pipelines on small pictures (320x240) for a
//! few seconds each, checked with the FFmpeg libraries; and every bad input the issue lists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crowdsurf_broadcaster::sink::{ChunksDirSink, RecordSink};
use crowdsurf_broadcaster::{
    BroadcastError, Config, EndReason, Input, KeyFileError, Summary, VideoSettings, load_or_create_key, run,
};
use crowdsurf_proto::chunk::{Flags, Received, Verified, Verifier};
use crowdsurf_proto::keys::StreamKey;
use ffmpeg_next as ffmpeg;

fn quiet_ffmpeg() {
    ffmpeg::init().unwrap();
    ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Error);
}

fn key() -> StreamKey {
    quiet_ffmpeg();
    StreamKey::from_secret_bytes([3; 32])
}

fn small(input: Input, seconds: f64) -> Config {
    Config {
        input,
        video: VideoSettings {
            size: Some((320, 240)),
            fps: Some(30),
            bitrate_kbps: 500,
            preset: "ultrafast".into(),
            ..VideoSettings::default()
        },
        duration: (seconds > 0.0).then(|| Duration::from_secs_f64(seconds)),
        stats_interval: Duration::from_secs(3600),
        ..Config::default()
    }
}

fn broadcast(config: &Config) -> Result<(Summary, Vec<Verified>), BroadcastError> {
    let mut chunks = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let summary = run(
        config,
        &key(),
        &mut |c| {
            chunks.push(c);
            Ok(())
        },
        &stop,
    )?;
    Ok((summary, chunks))
}

#[derive(Debug, Default)]
struct Probe {
    codecs: Vec<ffmpeg::codec::Id>,
    video_packets: usize,
    video_frames: usize,
    audio_packets: usize,
    first_video_key: Option<bool>,
}

/// Opens a TS file with the FFmpeg libraries and decodes its video.
fn probe(path: &Path) -> Probe {
    ffmpeg::init().unwrap();
    let mut ictx = ffmpeg::format::input(path).unwrap();
    let mut p = Probe { codecs: ictx.streams().map(|s| s.parameters().id()).collect(), ..Probe::default() };
    let video = ictx.streams().best(ffmpeg::media::Type::Video).map(|s| (s.index(), s.parameters()));
    let audio = ictx.streams().best(ffmpeg::media::Type::Audio).map(|s| s.index());
    let mut decoder = video.as_ref().map(|(_, params)| {
        ffmpeg::codec::context::Context::from_parameters(params.clone()).unwrap().decoder().video().unwrap()
    });
    let mut frame = ffmpeg::frame::Video::empty();
    for (stream, packet) in ictx.packets() {
        if Some(stream.index()) == video.as_ref().map(|v| v.0) {
            p.video_packets += 1;
            p.first_video_key.get_or_insert(packet.is_key());
            let d = decoder.as_mut().unwrap();
            d.send_packet(&packet).unwrap();
            while d.receive_frame(&mut frame).is_ok() {
                p.video_frames += 1;
            }
        } else if Some(stream.index()) == audio {
            p.audio_packets += 1;
        }
    }
    if let Some(d) = decoder.as_mut() {
        d.send_eof().unwrap();
        while d.receive_frame(&mut frame).is_ok() {
            p.video_frames += 1;
        }
    }
    p
}

fn ffmpeg_cli(args: &[&str]) {
    let status = Command::new("ffmpeg").args(["-hide_banner", "-loglevel", "error", "-y"]).args(args).status().unwrap();
    assert!(status.success(), "ffmpeg {args:?}");
}

/// A 320x240 30 fps H.264 + AAC file, keyframe every second.
fn h264_aac_file(dir: &Path, name: &str, seconds: &str) -> PathBuf {
    let path = dir.join(name);
    ffmpeg_cli(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=30",
        "-f",
        "lavfi",
        "-i",
        "sine=f=440:r=48000",
        "-t",
        seconds,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-g",
        "30",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-b:a",
        "64k",
        path.to_str().unwrap(),
    ]);
    path
}

fn check_chunks(chunks: &[Verified], dir: &Path) {
    let verifier = Verifier::new(key().id()).unwrap();
    for pair in chunks.windows(2) {
        assert_eq!(pair[1].seq(), pair[0].seq() + 1, "sequence numbers are consecutive");
    }
    assert!(chunks.last().unwrap().header().flags.contains(Flags::END_OF_STREAM));
    assert!(chunks[..chunks.len() - 1].iter().all(|c| !c.header().flags.contains(Flags::END_OF_STREAM)));
    assert!(chunks[0].header().is_random_access(), "the first chunk is a random access point");
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk.payload().len() % 188, 0);
        if chunk.header().is_random_access() {
            let path = dir.join(format!("ra-{i}.ts"));
            std::fs::write(&path, chunk.payload()).unwrap();
            let p = probe(&path);
            if p.video_packets > 0 {
                assert_eq!(p.first_video_key, Some(true), "chunk {i} starts with a keyframe");
                assert_eq!(p.video_frames, p.video_packets, "chunk {i}: every frame decodes from the chunk alone");
            }
        }
    }
    // Chunk files written by the sink decode and verify.
    let chunks_dir = dir.join("chunks");
    if chunks_dir.exists() {
        let mut files: Vec<_> = std::fs::read_dir(&chunks_dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert_eq!(files.len(), chunks.len());
        for (file, chunk) in files.iter().zip(chunks) {
            assert_eq!(file.file_name().unwrap().to_str().unwrap(), ChunksDirSink::file_name(chunk.seq()));
            let bytes = std::fs::read(file).unwrap();
            let back = Received::decode(&mut &bytes[..]).unwrap().verify(&verifier).unwrap();
            assert_eq!(&back, chunk);
        }
    }
}

#[test]
fn test_source_records_h264_aac_and_every_chunk_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let config = small(Input::TestSource, 3.0);
    let mut record = RecordSink::create(dir.path().join("out.ts")).unwrap();
    let mut files = ChunksDirSink::create(dir.path().join("chunks")).unwrap();
    let mut chunks = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let summary = run(
        &config,
        &key(),
        &mut |c| {
            record.write(&c)?;
            files.write(&c)?;
            chunks.push(c);
            Ok(())
        },
        &stop,
    )
    .unwrap();
    drop(record);
    let wall = started.elapsed();
    assert_eq!(summary.end, EndReason::Duration);
    assert!(wall >= Duration::from_millis(2500), "the test source runs in real time: {wall:?}");

    let recorded = std::fs::read(dir.path().join("out.ts")).unwrap();
    let concatenated: Vec<u8> = chunks.iter().flat_map(|c| c.payload().iter().copied()).collect();
    assert_eq!(recorded, concatenated, "the record is exactly the concatenated payloads");

    let p = probe(&dir.path().join("out.ts"));
    assert!(p.codecs.contains(&ffmpeg::codec::Id::H264), "{:?}", p.codecs);
    assert!(p.codecs.contains(&ffmpeg::codec::Id::AAC), "{:?}", p.codecs);
    assert!((88..=92).contains(&p.video_frames), "3 s at 30 fps: {} frames", p.video_frames);
    assert!(p.audio_packets >= 130, "about 140 AAC frames in 3 s: {}", p.audio_packets);

    // About four chunks a second, three of them random access (keyframe each second).
    assert!((10..=16).contains(&chunks.len()), "{} chunks", chunks.len());
    assert_eq!(summary.random_access_chunks, 3);
    check_chunks(&chunks, dir.path());
    let median = summary.delay_median.unwrap();
    assert!(median < Duration::from_millis(300), "ingest-to-signed median {median:?}");
    // Capture times are wall-clock µs, increasing.
    for pair in chunks.windows(2) {
        assert!(pair[1].header().capture_us >= pair[0].header().capture_us);
    }
}

#[test]
fn copy_remuxes_h264_aac_with_parameter_sets_at_every_keyframe() {
    let dir = tempfile::tempdir().unwrap();
    // MP4 stores H.264 as avcC (no parameter sets in band): the remux must put them in.
    let file = h264_aac_file(dir.path(), "in.mp4", "2");
    let config = Config { copy: true, ..small(Input::File { path: file, looped: false }, 0.0) };
    let (summary, chunks) = broadcast(&config).unwrap();
    assert_eq!(summary.end, EndReason::InputEnded);
    let record = dir.path().join("out.ts");
    std::fs::write(&record, chunks.iter().flat_map(|c| c.payload().to_vec()).collect::<Vec<_>>()).unwrap();
    let p = probe(&record);
    assert!(p.codecs.contains(&ffmpeg::codec::Id::H264) && p.codecs.contains(&ffmpeg::codec::Id::AAC));
    assert!((58..=60).contains(&p.video_frames), "{} frames", p.video_frames);
    assert_eq!(summary.random_access_chunks, 2);
    check_chunks(&chunks, dir.path());
}

#[test]
fn copy_refuses_other_codecs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mpeg2.ts");
    ffmpeg_cli(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=160x120:rate=10",
        "-t",
        "0.5",
        "-c:v",
        "mpeg2video",
        path.to_str().unwrap(),
    ]);
    let config = Config { copy: true, ..small(Input::File { path, looped: false }, 0.0) };
    let err = broadcast(&config).unwrap_err();
    assert!(matches!(err, BroadcastError::CopyNeedsH264Aac { .. }), "{err}");
    assert!(err.to_string().contains("mpeg2video"), "{err}");
}

#[test]
fn audio_only_and_video_only() {
    let dir = tempfile::tempdir().unwrap();
    let (summary, chunks) = broadcast(&Config { no_video: true, ..small(Input::TestSource, 1.5) }).unwrap();
    let path = dir.path().join("audio.ts");
    std::fs::write(&path, chunks.iter().flat_map(|c| c.payload().to_vec()).collect::<Vec<_>>()).unwrap();
    let p = probe(&path);
    assert_eq!(p.codecs, vec![ffmpeg::codec::Id::AAC]);
    assert_eq!(summary.video_frames_out, 0);
    assert!(chunks.len() >= 5, "{} chunks", chunks.len());
    assert!(summary.random_access_chunks >= 1);
    check_chunks(&chunks, dir.path());

    let (summary, chunks) = broadcast(&Config { no_audio: true, ..small(Input::TestSource, 1.5) }).unwrap();
    let path = dir.path().join("video.ts");
    std::fs::write(&path, chunks.iter().flat_map(|c| c.payload().to_vec()).collect::<Vec<_>>()).unwrap();
    let p = probe(&path);
    assert_eq!(p.codecs, vec![ffmpeg::codec::Id::H264]);
    assert_eq!(summary.audio_frames_out, 0);
    assert!((43..=47).contains(&p.video_frames), "{}", p.video_frames);
    check_chunks(&chunks, dir.path());
}

#[test]
fn looped_file_keeps_going_with_continuous_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let file = h264_aac_file(dir.path(), "loop.ts", "1");
    let (summary, chunks) = broadcast(&small(Input::File { path: file, looped: true }, 2.5)).unwrap();
    assert_eq!(summary.end, EndReason::Duration);
    let path = dir.path().join("out.ts");
    std::fs::write(&path, chunks.iter().flat_map(|c| c.payload().to_vec()).collect::<Vec<_>>()).unwrap();
    let p = probe(&path);
    assert!((72..=77).contains(&p.video_frames), "2.5 s of a looped 1 s file: {} frames", p.video_frames);
}

#[test]
fn corrupt_packets_are_skipped_and_the_stream_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let file = h264_aac_file(dir.path(), "good.ts", "2");
    let mut bytes = std::fs::read(&file).unwrap();
    // Scribble over payload bytes (not sync bytes or headers) of every 7th TS packet in the middle.
    let packets = bytes.len() / 188;
    for i in (packets / 4..packets * 3 / 4).step_by(7) {
        for b in &mut bytes[i * 188 + 20..i * 188 + 120] {
            *b ^= 0x5a;
        }
    }
    let bad = dir.path().join("bad.ts");
    std::fs::write(&bad, &bytes).unwrap();
    let (summary, chunks) = broadcast(&small(Input::File { path: bad, looped: false }, 0.0)).unwrap();
    assert_eq!(summary.end, EndReason::InputEnded);
    assert!(summary.video_frames_out >= 40, "{summary:?}");
    check_chunks(&chunks, dir.path());
}

#[test]
fn missing_unreadable_and_unknown_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = broadcast(&small(Input::File { path: dir.path().join("nope.mp4"), looped: false }, 0.0)).unwrap_err();
    assert!(matches!(err, BroadcastError::InputFile { .. }), "{err}");
    assert!(err.to_string().contains("nope.mp4"), "{err}");

    let err = broadcast(&small(Input::File { path: dir.path().to_owned(), looped: false }, 0.0)).unwrap_err();
    assert!(matches!(err, BroadcastError::BadInput { .. }), "{err}");

    let garbage = dir.path().join("garbage.bin");
    std::fs::write(&garbage, (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<_>>())
        .unwrap();
    let err = broadcast(&small(Input::File { path: garbage, looped: false }, 0.0)).unwrap_err();
    assert!(matches!(err, BroadcastError::OpenInput { .. }), "{err}");

    // Only a subtitle stream: nothing to broadcast.
    let srt = dir.path().join("subs.srt");
    std::fs::write(&srt, "1\n00:00:00,000 --> 00:00:01,000\nhello\n\n").unwrap();
    let err = broadcast(&small(Input::File { path: srt, looped: false }, 0.0)).unwrap_err();
    assert!(matches!(err, BroadcastError::NoMedia { .. }), "{err}");

    let err = broadcast(&Config { input_format: Some("no-such-format".into()), ..small(Input::Url("x".into()), 0.0) })
        .unwrap_err();
    assert!(matches!(err, BroadcastError::OpenInput { .. }), "{err}");
}

#[test]
fn unreachable_silent_and_stalling_urls_are_clear_errors() {
    // Nothing listens on this port: connection refused.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = broadcast(&small(Input::Url(format!("tcp://127.0.0.1:{port}")), 0.0)).unwrap_err();
    assert!(matches!(err, BroadcastError::OpenInput { .. }), "{err}");

    // Accepts but never sends a byte: the open times out.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let held = std::thread::spawn(move || {
        let conn = silent.accept();
        std::thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let config = Config { open_timeout: Some(Duration::from_millis(800)), ..small(Input::Url(url), 0.0) };
    let started = Instant::now();
    let err = broadcast(&config).unwrap_err();
    assert!(matches!(err, BroadcastError::OpenTimeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(held);

    // Sends a whole (short) TS and then nothing, connection open: the input stalls, past the give-up time.
    let dir = tempfile::tempdir().unwrap();
    let ts = std::fs::read(h264_aac_file(dir.path(), "s.ts", "1")).unwrap();
    let feeder = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://127.0.0.1:{}", feeder.local_addr().unwrap().port());
    let feeding = std::thread::spawn(move || {
        let (mut s, _) = feeder.accept().unwrap();
        s.write_all(&ts).unwrap();
        std::thread::sleep(Duration::from_secs(4));
    });
    let config = Config {
        stall_timeout: Duration::from_millis(300),
        stall_give_up: Some(Duration::from_millis(700)),
        open_timeout: Some(Duration::from_secs(3)),
        ..small(Input::Url(url), 0.0)
    };
    let mut chunks = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let err = run(
        &config,
        &key(),
        &mut |c| {
            chunks.push(c);
            Ok(())
        },
        &stop,
    )
    .unwrap_err();
    assert!(matches!(err, BroadcastError::InputStalled { .. }), "{err}");
    assert!(!chunks.is_empty(), "what arrived before the stall was broadcast");
    assert!(chunks.last().unwrap().header().flags.contains(Flags::END_OF_STREAM));
    drop(feeding);
}

/// The sender pauses for 1.5 s in the middle of a TS (as a stuck encoder or a network hiccup would):
/// the broadcast does not end; the chunk in progress goes out, the stream resumes at a keyframe the
/// encoder is made to produce, flagged discontinuity, and goes on to the end of the input.
#[test]
fn a_stalled_input_pauses_the_stream_and_resumes_at_a_keyframe() {
    let dir = tempfile::tempdir().unwrap();
    let ts = std::fs::read(h264_aac_file(dir.path(), "p.ts", "5")).unwrap();
    // 60 % before the pause (enough for the demuxer's probing to finish), the rest after it.
    let split = ts.len() * 3 / 5 / 188 * 188;
    let feeder = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://127.0.0.1:{}", feeder.local_addr().unwrap().port());
    let pause = Duration::from_millis(1500);
    let feeding = std::thread::spawn(move || {
        let (mut s, _) = feeder.accept().unwrap();
        s.write_all(&ts[..split]).unwrap();
        std::thread::sleep(pause);
        s.write_all(&ts[split..]).unwrap();
    });
    let config = Config {
        stall_timeout: Duration::from_millis(400),
        stall_give_up: Some(Duration::from_secs(10)),
        open_timeout: Some(Duration::from_secs(5)),
        ..small(Input::Url(url), 0.0)
    };
    let (summary, chunks) = broadcast(&config).unwrap();
    feeding.join().unwrap();
    assert_eq!(summary.end, EndReason::InputEnded);
    assert_eq!(summary.stalls, 1, "{summary:?}");
    let marked: Vec<usize> =
        (0..chunks.len()).filter(|&i| chunks[i].header().flags.contains(Flags::DISCONTINUITY)).collect();
    assert_eq!(marked.len(), 1, "exactly one chunk is flagged discontinuity: {marked:?}");
    let resumed = &chunks[marked[0]];
    assert!(resumed.header().is_random_access(), "the stream resumes at a random-access chunk");
    let gap = resumed.header().capture_us - chunks[marked[0] - 1].header().capture_us;
    assert!(gap >= 1_000_000, "the chunk after the pause was captured only {gap} µs after the one before it");
    // Consecutive numbers, end of stream at the end, every random-access chunk (the resumed one
    // too) decodes on its own.
    check_chunks(&chunks, dir.path());
    let after: f64 = chunks[marked[0]..].iter().map(|c| f64::from(c.header().duration_us)).sum::<f64>() / 1e6;
    assert!(after > 1.0, "only {after:.2} s of media after the pause");
}

#[test]
fn stop_flag_ends_the_test_source_cleanly() {
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let mut chunks = Vec::new();
    let summary = run(
        &small(Input::TestSource, 0.0),
        &key(),
        &mut |c| {
            chunks.push(c);
            Ok(())
        },
        &stop,
    )
    .unwrap();
    stopper.join().unwrap();
    assert_eq!(summary.end, EndReason::Stopped);
    assert!(chunks.last().unwrap().header().flags.contains(Flags::END_OF_STREAM));
}

#[test]
fn key_file_is_created_private_reused_and_checked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stream.key");
    let first = load_or_create_key(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let again = load_or_create_key(&path).unwrap();
    assert_eq!(first.id(), again.id(), "the same file continues the same stream");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = load_or_create_key(&path).unwrap_err();
    assert!(matches!(err, KeyFileError::Permissions { mode: 0o644, .. }), "{err}");

    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = load_or_create_key(&bad).unwrap_err();
    assert!(matches!(err, KeyFileError::BadContent { .. }), "{err}");

    let err = load_or_create_key(dir.path()).unwrap_err();
    assert!(matches!(err, KeyFileError::NotAFile { .. }), "{err}");
    let err = load_or_create_key(dir.path().join("missing-dir/k.key")).unwrap_err();
    assert!(matches!(err, KeyFileError::Create { .. }), "{err}");
}

#[test]
fn sink_errors_end_the_broadcast() {
    let stop = Arc::new(AtomicBool::new(false));
    let err =
        run(&small(Input::TestSource, 2.0), &key(), &mut |_| Err(crowdsurf_broadcaster::SinkError::Closed), &stop)
            .unwrap_err();
    assert!(matches!(err, BroadcastError::Sink(_)), "{err}");
}
