//! Tickets: the string a viewer pastes to join a stream.
//!
//! ```text
//! ticket = "crowdsurf" base32(bytes)            (RFC 4648 alphabet, lowercase, no padding)
//! bytes  = version:u8 = 1 | stream id (32) | count:u8 (1..=8) | node addr × count | check (4)
//! check  = first 4 bytes of SHA-256 over everything before it
//! ```
//!
//! A node address is the same encoding as on the wire ([`crate::wire::NodeAddr`]). The version byte
//! lets later versions add fields while old tickets keep parsing; the checksum catches a ticket damaged
//! in copying before anything tries to connect.

use std::fmt;
use std::str::FromStr;

use bytes::{Buf, BufMut};
use sha2::{Digest, Sha256};

use crate::keys::StreamId;
use crate::wire::{Decode, DecodeError, Encode, NodeAddr};

/// The text every ticket starts with.
pub const PREFIX: &str = "crowdsurf";
/// The ticket version written by this crate.
pub const TICKET_VERSION: u8 = 1;
/// The most bootstrap nodes in one ticket.
pub const MAX_BOOTSTRAP: usize = 8;
/// The longest ticket text accepted.
pub const MAX_TICKET_LEN: usize = 2048;

const BASE32: data_encoding::Encoding = data_encoding::BASE32_NOPAD;

/// Why a ticket could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    /// It does not start with `crowdsurf`.
    #[error("not a crowdsurf ticket (it should start with \"{PREFIX}\")")]
    WrongKind,
    /// Longer than any valid ticket.
    #[error("ticket is {0} characters long, more than the limit of {MAX_TICKET_LEN}")]
    TooLong(usize),
    /// Characters outside the base32 alphabet, or a length base32 cannot produce.
    #[error("ticket is damaged: not valid base32 ({0})")]
    BadEncoding(String),
    /// The checksum does not match: a character was lost or changed.
    #[error("ticket is damaged: checksum mismatch (was it copied completely?)")]
    BadChecksum,
    /// A ticket version this build does not know.
    #[error("ticket version {0} is not supported by this build (it knows version {TICKET_VERSION})")]
    UnsupportedVersion(u8),
    /// The checksum is right but the content is not a valid ticket.
    #[error("ticket is malformed: {0}")]
    Malformed(DecodeError),
    /// A ticket must name at least one node to join through.
    #[error("ticket names no bootstrap node")]
    NoBootstrap,
}

/// What a viewer needs to join: the stream and some nodes to connect to first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The stream (its public key): every chunk is checked against it.
    pub stream: StreamId,
    /// Nodes to connect to first (1..=[`MAX_BOOTSTRAP`]), typically the broadcaster and a relay or two.
    pub bootstrap: Vec<NodeAddr>,
}

impl Ticket {
    /// A ticket for `stream` through `bootstrap` (extra nodes beyond [`MAX_BOOTSTRAP`] are dropped).
    pub fn new(stream: StreamId, mut bootstrap: Vec<NodeAddr>) -> Self {
        bootstrap.truncate(MAX_BOOTSTRAP);
        Ticket { stream, bootstrap }
    }

    /// The binary form, checksum included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u8(TICKET_VERSION);
        out.put_slice(self.stream.as_bytes());
        let n = self.bootstrap.len().min(MAX_BOOTSTRAP);
        out.put_u8(n as u8);
        for node in &self.bootstrap[..n] {
            node.encode(&mut out);
        }
        let check = Sha256::digest(&out);
        out.put_slice(&check[..4]);
        out
    }

    /// Reads the binary form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TicketError> {
        if bytes.len() < 5 {
            return Err(TicketError::Malformed(DecodeError::Incomplete(5 - bytes.len())));
        }
        let (body, check) = bytes.split_at(bytes.len() - 4);
        if Sha256::digest(body)[..4] != *check {
            return Err(TicketError::BadChecksum);
        }
        let mut buf = body;
        match buf.get_u8() {
            TICKET_VERSION => {}
            other => return Err(TicketError::UnsupportedVersion(other)),
        }
        let decode = |buf: &mut &[u8]| -> Result<Ticket, DecodeError> {
            if buf.remaining() < 33 {
                return Err(DecodeError::Incomplete(33 - buf.remaining()));
            }
            let mut id = [0; 32];
            buf.copy_to_slice(&mut id);
            let n = usize::from(buf.get_u8());
            if n > MAX_BOOTSTRAP {
                return Err(DecodeError::TooLong { what: "bootstrap list", len: n as u64, max: MAX_BOOTSTRAP as u64 });
            }
            let bootstrap = (0..n).map(|_| NodeAddr::decode(buf)).collect::<Result<_, _>>()?;
            if !buf.is_empty() {
                return Err(DecodeError::Malformed("trailing bytes"));
            }
            Ok(Ticket { stream: StreamId::from_bytes(id), bootstrap })
        };
        let ticket = decode(&mut buf).map_err(TicketError::Malformed)?;
        if ticket.bootstrap.is_empty() {
            return Err(TicketError::NoBootstrap);
        }
        Ok(ticket)
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        f.write_str(&BASE32.encode(&self.to_bytes()).to_ascii_lowercase())
    }
}

