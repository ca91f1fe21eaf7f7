//! `etcdctl watch` against geolock and etcd, with events written by another client.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{client, rt, Etcd, GeoNode};

/// Start `etcdctl watch`, write through the `etcd-client` crate, and return what the watch
/// printed once it printed `expect_lines` lines.
fn watch_output(endpoint: &str, args: &[&str], expect_lines: usize) -> String {
    let rt = rt();
    rt.block_on(async {
        let mut c = client(endpoint).await;
        c.put("cfg/a", "1", None).await.unwrap(); // rev 2
        c.put("cfg/b", "1", None).await.unwrap(); // rev 3
        c.put("other", "x", None).await.unwrap(); // rev 4
    });
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("watch.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut watcher = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("watch")
        .args(args)
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kill = scopeguard(move || {
        let _ = watcher.kill();
        let _ = watcher.wait();
    });
    std::thread::sleep(Duration::from_millis(500));
    rt.block_on(async {
        let mut c = client(endpoint).await;
        c.put("cfg/a", "2", None).await.unwrap(); // rev 5
        c.delete("cfg/b", None).await.unwrap(); // rev 6
        c.put("other", "y", None).await.unwrap(); // rev 7
        c.put("cfg/c", "3", None).await.unwrap(); // rev 8
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&out_path).unwrap();
        if text.lines().count() >= expect_lines {
            std::thread::sleep(Duration::from_millis(300)); // nothing more may follow
            drop(kill);
            return std::fs::read_to_string(&out_path).unwrap();
        }
        assert!(Instant::now() < deadline, "watch printed only:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct G<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for G<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    G(Some(f))
}

#[test]
fn etcdctl_watch_prefix_rev_prev_kv_sees_every_event_once_in_order() {
    let args = ["--prefix", "cfg/", "--rev", "3", "--prev-kv"];
    // rev 3 put cfg/b; rev 5 put cfg/a (prev 1); rev 6 delete cfg/b (prev); rev 8 put cfg/c.
    // Each event prints: type, key, value; with --prev-kv also the previous key and value.
    let etcd = Etcd::start();
    let want = watch_output(&etcd.endpoint(), &args, 16);
    let geo = GeoNode::start();
    let got = watch_output(&geo.endpoint(), &args, 16);
    assert_eq!(got, want);
    assert!(got.starts_with("PUT\ncfg/b\n1\nPUT\ncfg/a\n1\ncfg/a\n2\nDELETE\n"), "{got}");
}

/// Every event a watch from `from` delivers within half a second, as (kind, key, value, revision).
async fn events_from(c: &mut etcd_client::Client, prefix: &str, from: i64) -> Vec<(i32, String, String, i64)> {
    let opts = etcd_client::WatchOptions::new().with_prefix().with_start_revision(from);
    let mut stream = c.watch(prefix, Some(opts)).await.unwrap();
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(Some(resp))) = tokio::time::timeout_at(until, stream.message()).await {
        assert!(!resp.canceled(), "watch from {from} canceled: {}", resp.cancel_reason());
        for e in resp.events() {
            let kv = e.kv().unwrap();
            seen.push((
                e.event_type() as i32,
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
                kv.mod_revision(),
            ));
        }
    }
    seen
}

/// A watch (and a read) from exactly the compact revision sees what etcd's does: that
/// revision's put, both puts of a Txn at it, and no delete compacted at it; on a restarted node
/// and on a learner (which serves the watch from its own copy) as well.
#[test]
fn a_watch_from_exactly_the_compact_revision_sees_what_etcd_sees() {
    let mut geo = GeoNode::start();
    let etcd = Etcd::start();
    let rt = rt();
    // After each write at revision R: compact R (physically), then watch and read from R.
    type Seen = Vec<(i64, Vec<(i32, String, String, i64)>, Vec<(String, i64)>)>;
    let script = |endpoint: String| async move {
        let mut c = client(&endpoint).await;
        let mut seen: Seen = Vec::new();
        c.put("c/k", "a", None).await.unwrap();
        let ops = [etcd_client::TxnOp::put("c/t1", "x", None), etcd_client::TxnOp::put("c/t2", "y", None)];
        c.put("c/d", "1", None).await.unwrap();
        for step in 0..3 {
            let r = match step {
                0 => c.put("c/k", "b", None).await.unwrap().header().unwrap().revision(),
                1 => c.delete("c/d", None).await.unwrap().header().unwrap().revision(),
                _ => c.txn(etcd_client::Txn::new().and_then(ops.clone())).await.unwrap().header().unwrap().revision(),
            };
            // Physical: etcd removes compacted revisions in the background, and a watch that
            // raced it would see the delete at R or not, by chance.
            c.compact(r, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
            let events = events_from(&mut c, "c/", r).await;
            let opts = etcd_client::GetOptions::new().with_prefix().with_revision(r);
            let read = c.get("c/", Some(opts)).await.unwrap();
            seen.push((
                r,
                events,
                read.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.mod_revision())).collect(),
            ));
        }
        seen
    };
    let from_geo = rt.block_on(script(geo.endpoint()));
    let from_etcd = rt.block_on(script(etcd.endpoint()));
    assert_eq!(from_geo, from_etcd, "geolock (left) and etcd (right) differ at the compact revision");
    assert!(from_etcd.iter().any(|(_, events, _)| !events.is_empty()));
    let (last, events, _) = from_etcd.last().unwrap().clone();
    geo.kill_and_restart();
    let after = rt.block_on(async { events_from(&mut client(&geo.endpoint()).await, "c/", last).await });
    assert_eq!(after, events, "after a restart");
    // A learner: the writes go through the leader, the compaction is applied here before it is
    // acknowledged, and the watch and the read are served here.
    let mut cluster = crate::common::Cluster::start(1);
    let (learner, _) = cluster.add_learner("learner", 0);
    let from_learner = rt.block_on(script(cluster.endpoint(learner)));
    assert_eq!(from_learner, from_etcd, "a learner (left) and etcd (right) differ at the compact revision");
}
