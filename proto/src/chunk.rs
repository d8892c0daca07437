//! The signed chunk: the unit the broadcaster publishes and the swarm relays.
//!
//! A chunk is a run of whole MPEG-TS packets (about 250 ms of media) with a header that says where it
//! sits in the stream and an ed25519 signature by the stream key over a domain-separated encoding of the
//! stream id and every header field. The header carries the SHA-256 of the payload, so one signature
//! covers every byte.
//!
//! Bytes from the network arrive as a [`Received`] chunk. The only way to turn it into a [`Verified`]
//! chunk, the type that storage, relaying and playback accept, is [`Received::verify`], which checks
//! the length, the hash and the signature. The only other way to make a `Verified` chunk is to sign one
//! with the stream key ([`Verified::sign`]).
//!
//! On the wire (see `docs/protocol.md`) a chunk is its [`SIGNED_HEADER_LEN`]-byte signed header
//! followed by `payload_len` payload bytes.

use bytes::{Buf, BufMut, Bytes};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use crate::keys::{KeyError, StreamId, StreamKey};
use crate::wire::DecodeError;

/// The largest payload a chunk may carry: 8 MiB (a one-second chunk at 64 Mbit/s).
pub const MAX_PAYLOAD: u32 = 8 * 1024 * 1024;

/// The length of an encoded [`Header`]: seq, capture time, duration, flags, payload length, hash.
pub const HEADER_LEN: usize = 8 + 8 + 4 + 1 + 4 + 32;

/// The length of a header followed by its 64-byte signature, as it travels ahead of the payload.
pub const SIGNED_HEADER_LEN: usize = HEADER_LEN + 64;

/// The domain separator that starts every signed message, so a chunk signature can never be taken for
/// a signature over anything else made with the same key.
pub const SIGNING_DOMAIN: &[u8; 24] = b"crowdsurf chunk v1\0\0\0\0\0\0";

/// The flags of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u8);

impl Flags {
    /// The chunk begins with PAT/PMT, codec parameters and a keyframe: a decoder can start here.
    pub const RANDOM_ACCESS: Flags = Flags(0x01);
    /// Something was lost or reset before this chunk (input stall, encoder restart).
    pub const DISCONTINUITY: Flags = Flags(0x02);
    /// The last chunk of the stream.
    pub const END_OF_STREAM: Flags = Flags(0x04);
    const KNOWN: u8 = 0x07;

    /// No flag set.
    pub const fn empty() -> Self {
        Flags(0)
    }
    /// The flags from their wire byte; unknown bits are an error.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        if bits & !Self::KNOWN == 0 { Some(Flags(bits)) } else { None }
    }
    /// The wire byte.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Whether every flag in `other` is set here.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        self.0 |= rhs.0;
    }
}

/// What a chunk says about itself. Every field is covered by the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Sequence number; never repeats within a stream.
    pub seq: u64,
    /// The broadcaster's wall clock when the chunk's first frame was captured, µs since the Unix epoch.
    pub capture_us: u64,
    /// How much media the chunk holds, µs.
    pub duration_us: u32,
    /// Random access, discontinuity, end of stream.
    pub flags: Flags,
    /// Payload length in bytes, at most [`MAX_PAYLOAD`].
    pub payload_len: u32,
    /// SHA-256 of the payload.
    pub payload_hash: [u8; 32],
}

