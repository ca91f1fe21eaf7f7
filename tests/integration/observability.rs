//! Observability as an etcd operator expects it, compared with a real etcd 3.4 where etcd has
//! the same thing: `/metrics` (names, types, labels, buckets; promtool's lint), `/health`,
//! `/livez`, `/readyz`, `grpc.health.v1`, and the alert rules (promtool's unit tests, and a real
//! Prometheus evaluating them against a live cluster).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// The metrics etcd's dashboards and the etcd mixin's alerts read, which geolock must export
/// exactly as etcd 3.4 does (`--metrics extensive`, for the gRPC handling histogram).
const ETCDS: &[&str] = &[
    "etcd_server_has_leader",
    "etcd_server_is_leader",
    "etcd_server_is_learner",
    "etcd_server_leader_changes_seen_total",
    "etcd_server_proposals_committed_total",
    "etcd_server_proposals_applied_total",
    "etcd_server_proposals_pending",
    "etcd_server_proposals_failed_total",
    "etcd_server_id",
    "etcd_server_version",
    "etcd_cluster_version",
    "etcd_server_quota_backend_bytes",
    "etcd_server_health_success",
    "etcd_server_health_failures",
    "etcd_disk_wal_fsync_duration_seconds",
    "etcd_disk_backend_commit_duration_seconds",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_range_total",
    "etcd_mvcc_txn_total",
    "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_mvcc_db_total_size_in_bytes",
    "etcd_debugging_mvcc_current_revision",
    "etcd_debugging_mvcc_compact_revision",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvcc_watch_stream_total",
    "etcd_debugging_server_lease_expired_total",
    "etcd_network_peer_round_trip_time_seconds",
    "etcd_network_peer_sent_bytes_total",
    "etcd_network_peer_received_bytes_total",
    "etcd_network_client_grpc_received_bytes_total",
    "etcd_network_client_grpc_sent_bytes_total",
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_handling_seconds",
    "grpc_server_msg_received_total",
    "grpc_server_msg_sent_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

/// One metric family as an exposition states it.
#[derive(Debug, PartialEq)]
struct Family {
    kind: String,
    /// Label names of its samples, `le` aside.
    labels: BTreeSet<String>,
    /// A histogram's bucket bounds (`+Inf` included), ascending.
    buckets: Vec<f64>,
}

/// Every family of an exposition.
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut parts = t.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            out.insert(name.into(), Family { kind: kind.into(), labels: BTreeSet::new(), buckets: Vec::new() });
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, labels, _) = parse_sample(line).unwrap_or_else(|| panic!("unparsable sample: {line}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|base| out.get(*base).is_some_and(|f| f.kind == "histogram" || f.kind == "summary"))
            .unwrap_or(&name)
            .to_string();
        let f = out.get_mut(&family).unwrap_or_else(|| panic!("sample of no declared family: {line}"));
        for (k, v) in labels {
            if k == "le" {
                let le = if v == "+Inf" { f64::INFINITY } else { v.parse().unwrap() };
                if !f.buckets.contains(&le) {
                    f.buckets.push(le);
                }
            } else {
                f.labels.insert(k);
            }
        }
    }
    for f in out.values_mut() {
        f.buckets.sort_by(f64::total_cmp);
    }
    out
}

fn metrics(endpoint: &str) -> String {
    let (status, body) = get(&format!("http://{endpoint}/metrics"));
    assert_eq!(status, 200, "{body}");
    body
}

/// `promtool check metrics` of an exposition: its findings, one a line.
fn promtool_findings(exposition: &str) -> BTreeSet<String> {
    let out = run_with_deadline(
        {
            let mut c = Command::new("promtool");
            c.args(["check", "metrics"]);
            c
        },
        Some(exposition),
        Duration::from_secs(30),
    );
    let findings: BTreeSet<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    // 0: clean; 3: lint findings only. Anything else (1: unparsable) is a failure outright.
    let code = out.status.code();
    assert!(code == Some(0) || (code == Some(3) && !findings.is_empty()), "promtool: {code:?} {findings:?}");
    findings
}

