//! Locks and elections: native v3lock/v3election callers, `lockctl`, and etcdctl's recipes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, LockOptions};

use crate::common::{client, etcdctl_bg, lockctl_bg, rt, wait_lines, FencedResource, GeoNode};

/// How a contender takes the lock: returns (fencing token, key to unlock).
#[derive(Clone, Copy)]
enum LockKind {
    Native,
    /// A broken lock: reads the current revision as a "token" and never waits.
    Broken,
}

async fn take(c: &mut Client, kind: LockKind, name: &str, lease: i64) -> (i64, Vec<u8>) {
    match kind {
        LockKind::Native => {
            let key = c.lock(name, Some(LockOptions::new().with_lease(lease))).await.unwrap().key().to_vec();
            let token = c.get(key.clone(), None).await.unwrap().kvs()[0].create_revision();
            (token, key)
        }
        LockKind::Broken => {
            let rev = c.get("anything", None).await.unwrap().header().unwrap().revision();
            (rev, Vec::new())
        }
    }
}

/// `clients` contenders take the lock `rounds` times each and write to the resource.
async fn contend(endpoint: &str, kind: LockKind, clients: usize, rounds: usize) -> Arc<FencedResource> {
    let res = Arc::new(FencedResource::default());
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (res, endpoint) = (res.clone(), endpoint.to_string());
            tokio::spawn(async move {
                let mut c = client(&endpoint).await;
                let lease = c.lease_grant(30, None).await.unwrap().id();
                for _ in 0..rounds {
                    let (token, key) = take(&mut c, kind, "fenced", lease).await;
                    res.write(token).await;
                    if !key.is_empty() {
                        c.unlock(key).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    res
}

#[test]
fn contending_clients_never_overlap_and_tokens_strictly_increase() {
    let geo = GeoNode::start();
    let rt = rt();
    let res = rt.block_on(contend(&geo.endpoint(), LockKind::Native, 6, 15));
    assert_eq!(res.verdict(), Ok(90));
    // The same checker catches a lock that does not exclude.
    let broken = rt.block_on(contend(&geo.endpoint(), LockKind::Broken, 6, 15));
    assert!(broken.verdict().is_err(), "the checker failed to notice a broken lock");
}

#[test]
fn an_expired_holder_hands_the_lock_to_the_next_waiter() {
    let geo = GeoNode::start();
    rt().block_on(async {
        let mut a = client(&geo.endpoint()).await;
        let mut b = client(&geo.endpoint()).await;
        // Timed from before the grant: the lease's TTL cannot start earlier than that.
        let held = Instant::now();
        let la = a.lease_grant(5, None).await.unwrap().id(); // never kept alive
        let lb = b.lease_grant(60, None).await.unwrap().id();
        let ka = a.lock("expiring", Some(LockOptions::new().with_lease(la))).await.unwrap().key().to_vec();
        let kb = b.lock("expiring", Some(LockOptions::new().with_lease(lb))).await.unwrap().key().to_vec();
        let waited = held.elapsed();
        assert!(waited >= Duration::from_secs(5), "handed over after {waited:?}, before the TTL");
        assert!(waited < Duration::from_secs(12), "handed over only after {waited:?}");
        assert!(a.get(ka, None).await.unwrap().kvs().is_empty());
        let tb = b.get(kb, None).await.unwrap().kvs()[0].create_revision();
        assert!(tb > 0);
    });
}

#[test]
fn a_killed_waiter_loses_its_place() {
    let geo = GeoNode::start();
    let dir = tempfile::tempdir().unwrap();
    let ep = geo.endpoint();
    let mut holder = lockctl_bg(&ep, &["lock", "queue"], &dir.path().join("a"));
    let a = wait_lines(&dir.path().join("a"), 2, Duration::from_secs(20));
    assert!(a.starts_with("queue/") && a.contains("fencing token"), "{a}");
    let mut killed = lockctl_bg(&ep, &["lock", "--ttl", "5", "queue"], &dir.path().join("b"));
    std::thread::sleep(Duration::from_millis(500));
    killed.kill();
    let mut next = lockctl_bg(&ep, &["lock", "queue"], &dir.path().join("c"));
    std::thread::sleep(Duration::from_millis(500));
    holder.terminate(Duration::from_secs(10));
    let c = wait_lines(&dir.path().join("c"), 2, Duration::from_secs(20));
    let token = |out: &str| out.lines().nth(1).unwrap().trim_start_matches("fencing token ").parse::<i64>().unwrap();
    assert!(token(&c) > token(&a));
    // Only the new holder's key is left.
    rt().block_on(async {
        let mut cl = client(&ep).await;
        let keys = cl.get("queue/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(keys.kvs().len(), 1, "{:?}", keys.kvs());
        assert_eq!(keys.kvs()[0].key_str().unwrap(), c.lines().next().unwrap());
    });
    next.terminate(Duration::from_secs(10));
}

#[test]
fn etcdctl_lock_and_native_lock_exclude_each_other() {
    let geo = GeoNode::start();
    let ep = geo.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    // etcdctl holds; a native Lock waits until etcdctl lets go.
    let mut e = etcdctl_bg(&ep, &["lock", "shared"], &dir.path().join("etcdctl"));
    let ekey = wait_lines(&dir.path().join("etcdctl"), 1, Duration::from_secs(20));
    assert!(ekey.starts_with("shared/"), "{ekey}");
    let acquired = Arc::new(AtomicBool::new(false));
    let native = {
        let (ep, acquired) = (ep.clone(), acquired.clone());
        rt.spawn(async move {
            let mut c = client(&ep).await;
            let lease = c.lease_grant(60, None).await.unwrap().id();
            let key = c.lock("shared", Some(LockOptions::new().with_lease(lease))).await.unwrap().key().to_vec();
            acquired.store(true, Ordering::SeqCst);
            (c, key)
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    assert!(!acquired.load(Ordering::SeqCst), "native Lock got a lock etcdctl holds");
    e.terminate(Duration::from_secs(10));
    let (mut c, key) =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), native).await.unwrap().unwrap() });
    assert!(acquired.load(Ordering::SeqCst));

    // The native caller holds; etcdctl waits until it unlocks.
    let mut e2 = etcdctl_bg(&ep, &["lock", "shared"], &dir.path().join("etcdctl2"));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(std::fs::read_to_string(dir.path().join("etcdctl2")).unwrap(), "", "etcdctl got a held lock");
    rt.block_on(async { c.unlock(key).await.unwrap() });
    let k2 = wait_lines(&dir.path().join("etcdctl2"), 1, Duration::from_secs(20));
    assert!(k2.starts_with("shared/"), "{k2}");
    e2.terminate(Duration::from_secs(10));
}

#[test]
fn etcdctl_elect_and_native_campaign_see_each_other() {
    let geo = GeoNode::start();
    let ep = geo.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    // A native leader, observed by `etcdctl elect -l`.
    let mut observer = etcdctl_bg(&ep, &["elect", "-l", "chair"], &dir.path().join("observe"));
    let (mut c, leader) = rt.block_on(async {
        let mut c = client(&ep).await;
        let lease = c.lease_grant(60, None).await.unwrap().id();
        let r = c.campaign("chair", "native-1", lease).await.unwrap();
        (c, r.leader().unwrap().clone())
    });
    let seen = wait_lines(&dir.path().join("observe"), 2, Duration::from_secs(20));
    assert!(seen.lines().nth(1) == Some("native-1"), "{seen}");
    observer.terminate(Duration::from_secs(5));
    rt.block_on(async {
        c.resign(Some(etcd_client::ResignOptions::new().with_leader(leader))).await.unwrap();
    });

    // An etcdctl leader, seen by a native Leader call and by `lockctl elect` (observe).
    let mut e = etcdctl_bg(&ep, &["elect", "chair", "etcdctl-1"], &dir.path().join("elect"));
    wait_lines(&dir.path().join("elect"), 2, Duration::from_secs(20));
    rt.block_on(async {
        let l = c.leader("chair").await.unwrap();
        assert_eq!(l.kv().unwrap().value_str().unwrap(), "etcdctl-1");
    });
    let mut lobs = lockctl_bg(&ep, &["elect", "chair"], &dir.path().join("lockctl-observe"));
    let seen = wait_lines(&dir.path().join("lockctl-observe"), 2, Duration::from_secs(20));
    assert_eq!(seen.lines().nth(1), Some("etcdctl-1"), "{seen}");
    lobs.kill();
    e.terminate(Duration::from_secs(10));
}

#[test]
fn hierarchical_locks_need_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("geolock.yaml");
    std::fs::write(&cfg, "lock:\n  hierarchical_prefixes: [\"/db/\"]\n").unwrap();
    let geo = GeoNode::start_with(&["--config", cfg.to_str().unwrap()]);
    rt().block_on(async {
        let mut c = client(&geo.endpoint()).await;
        let lease = c.lease_grant(60, None).await.unwrap().id();
        let opts = || Some(LockOptions::new().with_lease(lease));
        let err = c.lock("/db/users/42", opts()).await.unwrap_err();
        let etcd_client::Error::GRpcStatus(s) = err else { panic!("{err:?}") };
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("parent lock /db/users held"), "{}", s.message());
        c.lock("/db/users", opts()).await.unwrap();
        let child = c.lock("/db/users/42", opts()).await.unwrap();
        assert!(child.key().starts_with(b"/db/users/42/"));
        // Names outside the hierarchical prefixes need nothing.
        c.lock("/free/a/b", opts()).await.unwrap();
    });
}

#[test]
fn a_lease_is_not_expired_early_across_a_restart() {
    let mut geo = GeoNode::start();
    let rt = rt();
    let lease = rt.block_on(async {
        let mut c = client(&geo.endpoint()).await;
        let lease = c.lease_grant(8, None).await.unwrap().id();
        c.put("kept", "v", Some(etcd_client::PutOptions::new().with_lease(lease))).await.unwrap();
        lease
    });
    let last_keepalive = Instant::now();
    geo.kill_and_restart();
    rt.block_on(async {
        let mut c = client(&geo.endpoint()).await;
        // Until TTL after the last acknowledged keep-alive (the grant), the key must be there.
        while last_keepalive.elapsed() < Duration::from_millis(7_500) {
            assert_eq!(c.get("kept", None).await.unwrap().kvs().len(), 1, "expired early");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // And it does expire eventually.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.get("kept", None).await.unwrap().kvs().is_empty() {
            assert!(Instant::now() < deadline, "lease {lease:x} never expired");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

/// `lockctl lock` hands out the lock key's create revision as the fencing token, to its output
/// and to COMMAND, from geolock (which sends the token with the grant) and from a real etcd
/// (which does not: `lockctl` reads the key at the grant's revision) alike: at revision
/// `token`, the key exists with that create revision.
#[test]
fn lockctl_hands_out_the_keys_create_revision_as_the_token_from_geolock_and_from_etcd() {
    let geo = GeoNode::start();
    let etcd = crate::common::Etcd::start();
    for endpoint in [geo.endpoint(), etcd.endpoint()] {
        crate::common::etcdctl_ok(&endpoint, &["put", "before", "x"]);
        let (out, _) = crate::common::lockctl_ok(&[
            "lock",
            "--endpoints",
            &endpoint,
            "--ttl",
            "10",
            "tok",
            "sh",
            "-c",
            "echo env $LOCKCTL_FENCING_TOKEN $ETCD_LOCK_REV",
        ]);
        let lines: Vec<&str> = out.lines().collect();
        let key = lines[0];
        let token: i64 =
            lines[1].strip_prefix("fencing token ").and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{out}"));
        assert!(token > 0, "{endpoint}: token {token}");
        assert_eq!(lines[2], format!("env {token} {token}"), "{endpoint}: {out}");
        let json = crate::common::etcdctl_ok(&endpoint, &["get", key, &format!("--rev={token}"), "-w", "json"]);
        let got: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(got["kvs"][0]["create_revision"].as_i64(), Some(token), "{endpoint}: {json}");
    }
}
