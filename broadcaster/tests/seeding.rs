//! The broadcaster process seeds its chunks into a swarm: a relay joins with the printed ticket and
//! receives the stream in order, from a random-access chunk to the end-of-stream chunk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crowdsurf_peer::{Delivery, Node, NodeConfig};
use crowdsurf_proto::chunk::Flags;
use crowdsurf_proto::{NodeKey, Ticket};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_joins_with_the_ticket_and_receives_the_broadcast() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("stream.key");
    let mut child = Command::new(env!("CARGO_BIN_EXE_crowdsurf-broadcaster"))
        .args(["--key", key.to_str().unwrap(), "--listen", "127.0.0.1:0", "--size", "320x240", "--duration", "6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The ticket is printed before the first chunk is made.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ticket: Ticket = loop {
        let line = lines.next().expect("broadcaster ended before printing a ticket").unwrap();
        if let Some(t) = line.strip_prefix("ticket: ") {
            break t.parse().unwrap();
        }
    };
    let mut config =
        NodeConfig::new(NodeKey::from_secret_bytes([5; 32]), ticket.stream, "127.0.0.1:0".parse().unwrap());
    config.bootstrap = ticket.bootstrap.clone();
    let (mut node, handle) = Node::bind(config).unwrap();
    let mut deliveries = node.take_deliveries().unwrap();
    let task = tokio::spawn(node.run());

    let mut seqs = Vec::new();
    let mut first_is_random_access = None;
    let mut saw_end = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(d)) = tokio::time::timeout_at(deadline, deliveries.recv()).await {
        match d {
            Delivery::Chunk(c) => {
                first_is_random_access.get_or_insert(c.header().is_random_access());
                seqs.push(c.seq());
                if c.header().flags.contains(Flags::END_OF_STREAM) {
                    saw_end = true;
                    break;
                }
            }
            Delivery::Skip(s) => panic!("relay skipped chunk {s}"),
        }
    }
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "broadcaster exited with {status}");
    assert!(saw_end, "no end-of-stream chunk reached the relay (got {} chunks)", seqs.len());
    assert_eq!(first_is_random_access, Some(true), "the relay started on a chunk a decoder cannot start at");
    let first = seqs[0];
    assert_eq!(seqs, (first..first + seqs.len() as u64).collect::<Vec<_>>(), "chunks out of order or missing");
    // 6 s of media in ~250 ms chunks; the relay joins within the first second or so.
    assert!(seqs.len() >= 16, "only {} chunks arrived", seqs.len());
    handle.shutdown();
    task.await.unwrap().unwrap();
}

/// A free UDP port on 127.0.0.1 (bound and released; the broadcaster binds it right after).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_resume_when_the_broadcaster_is_killed_and_restarted_with_the_same_key() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let (key, node_key) = (dir.path().join("stream.key"), dir.path().join("node.key"));
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let start = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crowdsurf-broadcaster"))
            .args(["--key", key.to_str().unwrap(), "--node-key", node_key.to_str().unwrap()])
            .args(["--listen", &listen, "--size", "320x240", "--duration", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ticket: Ticket = loop {
            let line = lines.next().expect("no ticket printed").unwrap();
            if let Some(t) = line.strip_prefix("ticket: ") {
                break t.parse().unwrap();
            }
        };
        (child, ticket)
    };
    let (mut first, ticket) = start();
    let mut config =
        NodeConfig::new(NodeKey::from_secret_bytes([6; 32]), ticket.stream, "127.0.0.1:0".parse().unwrap());
    config.bootstrap = ticket.bootstrap.clone();
    let (mut node, handle) = Node::bind(config).unwrap();
    let mut deliveries = node.take_deliveries().unwrap();
    let task = tokio::spawn(node.run());

    // Watch a few chunks, then kill the broadcaster without warning.
    let mut before = Vec::new();
    while before.len() < 8 {
        match tokio::time::timeout(Duration::from_secs(15), deliveries.recv()).await.expect("no chunks").unwrap() {
            Delivery::Chunk(c) => before.push(c.seq()),
            Delivery::Skip(_) => {}
        }
    }
    first.kill().unwrap();
    first.wait().unwrap();

    // Same key files, same address: the ticket the viewer holds is still right.
    let (mut second, ticket2) = start();
    assert_eq!(ticket2, ticket, "a restarted broadcaster must keep the same ticket");
    let old_max = *before.iter().max().unwrap();
    let mut after = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    while after.len() < 8 {
        match tokio::time::timeout_at(deadline, deliveries.recv()).await {
            Ok(Some(Delivery::Chunk(c))) if c.seq() > old_max => after.push(c),
            Ok(Some(_)) => {}
            _ => panic!("the viewer did not resume after the restart (got {} new chunks)", after.len()),
        }
    }
    assert!(after[0].header().is_random_access(), "playback did not resume at a random-access chunk");
    let seqs: Vec<u64> = after.iter().map(|c| c.seq()).collect();
    assert_eq!(seqs, (seqs[0]..seqs[0] + 8).collect::<Vec<_>>(), "resumed stream has holes");
    second.kill().unwrap();
    second.wait().unwrap();
    handle.shutdown();
    task.await.unwrap().unwrap();
}

