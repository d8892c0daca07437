//! End-to-end: the broadcaster's test source (in process, 320x240) seeds an in-process origin node, a
//! few relays join it over loopback QUIC, and the real `crowdsurf-player` binary watches through them.
//!
//! The tests share two cores with each other and with whatever else runs, so they take turns (one
//! lock for the file) instead of fighting for CPU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crowdsurf_broadcaster::{Config, VideoSettings};
use crowdsurf_peer::{Node, NodeConfig, NodeError, NodeHandle};
use crowdsurf_proto::wire::{NodeAddr, Role};
use crowdsurf_proto::{NodeKey, StreamKey, Ticket};
use tokio::task::JoinHandle;

static TURN: Mutex<()> = Mutex::new(());

/// The broadcaster, its origin node and some relays, all in this process.
struct Swarm {
    _runtime: tokio::runtime::Runtime,
    origin: NodeHandle,
    relays: Vec<(NodeHandle, JoinHandle<Result<(), NodeError>>)>,
    stop: Arc<AtomicBool>,
    broadcaster: Option<std::thread::JoinHandle<()>>,
    stream: crowdsurf_proto::StreamId,
}

impl Swarm {
    fn start(seed: u8, relays: usize) -> Swarm {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let key = StreamKey::from_secret_bytes([seed; 32]);
        let stream = key.id();
        let _guard = runtime.enter();
        let mut config =
            NodeConfig::new(NodeKey::from_secret_bytes([seed ^ 0x55; 32]), stream, "127.0.0.1:0".parse().unwrap());
        config.swarm.role = Role::Origin;
        let (node, origin) = Node::bind(config).unwrap();
        runtime.spawn(node.run());
        let mut started = Vec::new();
        for i in 0..relays {
            let mut config = NodeConfig::new(
                NodeKey::from_secret_bytes([seed.wrapping_add(i as u8 + 1); 32]),
                stream,
                "127.0.0.1:0".parse().unwrap(),
            );
            config.swarm.role = Role::Relay;
            config.swarm.seed = u64::from(seed) * 100 + i as u64;
            config.bootstrap = vec![origin.node_addr()];
            let (node, handle) = Node::bind(config).unwrap();
            started.push((handle, runtime.spawn(node.run())));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let publish = origin.clone();
        let broadcaster = std::thread::spawn(move || {
            let config = Config {
                video: VideoSettings { size: Some((320, 240)), bitrate_kbps: 500, ..VideoSettings::default() },
                ..Config::default()
            };
            let mut sink = |chunk| {
                publish.publish(chunk);
                Ok(())
            };
            if let Err(e) = crowdsurf_broadcaster::run(&config, &key, &mut sink, &thread_stop) {
                eprintln!("broadcaster failed: {e}");
            }
        });
        Swarm { _runtime: runtime, origin, relays: started, stop, broadcaster: Some(broadcaster), stream }
    }

    /// A ticket that bootstraps through the given relays only.
    fn ticket_via(&self, relays: std::ops::Range<usize>) -> String {
        let boot: Vec<NodeAddr> = self.relays[relays].iter().map(|(h, _)| h.node_addr()).collect();
        Ticket::new(self.stream, boot).to_string()
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(b) = self.broadcaster.take() {
            let _ = b.join();
        }
        for (h, _) in &self.relays {
            h.shutdown();
        }
        self.origin.shutdown();
    }
}

fn player(ticket: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crowdsurf-player"));
    cmd.arg(ticket).args(["--listen", "127.0.0.1:0", "--status-every", "2"]).args(args);
    cmd.env("RUST_LOG", "info");
    cmd
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("player did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_stats(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("stats json written");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn headless_player_through_relays_decodes_every_frame() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let swarm = Swarm::start(11, 3);
    std::thread::sleep(Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let mut child = player(&swarm.ticket_via(0..3), &["--headless", "--duration", "12s", "--stats-json"])
        .arg(&stats)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(40));
    assert!(status.success(), "player exited with {status}");
    let s = read_stats(&stats);
    let d = &s["decode"];
    eprintln!("{}", serde_json::to_string_pretty(d).unwrap());
    let decoded = d["frames_decoded"].as_f64().unwrap();
    let expected = d["frames_expected"].as_f64().unwrap();
    assert!(expected > 200.0, "too few frames expected: {expected}");
    assert!(decoded >= 0.98 * expected, "decoded {decoded} of {expected} frames");
    assert_eq!(d["chunks_skipped"].as_u64(), Some(0), "a chunk was skipped");
    assert_eq!(s["node"]["counters"]["skipped"].as_u64(), Some(0));
    let p99 = d["display_latency"]["p99_ms"].as_f64().unwrap();
    assert!((1000.0..1200.0).contains(&p99), "display latency p99 {p99} ms with --latency 1s");
    drop(swarm);
}

#[test]
fn killing_the_players_neighbours_mid_stream_leaves_it_playing() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let swarm = Swarm::start(22, 4);
    std::thread::sleep(Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    // The player only knows relays 0 and 1 at first; it meets the others (and the origin) by peer
    // exchange. Both die abruptly (no goodbye) after 5 s.
    let mut child = player(&swarm.ticket_via(0..2), &["--headless", "--duration", "14s", "--stats-json"])
        .arg(&stats)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    for (_, task) in &swarm.relays[0..2] {
        task.abort();
    }
    let status = wait_with_timeout(&mut child, Duration::from_secs(40));
    assert!(status.success(), "player exited with {status}");
    let s = read_stats(&stats);
    let d = &s["decode"];
    eprintln!("{}", serde_json::to_string_pretty(d).unwrap());
    let decoded = d["frames_decoded"].as_f64().unwrap();
    let expected = d["frames_expected"].as_f64().unwrap();
    assert!(decoded >= 0.9 * expected, "decoded {decoded} of {expected} frames after losing neighbours");
    assert!(s["node"]["neighbours"].as_u64().unwrap() >= 1, "no neighbours left at the end");
    drop(swarm);
}

#[test]
fn mpv_plays_the_gateway_stream_and_ffprobe_reads_hls() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    for tool in ["mpv", "ffprobe"] {
        assert!(
            Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok(),
            "{tool} is not installed (make setup installs it)"
        );
    }
    let swarm = Swarm::start(33, 2);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    // Also TS to stdout, whose reader goes away early: the gateway must not notice.
    let mut child = player(&swarm.ticket_via(0..2), &["--http", &addr, "--output", "-", "--duration", "16s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 188 * 100];
    stdout.read_exact(&mut buf).expect("TS on stdout");
    assert_eq!(buf[0], 0x47, "stdout does not start with a TS packet");
    drop(stdout);

    let mpv = Command::new("mpv")
        .args(["--vo=null", "--ao=null", "--no-config", "--length=5", "--msg-level=all=warn"])
        .arg(format!("http://{addr}/stream.ts"))
        .output()
        .unwrap();
    let mpv_err = String::from_utf8_lossy(&mpv.stderr).to_string() + &String::from_utf8_lossy(&mpv.stdout);
    assert!(mpv.status.success(), "mpv failed ({}): {mpv_err}", mpv.status);
    assert!(!mpv_err.to_lowercase().contains("error"), "mpv reported errors: {mpv_err}");

    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0"])
        .arg(format!("http://{addr}/live.m3u8"))
        .output()
        .unwrap();
    let codecs = String::from_utf8_lossy(&probe.stdout).to_string();
    assert!(probe.status.success(), "ffprobe failed: {}", String::from_utf8_lossy(&probe.stderr));
    assert!(codecs.contains("h264") && codecs.contains("aac"), "ffprobe saw {codecs:?}");

    let status = wait_with_timeout(&mut child, Duration::from_secs(40));
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(status.success(), "player exited with {status}: {log}");
    assert!(log.contains("the reader closed"), "no clear message about stdout closing: {log}");
    assert!(!log.contains("panicked"), "{log}");
    drop(swarm);
}
