//! Cutting the muxed MPEG-TS byte stream into chunks.
//!
//! The muxer is told to flush after every packet, so after each media packet is written we hold exactly
//! the whole TS packets (188 bytes each) that carry it: optionally SDT/PAT/PMT, then one PES. The
//! [`Chunker`] sees those bytes together with what the packet was ([`PacketMeta`]) and decides where
//! chunk boundaries go. All cuts fall between the bytes of two media packets, so a chunk is always whole
//! TS packets and never splits a PES.
//!
//! The rules:
//! - **Cut before a keyframe.** A video keyframe (or, for audio-only streams, a packet that the muxer
//!   preceded with PAT/PMT) always begins a new chunk. If the keyframe's bytes begin with PAT/PMT and
//!   its PES carries SPS (H.264 parameter sets), the new chunk is flagged random access.
//! - **Cut after enough media.** Once the chunk holds at least the target duration of the primary
//!   stream (video if there is video, else audio), it is closed right after that packet, so it is
//!   signed without waiting for the next frame.
//! - **Cut when large.** A chunk never grows past [`MAX_CHUNK_BYTES`].
//!
//! Pure logic, no FFmpeg: unit-tested below with synthetic TS packets.

use bytes::Bytes;
use crowdsurf_proto::chunk::{Flags, MAX_PAYLOAD};

/// Size of one MPEG-TS packet.
pub const TS_PACKET: usize = 188;

/// A chunk is closed once it is this large, whatever its duration (well below the protocol's limit).
pub const MAX_CHUNK_BYTES: usize = MAX_PAYLOAD as usize / 2;

/// What one muxed media packet was, as far as cutting is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    /// Whether it belongs to the video stream.
    pub video: bool,
    /// Whether it is a keyframe (audio packets count as key).
    pub key: bool,
    /// Presentation time on the broadcast's media clock, µs.
    pub pts_us: i64,
    /// Duration, µs (0 if unknown).
    pub dur_us: i64,
    /// Wall-clock time its first frame entered the broadcaster, µs since the Unix epoch.
    pub capture_us: u64,
}

/// A finished chunk before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Whole TS packets.
    pub payload: Bytes,
    /// Capture time of the chunk's first frame, µs since the Unix epoch (0 if it holds no frame).
    pub capture_us: u64,
    /// Media time the chunk covers, µs.
    pub duration_us: u32,
    /// Random access and/or end of stream.
    pub flags: Flags,
}

/// Splits the muxer's output into [`Cut`]s. See the module docs for the rules.
#[derive(Debug)]
pub struct Chunker {
    target_us: i64,
    has_video: bool,
    buf: Vec<u8>,
    packets: u32,
    start_us: Option<i64>,
    end_us: i64,
    primary_capture_us: Option<u64>,
    any_capture_us: Option<u64>,
    random_access: bool,
    missing_sps_warned: bool,
    /// The next chunk with any media in it is flagged discontinuity (the input stalled before it).
    discontinuity: bool,
    /// The tables (SDT, PAT, PMT packets) that led the latest random-access chunk: put ahead of a
    /// keyframe after a discontinuity when the muxer did not repeat them there (it repeats them
    /// on its own schedule, which a keyframe forced after a stall falls outside of).
    psi: Vec<u8>,
}

impl Chunker {
    /// A chunker aiming at `target_us` of media per chunk. `has_video` picks the primary stream.
    pub fn new(target_us: u64, has_video: bool) -> Self {
        Chunker {
            target_us: i64::try_from(target_us).unwrap_or(i64::MAX),
            has_video,
            buf: Vec::new(),
            packets: 0,
            start_us: None,
            end_us: 0,
            primary_capture_us: None,
            any_capture_us: None,
            random_access: false,
            missing_sps_warned: false,
            discontinuity: false,
            psi: Vec::new(),
        }
    }

