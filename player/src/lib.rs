//! # crowdsurf-player
//!
//! Watch a crowdsurf live stream as a peer of its swarm. The player embeds a [`crowdsurf_peer::Node`]
//! (which relays to other viewers unless told not to), holds every chunk the node delivers until its
//! deadline — capture time + `latency` — and then hands it, at live pace, to:
//!
//! - the decoder ([`decode`]): an FFmpeg demuxer fed from memory, H.264 + AAC decoders, display timing
//!   and the headless figures; frames optionally go on to a window ([`decode::FrameSink`]);
//! - the TS outputs ([`hub`]): the local HTTP gateway ([`gateway`], `/stream.ts` and live HLS from
//!   [`hls`]), stdout and a record file.
//!
//! ```text
//! node ──deliveries──▶ Pacer (hold until capture+latency) ──▶ decoder thread ──▶ stats / window
//!                                                         └─▶ Hub ──▶ HTTP clients, HLS, stdout, file
//! ```
//!
//! The decoder gets each chunk [`DECODE_LEAD`] ahead of its deadline (so the chunk's first picture is
//! decoded by the time it is due, even on a busy machine, and then held until due); the TS outputs get
//! it at the deadline itself.
//!
//! A chunk missing at its deadline (the node reports a skip) becomes a gap: every consumer drops what
//! follows until the next random-access chunk and resumes there, without restarting anything.
//!
//! [`run`] is the one entry point; the binary `crowdsurf-player` is a thin command line around it.

pub mod decode;
pub mod gateway;
pub mod hls;
pub mod hub;
pub mod pacer;
pub mod pes;
#[cfg(feature = "window")]
pub mod window;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crowdsurf_peer::stats::NodeStats;
use crowdsurf_peer::{Node, NodeConfig, NodeError};
use crowdsurf_proto::wire::Role;
use crowdsurf_proto::{NodeKey, Ticket};
use serde::Serialize;
use tracing::{info, warn};

pub use decode::{DecodeReport, DecodeStats, FrameSink};
use pacer::{Pacer, Playout};

/// How long before its deadline a chunk goes to the decoder (at most half the latency): decoding takes
/// a few milliseconds per picture, more on a loaded machine, and a picture decoded early simply waits.
pub const DECODE_LEAD: Duration = Duration::from_millis(100);

/// A few lines of live figures the player keeps up to date once a second (the window's overlay).
pub type StatusLine = Arc<Mutex<String>>;

/// Everything the player needs to start.
pub struct PlayerConfig {
    /// The stream and its bootstrap nodes.
    pub ticket: Ticket,
    /// This node's identity.
    pub key: NodeKey,
    /// UDP address for the embedded node.
    pub listen: SocketAddr,
    /// Playback point behind capture (the deadline of every chunk).
    pub latency: Duration,
    /// Relay to other viewers while watching.
    pub relay: bool,
    /// Neighbours to dial up to.
    pub neighbours: usize,
    /// Decode the stream (headless figures, window).
    pub decode: bool,
    /// Where decoded frames go (the window), if anywhere.
    pub sink: Option<Box<dyn FrameSink>>,
    /// Serve the HTTP gateway here.
    pub http: Option<SocketAddr>,
    /// Write the live TS to stdout.
    pub stdout: bool,
    /// Record the TS to this file.
    pub record: Option<PathBuf>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Least media per HLS segment (segments also start at random-access chunks).
    pub hls_segment: Duration,
    /// Log a status line this often.
    pub status_every: Duration,
    /// Keep these lines of figures up to date (for an overlay).
    pub status: Option<StatusLine>,
}

impl PlayerConfig {
    /// Defaults: 1 s latency, relaying, 8 neighbours, nothing switched on yet.
    pub fn new(ticket: Ticket, key: NodeKey) -> Self {
        PlayerConfig {
            ticket,
            key,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            latency: Duration::from_secs(1),
            relay: true,
            neighbours: 8,
            decode: false,
            sink: None,
            http: None,
            stdout: false,
            record: None,
            duration: None,
            hls_segment: Duration::from_secs(1),
            status_every: Duration::from_secs(5),
            status: None,
        }
    }
}

