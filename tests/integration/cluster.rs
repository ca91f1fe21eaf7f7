//! Multi-member clusters on loopback: replication over QUIC with mutual TLS, requests on any
//! member, a leader killed under load.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{client, etcdctl_ok, free_port, rt, wait_for_acks, Cluster};

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
fn killing_the_leader_of_three_under_load_loses_no_acknowledged_write() {
    kill_the_leader_under_load(3);
}

#[test]
fn killing_the_leader_of_five_under_load_loses_no_acknowledged_write() {
    kill_the_leader_under_load(5);
}

fn kill_the_leader_under_load(members: usize) {
    let mut c = Cluster::start(members);
    let endpoints: Vec<String> = (0..members).map(|i| c.endpoint(i)).collect();
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
                    let c = &mut clients[(n as usize + w) % members];
                    if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), c.put(key.clone(), "v", None)).await
                    {
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
    let wait_for = |count: usize| wait_for_acks(&acked, count);
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
        for i in 0..members {
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

#[test]
fn a_leader_stopped_with_sigterm_hands_over_first() {
    let mut c = Cluster::start(3);
    let old = c.leader();
    let log = c.nodes[old].proc.log.clone();
    c.stop(old);
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("handed leadership to"), "{text}");
    let new = c.leader();
    assert_ne!(new, old);
    etcdctl_ok(&c.endpoint(new), &["put", "after", "handover"]);
}

#[test]
fn peers_from_another_ca_or_outside_the_membership_are_refused_and_logged() {
    let c = Cluster::start(3);
    let lockctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockctl")).args(args).output().unwrap();
        assert!(out.status.success());
    };
    // A node claiming to be n3, with a certificate from another CA.
    let other = c.dir().join("other-ca");
    lockctl(&["certs", "init", "--dir", other.to_str().unwrap()]);
    lockctl(&["certs", "issue", "--dir", other.to_str().unwrap(), "--name", "n3", "--host", "127.0.0.1"]);
    let mut impostor =
        c.spawn_with("n3", &c.dir().join("impostor"), free_port(), free_port(), "new", &other, c.initial());
    // A node with a good certificate for a name that is not a member.
    let certs = c.dir().join("certs");
    lockctl(&["certs", "issue", "--dir", certs.to_str().unwrap(), "--name", "n9", "--host", "127.0.0.1"]);
    let n9_peer = free_port();
    let outsider_initial = format!("{},n9=http://127.0.0.1:{n9_peer}", c.initial());
    let mut outsider = c.spawn_with("n9", &c.dir().join("n9"), free_port(), n9_peer, "new", &certs, &outsider_initial);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs: String = (0..2).map(|i| c.log(i)).collect();
        let foreign = logs.contains("refused peer") && logs.contains("handshake failed");
        let stranger = logs.contains("names no current member");
        if foreign && stranger {
            break;
        }
        assert!(Instant::now() < deadline, "refusals not logged by n1/n2:\n{logs}\nimpostor:\n{}", impostor.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    impostor.kill();
    outsider.kill();
    // The cluster is unharmed.
    etcdctl_ok(&c.endpoints(), &["put", "still", "fine"]);
    assert_eq!(etcdctl_ok(&c.endpoint(0), &["member", "list"]).lines().count(), 3);
}
