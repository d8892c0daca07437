//! Pacing at the playback point: every chunk the node delivers is held until its deadline and only
//! then released to the decoder and the outputs, so everything downstream runs at live pace, a fixed
//! `latency` behind capture.
//!
//! The node delivers chunks in sequence order as soon as each one is present (often well before its
//! deadline) and reports a [`Delivery::Skip`] when a chunk missed its deadline. The [`Pacer`] keeps
//! them in that order and releases each at `capture + latency` on our wall clock (corrected by the
//! node's estimate of the origin's clock offset). A skip, or a jump in sequence numbers, becomes a
//! [`Playout::Gap`] and marks the next chunk `after_gap`, so consumers resynchronise at the next
//! random-access chunk.
//!
//! Like the swarm state machine it has no clock of its own: `now` comes in as wall-clock µs.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use crowdsurf_peer::Delivery;
use crowdsurf_proto::chunk::{Flags, Verified};

/// A chunk released at the playback point.
#[derive(Debug, Clone)]
pub struct Released {
    /// Sequence number.
    pub seq: u64,
    /// Broadcaster wall clock at the chunk's first frame, µs since the epoch.
    pub capture_us: u64,
    /// Media duration of the chunk, µs.
    pub duration_us: u32,
    /// Starts with PAT/PMT, parameter sets and a keyframe: a decoder can start here.
    pub random_access: bool,
    /// The broadcaster flagged a discontinuity (e.g. it restarted its muxer).
    pub discontinuity: bool,
    /// The broadcaster's last chunk.
    pub end_of_stream: bool,
    /// The first chunk after a gap (a skipped chunk or a jump in sequence numbers).
    pub after_gap: bool,
    /// When it is due (its first picture on screen, its bytes to the TS outputs), our wall clock, µs.
    pub deadline_us: u64,
    /// `capture_us` on our wall clock (corrected by the estimated origin clock offset), µs: what
    /// display latency is measured from.
    pub capture_local_us: u64,
    /// Whole MPEG-TS packets.
    pub payload: Bytes,
}

impl Released {
    /// Whether a consumer must restart its demuxer here (after a gap or a broadcaster discontinuity).
    pub fn breaks_continuity(&self) -> bool {
        self.after_gap || self.discontinuity
    }
}

/// What comes out of the pacer, in order.
#[derive(Debug, Clone)]
pub enum Playout {
    /// A chunk at its deadline.
    Chunk(Arc<Released>),
    /// A chunk that will not come: consumers drop what they have of the current run and resume at
    /// the next random-access chunk.
    Gap {
        /// The missing sequence number.
        seq: u64,
    },
}

/// Holds delivered chunks until their deadline.
#[derive(Debug)]
pub struct Pacer {
    latency_us: u64,
    origin_offset_us: i64,
    queue: VecDeque<(u64, Playout)>,
    last_seq: Option<u64>,
    gap_pending: bool,
    last_due: u64,
}

impl Pacer {
    /// A pacer releasing chunks `latency_us` after their capture time.
    pub fn new(latency_us: u64) -> Self {
        Pacer {
            latency_us,
            origin_offset_us: 0,
            queue: VecDeque::new(),
            last_seq: None,
            gap_pending: false,
            last_due: 0,
        }
    }

    /// Sets the estimated origin clock − our clock, µs (from the node's stats).
    pub fn set_origin_offset(&mut self, offset_us: i64) {
        self.origin_offset_us = offset_us;
    }

    /// The deadline of a chunk captured at `capture_us`, on our clock.
    pub fn deadline(&self, capture_us: u64) -> u64 {
        self.local(capture_us).saturating_add(self.latency_us)
    }

    /// An origin-clock time on our clock.
    pub fn local(&self, origin_us: u64) -> u64 {
        let t = i128::from(origin_us) - i128::from(self.origin_offset_us);
        u64::try_from(t.max(0)).unwrap_or(u64::MAX)
    }

