//! The one error type of the transport layer, and how quinn's errors map onto it.

use std::net::SocketAddr;

use crowdsurf_proto::NodeId;
use crowdsurf_proto::wire::{DecodeError, GoodbyeReason};
use quinn::{ConnectionError, ReadError, ReadExactError, StoppedError, TransportErrorCode, WriteError};

/// The TLS alert `no_application_protocol` (RFC 7301), as QUIC carries it in a close.
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// What went wrong in the transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// [`super::Endpoint::bind`] was called outside a tokio runtime.
    #[error("no tokio runtime: the endpoint must be bound from inside one")]
    NoRuntime,
    /// The UDP socket could not be set up on this address.
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
    /// A setting in the endpoint configuration is out of range.
    #[error("bad endpoint configuration: {0}")]
    Config(String),
    /// The TLS configuration could not be built (a bug or an unusable key, not a network problem).
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The node to connect to has no addresses.
    #[error("no address known for node {id}")]
    NoAddresses {
        /// The node.
        id: NodeId,
    },
    /// Asked to connect to our own node id.
    #[error("refusing to connect to ourselves")]
    ConnectToSelf,
    /// quinn refused to start the connection (bad address, endpoint closed, ...).
    #[error("cannot start connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The node at the address proved a different key than the node id we meant to reach.
    #[error("expected node {expected} but reached node {actual}")]
    WrongNodeId {
        /// The node id we dialed.
        expected: NodeId,
        /// The node id that answered.
        actual: NodeId,
    },
    /// The peer did not present a usable ed25519 identity.
    #[error("peer presented no valid ed25519 identity")]
    BadPeerIdentity,
    /// The other side does not speak our protocol (ALPN `crowdsurf/1`).
    #[error("the peer does not speak {} (ALPN mismatch)", String::from_utf8_lossy(crowdsurf_proto::ALPN))]
    AlpnMismatch,
    /// A deadline of ours passed: a connect or accept handshake, or a chunk read
    /// ([`super::IncomingChunk::read`]). The connection itself may still be fine.
    #[error("timed out")]
    TimedOut,
    /// Nothing came from the peer for longer than the idle timeout: the connection is gone.
    #[error("connection idle for too long (peer gone)")]
    IdleTimeout,
    /// The peer closed the connection with an application code (a goodbye).
    #[error("closed by peer: {reason:?} (code {code}) {message:?}")]
    ClosedByPeer {
        /// The application close code.
        code: u64,
        /// The code as a goodbye reason, if it is one.
        reason: Option<GoodbyeReason>,
        /// The peer's text (lossy UTF-8, at most 256 bytes).
        message: String,
    },
    /// We closed the connection (or the endpoint) ourselves.
    #[error("connection closed locally")]
    LocallyClosed,
    /// Any other end of the connection: protocol violation, reset, handshake failure.
    #[error("connection lost: {0}")]
    Connection(ConnectionError),
    /// The peer stopped the stream we were writing (it no longer wants the chunk).
    #[error("peer stopped the stream (code {code})")]
    StreamStopped {
        /// The peer's code.
        code: u64,
    },
    /// The peer reset the stream we were reading (it cancelled the chunk).
    #[error("peer reset the stream (code {code})")]
    StreamReset {
        /// The peer's code.
        code: u64,
    },
    /// The stream was already finished or reset on our side.
    #[error("stream already closed")]
    StreamClosed,
    /// A chunk stream ended before the signed header and the whole payload arrived.
    #[error("chunk stream ended after {got} of {expected} bytes")]
    ChunkTruncated {
        /// Bytes the stream should have carried.
        expected: u64,
        /// Bytes it carried.
        got: u64,
    },
    /// A chunk stream carried bytes after the payload the header announced.
    #[error("chunk stream carries bytes beyond the announced payload")]
    ChunkTrailingBytes,
    /// A chunk header announces a payload over our limit; refused before reading it.
    #[error("chunk payload of {len} bytes is over the limit of {max}")]
    ChunkTooLarge {
        /// Announced payload length.
        len: u32,
        /// Our limit.
        max: u32,
    },
    /// Bytes from the peer do not decode (malformed chunk header or control message).
    #[error("malformed data from peer: {0}")]
    Decode(#[from] DecodeError),
    /// The control stream ended in the middle of a message.
    #[error("control stream ended inside a message ({buffered} bytes left over)")]
    ControlTruncated {
        /// Bytes of the unfinished message.
        buffered: usize,
    },
    /// A message we were asked to send encodes to more than the frame limit.
    #[error("message of {len} bytes is over the frame limit")]
    MessageTooLong {
        /// Encoded length (type and body).
        len: usize,
    },
}

