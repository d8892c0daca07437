//! Prints the worked examples of `docs/protocol.md`: real bytes from this crate, made with fixed keys
//! (ed25519 signatures are deterministic, so the output never changes unless the format does).
//!
//! ```sh
//! cargo run -p crowdsurf-proto --example protocol_bytes                              # print them
//! cargo run -p crowdsurf-proto --example protocol_bytes -- --check docs/protocol.md  # CI: still true?
//! ```
//!
//! With `--check FILE` it prints nothing but fails if any example's bytes are missing from `FILE`,
//! so the document cannot drift away from the code unnoticed.

use std::error::Error;
use std::net::SocketAddr;

use bytes::Bytes;
use crowdsurf_proto::chunk::{Received, Verifier};
use crowdsurf_proto::wire::{Message, NodeAddr};
use crowdsurf_proto::{Flags, NodeKey, StreamKey, Ticket, Verified};

/// One example: a title, and its bytes (or text) exactly as the document shows them.
struct Example {
    title: &'static str,
    /// Hex, 16 bytes a line, or plain text.
    body: String,
}

fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|line| line.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn examples() -> Result<Vec<Example>, Box<dyn Error>> {
    let stream_key = StreamKey::from_secret_bytes([0x11; 32]);
    let node_key = NodeKey::from_secret_bytes([0x22; 32]);
    let payload = Bytes::from_static(b"hello, swarm");
    let chunk =
        Verified::sign(&stream_key, 1000, 1_700_000_000_000_000, 250_000, Flags::RANDOM_ACCESS, payload.clone());
    // The example must itself be a valid chunk.
    let mut wire = Vec::new();
    chunk.encode(&mut wire);
    Received::decode(&mut &wire[..])?.verify(&Verifier::new(stream_key.id())?)?;

    let ticket = Ticket::new(
        stream_key.id(),
        vec![NodeAddr {
            id: node_key.id(),
            addrs: vec!["192.0.2.1:4433".parse::<SocketAddr>()?, "[2001:db8::1]:4433".parse::<SocketAddr>()?],
        }],
    );
    let text = ticket.to_string();
    if text.parse::<Ticket>()? != ticket {
        return Err("ticket does not round-trip".into());
    }

    Ok(vec![
        Example { title: "stream secret key (32 bytes, every byte 0x11)", body: hex_lines(&stream_key.secret_bytes()) },
        Example { title: "stream id (its ed25519 public key)", body: hex_lines(stream_key.id().as_bytes()) },
        Example { title: "payload (12 bytes: \"hello, swarm\")", body: hex_lines(&payload) },
        Example { title: "signing bytes (113)", body: hex_lines(&chunk.header().signing_bytes(&stream_key.id())) },
        Example {
            title: "signed chunk header (121): header (57) then signature (64)",
            body: hex_lines(&chunk.signed_header_bytes()),
        },
        Example { title: "Have { seq: 1000 } frame (13)", body: hex_lines(&Message::Have { seq: 1000 }.to_frame()) },
        Example { title: "node secret key (every byte 0x22) gives node id", body: hex_lines(node_key.id().as_bytes()) },
        Example { title: "ticket bytes", body: hex_lines(&ticket.to_bytes()) },
        Example { title: "ticket text", body: text },
    ])
}

/// Whitespace-free lowercase form, so line breaks in the document do not matter.
fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).flat_map(char::to_lowercase).collect()
}

fn main() -> Result<(), Box<dyn Error>> {
    let examples = examples()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            for e in &examples {
                println!("**{}:**\n\n```text\n{}\n```\n", e.title, e.body);
            }
            Ok(())
        }
        [flag, path] if flag == "--check" => {
            let doc = squash(&std::fs::read_to_string(path)?);
            let missing: Vec<&str> =
                examples.iter().filter(|e| !doc.contains(&squash(&e.body))).map(|e| e.title).collect();
            if missing.is_empty() {
                println!("{path}: all {} worked examples match the code", examples.len());
                Ok(())
            } else {
                Err(format!(
                    "{path} is out of date; regenerate with `cargo run -p crowdsurf-proto --example protocol_bytes`. \
                     Missing: {}",
                    missing.join("; ")
                )
                .into())
            }
        }
        _ => Err("usage: protocol_bytes [--check docs/protocol.md]".into()),
    }
}
