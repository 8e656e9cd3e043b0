//! etcd's key-range convention, shared by Range, DeleteRange, Compare and Watch
//! (etcd-api.md §1.4): an empty `range_end` means the single key `key`; `range_end` = "\0"
//! means every key >= `key`; anything else means the half-open interval [key, range_end).

use std::ops::Bound;

/// Bounds for `BTreeMap::range` over byte-string keys.
pub type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// A borrowed key range in one of the three forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRange<'a> {
    Single(&'a [u8]),
    /// [start, end). Empty when end <= start.
    Interval {
        start: &'a [u8],
        end: &'a [u8],
    },
    /// Every key >= start.
    From(&'a [u8]),
}

impl<'a> KeyRange<'a> {
    pub fn new(key: &'a [u8], range_end: &'a [u8]) -> KeyRange<'a> {
        match range_end {
            [] => KeyRange::Single(key),
            [0] => KeyRange::From(key),
            end => KeyRange::Interval { start: key, end },
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match *self {
            KeyRange::Single(single) => key == single,
            KeyRange::Interval { start, end } => start <= key && key < end,
            KeyRange::From(start) => start <= key,
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(*self, KeyRange::Interval { start, end } if end <= start)
    }

    /// Bounds for `BTreeMap::range`, or `None` when the range holds no key. (`BTreeMap::range`
    /// panics on inverted bounds, which client input may well contain.)
    pub fn bounds(&self) -> Option<KeyBounds<'a>> {
        if self.is_empty() {
            return None;
        }
        Some(match *self {
            KeyRange::Single(key) => (Bound::Included(key), Bound::Included(key)),
            KeyRange::Interval { start, end } => (Bound::Included(start), Bound::Excluded(end)),
            KeyRange::From(start) => (Bound::Included(start), Bound::Unbounded),
        })
    }

    /// True if the two ranges share at least one key.
    pub fn overlaps(&self, other: &KeyRange<'_>) -> bool {
        if self.is_empty() || other.is_empty() {
            return false;
        }
        let (a_start, a_end) = self.start_end();
        let (b_start, b_end) = other.start_end();
        let a_before_b_ends = match b_end {
            EndBound::Unbounded => true,
            EndBound::Excluded(end) => a_start < end,
            EndBound::Included(end) => a_start <= end,
        };
        let b_before_a_ends = match a_end {
            EndBound::Unbounded => true,
            EndBound::Excluded(end) => b_start < end,
            EndBound::Included(end) => b_start <= end,
        };
        a_before_b_ends && b_before_a_ends
    }

    fn start_end(&self) -> (&[u8], EndBound<'_>) {
        match *self {
            KeyRange::Single(key) => (key, EndBound::Included(key)),
            KeyRange::Interval { start, end } => (start, EndBound::Excluded(end)),
            KeyRange::From(start) => (start, EndBound::Unbounded),
        }
    }
}

enum EndBound<'a> {
    Included(&'a [u8]),
    Excluded(&'a [u8]),
    Unbounded,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_range_end_is_a_single_key() {
        let range = KeyRange::new(b"foo", b"");
        assert!(range.contains(b"foo"));
        assert!(!range.contains(b"foo0"));
    }

    #[test]
    fn zero_byte_range_end_means_every_key_from_key() {
        let range = KeyRange::new(b"b", b"\0");
        assert!(range.contains(b"b"));
        assert!(range.contains(b"zzz"));
        assert!(!range.contains(b"a"));
        // etcdctl get --prefix "" sends key "\0", range_end "\0": all keys.
        let all = KeyRange::new(b"\0", b"\0");
        assert!(all.contains(b"\0"));
        assert!(all.contains(&[0xff]));
    }

    #[test]
    fn prefix_is_half_open_interval() {
        let range = KeyRange::new(b"f", b"g");
        assert!(range.contains(b"f"));
        assert!(range.contains(b"foo"));
        assert!(!range.contains(b"g"));
    }

    #[test]
    fn inverted_interval_is_empty_and_has_no_bounds() {
        let range = KeyRange::new(b"z", b"a");
        assert!(range.is_empty());
        assert!(range.bounds().is_none());
        assert!(!range.contains(b"m"));
        assert!(KeyRange::new(b"a", b"a").bounds().is_none());
    }

    #[test]
    fn overlap_cases() {
        let single_b = KeyRange::new(b"b", b"");
        assert!(KeyRange::new(b"a", b"c").overlaps(&single_b));
        assert!(!KeyRange::new(b"a", b"b").overlaps(&single_b));
        assert!(KeyRange::new(b"b", b"\0").overlaps(&KeyRange::new(b"x", b"")));
        assert!(!KeyRange::new(b"c", b"\0").overlaps(&single_b));
        assert!(KeyRange::new(b"a", b"c").overlaps(&KeyRange::new(b"b", b"d")));
        assert!(!KeyRange::new(b"a", b"c").overlaps(&KeyRange::new(b"c", b"d")));
        assert!(!KeyRange::new(b"z", b"a").overlaps(&KeyRange::new(b"a", b"\0")));
    }
}
