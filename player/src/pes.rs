//! Closing the last PES packet of a chunk, so the demuxer hands it over without waiting for the next
//! chunk.
//!
//! MPEG-TS muxers (FFmpeg's by default) leave `PES_packet_length` at 0 ("unbounded") for video. A
//! demuxer then knows a picture is complete only when the next PES packet of the same stream begins,
//! which for the last picture of a chunk is in the *next* chunk: that picture would come out of the
//! demuxer a whole chunk interval late (the next chunk is released at its own deadline), and be late on
//! screen. A chunk never splits a PES packet (the broadcaster cuts between media packets), so the
//! player knows where each one ends: [`close_last_pes`] writes the real length into the last PES
//! header of each audio/video stream in the chunk when it fits in 16 bits. Nothing else changes; a
//! chunk that does not parse as whole TS packets is passed on untouched.

use std::collections::HashMap;

use bytes::Bytes;

const TS: usize = 188;

/// The last PES packet of one PID: where its length field is and how long it is so far.
struct Open {
    /// Offset of the `PES_packet_length` field in the chunk, if the header's first 6 bytes are in
    /// its first TS packet and the length is unbounded (0).
    length_at: Option<usize>,
    /// PES bytes seen so far, header included.
    bytes: usize,
}

/// The chunk with the unbounded length of its last audio/video PES packets made exact, where one
/// needs it and it fits; the same bytes otherwise (no copy when nothing changes).
pub fn close_last_pes(payload: &Bytes) -> Bytes {
    if payload.is_empty() || !payload.len().is_multiple_of(TS) {
        return payload.clone();
    }
    let mut open: HashMap<u16, Open> = HashMap::new();
    for (i, packet) in payload.chunks_exact(TS).enumerate() {
        if packet[0] != 0x47 {
            return payload.clone();
        }
        let pusi = packet[1] & 0x40 != 0;
        let pid = (u16::from(packet[1] & 0x1f) << 8) | u16::from(packet[2]);
        let afc = (packet[3] >> 4) & 0x3;
        let start = match afc {
            1 => 4,
            3 => 5 + usize::from(packet[4]),
            _ => continue, // no payload (or reserved)
        };
        if start >= TS || pid == 0x1fff {
            continue;
        }
        let data = &packet[start..];
        if pusi {
            let is_media_pes = data.len() >= 6 && data[..3] == [0, 0, 1] && (0xc0..=0xef).contains(&data[3]);
            if is_media_pes {
                let unbounded = data[4] == 0 && data[5] == 0;
                open.insert(pid, Open { length_at: unbounded.then_some(i * TS + start + 4), bytes: data.len() });
            } else {
                open.remove(&pid);
            }
        } else if let Some(o) = open.get_mut(&pid) {
            o.bytes += data.len();
        }
    }
    let fixes: Vec<(usize, u16)> = open
        .values()
        .filter_map(|o| Some((o.length_at?, u16::try_from(o.bytes.checked_sub(6)?).ok()?)))
        .filter(|&(_, len)| len > 0)
        .collect();
    if fixes.is_empty() {
        return payload.clone();
    }
    let mut out = payload.to_vec();
    for (at, len) in fixes {
        out[at..at + 2].copy_from_slice(&len.to_be_bytes());
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TS packets carrying one PES of `len` payload bytes on `pid` with an unbounded length field.
    fn pes(pid: u16, stream_id: u8, len: usize, with_adaptation: bool) -> Vec<u8> {
        let mut pes = vec![0, 0, 1, stream_id, 0, 0, 0x80, 0x80, 5, 0x21, 0, 1, 0, 1];
        pes.extend((0..len).map(|n| n as u8));
        let mut out = Vec::new();
        let mut first = true;
        let mut rest = &pes[..];
        while !rest.is_empty() {
            let mut p = vec![0x47, ((pid >> 8) as u8) | if first { 0x40 } else { 0 }, pid as u8];
            let room = if with_adaptation && first { TS - 4 - 2 } else { TS - 4 };
            let take = rest.len().min(room);
            let stuffing = room - take;
            if with_adaptation && first || stuffing > 0 {
                // Adaptation field: length byte, flags byte, stuffing.
                let af_len = if with_adaptation && first { 1 + stuffing } else { stuffing.saturating_sub(1) };
                p.push(0x30);
                p.push(af_len as u8);
                if af_len > 0 {
                    p.push(0);
                    p.extend(std::iter::repeat_n(0xff, af_len - 1));
                }
                let room_now = TS - p.len();
                let take = rest.len().min(room_now);
                p.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
            } else {
                p.push(0x10);
                p.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
            }
            assert_eq!(p.len(), TS, "test packet size");
            out.extend(p);
            first = false;
        }
        out
    }

    fn length_field(chunk: &[u8], packet: usize) -> u16 {
        let p = &chunk[packet * TS..];
        let start = if (p[3] >> 4) & 3 == 3 { 5 + usize::from(p[4]) } else { 4 };
        u16::from_be_bytes([p[start + 4], p[start + 5]])
    }

    #[test]
    fn the_last_video_pes_of_a_chunk_gets_its_length() {
        let first = pes(0x100, 0xe0, 1000, true);
        let last = pes(0x100, 0xe0, 700, false);
        let chunk: Vec<u8> = [first.clone(), last.clone()].concat();
        let out = close_last_pes(&Bytes::from(chunk.clone()));
        let last_packet = first.len() / TS;
        // 8 header bytes after the length field + 700 payload bytes.
        assert_eq!(length_field(&out, last_packet), 708);
        // The earlier PES is left alone (the next one closes it), and nothing else moved.
        assert_eq!(length_field(&out, 0), 0);
        let changed = out.iter().zip(&chunk).filter(|(a, b)| a != b).count();
        assert!(changed <= 2, "{changed} bytes changed");
    }

    #[test]
    fn bounded_oversized_and_foreign_chunks_are_untouched() {
        let big = Bytes::from(pes(0x100, 0xe0, 70_000, false));
        assert_eq!(close_last_pes(&big), big, "a length over 16 bits stays unbounded");
        let mut bounded = pes(0x101, 0xc0, 300, false);
        bounded[4 + 5] = 50; // a length already there
        let bounded = Bytes::from(bounded);
        assert_eq!(close_last_pes(&bounded), bounded);
        let garbage = Bytes::from(vec![0x11u8; TS * 3]);
        assert_eq!(close_last_pes(&garbage), garbage);
        let ragged = Bytes::from(vec![0x47u8; TS + 5]);
        assert_eq!(close_last_pes(&ragged), ragged);
        assert_eq!(close_last_pes(&Bytes::new()), Bytes::new());
    }

    #[test]
    fn each_stream_is_closed_on_its_own() {
        let chunk: Vec<u8> = [pes(0x100, 0xe0, 400, false), pes(0x101, 0xc0, 200, true)].concat();
        let out = close_last_pes(&Bytes::from(chunk));
        assert_eq!(length_field(&out, 0), 408);
        let audio_packet = out.len() / TS - 2;
        assert_eq!(length_field(&out, audio_packet), 208);
    }
}