#[test]
fn metrics_carry_etcds_names_types_labels_and_buckets() {
    let etcd = EtcdCluster::start(&["--metrics", "extensive"]);
    let geo = Cluster::start_with(3, &["--metrics", "extensive"]);
    for ep in [etcd.endpoint(0), geo.endpoint(0)] {
        etcdctl_ok(&ep, &["put", "k", "v"]);
        etcdctl_ok(&ep, &["get", "k"]);
        etcdctl_ok(&ep, &["del", "k"]);
        // A Txn of one put, of a put and a get, and a read-only one of two gets.
        for ops in ["put t 1\n", "put t 2\nget t\n", "get t\nget k\n"] {
            let txn = etcdctl(&ep, &["txn"], Some(&format!("\n{ops}\n\n")));
            assert!(txn.status.success(), "{txn:?}");
        }
        let _ = get(&format!("http://{ep}/health"));
    }
    // Peer round trips are sampled (etcd's prober every few seconds, geolock each second):
    // wait until both expositions have every family.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (theirs, ours) = loop {
        let (e, g) = (metrics(&etcd.endpoint(0)), metrics(&geo.endpoint(0)));
        let (ef, gf) = (families(&e), families(&g));
        let missing: Vec<_> = ETCDS.iter().filter(|n| !ef.contains_key(**n) || !gf.contains_key(**n)).collect();
        if missing.is_empty() {
            break (e, g);
        }
        assert!(Instant::now() < deadline, "still missing after 30 s: {missing:?}");
        std::thread::sleep(Duration::from_secs(1));
    };
    let (ef, gf) = (families(&theirs), families(&ours));
    for name in ETCDS {
        assert_eq!(gf[*name], ef[*name], "{name}: geolock's (left) differs from etcd's");
    }
    // The gRPC families carry every method of etcd's services, as etcd's do.
    for (service, method) in
        [("etcdserverpb.KV", "Range"), ("etcdserverpb.Watch", "Watch"), ("etcdserverpb.Lease", "LeaseKeepAlive")]
    {
        for text in [&theirs, &ours] {
            let kind = sample(text, "grpc_server_started_total", &[("grpc_service", service), ("grpc_method", method)]);
            assert!(kind.is_some(), "no {service}/{method} series in\n{text}");
        }
    }
    // The same requests count the same in both.
    for (name, labels) in [
        ("grpc_server_handled_total", &[("grpc_method", "Put"), ("grpc_code", "OK")][..]),
        ("grpc_server_handled_total", &[("grpc_method", "Txn"), ("grpc_code", "OK")]),
        ("grpc_server_msg_received_total", &[("grpc_method", "Range")]),
        ("etcd_mvcc_put_total", &[]),
        ("etcd_mvcc_delete_total", &[]),
        ("etcd_mvcc_txn_total", &[]),
        ("etcd_mvcc_range_total", &[]),
        ("etcd_debugging_mvcc_keys_total", &[]),
    ] {
        let (e, g) = (sample(&theirs, name, labels), sample(&ours, name, labels));
        assert_eq!(g, e, "{name}{labels:?}: geolock's (left) differs from etcd's");
    }

    // promtool's lint finds in etcd's own exposition the names etcd chose (gauges ending
    // `_total`, counters that do not); geolock keeps those names, so it may find the same, and
    // nothing else.
    let (their_findings, our_findings) = (promtool_findings(&theirs), promtool_findings(&ours));
    let ours_only: Vec<_> = our_findings.difference(&their_findings).collect();
    assert!(ours_only.is_empty(), "promtool finds in geolock's exposition what it does not in etcd's: {ours_only:?}");
    assert!(our_findings.iter().all(|f| !f.starts_with("geolock_")), "{our_findings:?}");
}

/// A real Prometheus (Debian's) scraping `targets` each second with the alert rules loaded.
struct Prometheus {
    _proc: Proc,
    port: u16,
    _tmp: tempfile::TempDir,
}

fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/monitoring/alerts.yaml")
}

impl Prometheus {
    fn start(targets: &[String]) -> Prometheus {
        let tmp = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{:?}]\nscrape_configs:\n  - \
             job_name: geolock\n    static_configs: [{{targets: {targets:?}}}]\n",
            rules_file().canonicalize().unwrap()
        );
        std::fs::write(tmp.path().join("prometheus.yml"), config).unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", tmp.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", tmp.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let proc = spawn_logged(cmd, &tmp.path().join("prometheus.log"));
        let p = Prometheus { _proc: proc, port, _tmp: tmp };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.ready() {
            assert!(Instant::now() < deadline, "prometheus not ready after 30 s: {}", p._proc.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn ready(&self) -> bool {
        rt().block_on(async {
            let client = http_client(Duration::from_secs(2));
            let r = client.get(format!("http://127.0.0.1:{}/-/ready", self.port)).send().await;
            r.is_ok_and(|r| r.status().is_success())
        })
    }

    /// The alerts pending or firing: (name, instance, state).
    fn alerts(&self) -> Vec<(String, String, String)> {
        let (_, body) = get(&format!("http://127.0.0.1:{}/api/v1/alerts", self.port));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
                (s(&a["labels"]["alertname"]), s(&a["labels"]["instance"]), s(&a["state"]))
            })
            .collect()
    }
}

/// Poll `f` until it returns `Some`, for up to `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `method` on `url`: its status, `Allow` header and body.
fn request(method: &str, url: &str) -> (u16, Option<String>, String) {
    rt().block_on(async {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = http_client(Duration::from_secs(15)).request(method, url).send().await.unwrap();
        let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
        (resp.status().as_u16(), allow, resp.text().await.unwrap())
    })
}

fn health_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body.trim_end()).unwrap_or_else(|e| panic!("/health body {body:?}: {e}"))
}