impl Header {
    /// Writes the [`HEADER_LEN`] header bytes.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u64(self.seq);
        buf.put_u64(self.capture_us);
        buf.put_u32(self.duration_us);
        buf.put_u8(self.flags.bits());
        buf.put_u32(self.payload_len);
        buf.put_slice(&self.payload_hash);
    }

    /// Reads a header. Refuses unknown flags and a payload length over [`MAX_PAYLOAD`].
    pub fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        if buf.remaining() < HEADER_LEN {
            return Err(DecodeError::Incomplete(HEADER_LEN - buf.remaining()));
        }
        let seq = buf.get_u64();
        let capture_us = buf.get_u64();
        let duration_us = buf.get_u32();
        let flags = Flags::from_bits(buf.get_u8()).ok_or(DecodeError::Malformed("unknown chunk flags"))?;
        let payload_len = buf.get_u32();
        if payload_len > MAX_PAYLOAD {
            return Err(DecodeError::TooLong {
                what: "chunk payload",
                len: payload_len as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        let mut payload_hash = [0; 32];
        buf.copy_to_slice(&mut payload_hash);
        Ok(Header { seq, capture_us, duration_us, flags, payload_len, payload_hash })
    }

    /// The exact bytes the stream key signs: domain, stream id, header.
    pub fn signing_bytes(&self, stream: &StreamId) -> [u8; SIGNING_DOMAIN.len() + 32 + HEADER_LEN] {
        let mut out = [0u8; SIGNING_DOMAIN.len() + 32 + HEADER_LEN];
        let mut w = &mut out[..];
        w.put_slice(SIGNING_DOMAIN);
        w.put_slice(stream.as_bytes());
        self.encode(&mut w);
        out
    }

    /// Whether a decoder can start at this chunk.
    pub fn is_random_access(&self) -> bool {
        self.flags.contains(Flags::RANDOM_ACCESS)
    }
}

/// Why a chunk failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The payload is not as long as the header says.
    #[error("payload is {actual} bytes but the header says {declared}")]
    LengthMismatch {
        /// Length in the header.
        declared: u32,
        /// Length received.
        actual: usize,
    },
    /// The payload's SHA-256 differs from the header's.
    #[error("payload hash does not match the header")]
    HashMismatch,
    /// The signature is not the stream key's over this header.
    #[error("bad signature for this stream")]
    BadSignature,
    /// The stream id is not a valid public key.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Checks chunks of one stream. Holds the decompressed public key so each check skips that step.
#[derive(Debug, Clone)]
pub struct Verifier {
    stream: StreamId,
    key: VerifyingKey,
}

impl Verifier {
    /// A verifier for `stream`; fails if the id is not a valid ed25519 public key.
    pub fn new(stream: StreamId) -> Result<Self, KeyError> {
        Ok(Verifier { stream, key: stream.verifying_key()? })
    }

    /// The stream this verifier checks.
    pub fn stream(&self) -> StreamId {
        self.stream
    }
}

/// A chunk as it came off the network: not yet checked, so it can only be verified or dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The header as received.
    pub header: Header,
    /// The signature as received.
    pub signature: [u8; 64],
    /// The payload as received.
    pub payload: Bytes,
}

impl Received {
    /// Reads the signed header that precedes a payload on a chunk stream. The payload follows, exactly
    /// `header.payload_len` bytes.
    pub fn decode_signed_header(buf: &mut impl Buf) -> Result<(Header, [u8; 64]), DecodeError> {
        if buf.remaining() < SIGNED_HEADER_LEN {
            return Err(DecodeError::Incomplete(SIGNED_HEADER_LEN - buf.remaining()));
        }
        let header = Header::decode(buf)?;
        let mut signature = [0; 64];
        buf.copy_to_slice(&mut signature);
        Ok((header, signature))
    }

    /// Reads a whole chunk (signed header and payload) from one buffer.
    pub fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        if buf.remaining() < SIGNED_HEADER_LEN {
            return Err(DecodeError::Incomplete(SIGNED_HEADER_LEN - buf.remaining()));
        }
        let (header, signature) = Self::decode_signed_header(buf)?;
        let len = header.payload_len as usize;
        if buf.remaining() < len {
            return Err(DecodeError::Incomplete(len - buf.remaining()));
        }
        let payload = buf.copy_to_bytes(len);
        Ok(Received { header, signature, payload })
    }

    /// Checks length, hash and signature; only then is the chunk fit to store, relay or play.
    pub fn verify(self, verifier: &Verifier) -> Result<Verified, VerifyError> {
        if self.payload.len() != self.header.payload_len as usize {
            return Err(VerifyError::LengthMismatch { declared: self.header.payload_len, actual: self.payload.len() });
        }
        // Cheap signature first would let a forger make us hash for nothing; the hash is cheaper than
        // the signature check, and a valid signature over a wrong hash must fail either way.
        let digest: [u8; 32] = Sha256::digest(&self.payload).into();
        if digest != self.header.payload_hash {
            return Err(VerifyError::HashMismatch);
        }
        let message = self.header.signing_bytes(&verifier.stream);
        let signature = Signature::from_bytes(&self.signature);
        verifier.key.verify_strict(&message, &signature).map_err(|_| VerifyError::BadSignature)?;
        Ok(Verified {
            signed: Arc::new(Signed { header: self.header, signature: self.signature }),
            payload: self.payload,
        })
    }
}

/// A chunk whose hash and signature have been checked (or that we signed ourselves). Cheap to clone
/// and to move: the signed header and the payload are shared, so every neighbour's copy in a push,
/// every window and every queued message holds two pointers, not the 120 bytes of header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    signed: Arc<Signed>,
    payload: Bytes,
}

/// The signed part of a [`Verified`] chunk.
#[derive(Debug, PartialEq, Eq)]
struct Signed {
    header: Header,
    signature: [u8; 64],
}

