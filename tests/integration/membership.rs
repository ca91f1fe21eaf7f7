//! Membership changes on a running cluster: a member added after the log was purged catches up
//! by snapshot and is promoted; members removed; leadership moved on request; every member
//! restarted in turn under a client load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{client, etcdctl, etcdctl_ok, lockctl, lockctl_ok, rt, wait_for_acks, Cluster};

/// Puts `count` keys `{prefix}{i}` through `endpoint`, 8 at a time.
fn put_many(endpoint: &str, prefix: &str, count: usize) {
    rt().block_on(async {
        let mut tasks = Vec::new();
        for w in 0..8 {
            let (endpoint, prefix) = (endpoint.to_string(), prefix.to_string());
            tasks.push(tokio::spawn(async move {
                let mut c = client(&endpoint).await;
                for i in (w..count).step_by(8) {
                    c.put(format!("{prefix}{i:05}"), "x".repeat(64), None).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// Member `i`'s applied key count under `prefix`, read locally (serializable).
fn local_count(c: &Cluster, i: usize, prefix: &str) -> Option<usize> {
    let out = etcdctl(&c.endpoint(i), &["get", prefix, "--prefix", "--limit=1", "--consistency=s", "-w", "json"], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["count"].as_u64().unwrap_or(0) as usize)
}

/// Lines of `etcdctl member list` as (name, is_learner).
fn member_list(endpoint: &str) -> Vec<(String, bool)> {
    etcdctl_ok(endpoint, &["member", "list"])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(", ").collect();
            (f[2].to_string(), f[5] == "true")
        })
        .collect()
}

#[test]
fn a_member_added_after_the_log_was_purged_catches_up_by_snapshot_and_is_promoted() {
    // Snapshots every 200 entries; the log behind a snapshot is purged once 1,000 more are kept,
    // so after 2,000 puts the start of the log is gone and only a snapshot can bring n4 level.
    let mut c = Cluster::start_with(3, &["--snapshot-count", "200"]);
    put_many(&c.endpoint(0), "data/", 2_000);
    let leader = c.leader();
    let follower = (leader + 1) % 3;

    // Added through a follower, which forwards the change to the leader.
    let (i, added) = c.add_learner("n4", follower);
    assert!(added.contains("added to cluster"), "{added}");
    assert!(added.contains("GEOLOCK_INITIAL_CLUSTER_STATE=\"existing\""), "{added}");
    assert!(member_list(&c.endpoint(0)).contains(&("n4".to_string(), true)));

    let deadline = Instant::now() + Duration::from_secs(60);
    while local_count(&c, i, "data/") != Some(2_000) {
        assert!(Instant::now() < deadline, "n4 did not catch up: {:?}\n{}", local_count(&c, i, "data/"), c.log(i));
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = c.log(i);
    assert!(log.contains("installing a snapshot"), "n4 caught up without a snapshot:\n{log}");

    // Caught up, it can be promoted; four voters draw the even-count warning.
    let (out, warning) = lockctl_ok(&["member", "promote", "n4", "--endpoints", &c.endpoint(leader)]);
    assert!(out.contains("promoted"), "{out}");
    assert!(warning.contains("4 voters"), "{warning}");
    let members = member_list(&c.endpoint(i));
    assert_eq!(members.len(), 4, "{members:?}");
    assert!(members.iter().all(|(_, learner)| !learner), "{members:?}");
    // Every member, n4 included, has published its client URL.
    let listed = etcdctl_ok(&c.endpoint(0), &["member", "list"]);
    assert!(listed.lines().all(|l| l.split(", ").nth(4).is_some_and(|u| u.starts_with("http://"))), "{listed}");
    assert!(listed.contains(&format!("127.0.0.1:{}", c.nodes[i].client_port)), "{listed}");

    // n4 serves writes and linearizable reads, and the others see its writes.
    etcdctl_ok(&c.endpoint(i), &["put", "from-n4", "hello"]);
    assert_eq!(etcdctl_ok(&c.endpoint(0), &["get", "from-n4", "--print-value-only"]), "hello\n");
    assert_eq!(etcdctl_ok(&c.endpoint(i), &["get", "data/01999", "--print-value-only"]).trim(), "x".repeat(64));
}

#[test]
fn a_learner_that_has_not_caught_up_cannot_be_promoted() {
    let c = Cluster::start(3);
    let out = lockctl(&[
        "member",
        "add",
        "n4",
        "--peer-urls",
        "http://127.0.0.1:9",
        "--learner",
        "--endpoints",
        &c.endpoint(0),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // n4 was never started, so it holds nothing.
    let out = lockctl(&["member", "promote", "n4", "--endpoints", &c.endpoint(1)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("can only promote a learner member which is in sync with leader"), "{err}");
    // A peer URL already in use, and a name not in the cluster, are refused too.
    let taken = format!("http://127.0.0.1:{}", c.nodes[1].peer_port);
    let out = lockctl(&["member", "add", "n5", "--peer-urls", &taken, "--endpoints", &c.endpoint(0)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Peer URLs already exists"), "{out:?}");
    let out = lockctl(&["member", "remove", "n9", "--endpoints", &c.endpoint(0)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no member named n9"), "{out:?}");
    // etcdctl's MemberAdd carries no name: a clear refusal that says what to use instead.
    let out = etcdctl(&c.endpoint(0), &["member", "add", "n6", "--peer-urls=http://127.0.0.1:10"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("lockctl member add NAME"), "{out:?}");
    // The learner is removed again; the cluster goes on.
    lockctl_ok(&["member", "remove", "n4", "--endpoints", &c.endpoint(2)]);
    assert_eq!(member_list(&c.endpoint(0)).len(), 3);
    etcdctl_ok(&c.endpoints(), &["put", "still", "fine"]);
}

#[test]
fn leadership_moves_on_request_and_a_removed_leader_leaves_the_cluster_serving() {
    let mut c = Cluster::start(3);
    let first = c.leader();
    let target = (first + 1) % 3;
    let (out, _) = lockctl_ok(&[
        "member",
        "transfer-leadership",
        &c.nodes[target].name.clone(),
        "--endpoints",
        &c.endpoint(first),
    ]);
    assert!(out.contains("Leadership transferred"), "{out}");
    assert_eq!(c.leader(), target);

    // etcdctl move-leader, which finds the leader among the endpoints itself. One context of
    // `--command-timeout` covers its connecting to each endpoint, asking each for its status and
    // the transfer; the default 5 s ran out twice in a loaded full run, while the server's own
    // wait for the transfer is 5 s plus two election timeouts, as etcd's.
    let next = (target + 1) % 3;
    let id = etcdctl_ok(&c.endpoint(next), &["endpoint", "status", "-w", "json"]);
    let id: serde_json::Value = serde_json::from_str(&id).unwrap();
    let id = format!("{:x}", id[0]["Status"]["header"]["member_id"].as_u64().unwrap());
    let moved = etcdctl_ok(&c.endpoints(), &["--command-timeout=20s", "move-leader", &id]);
    assert!(moved.contains("Leadership transferred"), "{moved}");
    assert_eq!(c.leader(), next);

    // Remove the leader itself: it steps down, the other two elect a leader and serve.
    let leader_name = c.nodes[next].name.clone();
    lockctl_ok(&["member", "remove", &leader_name, "--endpoints", &c.endpoint(next)]);
    c.stop(next);
    let rest: Vec<String> = (0..3).filter(|i| *i != next).map(|i| c.endpoint(i)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(&rest.join(","), &["put", "after-removal", "ok"], None);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "no write after the leader's removal: {out:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for ep in &rest {
        let members = member_list(ep);
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(!members.iter().any(|(n, _)| *n == leader_name));
        assert_eq!(etcdctl_ok(ep, &["get", "after-removal", "--print-value-only"]), "ok\n");
    }
}

#[test]
fn every_member_restarted_in_turn_under_load_fails_no_client_operation() {
    let mut c = Cluster::start(3);
    let endpoints: Vec<String> = (0..3).map(|i| c.endpoint(i)).collect();
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let rt = rt();
    // Each writer works through one member and, like a client given every endpoint, moves to
    // the next when its member does not answer: up to 40 tries, 250 ms apart, per operation.
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (endpoints, acked, failed, stop) = (endpoints.clone(), acked.clone(), failed.clone(), stop.clone());
            rt.spawn(async move {
                let mut n = 0u64;
                let mut at = w;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("roll/{w}/{n}");
                    let mut done = false;
                    for _ in 0..40 {
                        let attempt = async {
                            let mut cl = etcd_client::Client::connect(
                                [endpoints[at].as_str()],
                                Some(etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(1))),
                            )
                            .await?;
                            cl.put(key.clone(), "v", None).await
                        };
                        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
                            Ok(Ok(r)) => {
                                acked.lock().unwrap().push((key.clone(), r.header().unwrap().revision()));
                                done = true;
                                break;
                            }
                            _ => {
                                at = (at + 1) % endpoints.len();
                                tokio::time::sleep(Duration::from_millis(250)).await;
                            }
                        }
                    }
                    if !done {
                        failed.lock().unwrap().push(key);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let wait_for_more = |n: usize| {
        let target = acked.lock().unwrap().len() + n;
        wait_for_acks(&acked, target);
    };
    wait_for_more(50);
    // Followers first, the leader last, as the spec's upgrade procedure does.
    let leader = c.leader();
    let order: Vec<usize> = (0..3).filter(|i| *i != leader).chain([leader]).collect();
    for i in order {
        c.stop(i);
        wait_for_more(20);
        c.restart(i);
        wait_for_more(50);
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for w in writers {
            w.await.unwrap();
        }
    });
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "operations that failed every retry: {failed:?}");
    let acked = acked.lock().unwrap().clone();
    rt.block_on(async {
        let mut cl = client(&c.endpoint(0)).await;
        for (key, rev) in &acked {
            let got = cl.get(key.as_str(), None).await.unwrap();
            let kv = got.kvs().first().unwrap_or_else(|| panic!("acknowledged {key} missing"));
            assert_eq!(kv.mod_revision(), *rev, "{key}");
        }
    });
}
