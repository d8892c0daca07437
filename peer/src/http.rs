//! The optional local stats listener: `GET /metrics` (Prometheus text) and `GET /stats` (JSON).
//!
//! Deliberately tiny (one request per connection, request head capped at 8 KiB, 5 s to send it): it
//! serves a few figures to a local scraper, nothing else. Run [`serve`] as a future beside the node.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::stats::StatsCell;

const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Binds the listener (so a bad address fails at start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "stats at http://{}/stats and /metrics", listener.local_addr()?);
    Ok(listener)
}

/// Serves requests forever (until the future is dropped).
pub async fn serve(listener: TcpListener, stats: StatsCell) {
    let mut clients = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if clients.len() >= 64 {
                        debug!(%peer, "too many stats clients; dropping one");
                        continue;
                    }
                    let stats = stats.clone();
                    clients.spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, stats)).await;
                    });
                }
                Err(e) => debug!(error = %e, "stats accept failed"),
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

async fn answer(mut stream: TcpStream, stats: StatsCell) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "request too large\n")
                .await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if method != b"GET" {
        return respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET\n").await;
    }
    match path {
        b"/metrics" => {
            let body = stats.snapshot().to_prometheus();
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &body).await
        }
        b"/stats" => {
            let body =
                serde_json::to_string_pretty(&stats.snapshot()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            respond(&mut stream, "200 OK", "application/json", &body).await
        }
        _ => respond(&mut stream, "404 Not Found", "text/plain", "try /stats or /metrics\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