    /// The input was interrupted (it stalled) and is back: the next chunk with media in it is
    /// flagged [`Flags::DISCONTINUITY`], so a player resets its demuxer and decoder there rather than
    /// splicing across the gap. What was buffered from before the stall (less than a chunk's worth)
    /// is dropped: it is as old as the stall, too late for any viewer, and a chunk that old could
    /// look like a replay. Returns the number of bytes dropped.
    pub fn mark_discontinuity(&mut self) -> usize {
        let dropped = self.buf.len();
        if self.packets > 0 {
            let _ = self.take(Flags::empty());
        }
        self.buf.clear();
        self.discontinuity = true;
        dropped
    }

    /// Bytes the muxer wrote that belong to no media packet (header, trailer): appended as they are.
    pub fn push_raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes of one media packet, as the muxer wrote them. Finished chunks are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], meta: &PacketMeta, out: &mut Vec<Cut>) {
        let primary = meta.video || !self.has_video;
        let mut leading_pat = primary && leading_psi_has_pat(bytes);
        if leading_pat {
            let tables = leading_tables(bytes);
            self.psi.clear();
            self.psi.extend_from_slice(tables);
        }
        let cut_point = primary && if self.has_video { meta.key } else { leading_pat };
        if cut_point && self.packets > 0 {
            out.push(self.take(Flags::empty()));
        }
        if cut_point && self.packets == 0 && self.discontinuity && !leading_pat && !self.psi.is_empty() {
            // A keyframe forced after a stall: give it the tables a decoder starts from.
            self.buf.extend_from_slice(&self.psi);
            leading_pat = true;
        }
        if self.packets == 0 && cut_point {
            let sps_ok = !meta.video || has_h264_sps(bytes);
            if leading_pat && !sps_ok && !self.missing_sps_warned {
                tracing::warn!("keyframe without SPS/PPS ahead: chunk not flagged random access");
                self.missing_sps_warned = true;
            }
            self.random_access = leading_pat && sps_ok;
        }
        self.buf.extend_from_slice(bytes);
        self.packets += 1;
        self.any_capture_us.get_or_insert(meta.capture_us);
        if primary {
            let start = *self.start_us.get_or_insert(meta.pts_us);
            self.primary_capture_us.get_or_insert(meta.capture_us);
            self.end_us = self.end_us.max(meta.pts_us.saturating_add(meta.dur_us.max(0))).max(start);
            if self.end_us - start >= self.target_us {
                out.push(self.take(Flags::empty()));
                return;
            }
        }
        if self.buf.len() >= MAX_CHUNK_BYTES {
            out.push(self.take(Flags::empty()));
        }
    }

    /// Whether bytes are waiting to be cut.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Closes the stream: whatever is buffered becomes the last chunk, flagged end of stream (its
    /// payload may be empty when the previous chunk happened to end exactly at the last packet).
    pub fn finish(&mut self) -> Cut {
        self.take(Flags::END_OF_STREAM)
    }

    fn take(&mut self, extra: Flags) -> Cut {
        let mut flags = extra;
        if self.random_access {
            flags |= Flags::RANDOM_ACCESS;
        }
        if self.discontinuity && self.packets > 0 {
            flags |= Flags::DISCONTINUITY;
            self.discontinuity = false;
        }
        let duration = match self.start_us {
            Some(start) => (self.end_us - start).clamp(0, i64::from(u32::MAX)),
            None => 0,
        };
        let cut = Cut {
            payload: Bytes::from(std::mem::take(&mut self.buf)),
            capture_us: self.primary_capture_us.or(self.any_capture_us).unwrap_or(0),
            duration_us: u32::try_from(duration).unwrap_or(u32::MAX),
            flags,
        };
        self.packets = 0;
        self.start_us = None;
        self.end_us = 0;
        self.primary_capture_us = None;
        self.any_capture_us = None;
        self.random_access = false;
        cut
    }
}

/// The PID of a TS packet, or `None` if the bytes are not a TS packet.
pub fn ts_pid(packet: &[u8]) -> Option<u16> {
    if packet.len() < 4 || packet[0] != 0x47 {
        return None;
    }
    Some((u16::from(packet[1] & 0x1f) << 8) | u16::from(packet[2]))
}

