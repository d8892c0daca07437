//! Chunk decoding and verification against a fixed stream key: garbage must never verify.
#![no_main]

use std::sync::OnceLock;

use crowdsurf_proto::StreamKey;
use crowdsurf_proto::chunk::{Received, Verifier};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::new(StreamKey::from_secret_bytes([9; 32]).id()).expect("valid key"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(received) = Received::decode(&mut &data[..]) {
        assert!(received.verify(verifier()).is_err(), "fuzzer forged a chunk signature");
    }
});
