//! Upload shaping: a token bucket shared by all chunk sends of an endpoint.
//!
//! [`TokenBucket`] is the arithmetic alone, with time passed in, so it is tested in virtual time.
//! [`Shaper`] wraps it for async callers: a chunk send asks for the bytes of its next piece (about
//! [`PIECE`] bytes) and waits until the bucket holds them. Waiters are served by priority (higher
//! first), so an urgent chunk is not stuck behind a queue of pushes, then by place in line: every
//! piece of one chunk keeps the place the chunk took ([`Shaper::place`]), so chunks of equal priority
//! go out one after another, each finishing as early as it can, instead of interleaving. Only the
//! waiter at the head of the queue sleeps on the clock; the others wait to be told the head moved.
//!
//! The cap counts chunk bytes (signed header and payload), not QUIC and UDP overhead, control
//! messages or acknowledgements; those add a few percent.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How many bytes a chunk send writes per grant of tokens.
pub const PIECE: usize = 16 * 1024;

/// The longest a caller is told to wait in one go; it then asks again.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// A token bucket: `rate` bytes per second, holding at most `capacity` bytes of credit.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` bytes per second (at least 1) up to `capacity` bytes (at least 1).
    pub fn new(rate: u64, capacity: u64, now: Instant) -> Self {
        let capacity = capacity.max(1) as f64;
        TokenBucket { rate: rate.max(1) as f64, capacity, tokens: capacity, last: now }
    }

    /// The default burst for a rate: 100 ms of traffic, but at least two pieces.
    pub fn default_capacity(rate: u64) -> u64 {
        (rate / 10).max(2 * PIECE as u64)
    }

    fn refill(&mut self, now: Instant) {
        // A clock that goes backwards (it does not, with `Instant`) would simply add nothing.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = self.last.max(now);
    }

    /// Takes `n` bytes of credit if the bucket holds them, or says how long until it will.
    ///
    /// A request larger than the capacity is granted once the bucket is full, leaving it in debt, so
    /// it cannot wait forever; the debt delays later requests and the average rate still holds.
    pub fn try_take(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let n = n as f64;
        let need = n.min(self.capacity);
        if self.tokens >= need {
            self.tokens -= n;
            return Ok(());
        }
        let secs = (need - self.tokens) / self.rate;
        Err(Duration::try_from_secs_f64(secs).unwrap_or(MAX_WAIT).clamp(Duration::from_micros(1), MAX_WAIT))
    }

    /// Credit available now (negative while in debt).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

type Ticket = (Reverse<i32>, u64);

#[derive(Debug)]
struct State {
    bucket: TokenBucket,
    /// Waiters, best first: highest priority, then earliest arrival.
    queue: BTreeSet<Ticket>,
    next: u64,
}

/// A token bucket shared by concurrent async senders, served by priority.
#[derive(Debug)]
pub struct Shaper {
    state: Mutex<State>,
    moved: Notify,
}

impl Shaper {
    /// A shaper for `rate` bytes per second with a burst of `capacity` bytes.
    pub fn new(rate: u64, capacity: u64) -> Self {
        let bucket = TokenBucket::new(rate, capacity, tokio::time::Instant::now().into_std());
        Shaper { state: Mutex::new(State { bucket, queue: BTreeSet::new(), next: 0 }), moved: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until `n` bytes may be sent. Cancel-safe: dropping the future leaves the queue and takes
    /// no credit.
    pub async fn acquire(&self, n: u64, priority: i32) {
        let order = self.place();
        self.acquire_in_order(n, priority, order).await;
    }

    /// A place in line: pieces acquired with it go before those of later places of the same priority.
    pub fn place(&self) -> u64 {
        let mut state = self.lock();
        state.next += 1;
        state.next
    }

    /// As [`Shaper::acquire`], queued at `order` (from [`Shaper::place`]) among equal priorities, so
    /// all the pieces of one chunk keep the chunk's place: chunks go one after another, not interleaved.
    pub async fn acquire_in_order(&self, n: u64, priority: i32, order: u64) {
        let ticket = {
            let mut state = self.lock();
            let ticket = (Reverse(priority), order);
            state.queue.insert(ticket);
            ticket
        };
        let _leave = LeaveQueue { shaper: self, ticket };
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            // Register before looking, so a change between the look and the wait is not missed.
            moved.as_mut().enable();
            let wait = {
                let mut state = self.lock();
                if state.queue.first() != Some(&ticket) {
                    None
                } else {
                    match state.bucket.try_take(n, tokio::time::Instant::now().into_std()) {
                        Ok(()) => return, // `_leave` removes the ticket and wakes the next waiter
                        Err(wait) => Some(wait),
                    }
                }
            };
            match wait {
                None => moved.await,
                Some(wait) => {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = &mut moved => {}
                    }
                }
            }
        }
    }

