//! Fan-out of the released MPEG-TS to every output: HTTP clients, stdout, the record file and the
//! HLS segmenter.
//!
//! The [`Hub`] keeps the chunks since the last random-access chunk (one GOP), so a newly connected
//! client starts at once on a chunk a decoder can start at, and broadcasts every later chunk through a
//! bounded `tokio::sync::broadcast` channel. Each consumer reads at its own pace: one that falls more
//! than the channel's capacity behind gets `Lagged` and is dropped (HTTP) or resynchronised at the next
//! random-access chunk (stdout, file), without slowing the player or the others. After a gap every
//! consumer drops chunks until the next random-access chunk, so what it writes always demuxes.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::hls::Hls;
use crate::pacer::{Playout, Released};

/// How many chunks a consumer may fall behind (about 16 s of 250 ms chunks).
pub const CHANNEL_CHUNKS: usize = 64;

struct Inner {
    gop: Vec<Arc<Released>>,
    hls: Hls,
}

/// The fan-out point. Cheap to share behind an `Arc`.
pub struct Hub {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Playout>,
}

impl Hub {
    /// A hub whose HLS segmenter cuts segments of at least `segment_us` of media.
    pub fn new(segment_us: u64) -> Arc<Self> {
        let (tx, _) = broadcast::channel(CHANNEL_CHUNKS);
        Arc::new(Hub { inner: Mutex::new(Inner { gop: Vec::new(), hls: Hls::new(segment_us) }), tx })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Passes one released item to every output.
    pub fn publish(&self, item: &Playout) {
        let mut inner = self.lock();
        match item {
            Playout::Gap { .. } => inner.gop.clear(),
            Playout::Chunk(c) if c.random_access => {
                inner.gop.clear();
                inner.gop.push(c.clone());
            }
            Playout::Chunk(c) if c.breaks_continuity() => inner.gop.clear(),
            Playout::Chunk(c) if !inner.gop.is_empty() => inner.gop.push(c.clone()),
            Playout::Chunk(_) => {}
        }
        inner.hls.push(item);
        // No receivers is fine: nobody is watching through TS right now.
        let _ = self.tx.send(item.clone());
    }

    /// A new consumer: the current GOP (to start at once) and the live channel after it.
    pub fn subscribe(&self) -> (Vec<Arc<Released>>, broadcast::Receiver<Playout>) {
        let inner = self.lock();
        (inner.gop.clone(), self.tx.subscribe())
    }

    /// The HLS playlist (None until the first segment is complete).
    pub fn playlist(&self) -> Option<String> {
        self.lock().hls.playlist()
    }

    /// One HLS segment by its media sequence number.
    pub fn segment(&self, seq: u64) -> Option<bytes::Bytes> {
        self.lock().hls.segment(seq)
    }
}

/// Keeps a consumer on whole, decodable runs: drops chunks after a gap until a random-access chunk.
#[derive(Debug, Default)]
pub struct Resync {
    started: bool,
}

impl Resync {
    /// Whether to write this chunk.
    pub fn admit(&mut self, chunk: &Released) -> bool {
        if chunk.random_access {
            self.started = true;
        } else if chunk.breaks_continuity() {
            self.started = false;
        }
        self.started
    }
    /// A gap: wait for the next random-access chunk.
    pub fn gap(&mut self) {
        self.started = false;
    }
}

/// Writes the live TS to a blocking writer (stdout, a file) on its own thread until the writer fails
/// or the hub goes away. `what` names the output in messages.
pub fn spawn_writer(
    hub: &Hub,
    what: String,
    mut out: Box<dyn Write + Send>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (gop, mut rx) = hub.subscribe();
    std::thread::Builder::new().name("ts-writer".into()).spawn(move || {
        let mut resync = Resync::default();
        let mut write = |chunk: &Released, resync: &mut Resync| -> std::io::Result<()> {
            if resync.admit(chunk) {
                out.write_all(&chunk.payload)?;
                out.flush()?;
            }
            Ok(())
        };
        let mut result = Ok(());
        for chunk in &gop {
            result = write(chunk, &mut resync);
            if result.is_err() {
                break;
            }
        }
        while result.is_ok() {
            match rx.blocking_recv() {
                Ok(Playout::Chunk(chunk)) => result = write(&chunk, &mut resync),
                Ok(Playout::Gap { .. }) => resync.gap(),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(output = %what, chunks = n, "output fell behind; resuming at the next random-access chunk");
                    resync.gap();
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        match result {
            Ok(()) => info!(output = %what, "TS output finished"),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                warn!(output = %what, "the reader closed: this output stopped; playback and other outputs go on")
            }
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                warn!(output = %what, error = %e, "the disk is full: this output stopped; playback and other outputs go on")
            }
            Err(e) => warn!(output = %what, error = %e, "writing failed: this output stopped; playback and other outputs go on"),
        }
    })
}
