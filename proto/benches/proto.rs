//! Benchmarks of the per-chunk costs every node pays: signing (broadcaster), verifying (every node, for
//! every chunk it receives), and the buffer-map codec (every announcement).
//!
//! Run with `cargo bench -p crowdsurf-proto`.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crowdsurf_proto::chunk::{Flags, Verified, Verifier};
use crowdsurf_proto::keys::StreamKey;
use crowdsurf_proto::window::{BufferMap, Window};
use crowdsurf_proto::wire::Message;
use std::hint::black_box;

fn chunks(c: &mut Criterion) {
    let key = StreamKey::from_secret_bytes([5; 32]);
    let verifier = Verifier::new(key.id()).expect("valid key");
    let payload = Bytes::from(vec![0x47u8; 64 * 1024]);
    let mut group = c.benchmark_group("chunk_64KiB");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("sign", |b| {
        b.iter(|| Verified::sign(&key, black_box(7), 1, 250_000, Flags::RANDOM_ACCESS, payload.clone()))
    });
    let signed = Verified::sign(&key, 7, 1, 250_000, Flags::RANDOM_ACCESS, payload.clone());
    group.bench_function("verify", |b| {
        b.iter(|| black_box(signed.clone().into_received()).verify(&verifier).expect("valid chunk"))
    });
    group.bench_function("verify_with_key_setup", |b| {
        b.iter(|| {
            let v = Verifier::new(black_box(key.id())).expect("valid key");
            signed.clone().into_received().verify(&v).expect("valid chunk")
        })
    });
    group.finish();
}

fn buffer_maps(c: &mut Criterion) {
    // A 10 s window of 250 ms chunks with a few holes, as a node announces it.
    let mut window = Window::new(40, 1000);
    for seq in 1000..1040 {
        if seq % 7 != 3 {
            window.insert(seq, ());
        }
    }
    let map = window.buffer_map();
    let message = Message::BufferMap(map.clone());
    let frame = message.to_frame();
    let mut group = c.benchmark_group("buffer_map_40");
    group.bench_function("from_window", |b| b.iter(|| black_box(&window).buffer_map()));
    group.bench_function("encode_frame", |b| {
        let mut out = Vec::with_capacity(64);
        b.iter(|| {
            out.clear();
            black_box(&message).encode_frame(&mut out);
        })
    });
    group.bench_function("decode_frame", |b| b.iter(|| Message::decode_frame(black_box(&frame)).expect("valid")));
    group.bench_function("decode_raw", |b| {
        let mut raw = Vec::new();
        map.encode(&mut raw);
        b.iter(|| BufferMap::decode(&mut black_box(&raw[..])).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, chunks, buffer_maps);
criterion_main!(benches);
