//! The QUIC transport under a node: one [`Endpoint`] per node, one [`Connection`] per neighbour.
//!
//! This layer only moves bytes; the swarm logic lives in `crowdsurf-proto`. What it guarantees:
//!
//! - **Identity.** A node's ed25519 [`NodeKey`] is its TLS identity (RFC 7250 raw public key, see
//!   [`tls`]). Both sides authenticate: [`Endpoint::connect`] fails with [`NetError::WrongNodeId`] unless
//!   the node answering holds the key of the id it was asked to reach, and [`Endpoint::accept`] learns the
//!   remote [`NodeId`] from the handshake. ALPN is [`crowdsurf_proto::ALPN`]; a mismatch is
//!   [`NetError::AlpnMismatch`].
//! - **Control stream.** One bidirectional stream per connection carrying length-prefixed messages
//!   ([`ControlSend`], [`ControlRecv`]). The dialer opens it ([`Connection::open_control`]); the other side
//!   sees it once the first message arrives ([`Connection::accept_control`]). It is sent at the highest
//!   QUIC priority, so chunks never starve it.
//! - **Chunks.** Each chunk travels on its own unidirectional stream: the signed header, then exactly
//!   `payload_len` bytes, then the end of the stream ([`Connection::send_chunk`],
//!   [`Connection::accept_chunk`], [`IncomingChunk::read`]). A send that is cancelled (its future
//!   dropped) resets the stream, and the receiver gets an error, never a partial chunk. The peer's
//!   limit on concurrent unidirectional streams bounds the chunks in flight on a connection.
//! - **Upload cap.** With [`EndpointConfig::max_upload_bytes_per_sec`], all chunk sends of an endpoint
//!   share a token bucket ([`shaper`]) and write in pieces of [`shaper::PIECE`] bytes, higher priority first.
//! - **Bounds.** Nothing from the network is trusted for a size: frames are capped by the proto codec,
//!   chunk payloads by [`EndpointConfig::max_chunk_payload`] (checked on the header, before any payload
//!   is read), buffered data by the QUIC flow-control windows.
//!
//! No tasks are spawned here except quinn's own endpoint driver. Every future is meant to be polled
//! by the caller (the node's driver), usually inside `tokio::select!`; the docs say which are
//! cancel-safe.

mod conn;
pub mod emulate;
mod error;
pub mod shaper;
pub mod tls;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crowdsurf_proto::chunk::MAX_PAYLOAD;
use crowdsurf_proto::wire::NodeAddr;
use crowdsurf_proto::{NodeId, NodeKey};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

pub use conn::{
    ConnStats, Connection, ControlRecv, ControlSend, IncomingChunk, RESET_CANCELLED, STOP_CONTROL_ERROR, STOP_REFUSED,
};
pub use emulate::{LinkModel, LinkStats};
pub use error::NetError;
use shaper::{Shaper, TokenBucket};
use tls::TlsIdentity;

/// Application close code used when the endpoint as a whole shuts down.
const ENDPOINT_CLOSE_CODE: u32 = 0;

/// The initial congestion window of our connections: about two chunks of a 2.5 Mbit/s stream in
/// 250 ms chunks, against QUIC's usual ten datagrams (14,720 bytes).
///
/// Almost every connection of a swarm node starts by carrying a whole chunk: a newcomer's first
/// repairs, a new child's first push. From ten datagrams, slow start takes three round trips to
/// carry 78 kB; from this window, one. In the lab (`lab --peers 100 --duration 30s --delay 20ms`,
/// two runs each) the p99 arrival latency over the run went from 651–657 ms to 501–532 ms, the
/// start-up being where it comes from. Slow start still grows the window from here and loss still
/// shrinks it. quinn paces by the window and the round trip, not by the uplink, so a first flight
/// this size would sit in a thin uplink's queue for a second: with an upload cap configured, the
/// window is cut to 100 ms of the cap.
pub const DEFAULT_INITIAL_WINDOW: u64 = 160_000;

