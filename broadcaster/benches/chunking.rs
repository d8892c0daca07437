//! Overhead of cutting and signing one chunk, without FFmpeg: a 250 ms chunk of a 2.5 Mbit/s 720p30
//! stream (8 video frames of about 9.7 kB in whole TS packets, 12 AAC frames) goes through the
//! [`Chunker`] and is signed (SHA-256 of the payload + ed25519).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crowdsurf_broadcaster::chunker::{Chunker, Cut, PacketMeta, TS_PACKET};
use crowdsurf_broadcaster::sign_cut;
use crowdsurf_proto::keys::StreamKey;

fn ts_packets(pid: u16, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count * TS_PACKET);
    for i in 0..count {
        let mut p = vec![0x47, ((pid >> 8) as u8) & 0x1f, pid as u8, 0x10 | (i as u8 & 0x0f)];
        p.resize(TS_PACKET, (i % 251) as u8);
        out.extend_from_slice(&p);
    }
    out
}

fn bench(c: &mut Criterion) {
    let key = StreamKey::from_secret_bytes([9; 32]);
    let video = ts_packets(0x100, 52); // ~9.7 kB per frame: 2.5 Mbit/s at 30 fps
    let audio = ts_packets(0x101, 2);
    let chunk_bytes = (8 * video.len() + 12 * audio.len()) as u64;
    let mut group = c.benchmark_group("chunk");
    group.throughput(Throughput::Bytes(chunk_bytes));
    let mut seq = 0u64;
    group.bench_function("cut_and_sign_250ms_720p", |b| {
        let mut chunker = Chunker::new(250_000, true);
        let mut cuts: Vec<Cut> = Vec::new();
        b.iter(|| {
            for frame in 0..8i64 {
                let meta = PacketMeta {
                    video: true,
                    key: false,
                    pts_us: seq as i64 * 266_666 + frame * 33_333,
                    dur_us: 33_333,
                    capture_us: 1,
                };
                chunker.push(&video, &meta, &mut cuts);
                for a in 0..2 {
                    let meta = PacketMeta {
                        video: false,
                        key: true,
                        pts_us: frame * 33_333 + a,
                        dur_us: 21_333,
                        capture_us: 1,
                    };
                    chunker.push(&audio, &meta, &mut cuts);
                }
            }
            for cut in cuts.drain(..) {
                seq += 1;
                std::hint::black_box(sign_cut(&key, seq, cut));
            }
        })
    });
    group.bench_function("cut_only_250ms_720p", |b| {
        let mut chunker = Chunker::new(250_000, true);
        let mut cuts: Vec<Cut> = Vec::new();
        let mut n = 0i64;
        b.iter(|| {
            n += 1;
            for frame in 0..8i64 {
                let meta = PacketMeta {
                    video: true,
                    key: false,
                    pts_us: n * 266_666 + frame * 33_333,
                    dur_us: 33_333,
                    capture_us: 1,
                };
                chunker.push(&video, &meta, &mut cuts);
            }
            std::hint::black_box(&cuts);
            cuts.clear();
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
