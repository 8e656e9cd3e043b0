//! Range reads (etcd-api.md §1.4, "How etcd 3.4 answers a Range").

use std::cmp::Ordering;

use bytes::Bytes;

use flotilla_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use flotilla_proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use flotilla_proto::mvccpb::KeyValue;

use crate::error::KvError;
use crate::key_range::KeyRange;
use crate::mvcc::{Keyspace, compacted_error};
use crate::validate::check_range;

/// A header with only the revision set; the server fills in cluster, member and term.
pub(crate) fn revision_header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..ResponseHeader::default()
    })
}

/// Answers `request` against `keyspace` as seen at `view_revision` (the current revision, or
/// inside a write txn the revision that includes the txn's changes so far), in one page.
pub(crate) fn range(
    keyspace: &Keyspace,
    request: &RangeRequest,
    view_revision: i64,
) -> Result<RangeResponse, KvError> {
    let mut pager = RangePager::start(keyspace, request.clone(), view_revision)?;
    let kvs = pager.next_page(keyspace, usize::MAX, usize::MAX)?;
    debug_assert!(pager.is_done());
    Ok(pager.finish(kvs))
}

/// A Range read a page at a time at one revision, pinned when it starts: the store is held
/// for a page, not for the whole read, and writes go on between pages. Writes after the
/// pinned revision do not change what a page sees (MVCC); a compaction past it would, so the
/// next page then fails with `Compacted` (etcd's RangeStream does the same).
///
/// The pages, gathered and passed to [`RangePager::finish`], make the response a single read
/// makes: `count` counts every key in the range before the filters and the limit; without a
/// sort the limit applies as the pages go (later pages only count), with one every page is
/// kept and `finish` sorts, then limits.
#[derive(Clone, Debug)]
pub struct RangePager {
    request: RangeRequest,
    read_revision: i64,
    /// The response header's revision: the store's revision when the read started.
    view_revision: i64,
    sort: Option<(SortTarget, SortOrder)>,
    /// Key-values kept at most across pages: the limit without a sort, else unbounded.
    keep_max: usize,
    /// The first key the next page reads from (inclusive); `None` once every key is visited.
    next_key: Option<Bytes>,
    /// Keys visited so far: the response's `count`.
    count: i64,
    /// Key-values kept so far, after the filters.
    kept: usize,
    /// A key-value passing the filters was seen beyond `keep_max`.
    beyond_limit: bool,
}

impl RangePager {
    /// Checks `request` and pins its read revision (the current one for revision 0).
    pub(crate) fn start(
        keyspace: &Keyspace,
        request: RangeRequest,
        view_revision: i64,
    ) -> Result<RangePager, KvError> {
        check_range(&request)?;
        let read_revision = keyspace.check_read_revision(request.revision, view_revision)?;
        let sort = effective_sort(&request);
        let limit = usize::try_from(request.limit).unwrap_or(0);
        let keep_max = if request.count_only {
            0
        } else if sort.is_some() || limit == 0 {
            usize::MAX
        } else {
            limit
        };
        Ok(RangePager {
            next_key: Some(request.key.clone()),
            request,
            read_revision,
            view_revision,
            sort,
            keep_max,
            count: 0,
            kept: 0,
            beyond_limit: false,
        })
    }

    /// True once every key of the range has been visited.
    pub fn is_done(&self) -> bool {
        self.next_key.is_none()
    }

    /// True if the request asks for an order other than ascending keys, which only
    /// [`RangePager::finish`] can give (it needs every page).
    pub fn needs_sort(&self) -> bool {
        self.sort.is_some()
    }