/// QUIC's usual initial window (RFC 9002: ten datagrams of 1,472 bytes), the least we use.
pub const QUIC_INITIAL_WINDOW: u64 = 14_720;

/// The most connection attempts held before the node has looked at them; more are refused by quinn.
pub const MAX_INCOMING: usize = 1024;

/// How a node's endpoint is set up. [`Default`] gives settings for a node on a real network.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointConfig {
    /// Where to listen (UDP). Port 0 picks a free port; see [`Endpoint::local_addr`].
    pub listen: SocketAddr,
    /// A connection with no traffic for this long is dead. Also bounds a handshake that stalls.
    pub idle_timeout: Duration,
    /// Send a keep-alive after this much quiet, so live but idle connections do not time out. Zero: never.
    pub keep_alive: Duration,
    /// How long [`Endpoint::connect`] tries one address, and [`Endpoint::accept`] waits for one handshake.
    pub connect_timeout: Duration,
    /// How many chunk streams a peer may have open towards us at once (chunks in flight from it).
    pub max_concurrent_uni_streams: u32,
    /// How many bytes of one stream the peer may send ahead of what we have read.
    pub stream_receive_window: u32,
    /// How many bytes of all streams of a connection the peer may send ahead of what we have read.
    pub receive_window: u32,
    /// How many bytes we buffer for sending on one connection.
    pub send_window: u64,
    /// UDP socket send and receive buffer size asked of the kernel (it may give less; see the logs).
    pub socket_buffer_bytes: usize,
    /// Upload cap for chunk data over all connections, bytes per second; `None`: no cap.
    pub max_upload_bytes_per_sec: Option<u64>,
    /// The largest chunk payload accepted from a peer; at most [`MAX_PAYLOAD`].
    pub max_chunk_payload: u32,
    /// Bytes a new connection may have in flight before its first acknowledgement (QUIC's initial
    /// congestion window; see [`DEFAULT_INITIAL_WINDOW`]), lowered to 100 ms of
    /// [`EndpointConfig::max_upload_bytes_per_sec`] when that is set (see
    /// [`EndpointConfig::effective_initial_window`]).
    pub initial_window: u64,
    /// Emulate a link under the socket (delay, jitter, loss, upload bottleneck; see [`emulate`]).
    /// `None`: the real socket as it is, with no overhead.
    pub link: Option<LinkModel>,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            max_concurrent_uni_streams: 64,
            stream_receive_window: 1024 * 1024,
            receive_window: 4 * 1024 * 1024,
            send_window: 4 * 1024 * 1024,
            socket_buffer_bytes: 4 * 1024 * 1024,
            max_upload_bytes_per_sec: None,
            max_chunk_payload: MAX_PAYLOAD,
            initial_window: DEFAULT_INITIAL_WINDOW,
            link: None,
        }
    }
}

impl EndpointConfig {
    /// The defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        EndpointConfig { listen, ..Default::default() }
    }

    /// [`EndpointConfig::initial_window`], but with an upload cap at most 100 ms of it (and never
    /// below QUIC's usual ten datagrams): a node that knows its uplink is thin does not queue a
    /// second of it behind one fresh connection's first flight.
    pub fn effective_initial_window(&self) -> u64 {
        match self.max_upload_bytes_per_sec {
            Some(rate) => self.initial_window.min((rate / 10).max(QUIC_INITIAL_WINDOW)),
            None => self.initial_window,
        }
    }

    fn transport(&self) -> Result<TransportConfig, NetError> {
        let mut t = TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| NetError::Config("idle timeout is out of range".into()))?;
        t.max_idle_timeout(Some(idle));
        t.keep_alive_interval((!self.keep_alive.is_zero()).then_some(self.keep_alive));
        t.max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_uni_streams));
        // One control stream per connection, opened by the dialer.
        t.max_concurrent_bidi_streams(VarInt::from_u32(1));
        t.stream_receive_window(VarInt::from_u32(self.stream_receive_window));
        t.receive_window(VarInt::from_u32(self.receive_window));
        t.send_window(self.send_window);
        t.datagram_receive_buffer_size(None);
        if self.initial_window == 0 {
            return Err(NetError::Config("initial_window must be positive".into()));
        }
        let mut cc = quinn::congestion::CubicConfig::default();
        cc.initial_window(self.effective_initial_window());
        t.congestion_controller_factory(Arc::new(cc));
        Ok(t)
    }
}

