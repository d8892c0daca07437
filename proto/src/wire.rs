//! Control-stream messages and their codec.
//!
//! Every connection has one bidirectional control stream carrying length-prefixed frames:
//!
//! ```text
//! frame   = length:u32 (of type + body, at most MAX_FRAME_LEN) | type:u8 | body
//! ```
//!
//! All integers are big-endian. Every list and string has an explicit upper bound, checked before
//! anything is allocated. Decoding distinguishes [`DecodeError::Incomplete`] ("wait for more bytes",
//! not a failure) from the errors that mean the peer is broken or hostile. Chunks do not travel here:
//! each goes on its own unidirectional stream (see [`crate::chunk`]). The byte layout of every message
//! is in `docs/protocol.md`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut};

use crate::keys::{NodeId, StreamId};
use crate::window::BufferMap;

/// The largest control frame (type + body): 64 KiB.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// The most addresses a node may list for itself.
pub const MAX_ADDRS: usize = 8;
/// The most peers in one peer-exchange message.
pub const MAX_PEERS: usize = 64;
/// The most sequence numbers in one request.
pub const MAX_REQUEST: usize = 256;
/// The longest human-readable reason in a goodbye, in bytes of UTF-8.
pub const MAX_REASON_LEN: usize = 256;
/// The most substreams a stream may be split into.
pub const MAX_SUBSTREAMS: u16 = 64;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not an error: at least this many more bytes are needed before the item can be decoded.
    #[error("need {0} more bytes")]
    Incomplete(usize),
    /// A length field is over its limit; refused before reading or allocating.
    #[error("{what} length {len} is over the limit of {max}")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// The length claimed.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A message type this version does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The bytes break a rule of the format.
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

impl DecodeError {
    /// Whether this only means "wait for more bytes".
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete(_))
    }
}

/// A value with a wire form.
pub trait Encode {
    /// Appends the wire form to `buf`.
    fn encode(&self, buf: &mut impl BufMut);
}

/// A value that can be read from its wire form.
pub trait Decode: Sized {
    /// Reads one value from the front of `buf`.
    fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError>;
}

fn need(buf: &impl Buf, n: usize) -> Result<(), DecodeError> {
    if buf.remaining() < n { Err(DecodeError::Incomplete(n - buf.remaining())) } else { Ok(()) }
}

fn get_u8(buf: &mut impl Buf) -> Result<u8, DecodeError> {
    need(buf, 1)?;
    Ok(buf.get_u8())
}
fn get_u16(buf: &mut impl Buf) -> Result<u16, DecodeError> {
    need(buf, 2)?;
    Ok(buf.get_u16())
}
fn get_u64(buf: &mut impl Buf) -> Result<u64, DecodeError> {
    need(buf, 8)?;
    Ok(buf.get_u64())
}
fn get_32(buf: &mut impl Buf) -> Result<[u8; 32], DecodeError> {
    need(buf, 32)?;
    let mut out = [0; 32];
    buf.copy_to_slice(&mut out);
    Ok(out)
}
fn get_count(buf: &mut impl Buf, what: &'static str, max: usize) -> Result<usize, DecodeError> {
    let n = usize::from(get_u8(buf)?);
    if n > max {
        return Err(DecodeError::TooLong { what, len: n as u64, max: max as u64 });
    }
    Ok(n)
}

impl Encode for SocketAddr {
    fn encode(&self, buf: &mut impl BufMut) {
        match self.ip() {
            IpAddr::V4(ip) => {
                buf.put_u8(4);
                buf.put_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                buf.put_u8(6);
                buf.put_slice(&ip.octets());
            }
        }
        buf.put_u16(self.port());
    }
}

impl Decode for SocketAddr {
    fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        let ip = match get_u8(buf)? {
            4 => {
                need(buf, 4)?;
                let mut o = [0; 4];
                buf.copy_to_slice(&mut o);
                IpAddr::V4(Ipv4Addr::from(o))
            }
            6 => {
                need(buf, 16)?;
                let mut o = [0; 16];
                buf.copy_to_slice(&mut o);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return Err(DecodeError::Malformed("unknown address family")),
        };
        Ok(SocketAddr::new(ip, get_u16(buf)?))
    }
}

