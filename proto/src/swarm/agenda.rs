//! The simulator's event queue: a calendar queue (Brown, 1988) with an overflow heap.
//!
//! Almost every event of a large simulation falls within the next second (ticks, message and chunk
//! arrivals), so events go into one of [`BUCKETS`] buckets of [`WIDTH_US`] each by time, and only
//! the bucket being drained is kept ordered. Events beyond the calendar's horizon (joins and
//! leaves scheduled for later, idle timeouts) wait in an ordinary heap until the horizon reaches
//! them. Pops come out in exactly the order of a binary heap of the same entries: by time, then by
//! scheduling order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::Time;

/// Width of one bucket, µs.
const WIDTH_US: Time = 1_000;
/// Buckets in the calendar (its horizon is `BUCKETS × WIDTH_US`).
const BUCKETS: usize = 2_048;

/// (time, scheduling order, slot): ordered by time, ties in scheduling order.
pub(super) type Entry = (Time, u64, u32);

pub(super) struct Agenda {
    /// The bucket being drained, ordered (everything before `start + WIDTH_US`).
    current: BinaryHeap<Reverse<Entry>>,
    /// Unordered buckets; `buckets[(cursor + i) % BUCKETS]` holds `[start + i·W, start + (i+1)·W)`.
    buckets: Vec<Vec<Entry>>,
    cursor: usize,
    /// Start of the current bucket.
    start: Time,
    /// Entries in `buckets`.
    in_buckets: usize,
    /// Entries at or beyond the horizon.
    later: BinaryHeap<Reverse<Entry>>,
}

impl Agenda {
    pub(super) fn new(now: Time) -> Self {
        Agenda {
            current: BinaryHeap::new(),
            buckets: vec![Vec::new(); BUCKETS],
            cursor: 0,
            start: now - now % WIDTH_US,
            in_buckets: 0,
            later: BinaryHeap::new(),
        }
    }

    fn horizon(&self) -> Time {
        self.start + WIDTH_US * BUCKETS as Time
    }

    pub(super) fn push(&mut self, entry: Entry) {
        let at = entry.0;
        if at < self.start + WIDTH_US {
            self.current.push(Reverse(entry));
        } else if at < self.horizon() {
            let i = ((at - self.start) / WIDTH_US) as usize;
            self.buckets[(self.cursor + i) % BUCKETS].push(entry);
            self.in_buckets += 1;
        } else {
            self.later.push(Reverse(entry));
        }
    }

    pub(super) fn pop(&mut self) -> Option<Entry> {
        loop {
            if let Some(Reverse(entry)) = self.current.pop() {
                return Some(entry);
            }
            if self.in_buckets == 0 {
                // Nothing within the horizon: jump straight to the next later entry.
                let Reverse(next) = self.later.peek()?;
                let at = next.0;
                if at >= self.horizon() {
                    self.start = at - at % WIDTH_US;
                    self.cursor = 0;
                    self.pull_later();
                    continue;
                }
            }
            // Move on one bucket; the horizon moves with it.
            self.cursor = (self.cursor + 1) % BUCKETS;
            self.start += WIDTH_US;
            self.pull_later();
            let bucket = std::mem::take(&mut self.buckets[self.cursor]);
            self.in_buckets -= bucket.len();
            self.current.extend(bucket.iter().copied().map(Reverse));
            // Give the (now empty) allocation back so the bucket does not regrow from nothing.
            let mut bucket = bucket;
            bucket.clear();
            self.buckets[self.cursor] = bucket;
        }
    }

    /// Moves later entries that the horizon now covers into the calendar.
    fn pull_later(&mut self) {
        while self.later.peek().is_some_and(|Reverse(e)| e.0 < self.horizon()) {
            if let Some(Reverse(entry)) = self.later.pop() {
                self.push(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the mix of near and far events, and however pushes and pops interleave (never
        /// scheduling into the past, as the simulator never does), the calendar pops in exactly the
        /// order a binary heap would.
        #[test]
        fn pops_in_heap_order(
            start in 0u64..10_000_000,
            steps in prop::collection::vec((any::<bool>(), 0u64..5_000_000, 0u8..4), 1..400),
        ) {
            let mut agenda = Agenda::new(start);
            let mut heap = BinaryHeap::new();
            let mut now = start;
            for (order, (pop, delay, scale)) in steps.into_iter().enumerate() {
                if pop {
                    let (a, b) = (agenda.pop(), heap.pop().map(|Reverse(e)| e));
                    prop_assert_eq!(a, b);
                    if let Some(e) = a {
                        now = e.0;
                    }
                } else {
                    // Same instant, within a bucket, within the horizon, and far beyond it.
                    let at = now + delay / 10u64.pow(u32::from(3 - scale));
                    let entry = (at, order as u64, order as u32);
                    agenda.push(entry);
                    heap.push(Reverse(entry));
                }
            }
            while let Some(Reverse(e)) = heap.pop() {
                prop_assert_eq!(agenda.pop(), Some(e));
            }
            prop_assert_eq!(agenda.pop(), None);
        }
    }
}
