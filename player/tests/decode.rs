//! The decoder alone, fed real broadcaster chunks with gaps and garbage in between: it resumes at the
//! next random-access chunk every time, never stops, never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use bytes::Bytes;
use crowdsurf_broadcaster::{Config, VideoSettings};
use crowdsurf_player::decode::{self, DecoderOptions};
use crowdsurf_player::pacer::{Playout, Released};
use crowdsurf_proto::StreamKey;
use crowdsurf_proto::chunk::Verified;

fn chunks(seconds: f64) -> Vec<Verified> {
    let config = Config {
        video: VideoSettings { size: Some((320, 240)), bitrate_kbps: 400, ..VideoSettings::default() },
        duration: Some(std::time::Duration::from_secs_f64(seconds)),
        ..Config::default()
    };
    let mut out = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    crowdsurf_broadcaster::run(
        &config,
        &StreamKey::from_secret_bytes([9; 32]),
        &mut |c| {
            out.push(c);
            Ok(())
        },
        &stop,
    )
    .unwrap();
    out
}

fn released(c: &Verified, after_gap: bool, payload: Option<Bytes>) -> Playout {
    let h = c.header();
    Playout::Chunk(Arc::new(Released {
        seq: c.seq(),
        capture_us: h.capture_us,
        duration_us: h.duration_us,
        random_access: h.is_random_access(),
        discontinuity: false,
        end_of_stream: false,
        after_gap,
        deadline_us: decode::now_us(),
        capture_local_us: decode::now_us().saturating_sub(200_000),
        payload: payload.unwrap_or_else(|| c.payload().clone()),
    }))
}

#[test]
fn gaps_and_garbage_resume_at_the_next_random_access_chunk() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    ffmpeg_next::init().unwrap();
    ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Quiet);
    let chunks = chunks(4.2);
    let ra: Vec<usize> =
        chunks.iter().enumerate().filter(|(_, c)| c.header().is_random_access()).map(|(i, _)| i).collect();
    eprintln!("{} chunks, random access at {ra:?}", chunks.len());
    assert!(ra.len() >= 4, "need 4 random-access chunks, got {}", ra.len());
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, stats) =
        decode::spawn(rx, DecoderOptions { latency_us: 1_000_000, start: Instant::now(), sink: None }).unwrap();
    let mut after_gap = false;
    for (i, c) in chunks.iter().enumerate() {
        if i == ra[1] + 1 {
            // A chunk goes missing inside the second GOP.
            tx.send(Playout::Gap { seq: c.seq() }).unwrap();
            after_gap = true;
            continue;
        }
        if i == ra[2] {
            // The third GOP starts with garbage where the keyframe should be.
            let junk: Vec<u8> = (0..c.payload().len()).map(|n| (n * 7919 % 251) as u8).collect();
            tx.send(released(c, after_gap, Some(Bytes::from(junk)))).unwrap();
            after_gap = false;
            continue;
        }
        tx.send(released(c, after_gap, None)).unwrap();
        after_gap = false;
    }
    drop(tx);
    thread.join().unwrap();
    // Frames are due up to seconds ahead of now here (chunks came all at once): count them all.
    let r = stats.report(u64::MAX / 2);
    eprintln!("{r:#?}");
    assert_eq!(r.chunks_skipped, 1);
    assert!(r.runs >= 2, "the decoder never restarted after the gap: {} runs", r.runs);
    // Everything except the rest of the second GOP after the gap and the garbage GOP decodes.
    let gop_frames = 30;
    let total = (chunks.len() as f64 / 4.0 * gop_frames as f64) as u64;
    assert!(r.frames_decoded + 2 * gop_frames >= total, "{} of ~{total} frames decoded", r.frames_decoded);
    assert!(r.frames_decoded > 0);
}

/// Video pictures in a chunk: TS packets that start a PES packet of a video stream.
fn pictures_in(payload: &[u8]) -> u64 {
    payload
        .chunks_exact(188)
        .filter(|p| {
            let start = match (p[3] >> 4) & 3 {
                1 => 4,
                3 => 5 + usize::from(p[4]),
                _ => return false,
            };
            p[1] & 0x40 != 0
                && p.len() >= start + 4
                && p[start..start + 3] == [0, 0, 1]
                && (p[start + 3] & 0xf0) == 0xe0
        })
        .count() as u64
}

/// Every picture of a chunk comes out of the decoder once that chunk is in, without waiting for the
/// next chunk (which is released a chunk interval later): the player closes each chunk's last PES.
#[test]
fn a_chunks_last_picture_does_not_wait_for_the_next_chunk() {
    ffmpeg_next::init().unwrap();
    ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Quiet);
    let chunks = chunks(2.2);
    let first = chunks.iter().position(|c| c.header().is_random_access()).expect("a random-access chunk");
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, stats) =
        decode::spawn(rx, DecoderOptions { latency_us: 1_000_000, start: Instant::now(), sink: None }).unwrap();
    let mut expected = 0;
    for c in &chunks[first..first + 3] {
        expected += pictures_in(c.payload());
        tx.send(released(c, false, None)).unwrap();
        let until = Instant::now() + std::time::Duration::from_secs(10);
        while stats.brief().0 < expected {
            assert!(
                Instant::now() < until,
                "chunk {}: {} of its {} pictures so far came out; the rest waits for the next chunk",
                c.seq(),
                stats.brief().0,
                expected
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    assert!(expected >= 12, "too few pictures in three chunks: {expected}");
    drop(tx);
    thread.join().unwrap();
    assert_eq!(stats.brief().0, expected, "more pictures than the chunks held");
}