fn encode_addrs(addrs: &[SocketAddr], buf: &mut impl BufMut) {
    debug_assert!(addrs.len() <= MAX_ADDRS);
    buf.put_u8(addrs.len().min(MAX_ADDRS) as u8);
    for a in addrs.iter().take(MAX_ADDRS) {
        a.encode(buf);
    }
}
fn decode_addrs(buf: &mut impl Buf) -> Result<Vec<SocketAddr>, DecodeError> {
    let n = get_count(buf, "address list", MAX_ADDRS)?;
    (0..n).map(|_| SocketAddr::decode(buf)).collect()
}

/// A node and the addresses it can be reached at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    /// The node's id (its public key).
    pub id: NodeId,
    /// Where it listens; at most [`MAX_ADDRS`].
    pub addrs: Vec<SocketAddr>,
}

impl Encode for NodeAddr {
    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_slice(self.id.as_bytes());
        encode_addrs(&self.addrs, buf);
    }
}
impl Decode for NodeAddr {
    fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        Ok(NodeAddr { id: NodeId::from_bytes(get_32(buf)?), addrs: decode_addrs(buf)? })
    }
}

fn encode_peers(peers: &[NodeAddr], buf: &mut impl BufMut) {
    buf.put_u8(peers.len().min(MAX_PEERS) as u8);
    for p in peers.iter().take(MAX_PEERS) {
        p.encode(buf);
    }
}
fn decode_peers(buf: &mut impl Buf) -> Result<Vec<NodeAddr>, DecodeError> {
    let n = get_count(buf, "peer list", MAX_PEERS)?;
    (0..n).map(|_| NodeAddr::decode(buf)).collect()
}

/// What kind of node is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// The broadcaster's node, where chunks are born.
    Origin = 0,
    /// A headless relay.
    Relay = 1,
    /// A viewer that relays.
    Player = 2,
}

impl Role {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Role::Origin),
            1 => Ok(Role::Relay),
            2 => Ok(Role::Player),
            _ => Err(DecodeError::Malformed("unknown role")),
        }
    }
}

/// Why a node ends a connection. Also the QUIC application close code (`code as u32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GoodbyeReason {
    /// Leaving normally.
    Leaving = 0,
    /// No room for another neighbour; try the peers listed.
    Full = 1,
    /// We do not carry the stream asked for.
    WrongStream = 2,
    /// We do not speak that protocol version.
    UnsupportedVersion = 3,
    /// The peer broke the protocol (malformed message, forged chunk, flooding).
    Misbehaved = 4,
    /// The peer was useless or unresponsive for too long.
    Useless = 5,
    /// A second connection between the same pair of nodes.
    Duplicate = 6,
    /// The stream has ended.
    EndOfStream = 7,
}

impl GoodbyeReason {
    /// The reason for a wire byte or QUIC close code (codes above 255 are not goodbye reasons).
    pub fn from_code(code: u64) -> Option<Self> {
        u8::try_from(code).ok().and_then(|v| Self::from_u8(v).ok())
    }

    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        use GoodbyeReason::*;
        Ok(match v {
            0 => Leaving,
            1 => Full,
            2 => WrongStream,
            3 => UnsupportedVersion,
            4 => Misbehaved,
            5 => Useless,
            6 => Duplicate,
            7 => EndOfStream,
            _ => return Err(DecodeError::Malformed("unknown goodbye reason")),
        })
    }
}

/// The first message each side sends on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version; must equal [`crate::PROTOCOL_VERSION`] or the other side says goodbye.
    pub version: u16,
    /// The stream this node carries.
    pub stream: StreamId,
    /// The speaker's node id; must match its TLS certificate.
    pub node: NodeId,
    /// What kind of node is speaking.
    pub role: Role,
    /// Where the speaker accepts connections (empty if it does not).
    pub listen: Vec<SocketAddr>,
    /// What the speaker holds right now.
    pub have: BufferMap,
}

