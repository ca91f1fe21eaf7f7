//! Multi-member clusters on loopback: replication over QUIC with mutual TLS, requests on any
//! member, a leader killed under load.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{client, etcdctl_ok, rt, Cluster};

#[test]
fn three_voters_replicate_and_serve_on_every_member() {
    let c = Cluster::start(3);
    // A write through each member (followers forward to the leader).
    for i in 0..3 {
        etcdctl_ok(&c.endpoint(i), &["put", &format!("k{i}"), &format!("from-n{}", i + 1)]);
    }
    // Every member reads every write, linearizably and serializably.
    for i in 0..3 {
        let lin = etcdctl_ok(&c.endpoint(i), &["get", "k", "--prefix", "--print-value-only"]);
        assert_eq!(lin, "from-n1\nfrom-n2\nfrom-n3\n", "member {i}");
        let ser = etcdctl_ok(&c.endpoint(i), &["get", "k", "--prefix", "--print-value-only", "--consistency=s"]);
        assert_eq!(ser, lin, "member {i}");
    }
    // etcdctl given every endpoint.
    etcdctl_ok(&c.endpoints(), &["put", "all", "endpoints"]);
    assert_eq!(etcdctl_ok(&c.endpoints(), &["get", "all", "--print-value-only"]), "endpoints\n");
    let members = etcdctl_ok(&c.endpoint(0), &["member", "list"]);
    assert_eq!(members.lines().count(), 3, "{members}");
    // Leases work through followers too.
    let l = etcdctl_ok(&c.endpoint(1), &["lease", "grant", "30"]);
    let id = l.split_whitespace().nth(1).unwrap();
    let ka = etcdctl_ok(&c.endpoint(2), &["lease", "keep-alive", "--once", id]);
    assert!(ka.contains("keepalived with TTL(30)"), "{ka}");
}

#[test]
fn killing_the_leader_under_load_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3);
    let endpoints: Vec<String> = (0..3).map(|i| c.endpoint(i)).collect();
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rt = rt();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (endpoints, acked, stop) = (endpoints.clone(), acked.clone(), stop.clone());
            rt.spawn(async move {
                let mut clients = Vec::new();
                for ep in &endpoints {
                    clients.push(client(ep).await);
                }
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("load/{w}/{n}");
                    // Try members in turn until one acknowledges.
                    let c = &mut clients[(n as usize + w) % 3];
                    if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), c.put(key.clone(), "v", None)).await {
                        acked.lock().unwrap().push((key, r.header().unwrap().revision()));
                        n += 1;
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        n += 1;
                    }
                }
            })
        })
        .collect();
    let wait_for = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < count {
            assert!(Instant::now() < deadline, "writes stalled at {}", acked.lock().unwrap().len());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(200);
    let old = c.leader();
    c.kill(old);
    let killed_at = acked.lock().unwrap().len();
    wait_for(killed_at + 200);
    let new = c.leader();
    assert_ne!(new, old);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for w in writers {
            w.await.unwrap();
        }
    });
    c.restart(old);
    let acked = acked.lock().unwrap().clone();
    rt.block_on(async {
        for i in 0..3 {
            let mut cl = client(&c.endpoint(i)).await;
            for (key, rev) in &acked {
                let got = cl.get(key.as_str(), None).await.unwrap();
                let kv = got.kvs().first().unwrap_or_else(|| panic!("acknowledged {key} missing on member {i}"));
                assert_eq!(kv.mod_revision(), *rev, "{key} on member {i}");
            }
        }
    });
    // Revisions were handed out strictly increasing and never twice.
    let mut revs: Vec<i64> = acked.iter().map(|(_, r)| *r).collect();
    revs.sort();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "a revision was acknowledged twice");
}
