//! The QUIC transport over real loopback sockets: identities, control stream, chunk streams, the
//! upload cap, and hostile input.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crowdsurf_peer::net::{
    Connection, Endpoint, EndpointConfig, NetError, RESET_CANCELLED, STOP_CONTROL_ERROR, STOP_REFUSED,
};
use crowdsurf_proto::chunk::{MAX_PAYLOAD, SIGNED_HEADER_LEN, Verifier};
use crowdsurf_proto::wire::{DecodeError, GoodbyeReason, Message, NodeAddr};
use crowdsurf_proto::{Flags, NodeKey, StreamKey, Verified};

const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn config() -> EndpointConfig {
    EndpointConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
}

fn node(seed: u8, config: EndpointConfig) -> Endpoint {
    Endpoint::bind(&NodeKey::from_secret_bytes([seed; 32]), config).unwrap()
}

fn addr_of(endpoint: &Endpoint) -> NodeAddr {
    NodeAddr { id: endpoint.node_id(), addrs: vec![endpoint.local_addr()] }
}

fn stream_key() -> StreamKey {
    StreamKey::from_secret_bytes([99; 32])
}

fn chunk(seq: u64, len: usize) -> Verified {
    let payload: Vec<u8> = (0..len).map(|i| (i as u64 ^ seq) as u8).collect();
    Verified::sign(&stream_key(), seq, 1_000_000 + seq, 250_000, Flags::empty(), Bytes::from(payload))
}

/// Connects `dialer` to `acceptor` and returns (dialer's connection, acceptor's connection).
async fn pair(dialer: &Endpoint, acceptor: &Endpoint) -> (Connection, Connection) {
    let target = addr_of(acceptor);
    let (dialed, accepted) = tokio::join!(dialer.connect(&target), acceptor.accept());
    (dialed.unwrap(), accepted.unwrap().unwrap())
}

#[tokio::test]
async fn connect_and_exchange_control_messages_both_ways() {
    let a = node(1, config());
    let b = node(2, config());
    let (ab, ba) = pair(&a, &b).await;
    assert_eq!(ab.remote_id(), b.node_id());
    assert_eq!(ba.remote_id(), a.node_id());
    assert_eq!(ab.remote_addr(), b.local_addr());

    let (mut a_send, mut a_recv) = ab.open_control().await.unwrap();
    let first = Message::Ping { nonce: 7, sent_us: 1234 };
    a_send.send(&first).await.unwrap();
    let (mut b_send, mut b_recv) = ba.accept_control().await.unwrap();
    assert_eq!(b_recv.recv().await.unwrap(), Some(first));

    let many: Vec<Message> = (0..100).map(|seq| Message::Have { seq }).collect();
    for m in &many {
        b_send.send(m).await.unwrap();
    }
    for m in &many {
        assert_eq!(a_recv.recv().await.unwrap().as_ref(), Some(m));
    }
    let bye = Message::Goodbye { reason: GoodbyeReason::Leaving, peers: vec![addr_of(&a)], message: "bye".into() };
    a_send.send(&bye).await.unwrap();
    a_send.finish().unwrap();
    assert_eq!(b_recv.recv().await.unwrap(), Some(bye));
    assert_eq!(b_recv.recv().await.unwrap(), None, "a clean finish reads as the end");

    assert!(ab.rtt() < Duration::from_secs(1));
    let stats = ab.stats();
    assert!(stats.bytes_sent > 0 && stats.bytes_received > 0, "{stats:?}");
}

#[tokio::test]
async fn wrong_expected_node_id_fails_the_handshake() {
    let a = node(1, config());
    let b = node(2, config());
    let impostor_wanted = NodeKey::from_secret_bytes([3; 32]).id();
    let target = NodeAddr { id: impostor_wanted, addrs: vec![b.local_addr()] };
    let (dialed, accepted) = tokio::join!(a.connect(&target), b.accept());
    match dialed {
        Err(NetError::WrongNodeId { expected, actual }) => {
            assert_eq!(expected, impostor_wanted);
            assert_eq!(actual, b.node_id());
        }
        other => panic!("expected WrongNodeId, got {other:?}"),
    }
    assert!(accepted.unwrap().is_err(), "the acceptor must not get a connection either");

    // The endpoints are still fine afterwards.
    let (ab, _ba) = pair(&a, &b).await;
    assert_eq!(ab.remote_id(), b.node_id());
}