/// A control-stream message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Introduction; must come first. (Boxed: it is by far the largest message and the rarest,
    /// and every queued message is the size of the largest.)
    Hello(Box<Hello>),
    /// A full picture of what the sender holds.
    BufferMap(BufferMap),
    /// The sender has just verified and stored chunk `seq`.
    Have {
        /// The new chunk.
        seq: u64,
    },
    /// Please send these chunks (pull repair), most urgent first.
    Request {
        /// The chunks wanted; at most [`MAX_REQUEST`].
        seqs: Vec<u64>,
    },
    /// Forget a request, or stop sending a chunk already in flight (a duplicate arrived elsewhere).
    Cancel {
        /// The chunk.
        seq: u64,
    },
    /// Push every chunk with `seq % substreams == substream`, starting at `from_seq`, as soon as verified.
    Subscribe {
        /// Which substream.
        substream: u16,
        /// Into how many substreams the stream is split; must match the receiver's.
        substreams: u16,
        /// The first chunk wanted.
        from_seq: u64,
    },
    /// Stop pushing a substream. From the parent it means "I no longer push it to you".
    Unsubscribe {
        /// Which substream.
        substream: u16,
    },
    /// Peer exchange: nodes the sender knows in the swarm.
    Peers(Vec<NodeAddr>),
    /// The sender is closing the connection, and why; when full it suggests other peers.
    Goodbye {
        /// Why.
        reason: GoodbyeReason,
        /// Other nodes to try instead.
        peers: Vec<NodeAddr>,
        /// Free text for logs; at most [`MAX_REASON_LEN`] bytes.
        message: String,
    },
    /// Clock probe (NTP-style): the sender's clock at sending, µs, and an echo token.
    Ping {
        /// Echoed back in the pong.
        nonce: u64,
        /// Sender's clock when sent, µs.
        sent_us: u64,
    },
    /// Answer to a ping, with the answerer's clock and its own estimate of the origin's clock.
    Pong {
        /// The ping's nonce.
        nonce: u64,
        /// The ping's `sent_us`, echoed.
        ping_sent_us: u64,
        /// The answerer's clock when it answered, µs.
        reply_us: u64,
        /// The answerer's best estimate of (origin clock − its clock), µs; 0 for the origin.
        origin_offset_us: i64,
        /// How uncertain that estimate is (half the round trips along the path), µs; u64::MAX if unknown.
        origin_offset_error_us: u64,
    },
    /// The sender's place in each substream's push tree, one entry per substream (at most
    /// [`MAX_SUBSTREAMS`]): sent after the hello and whenever it changes. Children pick parents with
    /// spare room and a short path to the origin, and never one whose depth could make a loop.
    Tree(Vec<TreePlace>),
}

/// Where the sender stands in one substream's push tree (see [`Message::Tree`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreePlace {
    /// Hops from the origin along parents: 0 for the origin, [`NO_DEPTH`] when not connected to it.
    pub depth: u8,
    /// Children the sender pushes this substream to.
    pub children: u8,
    /// More children it would take in this substream now.
    pub spare: u8,
}

impl TreePlace {
    /// Whether the sender relays in this substream, or could: it has children there or room for some.
    /// A child that does not is a *leaf* there, and a relay may take its place.
    pub fn relays(&self) -> bool {
        self.spare > 0 || self.children > 0
    }
}

/// [`TreePlace::depth`] of a node with no path of parents to the origin.
pub const NO_DEPTH: u8 = u8::MAX;

impl Message {
    fn type_byte(&self) -> u8 {
        match self {
            Message::Hello(_) => 1,
            Message::BufferMap(_) => 2,
            Message::Have { .. } => 3,
            Message::Request { .. } => 4,
            Message::Cancel { .. } => 5,
            Message::Subscribe { .. } => 6,
            Message::Unsubscribe { .. } => 7,
            Message::Peers(_) => 8,
            Message::Goodbye { .. } => 9,
            Message::Ping { .. } => 10,
            Message::Pong { .. } => 11,
            Message::Tree(_) => 12,
        }
    }

    fn encode_body(&self, buf: &mut impl BufMut) {
        match self {
            Message::Hello(h) => {
                buf.put_u16(h.version);
                buf.put_slice(h.stream.as_bytes());
                buf.put_slice(h.node.as_bytes());
                buf.put_u8(h.role as u8);
                encode_addrs(&h.listen, buf);
                h.have.encode(buf);
            }
            Message::BufferMap(m) => m.encode(buf),
            Message::Have { seq } | Message::Cancel { seq } => buf.put_u64(*seq),
            Message::Request { seqs } => {
                let n = seqs.len().min(MAX_REQUEST);
                buf.put_u16(n as u16);
                for s in &seqs[..n] {
                    buf.put_u64(*s);
                }
            }
            Message::Subscribe { substream, substreams, from_seq } => {
                buf.put_u16(*substream);
                buf.put_u16(*substreams);
                buf.put_u64(*from_seq);
            }
            Message::Unsubscribe { substream } => buf.put_u16(*substream),
            Message::Peers(peers) => encode_peers(peers, buf),
            Message::Goodbye { reason, peers, message } => {
                buf.put_u8(*reason as u8);
                encode_peers(peers, buf);
                let mut end = message.len().min(MAX_REASON_LEN);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                buf.put_u16(end as u16);
                buf.put_slice(&message.as_bytes()[..end]);
            }
            Message::Ping { nonce, sent_us } => {
                buf.put_u64(*nonce);
                buf.put_u64(*sent_us);
            }
            Message::Pong { nonce, ping_sent_us, reply_us, origin_offset_us, origin_offset_error_us } => {
                buf.put_u64(*nonce);
                buf.put_u64(*ping_sent_us);
                buf.put_u64(*reply_us);
                buf.put_i64(*origin_offset_us);
                buf.put_u64(*origin_offset_error_us);
            }
            Message::Tree(places) => {
                let n = places.len().min(usize::from(MAX_SUBSTREAMS));
                buf.put_u8(n as u8);
                for p in &places[..n] {
                    buf.put_u8(p.depth);
                    buf.put_u8(p.children);
                    buf.put_u8(p.spare);
                }
            }
        }
    }

