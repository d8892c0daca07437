//! One connection to a neighbour: its control stream and its chunk streams.
//!
//! A chunk stream carries the chunk's signed header ([`SIGNED_HEADER_LEN`] bytes), exactly
//! `payload_len` payload bytes, and then ends. The receiver reads the header first and refuses an
//! oversize payload before reading any of it; it accepts the chunk only if the stream ends cleanly
//! right after the payload. A sender that gives up resets the stream, so a half-sent chunk always
//! arrives as an error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use crowdsurf_proto::NodeId;
use crowdsurf_proto::chunk::{Received, SIGNED_HEADER_LEN, Verified};
use crowdsurf_proto::wire::{FrameReader, GoodbyeReason, MAX_FRAME_LEN, MAX_REASON_LEN, Message};
use quinn::VarInt;

use super::NetError;
use super::error::from_read_exact;
use super::shaper::{PIECE, Shaper};

/// Reset code on a chunk stream whose sender gave up (cancelled or failed) mid-way.
pub const RESET_CANCELLED: u32 = 1;
/// Stop code on a chunk stream the receiver refused (malformed, oversize, too slow).
pub const STOP_REFUSED: u32 = 2;
/// Stop code on a control stream the receiver gave up on after an error.
pub const STOP_CONTROL_ERROR: u32 = 3;

/// QUIC priority of the control stream: above every chunk.
const CONTROL_PRIORITY: i32 = i32::MAX;

/// How much of a chunk payload is allocated before its bytes arrive: a header alone never makes us
/// reserve more than this.
const INITIAL_PAYLOAD_CAPACITY: usize = 256 * 1024;

/// How many bytes the control reader takes from QUIC at a time.
const CONTROL_READ: usize = 16 * 1024;

/// Transport figures of a connection, from quinn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ConnStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// UDP payload bytes sent (QUIC overhead and retransmissions included).
    pub bytes_sent: u64,
    /// UDP payload bytes received.
    pub bytes_received: u64,
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes declared lost.
    pub lost_bytes: u64,
    /// Congestion window, bytes.
    pub congestion_window: u64,
    /// Congestion events (loss or ECN) so far.
    pub congestion_events: u64,
}

/// A connection to one neighbour, authenticated as [`Connection::remote_id`]. Cheap to clone; all
/// clones are one connection. Dropping the last clone closes it.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    remote_id: NodeId,
    shaper: Option<Arc<Shaper>>,
    max_chunk_payload: u32,
}

impl Connection {
    pub(super) fn new(
        inner: quinn::Connection,
        remote_id: NodeId,
        shaper: Option<Arc<Shaper>>,
        max_chunk_payload: u32,
    ) -> Self {
        Connection { inner, remote_id, shaper, max_chunk_payload }
    }

    /// The node at the other end, as proven in the TLS handshake.
    pub fn remote_id(&self) -> NodeId {
        self.remote_id
    }

    /// The other end's address as we see it.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }

    /// A number that tells this connection apart from every other of the endpoint, for maps and logs.
    pub fn stable_id(&self) -> usize {
        self.inner.stable_id()
    }

    /// Opens the control stream (the dialing side does this once). The other side only sees the stream
    /// when the first message arrives, so send one (the hello) straight away.
    pub async fn open_control(&self) -> Result<(ControlSend, ControlRecv), NetError> {
        let (send, recv) = self.inner.open_bi().await?;
        send.set_priority(CONTROL_PRIORITY)?;
        Ok((ControlSend::new(send), ControlRecv::new(recv)))
    }

    /// Waits for the control stream the dialing side opened. Cancel-safe.
    pub async fn accept_control(&self) -> Result<(ControlSend, ControlRecv), NetError> {
        let (send, recv) = self.inner.accept_bi().await?;
        send.set_priority(CONTROL_PRIORITY)?;
        Ok((ControlSend::new(send), ControlRecv::new(recv)))
    }

