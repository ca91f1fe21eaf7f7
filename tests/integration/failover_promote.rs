//! PROMOTE on real members: with every voter of the primary SIGKILLed, `lockctl failover
//! promote` makes its learner the only voter of a new cluster, in revision epoch 1, from the
//! state it applied: the data is there, revisions and fencing tokens jump past every earlier
//! one, history before the epoch reads as compacted, and it stays the new cluster after SIGKILL.

use std::time::{Duration, Instant};

use crate::common::{client, etcdctl, lockctl, rt, Cluster};

/// `etcdctl -w json` output of `args` on `endpoint`, or `None` if it failed.
fn json(endpoint: &str, args: &[&str]) -> Option<serde_json::Value> {
    let mut all = vec!["--command-timeout=3s", "-w", "json"];
    all.extend_from_slice(args);
    let out = etcdctl(endpoint, &all, None);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The cluster ID `endpoint` answers with.
fn cluster_id(endpoint: &str) -> u64 {
    json(endpoint, &["endpoint", "status"]).unwrap()[0]["Status"]["header"]["cluster_id"].as_u64().unwrap()
}

/// Poll `f` every 200 ms for up to 30 s.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Take lock `name` on `endpoint` under a fresh 60 s lease; returns its fencing token.
fn lock_token(endpoint: &str, name: &str) -> i64 {
    rt().block_on(async {
        let mut c = client(endpoint).await;
        let lease = c.lease_grant(60, None).await.unwrap().id();
        let key = c.lock(name, Some(etcd_client::LockOptions::new().with_lease(lease))).await.unwrap();
        let kv = c.get(key.key(), None).await.unwrap();
        kv.kvs()[0].create_revision()
    })
}

#[test]
fn a_learner_promoted_after_its_voters_are_killed_serves_its_data_in_a_new_cluster_and_epoch() {
    let mut c = Cluster::start(3);
    let (l, _) = c.add_learner("l1", 0);
    let (voter, learner) = (c.endpoint(0), c.endpoint(l));
    for (k, v) in [("a", "1"), ("b", "2")] {
        assert!(json(&voter, &["put", k, v]).is_some());
    }
    let old_token = lock_token(&voter, "job");
    let old_cluster = cluster_id(&voter);
    // The learner has applied everything (its serializable reads show the lock key).
    eventually("the learner catches up", || {
        let r = json(&learner, &["get", "job/", "--prefix", "--consistency=s"])?;
        (r["count"].as_i64() == Some(1)).then_some(())
    });
    // Refused, by name: a voter, an epoch not above the key space's.
    for (endpoint, epoch, why) in [
        (
            &voter,
            "1",
            "geolock: this member cannot seed the new primary: only a learner of the lost primary seeds the new one",
        ),
        (&learner, "0", "geolock: revision epoch 0 does not come after the current epoch 0"),
        (&learner, "9000000", "geolock: revision epoch 9000000 is above the highest, 8388607"),
    ] {
        let out = lockctl(&["failover", "promote", "--endpoints", endpoint, "--epoch", epoch]);
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(why), "{out:?}");
    }
    for i in 0..3 {
        c.kill(i);
    }

    let out = lockctl(&["failover", "promote", "--endpoints", &learner, "--epoch", "1"]);
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains("in revision epoch 1 from applied index"), "{printed}");

    // The first write of the new cluster is the first revision of epoch 1.
    let put = eventually("the promoted learner takes writes", || json(&learner, &["put", "c", "3"]));
    assert_eq!(put["header"]["revision"].as_i64(), Some((1 << 40) + 1), "{put}");
    let new_cluster = cluster_id(&learner);
    assert_ne!(new_cluster, old_cluster);
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "3")] {
        let out = etcdctl(&learner, &["get", k, "--print-value-only"], None);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), v, "{k}");
    }
    // History from before the epoch is compacted away: a client re-reads.
    let old = etcdctl(&learner, &["get", "a", "--rev=2"], None);
    assert!(String::from_utf8_lossy(&old.stderr).contains("required revision has been compacted"), "{old:?}");
    // A lock taken now is fenced by a token above every one handed out before.
    let new_token = lock_token(&learner, "job2");
    assert!(new_token > old_token && new_token > 1 << 40, "{new_token} after {old_token}");
    let members = etcdctl(&learner, &["member", "list"], None);
    let members = String::from_utf8_lossy(&members.stdout).into_owned();
    assert_eq!(members.lines().count(), 1, "{members}");
    assert!(members.contains(", l1, ") && members.trim_end().ends_with("false"), "{members}");
    let again = lockctl(&["failover", "promote", "--endpoints", &learner, "--epoch", "2"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("only a learner"), "{again:?}");

    // SIGKILL and restart with the flags it first had: still the new cluster, still epoch 1.
    c.kill(l);
    c.respawn(l);
    let put = eventually("the restarted member takes writes", || json(&learner, &["put", "d", "4"]));
    let rev = put["header"]["revision"].as_i64().unwrap();
    assert!(rev > (1 << 40) + 1 && rev < 2 << 40, "{put}");
    assert_eq!(cluster_id(&learner), new_cluster);
}