    /// How many senders are waiting.
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
    }
}

/// Takes a waiter out of the queue however `acquire` ends, and lets the next one look.
struct LeaveQueue<'a> {
    shaper: &'a Shaper,
    ticket: Ticket,
}

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.shaper.lock().queue.remove(&self.ticket);
        self.shaper.moved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bucket_grants_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(100_000, 50_000, t0);
        assert_eq!(bucket.try_take(50_000, t0), Ok(()));
        let wait = bucket.try_take(10_000, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(bucket.try_take(10_000, t0 + Duration::from_millis(99)).is_err());
        assert_eq!(bucket.try_take(10_000, t0 + Duration::from_millis(100)), Ok(()));
        // Credit never exceeds the capacity however long the bucket idles.
        assert_eq!(bucket.available(t0 + Duration::from_secs(3600)), 50_000.0);
    }

    #[test]
    fn bucket_holds_the_average_rate_over_many_pieces() {
        let t0 = Instant::now();
        let rate = 1_000_000;
        let mut bucket = TokenBucket::new(rate, TokenBucket::default_capacity(rate), t0);
        let mut now = t0;
        let mut sent = 0u64;
        while sent < 20_000_000 {
            match bucket.try_take(PIECE as u64, now) {
                Ok(()) => sent += PIECE as u64,
                Err(wait) => now += wait,
            }
        }
        let secs = (now - t0).as_secs_f64();
        let burst = TokenBucket::default_capacity(rate) as f64;
        // Everything beyond the initial burst went out at the rate, give or take one piece.
        let expected = (sent as f64 - burst) / rate as f64;
        assert!((secs - expected).abs() < PIECE as f64 / rate as f64 * 2.0, "{secs} vs {expected}");
    }

    #[test]
    fn oversize_request_goes_into_debt_instead_of_waiting_forever() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1000, 100, t0);
        assert_eq!(bucket.try_take(500, t0), Ok(()));
        assert_eq!(bucket.available(t0), -400.0);
        assert_eq!(bucket.try_take(100, t0), Err(Duration::from_millis(500)));
    }

    #[tokio::test(start_paused = true)]
    async fn shaper_paces_in_virtual_time() {
        let shaper = Shaper::new(100_000, 20_000);
        let start = tokio::time::Instant::now();
        for _ in 0..12 {
            shaper.acquire(10_000, 0).await;
        }
        // 20 000 bytes of burst, then 100 000 more at 100 kB/s.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(999) && elapsed <= Duration::from_millis(1010), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn shaper_serves_higher_priority_first() {
        let shaper = Arc::new(Shaper::new(10_000, 10_000));
        shaper.acquire(10_000, 0).await; // empty the bucket
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, priority) in [("low", 0), ("low2", 0), ("high", 5)] {
            let (shaper, order) = (shaper.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                shaper.acquire(5_000, priority).await;
                order.lock().unwrap().push(name);
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["high", "low", "low2"]);
        assert_eq!(shaper.waiting(), 0);
    }

    /// Two chunks of equal priority, each sent as several pieces: the first chunk's pieces all go
    /// before the second's (one chunk after another, as the simulator's uplink does), instead of
    /// the two interleaving and both finishing late.
    #[tokio::test(start_paused = true)]
    async fn pieces_of_one_chunk_keep_its_place_in_line() {
        let shaper = Arc::new(Shaper::new(10_000, 1_000));
        shaper.acquire(1_000, 0).await; // empty the bucket
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for name in ["a", "b"] {
            let (shaper, order) = (shaper.clone(), order.clone());
            let place = shaper.place();
            tasks.push(tokio::spawn(async move {
                for piece in 0..3 {
                    shaper.acquire_in_order(1_000, 0, place).await;
                    order.lock().unwrap().push(format!("{name}{piece}"));
                }
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a0", "a1", "a2", "b0", "b1", "b2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_leaves_the_queue() {
        let shaper = Arc::new(Shaper::new(1_000, 1_000));
        shaper.acquire(1_000, 0).await;
        let s = shaper.clone();
        let blocked = tokio::spawn(async move { s.acquire(1_000, 9).await });
        tokio::task::yield_now().await;
        assert_eq!(shaper.waiting(), 1);
        blocked.abort();
        let _ = blocked.await;
        assert_eq!(shaper.waiting(), 0);
        // The next waiter is not blocked by the cancelled one.
        shaper.acquire(1_000, 0).await;
    }
}