#[derive(Debug)]
struct Inner {
    endpoint: quinn::Endpoint,
    tls: TlsIdentity,
    transport: Arc<TransportConfig>,
    shaper: Option<Arc<Shaper>>,
    id: NodeId,
    local_addr: SocketAddr,
    connect_timeout: Duration,
    max_chunk_payload: u32,
    link: Option<emulate::LinkHandle>,
}

/// A node's QUIC endpoint: dials and accepts connections. Cheap to clone; all clones are one endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl Endpoint {
    /// Binds the UDP socket and starts the endpoint with `key` as its identity.
    ///
    /// Must be called inside a tokio runtime (quinn spawns its endpoint driver on it).
    pub fn bind(key: &NodeKey, config: EndpointConfig) -> Result<Endpoint, NetError> {
        Self::bind_with_tls(key, config, TlsIdentity::new(key)?)
    }

    fn bind_with_tls(key: &NodeKey, config: EndpointConfig, tls: TlsIdentity) -> Result<Endpoint, NetError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetError::NoRuntime)?;
        if config.max_chunk_payload > MAX_PAYLOAD {
            return Err(NetError::Config(format!("max_chunk_payload is over {MAX_PAYLOAD}")));
        }
        let shaper = match config.max_upload_bytes_per_sec {
            None => None,
            Some(0) => return Err(NetError::Config("max_upload_bytes_per_sec must be positive".into())),
            Some(rate) => Some(Arc::new(Shaper::new(rate, TokenBucket::default_capacity(rate)))),
        };
        let transport = Arc::new(config.transport()?);
        let socket = bind_socket(config.listen, config.socket_buffer_bytes)?;
        let local_addr = socket.local_addr().map_err(|source| NetError::Bind { addr: config.listen, source })?;

        let server_tls = QuicServerConfig::try_from(tls.server_config()?).map_err(|e| NetError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(transport.clone());
        // Connection attempts waiting for the node to look at them (each holds its first packet and
        // whatever else arrives for it meanwhile): beyond these, quinn refuses at once. The node
        // answers each within microseconds, so these only bound memory under a flood.
        server.max_incoming(MAX_INCOMING);
        server.incoming_buffer_size(64 * 1024);
        server.incoming_buffer_size_total(8 * 1024 * 1024);

        let _guard = runtime.enter();
        let bind_err = |source| NetError::Bind { addr: config.listen, source };
        let (endpoint, link) = match &config.link {
            None => {
                let endpoint = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(server),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .map_err(bind_err)?;
                (endpoint, None)
            }
            Some(model) => {
                model.validate().map_err(NetError::Config)?;
                use quinn::Runtime as _;
                let real = quinn::TokioRuntime.wrap_udp_socket(socket).map_err(bind_err)?;
                let (emulated, handle) = emulate::EmulatedSocket::new(real, model.clone(), &runtime);
                let endpoint = quinn::Endpoint::new_with_abstract_socket(
                    quinn::EndpointConfig::default(),
                    Some(server),
                    Arc::new(emulated),
                    Arc::new(quinn::TokioRuntime),
                )
                .map_err(bind_err)?;
                (endpoint, Some(handle))
            }
        };
        tracing::info!(node = %key.id().fmt_short(), addr = %local_addr, cap = ?config.max_upload_bytes_per_sec, link = ?config.link, "endpoint bound");
        Ok(Endpoint {
            inner: Arc::new(Inner {
                endpoint,
                tls,
                transport,
                shaper,
                id: key.id(),
                local_addr,
                connect_timeout: config.connect_timeout,
                max_chunk_payload: config.max_chunk_payload,
                link,
            }),
        })
    }

    /// What the emulated link under this endpoint did so far; `None` without [`EndpointConfig::link`].
    pub fn link_stats(&self) -> Option<LinkStats> {
        self.inner.link.as_ref().map(emulate::LinkHandle::stats)
    }

    /// The emulated link under this endpoint (to read its counters or cut it); `None` without
    /// [`EndpointConfig::link`].
    pub fn link(&self) -> Option<emulate::LinkHandle> {
        self.inner.link.clone()
    }

    /// The address the socket is bound to (with the real port if the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.id
    }

    /// Connects to `peer`, trying its addresses in order until one answers as `peer.id`.
    ///
    /// Fails with [`NetError::WrongNodeId`] if a node answers with another key, [`NetError::AlpnMismatch`]
    /// if it does not speak our protocol, [`NetError::TimedOut`] if nothing answers within the connect
    /// timeout. With several addresses, the most telling error is returned (a timeout only if all timed out).
    pub async fn connect(&self, peer: &NodeAddr) -> Result<Connection, NetError> {
        if peer.addrs.is_empty() {
            return Err(NetError::NoAddresses { id: peer.id });
        }
        if peer.id == self.inner.id {
            return Err(NetError::ConnectToSelf);
        }
        let mut best: Option<NetError> = None;
        for &addr in &peer.addrs {
            match self.connect_addr(peer.id, addr).await {
                Ok(conn) => return Ok(conn),
                Err(err) => {
                    tracing::debug!(peer = %peer.id.fmt_short(), %addr, error = %err, "connect attempt failed");
                    if best.is_none() || !matches!(err, NetError::TimedOut | NetError::IdleTimeout) {
                        best = Some(err);
                    }
                }
            }
        }
        Err(best.unwrap_or(NetError::NoAddresses { id: peer.id }))
    }

    async fn connect_addr(&self, expected: NodeId, addr: SocketAddr) -> Result<Connection, NetError> {
        let seen = Arc::new(OnceLock::new());
        let tls = self.inner.tls.client_config(expected, seen.clone())?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(self.inner.transport.clone());
        let connecting = self.inner.endpoint.connect_with(client, addr, tls::SERVER_NAME)?;
        let conn = match tokio::time::timeout(self.inner.connect_timeout, connecting).await {
            Err(_) => return Err(NetError::TimedOut),
            Ok(Err(err)) => {
                return Err(match seen.get() {
                    Some(&actual) if actual != expected => NetError::WrongNodeId { expected, actual },
                    _ => NetError::from_connection(err),
                });
            }
            Ok(Ok(conn)) => conn,
        };
        // The verifier already insisted on `expected`; check again what the connection reports.
        match tls::node_id_from_identity(conn.peer_identity()) {
            Some(id) if id == expected => {}
            other => {
                conn.close(VarInt::from_u32(ENDPOINT_CLOSE_CODE), b"wrong identity");
                return Err(match other {
                    Some(actual) => NetError::WrongNodeId { expected, actual },
                    None => NetError::BadPeerIdentity,
                });
            }
        }
        tracing::debug!(peer = %expected.fmt_short(), %addr, "connected");
        Ok(Connection::new(conn, expected, self.inner.shaper.clone(), self.inner.max_chunk_payload))
    }

    /// The next incoming connection, handshake done and the remote node id known. `None` once the
    /// endpoint is closed.
    ///
    /// Handshakes are completed one after another here, each bounded by the connect timeout; to run
    /// them concurrently use [`Endpoint::accept_incoming`] and [`Accepting::finish`]. Cancel-safe
    /// while waiting for a new connection (not during its handshake).
    pub async fn accept(&self) -> Option<Result<Connection, NetError>> {
        let accepting = self.accept_incoming().await?;
        Some(accepting.finish().await)
    }

    /// The next connection attempt, before its handshake. `None` once the endpoint is closed.
    /// Cancel-safe.
    pub async fn accept_incoming(&self) -> Option<Accepting> {
        let incoming = self.inner.endpoint.accept().await?;
        Some(Accepting { incoming, endpoint: self.clone() })
    }

    /// Closes every connection (application code 0) and stops accepting. Pending operations fail.
    pub fn close(&self) {
        self.inner.endpoint.close(VarInt::from_u32(ENDPOINT_CLOSE_CODE), b"endpoint closed");
    }

    /// Waits until every connection has finished closing, so the close reached the peers.
    pub async fn wait_idle(&self) {
        self.inner.endpoint.wait_idle().await;
    }
}