#[tokio::test]
async fn connect_tries_every_address_and_reports_errors() {
    let a = node(1, config());
    let b = node(2, config());
    let dead = {
        // A bound socket nobody answers on: the first address times out, the second works.
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        std::mem::forget(s);
        addr
    };
    let mut fast = config();
    fast.connect_timeout = Duration::from_millis(300);
    let c = node(3, fast);
    let target = NodeAddr { id: b.node_id(), addrs: vec![dead, b.local_addr()] };
    let (dialed, accepted) = tokio::join!(c.connect(&target), b.accept());
    assert_eq!(dialed.unwrap().remote_id(), b.node_id());
    assert!(accepted.unwrap().is_ok());

    let none = NodeAddr { id: b.node_id(), addrs: vec![] };
    assert!(matches!(a.connect(&none).await, Err(NetError::NoAddresses { .. })));
    assert!(matches!(a.connect(&addr_of(&a)).await, Err(NetError::ConnectToSelf)));
    let only_dead = NodeAddr { id: b.node_id(), addrs: vec![dead] };
    assert!(matches!(c.connect(&only_dead).await, Err(NetError::TimedOut)));
}

#[tokio::test]
async fn chunks_round_trip_up_to_one_mebibyte() {
    let a = node(1, config());
    let b = node(2, config());
    let (ab, ba) = pair(&a, &b).await;
    let verifier = Verifier::new(stream_key().id()).unwrap();
    for (seq, len) in [(0u64, 0usize), (1, 1), (2, 1000), (3, 188 * 700), (4, 1024 * 1024)] {
        let sent = chunk(seq, len);
        // Read while sending: a chunk bigger than the stream window needs the reader to make room.
        let (sent_result, received) =
            tokio::join!(ab.send_chunk(&sent, 0), async { ba.accept_chunk().await?.read(READ_TIMEOUT).await });
        sent_result.unwrap();
        let received = received.unwrap();
        assert_eq!(received.verify(&verifier).unwrap(), sent, "chunk of {len} bytes");
    }
    // And the other way.
    let sent = chunk(9, 50_000);
    let (sent_result, incoming) = tokio::join!(ba.send_chunk(&sent, 3), ab.accept_chunk());
    sent_result.unwrap();
    assert_eq!(incoming.unwrap().read(READ_TIMEOUT).await.unwrap().verify(&verifier).unwrap(), sent);
}

#[tokio::test]
async fn cancelled_send_resets_the_stream_and_the_receiver_gets_no_chunk() {
    let mut slow = config();
    slow.max_upload_bytes_per_sec = Some(100 * 1024);
    let a = node(1, slow);
    let b = node(2, config());
    let (ab, ba) = pair(&a, &b).await;
    let big = chunk(1, 1024 * 1024); // about ten seconds at the cap
    // The task gets a clone: dropping the last handle would close the whole connection.
    let sender = {
        let ab = ab.clone();
        tokio::spawn(async move { ab.send_chunk(&big, 0).await })
    };
    let incoming = ba.accept_chunk().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    sender.abort();
    assert!(sender.await.unwrap_err().is_cancelled());
    match incoming.read(READ_TIMEOUT).await {
        Err(NetError::StreamReset { code }) => assert_eq!(code, u64::from(RESET_CANCELLED)),
        other => panic!("expected a reset, got {other:?}"),
    }
    // The connection itself is unharmed: the next chunk goes through.
    let next = chunk(2, 1000);
    let (sent, received) =
        tokio::join!(ab.send_chunk(&next, 0), async { ba.accept_chunk().await?.read(READ_TIMEOUT).await });
    sent.unwrap();
    assert_eq!(received.unwrap().header.seq, 2);
}

#[tokio::test]
async fn receiver_refusing_a_chunk_stops_the_sender() {
    let mut slow = config();
    slow.max_upload_bytes_per_sec = Some(200 * 1024);
    let a = node(1, slow);
    let b = node(2, config());
    let (ab, ba) = pair(&a, &b).await;
    let big = chunk(1, 1024 * 1024);
    let sender = tokio::spawn(async move { ab.send_chunk(&big, 0).await });
    ba.accept_chunk().await.unwrap().refuse();
    match sender.await.unwrap() {
        Err(NetError::StreamStopped { code }) => assert_eq!(code, u64::from(STOP_REFUSED)),
        other => panic!("expected a stop, got {other:?}"),
    }
}

