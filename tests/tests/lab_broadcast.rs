//! End-to-end: the lab measuring a real broadcast. The broadcaster's test source (in process, 320x240,
//! H.264 and AAC in MPEG-TS chunks) seeds an origin node; `lab --ticket` joins that stream with relays
//! of its own and must describe it as it is: chunk length and key-frame interval from the chunks,
//! a bitrate near what the encoder was asked for, and an origin upload that agrees with the
//! origin's own count.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crowdsurf_broadcaster::{Config, VideoSettings};
use crowdsurf_peer::lab::{self, Feed, LabConfig};
use crowdsurf_peer::{Node, NodeConfig};
use crowdsurf_proto::wire::Role;
use crowdsurf_proto::{NodeKey, StreamKey};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lab_measures_a_live_broadcast_joined_by_its_ticket() {
    let key = StreamKey::from_secret_bytes([71; 32]);
    let mut config = NodeConfig::new(NodeKey::from_secret_bytes([72; 32]), key.id(), "127.0.0.1:0".parse().unwrap());
    config.swarm.role = Role::Origin;
    let (node, origin) = Node::bind(config).unwrap();
    let ticket = node.ticket();
    let running = tokio::spawn(node.run());
    let stop = Arc::new(AtomicBool::new(false));
    let broadcaster = {
        let (stop, publish) = (stop.clone(), origin.clone());
        std::thread::spawn(move || {
            let config = Config {
                video: VideoSettings { size: Some((320, 240)), bitrate_kbps: 400, ..VideoSettings::default() },
                audio_bitrate_kbps: 64,
                ..Config::default()
            };
            let mut sink = |chunk| {
                publish.publish(chunk);
                Ok(())
            };
            crowdsurf_broadcaster::run(&config, &key, &mut sink, &stop).unwrap();
        })
    };
    let cfg = LabConfig {
        peers: 4,
        duration: Duration::from_secs(8),
        feed: Feed::Ticket(ticket),
        progress: None,
        ..Default::default()
    };
    let report = lab::run(cfg).await.unwrap();
    stop.store(true, Ordering::SeqCst);
    broadcaster.join().unwrap();
    let sent = origin.stats().counters.chunk_bytes_up;
    origin.shutdown();
    let _ = running.await;
    eprintln!("{}", report.headline());

    let s = &report.scenario;
    assert_eq!(s.feed, "ticket");
    // Chunks are whole frames (7 or 8 at 30 fps), so their mean is near 250 ms, not exactly it.
    assert!((240..=260).contains(&s.chunk_ms), "chunk length {} ms, not the broadcaster's 250", s.chunk_ms);
    assert!((900..=1100).contains(&s.keyint_ms), "key frames every {} ms, not the broadcaster's 1000", s.keyint_ms);
    // 400 kbit/s of video and 64 of audio, in MPEG-TS (packet headers, PES, tables, padding).
    let bitrate = s.bitrate_bps as f64;
    assert!((300e3..900e3).contains(&bitrate), "measured bitrate {bitrate}");
    assert_eq!(report.peers_total, 4);
    assert!(report.continuity_min >= 0.9, "continuity {}", report.continuity_min);
    assert!(report.published >= 24, "published {}", report.published);
    // The relays' count of what came straight from the origin agrees with the origin's own.
    let stream_bytes = report.published as f64 * s.bitrate_bps as f64 / 8.0 * f64::from(s.chunk_ms) / 1000.0;
    let ratio = report.origin_upload_ratio * stream_bytes / sent as f64;
    assert!((0.85..=1.15).contains(&ratio), "relays counted {ratio:.3} of the {sent} bytes the origin sent");
}
