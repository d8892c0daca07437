//! The local HTTP gateway: `/stream.ts` (the live MPEG-TS, for VLC, mpv, ffplay), `/live.m3u8` with
//! `/seg/N.ts` (live HLS, for browsers and TVs), `/stats` (JSON) and `/` (a short page of links).
//!
//! Deliberately small, like the peer's stats listener: HTTP/1.1, one request per connection
//! (`Connection: close`), request head capped at 8 KiB and 5 s. Every `/stream.ts` client gets its own
//! task and its own receiver on the [`Hub`]: it starts at the newest random-access chunk, and a client
//! that disconnects, stops reading for [`WRITE_TIMEOUT`] or falls [`crate::hub::CHANNEL_CHUNKS`]
//! chunks behind is dropped alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tracing::{debug, info};

use crate::hub::{Hub, Resync};
use crate::pacer::Playout;

const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client that accepts no bytes for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Produces the `/stats` JSON on demand.
pub type StatsFn = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves the gateway until the future is dropped.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>, stats: StatsFn) {
    let mut clients = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    clients.spawn(handle(stream, peer, hub.clone(), stats.clone()));
                }
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.ok()??;
    Some(String::from_utf8_lossy(&head).into_owned())
}

async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &[u8], head_only: bool) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        if !head_only {
            stream.write_all(body).await?;
        }
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

async fn handle(mut stream: TcpStream, peer: SocketAddr, hub: Arc<Hub>, stats: StatsFn) {
    let Some(head) = read_head(&mut stream).await else { return };
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        respond(&mut stream, "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n", false).await;
        return;
    }
    debug!(%peer, path, "request");
    match path {
        "/stream.ts" => {
            if head_only {
                respond(&mut stream, "200 OK", "video/mp2t", b"", true).await;
                return;
            }
            info!(%peer, "TS client connected");
            let why = stream_ts(&mut stream, &hub).await;
            info!(%peer, why, "TS client dropped");
        }
        "/live.m3u8" => {
            // A player asking before the first segment is complete waits a little rather than failing.
            let mut playlist = hub.playlist();
            for _ in 0..50 {
                if playlist.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                playlist = hub.playlist();
            }
            match playlist {
                Some(p) => {
                    respond(&mut stream, "200 OK", "application/vnd.apple.mpegurl", p.as_bytes(), head_only).await
                }
                None => {
                    respond(
                        &mut stream,
                        "503 Service Unavailable",
                        "text/plain",
                        b"the stream has not started yet\n",
                        head_only,
                    )
                    .await
                }
            }
        }
        "/stats" => respond(&mut stream, "200 OK", "application/json", stats().as_bytes(), head_only).await,
        "/" => {
            let page = "<!doctype html><title>crowdsurf player</title><h1>crowdsurf player</h1>\
                <ul><li><a href=\"/stream.ts\">/stream.ts</a> live MPEG-TS (vlc, mpv, ffplay)</li>\
                <li><a href=\"/live.m3u8\">/live.m3u8</a> live HLS (Safari, TVs, hls.js)</li>\
                <li><a href=\"/stats\">/stats</a> figures (JSON)</li></ul>\n";
            respond(&mut stream, "200 OK", "text/html; charset=utf-8", page.as_bytes(), head_only).await
        }
        p => match p.strip_prefix("/seg/").and_then(|s| s.strip_suffix(".ts")).and_then(|s| s.parse::<u64>().ok()) {
            Some(seq) => match hub.segment(seq) {
                Some(data) => respond(&mut stream, "200 OK", "video/mp2t", &data, head_only).await,
                None => {
                    respond(&mut stream, "404 Not Found", "text/plain", b"segment gone or not yet made\n", head_only)
                        .await
                }
            },
            None => {
                respond(&mut stream, "404 Not Found", "text/plain", b"try /stream.ts or /live.m3u8\n", head_only).await
            }
        },
    }
}

/// Streams the live TS to one client until it goes away or falls behind; returns why it ended.
async fn stream_ts(stream: &mut TcpStream, hub: &Hub) -> &'static str {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nCache-Control: no-cache\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n";
    let (gop, mut rx) = hub.subscribe();
    let mut resync = Resync::default();
    if tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(head.as_bytes())).await.map_or(true, |r| r.is_err()) {
        return "disconnected";
    }
    for chunk in gop {
        if resync.admit(&chunk) && !write_chunk(stream, &chunk.payload).await {
            return "disconnected";
        }
    }
    loop {
        match rx.recv().await {
            Ok(Playout::Chunk(chunk)) => {
                if resync.admit(&chunk) && !write_chunk(stream, &chunk.payload).await {
                    return "disconnected or stopped reading";
                }
            }
            Ok(Playout::Gap { .. }) => resync.gap(),
            Err(broadcast::error::RecvError::Lagged(_)) => return "fell too far behind",
            Err(broadcast::error::RecvError::Closed) => return "player stopping",
        }
    }
}

async fn write_chunk(stream: &mut TcpStream, payload: &[u8]) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(payload)).await, Ok(Ok(())))
}