    fn decode_body(ty: u8, buf: &mut impl Buf) -> Result<Self, DecodeError> {
        Ok(match ty {
            1 => Message::Hello(Box::new(Hello {
                version: get_u16(buf)?,
                stream: StreamId::from_bytes(get_32(buf)?),
                node: NodeId::from_bytes(get_32(buf)?),
                role: Role::from_u8(get_u8(buf)?)?,
                listen: decode_addrs(buf)?,
                have: BufferMap::decode(buf)?,
            })),
            2 => Message::BufferMap(BufferMap::decode(buf)?),
            3 => Message::Have { seq: get_u64(buf)? },
            4 => {
                let n = usize::from(get_u16(buf)?);
                if n > MAX_REQUEST {
                    return Err(DecodeError::TooLong { what: "request", len: n as u64, max: MAX_REQUEST as u64 });
                }
                need(buf, n * 8)?;
                Message::Request { seqs: (0..n).map(|_| buf.get_u64()).collect() }
            }
            5 => Message::Cancel { seq: get_u64(buf)? },
            6 => {
                let substream = get_u16(buf)?;
                let substreams = get_u16(buf)?;
                if substreams == 0 || substreams > MAX_SUBSTREAMS || substream >= substreams {
                    return Err(DecodeError::Malformed("substream out of range"));
                }
                Message::Subscribe { substream, substreams, from_seq: get_u64(buf)? }
            }
            7 => Message::Unsubscribe { substream: get_u16(buf)? },
            8 => Message::Peers(decode_peers(buf)?),
            9 => {
                let reason = GoodbyeReason::from_u8(get_u8(buf)?)?;
                let peers = decode_peers(buf)?;
                let n = usize::from(get_u16(buf)?);
                if n > MAX_REASON_LEN {
                    return Err(DecodeError::TooLong {
                        what: "goodbye reason",
                        len: n as u64,
                        max: MAX_REASON_LEN as u64,
                    });
                }
                need(buf, n)?;
                let mut text = vec![0; n];
                buf.copy_to_slice(&mut text);
                let message =
                    String::from_utf8(text).map_err(|_| DecodeError::Malformed("goodbye reason is not UTF-8"))?;
                Message::Goodbye { reason, peers, message }
            }
            10 => Message::Ping { nonce: get_u64(buf)?, sent_us: get_u64(buf)? },
            11 => Message::Pong {
                nonce: get_u64(buf)?,
                ping_sent_us: get_u64(buf)?,
                reply_us: get_u64(buf)?,
                origin_offset_us: get_u64(buf)? as i64,
                origin_offset_error_us: get_u64(buf)?,
            },
            12 => {
                let n = usize::from(get_u8(buf)?);
                if n > usize::from(MAX_SUBSTREAMS) {
                    return Err(DecodeError::TooLong { what: "tree", len: n as u64, max: u64::from(MAX_SUBSTREAMS) });
                }
                need(buf, n * 3)?;
                Message::Tree(
                    (0..n)
                        .map(|_| TreePlace { depth: buf.get_u8(), children: buf.get_u8(), spare: buf.get_u8() })
                        .collect(),
                )
            }
            other => return Err(DecodeError::UnknownType(other)),
        })
    }

