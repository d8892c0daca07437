//! The adversary kit: real QUIC clients that speak crowdsurf badly on purpose.
//!
//! An [`Adversary`] has a proper node identity and completes the TLS handshake, so it reaches the
//! protocol layer of its target; what it does there is up to the test: forge chunks, flood requests,
//! send garbage, announce chunks it never sends, subscribe and never read.

use std::time::Duration;

use bytes::Bytes;
use crowdsurf_peer::net::{Connection, ControlRecv, ControlSend, Endpoint, EndpointConfig, NetError};
use crowdsurf_proto::chunk::{Flags, Received, Verified};
use crowdsurf_proto::window::BufferMap;
use crowdsurf_proto::wire::{GoodbyeReason, Hello, Message, NodeAddr, Role};
use crowdsurf_proto::{NodeKey, StreamId, StreamKey};

use crate::{loopback, now_us};

/// The ways a chunk can be forged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    /// Signed by a key that is not the stream's.
    WrongKey,
    /// One payload bit flipped after signing.
    FlippedPayload,
    /// One header bit flipped (the capture time) after signing.
    FlippedHeader,
    /// One signature bit flipped.
    FlippedSignature,
    /// A genuine-looking chunk of another stream.
    OtherStream,
}

impl Forgery {
    /// Every kind.
    pub const ALL: [Forgery; 5] = [
        Forgery::WrongKey,
        Forgery::FlippedPayload,
        Forgery::FlippedHeader,
        Forgery::FlippedSignature,
        Forgery::OtherStream,
    ];
}

/// A forged chunk for sequence number `seq` of `stream` (whose real key the forger does not have;
/// `genuine` is any chunk of the stream the forger has seen, used for the bit-flip forgeries).
pub fn forge(kind: Forgery, seq: u64, genuine: Option<&Verified>) -> Vec<u8> {
    let fake = StreamKey::from_secret_bytes([0xF0; 32]);
    let payload = Bytes::from(vec![0x47u8; 188 * 4]);
    let mut bytes = Vec::new();
    match (kind, genuine) {
        (Forgery::WrongKey | Forgery::OtherStream, _) | (_, None) => {
            Verified::sign(&fake, seq, now_us(), 250_000, Flags::RANDOM_ACCESS, payload).encode(&mut bytes);
        }
        (flip, Some(g)) => {
            g.encode(&mut bytes);
            let at = match flip {
                Forgery::FlippedPayload => bytes.len() - 1,
                Forgery::FlippedHeader => 12,
                _ => crowdsurf_proto::chunk::HEADER_LEN + 3,
            };
            bytes[at] ^= 0x01;
        }
    }
    bytes
}

/// A misbehaving node connected to one target.
pub struct Adversary {
    /// Its endpoint.
    pub endpoint: Endpoint,
    /// The connection to the target.
    pub conn: Connection,
    /// Control stream, sending half.
    pub send: ControlSend,
    /// Control stream, receiving half.
    pub recv: ControlRecv,
    /// Its identity.
    pub key: NodeKey,
    stream: StreamId,
}

impl Adversary {
    /// Connects to `target` as node `seed` and exchanges hellos.
    pub async fn join(target: &NodeAddr, stream: StreamId, seed: u64) -> Result<Adversary, NetError> {
        let mut secret = [0x5Au8; 32];
        secret[..8].copy_from_slice(&seed.to_le_bytes());
        let key = NodeKey::from_secret_bytes(secret);
        let endpoint = Endpoint::bind(&key, EndpointConfig::new(loopback()))?;
        let conn = endpoint.connect(target).await?;
        let (mut send, mut recv) = conn.open_control().await?;
        send.send(&Message::Hello(Box::new(Hello {
            version: crowdsurf_proto::PROTOCOL_VERSION,
            stream,
            node: key.id(),
            role: Role::Relay,
            listen: vec![],
            have: BufferMap::empty(0),
        })))
        .await?;
        // Their hello (or a refusal).
        let _ = tokio::time::timeout(Duration::from_secs(5), recv.recv()).await;
        Ok(Adversary { endpoint, conn, send, recv, key, stream })
    }

    /// The stream it claims to carry.
    pub fn stream(&self) -> StreamId {
        self.stream
    }

