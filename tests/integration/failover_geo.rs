//! The active-passive topology (`regions/active-passive.yaml`) through the harness: each region
//! in a network namespace when run as root, the topology's latency on every peer link and on
//! the vantage points' traffic, BIND9 beside the standby, the arbiter in europe and the
//! controller in us-west. The primary region is lost whole (its members SIGKILLed, its link
//! down); the controller fails over into epoch 1, makes the three standby members the new
//! primary's voters, and moves the clients' name, through which a client then writes. Prints the RTO
//! with the controller's per-step timeline, and the RPO next to the replication lag the primary
//! reported just before the loss. And the primary region partitioned, not killed, its own
//! clients writing throughout: no write it acknowledges after its lease lapses, none once its
//! members restart after the partition heals, until each rejoins the new primary.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use geolock_testkit::topology::{Role, Topology};

use crate::common::{dig, etcdctl, lockctl, put_outcome, rt, run_with_deadline};
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

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Writes acknowledged, as (key, revision, wall-clock ms when acknowledged), and how many were
/// tried.
type Acked = (Vec<(String, i64, u64)>, usize);

/// A client in `region` putting keys `{prefix}{n}` through `endpoints` until `stop`: each write
/// acknowledged, as (key, revision, wall-clock ms when acknowledged), and how many were tried.
fn writer(
    launcher: geolock_testkit::geo::RegionLauncher,
    endpoints: String,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Acked> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let key = format!("{prefix}{n}");
            let mut cmd = launcher.command("etcdctl");
            cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={endpoints}"));
            cmd.args(["--command-timeout=1s", "put", &key, "x", "-w", "json"]);
            let out = run_with_deadline(cmd, None, Duration::from_secs(10));
            let at = wall_ms();
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                acked.push((key, v["header"]["revision"].as_i64().unwrap(), at));
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
            n += 1;
        }
        (acked, n)
    })
}

/// The journal's first record of `kind`.
fn journaled(journal: &Path, kind: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(journal).unwrap();
    let line = text.lines().find(|l| l.contains(&format!("\"{kind}\""))).unwrap_or_else(|| panic!("no {kind}: {text}"));
    serde_json::from_str::<serde_json::Value>(line).unwrap()["record"][kind].clone()
}