    /// Appends the whole frame (length, type, body) to `buf`.
    pub fn encode_frame(&self, buf: &mut Vec<u8>) {
        let start = buf.len();
        buf.put_u32(0);
        buf.put_u8(self.type_byte());
        self.encode_body(buf);
        let len = buf.len() - start - 4;
        debug_assert!(len <= MAX_FRAME_LEN, "message over MAX_FRAME_LEN");
        buf[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    }

    /// The whole frame as a new buffer.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_frame(&mut out);
        out
    }

    /// Reads one frame from the front of `input`. On success returns the message and how many bytes
    /// it took. Fails with [`DecodeError::Incomplete`] while the frame is not all there (but refuses an
    /// oversize length at once), and with another error if the frame is complete but wrong: a body
    /// shorter or longer than its length says is malformed.
    pub fn decode_frame(input: &[u8]) -> Result<(Message, usize), DecodeError> {
        if input.len() < 4 {
            return Err(DecodeError::Incomplete(4 - input.len()));
        }
        let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::TooLong { what: "frame", len: len as u64, max: MAX_FRAME_LEN as u64 });
        }
        if len == 0 {
            return Err(DecodeError::Malformed("empty frame"));
        }
        if input.len() < 4 + len {
            return Err(DecodeError::Incomplete(4 + len - input.len()));
        }
        let mut body = &input[5..4 + len];
        let message = match Message::decode_body(input[4], &mut body) {
            Ok(m) => m,
            Err(DecodeError::Incomplete(_)) => return Err(DecodeError::Malformed("frame shorter than its body")),
            Err(e) => return Err(e),
        };
        if !body.is_empty() {
            return Err(DecodeError::Malformed("trailing bytes in frame"));
        }
        Ok((message, 4 + len))
    }
}

impl Encode for Message {
    fn encode(&self, buf: &mut impl BufMut) {
        let mut frame = Vec::new();
        self.encode_frame(&mut frame);
        buf.put_slice(&frame);
    }
}