#[test]
fn losing_the_leader_and_then_the_quorum_shows_as_on_etcd_and_fires_the_no_leader_alert() {
    let mut etcd = EtcdCluster::start(&[]);
    let mut geo = Cluster::start(3);
    let targets: Vec<String> = (0..3).map(|i| geo.endpoint(i)).collect();
    let prom = Prometheus::start(&targets);

    // Healthy: the same status and verdict; etcd 3.5 added `reason`, which 3.4 lacks.
    let (es, eb) = get(&format!("http://{}/health", etcd.endpoint(0)));
    let (gs, gb) = get(&format!("http://{}/health", geo.endpoint(0)));
    assert_eq!((gs, &health_json(&gb)["health"]), (es, &health_json(&eb)["health"]), "etcd: {eb} geolock: {gb}");
    assert_eq!(gb, r#"{"health":"true","reason":""}"#);
    // Any other method, HEAD included: etcd's 405. etcd 3.5 answers its /livez and /readyz
    // paths with the same handler as /health; geolock's are checked against etcd 3.4's /health.
    for method in ["HEAD", "POST", "PUT", "DELETE"] {
        let etcd_says = request(method, &format!("http://{}/health", etcd.endpoint(0)));
        assert_eq!((etcd_says.0, etcd_says.1.as_deref()), (405, Some("GET")), "{method}: {etcd_says:?}");
        for path in ["health", "livez", "readyz", "readyz/non_learner"] {
            let ours = request(method, &format!("http://{}/{path}", geo.endpoint(0)));
            assert_eq!(ours, etcd_says, "{method} /{path}");
        }
    }

    // Killing the leader moves every survivor's leader-change count.
    let leader = geo.leader();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let changes = |i: usize, geo: &Cluster| {
        sample(&metrics(&geo.endpoint(i)), "etcd_server_leader_changes_seen_total", &[]).unwrap()
    };
    let before: Vec<f64> = survivors.iter().map(|i| changes(*i, &geo)).collect();
    geo.kill(leader);
    let next = geo.leader();
    for (i, was) in survivors.iter().zip(before) {
        wait_for(Duration::from_secs(10), "a survivor seeing the new leader", || {
            (changes(*i, &geo) > was).then_some(())
        });
    }

    // Then the quorum: the last member has no leader, as etcd's last member has none.
    geo.kill(next);
    let last = survivors.into_iter().find(|i| *i != next).unwrap();
    etcd.procs[1].kill();
    etcd.procs[2].kill();
    let unhealthy = |ep: String| {
        wait_for(Duration::from_secs(30), &format!("{ep} unhealthy"), || {
            let (s, b) = get(&format!("http://{ep}/health"));
            (s != 200).then_some((s, b))
        })
    };
    let (es, eb) = unhealthy(etcd.endpoint(0));
    let (gs, gb) = unhealthy(geo.endpoint(last));
    assert_eq!((gs, &health_json(&gb)["health"]), (es, &health_json(&eb)["health"]), "etcd: {eb} geolock: {gb}");
    assert_eq!(gb, "{\"health\":\"false\",\"reason\":\"RAFT NO LEADER\"}\n");
    // Both come to say so in their metrics too (etcd's once its election timeout passes).
    for ep in [etcd.endpoint(0), geo.endpoint(last)] {
        wait_for(Duration::from_secs(15), &format!("{ep}: etcd_server_has_leader 0"), || {
            (sample(&metrics(&ep), "etcd_server_has_leader", &[]) == Some(0.0)).then_some(())
        });
    }

    // etcd 3.5's finer answers: alive (a local read works), not ready (no linearizable read).
    let ep = geo.endpoint(last);
    assert_eq!(get(&format!("http://{ep}/health?serializable=true")), (200, r#"{"health":"true","reason":""}"#.into()));
    assert_eq!(get(&format!("http://{ep}/livez")), (200, "ok\n".into()));
    let (s, b) = get(&format!("http://{ep}/readyz"));
    assert_eq!(s, 503, "{b}");
    assert!(b.starts_with("[+]data_corruption ok\n[+]serializable_read ok\n[-]linearizable_read failed: "), "{b}");
    assert_eq!(get(&format!("http://{ep}/readyz/serializable_read")), (200, "ok\n".into()));
    assert_eq!(get(&format!("http://{ep}/readyz?exclude=linearizable_read")), (200, "ok\n".into()));

    // And Prometheus, evaluating the rules file against what it scraped, has etcdNoLeader
    // pending (its `for:` is a minute) for that member alone.
    let alerts = wait_for(Duration::from_secs(30), "etcdNoLeader pending", || {
        let a = prom.alerts();
        a.iter().any(|(name, _, _)| name == "etcdNoLeader").then_some(a)
    });
    let no_leader: Vec<_> = alerts.iter().filter(|(name, _, _)| name == "etcdNoLeader").collect();
    assert_eq!(no_leader.len(), 1, "{alerts:?}");
    assert_eq!(no_leader[0].1, geo.endpoint(last), "{alerts:?}");
}

#[test]
fn learners_and_witnesses_are_live_but_never_ready_for_clients() {
    let mut c = Cluster::start_roles(&["voter", "voter", "witness"]);
    let (learner, _) = c.add_learner("n4", 0);
    let url = |i: usize, path: &str| format!("http://{}{path}", c.endpoint(i));

    for i in 0..4 {
        assert_eq!(get(&url(i, "/livez")), (200, "ok\n".into()), "member {i}");
    }
    assert_eq!(get(&url(0, "/readyz")), (200, "ok\n".into()));
    let (s, b) = get(&url(0, "/readyz?verbose"));
    assert_eq!((s, b.as_str()), (200, "[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\n[+]non_learner ok\n[+]non_witness ok\nok\n"));

    let (s, b) = get(&url(learner, "/readyz"));
    assert_eq!(s, 503, "{b}");
    assert!(b.contains("[-]non_learner failed: not supported for learner\n"), "{b}");
    assert_eq!(get(&url(learner, "/readyz/non_learner")).0, 503);
    assert_eq!(get(&url(learner, "/readyz?exclude=non_learner")), (200, "ok\n".into()));

    let (s, b) = get(&url(2, "/readyz"));
    assert_eq!(s, 503, "{b}");
    assert!(b.contains("[-]non_witness failed: not supported for witness"), "{b}");
    assert_eq!(get(&url(2, "/readyz/nonsense")).0, 404);

    // Each says what it is; the leader reports every other member's lag.
    let role = |i: usize| {
        let m = metrics(&c.endpoint(i));
        let learner_flag = sample(&m, "etcd_server_is_learner", &[]);
        let roles: Vec<&str> = ["voter", "learner", "witness"]
            .into_iter()
            .filter(|r| sample(&m, "geolock_member_info", &[("role", r)]).is_some())
            .collect();
        (learner_flag, roles)
    };
    assert_eq!(role(0), (Some(0.0), vec!["voter"]));
    assert_eq!(role(2), (Some(0.0), vec!["witness"]));
    assert_eq!(role(learner), (Some(1.0), vec!["learner"]));
    let leader = c.leader();
    let lag = wait_for(Duration::from_secs(10), "the learner's lag on the leader", || {
        sample(
            &metrics(&c.endpoint(leader)),
            "geolock_replication_lag_entries",
            &[("member", "n4"), ("role", "learner")],
        )
    });
    assert!(lag < 100.0, "{lag}");

    // grpc.health.v1: a voter serves, a witness never does.
    rt().block_on(async {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        for (i, want) in [(0, ServingStatus::Serving), (2, ServingStatus::NotServing)] {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.endpoint(i))).unwrap();
            let mut h = HealthClient::new(channel.connect().await.unwrap());
            let got = h.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status;
            assert_eq!(got, want as i32, "member {i}");
        }
    });
}

#[test]
fn lock_contention_is_counted_by_lock_name() {
    let node = GeoNode::start();
    let ep = node.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    // `lockctl lock` waits through the Lock service (etcdctl's lock is a client-side recipe).
    let mut holder = lockctl_bg(&ep, &["lock", "--ttl", "2", "/jobs/build-17"], &first);
    wait_lines(&first, 2, Duration::from_secs(15));
    let second = dir.path().join("second");
    let _waiter = lockctl_bg(&ep, &["lock", "--ttl", "2", "/jobs/build-17"], &second);
    let waiting = wait_for(Duration::from_secs(15), "a queued waiter", || {
        sample(&metrics(&ep), "geolock_lock_waiters", &[("name", "jobs")]).filter(|w| *w == 1.0)
    });
    assert_eq!(waiting, 1.0);
    // The holder dies; its lease lapses after its 2 s TTL and the waiter is handed the lock.
    holder.kill();
    wait_lines(&second, 2, Duration::from_secs(15));
    let m = wait_for(Duration::from_secs(5), "the hand-over counted", || {
        let m = metrics(&ep);
        (sample(&m, "geolock_lock_handovers_total", &[("name", "jobs")]) == Some(1.0)).then_some(m)
    });
    assert_eq!(sample(&m, "geolock_lock_waiters", &[("name", "jobs")]), Some(0.0));
    assert_eq!(sample(&m, "geolock_lock_wait_seconds_count", &[("name", "jobs")]), Some(1.0));
    let waited = sample(&m, "geolock_lock_wait_seconds_sum", &[("name", "jobs")]).unwrap();
    assert!(waited >= 1.0, "the waiter waited out most of a 2 s lease, not {waited} s");
    assert!(sample(&m, "etcd_debugging_server_lease_expired_total", &[]).unwrap() >= 1.0);
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for args in
        [vec!["check", "rules", "docs/monitoring/alerts.yaml"], vec!["test", "rules", "tests/rules/alerts.test.yaml"]]
    {
        let mut cmd = Command::new("promtool");
        cmd.args(&args).current_dir(&root);
        let out = run_with_deadline(cmd, None, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Load `url` in headless Chromium (Debian's) and give its scripts `budget` of virtual time:
/// the DOM it ends with, and every console message it logged. Also saves a screenshot to `shot`.
fn chromium(url: &str, shot: &Path, budget: Duration) -> (String, Vec<String>) {
    let profile = tempfile::tempdir().unwrap();
    let run = |action: &str| {
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless=new",
            // As root (the namespaces need it), Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg(action)
        .arg(url);
        run_with_deadline(cmd, None, Duration::from_secs(60))
    };
    let dom = run("--dump-dom");
    assert!(dom.status.success(), "chromium: {}", String::from_utf8_lossy(&dom.stderr));
    // Chromium logs each console message (and each uncaught exception) to stderr as
    // `...:INFO:CONSOLE:<line>] "<message>", source: ...`.
    let console =
        String::from_utf8_lossy(&dom.stderr).lines().filter(|l| l.contains(":CONSOLE")).map(String::from).collect();
    let png = run(&format!("--screenshot={}", shot.display()));
    assert!(png.status.success(), "chromium: {}", String::from_utf8_lossy(&png.stderr));
    let bytes = std::fs::read(shot).unwrap();
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "{} is no screenshot", shot.display());
    (String::from_utf8(dom.stdout).unwrap(), console)
}

#[test]
fn the_cluster_page_shows_every_member_of_the_2_2_1_topology_and_follows_a_leader_kill() {
    use crate::geo::{two_two_one, Geo};
    let rt = rt();
    let mut g = Geo::start(&rt, two_two_one(), &[]);
    g.lead_from(&rt, "node-1");
    // Served by a us-west voter, which stays up.
    let url = format!("http://{}/", g.c.node("node-3").endpoint());
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-page");
    std::fs::create_dir_all(&shots).unwrap();

    // A lock with a holder and a waiter, both on a us-east member.
    let locks = tempfile::tempdir().unwrap();
    let east = g.c.node("node-2").endpoint();
    let _holder = lockctl_bg(&east, &["lock", "jobs/nightly"], &locks.path().join("holder"));
    wait_lines(&locks.path().join("holder"), 2, Duration::from_secs(20));
    let _waiter = lockctl_bg(&east, &["lock", "jobs/nightly"], &locks.path().join("waiter"));
    std::thread::sleep(Duration::from_secs(1));

    let (dom, console) = chromium(&url, &shots.join("before.png"), Duration::from_secs(5));
    assert!(dom.contains("<tr data-lock=\"jobs/nightly\"><td>jobs/nightly</td><td>2</td></tr>"), "{dom}");
    assert!(console.is_empty(), "the page logged: {console:?}");
    for n in &g.c.nodes {
        let card = format!(
            "data-member=\"{}\" data-role=\"{}\" data-region=\"{}\" data-health=\"ok\"",
            n.name, n.role, n.region
        );
        assert!(dom.contains(&card), "no {card} in\n{dom}");
    }
    assert!(dom.contains("data-leader=\"node-1\""), "{dom}");
    // The page reports its own failures (a fetch or a render that threw) in its banner.
    assert!(dom.contains("<div id=\"banner\" style=\"display: none;\"></div>"), "{dom}");
    for region in ["us-east", "us-west", "europe"] {
        assert!(dom.contains(&format!("<td>{region}</td>")), "no round trips from or to {region}:\n{dom}");
    }

    g.c.kill("node-1").unwrap();
    // The survivors name the old leader until their election timeout passes.
    let next = wait_for(Duration::from_secs(60), "a new leader", || Some(g.leader(&rt)).filter(|l| l != "node-1"));
    let dom = wait_for(Duration::from_secs(30), "the page showing the new leader", || {
        let (dom, console) = chromium(&url, &shots.join("after.png"), Duration::from_secs(5));
        assert!(console.is_empty(), "the page logged: {console:?}");
        dom.contains(&format!("data-leader=\"{next}\"")).then_some(dom)
    });
    assert!(
        dom.contains("data-member=\"node-1\" data-role=\"voter\" data-region=\"us-east\" data-health=\"bad\""),
        "{dom}"
    );
    assert!(dom.contains("unreachable: "), "{dom}");
    assert!(dom.contains("<div id=\"banner\" style=\"display: none;\"></div>"), "{dom}");
}

#[test]
fn a_traced_put_reaches_an_otlp_receiver_as_a_span_tree_under_the_callers_trace() {
    let rt = rt();
    let (receiver, collector) = rt.block_on(geolock_testkit::otlp::OtlpReceiver::start()).unwrap();
    // Sampling rate 0: only a request whose caller's trace context is sampled is traced.
    let node = GeoNode::start_with(&[
        "--experimental-enable-distributed-tracing",
        "--experimental-distributed-tracing-address",
        &collector,
        "--experimental-distributed-tracing-sampling-rate",
        "0",
    ]);
    etcdctl_ok(&node.endpoint(), &["put", "untraced", "v"]);
    let (trace_id, parent_id) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    rt.block_on(async {
        use geolock_proto::etcdserverpb::{kv_client::KvClient, PutRequest};
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.endpoint())).unwrap();
        let mut kv = KvClient::new(channel.connect().await.unwrap());
        let mut req =
            tonic::Request::new(PutRequest { key: b"traced".to_vec(), value: b"v".to_vec(), ..Default::default() });
        req.metadata_mut().insert("traceparent", format!("00-{trace_id}-{parent_id}-01").parse().unwrap());
        kv.put(req).await.unwrap();
    });
    let spans = wait_for(Duration::from_secs(15), "the put's four spans at the receiver", || {
        let spans = receiver.spans();
        (spans.len() >= 4).then_some(spans)
    });
    let hex = |b: &[u8]| data_encoding::HEXLOWER.encode(b);
    assert!(spans.iter().all(|s| hex(&s.trace_id) == trace_id), "a span outside the caller's trace: {spans:?}");
    let named = |name: &str| {
        let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "{name} in {spans:?}");
        found[0].clone()
    };
    let rpc = named("etcdserverpb.KV/Put");
    assert_eq!(hex(&rpc.parent_span_id), parent_id, "the RPC's span is not the caller's child");
    assert_eq!(rpc.kind, geolock_testkit::otlp::SpanKind::Server as i32);
    let propose = named("propose");
    assert_eq!(propose.parent_span_id, rpc.span_id, "propose is not the RPC's child");
    for child in ["commit", "apply"] {
        let s = named(child);
        assert_eq!(s.parent_span_id, propose.span_id, "{child} is not propose's child");
        assert!(
            s.start_time_unix_nano >= propose.start_time_unix_nano
                && s.end_time_unix_nano <= propose.end_time_unix_nano
        );
    }
    let m = metrics(&node.endpoint());
    assert!(sample(&m, "geolock_tracing_spans_exported_total", &[]).unwrap() >= 4.0, "{m}");
    assert_eq!(sample(&m, "geolock_tracing_spans_dropped_total", &[]), Some(0.0));
}

#[test]
fn otlp_metrics_carry_every_family_of_the_exposition_and_a_dead_collector_is_only_counted() {
    use geolock_testkit::otlp::common::any_value::Value as Any;
    use geolock_testkit::otlp::metrics::{metric::Data, number_data_point::Value, AggregationTemporality};
    use geolock_testkit::otlp::OtlpReceiver;

    // The collector's port is held, bound but not listening, so connections to it are refused
    // and nothing else takes it before the receiver does.
    let rt = rt();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let collector = socket.local_addr().unwrap().to_string();

    // The collector is not up yet: exports fail, are counted, and the member serves on.
    let node = GeoNode::start_with(&["--otlp-metrics-address", &collector, "--otlp-metrics-interval-ms", "1000"]);
    etcdctl_ok(&node.endpoint(), &["put", "k", "v"]);
    wait_for(Duration::from_secs(20), "a failed export counted", || {
        sample(&metrics(&node.endpoint()), "geolock_otlp_metrics_exports_failed_total", &[]).filter(|n| *n >= 1.0)
    });
    etcdctl_ok(&node.endpoint(), &["put", "k", "v2"]);

    // Once it is up, the next exports reach it: each carries every family a scrape shows, under
    // the same name, with the matching type, label names and bucket bounds. The export compared
    // is one gathered after the scrape and a put that followed it.
    let receiver = rt.block_on(async { OtlpReceiver::serve(socket.listen(64).unwrap()) });
    wait_for(Duration::from_secs(30), "an export at the collector", || {
        (!receiver.metric_exports().is_empty()).then_some(())
    });
    let scraped = metrics(&node.endpoint());
    let scraped_puts = sample(&scraped, "etcd_mvcc_put_total", &[]).unwrap();
    etcdctl_ok(&node.endpoint(), &["put", "k", "v3"]);
    let puts_of = |export: &geolock_testkit::otlp::ResourceMetrics| {
        let m = export.scope_metrics.iter().flat_map(|s| &s.metrics).find(|m| m.name == "etcd_mvcc_put_total")?;
        match &m.data {
            Some(Data::Sum(s)) => match s.data_points.first()?.value {
                Some(Value::AsDouble(v)) => Some(v),
                _ => None,
            },
            _ => None,
        }
    };
    let export = wait_for(Duration::from_secs(20), "an export with the put after the scrape", || {
        receiver.metric_exports().into_iter().rev().find(|e| puts_of(e).is_some_and(|p| p > scraped_puts))
    });
    assert_eq!(puts_of(&export), Some(scraped_puts + 1.0));

    let resource: BTreeMap<String, Option<Any>> = export
        .resource
        .iter()
        .flat_map(|r| &r.attributes)
        .map(|kv| (kv.key.clone(), kv.value.as_ref().and_then(|v| v.value.clone())))
        .collect();
    assert_eq!(resource["service.name"], Some(Any::StringValue("geolock".into())), "{resource:?}");
    assert_eq!(resource["service.instance.id"], Some(Any::StringValue("n1".into())), "{resource:?}");

    let exported: BTreeMap<String, Data> = export
        .scope_metrics
        .iter()
        .flat_map(|s| &s.metrics)
        .map(|m| (m.name.clone(), m.data.clone().expect("a metric with data")))
        .collect();
    let cumulative = AggregationTemporality::Cumulative as i32;
    let scraped_families = families(&scraped);
    for name in ["etcd_server_has_leader", "etcd_mvcc_put_total", "etcd_disk_wal_fsync_duration_seconds"] {
        assert!(scraped_families.contains_key(name), "{name} in {scraped}");
    }
    for (name, family) in &scraped_families {
        let data = exported.get(name).unwrap_or_else(|| panic!("{name} is not exported: {:?}", exported.keys()));
        let (labels, buckets): (BTreeSet<String>, Vec<f64>) = match (family.kind.as_str(), data) {
            ("counter", Data::Sum(s)) if s.is_monotonic && s.aggregation_temporality == cumulative => {
                (s.data_points.iter().flat_map(|p| &p.attributes).map(|a| a.key.clone()).collect(), Vec::new())
            }
            ("gauge", Data::Gauge(g)) => {
                (g.data_points.iter().flat_map(|p| &p.attributes).map(|a| a.key.clone()).collect(), Vec::new())
            }
            ("histogram", Data::Histogram(h)) if h.aggregation_temporality == cumulative => {
                let mut bounds = h.data_points[0].explicit_bounds.clone();
                bounds.push(f64::INFINITY);
                (h.data_points.iter().flat_map(|p| &p.attributes).map(|a| a.key.clone()).collect(), bounds)
            }
            (kind, data) => panic!("{name}: a {kind} exported as {data:?}"),
        };
        assert_eq!(labels, family.labels, "{name}'s label names");
        assert_eq!(buckets, family.buckets, "{name}'s buckets");
    }
    wait_for(Duration::from_secs(20), "the accepted exports counted", || {
        sample(&metrics(&node.endpoint()), "geolock_otlp_metrics_exports_total", &[]).filter(|n| *n >= 2.0)
    });
}
