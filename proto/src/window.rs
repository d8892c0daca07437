//! The sliding window of recent chunks, and the buffer map that describes it to neighbours.
//!
//! A node keeps only the most recent `capacity` sequence numbers (10 s of stream by default). Storing a
//! chunk newer than the window slides the window forward and evicts what falls off the back; a chunk
//! older than the back is refused. Memory is therefore bounded by `capacity` entries whatever the
//! neighbours send.
//!
//! A [`BufferMap`] is the window's membership as a bitmap relative to its base: 8 bytes of base,
//! 2 bytes of length and one bit per sequence number.

use std::collections::VecDeque;

use bytes::{Buf, BufMut};

use crate::wire::DecodeError;

/// The largest window (and buffer map) in sequence numbers: 4096 (over 17 minutes of 250 ms chunks, or
/// 40 s of 10 ms chunks).
pub const MAX_WINDOW: usize = 4096;

/// What happened to an inserted item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Stored; nothing was evicted.
    Stored,
    /// Stored, and the window slid forward, evicting this many stored items.
    StoredAndSlid {
        /// How many stored items fell off the back.
        evicted: usize,
    },
    /// Already present; the new item was dropped.
    Duplicate,
    /// Older than the back of the window; dropped.
    TooOld,
}

/// A sliding map from sequence number to item, covering at most `capacity` consecutive numbers.
#[derive(Debug, Clone)]
pub struct Window<T> {
    base: u64,
    slots: VecDeque<Option<T>>,
    capacity: usize,
    len: usize,
}

impl<T> Window<T> {
    /// An empty window of `capacity` sequence numbers (clamped to 1..=[`MAX_WINDOW`]) starting at `base`.
    pub fn new(capacity: usize, base: u64) -> Self {
        let capacity = capacity.clamp(1, MAX_WINDOW);
        Window { base, slots: VecDeque::with_capacity(capacity), capacity, len: 0 }
    }

    /// The oldest sequence number the window can hold.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// The span of sequence numbers covered.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// How many items are stored.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// One past the highest sequence number the window has reached (stored or slid past).
    pub fn end(&self) -> u64 {
        self.base + self.slots.len() as u64
    }
    /// The highest stored sequence number.
    pub fn newest(&self) -> Option<u64> {
        self.slots.iter().rposition(Option::is_some).map(|i| self.base + i as u64)
    }

    /// The item at `seq`, if stored.
    pub fn get(&self, seq: u64) -> Option<&T> {
        let i = seq.checked_sub(self.base)?;
        self.slots.get(usize::try_from(i).ok()?)?.as_ref()
    }
    /// Whether `seq` is stored.
    pub fn contains(&self, seq: u64) -> bool {
        self.get(seq).is_some()
    }

    /// Stores `item` at `seq`, sliding the window forward if `seq` is past its front.
    pub fn insert(&mut self, seq: u64, item: T) -> Insert {
        if seq < self.base {
            return Insert::TooOld;
        }
        let mut evicted = 0;
        let offset = seq - self.base;
        if offset >= self.capacity as u64 {
            evicted = self.advance_to(seq + 1 - self.capacity as u64);
        }
        let i = (seq - self.base) as usize;
        while self.slots.len() <= i {
            self.slots.push_back(None);
        }
        if self.slots[i].is_some() {
            return Insert::Duplicate;
        }
        self.slots[i] = Some(item);
        self.len += 1;
        if evicted > 0 || offset >= self.capacity as u64 { Insert::StoredAndSlid { evicted } } else { Insert::Stored }
    }

    /// Moves the back of the window to `new_base` (never backwards), dropping everything older.
    /// Returns how many stored items were dropped.
    pub fn advance_to(&mut self, new_base: u64) -> usize {
        if new_base <= self.base {
            return 0;
        }
        let mut evicted = 0;
        let drop = new_base - self.base;
        if drop >= self.slots.len() as u64 {
            evicted = self.len;
            self.slots.clear();
            self.len = 0;
        } else {
            for slot in self.slots.drain(..drop as usize) {
                evicted += usize::from(slot.is_some());
            }
            self.len -= evicted;
        }
        self.base = new_base;
        evicted
    }

    /// Removes the item at `seq`, if stored.
    pub fn remove(&mut self, seq: u64) -> Option<T> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        let item = self.slots.get_mut(i)?.take();
        self.len -= usize::from(item.is_some());
        item
    }

    /// Stored items in sequence order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|t| (self.base + i as u64, t)))
    }

    /// The window's membership as a buffer map.
    pub fn buffer_map(&self) -> BufferMap {
        let mut map = BufferMap::empty(self.base);
        for (seq, _) in self.iter() {
            map.insert(seq);
        }
        map
    }
}

/// Which sequence numbers a node holds, relative to a base: the compact "have" announcement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BufferMap {
    base: u64,
    len: u16,
    bits: Vec<u8>,
}

