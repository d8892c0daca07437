//! What a node keeps about each neighbour: what it has, what it subscribed to, how early its news
//! arrives, and its request budget.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::Time;
use crate::keys::NodeId;
use crate::window::Window;
use crate::wire::{MAX_SUBSTREAMS, Role, TreePlace};

/// A set of substreams, one bit each (there are at most [`MAX_SUBSTREAMS`], 64). Asked on every
/// push and every tick, for every neighbour: a bit test, where a tree set was a pointer chase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Substreams(u64);

impl Substreams {
    pub(crate) fn contains(self, s: u16) -> bool {
        s < MAX_SUBSTREAMS && self.0 & (1 << s) != 0
    }
    /// Adds `s`; whether it was not there yet. A number of [`MAX_SUBSTREAMS`] or more (which no
    /// configuration or message can carry) is never a member.
    pub(crate) fn insert(&mut self, s: u16) -> bool {
        if s >= MAX_SUBSTREAMS || self.contains(s) {
            return false;
        }
        self.0 |= 1 << s;
        true
    }
    /// Removes `s`; whether it was there.
    pub(crate) fn remove(&mut self, s: u16) -> bool {
        let was = self.contains(s);
        if was {
            self.0 &= !(1 << s);
        }
        was
    }
    pub(crate) fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    /// The members, lowest first.
    pub(crate) fn iter(self) -> impl Iterator<Item = u16> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let s = bits.trailing_zeros() as u16;
                bits &= bits - 1;
                s
            })
        })
    }
}

/// A connection, numbered by the driver. Never reused while the node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Per-neighbour accounting, for stats and decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NeighbourStats {
    /// Chunks received from it (including duplicates).
    pub chunks_received: u64,
    /// Of those, chunks we already had.
    pub duplicates_received: u64,
    /// Chunk payload bytes received from it.
    pub bytes_received: u64,
    /// Chunks sent to it.
    pub chunks_sent: u64,
    /// Chunk payload bytes sent to it.
    pub bytes_sent: u64,
    /// Control messages received from it.
    pub messages_received: u64,
    /// Requests from it refused for being over budget.
    pub requests_refused: u64,
    /// Our requests to it that timed out.
    pub request_timeouts: u64,
    /// Round-trip time from the last ping, µs.
    pub rtt_us: Option<u64>,
}

/// A simple token bucket in the state machine's time.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    last: Time,
}

impl TokenBucket {
    pub(crate) fn new(rate_per_s: f64, burst: f64) -> Self {
        TokenBucket { rate_per_s, burst, tokens: burst, last: 0 }
    }
    /// Takes `n` tokens if there are enough.
    pub(crate) fn take(&mut self, now: Time, n: f64) -> bool {
        if now > self.last {
            self.tokens = (self.tokens + (now - self.last) as f64 * self.rate_per_s / 1e6).min(self.burst);
            self.last = now;
        }
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// One connection's state.
#[derive(Debug, Clone)]
pub(crate) struct Neighbour {
    /// The node TLS authenticated; the hello must agree.
    pub(crate) expected: Option<NodeId>,
    /// Set once its hello has been accepted.
    pub(crate) node: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) listen: Vec<SocketAddr>,
    #[allow(dead_code)]
    pub(crate) addr: SocketAddr,
    pub(crate) outbound: bool,
    pub(crate) since: Time,
    pub(crate) last_useful: Time,
    /// When it last sent us anything (a message or a chunk).
    pub(crate) last_heard: Time,
    /// Sequence numbers it has (announced, sent to us, or sent by us).
    pub(crate) have: Window<()>,
    /// Substreams it subscribed to from us.
    pub(crate) child_of: Substreams,
    /// Per substream it subscribed to: since when.
    pub(crate) child_since: BTreeMap<u16, Time>,
    /// Per substream we let it go from to make room for a relay: until when we still push to it
    /// (so it has a moment to find another parent before anything is missing).
    pub(crate) released: BTreeMap<u16, Time>,
    /// Per substream: moving average of how far its news (`Have`) lags the first news, µs.
    lag: Vec<Option<u64>>,
    /// Per substream, while it is our parent: moving average of how far its pushes land behind the
    /// first news, µs (its news lag plus the wait on its uplink).
    push_lag: Vec<Option<u64>>,
    /// Our requests in flight to it.
    pub(crate) requests_out: usize,
    /// Chunk streams we asked the driver to send it and that are not reported done yet.
    pub(crate) uploads: usize,
    /// When `uploads` last went from none to some.
    pub(crate) uploads_since: Time,
    /// When it last took delivery of a whole chunk stream of ours.
    pub(crate) last_delivered: Time,
    /// It declined a request, or keeps failing them: do not ask it again before this.
    pub(crate) busy_until: Time,
    /// Our requests to it that timed out since it last delivered a chunk.
    pub(crate) timeouts_in_a_row: u32,
    /// Kept promises minus broken ones: +1 per chunk it sent us, −1 per request of ours it let time
    /// out and per push it announced but did not make as our parent.
    pub(crate) credit: i32,
    /// It broke too many promises: ignore its announcements until then.
    pub(crate) distrusted_until: Time,
    /// Budget for its requests to us.
    pub(crate) requests_in: TokenBucket,
    /// Its place in each substream's push tree, as it last told us (empty until it has).
    pub(crate) tree: Vec<TreePlace>,
    pub(crate) stats: NeighbourStats,
}

impl Neighbour {
    pub(crate) fn new(now: Time, addr: SocketAddr, outbound: bool, window: usize) -> Self {
        Neighbour {
            expected: None,
            node: None,
            role: Role::Relay,
            listen: Vec::new(),
            addr,
            outbound,
            since: now,
            last_useful: now,
            last_heard: now,
            // Twice the window, so announcements slightly ahead of ours still fit.
            have: Window::new(window * 2, 0),
            child_of: Substreams::default(),
            child_since: BTreeMap::new(),
            released: BTreeMap::new(),
            lag: Vec::new(),
            push_lag: Vec::new(),
            requests_out: 0,
            uploads: 0,
            uploads_since: now,
            last_delivered: now,
            busy_until: 0,
            timeouts_in_a_row: 0,
            credit: 0,
            distrusted_until: 0,
            // An honest node asks for at most a window's worth at once, then a few chunks a second.
            requests_in: TokenBucket::new(32.0, (window * 2) as f64),
            tree: Vec::new(),
            stats: NeighbourStats::default(),
        }
    }

