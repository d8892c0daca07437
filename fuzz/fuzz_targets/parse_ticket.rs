//! Ticket parsing from text and from bytes: no panic, and accepted tickets round-trip.
#![no_main]

use crowdsurf_proto::Ticket;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Ticket::from_bytes(data) {
        assert_eq!(Ticket::from_bytes(&t.to_bytes()).ok(), Some(t.clone()));
        assert_eq!(t.to_string().parse::<Ticket>().ok(), Some(t));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        for candidate in [text.to_owned(), format!("crowdsurf{text}")] {
            if let Ok(t) = candidate.parse::<Ticket>() {
                assert_eq!(t.to_string().parse::<Ticket>().ok(), Some(t));
            }
        }
    }
});
