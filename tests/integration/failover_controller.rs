//! The failover controller end to end, on loopback with a real BIND9: the primary's three
//! voters are SIGKILLed; the controller and an arbiter see it lost for the detection window;
//! the controller stops granting the write lease, fences (nobody answers), waits the lease out,
//! promotes the standby learner into revision epoch 1, moves the client name's records, verifies
//! with a probe write and lock, and exits. Run again on its journal, it does nothing more.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{etcdctl, free_port, lockctl_bg, run_with_deadline, Cluster};
use geolock_testkit::bind::Bind;

const ZONE: &str = "geolock.test.";
const NAME: &str = "clients.geolock.test.";

/// The controller's configuration, as a file in `dir`.
#[allow(clippy::too_many_arguments)]
fn write_config(
    dir: &Path,
    listen: &str,
    arbiter: &str,
    primary: &str,
    standby: &str,
    bind: &Bind,
) -> std::path::PathBuf {
    let secret = data_encoding::BASE64.encode(&bind.key.secret);
    let text = format!(
        "name: standby\nlisten: \"{listen}\"\njournal: \"{journal}\"\nprimary: \"{primary}\"\nstandby: \"{standby}\"\n\
         arbiters: [\"{arbiter}\"]\nepoch: 0\nmode: auto\ndetect_window_ms: 1000\nprobe_interval_ms: 200\n\
         write_lease_ms: 1500\nclock_drift_ms: 500\nstep_retry_ms: 1000\n\
         dns:\n  server: \"{server}\"\n  zone: \"{ZONE}\"\n  name: \"{NAME}\"\n  key_name: \"{key}\"\n  key_secret: \"{secret}\"\n\
         \x20 primary: {{ addrs: [\"10.0.1.1\"], srv: [\"n1.us-east.geolock.test:2379\"] }}\n\
         \x20 standby: {{ addrs: [\"10.0.2.1\"], srv: [\"l1.us-west.geolock.test:2379\"] }}\n",
        journal = dir.join("journal").display(),
        server = bind.addr,
        key = bind.key.name,
    );
    let path = dir.join("controller.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `dig +short` at `bind`.
fn dig(bind: &Bind, name: &str, rtype: &str) -> String {
    let mut cmd = Command::new("dig");
    cmd.args([&format!("@{}", bind.addr.ip()), "-p", &bind.addr.port().to_string(), "+short", "+tcp", name, rtype]);
    String::from_utf8_lossy(&run_with_deadline(cmd, None, Duration::from_secs(20)).stdout).trim().to_string()
}

/// Wait for the controller process to exit; its exit status and log.
fn wait_exit(p: &mut crate::common::Proc, limit: Duration) -> (bool, String) {
    let deadline = Instant::now() + limit;
    let child = p.child.as_mut().unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.success(), p.log());
        }
        assert!(Instant::now() < deadline, "the controller did not finish within {limit:?}:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_primary_is_failed_over_once_by_the_controller_and_clients_find_the_standby_by_dns() {
    let dir = tempfile::tempdir().unwrap();
    let bind = Bind::start(
        dir.path(),
        ZONE,
        &[
            format!("{NAME} IN A 10.0.1.1"),
            format!("_etcd-client._tcp.{NAME} IN SRV 0 0 2379 n1.us-east.geolock.test."),
        ],
    )
    .unwrap();
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (free_port(), free_port())).map(|(c, p)| (c, p, p)).collect();
    let primary = ports.iter().map(|p| format!("127.0.0.1:{}", p.0)).collect::<Vec<_>>().join(",");
    let (ctl, arb) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let learner_port = free_port();
    let standby = format!("127.0.0.1:{learner_port}");
    let config = write_config(dir.path(), &ctl, &arb, &primary, &standby, &bind);
    let _arbiter = lockctl_bg(
        "",
        &["failover", "vantage", "--listen", &arb, "--primary", &primary, "--probe-interval-ms", "200"],
        &dir.path().join("arbiter.log"),
    );
    let cfg = config.to_str().unwrap();
    let mut controller = lockctl_bg("", &["failover-controller", "--config", cfg], &dir.path().join("controller.log"));

    let vantages = format!("{ctl},{arb}");
    let mut c = Cluster::start_on(ports, &["--failover-vantages", &vantages, "--failover-write-lease-ms", "1500"]);
    // The standby learner is no primary of its own yet: no write lease for it.
    c.set_extra(&[]);
    let (l, _) = c.add_learner_on("l1", 0, learner_port);
    assert!(etcdctl(&c.endpoint(0), &["put", "k", "before"], None).status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while String::from_utf8_lossy(
        &etcdctl(&standby, &["get", "k", "--consistency=s", "--print-value-only"], None).stdout,
    )
    .trim()
        != "before"
    {
        assert!(Instant::now() < deadline, "the learner does not catch up");
        std::thread::sleep(Duration::from_millis(100));
    }

    let lost = Instant::now();
    for i in 0..3 {
        c.kill(i);
    }
    let (ok, log) = wait_exit(&mut controller, Duration::from_secs(60));
    let rto = lost.elapsed();
    assert!(ok && log.contains("failed over into revision epoch 1"), "{log}");
    eprintln!("primary killed to failover done: {} ms", rto.as_millis());

    // Clients resolving the name find the standby; it takes writes in epoch 1 with the data.
    assert_eq!(dig(&bind, NAME, "A"), "10.0.2.1");
    assert_eq!(dig(&bind, &format!("_etcd-client._tcp.{NAME}"), "SRV"), "0 0 2379 l1.us-west.geolock.test.");
    let got = etcdctl(&standby, &["get", "k", "--print-value-only"], None);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "before");
    let put = etcdctl(&standby, &["put", "k2", "after", "-w", "json"], None);
    let v: serde_json::Value = serde_json::from_slice(&put.stdout).unwrap();
    assert!(v["header"]["revision"].as_i64().unwrap() > 1 << 40, "{v}");

    // The journal: each step started and finished once, in order, after one decision.
    let journal = std::fs::read_to_string(dir.path().join("journal")).unwrap();
    let kinds: Vec<String> = journal
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["record"]
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap()
                .clone()
        })
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "Decided").count(), 1, "{journal}");
    for step in ["Fence", "Promote", "Redirect", "Verify", "Notify"] {
        let finished =
            journal.lines().filter(|l| l.contains("\"Finished\"") && l.contains(&format!("\"{step}\""))).count();
        assert_eq!(finished, 1, "{step} finished {finished} times:\n{journal}");
    }

    // Run again on the same journal: it finds the failover done and does nothing.
    let again = run_with_deadline(
        {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockctl"));
            cmd.args(["failover-controller", "--config", cfg]);
            cmd
        },
        None,
        Duration::from_secs(30),
    );
    assert!(again.status.success(), "{again:?}");
    assert_eq!(std::fs::read_to_string(dir.path().join("journal")).unwrap(), journal, "the journal grew");
    assert_eq!(dig(&bind, NAME, "A"), "10.0.2.1");
    drop(c.nodes.remove(l));
}
