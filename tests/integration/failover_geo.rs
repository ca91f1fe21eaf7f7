//! The active-passive topology (`regions/active-passive.yaml`) through the harness: each region
//! in a network namespace when run as root, the topology's latency on every peer link and on
//! the vantage points' traffic, BIND9 beside the standby, the arbiter in europe and the
//! controller in us-west. The primary region is lost whole (its members SIGKILLed, its link
//! down); the controller fails over into epoch 1, makes the three standby members the new
//! primary's voters, and moves the clients' name, through which a client then writes. Prints the RTO
//! with the controller's per-step timeline, and the RPO next to the replication lag the primary
//! reported just before the loss.

use std::path::Path;
use std::time::{Duration, Instant};

use geolock_testkit::topology::{Role, Topology};

use crate::common::{dig, etcdctl, lockctl, put_outcome, rt};
use crate::geo::Geo;

fn active_passive() -> Topology {
    Topology::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../regions/active-passive.yaml")).unwrap()
}

/// The value of `key` as member `endpoint` has applied it.
fn local_value(endpoint: &str, key: &str) -> String {
    let out = etcdctl(endpoint, &["get", key, "--consistency=s", "--print-value-only"], None);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn losing_the_primary_region_fails_over_to_the_standby_and_moves_the_clients_name() {
    let rt = rt();
    let mut g = Geo::start(&rt, active_passive(), &[]);
    let primary = g.c.voter_endpoints();
    let journal = g.c.failover.as_ref().unwrap().journal.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&journal).unwrap_or_default().contains("\"Armed\"") {
        assert!(Instant::now() < deadline, "the controller never saw the primary healthy");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Writes acknowledged by the primary (commits within us-east), the last just before the loss;
    // each tried until acknowledged (a loaded machine can make one wait past its lease renewal).
    let acked: Vec<String> = (0..30)
        .map(|i| format!("ap/{i:03}"))
        .filter(|key| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !put_outcome(&primary, key, "v", "3s").0 {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            true
        })
        .collect();
    assert_eq!(acked.len(), 30, "the primary refused writes for 20 s before the loss");
    let members = lockctl(&["member", "list", "--endpoints", &primary]);
    let lag: Vec<String> = String::from_utf8_lossy(&members.stdout)
        .lines()
        .filter(|l| l.contains(", learner, us-west,"))
        .map(|l| l.rsplit(", ").next().unwrap_or_default().to_string())
        .collect();

    let lost = Instant::now();
    g.c.drop_region("us-east").unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let failover = loop {
        let f = g.c.failover.as_mut().unwrap();
        if let Some(status) = f.controller_exit() {
            let log = std::fs::read_to_string(&f.controller_log).unwrap_or_default();
            assert!(status.success() && log.contains("failed over into revision epoch 1"), "{log}");
            break f;
        }
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(&f.controller_log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    };
    let rto = lost.elapsed();

    // The clients' name now resolves to the standby region, as BIND9 answers it: each SRV
    // record's host to its A record, with the record's port.
    let mut standby_ips: Vec<String> =
        g.c.nodes
            .iter()
            .filter(|n| n.role == Role::Learner && n.region == "us-west")
            .map(|n| n.client.ip().to_string())
            .collect();
    standby_ips.sort();
    assert_eq!(dig(&failover.dns, &failover.client_name, "A"), standby_ips);
    let resolved: Vec<String> = dig(&failover.dns, &format!("_etcd-client._tcp.{}", failover.client_name), "SRV")
        .iter()
        .map(|srv| {
            let [_, _, port, host] = srv.split(' ').collect::<Vec<_>>()[..] else { panic!("{srv}") };
            format!("{}:{port}", dig(&failover.dns, host, "A").join(""))
        })
        .collect();
    assert_eq!(resolved.len(), 3, "{resolved:?}");

    // Through the name: a write in revision epoch 1, which every standby member (the promoted
    // one and the two JOIN wiped and added) holds, all three voters of the new primary.
    let through_name = resolved.join(",");
    let put = etcdctl(&through_name, &["put", "after", "failover", "-w", "json"], None);
    let r: serde_json::Value = serde_json::from_slice(&put.stdout).unwrap_or_else(|_| panic!("{put:?}"));
    assert!(r["header"]["revision"].as_i64().unwrap() > 1 << 40, "{r}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while resolved.iter().any(|ep| local_value(ep, "after") != "failover") {
        assert!(Instant::now() < deadline, "a standby member lacks the write after failover");
        std::thread::sleep(Duration::from_millis(100));
    }
    let members = lockctl(&["member", "list", "--endpoints", &through_name]);
    let listed = String::from_utf8_lossy(&members.stdout).into_owned();
    assert_eq!(listed.lines().filter(|l| l.contains(", false, ")).count(), 3, "{listed}");
    let text = std::fs::read_to_string(&journal).unwrap();
    let chose = text.lines().find(|l| l.contains("\"Chose\"")).unwrap_or_else(|| panic!("{text}"));
    let v: serde_json::Value = serde_json::from_str(chose).unwrap();
    let promoted = v["record"]["Chose"]["target"].as_str().unwrap().to_string();

    // RPO: writes the old primary acknowledged that the new one lacks.
    let missing = acked.iter().filter(|k| local_value(&promoted, k) != "v").count();
    let status = lockctl(&["failover", "status", "--journal", journal.to_str().unwrap()]);
    eprintln!(
        "primary region lost to failover done: {} ms; acknowledged writes missing on the new primary: {missing} of {} \
         (standby lag just before the loss: {lag:?})\n{}",
        rto.as_millis(),
        acked.len(),
        String::from_utf8_lossy(&status.stdout)
    );
}
