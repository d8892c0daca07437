//! The simulator's event queue: a calendar queue (Brown, 1988) with an overflow heap.
//!
//! Almost every event of a large simulation falls within the next second (ticks, message and chunk
//! arrivals), so events go into one of [`BUCKETS`] buckets of [`WIDTH_US`] each by time, and only
//! the bucket being drained is kept ordered. Events beyond the calendar's horizon (joins and
//! leaves scheduled for later, idle timeouts) wait in an ordinary heap until the horizon reaches
//! them. Pops come out in exactly the order of a binary heap of the same entries: by time, then by
//! scheduling order.
//!
//! The events themselves travel with their bucket, so the bucket being drained is one run of
//! memory: a separate table of event bodies, indexed from the heap, cost a cache miss for nearly
//! every event of a large run.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::Time;

/// Width of one bucket, µs.
const WIDTH_US: Time = 1_000;
/// Buckets in the calendar (its horizon is `BUCKETS × WIDTH_US`).
const BUCKETS: usize = 2_048;
/// Drained buckets kept for reuse (so a bucket does not regrow from nothing, nor every bucket keep
/// the capacity of its busiest moment).
const SPARE_BUCKETS: usize = 64;

/// An event due at `at`, scheduled `order`-th: ordered by time, ties in scheduling order.
struct Due<E> {
    at: Time,
    order: u64,
    event: E,
}

impl<E> PartialEq for Due<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl<E> Eq for Due<E> {}
impl<E> PartialOrd for Due<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Due<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

pub(super) struct Agenda<E> {
    /// The bucket being drained, ordered (everything before `start + WIDTH_US`): (time, order,
    /// index into `bodies`).
    current: BinaryHeap<Reverse<(Time, u64, u32)>>,
    /// The events of the bucket being drained, taken as they are popped.
    bodies: Vec<Option<E>>,
    /// Unordered buckets; `buckets[(cursor + i) % BUCKETS]` holds `[start + i·W, start + (i+1)·W)`.
    buckets: Vec<Vec<Due<E>>>,
    spare: Vec<Vec<Due<E>>>,
    cursor: usize,
    /// Start of the current bucket.
    start: Time,
    /// Entries in `buckets`.
    in_buckets: usize,
    /// Entries at or beyond the horizon.
    later: BinaryHeap<Reverse<Due<E>>>,
}

impl<E> Agenda<E> {
    pub(super) fn new(now: Time) -> Self {
        Agenda {
            current: BinaryHeap::new(),
            bodies: Vec::new(),
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
            spare: Vec::new(),
            cursor: 0,
            start: now - now % WIDTH_US,
            in_buckets: 0,
            later: BinaryHeap::new(),
        }
    }

    fn horizon(&self) -> Time {
        self.start + WIDTH_US * BUCKETS as Time
    }

    /// Schedules `event` at `at`; `order` breaks ties (lower first) and must not repeat.
    pub(super) fn push(&mut self, at: Time, order: u64, event: E) {
        self.push_due(Due { at, order, event });
    }

    fn push_due(&mut self, due: Due<E>) {
        let at = due.at;
        if at < self.start + WIDTH_US {
            self.current.push(Reverse((at, due.order, self.bodies.len() as u32)));
            self.bodies.push(Some(due.event));
        } else if at < self.horizon() {
            let i = ((at - self.start) / WIDTH_US) as usize;
            let bucket = &mut self.buckets[(self.cursor + i) % BUCKETS];
            if bucket.capacity() == 0
                && let Some(spare) = self.spare.pop()
            {
                *bucket = spare;
            }
            bucket.push(due);
            self.in_buckets += 1;
        } else {
            self.later.push(Reverse(due));
        }
    }

    /// The next event by time, then scheduling order: (time, order, event).
    pub(super) fn pop(&mut self) -> Option<(Time, u64, E)> {
        loop {
            if let Some(Reverse((at, order, i))) = self.current.pop() {
                if let Some(event) = self.bodies.get_mut(i as usize).and_then(Option::take) {
                    return Some((at, order, event));
                }
                continue;
            }
            self.bodies.clear();
            if self.in_buckets == 0 {
                let Reverse(next) = self.later.peek()?;
                let at = next.at;
                if at >= self.horizon() {
                    // Nothing within the horizon: jump the calendar to the next event.
                    self.start = at - at % WIDTH_US;
                    self.cursor = 0;
                    self.pull_later();
                    continue;
                }
            }
            self.cursor = (self.cursor + 1) % BUCKETS;
            self.start += WIDTH_US;
            self.pull_later();
            let mut bucket = std::mem::take(&mut self.buckets[self.cursor]);
            self.in_buckets -= bucket.len();
            for due in bucket.drain(..) {
                self.current.push(Reverse((due.at, due.order, self.bodies.len() as u32)));
                self.bodies.push(Some(due.event));
            }
            if self.spare.len() < SPARE_BUCKETS {
                self.spare.push(bucket);
            }
        }
    }

    /// Moves what the horizon now covers from `later` into the buckets.
    fn pull_later(&mut self) {
        while self.later.peek().is_some_and(|Reverse(e)| e.at < self.horizon()) {
            if let Some(Reverse(due)) = self.later.pop() {
                self.push_due(due);
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
                    agenda.push(at, order as u64, order as u32);
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