    /// Takes in one delivery from the node.
    pub fn handle_delivery(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Chunk(chunk) => self.handle_chunk(&chunk),
            Delivery::Skip(seq) => {
                self.last_seq = Some(seq);
                self.gap_pending = true;
                // Due at once, but never ahead of chunks queued before it.
                self.queue.push_back((self.last_due, Playout::Gap { seq }));
            }
        }
    }

    fn handle_chunk(&mut self, chunk: &Verified) {
        let h = chunk.header();
        let seq = chunk.seq();
        if self.last_seq.is_some_and(|last| seq <= last) {
            // Replayed or out of order: the node never does this, but stay safe.
            return;
        }
        let jumped = self.last_seq.is_some_and(|last| seq != last + 1);
        if jumped && !self.gap_pending {
            self.queue.push_back((self.last_due, Playout::Gap { seq: seq - 1 }));
        }
        let after_gap = jumped || self.gap_pending;
        self.gap_pending = false;
        self.last_seq = Some(seq);
        // Deadlines never run backwards, so releases stay in order even if capture times wobble.
        let due = self.deadline(h.capture_us).max(self.last_due);
        self.last_due = due;
        let released = Released {
            seq,
            capture_us: h.capture_us,
            duration_us: h.duration_us,
            random_access: h.is_random_access(),
            discontinuity: h.flags.contains(Flags::DISCONTINUITY),
            end_of_stream: h.flags.contains(Flags::END_OF_STREAM),
            after_gap,
            deadline_us: due,
            capture_local_us: self.local(h.capture_us),
            payload: chunk.payload().clone(),
        };
        self.queue.push_back((due, Playout::Chunk(Arc::new(released))));
    }

    /// When the next item is due (our wall clock, µs), if any is queued.
    pub fn next_due(&self) -> Option<u64> {
        self.queue.front().map(|(due, _)| *due)
    }

    /// The next item if it is due at `now_us`.
    pub fn poll(&mut self, now_us: u64) -> Option<Playout> {
        match self.queue.front() {
            Some((due, _)) if *due <= now_us => self.queue.pop_front().map(|(_, p)| p),
            _ => None,
        }
    }

    /// Media held, µs (the player's buffer).
    pub fn buffered_us(&self) -> u64 {
        self.queue
            .iter()
            .map(|(_, p)| match p {
                Playout::Chunk(c) => u64::from(c.duration_us),
                Playout::Gap { .. } => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crowdsurf_proto::StreamKey;

    fn chunk(seq: u64, capture_us: u64, flags: Flags) -> Verified {
        let key = StreamKey::from_secret_bytes([3; 32]);
        Verified::sign(&key, seq, capture_us, 250_000, flags, Bytes::from_static(&[0x47; 188]))
    }

    #[test]
    fn chunks_are_held_until_capture_plus_latency() {
        let mut p = Pacer::new(1_000_000);
        p.handle_delivery(Delivery::Chunk(chunk(10, 5_000_000, Flags::RANDOM_ACCESS)));
        p.handle_delivery(Delivery::Chunk(chunk(11, 5_250_000, Flags::empty())));
        assert_eq!(p.next_due(), Some(6_000_000));
        assert!(p.poll(5_999_999).is_none());
        assert!(matches!(p.poll(6_000_000), Some(Playout::Chunk(c)) if c.seq == 10 && !c.after_gap));
        assert!(p.poll(6_100_000).is_none());
        assert!(matches!(p.poll(6_250_000), Some(Playout::Chunk(c)) if c.seq == 11));
    }

    #[test]
    fn a_skip_is_a_gap_in_order_and_marks_the_next_chunk() {
        let mut p = Pacer::new(500_000);
        p.handle_delivery(Delivery::Chunk(chunk(1, 1_000_000, Flags::RANDOM_ACCESS)));
        p.handle_delivery(Delivery::Skip(2));
        p.handle_delivery(Delivery::Chunk(chunk(3, 1_500_000, Flags::empty())));
        assert!(p.poll(1_400_000).is_none(), "the gap must not overtake chunk 1");
        assert!(matches!(p.poll(1_500_000), Some(Playout::Chunk(c)) if c.seq == 1));
        assert!(matches!(p.poll(1_500_000), Some(Playout::Gap { seq: 2 })));
        assert!(p.poll(1_999_999).is_none());
        assert!(matches!(p.poll(2_000_000), Some(Playout::Chunk(c)) if c.seq == 3 && c.after_gap));
    }

    #[test]
    fn a_jump_in_sequence_numbers_is_a_gap() {
        let mut p = Pacer::new(0);
        p.handle_delivery(Delivery::Chunk(chunk(1, 10, Flags::RANDOM_ACCESS)));
        p.handle_delivery(Delivery::Chunk(chunk(9, 20, Flags::RANDOM_ACCESS)));
        p.handle_delivery(Delivery::Chunk(chunk(5, 30, Flags::RANDOM_ACCESS)));
        let out: Vec<_> = std::iter::from_fn(|| p.poll(100)).collect();
        assert_eq!(out.len(), 3);
        assert!(matches!(&out[1], Playout::Gap { seq: 8 }));
        assert!(matches!(&out[2], Playout::Chunk(c) if c.seq == 9 && c.breaks_continuity()));
    }

    #[test]
    fn the_origin_offset_moves_deadlines() {
        let mut p = Pacer::new(1_000);
        p.set_origin_offset(300);
        assert_eq!(p.deadline(10_000), 10_700);
        assert_eq!(p.local(10_000), 9_700);
    }
}