#[test]
fn a_partitioned_primary_region_writing_on_acknowledges_nothing_after_its_lease_and_nothing_once_back_until_rejoined() {
    let rt = rt();
    let mut g = Geo::start(&rt, active_passive(), &[]);
    let primary = g.c.voter_endpoints();
    let standby = g.c.endpoints(|n| n.region == "us-west");
    let journal = g.c.failover.as_ref().unwrap().journal.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&journal).unwrap_or_default().contains("\"Armed\"") {
        assert!(Instant::now() < deadline, "the controller never saw the primary healthy");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Clients in both regions write all along: us-east's to the old primary, us-west's to the
    // standby members (learners forward to the primary's leader; after JOIN they are the new
    // primary).
    let stop = Arc::new(AtomicBool::new(false));
    let east = writer(g.c.launcher_in("us-east").unwrap(), primary.clone(), "east/", stop.clone());
    let west = writer(g.c.launcher_in("us-west").unwrap(), standby.clone(), "west/", stop.clone());
    std::thread::sleep(Duration::from_millis(1_500));
    g.c.cut_wan("us-east").unwrap();
    let cut_at = wall_ms();
    let f = g.c.failover.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while f.controller_exit().is_none() {
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(&f.controller_log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&f.controller_log).unwrap_or_default();
    assert!(log.contains("failed over into revision epoch 1"), "{log}");
    std::thread::sleep(Duration::from_millis(1_500));
    stop.store(true, Ordering::SeqCst);
    let ((east_acked, east_tried), (west_acked, west_tried)) = (east.join().unwrap(), west.join().unwrap());

    // The checker over both regions' acknowledgements: every one in epoch 0 came before the
    // lapse of the old primary's lease the controller journaled, and before the promotion;
    // every one after the promotion is in epoch 1. The old primary's clients got nothing
    // after the lapse.
    let lapse = journaled(&journal, "Decided")["lease_lapses_at_ms"].as_u64().unwrap();
    let seeded = journaled(&journal, "Seeded")["at_ms"].as_u64().unwrap();
    assert!(seeded >= lapse, "promoted at {seeded} before the lease lapsed at {lapse}");
    let all: Vec<&(String, i64, u64)> = east_acked.iter().chain(&west_acked).collect();
    let old_late: Vec<_> = all.iter().filter(|(_, rev, at)| *rev < 1 << 40 && *at >= lapse).collect();
    assert!(old_late.is_empty(), "acknowledged by the old primary after its lease lapsed: {old_late:?}");
    let new_early: Vec<_> = all.iter().filter(|(_, rev, at)| *rev >= 1 << 40 && *at < seeded).collect();
    assert!(new_early.is_empty(), "acknowledged in epoch 1 before the promotion: {new_early:?}");
    let east_last = east_acked.iter().map(|a| a.2).max().unwrap_or(0);
    assert!(east_acked.len() < east_tried && east_last < lapse, "{east_acked:?}");
    let west_new = west_acked.iter().filter(|a| a.1 >= 1 << 40).count();
    assert!(west_new > 0, "us-west's client never wrote to the new primary: {west_acked:?}");
    // Every write the new primary acknowledged is there.
    let missing: Vec<_> = west_acked
        .iter()
        .filter(|a| {
            let got = etcdctl(&standby, &["get", &a.0, "--print-value-only"], None);
            a.1 >= 1 << 40 && String::from_utf8_lossy(&got.stdout).trim() != "x"
        })
        .collect();
    assert!(missing.is_empty(), "{missing:?}");
    eprintln!(
        "partitioned primary: us-east's client {} of {east_tried} acknowledged, the last {} ms after the cut and \
         {} ms before the lapse; us-west's {} of {west_tried}, {west_new} by the new primary",
        east_acked.len(),
        east_last.saturating_sub(cut_at),
        lapse.saturating_sub(east_last),
        west_acked.len()
    );

    // The partition heals and the old members restart with their flags: they refuse every
    // write (no vantage point majority grants them a lease: the controller is gone, the
    // arbiter is one of two), until each rejoins the new primary.
    g.c.heal_wan("us-east").unwrap();
    let east_names: Vec<String> = g.c.nodes.iter().filter(|n| n.region == "us-east").map(|n| n.name.clone()).collect();
    for name in &east_names {
        rt.block_on(g.c.restart_reporting(name)).unwrap();
    }
    // Until they have a leader a write times out (never proposed); then it is refused by name.
    let refused_by_name = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, out) = put_outcome(&g.c.node(name).endpoint(), "after-heal", "x", "3s");
            assert!(!ok, "{name}, an old primary's member, took a write after the failover");
            if out.contains("holds no region write lease") {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: {out}");
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    for name in &east_names {
        refused_by_name(name);
    }
    let first = g.c.node(&east_names[0]).endpoint();
    let new_primary = journaled(&journal, "Chose")["target"].as_str().unwrap().to_string();
    let out = lockctl(&["failover", "rejoin", "--endpoints", &new_primary, "--member", &first]);
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let put = loop {
        let out = etcdctl(&first, &["--command-timeout=3s", "put", "via-rejoined", "x", "-w", "json"], None);
        if out.status.success() {
            break out;
        }
        assert!(Instant::now() < deadline, "the rejoined member takes no write: {out:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let v: serde_json::Value = serde_json::from_slice(&put.stdout).unwrap();
    assert!(v["header"]["revision"].as_i64().unwrap() > 1 << 40, "{v}");
    refused_by_name(&east_names[1]);
}

/// Whether the controller has decided anything: the journal holds a `Decided` record.
fn decided(journal: &Path) -> bool {
    std::fs::read_to_string(journal).unwrap_or_default().contains("\"Decided\"")
}

#[test]
fn a_one_sided_partition_and_flapping_health_do_not_fail_over() {
    let rt = rt();
    let mut g = Geo::start(&rt, active_passive(), &[]);
    let journal = g.c.failover.as_ref().unwrap().journal.clone();
    let window = Duration::from_millis(active_passive().failover.unwrap().detect_window_ms);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&journal).unwrap_or_default().contains("\"Armed\"") {
        assert!(Instant::now() < deadline, "the controller never saw the primary healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The standby cannot see the primary, the arbiter can: three windows, and no decision.
    g.c.cut_between("us-east", "us-west", false).unwrap();
    std::thread::sleep(window * 3);
    let f = g.c.failover.as_mut().unwrap();
    assert!(f.controller_exit().is_none() && !decided(&journal), "{}", std::fs::read_to_string(&journal).unwrap());
    let log = std::fs::read_to_string(&f.controller_log).unwrap_or_default();
    g.c.cut_between("us-east", "us-west", true).unwrap();
    // Lost from everywhere for two thirds of the window, then back, four times over.
    for _ in 0..4 {
        g.c.cut_wan("us-east").unwrap();
        std::thread::sleep(window * 2 / 3);
        g.c.heal_wan("us-east").unwrap();
        std::thread::sleep(window * 2 / 3);
    }
    let f = g.c.failover.as_mut().unwrap();
    assert!(f.controller_exit().is_none() && !decided(&journal), "{}", std::fs::read_to_string(&journal).unwrap());
    // The primary serves again, and the standby region never took writes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !put_outcome(&g.c.voter_endpoints(), "after-flapping", "v", "3s").0 {
        assert!(Instant::now() < deadline, "the primary does not serve after the flapping:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = lockctl(&["failover", "status", "--journal", journal.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.starts_with("watching the primary"), "{shown}");
}