/// Accumulates bytes from a stream and yields whole messages, refusing oversize frames before
/// buffering them.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: bytes::BytesMut,
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
    /// The next whole message, `Ok(None)` if more bytes are needed, or the error that should end the
    /// connection.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        match Message::decode_frame(&self.buf) {
            Ok((m, used)) => {
                self.buf.advance(used);
                Ok(Some(m))
            }
            Err(DecodeError::Incomplete(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
    /// Bytes held but not yet consumed (at most one frame plus what arrived with it).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Messages and chunks are queued and moved by the thousand per second on a busy node (and by
    /// the million in a simulation): they stay a few words, the rare large parts behind pointers.
    #[test]
    fn messages_and_chunks_stay_small() {
        let (message, chunk) = (std::mem::size_of::<Message>(), std::mem::size_of::<crate::chunk::Verified>());
        eprintln!("Message {message} B, Verified {chunk} B");
        assert!(message <= 64, "Message is {message} bytes");
        assert!(chunk <= 48, "Verified is {chunk} bytes");
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }
    fn arb_node() -> impl Strategy<Value = NodeAddr> {
        (any::<[u8; 32]>(), proptest::collection::vec(arb_addr(), 0..=MAX_ADDRS))
            .prop_map(|(id, addrs)| NodeAddr { id: NodeId::from_bytes(id), addrs })
    }
    fn arb_map() -> impl Strategy<Value = BufferMap> {
        (0u64..u64::MAX / 2, proptest::collection::vec(0u64..crate::window::MAX_WINDOW as u64, 0..64)).prop_map(
            |(base, offs)| {
                let mut m = BufferMap::empty(base);
                for o in offs {
                    m.insert(base + o);
                }
                m
            },
        )
    }
    fn arb_reason() -> impl Strategy<Value = GoodbyeReason> {
        (0u8..8).prop_map(|v| GoodbyeReason::from_u8(v).unwrap())
    }

    pub(crate) fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<u16>(),
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                0u8..3,
                proptest::collection::vec(arb_addr(), 0..=MAX_ADDRS),
                arb_map()
            )
                .prop_map(|(version, s, n, role, listen, have)| Message::Hello(Box::new(Hello {
                    version,
                    stream: StreamId::from_bytes(s),
                    node: NodeId::from_bytes(n),
                    role: Role::from_u8(role).unwrap(),
                    listen,
                    have
                }))),
            arb_map().prop_map(Message::BufferMap),
            any::<u64>().prop_map(|seq| Message::Have { seq }),
            proptest::collection::vec(any::<u64>(), 0..=MAX_REQUEST).prop_map(|seqs| Message::Request { seqs }),
            any::<u64>().prop_map(|seq| Message::Cancel { seq }),
            (1u16..=MAX_SUBSTREAMS, any::<u16>(), any::<u64>()).prop_map(|(k, s, from_seq)| Message::Subscribe {
                substream: s % k,
                substreams: k,
                from_seq
            }),
            any::<u16>().prop_map(|substream| Message::Unsubscribe { substream }),
            proptest::collection::vec(arb_node(), 0..=MAX_PEERS).prop_map(Message::Peers),
            (arb_reason(), proptest::collection::vec(arb_node(), 0..8), "\\PC{0,60}")
                .prop_map(|(reason, peers, message)| Message::Goodbye { reason, peers, message }),
            (any::<u64>(), any::<u64>()).prop_map(|(nonce, sent_us)| Message::Ping { nonce, sent_us }),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<i64>(), any::<u64>()).prop_map(|(a, b, c, d, e)| {
                Message::Pong { nonce: a, ping_sent_us: b, reply_us: c, origin_offset_us: d, origin_offset_error_us: e }
            }),
            proptest::collection::vec(
                (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(depth, children, spare)| TreePlace {
                    depth,
                    children,
                    spare
                }),
                0..=usize::from(MAX_SUBSTREAMS)
            )
            .prop_map(Message::Tree),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in arb_message()) {
            let frame = m.to_frame();
            prop_assert!(frame.len() <= MAX_FRAME_LEN + 4);
            let (back, used) = Message::decode_frame(&frame).unwrap();
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back, m);
        }

        /// A frame cut short at any length asks for more bytes; it never fails or panics.
        #[test]
        fn truncated_frames_need_more_bytes(m in arb_message()) {
            let frame = m.to_frame();
            for len in 0..frame.len() {
                match Message::decode_frame(&frame[..len]) {
                    Err(DecodeError::Incomplete(n)) => prop_assert!(n > 0 && len + n <= frame.len()),
                    other => prop_assert!(false, "length {}: {:?}", len, other),
                }
            }
        }

        /// Arbitrary bytes never panic the decoder, and whatever it accepts re-encodes to the same bytes.
        #[test]
        fn garbage_is_refused_or_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok((m, used)) = Message::decode_frame(&bytes) {
                prop_assert_eq!(&m.to_frame()[..], &bytes[..used]);
            }
        }

        #[test]
        fn frame_reader_reassembles_split_input(ms in proptest::collection::vec(arb_message(), 1..8), cut in 1usize..50) {
            let mut all = Vec::new();
            for m in &ms { m.encode_frame(&mut all); }
            let mut reader = FrameReader::new();
            let mut out = Vec::new();
            for piece in all.chunks(cut) {
                reader.extend(piece);
                while let Some(m) = reader.next_message().unwrap() { out.push(m); }
            }
            prop_assert_eq!(out, ms);
            prop_assert_eq!(reader.buffered(), 0);
        }
    }

    #[test]
    fn oversize_lengths_are_refused_before_buffering() {
        let mut frame = vec![0xff, 0xff, 0xff, 0xff];
        assert!(matches!(Message::decode_frame(&frame), Err(DecodeError::TooLong { .. })));
        // A request claiming 60000 entries inside a small frame is refused on the count, not read.
        frame = vec![0, 0, 0, 3, 4, 0xea, 0x60];
        assert!(matches!(Message::decode_frame(&frame), Err(DecodeError::TooLong { what: "request", .. })));
        // A peer list over the limit.
        frame = vec![0, 0, 0, 2, 8, 200];
        assert!(matches!(Message::decode_frame(&frame), Err(DecodeError::TooLong { what: "peer list", .. })));
        // A buffer map wider than any window.
        let mut m = vec![0, 0, 0, 11, 2];
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(Message::decode_frame(&m), Err(DecodeError::TooLong { what: "buffer map", .. })));
        let mut reader = FrameReader::new();
        reader.extend(&[0x7f, 0, 0, 0]);
        assert!(reader.next_message().is_err());
    }

    #[test]
    fn unknown_type_and_trailing_bytes_are_errors() {
        assert_eq!(Message::decode_frame(&[0, 0, 0, 1, 200]), Err(DecodeError::UnknownType(200)));
        let mut frame = Message::Have { seq: 5 }.to_frame();
        frame[3] += 1;
        frame.push(0);
        assert!(matches!(Message::decode_frame(&frame), Err(DecodeError::Malformed(_))));
    }
}
