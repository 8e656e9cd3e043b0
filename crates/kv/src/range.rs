//! Range reads (etcd-api.md §1.4, "How etcd 3.4 answers a Range").

use std::cmp::Ordering;

use flotilla_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use flotilla_proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use flotilla_proto::mvccpb::KeyValue;

use crate::error::KvError;
use crate::key_range::KeyRange;
use crate::mvcc::Keyspace;
use crate::validate::check_range;

/// A header with only the revision set; the server fills in cluster, member and term.
pub(crate) fn revision_header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..ResponseHeader::default()
    })
}

/// Answers `request` against `keyspace` as seen at `view_revision` (the current revision, or
/// inside a write txn the revision that includes the txn's changes so far).
pub(crate) fn range(
    keyspace: &Keyspace,
    request: &RangeRequest,
    view_revision: i64,
) -> Result<RangeResponse, KvError> {
    check_range(request)?;
    let read_revision = keyspace.check_read_revision(request.revision, view_revision)?;
    let key_range = KeyRange::new(&request.key, &request.range_end);
    let sort = effective_sort(request);
    // Sorting or filtering needs every key first; limit applies afterwards.
    let reads_everything = sort.is_some() || has_revision_filters(request);
    let limit = usize::try_from(request.limit).unwrap_or(0);
    let fetch_max = if reads_everything || limit == 0 {
        usize::MAX
    } else {
        limit + 1
    };
    let mut count: i64 = 0;
    let mut kvs = Vec::new();
    for (key, version) in keyspace.live_range(key_range, read_revision) {
        // count is taken before limit and filters.
        count += 1;
        if !request.count_only && kvs.len() < fetch_max {
            kvs.push(version.to_key_value(key));
        }
    }
    if reads_everything {
        kvs.retain(|kv| passes_revision_filters(request, kv));
        if let Some((target, order)) = sort {
            sort_kvs(&mut kvs, target, order);
        }
    }
    let more = limit > 0 && kvs.len() > limit;
    if more {
        kvs.truncate(limit);
    }
    if request.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: revision_header(view_revision),
        kvs,
        more,
        count,
    })
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

fn has_revision_filters(request: &RangeRequest) -> bool {
    request.min_mod_revision != 0
        || request.max_mod_revision != 0
        || request.min_create_revision != 0
        || request.max_create_revision != 0
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
