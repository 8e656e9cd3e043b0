//! Whether a role's key permissions cover a request's keys (etcd's range permission cache).
//!
//! A permission or a request names either one key (`range_end` empty), the keys from `key`
//! to `range_end` (exclusive), or every key from `key` on (`range_end` = "\0"). A request
//! for one key is allowed when some permission holds that key; a request for a range is
//! allowed only when the permissions together cover all of it, so a user allowed "a".."m"
//! and "m".."z" may read "c".."x", but one allowed only "a".."m" may not read "a".."n".

use flotilla_proto::authpb::Permission;
use flotilla_proto::authpb::permission::Type as PermissionType;

/// Read or write: what a request needs on its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// The end of an interval of keys: a key (exclusive), or past every key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End<'a> {
    Before(&'a [u8]),
    Unbounded,
}

/// `[start, end)`; a single key is `[key, key + "\0")`.
#[derive(Clone, Copy, Debug)]
struct Interval<'a> {
    start: &'a [u8],
    end: End<'a>,
    /// A single key (whose exclusive end, key + "\0", is not a slice of the input).
    point: bool,
}

impl<'a> Interval<'a> {
    fn of(key: &'a [u8], range_end: &'a [u8]) -> Interval<'a> {
        match range_end {
            [] => Interval {
                start: key,
                end: End::Before(key),
                point: true,
            },
            [0] => Interval {
                start: key,
                end: End::Unbounded,
                point: false,
            },
            end => Interval {
                start: key,
                end: End::Before(end),
                point: false,
            },
        }
    }

    /// Whether the key `at` lies inside.
    fn holds(&self, at: &[u8]) -> bool {
        if at < self.start {
            return false;
        }
        match self.end {
            End::Unbounded => true,
            End::Before(end) if self.point => at == end,
            End::Before(end) => at < end,
        }
    }
}

/// Whether `access` to `key`..`range_end` is granted by `permissions` (all of one user's
/// roles together).
pub fn covers<'p>(
    permissions: impl Iterator<Item = &'p Permission> + Clone,
    access: Access,
    key: &[u8],
    range_end: &[u8],
) -> bool {
    let granted = permissions
        .filter(|p| grants(p.perm_type(), access))
        .map(|p| Interval::of(p.key.as_ref(), p.range_end.as_ref()));
    let wanted = Interval::of(key, range_end);
    if wanted.point {
        return granted.clone().any(|p| p.holds(key));
    }
    if let End::Before(end) = wanted.end
        && end <= key
    {
        // An empty range reads nothing; allow it where its first key is allowed, so it tells
        // a stranger nothing either.
        return granted.clone().any(|p| p.holds(key));
    }
    // Sweep from the start: each step jumps to the farthest end of a permission holding the
    // cursor. Every step passes the end of at least one more permission, so the loop is
    // bounded by their number.
    let mut cursor = key.to_vec();
    let steps_max = granted.clone().count() + 1;
    for _ in 0..steps_max {
        let reach = granted
            .clone()
            .filter(|p| !p.point && p.holds(&cursor))
            .map(|p| p.end)
            .max();
        // A single-key permission covers the cursor only when the wanted range ends right
        // after it.
        let point_reach = granted
            .clone()
            .any(|p| p.point && p.start == cursor.as_slice())
            .then(|| successor(&cursor));
        match (reach, point_reach) {
            (Some(End::Unbounded), _) => return true,
            (Some(End::Before(end)), point) => {
                let end = match point {
                    Some(next) if next.as_slice() > end => next,
                    _ => end.to_vec(),
                };
                if ends_at_or_after(&end, wanted.end) {
                    return true;
                }
                cursor = end;
            }
            (None, Some(next)) => {
                if ends_at_or_after(&next, wanted.end) {
                    return true;
                }
                cursor = next;
            }
            (None, None) => return false,
        }
    }
    false
}

fn grants(granted: PermissionType, access: Access) -> bool {
    matches!(
        (granted, access),
        (PermissionType::Readwrite, _)
            | (PermissionType::Read, Access::Read)
            | (PermissionType::Write, Access::Write)
    )
}

/// The smallest key after `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

fn ends_at_or_after(reached: &[u8], wanted: End<'_>) -> bool {
    match wanted {
        End::Unbounded => false,
        End::Before(end) => reached >= end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(kind: PermissionType, key: &str, end: &str) -> Permission {
        Permission {
            perm_type: kind as i32,
            key: key.as_bytes().to_vec().into(),
            range_end: end.as_bytes().to_vec().into(),
        }
    }

    fn allowed(perms: &[Permission], access: Access, key: &str, end: &str) -> bool {
        covers(perms.iter(), access, key.as_bytes(), end.as_bytes())
    }

    #[test]
    fn single_keys_need_a_permission_holding_them() {
        let perms = [
            perm(PermissionType::Read, "a", "m"),
            perm(PermissionType::Write, "x", ""),
        ];
        assert!(allowed(&perms, Access::Read, "c", ""));
        assert!(allowed(&perms, Access::Read, "a", ""));
        assert!(
            !allowed(&perms, Access::Read, "m", ""),
            "the end is exclusive"
        );
        assert!(!allowed(&perms, Access::Write, "c", ""), "read only");
        assert!(allowed(&perms, Access::Write, "x", ""));
        assert!(
            !allowed(&perms, Access::Write, "x0", ""),
            "a point is one key"
        );
        assert!(!allowed(&perms, Access::Read, "x", ""), "write only");
    }

    #[test]
    fn ranges_must_be_covered_by_the_union_of_permissions() {
        let perms = [
            perm(PermissionType::Read, "a", "m"),
            perm(PermissionType::Readwrite, "m", "t"),
            perm(PermissionType::Read, "v", "\0"),
        ];
        assert!(
            allowed(&perms, Access::Read, "c", "p"),
            "across two permissions"
        );
        assert!(allowed(&perms, Access::Read, "a", "t"));
        assert!(
            !allowed(&perms, Access::Read, "c", "u"),
            "t..u is not granted"
        );
        assert!(allowed(&perms, Access::Read, "w", "\0"), "from a key on");
        assert!(!allowed(&perms, Access::Read, "a", "\0"), "the gap t..v");
        assert!(
            !allowed(&perms, Access::Write, "c", "p"),
            "write only on m..t"
        );
        assert!(allowed(&perms, Access::Write, "m", "t"));
    }

    #[test]
    fn a_from_key_permission_covers_everything_after_its_key() {
        let perms = [perm(PermissionType::Readwrite, "", "\0")];
        for (key, end) in [("", "\0"), ("a", ""), ("a", "z"), ("\u{7f}", "\0")] {
            assert!(allowed(&perms, Access::Write, key, end), "{key:?}..{end:?}");
        }
    }

    #[test]
    fn a_point_permission_covers_a_range_of_exactly_that_key() {
        let perms = [perm(PermissionType::Read, "k", "")];
        assert!(allowed(&perms, Access::Read, "k", "k\0"));
        assert!(!allowed(&perms, Access::Read, "k", "k\0\0"));
        let chained = [
            perm(PermissionType::Read, "k", ""),
            perm(PermissionType::Read, "k\0", "z"),
        ];
        assert!(allowed(&chained, Access::Read, "k", "p"));
    }

    #[test]
    fn no_permissions_allow_nothing() {
        assert!(!allowed(&[], Access::Read, "a", ""));
        assert!(!allowed(&[], Access::Read, "a", "b"));
        assert!(!allowed(&[], Access::Read, "", "\0"));
    }
}