/// Sends `signal` (STOP, CONT, TERM, ...) to a process.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The broadcaster's live input (MPEG-TS over UDP from a real ffmpeg) freezes for 10 s: the ffmpeg
/// process is stopped with SIGSTOP and continued with SIGCONT. Viewers see a clean pause: the
/// broadcaster stays up (and says so in its log), its swarm node keeps the relay connected, no chunk
/// is skipped or invented, nothing says end of stream, and after the pause the relay receives the
/// stream again from a random-access chunk flagged discontinuity. SIGTERM then ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_input_stall_is_a_clean_pause_for_viewers() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("stream.key");
    let port = free_udp_port();
    let mut broadcaster = Command::new(env!("CARGO_BIN_EXE_crowdsurf-broadcaster"))
        .args(["--key", key.to_str().unwrap(), "--listen", "127.0.0.1:0", "--size", "320x240"])
        .args(["--preset", "ultrafast", "--bitrate", "400", "--stall-timeout", "2"])
        .args(["--url", &format!("udp://127.0.0.1:{port}?fifo_size=100000&overrun_nonfatal=1")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log, line by line, for the test to look at afterwards.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log_reader = {
        let (log, stderr) = (log.clone(), broadcaster.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        })
    };
    let mut lines = BufReader::new(broadcaster.stdout.take().unwrap()).lines();
    let ticket: Ticket = loop {
        let line = lines.next().expect("broadcaster ended before printing a ticket").unwrap();
        if let Some(t) = line.strip_prefix("ticket: ") {
            break t.parse().unwrap();
        }
    };
    // A live encoder at real time (the realtime filters do not rush to catch up after a pause).
    let mut feeder = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25,realtime"])
        .args(["-f", "lavfi", "-i", "sine=f=440:r=48000,arealtime"])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25", "-pix_fmt", "yuv420p"])
        .args(["-c:a", "aac", "-b:a", "64k", "-f", "mpegts"])
        .arg(format!("udp://127.0.0.1:{port}?pkt_size=1316"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let mut config =
        NodeConfig::new(NodeKey::from_secret_bytes([7; 32]), ticket.stream, "127.0.0.1:0".parse().unwrap());
    config.bootstrap = ticket.bootstrap.clone();
    let (mut node, handle) = Node::bind(config).unwrap();
    let mut deliveries = node.take_deliveries().unwrap();
    let task = tokio::spawn(node.run());

    let mut chunks = Vec::new();
    let mut skips = Vec::new();
    // Playing before the stall.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while chunks.len() < 12 {
        match next(&mut deliveries, deadline).await.expect("no chunks before the stall") {
            Delivery::Chunk(c) => chunks.push(c),
            Delivery::Skip(s) => skips.push(s),
        }
    }
    // The input freezes for 10 s.
    signal(feeder.id(), "STOP");
    let stopped_at = wall_us();
    let pause = Duration::from_secs(10);
    let resume_at = tokio::time::Instant::now() + pause;
    while let Some(d) = next(&mut deliveries, resume_at).await {
        match d {
            Delivery::Chunk(c) => chunks.push(c),
            Delivery::Skip(s) => skips.push(s),
        }
    }
    assert!(broadcaster.try_wait().unwrap().is_none(), "the broadcaster ended during the stall");
    assert!(handle.stats().neighbours >= 1, "the relay lost the broadcaster during the stall");
    let before = chunks.len();
    signal(feeder.id(), "CONT");
    // Playing again after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while chunks.len() < before + 12 {
        match next(&mut deliveries, deadline).await {
            Some(Delivery::Chunk(c)) => chunks.push(c),
            Some(Delivery::Skip(s)) => skips.push(s),
            None => {
                panic!("the relay did not get the stream back after the stall ({} new chunks)", chunks.len() - before)
            }
        }
    }
    signal(broadcaster.id(), "TERM");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !chunks.last().unwrap().header().flags.contains(Flags::END_OF_STREAM) {
        match next(&mut deliveries, deadline).await {
            Some(Delivery::Chunk(c)) => chunks.push(c),
            Some(Delivery::Skip(s)) => skips.push(s),
            None => panic!("no end-of-stream chunk after SIGTERM"),
        }
    }
    let _ = feeder.kill();
    let _ = feeder.wait();
    let status = tokio::task::spawn_blocking(move || broadcaster.wait()).await.unwrap().unwrap();
    log_reader.join().unwrap();
    let log = log.lock().unwrap().clone();

    for line in &log {
        eprintln!("broadcaster: {line}");
    }
    assert!(status.success(), "the broadcaster exited with {status} after SIGTERM");
    assert!(skips.is_empty(), "the relay skipped chunks {skips:?}");
    let seqs: Vec<u64> = chunks.iter().map(|c| c.seq()).collect();
    assert_eq!(seqs, (seqs[0]..seqs[0] + seqs.len() as u64).collect::<Vec<_>>(), "chunks out of order or missing");
    let ends = chunks.iter().filter(|c| c.header().flags.contains(Flags::END_OF_STREAM)).count();
    assert_eq!(ends, 1, "end of stream only at the very end");
    // The first chunk captured after the input came back is where the stream resumes.
    let resumed = chunks
        .iter()
        .position(|c| c.header().capture_us > stopped_at + pause.as_micros() as u64 / 2)
        .expect("no chunk captured after the stall");
    let flags = chunks[resumed].header().flags;
    assert!(
        flags.contains(Flags::DISCONTINUITY) && flags.contains(Flags::RANDOM_ACCESS),
        "the chunk after the stall is not a random-access discontinuity: {flags:?}"
    );
    let gap = chunks[resumed].header().capture_us - chunks[resumed - 1].header().capture_us;
    assert!(gap >= 8_000_000, "capture times jump only {gap} µs across a 10 s stall");
    let marked = chunks.iter().filter(|c| c.header().flags.contains(Flags::DISCONTINUITY)).count();
    assert_eq!(marked, 1, "only the chunk after the stall is a discontinuity");
    assert!(log.iter().any(|l| l.contains("input stalled")), "no stall warning in the log");
    assert!(log.iter().any(|l| l.contains("input back after a stall")), "no resume line in the log");
    assert!(!log.iter().any(|l| l.contains("panicked")), "the broadcaster panicked");
    let summary: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(summary.iter().any(|l| l.contains("stalls=1")), "the summary does not count the stall: {summary:?}");
    handle.shutdown();
    task.await.unwrap().unwrap();
}

/// The next delivery, or None once `deadline` passes.
async fn next(
    deliveries: &mut tokio::sync::mpsc::UnboundedReceiver<Delivery>,
    deadline: tokio::time::Instant,
) -> Option<Delivery> {
    tokio::time::timeout_at(deadline, deliveries.recv()).await.ok().flatten()
}

fn wall_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}
