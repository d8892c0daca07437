//! Control-stream decoding: whole frames and a frame reader fed in pieces. Anything accepted must
//! re-encode to exactly the bytes it came from; nothing may panic or allocate beyond the limits.
#![no_main]

use crowdsurf_proto::wire::{FrameReader, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((message, used)) = Message::decode_frame(data) {
        assert_eq!(message.to_frame(), &data[..used], "accepted frame is not canonical");
    }
    // The same bytes split at a data-chosen point must give the same messages.
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut reader = FrameReader::new();
    let mut whole = FrameReader::new();
    reader.extend(&data[..cut]);
    let mut a = Vec::new();
    while let Ok(Some(m)) = reader.next_message() {
        a.push(m);
    }
    reader.extend(&data[cut..]);
    while let Ok(Some(m)) = reader.next_message() {
        a.push(m);
    }
    whole.extend(data);
    let mut b = Vec::new();
    while let Ok(Some(m)) = whole.next_message() {
        b.push(m);
    }
    assert_eq!(a, b, "splitting the input changed the messages");
});