/// Writes raw bytes as a chunk stream, bypassing the sender's framing; returns what the receiver made of it
/// and the stop code the raw sender saw, if any.
async fn raw_chunk(bytes: Vec<u8>, finish: bool, receiver_config: EndpointConfig) -> (NetError, Option<u64>) {
    let a = node(1, config());
    let b = node(2, receiver_config);
    let (ab, ba) = pair(&a, &b).await;
    let mut raw = ab.quinn().open_uni().await.unwrap();
    raw.write_all(&bytes).await.unwrap();
    if finish {
        raw.finish().unwrap();
    }
    let timeout = if finish { READ_TIMEOUT } else { Duration::from_millis(300) };
    let err = ba.accept_chunk().await.unwrap().read(timeout).await.unwrap_err();
    let stopped = tokio::time::timeout(READ_TIMEOUT, raw.stopped()).await.unwrap().unwrap();
    (err, stopped.map(|c| c.into_inner()))
}

fn wire(chunk: &Verified) -> Vec<u8> {
    let mut out = Vec::new();
    chunk.encode(&mut out);
    out
}

#[tokio::test]
async fn oversize_declared_payload_is_refused_from_the_header() {
    // Over the protocol limit: the header alone is refused, no payload follows.
    let mut bytes = chunk(1, 10).signed_header_bytes().to_vec();
    bytes[21..25].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
    let (err, stopped) = raw_chunk(bytes, false, config()).await;
    assert!(matches!(err, NetError::Decode(DecodeError::TooLong { .. })), "{err:?}");
    assert_eq!(stopped, Some(u64::from(STOP_REFUSED)));

    // Within the protocol limit but over this node's limit.
    let mut small = config();
    small.max_chunk_payload = 64 * 1024;
    let bytes = chunk(2, 100_000).signed_header_bytes().to_vec();
    let (err, stopped) = raw_chunk(bytes, false, small).await;
    assert!(matches!(err, NetError::ChunkTooLarge { len: 100_000, max: 65536 }), "{err:?}");
    assert_eq!(stopped, Some(u64::from(STOP_REFUSED)));
}

#[tokio::test]
async fn chunk_streams_that_end_wrong_are_errors() {
    let full = wire(&chunk(1, 5000));
    // Ends early, inside the payload.
    let (err, _) = raw_chunk(full[..full.len() - 1].to_vec(), true, config()).await;
    assert!(matches!(err, NetError::ChunkTruncated { .. }), "{err:?}");
    // Ends early, inside the header.
    let (err, _) = raw_chunk(full[..SIGNED_HEADER_LEN - 1].to_vec(), true, config()).await;
    assert!(matches!(err, NetError::ChunkTruncated { got, .. } if got == SIGNED_HEADER_LEN as u64 - 1), "{err:?}");
    // Carries a byte too many.
    let mut longer = full.clone();
    longer.push(0);
    let (err, _) = raw_chunk(longer, true, config()).await;
    assert!(matches!(err, NetError::ChunkTrailingBytes), "{err:?}");
    // Never ends: the read times out.
    let (err, stopped) = raw_chunk(full, false, config()).await;
    assert!(matches!(err, NetError::TimedOut), "{err:?}");
    assert_eq!(stopped, Some(u64::from(STOP_REFUSED)));
}

#[tokio::test]
async fn garbage_on_the_control_stream_is_an_error() {
    let cases: Vec<(Vec<u8>, bool)> = vec![
        (vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3], false), // length over the frame limit
        (vec![0, 0, 0, 1, 200], false),                 // unknown message type
        (vec![0, 0, 0, 3, 3, 0, 0], false),             // body shorter than the message needs
        (vec![0, 0, 0, 9, 3, 0, 0], true),              // stream ends inside a frame
    ];
    for (bytes, finish) in cases {
        let a = node(1, config());
        let b = node(2, config());
        let (ab, ba) = pair(&a, &b).await;
        let (mut raw, _raw_recv) = ab.quinn().open_bi().await.unwrap();
        raw.write_all(&bytes).await.unwrap();
        if finish {
            raw.finish().unwrap();
        }
        let (_send, mut recv) = ba.accept_control().await.unwrap();
        let err = tokio::time::timeout(READ_TIMEOUT, recv.recv()).await.unwrap().unwrap_err();
        match (&err, finish) {
            (NetError::ControlTruncated { .. }, true) | (NetError::Decode(_), false) => {}
            _ => panic!("{bytes:?}: unexpected {err:?}"),
        }
        if !finish {
            let stopped = tokio::time::timeout(READ_TIMEOUT, raw.stopped()).await.unwrap().unwrap();
            assert_eq!(stopped.map(|c| c.into_inner()), Some(u64::from(STOP_CONTROL_ERROR)));
        }
    }
}

