//! Link emulation under the QUIC socket: one-way delay, jitter, loss and an upload bottleneck, in user
//! space (the kernels we run on have no `netem`).
//!
//! [`EmulatedSocket`] wraps the runtime's real UDP socket as quinn's [`AsyncUdpSocket`]. Every datagram
//! quinn sends goes through the [`LinkModel`]:
//!
//! 1. **Loss:** each datagram (each GSO segment) is dropped with probability [`LinkModel::loss`].
//! 2. **Bottleneck:** with [`LinkModel::rate_bytes_per_sec`], datagrams pass a token bucket (depth
//!    [`LinkModel::burst_bytes`]); beyond it they queue, as behind a real bottleneck link, and a
//!    datagram that would find more than [`LinkModel::queue`] worth of bytes ahead of it is dropped
//!    (tail drop), which is what QUIC's congestion control reacts to.
//! 3. **Propagation:** the datagram leaves the bottleneck, then waits [`LinkModel::delay`] plus a
//!    uniform jitter in `[0, jitter]`. Jitter never reorders datagrams to one destination (each is
//!    released no earlier than the previous one to the same address), like a single network path.
//!
//! Only sends are shaped (a [`LinkModel::deaf`] socket also throws away all it receives): when both ends of a link emulate, each direction gets its own delay, so the
//! round trip is `2 × delay`. Receives are untouched.
//!
//! **The timer.** A delayed datagram must go out when its time comes even if quinn never calls the
//! socket again, so the socket cannot release datagrams only from `try_send`. It spawns one small task
//! (on the runtime that binds it) that sleeps until the earliest datagram is due and sends what is due.
//! The socket owns the task through a shared state: when the socket is dropped (the endpoint is gone)
//! the task sends what is still queued (at most delay + queue time, so a `CONNECTION_CLOSE` handed to
//! us still reaches the peer) and then ends by itself. It is never aborted mid-datagram, and it holds
//! no reference to the socket wrapper, so there is no cycle keeping either alive.
//!
//! Randomness (loss, jitter) comes from a seeded generator, so a lab run is repeatable up to the
//! scheduling of the tasks.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Most bytes held by one emulated socket at once, whatever the model (a link without a rate cap
/// relies on QUIC's congestion window; this only guards memory).
const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;

/// What the link under an endpoint does to the datagrams it sends.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LinkModel {
    /// One-way propagation delay added to every datagram.
    pub delay: Duration,
    /// Uniform extra delay in `[0, jitter]` per datagram (never reordering datagrams to one address).
    pub jitter: Duration,
    /// Share of datagrams dropped at random, in `[0, 1]`.
    pub loss: f64,
    /// Upload bottleneck, bytes per second (UDP payload bytes); `None`: no cap.
    pub rate_bytes_per_sec: Option<u64>,
    /// Token bucket depth: bytes that may leave back to back at line speed before the rate applies.
    pub burst_bytes: u64,
    /// The bottleneck's buffer, as time at the rate: a datagram that would wait longer is dropped.
    pub queue: Duration,
    /// Seed for loss and jitter.
    pub seed: u64,
    /// Drop every datagram that arrives: the endpoint sends but never hears an answer, as a sender
    /// with a spoofed source address (the answers go to whoever really has that address).
    pub deaf: bool,
}

impl Default for LinkModel {
    fn default() -> Self {
        LinkModel {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bytes_per_sec: None,
            burst_bytes: 16 * 1024,
            queue: Duration::from_millis(100),
            seed: 1,
            deaf: false,
        }
    }
}

impl LinkModel {
    /// A link with this one-way delay and nothing else.
    pub fn delay(delay: Duration) -> Self {
        LinkModel { delay, ..Default::default() }
    }

