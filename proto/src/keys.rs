//! Identities.
//!
//! A **stream** is an ed25519 key pair: the broadcaster holds the [`StreamKey`], everybody else knows
//! only the [`StreamId`] (the 32-byte public key) and checks every chunk's signature against it.
//! Every node also has its own ed25519 [`NodeKey`]; its [`NodeId`] names it in the swarm and is the key
//! of its self-signed TLS certificate.
//!
//! Keys are made from 32 secret bytes that the caller supplies (from the operating system's RNG, or a
//! fixed seed in tests): this crate never reaches for randomness itself.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

/// Why a key or id could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not 64 hexadecimal digits.
    #[error("expected 64 hexadecimal digits")]
    BadHex,
    /// The 32 bytes are not a valid ed25519 public key (not a point on the curve).
    #[error("not a valid ed25519 public key")]
    NotAPoint,
}

macro_rules! public_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq)]
        pub struct $name([u8; 32]);

        // Ids are compared and hashed by the thousand every second in a node's tables (and by the
        // billion in a large simulation), so both work on words rather than bytes. The order is
        // the bytes' lexicographic order all the same.
        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.head().cmp(&other.head()).then_with(|| self.0[8..].cmp(&other.0[8..]))
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                // All 32 bytes (ids in peer lists are whatever a peer claims, so a table keyed by
                // them must not let it pick collisions), as four words without a length prefix.
                for word in self.words() {
                    state.write_u64(word);
                }
            }
        }

        impl $name {
            /// The first eight bytes, big-endian.
            fn head(&self) -> u64 {
                let b = &self.0;
                u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }

            /// The bytes as four big-endian words.
            fn words(&self) -> [u64; 4] {
                let mut words = [0u64; 4];
                for (word, bytes) in words.iter_mut().zip(self.0.chunks_exact(8)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(bytes);
                    *word = u64::from_be_bytes(b);
                }
                words
            }

            /// Wraps 32 bytes of an ed25519 public key. Nothing is checked here; see
            /// [`Self::verifying_key`].
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw public key bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The ed25519 public key, or an error if the bytes are not a point on the curve.
            pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
                VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::NotAPoint)
            }

            /// A short form for logs: the first 5 bytes in hex (10 characters).
            pub fn fmt_short(&self) -> String {
                data_encoding::HEXLOWER.encode(&self.0[..5])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.fmt_short())
            }
        }

        impl FromStr for $name {
            type Err = KeyError;
            fn from_str(s: &str) -> Result<Self, KeyError> {
                let bytes = data_encoding::HEXLOWER_PERMISSIVE
                    .decode(s.as_bytes())
                    .map_err(|_| KeyError::BadHex)?;
                let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::BadHex)?;
                Ok(Self(bytes))
            }
        }
    };
}

public_id!(
    /// The id of a stream: the broadcaster's ed25519 public key. Every chunk of the stream is signed by
    /// the matching [`StreamKey`].
    StreamId
);
public_id!(
    /// The id of a node in the swarm: its ed25519 public key, also the key of its TLS certificate.
    NodeId
);

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident, $id:ident) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name(SigningKey);

        impl $name {
            /// Makes the key from 32 secret bytes (draw them from the OS RNG, e.g. `getrandom`).
            pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
                Self(SigningKey::from_bytes(&secret))
            }

            /// The 32 secret bytes, for storing the key in a file.
            pub fn secret_bytes(&self) -> [u8; 32] {
                self.0.to_bytes()
            }

            /// The public id that belongs to this key.
            pub fn id(&self) -> $id {
                $id(self.0.verifying_key().to_bytes())
            }

            /// The ed25519 signing key itself (for TLS certificates and the like).
            pub fn signing_key(&self) -> &SigningKey {
                &self.0
            }

            /// Signs `message` (ed25519, which hashes with SHA-512 internally).
            pub fn sign(&self, message: &[u8]) -> [u8; 64] {
                self.0.sign(message).to_bytes()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(public {})", stringify!($name), self.id().fmt_short())
            }
        }
    };
}

secret_key!(
    /// The broadcaster's secret key for one stream. Whoever holds it can publish chunks of the stream.
    StreamKey,
    StreamId
);
secret_key!(
    /// A node's own secret key: its identity in the swarm and in TLS.
    NodeKey,
    NodeId
);

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Ids order as their bytes do, as the derived order did.
        #[test]
        fn ids_order_as_their_bytes(a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), cut in 0usize..32) {
            // Often equal up to some byte, so that every word of the comparison is exercised.
            let mut b = b;
            b[..cut].copy_from_slice(&a[..cut]);
            prop_assert_eq!(NodeId::from_bytes(a).cmp(&NodeId::from_bytes(b)), a.cmp(&b));
            prop_assert_eq!(NodeId::from_bytes(a) == NodeId::from_bytes(b), a == b);
        }
    }

    #[test]
    fn ids_round_trip_through_text() {
        let key = StreamKey::from_secret_bytes([7; 32]);
        let id = key.id();
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<StreamId>().unwrap(), id);
        assert_eq!(id.fmt_short(), &text[..10]);
        assert!(id.verifying_key().is_ok());
        assert_eq!("abc".parse::<NodeId>(), Err(KeyError::BadHex));
    }

    #[test]
    fn secret_bytes_round_trip() {
        let key = NodeKey::from_secret_bytes([42; 32]);
        let again = NodeKey::from_secret_bytes(key.secret_bytes());
        assert_eq!(key.id(), again.id());
    }
}