#[tokio::test]
async fn upload_cap_bounds_the_rate() {
    const RATE: u64 = 1024 * 1024;
    let mut capped = config();
    capped.max_upload_bytes_per_sec = Some(RATE);
    let a = node(1, capped);
    let b = node(2, config());
    let (ab, ba) = pair(&a, &b).await;
    let receiver = tokio::spawn(async move {
        let mut total = 0;
        for _ in 0..6 {
            total += ba.accept_chunk().await.unwrap().read(READ_TIMEOUT).await.unwrap().payload.len();
        }
        total
    });
    let start = Instant::now();
    for seq in 0..6 {
        ab.send_chunk(&chunk(seq, 256 * 1024), 0).await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let total = receiver.await.unwrap();
    assert_eq!(total, 6 * 256 * 1024);
    // A lower bound on time only (a slow machine can only make it longer): everything beyond the
    // initial burst (at most 128 KiB here) went out at no more than the cap.
    let bytes = (total + 6 * SIGNED_HEADER_LEN) as f64;
    let min_secs = (bytes - 128.0 * 1024.0) / RATE as f64;
    assert!(elapsed >= min_secs * 0.98, "{bytes} bytes in {elapsed:.3}s, cap allows no less than {min_secs:.3}s");
}

#[tokio::test]
async fn urgent_chunk_overtakes_a_bulk_chunk_under_the_cap() {
    let mut capped = config();
    capped.max_upload_bytes_per_sec = Some(256 * 1024);
    let a = node(1, capped);
    let b = node(2, config());
    let (ab, ba) = pair(&a, &b).await;
    let bulk = {
        let ab = ab.clone();
        tokio::spawn(async move { ab.send_chunk(&chunk(1, 768 * 1024), 0).await })
    };
    let first = ba.accept_chunk().await.unwrap();
    // The bulk chunk needs about three seconds; an urgent one must not wait for it.
    let small = chunk(2, 32 * 1024);
    let urgent = ab.send_chunk(&small, 100);
    let (urgent_result, second) = tokio::join!(urgent, ba.accept_chunk());
    urgent_result.unwrap();
    assert!(!bulk.is_finished(), "the urgent chunk finished after the bulk one");
    let urgent_chunk = second.unwrap().read(READ_TIMEOUT).await.unwrap();
    assert_eq!(urgent_chunk.header.seq, 2);
    bulk.await.unwrap().unwrap();
    assert_eq!(first.read(READ_TIMEOUT).await.unwrap().header.seq, 1);
}

#[tokio::test]
async fn many_concurrent_chunk_streams() {
    const N: u64 = 300;
    let mut limited = config();
    limited.max_concurrent_uni_streams = 16; // the sender must queue behind the receiver's limit
    let a = node(1, config());
    let b = node(2, limited);
    let (ab, ba) = pair(&a, &b).await;
    let mut senders = tokio::task::JoinSet::new();
    for seq in 0..N {
        let ab = ab.clone();
        senders.spawn(async move { ab.send_chunk(&chunk(seq, 20_000 + seq as usize * 37), (seq % 7) as i32).await });
    }
    let verifier = Verifier::new(stream_key().id()).unwrap();
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..N {
        let incoming = ba.accept_chunk().await.unwrap();
        let verifier = verifier.clone();
        readers.spawn(async move { incoming.read(READ_TIMEOUT).await.unwrap().verify(&verifier).unwrap() });
    }
    let mut seen = BTreeSet::new();
    while let Some(got) = readers.join_next().await {
        let got = got.unwrap();
        assert_eq!(got, chunk(got.seq(), got.payload().len()));
        seen.insert(got.seq());
    }
    assert_eq!(seen, (0..N).collect());
    while let Some(sent) = senders.join_next().await {
        sent.unwrap().unwrap();
    }
}

#[tokio::test]
async fn close_carries_the_goodbye_reason() {
    let a = node(1, config());
    let b = node(2, config());
    let (ab, ba) = pair(&a, &b).await;
    ab.close(GoodbyeReason::Full, "full, try elsewhere");
    match ba.closed().await {
        NetError::ClosedByPeer { code, reason, message } => {
            assert_eq!(code, GoodbyeReason::Full as u64);
            assert_eq!(reason, Some(GoodbyeReason::Full));
            assert_eq!(message, "full, try elsewhere");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(ab.accept_chunk().await, Err(NetError::LocallyClosed)));
    assert!(matches!(ba.send_chunk(&chunk(1, 10), 0).await, Err(NetError::ClosedByPeer { .. })));

    a.close();
    a.wait_idle().await;
    assert!(a.accept().await.is_none(), "a closed endpoint accepts nothing");
}