impl Verified {
    /// Hashes and signs `payload` as chunk `seq` of the stream of `key`.
    ///
    /// # Panics
    /// If `payload` is longer than [`MAX_PAYLOAD`]: the broadcaster must cut chunks below that.
    pub fn sign(key: &StreamKey, seq: u64, capture_us: u64, duration_us: u32, flags: Flags, payload: Bytes) -> Self {
        assert!(payload.len() <= MAX_PAYLOAD as usize, "chunk payload over MAX_PAYLOAD");
        let header = Header {
            seq,
            capture_us,
            duration_us,
            flags,
            payload_len: payload.len() as u32,
            payload_hash: Sha256::digest(&payload).into(),
        };
        let signature = key.sign(&header.signing_bytes(&key.id()));
        Verified { signed: Arc::new(Signed { header, signature }), payload }
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.signed.header
    }
    /// The sequence number.
    pub fn seq(&self) -> u64 {
        self.signed.header.seq
    }
    /// The signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signed.signature
    }
    /// The payload (whole MPEG-TS packets).
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Writes the signed header that precedes the payload on a chunk stream.
    pub fn encode_signed_header(&self, buf: &mut impl BufMut) {
        self.signed.header.encode(buf);
        buf.put_slice(&self.signed.signature);
    }

    /// The signed header as its own buffer.
    pub fn signed_header_bytes(&self) -> [u8; SIGNED_HEADER_LEN] {
        let mut out = [0u8; SIGNED_HEADER_LEN];
        self.encode_signed_header(&mut &mut out[..]);
        out
    }

    /// Writes the whole chunk: signed header, then payload.
    pub fn encode(&self, buf: &mut impl BufMut) {
        self.encode_signed_header(buf);
        buf.put_slice(&self.payload);
    }

    /// Turns the chunk back into its received form (for tests and for re-checking stored chunks).
    pub fn into_received(self) -> Received {
        Received { header: self.signed.header, signature: self.signed.signature, payload: self.payload }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> StreamKey {
        StreamKey::from_secret_bytes([1; 32])
    }

    fn sample(payload: &[u8]) -> Verified {
        Verified::sign(
            &key(),
            42,
            1_700_000_000_000_000,
            250_000,
            Flags::RANDOM_ACCESS,
            Bytes::copy_from_slice(payload),
        )
    }

    fn wire(chunk: &Verified) -> Vec<u8> {
        let mut out = Vec::new();
        chunk.encode(&mut out);
        out
    }

    #[test]
    fn signed_chunk_verifies_after_round_trip() {
        let chunk = sample(b"hello world");
        let bytes = wire(&chunk);
        assert_eq!(bytes.len(), SIGNED_HEADER_LEN + 11);
        let received = Received::decode(&mut &bytes[..]).unwrap();
        let verified = received.verify(&Verifier::new(key().id()).unwrap()).unwrap();
        assert_eq!(verified, chunk);
    }

    #[test]
    fn another_stream_key_fails() {
        let chunk = sample(b"payload");
        let other = StreamKey::from_secret_bytes([2; 32]).id();
        let err = chunk.into_received().verify(&Verifier::new(other).unwrap()).unwrap_err();
        assert_eq!(err, VerifyError::BadSignature);
    }

    #[test]
    fn truncated_chunk_needs_more_bytes_at_every_length() {
        let bytes = wire(&sample(&[9; 300]));
        for len in 0..bytes.len() {
            match Received::decode(&mut &bytes[..len]) {
                Err(DecodeError::Incomplete(n)) => assert!(n > 0),
                other => panic!("length {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn oversize_payload_is_refused_from_the_header_alone() {
        let mut bytes = wire(&sample(b"x"));
        bytes[21..25].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        // Only the header is present: the decoder must refuse rather than wait for 8 MiB.
        let err = Received::decode(&mut &bytes[..SIGNED_HEADER_LEN]).unwrap_err();
        assert!(matches!(err, DecodeError::TooLong { .. }), "{err:?}");
    }

    #[test]
    fn length_mismatch_is_caught() {
        let mut received = sample(b"abc").into_received();
        received.payload = Bytes::from_static(b"abcd");
        let err = received.verify(&Verifier::new(key().id()).unwrap()).unwrap_err();
        assert!(matches!(err, VerifyError::LengthMismatch { .. }));
    }

    proptest! {
        /// Any single flipped bit anywhere in the encoded chunk (header, signature or payload) makes
        /// verification fail, or decoding refuse the bytes.
        #[test]
        fn any_flipped_bit_fails(payload in proptest::collection::vec(any::<u8>(), 1..512), bit in any::<prop::sample::Index>()) {
            let chunk = sample(&payload);
            let mut bytes = wire(&chunk);
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let verifier = Verifier::new(key().id()).unwrap();
            let outcome = Received::decode(&mut &bytes[..]).map(|r| r.verify(&verifier));
            prop_assert!(!matches!(outcome, Ok(Ok(_))), "bit {} flipped and still verified", bit);
        }

        #[test]
        fn round_trip_any_chunk(seq: u64, capture_us: u64, duration_us: u32, flags in 0u8..8, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let chunk = Verified::sign(&key(), seq, capture_us, duration_us, Flags::from_bits(flags).unwrap(), Bytes::from(payload));
            let bytes = wire(&chunk);
            let back = Received::decode(&mut &bytes[..]).unwrap().verify(&Verifier::new(key().id()).unwrap()).unwrap();
            prop_assert_eq!(back, chunk);
        }
    }
}
