//! SIGKILL in the middle of a stream of acknowledged puts from several clients: after the
//! restart every acknowledged put is readable and revisions keep increasing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{client, rt, GeoNode};

#[test]
fn every_acknowledged_put_survives_sigkill() {
    let mut geo = GeoNode::start();
    sigkill_under_writers(&mut geo);
}

/// The same, once the node writes into WAL files that RocksDB reuses (overwriting an earlier
/// WAL's records, which recovery must tell from new ones): first enough data that several WALs
/// have retired and been taken up again.
#[test]
fn every_acknowledged_put_survives_sigkill_on_a_reused_wal() {
    let mut geo = GeoNode::start();
    let value = vec![b'w'; 64 * 1024];
    // Each put is written to the WAL twice: as a log entry and as the applied key.
    let puts = 3 * geolock_core::limits::WAL_BYTES_MAX as usize / value.len() / 2;
    rt().block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let (ep, value) = (geo.endpoint(), value.clone());
                tokio::spawn(async move {
                    let mut c = client(&ep).await;
                    for n in 0..puts / 8 {
                        c.put(format!("fill/{w}/{}", n % 4), value.clone(), None).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let rocksdb_log = std::fs::read_to_string(geo.dir.join("data/db/LOG")).unwrap();
    assert!(rocksdb_log.contains("from recycle list"), "no WAL was reused, so this would not test reuse");
    sigkill_under_writers(&mut geo);
}

/// SIGKILL `geo` while four clients put, restart it, and read back every acknowledged put.
fn sigkill_under_writers(geo: &mut GeoNode) {
    let ep = geo.endpoint();
    let acked: Arc<Mutex<Vec<(String, String, i64)>>> = Arc::default();
    let rt = rt();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let ep = ep.clone();
            let acked = acked.clone();
            rt.spawn(async move {
                let mut c = client(&ep).await;
                for n in 0..100_000u32 {
                    let (k, v) = (format!("crash/{w}/{n}"), format!("v{n}"));
                    match c.put(k.clone(), v.clone(), None).await {
                        Ok(r) => acked.lock().unwrap().push((k, v, r.header().unwrap().revision())),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    // Let the writers get going, then kill the node under them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 300 {
        assert!(std::time::Instant::now() < deadline, "writers made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    geo.proc.kill();
    rt.block_on(async {
        for w in writers {
            let _ = tokio::time::timeout(Duration::from_secs(30), w).await.expect("writer stops once the node is gone");
        }
    });
    let acked = acked.lock().unwrap().clone();
    geo.kill_and_restart();

    rt.block_on(async {
        let mut c = client(&geo.endpoint()).await;
        let mut max_rev = 0;
        for (k, v, rev) in &acked {
            let got = c.get(k.as_str(), None).await.unwrap();
            let kv = got.kvs().first().unwrap_or_else(|| panic!("acknowledged {k} lost"));
            assert_eq!(kv.value_str().unwrap(), v);
            assert_eq!(kv.mod_revision(), *rev, "{k} changed revision");
            max_rev = max_rev.max(*rev);
        }
        let after = c.put("crash/after", "x", None).await.unwrap();
        assert!(after.header().unwrap().revision() > max_rev, "revisions went backwards");
    });
    assert!(acked.len() >= 300);
}

/// After snapshots and log purges, a SIGKILLed node restarts from its snapshot plus the log
/// tail with nothing lost, and keeps serving.
#[test]
fn restart_after_snapshots_and_log_purges() {
    let mut geo = GeoNode::start_with(&["--snapshot-count", "200"]);
    let rt = rt();
    let last_rev = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let ep = geo.endpoint();
                tokio::spawn(async move {
                    let mut c = client(&ep).await;
                    let mut rev = 0;
                    for n in 0..300 {
                        rev = c
                            .put(format!("snap/{w}/{n}"), format!("{n}"), None)
                            .await
                            .unwrap()
                            .header()
                            .unwrap()
                            .revision();
                    }
                    rev
                })
            })
            .collect();
        let mut last = 0;
        for t in tasks {
            last = last.max(t.await.unwrap());
        }
        last
    });
    let snapshots = geo.dir.join("data/snapshots/current");
    assert!(snapshots.exists(), "no snapshot was taken after 2,400 entries with snapshot-count 200");
    geo.kill_and_restart();
    rt.block_on(async {
        let mut c = client(&geo.endpoint()).await;
        let all = c.get("snap/", Some(etcd_client::GetOptions::new().with_prefix().with_count_only())).await.unwrap();
        assert_eq!(all.count(), 2_400);
        let one = c.get("snap/7/299", None).await.unwrap();
        assert_eq!(one.kvs()[0].value_str().unwrap(), "299");
        let after = c.put("snap/after", "x", None).await.unwrap().header().unwrap().revision();
        assert!(after > last_rev);
    });
}
