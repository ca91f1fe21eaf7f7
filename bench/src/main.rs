//! Side-by-side benchmarks: the same load, from the same Rust client (`etcd-client`), against a
//! single-member etcd (Debian's etcd-server, fsync on) and a single geolock node, started on
//! this machine in one run. Machines here are noisy, so the figures that matter are the ratios.
//!
//! `cargo build --workspace && cargo run -p geolock-bench -- kv` (or `-- lock`)

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use etcd_client::{Client, ConnectOptions, GetOptions, LockOptions};
use geolock_testkit::launch::{free_port, MemberFlags};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    what: What,
    /// Seconds each workload runs against each server (in one-second slices, alternating).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The lockctl binary (default: the workspace's debug build).
    #[arg(long)]
    lockctl: Option<PathBuf>,
}

#[derive(Subcommand)]
enum What {
    /// Put (256-byte values) at 1 and 16 clients, linearizable Range at 1 and 16 clients.
    Kv,
    /// Lock+Unlock cycles: 16 clients on their own names, and 8 clients on one name.
    Lock,
    /// Three members each: put at 16 and 1 clients, then SIGKILL of the leader to the first
    /// acknowledged write.
    Cluster,
    /// The 2+2+1 topology (regions/2-2-1.yaml) emulated on this machine: put latency from the
    /// leader's region, watch delivery on the other data region's learner, and the time from
    /// losing the leader's region to the first acknowledged write. geolock only: the WAN relay
    /// carries QUIC (UDP), and etcd's peers speak TCP.
    Geo,
    /// The active-passive topology (regions/active-passive.yaml) emulated on this machine, its
    /// primary region lost (SIGKILL and link down) RUNS times, each on a fresh cluster: the
    /// failover's timeline from the controller's journal (detect, fence, lease wait, promote,
    /// join, redirect, verify) and the first write a client in the standby region gets
    /// acknowledged through the DNS name. geolock only: etcd has no region failover.
    Failover {
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// What metrics cost: put and range throughput of one geolock node with `--metrics off`, one
    /// with `--metrics extensive` scraped every second (Prometheus scrapes every 15 s to 1
    /// min), and one with `extensive` pushed over OTLP every second (OpenTelemetry's default is
    /// 60 s) to a receiver in this process; etcd beside them for scale.
    Metrics,
    /// What authentication costs: put and range throughput of etcd and geolock, each with auth
    /// off and with auth on (clients logged in as root, simple tokens, bcrypt cost 10 on both);
    /// then three members of each with auth on take AUTHENTICATE_STORM Authenticate calls at
    /// once, spread over the members, while one client keeps writing: how long they all take,
    /// the slowest write meanwhile, and whether the leader changed (bcrypt must not starve
    /// heartbeats).
    Auth,
    /// What tracing costs: put and range throughput of one geolock node with tracing off, one
    /// sampling 1 % to a live OTLP receiver (in this process), and one sampling every request
    /// to a collector address where nothing listens (its export queue overflows, and requests
    /// must not notice).
    Tracing,
}

/// A cluster of three server processes, SIGKILLed on drop.
struct Group {
    name: &'static str,
    children: Vec<Option<Child>>,
    /// Program, arguments and log file of each member, to restart it.
    commands: Vec<(PathBuf, Vec<std::ffi::OsString>, PathBuf)>,
    endpoints: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Group {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Three etcd members, or three geolock members with generated peer certificates.
fn spawn_group(name: &'static str, lockctl: Option<&std::path::Path>) -> Group {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial = (0..3).map(|i| format!("m{i}=http://127.0.0.1:{}", ports[i].1)).collect::<Vec<_>>().join(",");
    let certs = dir.path().join("certs");
    if let Some(l) = lockctl {
        let run = |args: &[&str]| assert!(Command::new(l).args(args).output().unwrap().status.success());
        run(&["certs", "init", "--dir", certs.to_str().unwrap()]);
        for i in 0..3 {
            run(&[
                "certs",
                "issue",
                "--dir",
                certs.to_str().unwrap(),
                "--name",
                &format!("m{i}"),
                "--host",
                "127.0.0.1",
            ]);
        }
    }
    let mut commands = Vec::new();
    for (i, (cp, pp)) in ports.iter().enumerate() {
        let member = format!("m{i}");
        let flags = MemberFlags {
            initial_cluster: initial.clone(),
            ..MemberFlags::single(&member, dir.path().join(&member), *cp, *pp)
        };
        let (program, args) = match lockctl {
            Some(l) => (l.to_path_buf(), flags.lockctl_start(Some(&certs))),
            None => (PathBuf::from("etcd"), flags.args()),
        };
        commands.push((program, args, dir.path().join(format!("{member}.log"))));
    }
    let mut g = Group {
        name,
        children: vec![None, None, None],
        commands,
        endpoints: ports.iter().map(|(cp, _)| format!("127.0.0.1:{cp}")).collect(),
        _dir: dir,
    };
    for i in 0..3 {
        g.start(i);
    }
    g
}

impl Group {
    /// Start (or restart, on its data directory) member `i`.
    fn start(&mut self, i: usize) {
        let (program, args, log) = &self.commands[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
    }

    /// Wait until every member answers Status and names the same leader.
    async fn wait_whole(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut leaders = Vec::new();
            for ep in &self.endpoints {
                if let Some(s) = member_status(ep).await {
                    leaders.push(s.leader());
                }
            }
            if leaders.len() == self.endpoints.len() && leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0]) {
                return;
            }
            assert!(Instant::now() < deadline, "{}: members did not settle on one leader", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Maintenance.Status of the member at `ep`, if it answers within a couple of seconds.
async fn member_status(ep: &str) -> Option<etcd_client::StatusResponse> {
    let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1)).with_timeout(Duration::from_secs(2));
    Client::connect([ep], Some(opts)).await.ok()?.status().await.ok()
}

/// Index of the member that leads.
async fn group_leader(g: &Group) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, ep) in g.endpoints.iter().enumerate() {
            if g.children[i].is_none() {
                continue;
            }
            if let Some(s) = member_status(ep).await {
                if s.leader() == s.header().map_or(0, |h| h.member_id()) {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "{}: no leader", g.name);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL the leader while one client writes through the other members; the time from the
/// kill to the first acknowledged write. The killed member is restarted and rejoins before this
/// returns.
async fn failover(g: &mut Group) -> Duration {
    let leader = group_leader(g).await;
    let mut others = Vec::new();
    for (i, ep) in g.endpoints.iter().enumerate() {
        if i != leader {
            others.push(connect(ep).await);
        }
    }
    others[0].put("failover/warm", "x", None).await.unwrap();
    let mut child = g.children[leader].take().unwrap();
    let killed = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut n = 0usize;
    loop {
        let c = &mut others[n % 2];
        n += 1;
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), c.put("failover/after", "x", None)).await {
            let took = killed.elapsed();
            g.start(leader);
            g.wait_whole().await;
            // Give the restarted member time to catch up before its next use.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return took;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "{}: no write acknowledged after the kill", g.name);
    }
}

/// A server process, SIGKILLed on drop.
struct Server {
    name: &'static str,
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &'static str, program: &std::path::Path, prefix: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (cp, pp) = (free_port(), free_port());
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = Command::new(program)
        .args(prefix)
        .args(MemberFlags::single("bench", dir.path().join("data"), cp, pp).args())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    Server { name, child, endpoint: format!("127.0.0.1:{cp}"), _dir: dir }
}

/// A client of `endpoint` (`host:port`, or `user:password@host:port` to log in), once the
/// server answers.
async fn connect(endpoint: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (user, at) = match endpoint.rsplit_once('@') {
        Some((user, at)) => (user.split_once(':'), at),
        None => (None, endpoint),
    };
    loop {
        let mut opts =
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(10));
        if let Some((name, password)) = user {
            opts = opts.with_user(name, password);
        }
        if let Ok(mut c) = Client::connect([at], Some(opts)).await {
            if c.get("bench-ready", None).await.is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "{endpoint} not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Throughput and latency of one workload.
struct Figures {
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Clone, Copy)]
enum Op {
    Put,
    Get,
}

/// Run `op` from `clients` connections against each endpoint, in one-second slices that
/// alternate between the endpoints for `seconds` rounds: this machine's speed drifts over a run,
/// and alternating gives both servers the same drift, so their ratio means something.
async fn side_by_side(endpoints: &[&str], op: Op, clients: usize, seconds: u64) -> Vec<Figures> {
    let value = Arc::new(vec![b'v'; 256]);
    let mut conns = Vec::new();
    for ep in endpoints {
        let mut cs = Vec::new();
        for _ in 0..clients {
            cs.push(connect(ep).await);
        }
        cs[0].put("bench/read", value.to_vec(), None).await.unwrap();
        conns.push(cs);
    }
    let mut samples: Vec<(Vec<Duration>, Duration)> = endpoints.iter().map(|_| (Vec::new(), Duration::ZERO)).collect();
    for _ in 0..seconds {
        for (cs, (lat, elapsed)) in conns.iter().zip(samples.iter_mut()) {
            let started = Instant::now();
            lat.extend(slice(cs, op, &value, started + Duration::from_secs(1)).await);
            *elapsed += started.elapsed();
        }
    }
    samples
        .into_iter()
        .map(|(mut all, elapsed)| {
            all.sort();
            Figures {
                ops_per_s: all.len() as f64 / elapsed.as_secs_f64(),
                p50_ms: pct(&all, 0.50),
                p99_ms: pct(&all, 0.99),
            }
        })
        .collect()
}

/// Bytes of values each server takes before anything is measured.
const WARM_UP_BYTES: usize = 192 * 1024 * 1024;

/// Put [`WARM_UP_BYTES`] of 64 KiB values into each endpoint from 16 connections, then compact
/// them away, so that each server is measured in its steady state rather than its first minutes:
/// etcd preallocates its WAL segments when it creates them, RocksDB reuses its WAL files once the
/// first ones retire.
async fn warm_up(endpoints: &[&str]) {
    const CLIENTS: usize = 16;
    let value = vec![b'w'; 64 * 1024];
    let per_client = WARM_UP_BYTES / value.len() / CLIENTS;
    println!("warm-up: {} MiB of 64 KiB puts into each server, then compacted away", WARM_UP_BYTES >> 20);
    for ep in endpoints {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (ep, value) = (ep.to_string(), value.clone());
                tokio::spawn(async move {
                    let mut c = connect(&ep).await;
                    for n in 0..per_client {
                        c.put(format!("warm/{i}/{}", n % 8), value.clone(), None).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = connect(ep).await;
        let rev = c.get("warm/0/0", None).await.unwrap().header().unwrap().revision();
        c.delete("warm/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
        c.compact(rev, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
    }
}

/// Latencies of `op` from every connection, each running closed-loop until `until`.
async fn slice(conns: &[Client], op: Op, value: &Arc<Vec<u8>>, until: Instant) -> Vec<Duration> {
    let tasks: Vec<_> = conns
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, mut c)| {
            let value = value.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < until {
                    let t = Instant::now();
                    match op {
                        Op::Put => {
                            c.put(format!("bench/{i}/{}", n % 1000), value.to_vec(), None).await.unwrap();
                        }
                        Op::Get => {
                            c.get("bench/read", Some(GetOptions::new())).await.unwrap();
                        }
                    }
                    lat.push(t.elapsed());
                    n += 1;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Lock figures: cycles per second, lock wait (Lock sent to Lock returned) and hand-over
/// (the holder's Unlock sent to the next Lock returned, contended only).
struct LockFigures {
    cycles_per_s: f64,
    wait: Vec<Duration>,
    handover: Vec<Duration>,
}

/// Leader kills per server in `cluster`.
const FAILOVER_ROUNDS: usize = 5;

/// The median of `v`.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A percentile in milliseconds (NaN if there are no samples; printed as "NaN").
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

async fn run_locks(endpoint: &str, clients: usize, shared_name: bool, seconds: u64) -> LockFigures {
    let mut conns = Vec::new();
    for _ in 0..clients {
        let mut c = connect(endpoint).await;
        let lease = c.lease_grant(60, None).await.unwrap().id();
        conns.push((c, lease));
    }
    let unlock_sent: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, (mut c, lease))| {
            let unlock_sent = unlock_sent.clone();
            let name = if shared_name { "bench-lock".to_string() } else { format!("bench-lock-{i}") };
            tokio::spawn(async move {
                let (mut wait, mut handover) = (Vec::new(), Vec::new());
                while Instant::now() < until {
                    let t = Instant::now();
                    let key =
                        c.lock(name.as_str(), Some(LockOptions::new().with_lease(lease))).await.unwrap().key().to_vec();
                    let got = Instant::now();
                    wait.push(got - t);
                    if let Some(sent) = unlock_sent.lock().unwrap().take() {
                        handover.push(got - sent);
                    }
                    if shared_name {
                        *unlock_sent.lock().unwrap() = Some(Instant::now());
                    }
                    c.unlock(key).await.unwrap();
                }
                (wait, handover)
            })
        })
        .collect();
    let (mut wait, mut handover) = (Vec::new(), Vec::new());
    for t in tasks {
        let (w, h) = t.await.unwrap();
        wait.extend(w);
        handover.extend(h);
    }
    let elapsed = started.elapsed().as_secs_f64();
    wait.sort();
    handover.sort();
    LockFigures { cycles_per_s: wait.len() as f64 / elapsed, wait, handover }
}

/// Put and range throughput of `servers` side by side, and for each `(i, base, what)` of
/// `compared` the ratio of server `i`'s figures to server `base`'s.
async fn compare_costs(servers: &[&Server], compared: &[(usize, usize, &str)], seconds: u64) {
    let endpoints: Vec<&str> = servers.iter().map(|s| s.endpoint.as_str()).collect();
    println!("{:<30} {:>30} {:>10} {:>9} {:>9}", "workload", "server", "ops/s", "p50 ms", "p99 ms");
    for (label, op, clients) in [
        ("put 256 B, 16 clients", Op::Put, 16),
        ("put 256 B, 1 client", Op::Put, 1),
        ("linearizable range, 16 clients", Op::Get, 16),
    ] {
        let figs = side_by_side(&endpoints, op, clients, seconds).await;
        for (s, f) in servers.iter().zip(&figs) {
            println!("{label:<30} {:>30} {:>10.0} {:>9.2} {:>9.2}", s.name, f.ops_per_s, f.p50_ms, f.p99_ms);
        }
        for (i, base, what) in compared {
            let (b, f) = (&figs[*base], &figs[*i]);
            println!(
                "{label:<30} {what:>30} throughput x{:.3} (cost {:+.1} %), p50 x{:.3}, p99 x{:.3}",
                f.ops_per_s / b.ops_per_s,
                (1.0 - f.ops_per_s / b.ops_per_s) * 100.0,
                f.p50_ms / b.p50_ms,
                f.p99_ms / b.p99_ms
            );
        }
    }
}

/// Authenticate calls made at once in the `auth` workload.
const AUTHENTICATE_STORM: usize = 1000;

/// Password of the benches' root user.
const ROOT_PASSWORD: &str = "rootpw";

/// Add user root with role root at `endpoint` and turn authentication on; the endpoint to
/// log in as root there.
async fn enable_root(endpoint: &str) -> String {
    let mut c = connect(endpoint).await;
    c.user_add("root", ROOT_PASSWORD, None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.auth_enable().await.unwrap();
    format!("root:{ROOT_PASSWORD}@{endpoint}")
}

/// The `auth` workload: see [`What::Auth`].
async fn auth_cost(lockctl: &std::path::Path, seconds: u64) {
    let etcd_off = spawn("etcd auth off", std::path::Path::new("etcd"), &[]);
    let mut etcd_on = spawn("etcd auth on", std::path::Path::new("etcd"), &[]);
    let geo_off = spawn("geolock auth off", lockctl, &["start"]);
    let mut geo_on = spawn("geolock auth on", lockctl, &["start"]);
    for s in [&mut etcd_on, &mut geo_on] {
        s.endpoint = enable_root(&s.endpoint).await;
    }
    let servers = [&etcd_off, &etcd_on, &geo_off, &geo_on];
    let endpoints: Vec<&str> = servers.iter().map(|s| s.endpoint.as_str()).collect();
    warm_up(&endpoints).await;
    let compared = [(1, 0, "etcd on / off"), (3, 2, "geolock on / off"), (3, 1, "geolock on / etcd on")];
    compare_costs(&servers, &compared, seconds).await;
    drop((etcd_off, etcd_on, geo_off, geo_on));

    println!(
        "{:<10} {:>14} {:>12} {:>12} {:>16} {:>14}",
        "server", "authenticates", "all done s", "per call ms", "slowest put ms", "leader changed"
    );
    let etcd = spawn_group("etcd", None);
    let geo = spawn_group("geolock", Some(lockctl));
    for g in [&etcd, &geo] {
        g.wait_whole().await;
        let leader = group_leader(g).await;
        let as_root = enable_root(&g.endpoints[leader]).await;
        // geolock answers Status only to a user while auth is on (as etcd 3.6).
        let status = || async { connect(&as_root).await.status().await.ok() };
        let before = status().await.expect("leader status");
        let mut conns = Vec::new();
        for ep in &g.endpoints {
            conns.push(connect(&format!("root:{ROOT_PASSWORD}@{ep}")).await);
        }
        let mut writer = connect(&as_root).await;
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        // The slowest write, and how many failed (a failure's time counts as its latency).
        let writes = tokio::spawn(async move {
            let (mut slowest, mut failed) = (Duration::ZERO, 0);
            loop {
                let t = Instant::now();
                tokio::select! {
                    r = writer.put("bench/auth-storm", "v", None) => failed += usize::from(r.is_err()),
                    _ = &mut stop => return (slowest, failed),
                }
                slowest = slowest.max(t.elapsed());
            }
        });
        let started = Instant::now();
        let calls: Vec<_> = (0..AUTHENTICATE_STORM)
            .map(|i| {
                let mut auth = conns[i % conns.len()].auth_client();
                tokio::spawn(async move { auth.authenticate("root".into(), ROOT_PASSWORD.into()).await.map(drop) })
            })
            .collect();
        let mut failed = 0;
        for c in calls {
            if !matches!(c.await, Ok(Ok(()))) {
                failed += 1;
            }
        }
        let all_done = started.elapsed();
        let _ = stop_tx.send(());
        let (slowest, puts_failed) = writes.await.unwrap();
        let after = status().await;
        let changed = match &after {
            Some(a) if a.raft_term() == before.raft_term() && a.leader() == before.leader() => "no".to_string(),
            Some(a) => format!("term {} -> {}", before.raft_term(), a.raft_term()),
            None => "no answer".to_string(),
        };
        println!(
            "{:<10} {:>14} {:>12.2} {:>12.2} {:>16} {:>14}",
            g.name,
            format!("{}{}", AUTHENTICATE_STORM, if failed > 0 { format!(" ({failed} failed)") } else { String::new() }),
            all_done.as_secs_f64(),
            all_done.as_secs_f64() * 1000.0 / AUTHENTICATE_STORM as f64,
            format!(
                "{:.1}{}",
                slowest.as_secs_f64() * 1000.0,
                if puts_failed > 0 { format!(" ({puts_failed} failed)") } else { String::new() }
            ),
            changed
        );
    }
}

/// The `tracing` workload: see [`What::Tracing`].
async fn tracing_cost(lockctl: &std::path::Path, seconds: u64) {
    let (receiver, live) = geolock_testkit::otlp::OtlpReceiver::start().await.unwrap();
    let dead = format!("127.0.0.1:{}", free_port());
    let traced = |collector: &str, rate: &str| {
        [
            "start".to_string(),
            "--experimental-enable-distributed-tracing".into(),
            "--experimental-distributed-tracing-address".into(),
            collector.to_string(),
            "--experimental-distributed-tracing-sampling-rate".into(),
            rate.to_string(),
        ]
    };
    let (one_pct, all) = (traced(&live, "10000"), traced(&dead, "1000000"));
    let off = spawn("geolock tracing off", lockctl, &["start"]);
    let sampled = spawn("geolock 1 %, receiver up", lockctl, &one_pct.iter().map(String::as_str).collect::<Vec<_>>());
    let down = spawn("geolock 100 %, collector down", lockctl, &all.iter().map(String::as_str).collect::<Vec<_>>());
    let servers = [&off, &sampled, &down];
    let endpoints: Vec<&str> = servers.iter().map(|s| s.endpoint.as_str()).collect();
    warm_up(&endpoints).await;
    compare_costs(&servers, &[(1, 0, "1 % / off"), (2, 0, "collector down / off")], seconds).await;
    println!("spans received from the 1 % node: {}", receiver.count());
}

/// The `metrics` workload: see [`What::Metrics`].
async fn metrics_cost(lockctl: &std::path::Path, seconds: u64) {
    let etcd = spawn("etcd", std::path::Path::new("etcd"), &[]);
    let off = spawn("geolock metrics off", lockctl, &["start", "--metrics", "off"]);
    let on = spawn("geolock metrics extensive", lockctl, &["start", "--metrics", "extensive"]);
    let (receiver, collector) = geolock_testkit::otlp::OtlpReceiver::start().await.unwrap();
    let pushed = spawn(
        "geolock extensive, OTLP 1 s",
        lockctl,
        &[
            "start",
            "--metrics",
            "extensive",
            "--otlp-metrics-address",
            &collector,
            "--otlp-metrics-interval-ms",
            "1000",
        ],
    );
    let servers = [&etcd, &off, &on, &pushed];
    let endpoints: Vec<&str> = servers.iter().map(|s| s.endpoint.as_str()).collect();
    warm_up(&endpoints).await;
    let scraped = on.endpoint.clone();
    let scraper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Ok(mut conn) = tokio::net::TcpStream::connect(&scraped).await else { continue };
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let req = format!("GET /metrics HTTP/1.1\r\nHost: {scraped}\r\nConnection: close\r\n\r\n");
            let mut body = Vec::new();
            if conn.write_all(req.as_bytes()).await.is_ok() {
                let _ = conn.read_to_end(&mut body).await;
            }
        }
    });
    let compared = [(2, 1, "metrics on / off"), (3, 1, "OTLP export / off"), (3, 2, "OTLP export / on")];
    compare_costs(&servers, &compared, seconds).await;
    scraper.abort();
    println!("metric exports received from the OTLP node: {}", receiver.metric_exports().len());
}

fn main() {
    let cli = Cli::parse();
    let lockctl =
        cli.lockctl.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lockctl"));
    assert!(lockctl.exists(), "{} not found: run `cargo build --workspace` first", lockctl.display());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match cli.what {
        What::Kv => {
            let etcd = spawn("etcd", std::path::Path::new("etcd"), &[]);
            let geo = spawn("geolock", &lockctl, &["start"]);
            let workloads = [
                ("put 256 B, 1 client", Op::Put, 1),
                ("put 256 B, 16 clients", Op::Put, 16),
                ("linearizable range, 1 client", Op::Get, 1),
                ("linearizable range, 16 clients", Op::Get, 16),
            ];
            rt.block_on(warm_up(&[&etcd.endpoint, &geo.endpoint]));
            println!(
                "{:<32} {:>10} {:>10} {:>9} {:>9} | ratio geolock/etcd",
                "workload", "server", "ops/s", "p50 ms", "p99 ms"
            );
            for (label, op, clients) in workloads {
                let figs = rt.block_on(side_by_side(&[&etcd.endpoint, &geo.endpoint], op, clients, cli.seconds));
                for (s, f) in [&etcd, &geo].iter().zip(&figs) {
                    println!("{label:<32} {:>10} {:>10.0} {:>9.2} {:>9.2}", s.name, f.ops_per_s, f.p50_ms, f.p99_ms);
                }
                let (e, g) = (&figs[0], &figs[1]);
                println!(
                    "{label:<32} {:>10} {:>10.2} {:>9.2} {:>9.2} | throughput x{:.2}, p50 x{:.2}, p99 x{:.2}",
                    "ratio",
                    g.ops_per_s / e.ops_per_s,
                    g.p50_ms / e.p50_ms,
                    g.p99_ms / e.p99_ms,
                    g.ops_per_s / e.ops_per_s,
                    g.p50_ms / e.p50_ms,
                    g.p99_ms / e.p99_ms
                );
            }
        }
        What::Cluster => {
            let mut etcd = spawn_group("etcd", None);
            let mut geo = spawn_group("geolock", Some(&lockctl));
            rt.block_on(async {
                let (e, g) = (group_leader(&etcd).await, group_leader(&geo).await);
                warm_up(&[&etcd.endpoints[e], &geo.endpoints[g]]).await
            });
            println!(
                "{:<34} {:>8} {:>10} {:>9} {:>9}",
                "workload (3 members each)", "server", "ops/s", "p50 ms", "p99 ms"
            );
            for (label, clients) in [("put 256 B, 16 clients", 16), ("put 256 B, 1 client", 1)] {
                let figs = rt.block_on(async {
                    let (e, g) = (group_leader(&etcd).await, group_leader(&geo).await);
                    side_by_side(&[&etcd.endpoints[e], &geo.endpoints[g]], Op::Put, clients, cli.seconds).await
                });
                for (g, f) in [&etcd, &geo].iter().zip(&figs) {
                    println!("{label:<34} {:>8} {:>10.0} {:>9.2} {:>9.2}", g.name, f.ops_per_s, f.p50_ms, f.p99_ms);
                }
                let (e, g) = (&figs[0], &figs[1]);
                println!(
                    "{label:<34} {:>8} throughput x{:.2}, p50 x{:.2}, p99 x{:.2}",
                    "ratio",
                    g.ops_per_s / e.ops_per_s,
                    g.p50_ms / e.p50_ms,
                    g.p99_ms / e.p99_ms
                );
            }
            // Elections are randomised: one kill says little, so each server gets several,
            // alternating, and the medians are compared.
            let (mut e, mut g) = (Vec::new(), Vec::new());
            for _ in 0..FAILOVER_ROUNDS {
                e.push(rt.block_on(failover(&mut etcd)).as_secs_f64() * 1000.0);
                g.push(rt.block_on(failover(&mut geo)).as_secs_f64() * 1000.0);
            }
            let show = |v: &[f64]| v.iter().map(|ms| format!("{ms:.0}")).collect::<Vec<_>>().join(" ");
            println!("{:<34} etcd {} ms; geolock {} ms", "leader SIGKILL to first ack", show(&e), show(&g));
            let (em, gm) = (median(&mut e), median(&mut g));
            println!("{:<34} etcd {em:.0} ms, geolock {gm:.0} ms, ratio x{:.2}", "  median of the above", gm / em);
        }
        What::Metrics => rt.block_on(metrics_cost(&lockctl, cli.seconds)),
        What::Tracing => rt.block_on(tracing_cost(&lockctl, cli.seconds)),
        What::Auth => rt.block_on(auth_cost(&lockctl, cli.seconds)),
        What::Geo => rt.block_on(geo(&lockctl, cli.seconds)),
        What::Failover { runs } => rt.block_on(region_failover(&lockctl, runs)),
        What::Lock => {
            let etcd = spawn("etcd", std::path::Path::new("etcd"), &[]);
            let geo = spawn("geolock", &lockctl, &["start"]);
            let workloads =
                [("uncontended, 16 clients, own names", 16, false), ("contended, 8 clients, one name", 8, true)];
            println!(
                "{:<36} {:>8} {:>10} {:>9} {:>9} {:>12} {:>12}",
                "workload", "server", "cycles/s", "wait p50", "wait p99", "handover p50", "handover p99"
            );
            for (label, clients, shared) in workloads {
                let mut figs = Vec::new();
                for s in [&etcd, &geo] {
                    let f = rt.block_on(run_locks(&s.endpoint, clients, shared, cli.seconds));
                    println!(
                        "{label:<36} {:>8} {:>10.0} {:>9.2} {:>9.2} {:>12.2} {:>12.2}",
                        s.name,
                        f.cycles_per_s,
                        pct(&f.wait, 0.5),
                        pct(&f.wait, 0.99),
                        pct(&f.handover, 0.5),
                        pct(&f.handover, 0.99)
                    );
                    figs.push(f);
                }
                let (e, g) = (&figs[0], &figs[1]);
                println!(
                    "{label:<36} {:>8} cycles/s x{:.2}, wait p50 x{:.2}, handover p50 x{:.2}, handover p99 x{:.2}",
                    "ratio",
                    g.cycles_per_s / e.cycles_per_s,
                    pct(&g.wait, 0.5) / pct(&e.wait, 0.5),
                    pct(&g.handover, 0.5) / pct(&e.handover, 0.5),
                    pct(&g.handover, 0.99) / pct(&e.handover, 0.99)
                );
            }
        }
    }
}

/// The `geo` workloads; see [`What::Geo`].
async fn geo(lockctl: &std::path::Path, seconds: u64) {
    use geolock_testkit::geo::{GeoCluster, GeoOptions};
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../regions/2-2-1.yaml");
    let topology = geolock_testkit::topology::Topology::load(&file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = GeoOptions::new(lockctl.to_path_buf(), dir.path().to_path_buf());
    let regions = if opts.namespaces { "a network namespace per region" } else { "loopback addresses per region" };
    let mut g = GeoCluster::start(topology, opts).await.unwrap_or_else(|e| panic!("{e}"));
    println!("2+2+1 on this machine ({regions}); round trips: us-east/us-west 60 ms, us-east/europe 100 ms, us-west/europe 140 ms");
    let endpoint = |name: &str| g.node(name).endpoint();
    // Lead from us-east.
    let mut c = connect(g.voter_endpoints().split(',').next().unwrap()).await;
    c.move_leader(geolock_core::member::member_id("node-1")).await.unwrap();
    let leader_ep = endpoint("node-1");
    println!("{:<44} {:>8} {:>9} {:>9}", "workload (leader node-1, us-east)", "ops/s", "p50 ms", "p99 ms");
    for clients in [1, 16] {
        let f = side_by_side(&[&leader_ep], Op::Put, clients, seconds).await.remove(0);
        println!(
            "{:<44} {:>8.0} {:>9.2} {:>9.2}",
            format!("put 256 B, {clients} client(s)"),
            f.ops_per_s,
            f.p50_ms,
            f.p99_ms
        );
    }
    // Watch delivery on the us-west learner: from the put's acknowledgement in us-east to the
    // event's arrival in us-west.
    let mut w = connect(&endpoint("learner-us-west")).await;
    let mut stream = w.watch("geo-watch/", Some(etcd_client::WatchOptions::new().with_prefix())).await.unwrap();
    let mut writer = connect(&leader_ep).await;
    let mut delays = Vec::new();
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut i = 0;
    while Instant::now() < until {
        writer.put(format!("geo-watch/{i}"), "v", None).await.unwrap();
        let acked = Instant::now();
        loop {
            let resp = stream.message().await.unwrap().unwrap();
            if !resp.events().is_empty() {
                delays.push(acked.elapsed());
                break;
            }
        }
        i += 1;
    }
    delays.sort();
    println!(
        "{:<44} {:>8} {:>9.2} {:>9.2}",
        "us-west learner watch, after the put's ack",
        delays.len(),
        pct(&delays, 0.5),
        pct(&delays, 0.99)
    );
    // Lose us-east, the leader's region, under a writer on every voter.
    let eps: Vec<String> = g.voter_endpoints().split(',').map(str::to_string).collect();
    let lost_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let (tx, mut first) = tokio::sync::mpsc::channel::<Instant>(16);
    let writers: Vec<_> = eps
        .into_iter()
        .map(|ep| {
            let (lost_at, tx) = (lost_at.clone(), tx.clone());
            tokio::spawn(async move {
                let opts = ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(3));
                let mut c = Client::connect([ep], Some(opts)).await.unwrap();
                for n in 0.. {
                    let after = lost_at.lock().unwrap().is_some();
                    if c.put(format!("geo-loss/{n}"), "v", None).await.is_ok() && after {
                        let _ = tx.send(Instant::now()).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lost = Instant::now();
    *lost_at.lock().unwrap() = Some(lost);
    g.drop_region("us-east").unwrap();
    let recovered = tokio::time::timeout(Duration::from_secs(60), first.recv()).await.ok().flatten();
    for w in writers {
        w.abort();
    }
    match recovered {
        Some(at) => println!(
            "{:<44} {:>8} {:>9.0}",
            "us-east lost: first acknowledged write after",
            "ms",
            at.duration_since(lost).as_secs_f64() * 1000.0
        ),
        None => println!("us-east lost: no write acknowledged within 60 s"),
    }
}

/// One failover's figures, in milliseconds from the loss of the primary region.
struct FailoverRun {
    /// DETECT's decision, then each step's duration (the lease wait between FENCE and PROMOTE).
    detect: u64,
    fence: u64,
    lease_wait: u64,
    promote: u64,
    join: u64,
    redirect: u64,
    verify: u64,
    /// The controller's exit, and the standby client's first write through the name.
    done: u64,
    first_write: u64,
}

/// The region failover timeline; see [`What::Failover`].
async fn region_failover(lockctl: &std::path::Path, runs: u32) {
    use geolock_client::failover::{Record, Step};
    use geolock_testkit::geo::{GeoCluster, GeoOptions};
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../regions/active-passive.yaml");
    let topology = geolock_testkit::topology::Topology::load(&file).unwrap();
    let spec = topology.failover.clone().expect("a failover section");
    let wall_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut figures = Vec::new();
    for run in 1..=runs {
        let dir = tempfile::tempdir().unwrap();
        let opts = GeoOptions::new(lockctl.to_path_buf(), dir.path().to_path_buf());
        if run == 1 {
            let regions =
                if opts.namespaces { "a network namespace per region" } else { "loopback addresses per region" };
            println!(
                "active-passive on this machine ({regions}); round trips us-east/us-west 60 ms, us-east/europe 100 ms, \
                 us-west/europe 140 ms; detect window {} ms, write lease {} ms + drift {} ms, probe every {} ms",
                spec.detect_window_ms, spec.write_lease_ms, spec.clock_drift_ms, spec.probe_interval_ms
            );
            println!(
                "{:<4} {:>7} {:>6} {:>7} {:>8} {:>6} {:>8} {:>7} {:>7} {:>12}  (ms from the loss; steps: their own duration)",
                "run", "detect", "fence", "lease", "promote", "join", "redirect", "verify", "done", "first write"
            );
        }
        let mut g = GeoCluster::start(topology.clone(), opts).await.unwrap_or_else(|e| panic!("{e}"));
        let f = g.failover.as_ref().unwrap();
        let (journal, dns) = (f.journal.clone(), f.dns.addr);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&journal).unwrap_or_default().contains("\"Armed\"") {
            assert!(Instant::now() < deadline, "the controller never saw the primary healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A client in the standby region writes through the name, resolving it before every
        // attempt, until a write lands in revision epoch 1.
        let west = g.runtime_in(&spec.standby).unwrap();
        let (zone, name) = (spec.zone.clone(), spec.client_name.clone());
        let client = west.spawn(async move {
            let resolver = geolock_client::dns::Updater::new(dns, &zone, &name, None).unwrap();
            loop {
                let found = resolver.read().await.map_err(|e| e.to_string());
                let port = found.as_ref().ok().and_then(|f| f.members.iter().next().map(|m| m.port));
                if let (Ok(found), Some(port)) = (found, port) {
                    let eps: Vec<String> = found.addrs.iter().map(|a| format!("{a}:{port}")).collect();
                    let opts = ConnectOptions::new()
                        .with_connect_timeout(Duration::from_millis(500))
                        .with_timeout(Duration::from_secs(1));
                    if let Ok(mut c) = Client::connect(eps, Some(opts)).await {
                        if let Ok(r) = c.put("failover-bench/first", "v", None).await {
                            let rev = r.header().map_or(0, |h| h.revision());
                            if geolock_core::kv::epoch_of(rev) >= 1 {
                                return wall_ms();
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let lost = wall_ms();
        g.drop_region(topology.primary_region().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let f = g.failover.as_mut().unwrap();
        while f.controller_exit().is_none() {
            assert!(
                Instant::now() < deadline,
                "the controller did not finish in 120 s: {}",
                f.controller_log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let done = wall_ms() - lost;
        let first = tokio::time::timeout(Duration::from_secs(60), client).await.ok().and_then(Result::ok);
        let records = geolock_client::journal::Journal::read(&journal).unwrap();
        let took: std::collections::BTreeMap<Step, u64> =
            geolock_client::failover::step_durations(&records).into_iter().collect();
        let at = |pick: &dyn Fn(&Record) -> Option<u64>| records.iter().find_map(pick).unwrap_or(0);
        let detected = at(&|r| match r {
            Record::Detected { at_ms, .. } => Some(*at_ms),
            _ => None,
        });
        let fenced = at(&|r| match r {
            Record::Finished { step: Step::Fence, at_ms } => Some(*at_ms),
            _ => None,
        });
        let promoting = at(&|r| match r {
            Record::Started { step: Step::Promote, at_ms } => Some(*at_ms),
            _ => None,
        });
        let r = FailoverRun {
            detect: detected.saturating_sub(lost),
            fence: took.get(&Step::Fence).copied().unwrap_or(0),
            lease_wait: promoting.saturating_sub(fenced),
            promote: took.get(&Step::Promote).copied().unwrap_or(0),
            join: took.get(&Step::Join).copied().unwrap_or(0),
            redirect: took.get(&Step::Redirect).copied().unwrap_or(0),
            verify: took.get(&Step::Verify).copied().unwrap_or(0),
            done,
            first_write: first.map_or(u64::MAX, |t| t.saturating_sub(lost)),
        };
        print_run(&run.to_string(), &r);
        figures.push(r);
        drop(west);
    }
    let median = |pick: fn(&FailoverRun) -> u64| {
        let mut v: Vec<u64> = figures.iter().map(pick).collect();
        v.sort();
        v[v.len() / 2]
    };
    let m = FailoverRun {
        detect: median(|r| r.detect),
        fence: median(|r| r.fence),
        lease_wait: median(|r| r.lease_wait),
        promote: median(|r| r.promote),
        join: median(|r| r.join),
        redirect: median(|r| r.redirect),
        verify: median(|r| r.verify),
        done: median(|r| r.done),
        first_write: median(|r| r.first_write),
    };
    print_run("med", &m);
}

fn print_run(label: &str, r: &FailoverRun) {
    let first = if r.first_write == u64::MAX { "none".to_string() } else { r.first_write.to_string() };
    println!(
        "{label:<4} {:>7} {:>6} {:>7} {:>8} {:>6} {:>8} {:>7} {:>7} {:>12}",
        r.detect, r.fence, r.lease_wait, r.promote, r.join, r.redirect, r.verify, r.done, first
    );
}
