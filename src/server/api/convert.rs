//! Conversions between the wire messages and the state machine's own types, with etcd's meaning
//! for every value the wire can carry (checked against etcd 3.4 by the differential test).

use super::errors::ApiError;
use super::proto::etcdserverpb as pb;
use super::proto::mvccpb;
use geolock_core::kv;

pub fn kv_out(k: kv::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.key,
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
        value: k.value,
        lease: k.lease,
    }
}

pub fn event_out(e: kv::Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            kv::EventKind::Put => mvccpb::event::EventType::Put as i32,
            kv::EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(kv_out(e.kv)),
        prev_kv: e.prev_kv.map(kv_out),
    }
}

/// A Range request with etcd's meaning for its sort fields (its key is checked with the rest of
/// the request, by [`kv::check_key`] or [`kv::validate_txn`]). A `sort_order` etcd does not
/// define means no sorting at all, whatever the target (etcd's apply sorts only for ascend and
/// descend). A `sort_target` it does not define, with a defined order, is refused with etcd's
/// "invalid sort option" (etcd 3.5's check; 3.4's apply sorts with no sorter and the member
/// panics).
pub fn range_in(r: pb::RangeRequest) -> Result<kv::RangeRequest, ApiError> {
    use pb::range_request::{SortOrder, SortTarget};
    let (sort_order, sort_target) = match SortOrder::try_from(r.sort_order) {
        Err(_) => (kv::SortOrder::None, kv::SortTarget::Key),
        Ok(order) => (
            match order {
                SortOrder::None => kv::SortOrder::None,
                SortOrder::Ascend => kv::SortOrder::Ascend,
                SortOrder::Descend => kv::SortOrder::Descend,
            },
            match SortTarget::try_from(r.sort_target).map_err(|_| ApiError::InvalidSortOption)? {
                SortTarget::Key => kv::SortTarget::Key,
                SortTarget::Version => kv::SortTarget::Version,
                SortTarget::Create => kv::SortTarget::Create,
                SortTarget::Mod => kv::SortTarget::Mod,
                SortTarget::Value => kv::SortTarget::Value,
            },
        ),
    };
    Ok(kv::RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        serializable: r.serializable,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

pub fn range_out(r: kv::RangeResponse, header: pb::ResponseHeader) -> pb::RangeResponse {
    pb::RangeResponse {
        header: Some(header),
        kvs: r.kvs.into_iter().map(kv_out).collect(),
        more: r.more,
        count: r.count,
    }
}

pub fn put_in(p: pb::PutRequest) -> kv::PutRequest {
    kv::PutRequest {
        key: p.key,
        value: p.value,
        lease: p.lease,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

pub fn put_out(p: kv::PutResponse, header: pb::ResponseHeader) -> pb::PutResponse {
    pb::PutResponse { header: Some(header), prev_kv: p.prev_kv.map(kv_out) }
}

pub fn delete_in(d: pb::DeleteRangeRequest) -> kv::DeleteRangeRequest {
    kv::DeleteRangeRequest { key: d.key, range_end: d.range_end, prev_kv: d.prev_kv }
}

pub fn delete_out(d: kv::DeleteRangeResponse, header: pb::ResponseHeader) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: Some(header),
        deleted: d.deleted,
        prev_kvs: d.prev_kvs.into_iter().map(kv_out).collect(),
    }
}

/// A Txn guard with etcd's meaning for every value the wire can carry: a union field that does
/// not match the target (or none) compares against zero or the empty value, and a target or
/// result etcd's proto does not define is kept as undefined (see [`kv::CompareTarget`]), as
/// etcd's `compareKV` treats them.
fn compare_in(c: pb::Compare) -> kv::Compare {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let result = match R::try_from(c.result) {
        Ok(R::Equal) => kv::CompareResult::Equal,
        Ok(R::Greater) => kv::CompareResult::Greater,
        Ok(R::Less) => kv::CompareResult::Less,
        Ok(R::NotEqual) => kv::CompareResult::NotEqual,
        Err(_) => kv::CompareResult::Undefined,
    };
    let target = match (T::try_from(c.target), c.target_union) {
        (Ok(T::Version), Some(U::Version(v))) => kv::CompareTarget::Version(v),
        (Ok(T::Version), _) => kv::CompareTarget::Version(0),
        (Ok(T::Create), Some(U::CreateRevision(v))) => kv::CompareTarget::Create(v),
        (Ok(T::Create), _) => kv::CompareTarget::Create(0),
        (Ok(T::Mod), Some(U::ModRevision(v))) => kv::CompareTarget::Mod(v),
        (Ok(T::Mod), _) => kv::CompareTarget::Mod(0),
        (Ok(T::Value), Some(U::Value(v))) => kv::CompareTarget::Value(v),
        (Ok(T::Value), _) => kv::CompareTarget::Value(Vec::new()),
        (Ok(T::Lease), Some(U::Lease(v))) => kv::CompareTarget::Lease(v),
        (Ok(T::Lease), _) => kv::CompareTarget::Lease(0),
        (Err(_), _) => kv::CompareTarget::Undefined,
    };
    kv::Compare { result, target, key: c.key, range_end: c.range_end }
}

pub fn txn_in(t: pb::TxnRequest) -> Result<kv::TxnRequest, ApiError> {
    let ops = |ops: Vec<pb::RequestOp>| -> Result<Vec<kv::RequestOp>, ApiError> {
        ops.into_iter()
            .map(|op| {
                use pb::request_op::Request as Q;
                Ok(match op.request {
                    Some(Q::RequestRange(r)) => kv::RequestOp::Range(range_in(r)?),
                    Some(Q::RequestPut(p)) => kv::RequestOp::Put(put_in(p)),
                    Some(Q::RequestDeleteRange(d)) => kv::RequestOp::DeleteRange(delete_in(d)),
                    Some(Q::RequestTxn(t)) => kv::RequestOp::Txn(txn_in(t)?),
                    None => return Err(ApiError::InvalidArgument("empty txn operation".into())),
                })
            })
            .collect()
    };
    Ok(kv::TxnRequest {
        compare: t.compare.into_iter().map(compare_in).collect(),
        success: ops(t.success)?,
        failure: ops(t.failure)?,
    })
}

/// A Txn response with etcd's headers (its applier's `newTxnResp` and `applyTxn`): the outer
/// header is complete; a nested Txn's is empty (revision 0); the others carry only a revision:
/// a Range's is the revision it read at (the Txn's start revision, plus one once the Txn has
/// written), a Put's the Txn's write revision, a DeleteRange's the write revision if it deleted
/// something or the Txn had already written, else the start revision.
pub fn txn_out(t: kv::TxnResponse, header: &pb::ResponseHeader) -> pb::TxnResponse {
    fn writes(t: &kv::TxnResponse) -> bool {
        t.responses.iter().any(|r| match r {
            kv::ResponseOp::Range(_) => false,
            kv::ResponseOp::Put(_) => true,
            kv::ResponseOp::DeleteRange(d) => d.deleted > 0,
            kv::ResponseOp::Txn(t) => writes(t),
        })
    }
    fn inner(responses: Vec<kv::ResponseOp>, start: i64, written: &mut bool) -> Vec<pb::ResponseOp> {
        use pb::response_op::Response as S;
        let at = |revision| pb::ResponseHeader { revision, ..Default::default() };
        responses
            .into_iter()
            .map(|r| pb::ResponseOp {
                response: Some(match r {
                    kv::ResponseOp::Range(r) => S::ResponseRange(range_out(r, at(start + i64::from(*written)))),
                    kv::ResponseOp::Put(p) => {
                        *written = true;
                        S::ResponsePut(put_out(p, at(start + 1)))
                    }
                    kv::ResponseOp::DeleteRange(d) => {
                        *written |= d.deleted > 0;
                        S::ResponseDeleteRange(delete_out(d, at(start + i64::from(*written))))
                    }
                    kv::ResponseOp::Txn(t) => S::ResponseTxn(pb::TxnResponse {
                        header: Some(at(0)),
                        succeeded: t.succeeded,
                        responses: inner(t.responses, start, written),
                    }),
                }),
            })
            .collect()
    }
    let start = if writes(&t) { header.revision - 1 } else { header.revision };
    pb::TxnResponse { header: Some(*header), succeeded: t.succeeded, responses: inner(t.responses, start, &mut false) }
}

/// Whether a Txn only reads (and so may be served without going through the log).
pub fn txn_is_read_only(t: &kv::TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match op {
        kv::RequestOp::Range(_) => true,
        kv::RequestOp::Txn(inner) => txn_is_read_only(inner),
        kv::RequestOp::Put(_) | kv::RequestOp::DeleteRange(_) => false,
    })
}