/// Why the player could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlayerError {
    /// The embedded node could not start (bad listen address, bad stream id in the ticket).
    #[error("cannot start the swarm node: {0}")]
    Node(#[from] NodeError),
    /// The HTTP gateway could not listen.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Http {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The record file could not be created.
    #[error("cannot create {path}: {source}")]
    Record {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// No output was chosen.
    #[error("nothing to do: choose at least one of --headless, --http, --output, --record (or the window)")]
    NothingToDo,
}

/// What a finished run did (the `--stats-json` file).
#[derive(Debug, Clone, Serialize)]
pub struct PlayerReport {
    /// The configured latency, ms.
    pub latency_ms: f64,
    /// How long the player ran, s.
    pub ran_s: f64,
    /// The gateway's address, if it ran.
    pub http: Option<SocketAddr>,
    /// Decoder figures (when decoding).
    pub decode: Option<DecodeReport>,
    /// The embedded node's figures.
    pub node: NodeStats,
}

/// Runs the player until `shutdown` completes or `duration` has passed.
pub async fn run(mut config: PlayerConfig, shutdown: impl Future<Output = ()>) -> Result<PlayerReport, PlayerError> {
    let start = Instant::now();
    if !config.decode && config.http.is_none() && !config.stdout && config.record.is_none() {
        return Err(PlayerError::NothingToDo);
    }
    let latency_us = config.latency.as_micros() as u64;
    let ticket = &config.ticket;
    let mut node_config = NodeConfig::new(config.key.clone(), ticket.stream, config.listen);
    node_config.bootstrap = ticket.bootstrap.clone();
    node_config.swarm.role = Role::Player;
    node_config.swarm.target_latency_us = latency_us;
    node_config.swarm.target_neighbours = config.neighbours;
    node_config.swarm.seed = u64::from_le_bytes(config.key.secret_bytes()[..8].try_into().unwrap_or_default());
    if !config.relay {
        // Take, never give: no push children, every pull request declined, and no room for inbound
        // neighbours beyond the ones we dial.
        node_config.swarm.push_slots = 0;
        node_config.swarm.max_upload_queue = 0;
        node_config.swarm.max_neighbours = config.neighbours;
    }
    let (mut node, handle) = Node::bind(node_config)?;
    let Some(mut deliveries) = node.take_deliveries() else { unreachable!("deliveries are taken once, here") };
    info!(
        stream = %ticket.stream.fmt_short(),
        node = %handle.node_addr().id.fmt_short(),
        latency_ms = latency_us / 1000,
        relay = config.relay,
        "joining the swarm"
    );
    let mut tasks = tokio::task::JoinSet::new();
    let node_task = tokio::spawn(node.run());

    // Decoder.
    let (decode_tx, decoder) = if config.decode {
        let (tx, rx) = std::sync::mpsc::channel();
        let options = decode::DecoderOptions { latency_us, start, sink: config.sink.take() };
        let (thread, stats) = decode::spawn(rx, options).map_err(PlayerError::Thread)?;
        (Some(tx), Some((thread, stats)))
    } else {
        (None, None)
    };
    let decode_stats = decoder.as_ref().map(|(_, s)| s.clone());

    // TS outputs.
    let hub = (config.http.is_some() || config.stdout || config.record.is_some())
        .then(|| hub::Hub::new(config.hls_segment.as_micros() as u64));
    let mut writers = Vec::new();
    let mut http_addr = None;
    if let Some(hub) = &hub {
        if let Some(addr) = config.http {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| PlayerError::Http { addr, source })?;
            let bound = listener.local_addr().map_err(|source| PlayerError::Http { addr, source })?;
            http_addr = Some(bound);
            info!(%bound, "gateway: http://{bound}/stream.ts (mpv, vlc, ffplay) and http://{bound}/live.m3u8 (HLS)");
            let stats_handle = handle.clone();
            let stats_decode = decode_stats.clone();
            let stats: gateway::StatsFn = Arc::new(move || {
                let report = serde_json::json!({
                    "node": stats_handle.stats(),
                    "decode": stats_decode.as_ref().map(|s| s.report(decode::now_us())),
                });
                report.to_string()
            });
            tasks.spawn(gateway::serve(listener, hub.clone(), stats));
        }
        if let Some(path) = &config.record {
            let file =
                std::fs::File::create(path).map_err(|source| PlayerError::Record { path: path.clone(), source })?;
            let out = Box::new(std::io::BufWriter::new(file));
            writers
                .push(hub::spawn_writer(hub, format!("record {}", path.display()), out).map_err(PlayerError::Thread)?);
        }
        if config.stdout {
            writers.push(
                hub::spawn_writer(hub, "stdout".into(), Box::new(std::io::stdout())).map_err(PlayerError::Thread)?,
            );
        }
    }

    // The pacing loop: chunks go to the decoder `lead` early, then wait in `to_outputs` for their
    // deadline.
    let mut pacer = Pacer::new(latency_us);
    let lead_us = (DECODE_LEAD.as_micros() as u64).min(latency_us / 2);
    let mut to_outputs: std::collections::VecDeque<(u64, Playout)> = std::collections::VecDeque::new();
    let mut last_deadline = 0u64;
    let mut status = tokio::time::interval(Duration::from_secs(1));
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop_at = config.duration.map(|d| tokio::time::Instant::from_std(start + d));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_delivery = Instant::now();
    let mut started = false;
    let mut silent_warned = false;
    let mut silent_at: Option<Instant> = None;
    let mut last_status = Instant::now();
    let mut decode_tx = decode_tx;
    let mut last_bytes = (0u64, 0u64, Instant::now());
    loop {
        let next = [pacer.next_due().map(|d| d.saturating_sub(lead_us)), to_outputs.front().map(|(d, _)| *d)]
            .into_iter()
            .flatten()
            .min();
        let sleep_for =
            next.map_or(Duration::from_secs(3600), |due| Duration::from_micros(due.saturating_sub(decode::now_us())));
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = async { if let Some(t) = stop_at { tokio::time::sleep_until(t).await } else { std::future::pending().await } } => break,
            _ = tokio::time::sleep(sleep_for) => {
                let now = decode::now_us();
                while let Some(item) = pacer.poll(now + lead_us) {
                    if let Some(tx) = &decode_tx && tx.send(item.clone()).is_err() {
                        warn!("the decoder stopped; playing on without it");
                        decode_tx = None;
                    }
                    if let Playout::Chunk(c) = &item {
                        last_deadline = c.deadline_us;
                        if c.end_of_stream {
                            info!(seq = c.seq, "the broadcaster ended the stream; waiting in case it comes back");
                        }
                    }
                    if hub.is_some() {
                        to_outputs.push_back((last_deadline, item));
                    }
                }
                while to_outputs.front().is_some_and(|(due, _)| *due <= now) {
                    let Some((_, item)) = to_outputs.pop_front() else { break };
                    if let Some(hub) = &hub {
                        hub.publish(&item);
                    }
                }
            }
            delivery = deliveries.recv() => {
                let Some(delivery) = delivery else {
                    warn!("the swarm node stopped");
                    break;
                };
                if !started {
                    info!(after_ms = start.elapsed().as_millis() as u64, "stream found: first chunk received");
                } else if silent_warned {
                    info!("stream resumed");
                }
                started = true;
                silent_warned = false;
                silent_at = None;
                last_delivery = Instant::now();
                pacer.handle_delivery(delivery);
            }
            _ = status.tick() => {
                let s = handle.stats();
                pacer.set_origin_offset(s.origin_offset_us);
                let quiet = last_delivery.elapsed();
                let warn_again = silent_at.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(15));
                if quiet >= Duration::from_secs(5) && warn_again {
                    silent_warned = true;
                    silent_at = Some(Instant::now());
                    if !started && s.neighbours == 0 {
                        warn!(waited_s = quiet.as_secs(), "cannot reach any peer named in the ticket (is the broadcaster running, is the ticket current?); still trying");
                    } else if !started {
                        warn!(neighbours = s.neighbours, "the stream has not started yet (no chunks so far); still trying");
                    } else {
                        warn!(neighbours = s.neighbours, silent_s = quiet.as_secs(), "no chunks: the broadcaster has gone away or the swarm is unreachable; still trying");
                    }
                }
                if let Some(line) = &config.status {
                    let (up, down) = (s.counters.chunk_bytes_up, s.counters.chunk_bytes_down);
                    let secs = last_bytes.2.elapsed().as_secs_f64().max(0.001);
                    let rates = (up.saturating_sub(last_bytes.0) as f64 * 8e-6 / secs, down.saturating_sub(last_bytes.1) as f64 * 8e-6 / secs);
                    last_bytes = (up, down, Instant::now());
                    let (frames, display_p50_ms) = decode_stats.as_ref().map_or((0, 0.0), |d| d.brief());
                    let text = format!(
                        "display latency {display_p50_ms:.0} ms (target {} ms), arrival {:.0} ms\nneighbours {}, buffer {} ms, skipped {}\ndown {:.2} Mbit/s, up {:.2} Mbit/s, frames {frames}",
                        latency_us / 1000,
                        s.arrival_latency.p50_ms,
                        s.neighbours,
                        pacer.buffered_us() / 1000,
                        s.counters.skipped,
                        rates.1,
                        rates.0,
                    );
                    if let Ok(mut l) = line.lock() {
                        *l = text;
                    }
                }
                if last_status.elapsed() >= config.status_every {
                    last_status = Instant::now();
                    let (frames, display_p50_ms) = decode_stats.as_ref().map_or((0, 0.0), |d| d.brief());
                    info!(
                        neighbours = s.neighbours,
                        buffer_ms = pacer.buffered_us() / 1000,
                        arrival_p50_ms = s.arrival_latency.p50_ms,
                        display_p50_ms,
                        frames,
                        skipped = s.counters.skipped,
                        up_kB = s.counters.chunk_bytes_up / 1000,
                        down_kB = s.counters.chunk_bytes_down / 1000,
                        "{}", if started && !silent_warned { "playing" } else { "waiting for the stream" }
                    );
                }
            }
        }
    }
    let end_us = decode::now_us();
    // Stop feeding: the decoder and the writers see the channels close and finish.
    drop(decode_tx);
    drop(hub);
    tasks.shutdown().await;
    handle.shutdown();
    match tokio::time::timeout(Duration::from_secs(3), node_task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "node ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "node task failed"),
        Err(_) => warn!("node did not stop in time"),
        Ok(Ok(Ok(()))) => {}
    }
    let decode = match decoder {
        Some((thread, stats)) => {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            Some(stats.report(end_us))
        }
        None => None,
    };
    // Writers finish on their own when the hub's channel closes; do not wait on a blocked stdout.
    drop(writers);
    Ok(PlayerReport {
        latency_ms: latency_us as f64 / 1000.0,
        ran_s: start.elapsed().as_secs_f64(),
        http: http_addr,
        decode,
        node: handle.stats(),
    })
}
