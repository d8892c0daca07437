//! Chunk decoding and verification against a fixed stream key. Two properties:
//!
//! 1. Raw input that decodes as a chunk never verifies (the fuzzer cannot forge a signature).
//! 2. A genuine chunk signed here, then damaged by fuzzer-chosen edits, verifies only if the edits
//!    cancelled out. The payload hash is recomputed after the damage, so the edits reach the signature
//!    check itself (with raw garbage alone, the hash comparison would stop everything first).
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use crowdsurf_proto::chunk::{Received, Verifier};
use crowdsurf_proto::{Flags, StreamKey, Verified};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fn key() -> &'static StreamKey {
    static K: OnceLock<StreamKey> = OnceLock::new();
    K.get_or_init(|| StreamKey::from_secret_bytes([9; 32]))
}

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::new(key().id()).expect("valid key"))
}

/// `data` = edit count (low 4 bits of one byte) | count × (offset u16, xor u8) | payload.
fn damaged_genuine_chunk(data: &[u8]) {
    let Some((&count, rest)) = data.split_first() else { return };
    let count = usize::from(count & 0x0f);
    if rest.len() < 3 * count {
        return;
    }
    let (edits, payload) = rest.split_at(3 * count);
    let genuine =
        Verified::sign(key(), 7, 1_700_000_000_000_000, 250_000, Flags::RANDOM_ACCESS, Bytes::copy_from_slice(payload));
    let mut wire = Vec::new();
    genuine.encode(&mut wire);
    for edit in edits.chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([edit[0], edit[1]])) % wire.len();
        wire[at] ^= edit[2];
    }
    let Ok(mut received) = Received::decode(&mut &wire[..]) else { return };
    received.header.payload_hash = Sha256::digest(&received.payload).into();
    let untouched = received == genuine.clone().into_received();
    match received.verify(verifier()) {
        Ok(chunk) => assert!(untouched, "a damaged chunk verified: {:?}", chunk.header()),
        Err(e) => assert!(!untouched, "a genuine chunk failed to verify: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(received) = Received::decode(&mut &data[..]) {
        assert!(received.verify(verifier()).is_err(), "fuzzer forged a chunk signature");
    }
    damaged_genuine_chunk(data);
});
