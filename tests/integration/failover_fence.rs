//! FENCE on real members: `lockctl failover fence` records `fenced(epoch)` on each member it
//! names; a fenced member refuses writes with an error naming the epoch, ends its watch
//! streams, keeps refusing after SIGKILL and restart, and with a majority fenced the rest of the
//! old cluster cannot commit either.

use std::time::{Duration, Instant};

use crate::common::{client, etcdctl, lockctl, rt, Cluster};

const FENCED_1: &str = "geolock: this member was fenced by the failover to revision epoch 1";

/// `etcdctl put` on `endpoint`: its exit status and what it printed, both streams.
fn put(endpoint: &str, key: &str, value: &str) -> (bool, String) {
    crate::common::put_outcome(endpoint, key, value, "4s")
}

/// The value of `key` as member `endpoint` has applied it (a serializable read: no quorum needed).
fn local_value(endpoint: &str, key: &str) -> String {
    let out = etcdctl(endpoint, &["get", key, "--consistency=s", "--print-value-only"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_fenced_majority_refuses_writes_by_epoch_ends_watches_and_stays_fenced_after_sigkill() {
    let mut c = Cluster::start(3);
    let (e0, e1, e2) = (c.endpoint(0), c.endpoint(1), c.endpoint(2));
    assert!(put(&e2, "k", "before").0);
    // The member left unfenced leads, so its failed write below is Raft's refusal (fenced
    // followers take no entries), not a forwarded write refused by name.
    let out = lockctl(&["member", "--endpoints", &e2, "transfer-leadership", "n3"]);
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.leader() != 2 {
        assert!(Instant::now() < deadline, "n3 does not lead");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A watch open on member 1 when it is fenced ends with the fence's error.
    let watch_ended = rt().block_on(async {
        let mut cl = client(&e1).await;
        let mut stream = cl.watch("k", None).await.unwrap();
        let first = stream.message().await.unwrap().unwrap();
        assert!(first.created());
        let out = lockctl(&["failover", "fence", "--endpoints", &format!("{e0},{e1}"), "--epoch", "1"]);
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(printed.lines().filter(|l| l.contains("fenced by epoch 1, applied index")).count(), 2, "{printed}");
        assert!(printed.ends_with("a majority of every voter set is fenced: the old primary cannot commit again\n"));
        tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("the watch stream ended")
    });
    let Err(etcd_client::Error::GRpcStatus(status)) = watch_ended else { panic!("{watch_ended:?}") };
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().starts_with(FENCED_1), "{}", status.message());

    // The fenced members refuse writes by name; a new watch is refused too.
    for e in [&e0, &e1] {
        let (ok, out) = put(e, "k", "after");
        assert!(!ok && out.contains(FENCED_1), "{e}: {out}");
    }
    let refused = rt().block_on(async { client(&e0).await.watch("k", None).await.err() });
    assert!(refused.is_some_and(|e| e.to_string().contains(FENCED_1)));
    // The one member not fenced, the leader, cannot commit without them (its write times out,
    // or finds it stepped down for want of a quorum), and nothing changed anywhere.
    let (ok, out) = put(&e2, "k", "after");
    assert!(!ok, "{out}");
    for e in [&e0, &e1, &e2] {
        assert_eq!(local_value(e, "k"), "before", "{e}");
    }

    // SIGKILL and restart: still fenced, from its own disk.
    c.kill(0);
    c.respawn(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = put(&e0, "k", "after-restart");
        assert!(!ok, "a fenced member took a write after restart: {out}");
        if out.contains(FENCED_1) {
            break;
        }
        assert!(Instant::now() < deadline, "no fence error after restart: {out}\n{}", c.log(0));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.log(0).contains("fenced by the failover to revision epoch 1"), "{}", c.log(0));

    // Fencing again is idempotent; a higher epoch is recorded; epoch 0 is refused by name.
    for (epoch, want) in [("1", "fenced by epoch 1"), ("2", "fenced by epoch 2"), ("1", "fenced by epoch 2")] {
        let out = lockctl(&["failover", "fence", "--endpoints", &e0, "--epoch", epoch]);
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && printed.contains(want), "{out:?}");
        assert!(printed.ends_with("not a majority of the voters: the old primary may still commit\n"), "{printed}");
    }
    let out = lockctl(&["failover", "fence", "--endpoints", &e2, "--epoch", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a fence names the new primary's revision epoch, from 1 to"),
        "{err}"
    );
}
