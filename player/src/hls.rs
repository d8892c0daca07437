//! Live HLS from the released chunks: segments of whole chunks, each starting at a random-access chunk,
//! in a sliding window, and the `live.m3u8` playlist that lists them.
//!
//! A segment is closed at a random-access chunk once it holds at least `segment_us` of media (so with
//! a 1 s keyframe interval and the default 1 s target, one GOP of four 250 ms chunks). A gap closes
//! the current segment early and marks the next with `#EXT-X-DISCONTINUITY`. The playlist lists the
//! newest [`PLAYLIST_SEGMENTS`]; a few older ones stay fetchable for clients that read it late.

use std::collections::VecDeque;
use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};

use crate::pacer::Playout;

/// Segments listed in the playlist.
pub const PLAYLIST_SEGMENTS: usize = 6;
/// Segments kept in memory (listed ones plus a few for late readers).
pub const KEPT_SEGMENTS: usize = 10;

#[derive(Debug)]
struct Segment {
    seq: u64,
    duration_us: u64,
    discontinuity: bool,
    data: Bytes,
}

#[derive(Debug, Default)]
struct Building {
    duration_us: u64,
    discontinuity: bool,
    data: BytesMut,
}

/// The segmenter.
#[derive(Debug)]
pub struct Hls {
    segment_us: u64,
    segments: VecDeque<Segment>,
    current: Option<Building>,
    next_seq: u64,
    discontinuity_seq: u64,
    after_gap: bool,
}

impl Hls {
    /// Segments of at least `segment_us` of media.
    pub fn new(segment_us: u64) -> Self {
        Hls {
            segment_us,
            segments: VecDeque::new(),
            current: None,
            next_seq: 0,
            discontinuity_seq: 0,
            after_gap: false,
        }
    }

    /// Takes one released item.
    pub fn push(&mut self, item: &Playout) {
        match item {
            Playout::Gap { .. } => {
                self.close();
                self.after_gap = true;
            }
            Playout::Chunk(c) => {
                if c.breaks_continuity() {
                    self.close();
                    self.after_gap = true;
                }
                if c.random_access && self.current.as_ref().is_some_and(|b| b.duration_us >= self.segment_us) {
                    self.close();
                }
                if self.current.is_none() {
                    if !c.random_access {
                        return;
                    }
                    self.current = Some(Building { discontinuity: self.after_gap, ..Default::default() });
                    self.after_gap = false;
                }
                if let Some(b) = &mut self.current {
                    b.duration_us += u64::from(c.duration_us);
                    b.data.extend_from_slice(&c.payload);
                }
            }
        }
    }

    fn close(&mut self) {
        let Some(b) = self.current.take() else { return };
        if b.data.is_empty() {
            return;
        }
        self.segments.push_back(Segment {
            seq: self.next_seq,
            duration_us: b.duration_us.max(1),
            discontinuity: b.discontinuity,
            data: b.data.freeze(),
        });
        self.next_seq += 1;
        while self.segments.len() > KEPT_SEGMENTS {
            if let Some(old) = self.segments.pop_front()
                && old.discontinuity
            {
                self.discontinuity_seq += 1;
            }
        }
    }

    /// The live playlist, or None before the first segment is complete.
    pub fn playlist(&self) -> Option<String> {
        if self.segments.is_empty() {
            return None;
        }
        let skip = self.segments.len().saturating_sub(PLAYLIST_SEGMENTS);
        let listed: Vec<&Segment> = self.segments.iter().skip(skip).collect();
        // Discontinuities in kept-but-unlisted segments count too.
        let hidden_disc = self.segments.iter().take(skip).filter(|s| s.discontinuity).count() as u64;
        let target = listed.iter().map(|s| s.duration_us.div_ceil(1_000_000)).max().unwrap_or(1).max(1);
        let mut m3u8 = String::new();
        let _ = writeln!(m3u8, "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:{target}");
        let _ = writeln!(m3u8, "#EXT-X-MEDIA-SEQUENCE:{}", listed.first().map_or(0, |s| s.seq));
        let _ = writeln!(m3u8, "#EXT-X-DISCONTINUITY-SEQUENCE:{}", self.discontinuity_seq + hidden_disc);
        for s in listed {
            if s.discontinuity {
                let _ = writeln!(m3u8, "#EXT-X-DISCONTINUITY");
            }
            let _ = writeln!(m3u8, "#EXTINF:{:.3},\nseg/{}.ts", s.duration_us as f64 / 1e6, s.seq);
        }
        Some(m3u8)
    }

    /// One kept segment.
    pub fn segment(&self, seq: u64) -> Option<Bytes> {
        self.segments.iter().find(|s| s.seq == seq).map(|s| s.data.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pacer::Released;

    fn chunk(seq: u64, ra: bool, after_gap: bool) -> Playout {
        Playout::Chunk(Arc::new(Released {
            seq,
            capture_us: seq * 250_000,
            duration_us: 250_000,
            random_access: ra,
            discontinuity: false,
            end_of_stream: false,
            after_gap,
            deadline_us: 0,
            capture_local_us: 0,
            payload: Bytes::from(vec![seq as u8; 188]),
        }))
    }

    #[test]
    fn segments_start_at_random_access_and_slide() {
        let mut h = Hls::new(1_000_000);
        h.push(&chunk(0, false, false)); // before any random access: dropped
        assert!(h.playlist().is_none());
        for seq in 1..=60 {
            h.push(&chunk(seq, seq % 4 == 1, false));
        }
        let p = h.playlist().unwrap_or_default();
        assert!(p.contains("#EXT-X-TARGETDURATION:1"), "{p}");
        assert_eq!(p.matches("#EXTINF:1.000,").count(), PLAYLIST_SEGMENTS, "{p}");
        let first = p.lines().find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:")).unwrap_or_default();
        let first: u64 = first.parse().unwrap_or(0);
        let seg = h.segment(first).unwrap_or_default();
        assert_eq!(seg.len(), 4 * 188);
        assert!(h.segment(0).is_none(), "old segments slide out");
    }

    #[test]
    fn a_gap_closes_the_segment_and_marks_the_next() {
        let mut h = Hls::new(1_000_000);
        h.push(&chunk(1, true, false));
        h.push(&chunk(2, false, false));
        h.push(&Playout::Gap { seq: 3 });
        h.push(&chunk(4, false, true)); // waits for random access
        h.push(&chunk(5, true, false));
        for seq in 6..=9 {
            h.push(&chunk(seq, seq == 9, false));
        }
        let p = h.playlist().unwrap_or_default();
        assert_eq!(p.matches("#EXT-X-DISCONTINUITY\n").count(), 1, "{p}");
        assert!(p.contains("#EXTINF:0.500,\nseg/0.ts"), "{p}");
        assert!(p.contains("#EXTINF:1.000,\nseg/1.ts"), "{p}");
    }
}