    /// Sends one chunk on a new unidirectional stream at QUIC `priority` (higher is more urgent; keep it
    /// below `i32::MAX`, which the control stream uses) and waits until the peer has acknowledged all of
    /// it.
    ///
    /// Waits first for the peer to allow another stream (its limit on chunks in flight), then for
    /// upload tokens if the endpoint has a cap. Dropping the future before it completes resets the
    /// stream: the peer's [`IncomingChunk::read`] fails and no partial chunk is ever delivered. Fails
    /// with [`NetError::StreamStopped`] if the peer refuses the chunk.
    pub async fn send_chunk(&self, chunk: &Verified, priority: i32) -> Result<(), NetError> {
        let stream = self.inner.open_uni().await?;
        stream.set_priority(priority)?;
        let mut stream = ResetOnDrop(Some(stream));
        let send = stream.get()?;
        let header = Bytes::copy_from_slice(&chunk.signed_header_bytes());
        let payload = chunk.payload().clone();
        match &self.shaper {
            None => send.write_all_chunks(&mut [header, payload]).await?,
            Some(shaper) => {
                // The header rides with the first piece of payload.
                let first = payload.len().min(PIECE);
                let order = shaper.place();
                shaper.acquire_in_order((header.len() + first) as u64, priority, order).await;
                send.write_all_chunks(&mut [header, payload.slice(..first)]).await?;
                let mut at = first;
                while at < payload.len() {
                    let end = (at + PIECE).min(payload.len());
                    shaper.acquire_in_order((end - at) as u64, priority, order).await;
                    send.write_chunk(payload.slice(at..end)).await?;
                    at = end;
                }
            }
        }
        send.finish()?;
        if let Some(code) = send.stopped().await? {
            return Err(NetError::StreamStopped { code: code.into_inner() });
        }
        stream.disarm();
        tracing::trace!(peer = %self.remote_id.fmt_short(), seq = chunk.seq(), len = chunk.payload().len(), "chunk sent");
        Ok(())
    }

    /// Waits for the next chunk stream from the peer. Cancel-safe. Read it with [`IncomingChunk::read`]
    /// (typically in its own future, so a slow chunk does not hold up the next).
    pub async fn accept_chunk(&self) -> Result<IncomingChunk, NetError> {
        let stream = self.inner.accept_uni().await?;
        Ok(IncomingChunk { stream, max_payload: self.max_chunk_payload })
    }

    /// Closes the connection with `reason` as the application close code and `message` (cut to
    /// 256 bytes) for the peer's logs. Streams in flight are abandoned. Send a goodbye message first if
    /// the peer should learn more (other peers to try).
    pub fn close(&self, reason: GoodbyeReason, message: &str) {
        let mut end = message.len().min(MAX_REASON_LEN);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.inner.close(VarInt::from_u32(reason as u32), &message.as_bytes()[..end]);
    }

    /// Waits until the connection is closed, and says why. Cancel-safe.
    pub async fn closed(&self) -> NetError {
        NetError::from_connection(self.inner.closed().await)
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<NetError> {
        self.inner.close_reason().map(NetError::from_connection)
    }

    /// The quinn connection underneath, for tests and diagnostics. Streams opened on it bypass this
    /// layer's framing, priorities and upload cap.
    pub fn quinn(&self) -> &quinn::Connection {
        &self.inner
    }

    /// Transport figures so far.
    pub fn stats(&self) -> ConnStats {
        let s = self.inner.stats();
        ConnStats {
            rtt: s.path.rtt,
            bytes_sent: s.udp_tx.bytes,
            bytes_received: s.udp_rx.bytes,
            datagrams_sent: s.udp_tx.datagrams,
            datagrams_received: s.udp_rx.datagrams,
            lost_packets: s.path.lost_packets,
            lost_bytes: s.path.lost_bytes,
            congestion_window: s.path.cwnd,
            congestion_events: s.path.congestion_events,
        }
    }
}

/// Holds a send stream and resets it if dropped before [`ResetOnDrop::disarm`]: quinn would otherwise
/// finish a dropped stream, and the peer would take a cut-short chunk for a whole one.
struct ResetOnDrop(Option<quinn::SendStream>);

impl ResetOnDrop {
    fn get(&mut self) -> Result<&mut quinn::SendStream, NetError> {
        self.0.as_mut().ok_or(NetError::StreamClosed)
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(mut stream) = self.0.take() {
            // Fails only if the stream is already fully closed, and then there is nothing to cancel.
            let _ = stream.reset(VarInt::from_u32(RESET_CANCELLED));
        }
    }
}

/// A chunk stream from the peer, not read yet.
#[derive(Debug)]
pub struct IncomingChunk {
    stream: quinn::RecvStream,
    max_payload: u32,
}

impl IncomingChunk {
    /// Reads the whole chunk within `timeout`: the signed header, then exactly the announced payload,
    /// then the end of the stream. Extra bytes, an early end, a reset, an oversize or malformed header,
    /// or the timeout are errors; the stream is then stopped so the peer stops sending. The chunk is not
    /// verified here: call [`Received::verify`].
    pub async fn read(mut self, timeout: Duration) -> Result<Received, NetError> {
        let result = match tokio::time::timeout(timeout, read_chunk(&mut self.stream, self.max_payload)).await {
            Ok(result) => result,
            Err(_) => Err(NetError::TimedOut),
        };
        if result.is_err() {
            // Fails only if the stream is already done; then there is nothing left to refuse.
            let _ = self.stream.stop(VarInt::from_u32(STOP_REFUSED));
        }
        result
    }

