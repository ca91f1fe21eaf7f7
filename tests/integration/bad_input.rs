//! Bad input gets a clear error naming what was wrong, and the node keeps serving.

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};

use crate::common::{client, rt, GeoNode};

async fn still_serving(c: &mut etcd_client::Client) {
    c.put("ok", "yes", None).await.expect("a good put after bad input");
    let got = c.get("ok", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"yes");
}

fn message(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

#[test]
fn bad_requests_get_clear_errors_and_the_node_keeps_serving() {
    let geo = GeoNode::start();
    rt().block_on(async {
        let mut c = client(&geo.endpoint()).await;

        // A value over request_bytes_max (1.5 MiB) but under the transport's limit.
        let big = vec![b'x'; 1_600_000];
        let e = message(c.put("big", big, None).await.unwrap_err());
        assert!(e.contains("request is too large") && e.contains("request_bytes_max"), "{e}");
        still_serving(&mut c).await;

        // A value over the transport's limit too.
        let huge = vec![b'x'; 3_000_000];
        let e = message(c.put("huge", huge, None).await.unwrap_err());
        assert!(e.contains("ResourceExhausted") || e.contains("too large"), "{e}");
        still_serving(&mut c).await;

        // A Txn over txn_ops_max.
        let ops: Vec<TxnOp> = (0..129).map(|i| TxnOp::put(format!("t{i}"), "v", None)).collect();
        let e = message(c.txn(Txn::new().and_then(ops)).await.unwrap_err());
        assert!(e.contains("too many operations in txn request") && e.contains("txn_ops_max 128"), "{e}");
        still_serving(&mut c).await;

        // Duplicate keys in one Txn branch.
        let dup = Txn::new()
            .when([Compare::version("ok", CompareOp::Greater, 0)])
            .and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]);
        let e = message(c.txn(dup).await.unwrap_err());
        assert!(e.contains("duplicate key"), "{e}");

        // A TTL over lease.max_ttl.
        let e = message(c.lease_grant(100_000, None).await.unwrap_err());
        assert!(e.contains("too large lease TTL") && e.contains("max_ttl 3600s"), "{e}");
        still_serving(&mut c).await;

        // A malformed range: no key.
        let e = message(c.get("", None).await.unwrap_err());
        assert!(e.contains("key is not provided"), "{e}");
        // A range at a future revision.
        let e = message(c.get("ok", Some(GetOptions::new().with_revision(1_000_000))).await.unwrap_err());
        assert!(e.contains("required revision is a future revision"), "{e}");
        still_serving(&mut c).await;

        // A key over key_bytes_max.
        let e = message(c.put(vec![b'k'; 40_000], "v", None).await.unwrap_err());
        assert!(e.contains("key is too large") && e.contains("key_bytes_max"), "{e}");
        still_serving(&mut c).await;

        // More watchers on one stream than watchers_per_stream_max.
        let mut ws = c.watch("w0", None).await.unwrap();
        let first = ws.message().await.unwrap().unwrap();
        assert!(first.created());
        for i in 1..1_000 {
            ws.watch(format!("w{i}"), None).await.unwrap();
        }
        let mut refused = None;
        ws.watch("one-too-many", None).await.unwrap();
        while let Some(resp) = ws.message().await.unwrap() {
            if resp.canceled() {
                refused = Some(resp.cancel_reason().to_string());
                break;
            }
        }
        let reason = refused.expect("the 1001st watcher was not refused");
        assert!(reason.contains("watchers_per_stream_max 1000"), "{reason}");
        drop(ws);
        still_serving(&mut c).await;

        // A watch on a compacted revision: canceled, with the compact revision.
        for i in 0..5 {
            c.put("w", format!("{i}"), None).await.unwrap();
        }
        let rev = c.get("w", None).await.unwrap().header().unwrap().revision();
        c.compact(rev, None).await.unwrap();
        let mut stream = c.watch("w", Some(WatchOptions::new().with_start_revision(2))).await.unwrap();
        let mut canceled = None;
        while let Some(resp) = stream.message().await.unwrap() {
            if resp.canceled() {
                canceled = Some(resp.compact_revision());
                break;
            }
        }
        assert_eq!(canceled, Some(rev));
        still_serving(&mut c).await;
    });
}
