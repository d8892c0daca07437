//! The lab's feeds and processes: relays split over worker processes, relays fed by a live stream's
//! ticket, and the errors of both. The swarms are small (a few relays on loopback, no emulated
//! links) so that they need little CPU; the lab's figures at scale are in the README.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crowdsurf_peer::lab::{self, Feed, LabConfig, LabError};
use crowdsurf_peer::source::SyntheticSource;
use crowdsurf_peer::{Node, NodeConfig};
use crowdsurf_proto::wire::{NodeAddr, Role};
use crowdsurf_proto::{NodeKey, StreamKey, Ticket};

fn worker_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_crowdsurf-peer"))
}

fn small(peers: usize, duration: Duration) -> LabConfig {
    LabConfig { peers, duration, progress: None, worker_exe: Some(worker_exe()), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_split_over_worker_processes_all_report_in_join_order() {
    let cfg = LabConfig { processes: 2, ..small(8, Duration::from_secs(6)) };
    let report = lab::run(cfg).await.unwrap();
    assert_eq!(report.scenario.processes, Some(2));
    assert_eq!(report.peers_total, 8, "every relay of both workers is in the report");
    // Merged in join order (the ramp joins them one after another), not worker by worker.
    let joined: Vec<f64> = report.per_peer.iter().map(|p| p.joined_at_s).collect();
    assert!(joined.windows(2).all(|w| w[0] <= w[1]), "join times out of order: {joined:?}");
    assert!(joined.last().unwrap() - joined[0] > 1.0, "the 2 s ramp spread the joins: {joined:?}");
    for p in &report.per_peer {
        assert!(p.startup_s.is_some(), "relay {} never played", p.node);
        assert!(p.arrival_latency.count > 10, "relay {} stored only {} chunks", p.node, p.arrival_latency.count);
    }
    assert!(report.continuity_min >= 0.9, "continuity {}", report.continuity_min);
    assert!(report.published >= 20);
    // The workers' own processes are measured too (their CPU, their runtimes' lag).
    assert!(report.cpu_per_peer.unwrap() > 0.0);
    assert!(report.scheduler_lag.as_ref().unwrap().count > 100);
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_fed_by_a_ticket_measures_the_stream_and_what_its_origin_sent() {
    // A live stream the lab knows nothing about: 1 Mbit/s in 100 ms chunks, a key frame a second.
    let stream = StreamKey::from_secret_bytes([41; 32]);
    let mut origin_cfg =
        NodeConfig::new(NodeKey::from_secret_bytes([42; 32]), stream.id(), SocketAddr::from(([127, 0, 0, 1], 0)));
    origin_cfg.swarm.role = Role::Origin;
    let (origin_node, origin) = Node::bind(origin_cfg).unwrap();
    let ticket = origin_node.ticket();
    let running = tokio::spawn(origin_node.run());
    let mut source = SyntheticSource::new(stream, 1, 100, 1_000_000, 10);
    let publisher = {
        let origin = origin.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                origin.publish(source.next_chunk(now_us()));
            }
        })
    };
    let cfg = LabConfig { feed: Feed::Ticket(ticket), ..small(6, Duration::from_secs(6)) };
    let report = lab::run(cfg).await.unwrap();
    publisher.abort();
    let sent = origin.stats().counters.chunk_bytes_up;
    origin.shutdown();
    let _ = running.await;

    let s = &report.scenario;
    assert_eq!(s.feed, "ticket");
    assert_eq!(s.chunk_ms, 100, "chunk length from the chunks' headers");
    assert_eq!(s.keyint_ms, 1000, "a random-access chunk every 10");
    let bitrate = s.bitrate_bps as f64;
    assert!((0.95e6..1.05e6).contains(&bitrate), "measured bitrate {bitrate}");
    assert_eq!(report.peers_total, 6);
    assert!(report.continuity_min >= 0.9, "continuity {}", report.continuity_min);
    // About 60 chunks in 6 s, plus what a joiner fetched from before the start.
    assert!((50..=80).contains(&report.published), "published {}", report.published);
    // What the relays say they got from the origin is what the origin says it sent.
    let received = report.origin_upload_ratio * (report.published * 1_000_000 / 8 / 10) as f64;
    let ratio = received / sent as f64;
    assert!((0.9..=1.1).contains(&ratio), "relays counted {received:.0} bytes from the origin, which sent {sent}");
    // The origin is the ticket's node: the push trees hang from it.
    assert!(report.depth_max >= 1, "no relay traced its parents to the ticket's node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_to_nowhere_is_an_error_not_an_empty_report() {
    // A port nobody listens on (bound, read off, closed).
    let addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let node = NodeKey::from_secret_bytes([43; 32]).id();
    let ticket =
        Ticket::new(StreamKey::from_secret_bytes([44; 32]).id(), vec![NodeAddr { id: node, addrs: vec![addr] }]);
    let cfg = LabConfig { feed: Feed::Ticket(ticket), ramp: Duration::ZERO, ..small(2, Duration::from_secs(2)) };
    let err = lab::run(cfg).await.unwrap_err();
    assert!(matches!(err, LabError::NothingDelivered), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_early_ends_the_run_at_once_and_is_named() {
    // Share 1's worker dies on reading its plan; share 0's is a real one (the script hands it the
    // plan it read, then the rest of its stdin, so that it still sees the lab go).
    use std::os::unix::fs::PermissionsExt;
    let script = std::env::temp_dir().join(format!("crowdsurf-dying-worker-{}.sh", std::process::id()));
    let body = format!(
        "#!/bin/sh\n[ \"$1\" = probe ] && exit 0\nread -r plan\ncase \"$plan\" in *'\"share\":1'[,}}]*) exit 3;; esac\n\
         {{ printf '%s\\n' \"$plan\"; cat; }} | exec '{}' \"$@\"\n",
        worker_exe().display()
    );
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A process forked by another test while the script was open for writing keeps it busy
    // (ETXTBSY) until that process execs: wait for that to pass before the lab starts it.
    loop {
        match std::process::Command::new(&script).arg("probe").status() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => std::thread::yield_now(),
            status => {
                assert!(status.unwrap().success());
                break;
            }
        }
    }
    // A run of ten minutes: before the lab watched its shares, it would have noticed only then.
    let cfg = LabConfig { processes: 2, worker_exe: Some(script.clone()), ..small(4, Duration::from_secs(600)) };
    let result = tokio::time::timeout(Duration::from_secs(120), lab::run(cfg)).await;
    let _ = std::fs::remove_file(&script);
    let err = result.expect("the run went on without its failed share").unwrap_err();
    match &err {
        LabError::Worker { share, message } => {
            assert_eq!(*share, 1, "{err}");
            assert!(message.contains("ended without its figures"), "{err}");
        }
        other => panic!("not the worker's failure: {other}"),
    }
}

#[test]
fn a_worker_given_garbage_says_so_and_fails() {
    use std::io::Write;
    let mut child = std::process::Command::new(worker_exe())
        .arg("lab-worker")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{\"not\": \"a plan\"}\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("{\"failed\":\"unreadable plan"), "{stdout}");
}

#[test]
fn options_of_the_synthetic_origin_are_refused_with_a_ticket() {
    let ticket = Ticket::new(
        StreamKey::from_secret_bytes([45; 32]).id(),
        vec![NodeAddr { id: NodeKey::from_secret_bytes([46; 32]).id(), addrs: vec!["127.0.0.1:9".parse().unwrap()] }],
    );
    for option in [["--chunk-ms", "100"], ["--keyint-ms", "2000"], ["--origin-upload", "4"]] {
        let out = std::process::Command::new(worker_exe())
            .args(["lab", "--ticket", &ticket.to_string()])
            .args(option)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{option:?} was accepted with --ticket");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot be used with"), "{option:?}: {stderr}");
    }
}