    /// Sets the jitter bound.
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the loss share.
    pub fn with_loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }

    /// Sets the upload bottleneck, bytes per second.
    pub fn with_rate(mut self, bytes_per_sec: u64) -> Self {
        self.rate_bytes_per_sec = Some(bytes_per_sec);
        self
    }

    /// Makes the endpoint deaf (see [`LinkModel::deaf`]).
    pub fn deaf() -> Self {
        LinkModel { deaf: true, ..Default::default() }
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Checks the model makes sense.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(format!("link loss {} is not a share in [0, 1]", self.loss));
        }
        if self.rate_bytes_per_sec == Some(0) {
            return Err("link rate must be positive".into());
        }
        Ok(())
    }
}

/// What an emulated link did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams handed to the real socket.
    pub sent: u64,
    /// Datagrams dropped at random, or while the link was cut.
    pub lost: u64,
    /// Datagrams dropped because the bottleneck queue was full.
    pub queue_drops: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> LinkStats {
        LinkStats {
            sent: self.sent.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            queue_drops: self.queue_drops.load(Ordering::Relaxed),
        }
    }
}

/// A datagram (or GSO batch) waiting for its release time.
struct Held {
    at: Instant,
    order: u64,
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    segment_size: Option<usize>,
    src_ip: Option<IpAddr>,
    contents: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

struct State {
    rng: fastrand::Rng,
    held: BinaryHeap<Reverse<Held>>,
    held_bytes: usize,
    order: u64,
    /// Release time of the latest datagram per destination (no reordering on a path).
    last_release: HashMap<SocketAddr, Instant>,
    /// Token bucket as GCRA: when the bottleneck will have sent everything accepted so far.
    busy_until: Instant,
}

struct Shared {
    model: LinkModel,
    state: Mutex<State>,
    wake: Notify,
    closed: AtomicBool,
    /// The link is cut (see [`LinkHandle::set_cut`]).
    cut: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent enough state for a network emulator.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The real socket with a [`LinkModel`] in its send path. See the module docs.
pub struct EmulatedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    shared: Arc<Shared>,
}

impl fmt::Debug for EmulatedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedSocket").field("inner", &self.inner).field("model", &self.shared.model).finish()
    }
}

/// A handle on an emulated link's counters.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkHandle").field("model", &self.shared.model).finish()
    }
}

impl LinkHandle {
    /// What the link did so far.
    pub fn stats(&self) -> LinkStats {
        self.shared.counters.snapshot()
    }

    /// The model.
    pub fn model(&self) -> &LinkModel {
        &self.shared.model
    }

    /// Cuts the link (true) or restores it (false): while cut, every datagram sent is dropped
    /// (counted as lost) and every datagram received is thrown away, as if the cable were pulled;
    /// the node and its state live on.
    pub fn set_cut(&self, cut: bool) {
        self.shared.cut.store(cut, Ordering::Relaxed);
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::Relaxed)
    }
}

impl EmulatedSocket {
    /// Wraps `inner` and spawns the release task on `runtime`.
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        model: LinkModel,
        runtime: &tokio::runtime::Handle,
    ) -> (Self, LinkHandle) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rng: fastrand::Rng::with_seed(model.seed),
                held: BinaryHeap::new(),
                held_bytes: 0,
                order: 0,
                last_release: HashMap::new(),
                busy_until: Instant::now(),
            }),
            model,
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            counters: Counters::default(),
        });
        runtime.spawn(release(inner.clone(), shared.clone()));
        let handle = LinkHandle { shared: shared.clone() };
        (EmulatedSocket { inner, shared }, handle)
    }
}