impl NetError {
    /// Maps a connection-level error, recognising the ALPN alert and application closes.
    pub(crate) fn from_connection(err: ConnectionError) -> Self {
        let no_alpn = TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL);
        match err {
            ConnectionError::ApplicationClosed(close) => {
                let code = close.error_code.into_inner();
                let bytes = &close.reason[..close.reason.len().min(crowdsurf_proto::wire::MAX_REASON_LEN)];
                NetError::ClosedByPeer {
                    code,
                    reason: goodbye_reason(code),
                    message: String::from_utf8_lossy(bytes).into_owned(),
                }
            }
            ConnectionError::LocallyClosed => NetError::LocallyClosed,
            ConnectionError::TimedOut => NetError::IdleTimeout,
            ConnectionError::TransportError(ref e) if e.code == no_alpn => NetError::AlpnMismatch,
            ConnectionError::ConnectionClosed(ref c) if c.error_code == no_alpn => NetError::AlpnMismatch,
            other => NetError::Connection(other),
        }
    }

    /// Whether the whole connection is gone (as opposed to one stream, one message or one deadline).
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            NetError::ClosedByPeer { .. } | NetError::LocallyClosed | NetError::Connection(_) | NetError::IdleTimeout
        )
    }
}

impl From<ConnectionError> for NetError {
    fn from(err: ConnectionError) -> Self {
        NetError::from_connection(err)
    }
}

impl From<WriteError> for NetError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::Stopped(code) => NetError::StreamStopped { code: code.into_inner() },
            WriteError::ConnectionLost(e) => NetError::from_connection(e),
            WriteError::ClosedStream | WriteError::ZeroRttRejected => NetError::StreamClosed,
        }
    }
}

impl From<StoppedError> for NetError {
    fn from(err: StoppedError) -> Self {
        match err {
            StoppedError::ConnectionLost(e) => NetError::from_connection(e),
            StoppedError::ZeroRttRejected => NetError::StreamClosed,
        }
    }
}

impl From<ReadError> for NetError {
    fn from(err: ReadError) -> Self {
        match err {
            ReadError::Reset(code) => NetError::StreamReset { code: code.into_inner() },
            ReadError::ConnectionLost(e) => NetError::from_connection(e),
            ReadError::ClosedStream | ReadError::IllegalOrderedRead | ReadError::ZeroRttRejected => {
                NetError::StreamClosed
            }
        }
    }
}

impl From<quinn::ClosedStream> for NetError {
    fn from(_: quinn::ClosedStream) -> Self {
        NetError::StreamClosed
    }
}

/// Reads a read-exact error, given how many bytes the whole read wanted.
pub(crate) fn from_read_exact(err: ReadExactError, expected: u64, before: u64) -> NetError {
    match err {
        ReadExactError::FinishedEarly(n) => NetError::ChunkTruncated { expected, got: before + n as u64 },
        ReadExactError::ReadError(e) => e.into(),
    }
}

/// The goodbye reason whose code this is.
pub(crate) fn goodbye_reason(code: u64) -> Option<GoodbyeReason> {
    GoodbyeReason::from_code(code)
}