/// Whether the TS packets at the start of `bytes` that carry tables (PID below 0x100, or the PMT at
/// 0x1000 and up, as we configure the muxer) include a PAT, before the first media packet.
pub fn leading_psi_has_pat(bytes: &[u8]) -> bool {
    for packet in bytes.chunks_exact(TS_PACKET) {
        match ts_pid(packet) {
            Some(0) => return true,
            Some(pid) if !(0x100..0x1000).contains(&pid) => continue,
            _ => return false,
        }
    }
    false
}

/// The TS packets at the start of `bytes` that carry tables (see [`leading_psi_has_pat`]).
fn leading_tables(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .chunks_exact(TS_PACKET)
        .take_while(|p| matches!(ts_pid(p), Some(pid) if !(0x100..0x1000).contains(&pid)))
        .count();
    &bytes[..n * TS_PACKET]
}

/// Whether an H.264 sequence parameter set (NAL type 7) appears in the first media TS packets of
/// `bytes` (searched across packet payloads, so a start code split by a TS header is still found as
/// long as it lies in the first few packets).
pub fn has_h264_sps(bytes: &[u8]) -> bool {
    let mut payload = Vec::with_capacity(4 * TS_PACKET);
    for packet in bytes
        .chunks_exact(TS_PACKET)
        .filter(|p| matches!(ts_pid(p), Some(pid) if (0x100..0x1000).contains(&pid)))
        .take(4)
    {
        let afc = (packet[3] >> 4) & 0x3;
        let mut start = 4;
        if afc & 0x2 != 0 {
            start += 1 + usize::from(packet[4]);
        }
        if afc & 0x1 != 0 && start < TS_PACKET {
            payload.extend_from_slice(&packet[start..]);
        }
    }
    payload.windows(4).any(|w| w[0] == 0 && w[1] == 0 && w[2] == 1 && w[3] & 0x1f == 7)
}

/// Whether an H.264 access unit in Annex B form holds an SPS.
pub fn annexb_has_sps(data: &[u8]) -> bool {
    data.windows(4).any(|w| w[0] == 0 && w[1] == 0 && w[2] == 1 && w[3] & 0x1f == 7)
}

