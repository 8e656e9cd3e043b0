//! The bound on requests held while no leader can be reached: a count and a byte budget,
//! taken by a guard that gives them back when the request stops waiting.

use std::sync::Mutex;

/// What is held now, against the bounds.
#[derive(Debug)]
pub struct HeldRequests {
    requests_max: usize,
    bytes_max: usize,
    /// (requests, bytes) held; never above the bounds.
    held: Mutex<(usize, usize)>,
}

impl HeldRequests {
    pub fn new(requests_max: usize, bytes_max: usize) -> HeldRequests {
        assert!(requests_max > 0 && bytes_max > 0);
        HeldRequests {
            requests_max,
            bytes_max,
            held: Mutex::new((0, 0)),
        }
    }

    /// Room for one more request of `bytes`, or `None` if it would pass a bound.
    pub fn take(&self, bytes: usize) -> Option<HeldRequest<'_>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, held_bytes) = *held;
        if requests + 1 > self.requests_max || held_bytes.saturating_add(bytes) > self.bytes_max {
            return None;
        }
        *held = (requests + 1, held_bytes + bytes);
        Some(HeldRequest { owner: self, bytes })
    }

    /// (requests, bytes) held now.
    pub fn held(&self) -> (usize, usize) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One held request's share; returned on drop.
#[derive(Debug)]
pub struct HeldRequest<'a> {
    owner: &'a HeldRequests,
    bytes: usize,
}

impl Drop for HeldRequest<'_> {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        assert!(
            held.0 >= 1 && held.1 >= self.bytes,
            "held requests underflow"
        );
        *held = (held.0 - 1, held.1 - self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_count_and_bytes_and_given_back_on_drop() {
        let held = HeldRequests::new(2, 100);
        let a = held.take(60).unwrap();
        assert!(held.take(41).is_none(), "past the byte bound");
        let b = held.take(40).unwrap();
        assert_eq!(held.held(), (2, 100));
        assert!(held.take(0).is_none(), "past the count bound");
        drop(a);
        assert_eq!(held.held(), (1, 40));
        let c = held.take(60).unwrap();
        drop((b, c));
        assert_eq!(held.held(), (0, 0));
        assert!(
            held.take(101).is_none(),
            "one request larger than the whole budget"
        );
    }
}