impl BufferMap {
    /// A map that holds nothing, starting at `base`.
    pub fn empty(base: u64) -> Self {
        BufferMap { base, len: 0, bits: Vec::new() }
    }
    /// The first sequence number the map describes.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// How many sequence numbers, from the base, the map describes.
    pub fn span(&self) -> usize {
        self.len as usize
    }
    /// Whether `seq` is marked present.
    pub fn contains(&self, seq: u64) -> bool {
        match seq.checked_sub(self.base) {
            Some(i) if i < u64::from(self.len) => self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0,
            _ => false,
        }
    }
    /// Marks `seq` present. Numbers below the base or beyond [`MAX_WINDOW`] from it are ignored
    /// (returns false).
    pub fn insert(&mut self, seq: u64) -> bool {
        let Some(i) = seq.checked_sub(self.base).filter(|&i| i < MAX_WINDOW as u64) else {
            return false;
        };
        if i >= u64::from(self.len) {
            self.len = (i + 1) as u16;
            self.bits.resize(usize::from(self.len).div_ceil(8), 0);
        }
        self.bits[(i / 8) as usize] |= 1 << (i % 8);
        true
    }
    /// The present sequence numbers, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..u64::from(self.len)).filter(|i| self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0).map(|i| self.base + i)
    }
    /// How many sequence numbers are present.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        8 + 2 + self.bits.len()
    }
    /// Writes base (u64), span (u16) and the bitmap (span/8 bytes rounded up, bit i of byte j is
    /// base + 8j + i).
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u64(self.base);
        buf.put_u16(self.len);
        buf.put_slice(&self.bits);
    }
    /// Reads a buffer map; refuses a span over [`MAX_WINDOW`] and stray bits past the span.
    pub fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        if buf.remaining() < 10 {
            return Err(DecodeError::Incomplete(10 - buf.remaining()));
        }
        let base = buf.get_u64();
        let len = buf.get_u16();
        if usize::from(len) > MAX_WINDOW {
            return Err(DecodeError::TooLong { what: "buffer map", len: len.into(), max: MAX_WINDOW as u64 });
        }
        let n = usize::from(len).div_ceil(8);
        if buf.remaining() < n {
            return Err(DecodeError::Incomplete(n - buf.remaining()));
        }
        let mut bits = vec![0; n];
        buf.copy_to_slice(&mut bits);
        if !len.is_multiple_of(8) && bits[n - 1] >> (len % 8) != 0 {
            return Err(DecodeError::Malformed("buffer map has bits past its span"));
        }
        if base.checked_add(u64::from(len)).is_none() {
            return Err(DecodeError::Malformed("buffer map runs past the largest sequence number"));
        }
        Ok(BufferMap { base, len, bits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn window_slides_and_evicts() {
        let mut w = Window::new(4, 10);
        assert_eq!(w.insert(9, 'a'), Insert::TooOld);
        assert_eq!(w.insert(10, 'a'), Insert::Stored);
        assert_eq!(w.insert(12, 'c'), Insert::Stored);
        assert_eq!(w.insert(12, 'x'), Insert::Duplicate);
        assert_eq!(w.insert(14, 'e'), Insert::StoredAndSlid { evicted: 1 });
        assert_eq!(w.base(), 11);
        assert!(!w.contains(10));
        assert_eq!(w.get(12), Some(&'c'));
        assert_eq!(w.len(), 2);
        assert_eq!(w.newest(), Some(14));
        assert_eq!(w.insert(100, 'z'), Insert::StoredAndSlid { evicted: 2 });
        assert_eq!(w.len(), 1);
        assert_eq!(w.base(), 97);
    }

    proptest! {
        /// Whatever is inserted, the window never holds more than its capacity, and it agrees with a
        /// plain model of "the last `capacity` numbers up to the highest seen".
        #[test]
        fn window_is_bounded_and_matches_model(cap in 1usize..64, seqs in proptest::collection::vec(0u64..500, 0..300)) {
            let mut w = Window::new(cap, 0);
            let mut model = std::collections::BTreeSet::new();
            let mut high: Option<u64> = None;
            for s in seqs {
                let low = high.map_or(0, |h| (h + 1).saturating_sub(cap as u64));
                w.insert(s, s);
                if s >= low {
                    model.insert(s);
                    high = Some(high.map_or(s, |h| h.max(s)));
                }
                let low = high.map_or(0, |h| (h + 1).saturating_sub(cap as u64));
                model.retain(|&m| m >= low);
                prop_assert!(w.len() <= cap);
                prop_assert_eq!(w.iter().map(|(k, _)| k).collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(w.buffer_map().iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            }
        }

        #[test]
        fn buffer_map_round_trips(base in 0u64..u64::MAX / 2, seqs in proptest::collection::vec(0u64..MAX_WINDOW as u64, 0..200)) {
            let mut map = BufferMap::empty(base);
            for s in &seqs { map.insert(base + s); }
            let mut out = Vec::new();
            map.encode(&mut out);
            prop_assert_eq!(out.len(), map.encoded_len());
            let back = BufferMap::decode(&mut &out[..]).unwrap();
            prop_assert_eq!(&back, &map);
            for len in 0..out.len() {
                prop_assert!(matches!(BufferMap::decode(&mut &out[..len]), Err(DecodeError::Incomplete(_))));
            }
        }
    }
}
