//! Conversions between the wire messages and the state machine's own types. Enum values outside
//! etcd's ranges are refused here, before anything reaches Raft.

use super::errors::ApiError;
use super::proto::etcdserverpb as pb;
use super::proto::mvccpb;
use crate::kv;

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

fn bad(what: &str, v: i32) -> ApiError {
    ApiError::InvalidArgument(format!("invalid {what} {v}"))
}

pub fn range_in(r: pb::RangeRequest) -> Result<kv::RangeRequest, ApiError> {
    let sort_order = match pb::range_request::SortOrder::try_from(r.sort_order).map_err(|_| bad("sort_order", r.sort_order))? {
        pb::range_request::SortOrder::None => kv::SortOrder::None,
        pb::range_request::SortOrder::Ascend => kv::SortOrder::Ascend,
        pb::range_request::SortOrder::Descend => kv::SortOrder::Descend,
    };
    let sort_target =
        match pb::range_request::SortTarget::try_from(r.sort_target).map_err(|_| bad("sort_target", r.sort_target))? {
            pb::range_request::SortTarget::Key => kv::SortTarget::Key,
            pb::range_request::SortTarget::Version => kv::SortTarget::Version,
            pb::range_request::SortTarget::Create => kv::SortTarget::Create,
            pb::range_request::SortTarget::Mod => kv::SortTarget::Mod,
            pb::range_request::SortTarget::Value => kv::SortTarget::Value,
        };
    if r.key.is_empty() {
        return Err(kv::KvError::EmptyKey.into());
    }
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
    pb::RangeResponse { header: Some(header), kvs: r.kvs.into_iter().map(kv_out).collect(), more: r.more, count: r.count }
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
    pb::DeleteRangeResponse { header: Some(header), deleted: d.deleted, prev_kvs: d.prev_kvs.into_iter().map(kv_out).collect() }
}

fn compare_in(c: pb::Compare) -> Result<kv::Compare, ApiError> {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let result = match R::try_from(c.result).map_err(|_| bad("compare result", c.result))? {
        R::Equal => kv::CompareResult::Equal,
        R::Greater => kv::CompareResult::Greater,
        R::Less => kv::CompareResult::Less,
        R::NotEqual => kv::CompareResult::NotEqual,
    };
    let t = T::try_from(c.target).map_err(|_| bad("compare target", c.target))?;
    // A target whose union field is absent compares against zero / empty, as in etcd.
    let target = match (t, c.target_union) {
        (T::Version, Some(U::Version(v))) => kv::CompareTarget::Version(v),
        (T::Version, None) => kv::CompareTarget::Version(0),
        (T::Create, Some(U::CreateRevision(v))) => kv::CompareTarget::Create(v),
        (T::Create, None) => kv::CompareTarget::Create(0),
        (T::Mod, Some(U::ModRevision(v))) => kv::CompareTarget::Mod(v),
        (T::Mod, None) => kv::CompareTarget::Mod(0),
        (T::Value, Some(U::Value(v))) => kv::CompareTarget::Value(v),
        (T::Value, None) => kv::CompareTarget::Value(Vec::new()),
        (T::Lease, Some(U::Lease(v))) => kv::CompareTarget::Lease(v),
        (T::Lease, None) => kv::CompareTarget::Lease(0),
        (t, Some(_)) => {
            return Err(ApiError::InvalidArgument(format!("compare target {t:?} does not match the value given")))
        }
    };
    Ok(kv::Compare { result, target, key: c.key, range_end: c.range_end })
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
        compare: t.compare.into_iter().map(compare_in).collect::<Result<_, _>>()?,
        success: ops(t.success)?,
        failure: ops(t.failure)?,
    })
}

/// A Txn response. As in etcd, only the outer header is complete; the headers of the inner
/// responses carry just the revision.
pub fn txn_out(t: kv::TxnResponse, header: &pb::ResponseHeader) -> pb::TxnResponse {
    use pb::response_op::Response as S;
    let inner = pb::ResponseHeader { revision: header.revision, ..Default::default() };
    let responses = t
        .responses
        .into_iter()
        .map(|r| pb::ResponseOp {
            response: Some(match r {
                kv::ResponseOp::Range(r) => S::ResponseRange(range_out(r, inner)),
                kv::ResponseOp::Put(p) => S::ResponsePut(put_out(p, inner)),
                kv::ResponseOp::DeleteRange(d) => S::ResponseDeleteRange(delete_out(d, inner)),
                kv::ResponseOp::Txn(t) => S::ResponseTxn(txn_out(t, &inner)),
            }),
        })
        .collect();
    pb::TxnResponse { header: Some(*header), succeeded: t.succeeded, responses }
}

/// Whether a Txn only reads (and so may be served without going through the log).
pub fn txn_is_read_only(t: &kv::TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match op {
        kv::RequestOp::Range(_) => true,
        kv::RequestOp::Txn(inner) => txn_is_read_only(inner),
        kv::RequestOp::Put(_) | kv::RequestOp::DeleteRange(_) => false,
    })
}