    /// Sends raw bytes as one chunk stream.
    pub async fn send_raw_chunk(&self, bytes: &[u8]) -> Result<(), NetError> {
        let mut s = self.conn.quinn().open_uni().await.map_err(NetError::from)?;
        s.write_all(bytes).await.map_err(|_| NetError::StreamClosed)?;
        let _ = s.finish();
        Ok(())
    }

    /// Waits for the target to close the connection; returns its goodbye reason (None if it did not
    /// close within `timeout`, or closed without one).
    pub async fn closed_by_target(&self, timeout: Duration) -> Option<GoodbyeReason> {
        match tokio::time::timeout(timeout, self.conn.closed()).await {
            Ok(NetError::ClosedByPeer { reason, .. }) => reason,
            _ => None,
        }
    }

    /// Requests every sequence number in `range`, `MAX_REQUEST` at a time, as fast as it can, until
    /// the connection fails or `max_messages` have been sent. Returns how many were sent.
    pub async fn flood_requests(&mut self, range: std::ops::Range<u64>, max_messages: usize) -> usize {
        let seqs: Vec<u64> = range.collect();
        let mut sent = 0;
        for batch in seqs.chunks(crowdsurf_proto::wire::MAX_REQUEST).cycle().take(max_messages) {
            if self.send.send(&Message::Request { seqs: batch.to_vec() }).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    }

    /// Closes its endpoint.
    pub fn close(&self) {
        self.endpoint.close();
    }

    /// Leaves politely: a goodbye (`Leaving`), then the connection and endpoint close.
    pub async fn leave(mut self) {
        let _ = self
            .send
            .send(&Message::Goodbye { reason: GoodbyeReason::Leaving, peers: vec![], message: "bye".into() })
            .await;
        let _ = self.send.finish();
        self.conn.close(GoodbyeReason::Leaving, "bye");
        self.endpoint.close();
    }

    /// The free-riding liar: for `how_long`, claims every chunk the moment it is published (it
    /// reads `edge`, as if it had a direct line to the broadcaster) so it looks like the best
    /// parent there is, and never sends a byte of chunk data: requests and subscriptions are read
    /// and ignored. Returns what the target did to it.
    pub async fn lie_and_free_ride(&mut self, edge: &std::sync::atomic::AtomicU64, how_long: Duration) -> FreeRide {
        let mut ride = FreeRide::default();
        let end = tokio::time::Instant::now() + how_long;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut claimed = 0u64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => break,
                _ = tick.tick() => {
                    let now = edge.load(std::sync::atomic::Ordering::Relaxed);
                    if now > claimed {
                        claimed = now;
                        if self.send.send(&Message::Have { seq: now }).await.is_err() {
                            break;
                        }
                    }
                }
                message = self.recv.recv() => match message {
                    Ok(Some(Message::Subscribe { .. })) => ride.subscribed += 1,
                    Ok(Some(Message::Request { seqs })) => ride.requested += seqs.len(),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                },
            }
        }
        ride.closed = match tokio::time::timeout(Duration::from_millis(1), self.conn.closed()).await {
            Ok(NetError::ClosedByPeer { reason, .. }) => reason,
            _ => None,
        };
        ride
    }
}

/// What a target did to a free-riding liar ([`Adversary::lie_and_free_ride`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FreeRide {
    /// Subscribe messages received: the target picked it as a parent this many times.
    pub subscribed: usize,
    /// Chunks it was asked for (and never sent).
    pub requested: usize,
    /// The goodbye reason, if the target closed the connection.
    pub closed: Option<GoodbyeReason>,
}

/// Reads one genuine chunk from `target` by asking for it (so bit-flip forgeries start from a real
/// chunk). Returns None if it does not come.
pub async fn fetch_genuine(adv: &mut Adversary, seq: u64) -> Option<Verified> {
    adv.send.send(&Message::Request { seqs: vec![seq] }).await.ok()?;
    let incoming = tokio::time::timeout(Duration::from_secs(3), adv.conn.accept_chunk()).await.ok()?.ok()?;
    let received: Received = incoming.read(Duration::from_secs(3)).await.ok()?;
    crowdsurf_proto::chunk::Verifier::new(adv.stream).ok().and_then(|v| received.verify(&v).ok())
}
