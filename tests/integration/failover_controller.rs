//! The failover controller end to end, on loopback with a real BIND9: the primary's three
//! voters are SIGKILLed; the controller and an arbiter see it lost for the detection window;
//! the controller stops granting the write lease, fences (nobody answers), waits the lease out,
//! promotes the standby learner into revision epoch 1, moves the client name's records, verifies
//! with a probe write and lock, and exits. A second controller started beside it waits on the
//! journal's lock, then finds the failover done and does nothing more. Also: a controller
//! SIGKILLed after every record, a primary partitioned rather than killed, and approve mode.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{dig, etcdctl, free_port, lockctl_bg, Cluster};
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
    mode: &str,
    webhook: &Webhook,
) -> std::path::PathBuf {
    let secret = data_encoding::BASE64.encode(&bind.key.secret);
    // The standby's members by name (`l1`, `l2`, ... on loopback, each with an A record in the
    // zone), so that VERIFY's DNS discovery leads to them.
    let srv: Vec<String> = standby_srv(standby).iter().map(|(host, port)| format!("\"{host}:{port}\"")).collect();
    let text = format!(
        "name: standby\nlisten: \"{listen}\"\njournal: \"{journal}\"\nprimary: \"{primary}\"\nstandby: \"{standby}\"\n\
         arbiters: [\"{arbiter}\"]\nepoch: 0\nmode: {mode}\ndetect_window_ms: 1000\nprobe_interval_ms: 200\n\
         write_lease_ms: 1500\nclock_drift_ms: 500\nstep_retry_ms: 1000\n\
         dns:\n  server: \"{server}\"\n  zone: \"{ZONE}\"\n  name: \"{NAME}\"\n  key_name: \"{key}\"\n  key_secret: \"{secret}\"\n\
         \x20 primary: {{ addrs: [\"10.0.1.1\"], srv: [\"n1.us-east.geolock.test:2379\"] }}\n\
         \x20 standby: {{ addrs: [\"127.0.0.1\"], srv: [{srv}] }}\n\
         notify:\n  webhook: \"http://127.0.0.1:{hook}/failover\"\n  attempts: 3\n  timeout_ms: 2000\n",
        hook = webhook.port,
        srv = srv.join(", "),
        journal = dir.join("journal").display(),
        server = bind.addr,
        key = bind.key.name,
    );
    let path = dir.join("controller.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The standby's SRV targets: `l{i}.us-west.geolock.test` for its i-th endpoint, with its port.
fn standby_srv(standby: &str) -> Vec<(String, u16)> {
    standby
        .split(',')
        .enumerate()
        .map(|(i, ep)| {
            (
                format!("l{}.us-west.{}", i + 1, ZONE.trim_end_matches('.')),
                ep.rsplit(':').next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// A webhook receiver: Python's own HTTP server, which answers its first POST with 503 (so
/// NOTIFY must try again) and keeps the bodies of the rest, one JSON document a line.
struct Webhook {
    _proc: crate::common::Proc,
    port: u16,
    bodies: std::path::PathBuf,
}

const WEBHOOK_SERVER: &str = r#"
import http.server, sys
bodies, failures = sys.argv[1], int(sys.argv[2])
class Hook(http.server.BaseHTTPRequestHandler):
    seen = 0
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.seen += 1
        if Hook.seen <= failures:
            self.send_response(503)
        else:
            with open(bodies, "ab") as f:
                f.write(body + b"\n")
            self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

impl Webhook {
    fn start(dir: &Path) -> Webhook {
        let bodies = dir.join("webhook-bodies");
        let log = dir.join("webhook.log");
        let mut cmd = Command::new("python3");
        cmd.args(["-c", WEBHOOK_SERVER, bodies.to_str().unwrap(), "1"]);
        let proc = crate::common::spawn_logged(cmd, &log);
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Ok(port) = std::fs::read_to_string(&log).unwrap_or_default().trim().parse() {
                break port;
            }
            assert!(Instant::now() < deadline, "the webhook receiver did not start: {}", proc.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        Webhook { _proc: proc, port, bodies }
    }

    /// The bodies received (after the first, refused), in order.
    fn bodies(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.bodies).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// Take and release lock `name` `n` times through `endpoints`: the fencing tokens, in order.
fn lock_tokens(endpoints: &str, name: &str, n: usize) -> Vec<i64> {
    crate::common::rt().block_on(async {
        let mut tokens = Vec::new();
        let cluster = geolock_client::Cluster::plain(endpoints);
        for _ in 0..n {
            let mut session = geolock_client::Session::grant(&cluster, 10).await.unwrap();
            let held = geolock_client::acquire(&cluster, name, &mut session).await.unwrap();
            geolock_client::unlock(&cluster, &held.key).await.unwrap();
            session.revoke(&cluster).await;
            tokens.push(held.token);
        }
        tokens
    })
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

/// TCP proxies through which the vantage points (and only they) reach the primary's members:
/// cutting them partitions the primary from the vantage points while it and its own clients go
/// on. (A loopback stand-in for the namespaced harness's link down, in one direction: the
/// primary's leader still reaches the vantage points, which is what it would need to keep its
/// lease, and it loses the lease anyway once the controller stops granting.)
struct VantageView {
    rt: tokio::runtime::Runtime,
    cut: tokio::sync::watch::Sender<bool>,
    addrs: Vec<String>,
}

impl VantageView {
    fn to(ports: &[u16]) -> VantageView {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let cut = tokio::sync::watch::Sender::new(false);
        let mut addrs = Vec::new();
        for &port in ports {
            let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
            addrs.push(listener.local_addr().unwrap().to_string());
            let cut = cut.subscribe();
            rt.spawn(async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    let mut cut = cut.clone();
                    if *cut.borrow() {
                        continue;
                    }
                    tokio::spawn(async move {
                        let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            _ = cut.wait_for(|c| *c) => {}
                        }
                    });
                }
            });
        }
        VantageView { rt, cut, addrs }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

/// A primary of three voters with the write lease, two standby learners, an arbiter, BIND9 with the
/// client name on the primary, and a controller configuration; the voters then SIGKILLed.
struct Scenario {
    dir: tempfile::TempDir,
    /// How the vantage points reach the primary, when not directly.
    view: Option<VantageView>,
    bind: Bind,
    c: Cluster,
    /// The standby learners' member indexes.
    learners: Vec<usize>,
    /// The controller's address (its vantage point, and where approvals go).
    controller: String,
    webhook: Webhook,
    config: std::path::PathBuf,
    _arbiter: crate::common::Proc,
}

impl Scenario {
    /// Everything up, with `controllers` controller processes started on the configuration
    /// (each `GEOLOCK_FAILPOINT`-free) before the primary, which needs one to grant its lease.
    fn start(controllers: usize) -> (Scenario, Vec<crate::common::Proc>) {
        Scenario::start_seen(controllers, false, "auto")
    }

    /// [`Scenario::start`]; with `through_proxies`, the vantage points see the primary only
    /// through a [`VantageView`]; the controllers run in `mode` (`auto` or `approve`).
    fn start_seen(controllers: usize, through_proxies: bool, mode: &str) -> (Scenario, Vec<crate::common::Proc>) {
        let dir = tempfile::tempdir().unwrap();
        let learner_ports = [free_port(), free_port()];
        let standby = learner_ports.map(|p| format!("127.0.0.1:{p}"));
        let mut records = vec![
            format!("{NAME} IN A 10.0.1.1"),
            format!("_etcd-client._tcp.{NAME} IN SRV 0 0 2379 n1.us-east.geolock.test."),
        ];
        records.extend(standby_srv(&standby.join(",")).into_iter().map(|(host, _)| format!("{host}. IN A 127.0.0.1")));
        let bind = Bind::start(dir.path(), ZONE, &records).unwrap();
        let webhook = Webhook::start(dir.path());
        let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (free_port(), free_port())).map(|(c, p)| (c, p, p)).collect();
        let view = through_proxies.then(|| VantageView::to(&ports.iter().map(|p| p.0).collect::<Vec<_>>()));
        let primary = match &view {
            Some(v) => v.addrs.join(","),
            None => ports.iter().map(|p| format!("127.0.0.1:{}", p.0)).collect::<Vec<_>>().join(","),
        };
        let (ctl, arb) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let config = write_config(dir.path(), &ctl, &arb, &primary, &standby.join(","), &bind, mode, &webhook);
        let arbiter = lockctl_bg(
            "",
            &["failover", "vantage", "--listen", &arb, "--primary", &primary, "--probe-interval-ms", "200"],
            &dir.path().join("arbiter.log"),
        );
        let cfg = config.to_str().unwrap().to_string();
        let mut procs = Vec::new();
        for i in 0..controllers {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let log = dir.path().join(format!("controller-{i}.log"));
            procs.push(lockctl_bg("", &["failover-controller", "--config", &cfg], &log));
        }
        if controllers == 0 {
            // The primary needs a majority of its vantage points (two of two) to serve: one
            // controller grants until it journals its first decision, and dies there.
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockctl"));
            cmd.args(["failover-controller", "--config", &cfg]).env("GEOLOCK_FAILPOINT", "die-after-records:1");
            procs.push(crate::common::spawn_logged(cmd, &dir.path().join("controller-life-0.log")));
        }
        let vantages = format!("{ctl},{arb}");
        let mut c = Cluster::start_on(ports, &["--failover-vantages", &vantages, "--failover-write-lease-ms", "1500"]);
        // The standby learner has the primary's flags, as a learner of its cluster often does:
        // once promoted it needs no lease from the vantage points that stopped granting.
        // Two of them: PROMOTE must choose one, and keep to it.
        let learners =
            vec![c.add_learner_on("l1", 0, learner_ports[0]).0, c.add_learner_on("l2", 0, learner_ports[1]).0];
        assert!(etcdctl(&c.endpoint(0), &["put", "k", "before"], None).status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let applied = |s: &str| etcdctl(s, &["get", "k", "--consistency=s", "--print-value-only"], None).stdout;
        while standby.iter().any(|ep| String::from_utf8_lossy(&applied(ep)).trim() != "before") {
            assert!(Instant::now() < deadline, "the learners do not catch up");
            std::thread::sleep(Duration::from_millis(100));
        }
        // DETECT counts only once the controller has seen the primary serve.
        let journal = dir.path().join("journal");
        while !std::fs::read_to_string(&journal).unwrap_or_default().contains("\"Armed\"") {
            assert!(Instant::now() < deadline, "the controller never saw the primary healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        (Scenario { dir, view, bind, c, learners, controller: ctl, webhook, config, _arbiter: arbiter }, procs)
    }

    fn kill_primary(&mut self) {
        for i in 0..3 {
            self.c.kill(i);
        }
    }

    /// The learner PROMOTE chose, from the journal.
    fn promoted(&self) -> String {
        let journal = self.journal();
        let chose =
            journal.lines().find(|l| l.contains("\"Chose\"")).unwrap_or_else(|| panic!("none chosen:\n{journal}"));
        let v: serde_json::Value = serde_json::from_str(chose).unwrap();
        v["record"]["Chose"]["target"].as_str().unwrap().to_string()
    }

    fn journal(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("journal")).unwrap_or_default()
    }

    /// The failover happened once: the name moved, the standby serves the data in epoch 1, one
    /// decision, each step finished once, one promotion, one DNS change.
    fn assert_failed_over_once(&self) {
        assert_eq!(dig(&self.bind, NAME, "A"), ["127.0.0.1"]);
        let srv: Vec<String> = self
            .learners
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let port = self.c.endpoint(i).rsplit(':').next().unwrap().to_string();
                format!("0 0 {port} l{}.us-west.geolock.test.", k + 1)
            })
            .collect();
        let mut srv = srv;
        srv.sort();
        assert_eq!(dig(&self.bind, &format!("_etcd-client._tcp.{NAME}"), "SRV"), srv);
        let promoted = self.promoted();
        let got = etcdctl(&promoted, &["get", "k", "--print-value-only"], None);
        assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "before");
        let put = etcdctl(&promoted, &["put", "k2", "after", "-w", "json"], None);
        let v: serde_json::Value = serde_json::from_slice(&put.stdout).unwrap();
        assert!(v["header"]["revision"].as_i64().unwrap() > 1 << 40, "{v}");
        let journal = self.journal();
        assert_eq!(journal.lines().filter(|l| l.contains("\"Decided\"")).count(), 1, "{journal}");
        for step in ["Fence", "Promote", "Join", "Redirect", "Verify", "Notify"] {
            let finished =
                journal.lines().filter(|l| l.contains("\"Finished\"") && l.contains(&format!("\"{step}\""))).count();
            assert_eq!(finished, 1, "{step} finished {finished} times:\n{journal}");
        }
        // One learner seeded one new cluster, once; the other was wiped once to join it, as a
        // learner (a second voter would need both for every commit).
        let logs: Vec<String> = self.learners.iter().map(|&i| self.c.log(i)).collect();
        let seeded: usize = logs.iter().map(|l| l.matches("seeded cluster").count()).sum();
        assert_eq!(seeded, 1, "{logs:?}");
        let wiped: usize = logs.iter().map(|l| l.matches("wiped to rejoin").count()).sum();
        assert_eq!(wiped, 1, "{logs:?}");
        let members = crate::common::lockctl(&["member", "list", "--endpoints", &promoted]);
        let voters = String::from_utf8_lossy(&members.stdout).lines().filter(|l| l.contains(", false, ")).count();
        assert_eq!(voters, 1, "{}", String::from_utf8_lossy(&members.stdout));
        let named = self.bind.log();
        assert_eq!(named.matches("adding an RR at 'clients.geolock.test' A").count(), 1, "{named}");
    }
}

#[test]
fn a_killed_primary_is_failed_over_once_by_the_controller_and_clients_find_the_standby_by_dns() {
    let (mut s, mut controllers) = Scenario::start(2);
    let before = lock_tokens(&s.c.endpoints(), "failover-lock", 3);
    // ROLLBACK refuses to join a cluster no failover made (the primary, still in epoch 0),
    // before it moves anything.
    let (peer, dir) = (s.c.peer_url(0), s.c.data_dir(0));
    let args = ["failover", "rejoin", "--endpoints", &s.c.endpoints(), "--name", "n1", "--peer-urls", &peer];
    let out = crate::common::lockctl(&[&args[..], &["--data-dir", dir.to_str().unwrap()]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is in revision epoch 0"), "{err}");
    assert!(dir.exists(), "the data was moved for a refused rejoin");
    // The controller's /metrics: armed and watching; then, until it exits, what it shows.
    let metrics = format!("http://{}/metrics", s.controller);
    let shown = crate::common::get(&metrics).1;
    for (name, labels, want) in [
        ("geolock_failover_armed", &[][..], 1.0),
        ("geolock_failover_in_progress", &[], 0.0),
        ("geolock_failover_phase", &[("phase", "watching")], 1.0),
        ("geolock_failover_phase", &[("phase", "running")], 0.0),
    ] {
        assert_eq!(crate::common::sample(&shown, name, labels), Some(want), "{name}{labels:?}:\n{shown}");
    }
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let watcher = {
        let (seen, metrics) = (seen.clone(), metrics.clone());
        std::thread::spawn(move || {
            let client = crate::common::http_client(Duration::from_millis(500));
            let rt = crate::common::rt();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let Ok(text) = rt.block_on(async { client.get(&metrics).send().await?.text().await }) else { break };
                for step in ["fence", "promote", "join", "redirect", "verify", "notify"] {
                    if crate::common::sample(&text, "geolock_failover_step", &[("step", step)]) == Some(1.0) {
                        seen.lock().unwrap().insert(step);
                    }
                }
                if crate::common::sample(&text, "geolock_failover_in_progress", &[]) == Some(1.0) {
                    seen.lock().unwrap().insert("in progress");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let lost = Instant::now();
    s.kill_primary();
    let (ok, log) = wait_exit(&mut controllers[0], Duration::from_secs(60));
    watcher.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    // Polled every 20 ms: the quick steps may come and go between two polls, the others not.
    assert!(seen.contains("in progress") && seen.len() >= 3, "the controller's /metrics showed only {seen:?}");
    let rto = lost.elapsed();
    assert!(ok && log.contains("failed over into revision epoch 1"), "{log}");
    eprintln!("primary killed to failover done: {} ms", rto.as_millis());
    s.assert_failed_over_once();
    let journal_path = s.dir.path().join("journal");
    let status = crate::common::lockctl(&["failover", "status", "--journal", journal_path.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(shown.starts_with("failed over into revision epoch 1\n"), "{shown}");
    for step in ["Fence", "Promote", "Join", "Redirect", "Verify", "Notify"] {
        assert!(shown.contains(&format!("ms {step} finished in ")), "{step}: {shown}");
    }
    eprintln!("{shown}");
    // The lock's fencing tokens go on growing across the failover: a fenced resource that saw
    // the old primary's holders takes the new primary's.
    let after = lock_tokens(&s.promoted(), "failover-lock", 3);
    let tokens = [before.as_slice(), after.as_slice()].concat();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    // The lock tests' fenced resource, fed every holder's token in turn, rejects none.
    let resource = crate::common::FencedResource::default();
    crate::common::rt().block_on(async {
        for t in &tokens {
            resource.write(*t).await;
        }
    });
    assert_eq!(resource.verdict(), Ok(tokens.len()), "{tokens:?}");
    assert!(after.iter().all(|t| *t > 1 << 40), "{after:?}");
    // NOTIFY's webhook, refused once, had the timeline on its second attempt.
    let bodies = s.webhook.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let b = &bodies[0];
    assert_eq!((b["event"].as_str(), b["epoch"].as_u64()), (Some("failed_over"), Some(1)), "{b}");
    assert_eq!(b["promoted"].as_str(), Some(s.promoted().as_str()), "{b}");
    let steps: Vec<&str> = b["steps"].as_array().unwrap().iter().map(|x| x["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["Fence", "Promote", "Join", "Redirect", "Verify"], "{b}");
    assert!(
        b["timeline"].as_array().unwrap().iter().any(|l| l.as_str().unwrap().contains("Promote finished in")),
        "{b}"
    );
    assert!(controllers[0].log().contains("webhook notified in 2 attempt(s)"), "{}", controllers[0].log());

    // The second controller, started beside the first, waited on the journal's lock; once the
    // first is gone it finds the failover done and does nothing.
    let journal = s.journal();
    let (ok, second_log) = wait_exit(&mut controllers[1], Duration::from_secs(30));
    assert!(ok && second_log.contains("another controller holds"), "{second_log}");
    assert!(second_log.contains("failed over into revision epoch 1"), "{second_log}");
    assert_eq!(s.journal(), journal, "the journal grew");
    s.assert_failed_over_once();

    // ROLLBACK: the old primary's n1 rejoins the new primary as a learner, from nothing.
    let promoted = s.promoted();
    let (peer, dir) = (s.c.peer_url(0), s.c.data_dir(0));
    let rejoin = |endpoint: &str| {
        let args = ["failover", "rejoin", "--endpoints", endpoint, "--name", "n1", "--peer-urls", &peer];
        crate::common::lockctl(&[&args[..], &["--data-dir", dir.to_str().unwrap()]].concat())
    };
    let out = rejoin(&promoted);
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && printed.contains("joining the primary in revision epoch 1 as a learner"),
        "{out:?}"
    );
    assert!(!dir.exists(), "{printed}");
    let initial = printed
        .lines()
        .find_map(|l| l.strip_prefix("GEOLOCK_INITIAL_CLUSTER=\""))
        .map(|l| l.trim_end_matches('"').to_string())
        .unwrap_or_else(|| panic!("{printed}"));
    s.c.respawn_into(0, &initial);
    let n1 = s.c.endpoint(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while String::from_utf8_lossy(&etcdctl(&n1, &["get", "k2", "--consistency=s", "--print-value-only"], None).stdout)
        .trim()
        != "after"
    {
        assert!(Instant::now() < deadline, "the rejoined member never caught up:\n{}", s.c.log(0));
        std::thread::sleep(Duration::from_millis(200));
    }
    let members = crate::common::lockctl(&["member", "list", "--endpoints", &promoted]);
    let listed = String::from_utf8_lossy(&members.stdout).into_owned();
    let n1_line = listed.lines().find(|l| l.contains(", n1, ")).unwrap_or_else(|| panic!("{listed}"));
    assert!(n1_line.contains(", true, learner"), "n1 rejoined as a voter: {listed}");
    // A write through it goes to the new primary, in epoch 1.
    let put = etcdctl(&n1, &["put", "k3", "through-n1", "-w", "json"], None);
    let v: serde_json::Value = serde_json::from_slice(&put.stdout).unwrap_or_else(|_| panic!("{put:?}"));
    assert!(v["header"]["revision"].as_i64().unwrap() > 1 << 40, "{v}");
}

#[test]
fn a_controller_killed_after_every_journal_record_and_once_mid_promote_and_mid_join_fails_over_once() {
    let (mut s, mut granting) = Scenario::start(0);
    s.kill_primary();
    let cfg = s.config.to_str().unwrap().to_string();
    let mut lives = 0;
    let mut proc = granting.remove(0);
    // The steps a fresh life has died in, their effect done and not journaled.
    let mut died_in: Vec<&str> = Vec::new();
    loop {
        let (ok, log) = wait_exit(&mut proc, Duration::from_secs(60));
        if ok {
            assert!(log.contains("failed over into revision epoch 1"), "{log}");
            break;
        }
        lives += 1;
        assert!(lives < 40, "no end after {lives} controller lives:\n{}", s.journal());
        // Die after the next record; once, when PROMOTE has started, die in it instead, its
        // promotion made and not journaled; and so in JOIN, its member wiped and added.
        let last = s.journal().lines().last().unwrap_or_default().to_string();
        let mid = ["Promote", "Join"].into_iter().find(|step| {
            !died_in.contains(step) && last.contains("\"Started\"") && last.contains(&format!("\"{step}\""))
        });
        let failpoint = match mid {
            Some(step) => {
                died_in.push(step);
                format!("die-in-step:{step}")
            }
            None => "die-after-records:1".to_string(),
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockctl"));
        cmd.args(["failover-controller", "--config", &cfg]).env("GEOLOCK_FAILPOINT", &failpoint);
        proc = crate::common::spawn_logged(cmd, &s.dir.path().join(format!("controller-life-{lives}.log")));
    }
    assert_eq!(died_in, ["Promote", "Join"], "steps not entered by a fresh life");
    eprintln!("{lives} controller lives");
    // Every record but `Armed` and `Detected` ones ended a life.
    let progress = s.journal().lines().filter(|l| !l.contains("\"Armed\"") && !l.contains("\"Detected\"")).count();
    assert!(lives >= progress, "{lives} lives for {progress} records:\n{}", s.journal());
    s.assert_failed_over_once();
}

#[test]
fn a_primary_partitioned_from_its_vantage_points_stops_writing_before_the_standby_is_promoted() {
    let (mut s, mut controllers) = Scenario::start_seen(1, true, "auto");
    // The old primary's members only (not the learner, which becomes the new primary).
    let old = (0..3).map(|i| s.c.endpoint(i)).collect::<Vec<_>>().join(",");
    // The primary's own clients write all along; each write's invocation and outcome recorded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, old) = (stop.clone(), old.clone());
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let wall = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
                let invoked = wall();
                let out = etcdctl(&old, &["--command-timeout=1s", "put", &format!("w{n}"), "x"], None);
                if out.status.success() {
                    acked.push((n, invoked, wall()));
                }
                n += 1;
            }
            (acked, n)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    s.view.as_ref().unwrap().cut();
    let (ok, log) = wait_exit(&mut controllers[0], Duration::from_secs(60));
    assert!(ok && log.contains("failed over into revision epoch 1"), "{log}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, tried) = writer.join().unwrap();
    if let Some(v) = s.view.take() {
        v.rt.shutdown_background();
    }

    // No write the old primary acknowledged was invoked after its lease could last, as the
    // controller computed it when it decided (and before it promoted).
    let journal = s.journal();
    let decided: serde_json::Value = journal
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["record"].get("Decided").is_some())
        .unwrap();
    let lapse = decided["record"]["Decided"]["lease_lapses_at_ms"].as_u64().unwrap();
    assert!(!acked.is_empty() && acked.len() < tried, "{} of {tried} writes acknowledged", acked.len());
    // The acknowledgement itself came before the lapse: the leader acknowledges nothing that
    // commits after its own lease, which ends before the controller's wait does.
    let late: Vec<_> = acked.iter().filter(|(_, _, completed)| *completed >= lapse).collect();
    assert!(late.is_empty(), "the old primary acknowledged writes after its lease lapsed: {late:?}");
    let last = acked.iter().map(|(_, _, t)| *t).max().unwrap();
    eprintln!(
        "old primary: {} of {tried} writes acknowledged, the last acknowledged {} ms before the lapse",
        acked.len(),
        lapse - last
    );
    s.assert_failed_over_once();

    // The old primary refuses writes, also once its members restart (with their flags): no
    // vantage point majority grants it a lease again (the controller is gone, the arbiter is
    // one of two).
    for i in 0..3 {
        s.c.kill(i);
        s.c.respawn(i);
    }
    std::thread::sleep(Duration::from_secs(3));
    let out = etcdctl(&old, &["--command-timeout=2s", "put", "after-restart", "x"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("holds no region write lease"), "{err}");
}

/// Approve mode: with the primary lost, the controller journals that it awaits approval and does
/// nothing more; a wrong token is refused by name; the token `lockctl failover status` prints
/// starts the failover, which runs to the end as in auto mode.
#[test]
fn in_approve_mode_the_controller_waits_for_the_operators_token() {
    let (mut s, mut controllers) = Scenario::start_seen(1, false, "approve");
    s.kill_primary();
    let journal = s.dir.path().join("journal");
    let status = || {
        let out = crate::common::lockctl(&["failover", "status", "--journal", journal.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let shown = loop {
        let shown = status();
        if shown.starts_with("awaiting approval: ") {
            break shown;
        }
        assert!(Instant::now() < deadline, "no approval awaited: {shown}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let token = shown.split("--token ").nth(1).and_then(|t| t.split(' ').next()).unwrap().to_string();
    // The webhook was told, with the same token, on its second attempt. (A probe that
    // answered once more after the kill can end one wait and start another, with a new
    // token, before the status is read: the one shown is the one that counts.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let told = loop {
        let bodies = s.webhook.bodies();
        if let Some(b) = bodies.iter().find(|b| b["token"].as_str() == Some(token.as_str())) {
            break b.clone();
        }
        assert!(Instant::now() < deadline, "the webhook was not told of the approval awaited: {bodies:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(told["event"].as_str(), Some("awaiting_approval"), "{told}");
    // Well past another detection window, nothing is decided without the operator.
    std::thread::sleep(Duration::from_millis(2_000));
    assert!(!s.journal().contains("\"Decided\""), "{}", s.journal());

    let approve =
        |token: &str| crate::common::lockctl(&["failover", "approve", "--endpoints", &s.controller, "--token", token]);
    let wrong = format!("{:x}", u64::from_str_radix(&token, 16).unwrap() ^ 1);
    let out = approve(&wrong);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("approval refused: not the approval token this failover awaits"),
        "{err}"
    );
    let out = approve("not-hex");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("an approval token is hexadecimal"));
    assert!(!s.journal().contains("\"Decided\""));

    let out = approve(&token);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "approved: failing over into revision epoch 1\n", "{out:?}");
    let (ok, log) = wait_exit(&mut controllers[0], Duration::from_secs(60));
    assert!(ok && log.contains("failed over into revision epoch 1"), "{log}");
    s.assert_failed_over_once();
}

/// Two of the primary's three voters SIGKILLed: no leader, so the primary is lost, but FENCE
/// reaches the third, which records the fence and refuses writes by name; what it had applied
/// and where the new cluster started give the lost window, in the journal and the status.
#[test]
fn a_primary_member_left_standing_is_fenced_and_tells_the_lost_window() {
    let (mut s, mut controllers) = Scenario::start(1);
    s.c.kill(0);
    s.c.kill(1);
    let (ok, log) = wait_exit(&mut controllers[0], Duration::from_secs(60));
    assert!(ok && log.contains("failed over into revision epoch 1"), "{log}");
    s.assert_failed_over_once();
    let left = s.c.endpoint(2);
    let put = crate::common::put_outcome(&left, "k", "stale", "2s");
    assert!(!put.0 && put.1.contains("fenced by the failover to revision epoch 1"), "{put:?}");

    let journal = s.dir.path().join("journal");
    let out = crate::common::lockctl(&["failover", "status", "--journal", journal.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    let window = shown.lines().find(|l| l.starts_with("lost window: ")).unwrap_or_else(|| panic!("{shown}"));
    // "lost window: N entries (the old primary applied up to index A, the new cluster started from B)"
    let numbers: Vec<u64> =
        window.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).map(|w| w.parse().unwrap()).collect();
    let [lost, old, new] = numbers[..] else { panic!("{window}") };
    assert!(old >= new && lost == old - new && new > 0, "{window}");
    assert!(log.contains(window), "the controller's log tells the same: {log}");
    eprintln!("two of three voters killed, the third fenced: {window}");
}