    pub(crate) fn hello_done(&self) -> bool {
        self.node.is_some()
    }

    /// Whether what we send it has stopped getting through: a chunk stream of ours has been in
    /// flight for `patience` with nothing from it meanwhile, neither a message nor a delivery. A
    /// node cut off (cable pulled, router rebooting) looks like this long before its connection
    /// times out.
    pub(crate) fn stalled(&self, now: Time, patience: Time) -> bool {
        let progress = self.last_heard.max(self.last_delivered).max(self.uploads_since);
        self.uploads > 0 && now >= progress + patience
    }

    /// It delivered a chunk.
    pub(crate) fn kept_promise(&mut self) {
        self.credit = (self.credit + 1).min(MAX_CREDIT);
    }

    /// It failed to deliver a chunk it announced; after too many, distrust it for a while.
    pub(crate) fn broke_promise(&mut self, now: Time) {
        self.credit -= 1;
        if self.credit <= MIN_CREDIT {
            self.distrusted_until = now + DISTRUST_US;
            // On probation when the distrust ends: one more failure brings it back.
            self.credit = MIN_CREDIT + 1;
        }
    }

    /// Whether its announcements are worth acting on.
    pub(crate) fn trusted(&self, now: Time) -> bool {
        self.distrusted_until <= now
    }

    pub(crate) fn note_lag(&mut self, substream: usize, lag_us: u64) {
        ewma(&mut self.lag, substream, lag_us);
    }

    pub(crate) fn note_push_lag(&mut self, substream: usize, lag_us: u64) {
        ewma(&mut self.push_lag, substream, lag_us);
    }

    /// How far behind the first news its pushes of `substream` land, if it has pushed any.
    pub(crate) fn push_lag(&self, substream: usize) -> Option<u64> {
        self.push_lag.get(substream).copied().flatten()
    }

    /// Forgets the push measurements of `substream` (it stopped being our parent there).
    pub(crate) fn reset_push_lag(&mut self, substream: usize) {
        if let Some(l) = self.push_lag.get_mut(substream) {
            *l = None;
        }
    }

    /// Its place in substream `s`'s tree, if it has told us.
    pub(crate) fn tree_place(&self, substream: usize) -> Option<TreePlace> {
        if self.role == Role::Origin {
            // The origin is the root whatever it says.
            return self.tree.get(substream).map(|p| TreePlace { depth: 0, ..*p });
        }
        self.tree.get(substream).copied()
    }

    /// Lower is a better parent: its measured lag, or for an unmeasured neighbour a middling guess
    /// (the origin counts as zero lag).
    pub(crate) fn lag_score(&self, substream: usize) -> u64 {
        if self.role == Role::Origin {
            return 0;
        }
        self.lag.get(substream).copied().flatten().unwrap_or(500_000)
    }
}

const MAX_CREDIT: i32 = 8;
const MIN_CREDIT: i32 = -3;
const DISTRUST_US: Time = 15_000_000;

fn ewma(v: &mut Vec<Option<u64>>, i: usize, x: u64) {
    if v.len() <= i {
        v.resize(i + 1, None);
    }
    let l = &mut v[i];
    *l = Some(match *l {
        None => x,
        Some(old) => (old * 3 + x) / 4,
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The bit set answers as an ordered set of the same numbers would, including for numbers
        /// it cannot hold (never members).
        #[test]
        fn substreams_behave_as_a_set(ops in prop::collection::vec((any::<bool>(), 0u16..80), 0..200)) {
            let (mut bits, mut set) = (Substreams::default(), BTreeSet::new());
            for (add, s) in ops {
                if add {
                    prop_assert_eq!(bits.insert(s), s < MAX_SUBSTREAMS && set.insert(s));
                } else {
                    prop_assert_eq!(bits.remove(s), set.remove(&s));
                }
                prop_assert_eq!(bits.len(), set.len());
                prop_assert_eq!(bits.iter().collect::<Vec<_>>(), set.iter().copied().collect::<Vec<_>>());
                prop_assert!((0..80).all(|s| bits.contains(s) == set.contains(&s)));
            }
        }
    }
}