    /// The next page: visits at most `keys_max` keys, and stops once the kept key-values
    /// reach `bytes_max` bytes of keys and values. Empty once [`RangePager::is_done`].
    pub(crate) fn next_page(
        &mut self,
        keyspace: &Keyspace,
        keys_max: usize,
        bytes_max: usize,
    ) -> Result<Vec<KeyValue>, KvError> {
        let Some(from) = self.next_key.take() else {
            return Ok(Vec::new());
        };
        let compacted = keyspace.compacted_revision();
        if self.read_revision < compacted {
            return Err(compacted_error(self.read_revision, compacted));
        }
        let keys_only_now =
            self.request.keys_only && !matches!(self.sort, Some((SortTarget::Value, _)));
        let mut kvs = Vec::new();
        let mut bytes = 0;
        let range = KeyRange::new(&from, &self.request.range_end);
        for (visited, (key, version)) in keyspace.live_range(range, self.read_revision).enumerate()
        {
            if visited == keys_max || bytes >= bytes_max {
                // Resume at this key: it has not been visited.
                self.next_key = Some(key.clone());
                break;
            }
            self.count += 1;
            if self.kept == self.keep_max && (self.beyond_limit || self.keep_max == 0) {
                continue; // only counting now
            }
            let mut kv = version.to_key_value(key);
            if !passes_revision_filters(&self.request, &kv) {
                continue;
            }
            if self.kept == self.keep_max {
                self.beyond_limit = true;
                continue;
            }
            if keys_only_now {
                kv.value = Bytes::new();
            }
            bytes += kv.key.len() + kv.value.len();
            self.kept += 1;
            kvs.push(kv);
        }
        Ok(kvs)
    }

    /// The response of the whole read, from every page's key-values in order.
    pub fn finish(self, mut kvs: Vec<KeyValue>) -> RangeResponse {
        assert!(self.is_done(), "a range finished before its last page");
        debug_assert_eq!(kvs.len(), self.kept);
        let limit = usize::try_from(self.request.limit).unwrap_or(0);
        let mut more = self.beyond_limit;
        if let Some((target, order)) = self.sort {
            sort_kvs(&mut kvs, target, order);
            more = limit > 0 && kvs.len() > limit;
            if more {
                kvs.truncate(limit);
            }
            if self.request.keys_only {
                for kv in &mut kvs {
                    kv.value = Bytes::new();
                }
            }
        }
        RangeResponse {
            header: revision_header(self.view_revision),
            kvs,
            more,
            count: self.count,
        }
    }

    /// The last fields of a streamed read, whose pages were sent as they came (no sort):
    /// `more` and `count`.
    pub fn finish_streamed(self) -> (bool, i64) {
        assert!(self.is_done(), "a range finished before its last page");
        assert!(self.sort.is_none(), "a sorted range cannot be streamed");
        (self.beyond_limit, self.count)
    }

    /// The header revision of the response (the store's revision when the read started).
    pub fn view_revision(&self) -> i64 {
        self.view_revision
    }
}

/// A sort target other than KEY with order NONE means ascending; KEY with NONE means the
/// natural (ascending key) order, no sort needed.
fn effective_sort(request: &RangeRequest) -> Option<(SortTarget, SortOrder)> {
    let target = SortTarget::try_from(request.sort_target).unwrap_or(SortTarget::Key);
    let order = SortOrder::try_from(request.sort_order).unwrap_or(SortOrder::None);
    match (target, order) {
        (SortTarget::Key, SortOrder::None) => None,
        (_, SortOrder::None) => Some((target, SortOrder::Ascend)),
        _ => Some((target, order)),
    }
}

/// Each filter applies only when non-zero.
fn passes_revision_filters(request: &RangeRequest, kv: &KeyValue) -> bool {
    let within =
        |value: i64, min: i64, max: i64| (min == 0 || value >= min) && (max == 0 || value <= max);
    within(
        kv.mod_revision,
        request.min_mod_revision,
        request.max_mod_revision,
    ) && within(
        kv.create_revision,
        request.min_create_revision,
        request.max_create_revision,
    )
}

/// A stable sort: keys that tie on the target stay in ascending key order, in both directions,
/// so every member answers alike.
fn sort_kvs(kvs: &mut [KeyValue], target: SortTarget, order: SortOrder) {
    let by_target = |a: &KeyValue, b: &KeyValue| -> Ordering {
        match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        }
    };
    match order {
        SortOrder::Descend => kvs.sort_by(|a, b| by_target(b, a)),
        SortOrder::Ascend | SortOrder::None => kvs.sort_by(by_target),
    }
}
