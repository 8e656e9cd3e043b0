//! A Range read a page at a time (`KvStore::start_range`, `range_page`) answers exactly as the
//! same Range read at once, whatever the page size and whatever is written between pages;
//! a compaction past its pinned revision fails the next page.

mod common;

use common::*;
use flotilla_kv::{Command, ErrorKind, RangePager};
use flotilla_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use flotilla_proto::etcdserverpb::{CompactionRequest, RangeRequest, RangeResponse};

/// 40 keys over several revisions: overwrites (versions > 1), deletions, and keys outside
/// the ranges asked for.
fn store() -> Harness {
    let mut h = Harness::new();
    for i in 0..40 {
        h.put(&format!("k/{i:02}"), &"v".repeat(1 + i % 7));
    }
    for i in (0..40).step_by(3) {
        h.put(&format!("k/{i:02}"), &format!("again-{i}"));
    }
    for i in (0..40).step_by(5) {
        h.delete(&format!("k/{i:02}"), "");
    }
    h.put("j", "before");
    h.put("l", "after");
    h
}

/// Every page until the read is done, then the response `finish` makes of them.
fn paged(
    h: &mut Harness,
    request: &RangeRequest,
    keys_max: usize,
    bytes_max: usize,
    between_pages: &mut dyn FnMut(&mut Harness),
) -> Result<RangeResponse, ErrorKind> {
    let mut pager: RangePager = h.store.start_range(request.clone()).map_err(|e| e.kind())?;
    let mut kvs = Vec::new();
    let mut pages = 0;
    while !pager.is_done() {
        let page = h
            .store
            .range_page(&mut pager, keys_max, bytes_max)
            .map_err(|e| e.kind())?;
        assert!(page.len() <= keys_max);
        kvs.extend(page);
        pages += 1;
        assert!(pages <= 100, "a read of 42 keys took over 100 pages");
        between_pages(h);
    }
    Ok(pager.finish(kvs))
}

fn requests(past_revision: i64) -> Vec<RangeRequest> {
    let prefix = range_request("k/", "k0");
    let mut out = vec![
        prefix.clone(),
        range_request("k/07", ""),
        range_request("k/05", ""), // deleted
        range_request("a", "\0"),
        range_request("k/10", "k/30"),
        range_request("z", "a"), // empty
    ];
    for limit in [1, 2, 7, 29, 100] {
        out.push(RangeRequest {
            limit,
            ..prefix.clone()
        });
    }
    out.push(RangeRequest {
        keys_only: true,
        ..prefix.clone()
    });
    out.push(RangeRequest {
        count_only: true,
        limit: 3,
        ..prefix.clone()
    });
    for target in [
        SortTarget::Key,
        SortTarget::Version,
        SortTarget::Create,
        SortTarget::Mod,
        SortTarget::Value,
    ] {
        for order in [SortOrder::None, SortOrder::Ascend, SortOrder::Descend] {
            for (limit, keys_only) in [(0, false), (5, false), (5, true)] {
                out.push(RangeRequest {
                    sort_target: target as i32,
                    sort_order: order as i32,
                    limit,
                    keys_only,
                    ..prefix.clone()
                });
            }
        }
    }
    out.push(RangeRequest {
        min_mod_revision: 20,
        limit: 4,
        ..prefix.clone()
    });
    out.push(RangeRequest {
        max_create_revision: 30,
        min_create_revision: 5,
        ..prefix.clone()
    });
    out.push(RangeRequest {
        revision: past_revision,
        ..prefix.clone()
    });
    out.push(RangeRequest {
        revision: past_revision,
        limit: 6,
        sort_order: SortOrder::Descend as i32,
        sort_target: SortTarget::Mod as i32,
        ..prefix
    });
    out
}

#[test]
fn pages_of_any_size_make_the_response_one_read_makes() {
    let mut h = store();
    let past = h.revision() - 20;
    for request in requests(past) {
        let whole = h.store.range(&request).unwrap();
        for keys_max in [1, 2, 3, 7, 1000] {
            for bytes_max in [1, 40, usize::MAX] {
                let pages = paged(&mut h, &request, keys_max, bytes_max, &mut |_| {}).unwrap();
                assert_eq!(
                    pages, whole,
                    "{request:?} in pages of {keys_max} keys, {bytes_max} bytes"
                );
            }
        }
    }
}

/// The pinned revision: what is written between pages (new keys before and after the
/// cursor, overwrites, deletions) is not seen; the header's revision is the one the read
/// started at.
#[test]
fn writes_between_pages_are_not_seen() {
    for request in requests(0).into_iter().filter(|r| r.revision == 0) {
        let mut h = store();
        let whole = h.store.range(&request).unwrap();
        let mut n = 0;
        let pages = paged(&mut h, &request, 3, usize::MAX, &mut |h| {
            n += 1;
            h.put(&format!("k/{:02}", n % 40), "overwritten");
            h.put(&format!("k/{n:02}x"), "new");
            h.delete(&format!("k/{:02}", (n * 7) % 40), "");
        })
        .unwrap();
        assert_eq!(pages, whole, "{request:?}");
        assert!(h.revision() > whole.header.unwrap().revision);
    }
}

#[test]
fn a_compaction_past_the_pinned_revision_fails_the_next_page() {
    let mut h = store();
    let request = range_request("k/", "k0");
    let mut compacted = false;
    let result = paged(&mut h, &request, 5, usize::MAX, &mut |h| {
        if !compacted {
            compacted = true;
            h.put("k/new", "x");
            let revision = h.revision();
            h.apply(Command::compaction(CompactionRequest {
                revision,
                physical: false,
            }));
        }
    });
    assert_eq!(result.unwrap_err(), ErrorKind::Compacted);

    // A compaction at the pinned revision itself leaves it readable.
    let mut h = store();
    let whole = h.store.range(&request).unwrap();
    let pinned = whole.header.unwrap().revision;
    let mut compacted = false;
    let pages = paged(&mut h, &request, 5, usize::MAX, &mut |h| {
        if !compacted {
            compacted = true;
            h.apply(Command::compaction(CompactionRequest {
                revision: pinned,
                physical: false,
            }));
        }
    });
    assert_eq!(pages.unwrap(), whole);
}

#[test]
fn a_bad_request_is_refused_when_the_read_starts() {
    let h = store();
    let future = RangeRequest {
        revision: h.revision() + 1,
        ..range_request("k/", "k0")
    };
    let err = h.store.start_range(future).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FutureRevision);
    let empty_key = range_request("", "");
    assert_eq!(
        h.store.start_range(empty_key).unwrap_err().kind(),
        ErrorKind::EmptyKey
    );
}