impl Drop for EmulatedSocket {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl AsyncUdpSocket for EmulatedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // `try_send` never blocks (it queues or drops), so the socket is always writable.
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let model = &self.shared.model;
        let now = Instant::now();
        let mut st = self.shared.lock();
        let segment = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        if self.shared.cut.load(Ordering::Relaxed) {
            let segments = transmit.contents.len().div_ceil(segment) as u64;
            self.shared.counters.lost.fetch_add(segments, Ordering::Relaxed);
            return Ok(());
        }
        let mut contents = Vec::with_capacity(transmit.contents.len());
        let mut kept = 0usize;
        for piece in transmit.contents.chunks(segment) {
            if model.loss > 0.0 && st.rng.f64() < model.loss {
                self.shared.counters.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Only the last segment may be short, and it stays last: the batch remains valid GSO.
            contents.extend_from_slice(piece);
            kept += 1;
        }
        if kept == 0 {
            return Ok(());
        }
        if st.held_bytes + contents.len() > MAX_HELD_BYTES {
            self.shared.counters.queue_drops.fetch_add(kept as u64, Ordering::Relaxed);
            return Ok(());
        }
        let mut leave = now;
        if let Some(rate) = model.rate_bytes_per_sec {
            let rate = rate as f64;
            let start = st.busy_until.max(now);
            // Bytes ahead of this datagram beyond what the bucket lets through at once.
            let ahead = (start - now).as_secs_f64() * rate - model.burst_bytes as f64;
            if ahead > model.queue.as_secs_f64() * rate {
                self.shared.counters.queue_drops.fetch_add(kept as u64, Ordering::Relaxed);
                return Ok(());
            }
            let done = start + Duration::from_secs_f64(contents.len() as f64 / rate);
            st.busy_until = done;
            let burst = Duration::from_secs_f64(model.burst_bytes as f64 / rate);
            leave = done.checked_sub(burst).map_or(now, |t| t.max(now));
        }
        let jitter = if model.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(st.rng.u64(0..=model.jitter.as_nanos() as u64))
        };
        let mut at = leave + model.delay + jitter;
        if let Some(&last) = st.last_release.get(&transmit.destination) {
            at = at.max(last);
        }
        st.last_release.insert(transmit.destination, at);
        if st.last_release.len() > 4096 {
            st.last_release.retain(|_, t| *t > now);
        }
        let order = st.order;
        st.order += 1;
        let earliest = st.held.peek().map(|Reverse(h)| h.at);
        st.held_bytes += contents.len();
        st.held.push(Reverse(Held {
            at,
            order,
            destination: transmit.destination,
            ecn: transmit.ecn,
            segment_size: if kept > 1 { transmit.segment_size } else { None },
            src_ip: transmit.src_ip,
            contents,
        }));
        drop(st);
        if earliest.is_none_or(|e| at < e) {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                // Read and thrown away, until the socket has nothing more (then the waker is set).
                Poll::Ready(Ok(_)) if self.shared.model.deaf || self.shared.cut.load(Ordering::Relaxed) => {}
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The release task: sends every held datagram at its time; ends once the socket is dropped and
/// nothing is held any more.
async fn release(inner: Arc<dyn AsyncUdpSocket>, shared: Arc<Shared>) {
    let mut poller = inner.clone().create_io_poller();
    let mut due = Vec::new();
    loop {
        let next = {
            let mut st = shared.lock();
            let now = Instant::now();
            while st.held.peek().is_some_and(|Reverse(h)| h.at <= now) {
                if let Some(Reverse(h)) = st.held.pop() {
                    st.held_bytes -= h.contents.len();
                    due.push(h);
                }
            }
            st.held.peek().map(|Reverse(h)| h.at)
        };
        for h in due.drain(..) {
            let transmit = Transmit {
                destination: h.destination,
                ecn: h.ecn,
                contents: &h.contents,
                segment_size: h.segment_size,
                src_ip: h.src_ip,
            };
            loop {
                match inner.try_send(&transmit) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await.is_err() {
                            break;
                        }
                    }
                    Err(error) => {
                        // UDP: a failed send is a lost datagram, as on a real network.
                        tracing::trace!(%error, "emulated link: send failed");
                        break;
                    }
                    Ok(()) => {
                        let n = h.segment_size.map_or(1, |s| h.contents.len().div_ceil(s.max(1)));
                        shared.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = shared.wake.notified() => {}
                }
            }
            None if shared.closed.load(Ordering::Acquire) => return,
            None => shared.wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::Ipv4Addr;

    use bytes::Bytes;
    use crowdsurf_proto::wire::NodeAddr;
    use crowdsurf_proto::{Flags, NodeKey, StreamKey, Verified};

    use super::*;
    use crate::net::{Endpoint, EndpointConfig, NetError};

    fn config(link: Option<LinkModel>) -> EndpointConfig {
        let mut c = EndpointConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        c.link = link;
        c
    }

    fn node(seed: u8, link: Option<LinkModel>) -> Endpoint {
        Endpoint::bind(&NodeKey::from_secret_bytes([seed; 32]), config(link)).unwrap()
    }

    fn addr_of(e: &Endpoint) -> NodeAddr {
        NodeAddr { id: e.node_id(), addrs: vec![e.local_addr()] }
    }

    #[test]
    fn models_are_checked() {
        assert!(LinkModel::default().with_loss(1.5).validate().is_err());
        assert!(LinkModel::default().with_rate(0).validate().is_err());
        assert!(LinkModel::delay(Duration::from_millis(5)).with_loss(0.01).validate().is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_on_both_sides_gives_the_round_trip() {
        let link = LinkModel::delay(Duration::from_millis(20));
        let a = node(1, Some(link.clone().with_seed(1)));
        let b = node(2, Some(link.with_seed(2)));
        let target = addr_of(&b);
        let started = std::time::Instant::now();
        let (dialed, accepted) = tokio::join!(a.connect(&target), b.accept());
        let (ab, _ba) = (dialed.unwrap(), accepted.unwrap().unwrap());
        // The handshake alone is at least one round trip.
        assert!(started.elapsed() >= Duration::from_millis(40), "{:?}", started.elapsed());
        // Let quinn take a few more samples (keep-alives, control traffic).
        let (mut send, _recv) = ab.open_control().await.unwrap();
        for nonce in 0..5 {
            send.send(&crowdsurf_proto::wire::Message::Ping { nonce, sent_us: 0 }).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let rtt = ab.rtt();
        eprintln!("rtt with 20 ms each way: {rtt:?}");
        assert!(rtt >= Duration::from_millis(35), "rtt {rtt:?}");
        assert!(a.link_stats().unwrap().sent > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn total_loss_makes_connect_time_out() {
        let mut cfg = config(Some(LinkModel::default().with_loss(1.0)));
        cfg.connect_timeout = Duration::from_millis(500);
        let a = Endpoint::bind(&NodeKey::from_secret_bytes([3; 32]), cfg).unwrap();
        let b = node(4, None);
        let target = addr_of(&b);
        let accept = tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(1), b.accept()).await });
        let err = a.connect(&target).await.unwrap_err();
        assert!(matches!(err, NetError::TimedOut), "{err:?}");
        // Nothing ever reached the acceptor.
        assert!(accept.await.unwrap().is_err());
        let stats = a.link_stats().unwrap();
        assert_eq!(stats.sent, 0);
        assert!(stats.lost > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rate_cap_holds_a_big_chunk_back() {
        const SIZE: usize = 1024 * 1024;
        const RATE: u64 = 4 * 1024 * 1024;
        let a = node(5, Some(LinkModel::default().with_rate(RATE)));
        let b = node(6, None);
        let target = addr_of(&b);
        let (dialed, accepted) = tokio::join!(a.connect(&target), b.accept());
        let (ab, ba) = (dialed.unwrap(), accepted.unwrap().unwrap());
        let key = StreamKey::from_secret_bytes([7; 32]);
        let chunk = Verified::sign(&key, 1, 1, 250_000, Flags::empty(), Bytes::from(vec![0x5a; SIZE]));
        let started = std::time::Instant::now();
        let (sent, received) = tokio::join!(ab.send_chunk(&chunk, 0), async {
            ba.accept_chunk().await.unwrap().read(Duration::from_secs(10)).await
        });
        sent.unwrap();
        let got = received.unwrap();
        let took = started.elapsed();
        eprintln!("1 MiB at 4 MiB/s: {took:?}");
        assert_eq!(got.payload.len(), SIZE);
        let least = Duration::from_secs_f64(SIZE as f64 / RATE as f64);
        assert!(took >= least, "1 MiB at 4 MiB/s took {took:?}, less than {least:?}");
    }
}