/// Whether codec extradata (or a packet) is in Annex B form (starts with a start code).
pub fn is_annexb(data: &[u8]) -> bool {
    data.starts_with(&[0, 0, 1]) || data.starts_with(&[0, 0, 0, 1])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ts(pid: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x47, ((pid >> 8) as u8) & 0x1f, pid as u8, 0x10];
        p.extend_from_slice(payload);
        p.resize(TS_PACKET, 0xff);
        p
    }

    fn keyframe_bytes() -> Vec<u8> {
        let mut b = ts(0x11, &[]);
        b.extend(ts(0, &[]));
        b.extend(ts(0x1000, &[]));
        b.extend(ts(0x100, &[0, 0, 0, 1, 9, 0xf0, 0, 0, 0, 1, 0x67, 0x42]));
        b
    }

    fn meta(video: bool, key: bool, pts_ms: i64) -> PacketMeta {
        PacketMeta {
            video,
            key,
            pts_us: pts_ms * 1000,
            dur_us: if video { 33_333 } else { 21_333 },
            capture_us: 1_000 + pts_ms as u64,
        }
    }

    #[test]
    fn keyframes_start_random_access_chunks_and_time_cuts_the_rest() {
        let mut c = Chunker::new(250_000, true);
        let mut out = Vec::new();
        for frame in 0..60 {
            let key = frame % 30 == 0;
            let bytes = if key { keyframe_bytes() } else { ts(0x100, &[0, 0, 1, 0x41]) };
            c.push(&bytes, &meta(true, key, frame * 33), &mut out);
            c.push(&ts(0x101, &[1]), &meta(false, true, frame * 33), &mut out);
        }
        out.push(c.finish());
        assert!(out.iter().all(|cut| cut.payload.len() % TS_PACKET == 0));
        let ra: Vec<_> = out.iter().map(|c| c.flags.contains(Flags::RANDOM_ACCESS)).collect();
        assert!(ra[0]);
        assert_eq!(ra.iter().filter(|r| **r).count(), 2, "{ra:?}");
        for cut in &out[..out.len() - 1] {
            assert!(cut.duration_us <= 270_000, "{cut:?}");
        }
        assert!(out.last().unwrap().flags.contains(Flags::END_OF_STREAM));
        let ra_index = out.iter().position(|c| c.flags.contains(Flags::RANDOM_ACCESS) && c.capture_us > 1_000).unwrap();
        assert_eq!(ts_pid(&out[ra_index].payload[..]), Some(0x11));
        assert_eq!(out[ra_index].capture_us, 1_000 + 30 * 33);
    }

    #[test]
    fn a_discontinuity_drops_the_stale_tail_and_flags_the_next_chunk() {
        let mut c = Chunker::new(250_000, true);
        let mut out = Vec::new();
        c.push(&keyframe_bytes(), &meta(true, true, 0), &mut out);
        c.push(&ts(0x100, b"p"), &meta(true, false, 40), &mut out);
        assert!(out.is_empty());
        assert_eq!(c.mark_discontinuity(), 5 * TS_PACKET, "the stale tail is dropped");
        assert!(c.is_empty());
        assert_eq!(c.mark_discontinuity(), 0);
        c.push(&keyframe_bytes(), &meta(true, true, 10_000), &mut out);
        c.push(&ts(0x100, b"p"), &meta(true, false, 10_300), &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].flags.contains(Flags::DISCONTINUITY | Flags::RANDOM_ACCESS), "{:?}", out[0].flags);
        assert_eq!(out[0].capture_us, 1_000 + 10_000, "nothing from before the stall");
        c.push(&keyframe_bytes(), &meta(true, true, 11_000), &mut out);
        c.push(&ts(0x100, b"p"), &meta(true, false, 11_300), &mut out);
        assert!(!out[1].flags.contains(Flags::DISCONTINUITY), "only the first chunk after the stall");
        // A keyframe after a stall that the muxer did not precede with tables gets the last ones.
        c.mark_discontinuity();
        let bare = ts(0x100, &[0, 0, 0, 1, 9, 0xf0, 0, 0, 0, 1, 0x67, 0x42]);
        c.push(&bare, &meta(true, true, 20_000), &mut out);
        c.push(&ts(0x100, b"p"), &meta(true, false, 20_300), &mut out);
        let resumed = &out[2];
        assert!(resumed.flags.contains(Flags::DISCONTINUITY | Flags::RANDOM_ACCESS), "{:?}", resumed.flags);
        assert_eq!(resumed.payload[..3 * TS_PACKET], keyframe_bytes()[..3 * TS_PACKET]);
        assert_eq!(resumed.payload.len(), 5 * TS_PACKET);
    }

    #[test]
    fn audio_only_cuts_at_pat() {
        let mut c = Chunker::new(250_000, false);
        let mut out = Vec::new();
        for i in 0..100 {
            let mut bytes = if i % 47 == 0 { keyframe_bytes()[..3 * TS_PACKET].to_vec() } else { Vec::new() };
            bytes.extend(ts(0x100, &[0xff, 0xf1]));
            c.push(&bytes, &meta(false, true, i * 21), &mut out);
        }
        assert!(out[0].flags.contains(Flags::RANDOM_ACCESS));
        assert!(out.iter().any(|c| c.flags.contains(Flags::RANDOM_ACCESS) && c.capture_us == 1_000 + 47 * 21));
    }

    #[test]
    fn sps_is_found_in_the_pes() {
        assert!(has_h264_sps(&keyframe_bytes()));
        assert!(!has_h264_sps(&ts(0x100, &[0, 0, 1, 0x65])));
        assert!(leading_psi_has_pat(&keyframe_bytes()));
        assert!(!leading_psi_has_pat(&ts(0x100, &[])));
    }
}
