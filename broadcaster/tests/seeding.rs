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
