//! A synthetic live source: signed chunks of random-looking payload at a given bitrate, for the lab,
//! benchmarks and tests (no media involved).

use bytes::Bytes;
use crowdsurf_proto::StreamKey;
use crowdsurf_proto::chunk::{Flags, Verified};

/// Makes the chunks of a synthetic stream.
#[derive(Debug)]
pub struct SyntheticSource {
    key: StreamKey,
    next_seq: u64,
    chunk_us: u32,
    chunk_bytes: usize,
    random_access_every: u64,
    state: u64,
}

impl SyntheticSource {
    /// A source signing with `key`, starting at `first_seq`, `chunk_ms` per chunk at `bitrate_bps`, with
    /// a random-access chunk every `random_access_every` chunks.
    pub fn new(key: StreamKey, first_seq: u64, chunk_ms: u32, bitrate_bps: u64, random_access_every: u64) -> Self {
        let chunk_bytes = (bitrate_bps * u64::from(chunk_ms) / 8 / 1000).max(188) as usize;
        SyntheticSource {
            key,
            next_seq: first_seq,
            chunk_us: chunk_ms * 1000,
            chunk_bytes,
            random_access_every: random_access_every.max(1),
            state: first_seq | 1,
        }
    }

    /// Chunk duration, µs.
    pub fn chunk_us(&self) -> u32 {
        self.chunk_us
    }

    /// The next chunk, captured at `capture_us`.
    pub fn next_chunk(&mut self, capture_us: u64) -> Verified {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut payload = vec![0u8; self.chunk_bytes];
        for b in payload.chunks_mut(8) {
            // xorshift64*: filler that does not compress, nothing more.
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            b.copy_from_slice(&v[..b.len()]);
        }
        let flags = if seq.is_multiple_of(self.random_access_every) { Flags::RANDOM_ACCESS } else { Flags::empty() };
        Verified::sign(&self.key, seq, capture_us, self.chunk_us, flags, Bytes::from(payload))
    }
}

/// Random-access chunks come every this many chunks for a keyframe interval of `keyint_ms` and
/// chunks of `chunk_ms` (as the broadcaster cuts them: a chunk starts at each keyframe).
pub fn random_access_every(keyint_ms: u32, chunk_ms: u32) -> u64 {
    u64::from(keyint_ms.div_ceil(chunk_ms.max(1))).max(1)
}

#[cfg(test)]
mod tests {
    use super::random_access_every;

    #[test]
    fn a_keyframe_a_second_in_chunks_of_any_length() {
        assert_eq!(random_access_every(1000, 250), 4);
        assert_eq!(random_access_every(1000, 125), 8);
        // A chunk is cut at each keyframe, so 300 ms chunks give 300, 300, 300, 100.
        assert_eq!(random_access_every(1000, 300), 4);
        assert_eq!(random_access_every(500, 1000), 1);
        assert_eq!(random_access_every(1000, 0), 1000);
    }
}