/// A connection attempt whose handshake has not run yet (see [`Endpoint::accept_incoming`]).
#[derive(Debug)]
pub struct Accepting {
    incoming: quinn::Incoming,
    endpoint: Endpoint,
}

impl Accepting {
    /// Where the attempt comes from (not yet validated).
    pub fn remote_addr(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Whether the remote address is proven: the attempt carries a token we issued to that address
    /// (after a [`Accepting::retry`]), so the packets really come from there.
    pub fn remote_address_validated(&self) -> bool {
        self.incoming.remote_address_validated()
    }

    /// Refuses the attempt without a handshake: answers with one small CONNECTION_REFUSED close
    /// packet (the dialer sees the connection refused at once) and keeps no state.
    pub fn refuse(self) {
        self.incoming.refuse();
    }

    /// Answers with a QUIC Retry packet carrying an address-validation token, and keeps no state: a
    /// real dialer (quinn does this by itself) comes back with the token, one round trip later, and
    /// then [`Accepting::remote_address_validated`] is true; a spoofed source never does, so it costs
    /// us one small packet and no handshake. Gives the attempt back if it was already validated (a
    /// second retry is not allowed).
    pub fn retry(self) -> Result<(), Box<Accepting>> {
        let endpoint = self.endpoint;
        self.incoming.retry().map_err(|e| Box::new(Accepting { incoming: e.into_incoming(), endpoint }))
    }

    /// Drops the attempt without sending anything.
    pub fn ignore(self) {
        self.incoming.ignore();
    }

    /// Runs the handshake, bounded by the connect timeout.
    pub async fn finish(self) -> Result<Connection, NetError> {
        let inner = &self.endpoint.inner;
        let addr = self.incoming.remote_address();
        let connecting = self.incoming.accept().map_err(NetError::from_connection)?;
        let conn = match tokio::time::timeout(inner.connect_timeout, connecting).await {
            Err(_) => return Err(NetError::TimedOut),
            Ok(result) => result.map_err(NetError::from_connection)?,
        };
        let Some(id) = tls::node_id_from_identity(conn.peer_identity()) else {
            conn.close(VarInt::from_u32(ENDPOINT_CLOSE_CODE), b"no identity");
            return Err(NetError::BadPeerIdentity);
        };
        tracing::debug!(peer = %id.fmt_short(), %addr, "accepted");
        Ok(Connection::new(conn, id, inner.shaper.clone(), inner.max_chunk_payload))
    }
}

/// Binds a UDP socket with raised buffers (the defaults drop packets under load, even on loopback).
fn bind_socket(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| NetError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Dual-stack where the system allows it; not fatal where it does not.
        let _ = socket.set_only_v6(false);
    }
    if let Err(error) = socket.set_recv_buffer_size(buffer) {
        tracing::warn!(%error, buffer, "cannot set the UDP receive buffer size");
    }
    if let Err(error) = socket.set_send_buffer_size(buffer) {
        tracing::warn!(%error, buffer, "cannot set the UDP send buffer size");
    }
    // Linux reports twice what it grants (bookkeeping overhead), and silently caps at net.core.rmem_max.
    let got_recv = socket.recv_buffer_size().unwrap_or(0);
    let got_send = socket.send_buffer_size().unwrap_or(0);
    if got_recv < buffer || got_send < buffer {
        tracing::warn!(
            asked = buffer,
            recv = got_recv,
            send = got_send,
            "UDP socket buffers are smaller than asked (raise net.core.rmem_max / wmem_max)"
        );
    } else {
        tracing::debug!(recv = got_recv, send = got_send, "UDP socket buffers");
    }
    socket.bind(&addr.into()).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn loopback() -> EndpointConfig {
        EndpointConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    #[test]
    fn bind_outside_a_runtime_is_an_error() {
        let key = NodeKey::from_secret_bytes([1; 32]);
        assert!(matches!(Endpoint::bind(&key, loopback()), Err(NetError::NoRuntime)));
    }

    /// A fresh connection may carry a whole chunk (and more) in its first round trip: the initial
    /// congestion window is ours, not QUIC's ten datagrams, on both sides.
    #[tokio::test]
    async fn a_new_connection_starts_with_our_initial_window() {
        let server_key = NodeKey::from_secret_bytes([1; 32]);
        let client_key = NodeKey::from_secret_bytes([2; 32]);
        let server = Endpoint::bind(&server_key, loopback()).unwrap();
        let client = Endpoint::bind(&client_key, loopback()).unwrap();
        let peer = NodeAddr { id: server.node_id(), addrs: vec![server.local_addr()] };
        let accept = tokio::spawn(async move { server.accept().await });
        let dialed = client.connect(&peer).await.unwrap();
        let accepted = accept.await.unwrap().unwrap().unwrap();
        for conn in [&dialed, &accepted] {
            // The handshake's acknowledgements grow the window in slow start: at least the initial one.
            let cwnd = conn.stats().congestion_window;
            assert!(cwnd >= DEFAULT_INITIAL_WINDOW, "congestion window {cwnd}");
        }
        // With an upload cap: 100 ms of it, between QUIC's ten datagrams and ours.
        let capped = |rate| EndpointConfig { max_upload_bytes_per_sec: Some(rate), ..loopback() };
        assert_eq!(capped(125_000).effective_initial_window(), QUIC_INITIAL_WINDOW, "1 Mbit/s");
        assert_eq!(capped(1_000_000).effective_initial_window(), 100_000, "8 Mbit/s");
        assert_eq!(capped(100_000_000).effective_initial_window(), DEFAULT_INITIAL_WINDOW, "800 Mbit/s");
        let zero = EndpointConfig { initial_window: 0, ..loopback() };
        let err = Endpoint::bind(&client_key, zero).unwrap_err();
        assert!(matches!(err, NetError::Config(_)), "{err:?}");
    }

    #[tokio::test]
    async fn alpn_mismatch_is_a_clear_error() {
        let server_key = NodeKey::from_secret_bytes([1; 32]);
        let client_key = NodeKey::from_secret_bytes([2; 32]);
        let server = Endpoint::bind(&server_key, loopback()).unwrap();
        let other = TlsIdentity::with_alpn(&client_key, b"something-else/9").unwrap();
        let client = Endpoint::bind_with_tls(&client_key, loopback(), other).unwrap();
        let peer = NodeAddr { id: server.node_id(), addrs: vec![server.local_addr()] };
        let accept = tokio::spawn(async move { server.accept().await });
        let err = client.connect(&peer).await.unwrap_err();
        assert!(matches!(err, NetError::AlpnMismatch), "{err:?}");
        let server_side = accept.await.unwrap().unwrap().unwrap_err();
        assert!(matches!(server_side, NetError::AlpnMismatch), "{server_side:?}");
    }
}