impl FromStr for Ticket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, TicketError> {
        let s = s.trim();
        if s.len() > MAX_TICKET_LEN {
            return Err(TicketError::TooLong(s.len()));
        }
        let rest = s
            .get(..PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(PREFIX))
            .and_then(|_| s.get(PREFIX.len()..))
            .ok_or(TicketError::WrongKind)?;
        let bytes =
            BASE32.decode(rest.to_ascii_uppercase().as_bytes()).map_err(|e| TicketError::BadEncoding(e.to_string()))?;
        Ticket::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{NodeKey, StreamKey};
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn ticket() -> Ticket {
        Ticket::new(
            StreamKey::from_secret_bytes([3; 32]).id(),
            vec![NodeAddr {
                id: NodeKey::from_secret_bytes([4; 32]).id(),
                addrs: vec!["127.0.0.1:4433".parse().unwrap(), "[::1]:4433".parse().unwrap()],
            }],
        )
    }

    #[test]
    fn round_trips() {
        let t = ticket();
        let text = t.to_string();
        assert!(text.starts_with("crowdsurf"));
        assert!(text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(text.parse::<Ticket>().unwrap(), t);
        assert_eq!(text.to_uppercase().parse::<Ticket>().unwrap(), t, "case-insensitive");
        assert_eq!(format!("  {text}\n").parse::<Ticket>().unwrap(), t, "surrounding whitespace");
    }

    #[test]
    fn damaged_tickets_get_clear_errors() {
        let text = ticket().to_string();
        assert_eq!("blob123".parse::<Ticket>(), Err(TicketError::WrongKind));
        assert_eq!("".parse::<Ticket>(), Err(TicketError::WrongKind));
        assert!(matches!(format!("{text}!").parse::<Ticket>(), Err(TicketError::BadEncoding(_))));
        // Change one character in the middle.
        let mut chars: Vec<char> = text.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let damaged: String = chars.into_iter().collect();
        assert_eq!(damaged.parse::<Ticket>(), Err(TicketError::BadChecksum));
        // Lose the tail.
        let cut = &text[..text.len() - 8];
        assert!(matches!(cut.parse::<Ticket>(), Err(TicketError::BadChecksum | TicketError::BadEncoding(_))));
        // A future version with a valid checksum.
        let mut bytes = ticket().to_bytes();
        bytes[0] = 9;
        let n = bytes.len() - 4;
        let check = Sha256::digest(&bytes[..n]);
        bytes[n..].copy_from_slice(&check[..4]);
        assert_eq!(Ticket::from_bytes(&bytes), Err(TicketError::UnsupportedVersion(9)));
        assert!(matches!("crowdsurf".repeat(300).parse::<Ticket>(), Err(TicketError::TooLong(_))));
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    proptest! {
        #[test]
        fn any_ticket_round_trips(
            stream in any::<[u8; 32]>(),
            nodes in proptest::collection::vec((any::<[u8; 32]>(), proptest::collection::vec(arb_addr(), 0..=8)), 1..=MAX_BOOTSTRAP),
        ) {
            let t = Ticket::new(
                StreamId::from_bytes(stream),
                nodes.into_iter().map(|(id, addrs)| NodeAddr { id: crate::keys::NodeId::from_bytes(id), addrs }).collect(),
            );
            prop_assert_eq!(t.to_string().parse::<Ticket>().unwrap(), t);
        }

        #[test]
        fn garbage_never_panics(s in "\\PC{0,200}") {
            let _ = s.parse::<Ticket>();
            let _ = format!("crowdsurf{s}").parse::<Ticket>();
        }
    }
}