    /// Refuses the chunk unread (for instance a duplicate): the peer's send fails with
    /// [`NetError::StreamStopped`].
    pub fn refuse(mut self) {
        let _ = self.stream.stop(VarInt::from_u32(STOP_REFUSED));
    }
}

async fn read_chunk(stream: &mut quinn::RecvStream, max_payload: u32) -> Result<Received, NetError> {
    let mut head = [0u8; SIGNED_HEADER_LEN];
    stream.read_exact(&mut head).await.map_err(|e| from_read_exact(e, SIGNED_HEADER_LEN as u64, 0))?;
    let (header, signature) = Received::decode_signed_header(&mut &head[..])?;
    if header.payload_len > max_payload {
        return Err(NetError::ChunkTooLarge { len: header.payload_len, max: max_payload });
    }
    let len = header.payload_len as usize;
    let expected = (SIGNED_HEADER_LEN + len) as u64;
    // Grow with what actually arrives rather than trusting the header for the allocation.
    let mut payload = BytesMut::with_capacity(len.min(INITIAL_PAYLOAD_CAPACITY));
    while payload.len() < len {
        match stream.read_chunk(len - payload.len(), true).await? {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => {
                return Err(NetError::ChunkTruncated { expected, got: (SIGNED_HEADER_LEN + payload.len()) as u64 });
            }
        }
    }
    // The stream must end right here.
    if stream.read_chunk(1, true).await?.is_some() {
        return Err(NetError::ChunkTrailingBytes);
    }
    Ok(Received { header, signature, payload: payload.freeze() })
}

/// The sending half of the control stream.
#[derive(Debug)]
pub struct ControlSend {
    stream: quinn::SendStream,
    buf: Vec<u8>,
}

impl ControlSend {
    fn new(stream: quinn::SendStream) -> Self {
        ControlSend { stream, buf: Vec::new() }
    }

    /// Sends one message. Not cancel-safe: a send dropped half-way leaves half a frame on the stream,
    /// so drop the connection rather than this future.
    pub async fn send(&mut self, message: &Message) -> Result<(), NetError> {
        self.buf.clear();
        message.encode_frame(&mut self.buf);
        let len = self.buf.len().saturating_sub(4);
        if len > MAX_FRAME_LEN {
            return Err(NetError::MessageTooLong { len });
        }
        self.stream.write_all(&self.buf).await?;
        Ok(())
    }

    /// Ends the stream after the messages already sent (the peer's `recv` then returns `Ok(None)`).
    pub fn finish(mut self) -> Result<(), NetError> {
        self.stream.finish()?;
        Ok(())
    }
}

/// The receiving half of the control stream.
#[derive(Debug)]
pub struct ControlRecv {
    stream: quinn::RecvStream,
    reader: FrameReader,
}

impl ControlRecv {
    fn new(stream: quinn::RecvStream) -> Self {
        ControlRecv { stream, reader: FrameReader::new() }
    }

    /// The next message, or `Ok(None)` when the peer ended the stream cleanly between messages.
    /// Malformed or oversize frames, a stream ending inside a frame, and a reset are errors; after an
    /// error the stream is stopped and should not be read again. Cancel-safe: no bytes are lost if the
    /// future is dropped.
    pub async fn recv(&mut self) -> Result<Option<Message>, NetError> {
        let result = self.next().await;
        if result.is_err() {
            let _ = self.stream.stop(VarInt::from_u32(STOP_CONTROL_ERROR));
        }
        result
    }

    async fn next(&mut self) -> Result<Option<Message>, NetError> {
        loop {
            if let Some(message) = self.reader.next_message()? {
                return Ok(Some(message));
            }
            // Everything buffered is less than one frame, and frames are bounded, so this stays small.
            match self.stream.read_chunk(CONTROL_READ, true).await? {
                Some(chunk) => self.reader.extend(&chunk.bytes),
                None if self.reader.buffered() == 0 => return Ok(None),
                None => return Err(NetError::ControlTruncated { buffered: self.reader.buffered() }),
            }
        }
    }
}
