//! Lock and lease safety under partitions, on the 2+2+1 topology (`regions/2-2-1.yaml`) in the
//! project's harness: every member a real process, each region in its own network namespace
//! (when run as root), a region cut by taking its link down, a single member cut by the relays.
//!
//! Every scenario runs `lockctl lock` clients on both sides of the cut, each running a command
//! that writes to a fenced resource (a Unix socket served by this test, so that both sides reach
//! it: the spec's storage that checks fencing tokens) for as long as it holds the lock. Checked
//! in every scenario:
//! - never two holders: the resource never sees a holder's write after a newer holder's (it
//!   would reject it; no `lockctl`-run holder is ever rejected), and every token it sees was
//!   handed out by a grant;
//! - tokens strictly increase, and none is 0;
//! - keep-alives on the side without a majority stop being acknowledged within an election
//!   timeout of the cut;
//! - `Maintenance.Status` never shows two leaders for longer than an election timeout;
//! - no acknowledged write is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geolock_proto::etcdserverpb as pb;
use geolock_proto::v3lockpb as lpb;
use geolock_testkit::geo::{RegionLauncher, RegionRuntime};
use geolock_testkit::topology::Role;

use crate::common::{client, rt};
use crate::geo::{two_two_one, Geo};

/// What a `lockctl lock` runs while it holds: writes `RESOURCE WHO TOKEN` to the fenced
/// resource every 50 ms for the given number of seconds. argv: socket, resource, who, seconds.
const WRITER: &str = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile('rw')
token = os.environ['LOCKCTL_FENCING_TOKEN']
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    f.write(sys.argv[2] + ' ' + sys.argv[3] + ' ' + token + '\n')
    f.flush()
    f.readline()
    time.sleep(0.05)
"#;

/// One write the fenced resource saw.
#[derive(Clone, Debug)]
struct FenceWrite {
    at: Instant,
    /// What the lock protects: one resource per lock name.
    resource: String,
    who: String,
    token: i64,
    accepted: bool,
}

/// The fenced resources, one per lock name: each accepts a write whose token is at least the
/// greatest it has accepted, rejects the rest (the fencing the spec's lease-expiry timeline
/// relies on), and records all.
struct Fence {
    path: PathBuf,
    writes: Arc<Mutex<Vec<FenceWrite>>>,
    _dir: tempfile::TempDir,
}

impl Fence {
    fn start(rt: &tokio::runtime::Runtime) -> Fence {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence.sock");
        let writes: Arc<Mutex<Vec<FenceWrite>>> = Arc::default();
        let listener = rt.block_on(async { tokio::net::UnixListener::bind(&path) }).unwrap();
        let log = writes.clone();
        rt.spawn(async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            while let Ok((conn, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let (r, mut w) = conn.into_split();
                    let mut lines = tokio::io::BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let mut parts = line.split(' ');
                        let (resource, who) =
                            (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                        let token = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                        let accepted = fence_write(&log, resource, who, token);
                        if w.write_all(if accepted { b"ok\n" } else { b"fenced\n" }).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Fence { path, writes, _dir: dir }
    }

    fn write(&self, resource: &str, who: &str, token: i64) -> bool {
        fence_write(&self.writes, resource.to_string(), who.to_string(), token)
    }

    fn writes(&self) -> Vec<FenceWrite> {
        self.writes.lock().unwrap().clone()
    }
}

fn fence_write(log: &Mutex<Vec<FenceWrite>>, resource: String, who: String, token: i64) -> bool {
    let mut log = log.lock().unwrap();
    let max = log.iter().filter(|w| w.accepted && w.resource == resource).map(|w| w.token).max().unwrap_or(0);
    let accepted = token > 0 && token >= max;
    log.push(FenceWrite { at: Instant::now(), resource, who, token, accepted });
    accepted
}

/// One run of `lockctl lock`.
#[derive(Clone, Debug)]
struct Attempt {
    who: String,
    token: Option<i64>,
    /// When `lockctl` printed the token.
    granted: Option<Instant>,
    code: Option<i32>,
    stderr: String,
    ended: Instant,
}

impl Attempt {
    fn lost_lease(&self) -> bool {
        self.stderr.contains("lost lease")
    }
}

/// `lockctl lock` clients in a loop: take lock `name` through `endpoints`, write to the fence
/// for `hold_s` seconds, release; again until `stop`.
struct LockLoop {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LockLoop {
    #[allow(clippy::too_many_arguments)]
    fn start(
        launcher: RegionLauncher,
        endpoints: String,
        name: &str,
        ttl_s: u32,
        hold_s: f64,
        who: &str,
        fence: &Path,
        once: bool,
    ) -> LockLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let (stop2, attempts2, name, who, fence) =
            (stop.clone(), attempts.clone(), name.to_string(), who.to_string(), fence.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !stop2.load(Ordering::Relaxed) {
                n += 1;
                let tag = format!("{who}#{n}");
                let mut cmd = launcher.command(env!("CARGO_BIN_EXE_lockctl"));
                cmd.args([
                    "lock",
                    "--endpoints",
                    &endpoints,
                    "--ttl",
                    &ttl_s.to_string(),
                    &name,
                    "python3",
                    "-c",
                    WRITER,
                ]);
                cmd.arg(&fence).arg(&name).arg(&tag).arg(hold_s.to_string());
                cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
                let mut child = cmd.spawn().expect("spawn lockctl lock");
                let out = child.stdout.take().unwrap();
                // The token as soon as it is printed: the holder may run long after.
                let token: Arc<Mutex<Option<(i64, Instant)>>> = Arc::default();
                let t2 = token.clone();
                let reader = std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        if let Some(t) = line.strip_prefix("fencing token ") {
                            *t2.lock().unwrap() = Some((t.trim().parse().unwrap_or(-1), Instant::now()));
                        }
                    }
                });
                let code = loop {
                    if let Some(st) = child.try_wait().unwrap() {
                        break st.code();
                    }
                    if stop2.load(Ordering::Relaxed) {
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                let _ = reader.join();
                let mut stderr = String::new();
                let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
                let granted = *token.lock().unwrap();
                attempts2.lock().unwrap().push(Attempt {
                    who: tag,
                    token: granted.map(|(t, _)| t),
                    granted: granted.map(|(_, at)| at),
                    code,
                    stderr,
                    ended: Instant::now(),
                });
                if once {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        LockLoop { stop, attempts, thread: Some(thread) }
    }

    fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.attempts.lock().unwrap().clone()
    }
}

impl Drop for LockLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How many of `attempts` by `who` were granted between `from` and `to`.
fn granted_between(attempts: &[Attempt], who: &str, from: Instant, to: Instant) -> usize {
    attempts.iter().filter(|a| a.who.starts_with(who) && a.granted.is_some_and(|t| t > from && t < to)).count()
}

/// The lock checks every scenario makes; returns the number of grants checked.
fn check_locks(attempts: &[Attempt], fence: &Fence, other_grants: &[i64]) -> usize {
    let mut tokens: Vec<i64> = other_grants.to_vec();
    for a in attempts {
        if let Some(t) = a.token {
            assert!(t > 0, "{} was handed fencing token {t}", a.who);
            tokens.push(t);
        }
    }
    let distinct: BTreeSet<i64> = tokens.iter().copied().collect();
    assert_eq!(distinct.len(), tokens.len(), "a fencing token was handed out twice: {tokens:?}");
    let writes = fence.writes();
    // A stale write made on purpose (the spec's T36) is rejected; no holder run by lockctl
    // ever is: had one been, two clients would have held the lock at once.
    for w in writes.iter().filter(|w| !w.who.starts_with("stale")) {
        assert!(
            w.accepted,
            "{} wrote with token {} after a newer holder had: two holders\n{attempts:#?}",
            w.who, w.token
        );
        assert!(distinct.contains(&w.token), "{} wrote with token {}, which no grant handed out", w.who, w.token);
    }
    // Strictly increasing: in each resource's order, each holder's writes form one block, and
    // the blocks' tokens grow.
    let mut blocks: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for w in writes.iter().filter(|w| w.accepted) {
        let b = blocks.entry(w.resource.as_str()).or_default();
        if b.last() != Some(&w.token) {
            assert!(b.last().is_none_or(|last| *last < w.token), "{}: token {} after {b:?}", w.resource, w.token);
            b.push(w.token);
        }
    }
    distinct.len()
}

/// Every member's answer to Maintenance.Status, polled from inside its region.
#[derive(Clone, Debug)]
struct StatusSample {
    at: Instant,
    member: String,
    leader: u64,
}

/// Poll every voter and witness of each region from inside that region, every 100 ms.
fn watch_leaders(
    g: &Geo,
    regions: &BTreeMap<String, RegionRuntime>,
    stop: Arc<AtomicBool>,
) -> Arc<Mutex<Vec<StatusSample>>> {
    let samples: Arc<Mutex<Vec<StatusSample>>> = Arc::default();
    for n in g.c.nodes.iter().filter(|n| n.role != Role::Learner) {
        let (name, endpoint, samples, stop) = (n.name.clone(), n.endpoint(), samples.clone(), stop.clone());
        regions[&n.region].spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_millis(500), geolock_testkit::geo::status(&endpoint)).await
                {
                    samples.lock().unwrap().push(StatusSample {
                        at: Instant::now(),
                        member: name.clone(),
                        leader: s.leader,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    samples
}

/// The longest stretch during which members' fresh answers (under 400 ms old) named two
/// different leaders.
fn longest_two_leaders(samples: &[StatusSample]) -> Duration {
    let mut samples = samples.to_vec();
    samples.sort_by_key(|s| s.at);
    let mut latest: BTreeMap<String, (Instant, u64)> = BTreeMap::new();
    let (mut longest, mut since) = (Duration::ZERO, None::<Instant>);
    for s in &samples {
        latest.insert(s.member.clone(), (s.at, s.leader));
        let leaders: BTreeSet<u64> = latest
            .values()
            .filter(|(at, l)| *l != 0 && s.at.duration_since(*at) < Duration::from_millis(400))
            .map(|(_, l)| *l)
            .collect();
        if leaders.len() > 1 {
            let start = *since.get_or_insert(s.at);
            longest = longest.max(s.at.duration_since(start));
        } else {
            since = None;
        }
    }
    longest
}

/// When a member first named a leader other than `old` (and not none) after `from`.
fn new_leader_at(samples: &[StatusSample], from: Instant, old: u64) -> Option<Instant> {
    samples.iter().filter(|s| s.at > from && s.leader != 0 && s.leader != old).map(|s| s.at).min()
}

/// A lease granted through `endpoint` and kept alive every 300 ms from inside a region; the
/// times its keep-alives were acknowledged (TTL > 0), and its ID.
struct KeepAlives {
    lease: Arc<Mutex<i64>>,
    acks: Arc<Mutex<Vec<Instant>>>,
}

impl KeepAlives {
    fn start(region: &RegionRuntime, endpoint: String, ttl: i64, stop: Arc<AtomicBool>) -> KeepAlives {
        let (lease, acks): (Arc<Mutex<i64>>, Arc<Mutex<Vec<Instant>>>) = Default::default();
        let (l2, a2) = (lease.clone(), acks.clone());
        let (granted, got) = std::sync::mpsc::channel();
        region.spawn(async move {
            let mut c = client(&endpoint).await;
            let id = c.lease_grant(ttl, None).await.expect("lease grant").id();
            *l2.lock().unwrap() = id;
            let _ = granted.send(());
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut keeper, mut stream)) = c.lease_keep_alive(id).await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => a2.lock().unwrap().push(Instant::now()),
                        Ok(Ok(Some(_))) => return,
                        Ok(_) => break,
                        Err(_) => {}
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        });
        got.recv_timeout(Duration::from_secs(30)).expect("lease granted for the keep-alives");
        KeepAlives { lease, acks }
    }

    fn id(&self) -> i64 {
        *self.lease.lock().unwrap()
    }

    /// The last acknowledgement, as time after `from` (zero if none came after it).
    fn acknowledged_until(&self, from: Instant) -> Duration {
        self.acks.lock().unwrap().iter().filter(|t| **t > from).max().map_or(Duration::ZERO, |t| t.duration_since(from))
    }
}

/// Puts in a loop through `endpoint`, the acknowledged keys recorded.
fn writer(
    on: &tokio::runtime::Handle,
    endpoint: String,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> Arc<Mutex<Vec<String>>> {
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let a2 = acked.clone();
    on.spawn(async move {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3));
        let Ok(mut c) = etcd_client::Client::connect([endpoint], Some(opts)).await else { return };
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let key = format!("{prefix}/{i}");
            if c.put(key.as_str(), "v", None).await.is_ok() {
                a2.lock().unwrap().push(key);
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            i += 1;
        }
    });
    acked
}

/// Every acknowledged key is there, read linearizably through `endpoint`.
fn check_writes(rt: &tokio::runtime::Runtime, endpoint: &str, acked: &[String]) {
    let stored: BTreeSet<String> = rt.block_on(async {
        let mut c = client(endpoint).await;
        let r = c.get("writes/", Some(etcd_client::GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
        r.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect()
    });
    let lost: Vec<&String> = acked.iter().filter(|k| !stored.contains(*k)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

/// The running topology with a runtime inside each region.
struct Setup {
    rt: tokio::runtime::Runtime,
    g: Geo,
    regions: BTreeMap<String, RegionRuntime>,
    election_timeout: Duration,
    fence: Fence,
    stop: Arc<AtomicBool>,
}

impl Setup {
    fn start(leader: &str) -> Setup {
        let rt = rt();
        let g = Geo::start(&rt, two_two_one(), &[]);
        g.lead_from(&rt, leader);
        let regions = g.c.topology.regions.iter().map(|r| (r.name.clone(), g.c.runtime_in(&r.name).unwrap())).collect();
        let election_timeout = Duration::from_millis(g.c.topology.raft.election_timeout_ms.unwrap_or(1000));
        let fence = Fence::start(&rt);
        Setup { rt, g, regions, election_timeout, fence, stop: Arc::new(AtomicBool::new(false)) }
    }

    /// Client endpoints of the data-bearing members of `region` (voters and learners).
    fn data_endpoints(&self, region: &str) -> String {
        self.g.c.endpoints(|n| n.region == region && n.role != Role::Witness)
    }

    fn voter(&self, region: &str) -> String {
        self.g.c.nodes.iter().find(|n| n.region == region && n.role == Role::Voter).unwrap().endpoint()
    }

    /// One `lockctl lock` run (not a loop) from `region`, through its data members.
    fn lock_once(&self, region: &str, name: &str, ttl_s: u32, hold_s: f64, who: &str) -> LockLoop {
        let launcher = self.g.c.launcher_in(region).unwrap();
        LockLoop::start(launcher, self.data_endpoints(region), name, ttl_s, hold_s, who, &self.fence.path, true)
    }

    fn lock_loop(&self, region: &str, endpoints: String, name: &str, ttl_s: u32, hold_s: f64, who: &str) -> LockLoop {
        LockLoop::start(
            self.g.c.launcher_in(region).unwrap(),
            endpoints,
            name,
            ttl_s,
            hold_s,
            who,
            &self.fence.path,
            false,
        )
    }

    fn keep_alives(&self, region: &str, endpoint: String, ttl: i64) -> KeepAlives {
        KeepAlives::start(&self.regions[region], endpoint, ttl, self.stop.clone())
    }

    fn leader_id(&self) -> u64 {
        geolock_core::member::member_id(&self.g.leader(&self.rt))
    }

    /// `lockctl lock` loops on lock "job" from each data region, through its own members.
    fn both_sides(&self) -> [LockLoop; 2] {
        ["us-east", "us-west"].map(|r| self.lock_loop(r, self.data_endpoints(r), "job", 5, 1.0, &r.replace("us-", "")))
    }

    /// After 4 s of traffic, cut `regions` off (each from every other) for `cut_for`, heal, and
    /// let traffic go on for 6 s. Returns when the cut began and when it healed.
    fn cut_regions(&mut self, regions: &[&str], cut_for: Duration) -> (Instant, Instant) {
        self.sleep(Duration::from_secs(4));
        let cut = Instant::now();
        for r in regions {
            self.g.c.partition(r).unwrap();
        }
        self.sleep(cut_for);
        for r in regions {
            self.g.c.heal(r).unwrap();
        }
        let healed = Instant::now();
        self.sleep(Duration::from_secs(6));
        (cut, healed)
    }

    /// The lines of every member's log that tell of leadership and quorum changes, for a
    /// failure's message.
    fn leadership_log(&self) -> String {
        let mut out = String::new();
        for n in &self.g.c.nodes {
            for l in self.g.c.log(&n.name).lines().filter(|l| {
                l.contains("stepping down") || l.contains("acknowledges this leader") || l.contains("leader")
            }) {
                out.push_str(&format!("{}: {l}\n", n.name));
            }
        }
        out
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// What every scenario watches besides its locks: every member's Status, keep-alives through
/// members on the side that loses the majority, and writers on both sides.
struct Observers {
    leaders: Arc<Mutex<Vec<StatusSample>>>,
    minority: Vec<(String, KeepAlives)>,
    writes: Vec<Arc<Mutex<Vec<String>>>>,
}

/// What the shared checks measured.
struct Figures {
    /// Per member on the minority side: how long after the cut it still acknowledged keep-alives.
    keepalives: Vec<(String, Duration)>,
    two_leaders: Duration,
    writes: usize,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k: Vec<String> = self.keepalives.iter().map(|(m, d)| format!("via {m} {d:?}")).collect();
        write!(
            f,
            "minority keep-alives acknowledged until [{}] after the cut; two leaders shown for at most {:?}; {} acknowledged writes all kept",
            k.join(", "),
            self.two_leaders,
            self.writes
        )
    }
}

impl Setup {
    /// Start the shared observers: keep-alives (TTL 5 s) through each of `minority`'s members
    /// from inside their regions, and a writer through each of `writers`.
    fn observe(&self, minority: &[&str], writers: &[&str]) -> Observers {
        let leaders = watch_leaders(&self.g, &self.regions, self.stop.clone());
        let minority = minority
            .iter()
            .map(|m| {
                let n = self.g.c.node(m);
                (m.to_string(), self.keep_alives(&n.region, n.endpoint(), 5))
            })
            .collect();
        let writes = writers
            .iter()
            .map(|m| {
                let n = self.g.c.node(m);
                writer(self.regions[&n.region].handle(), n.endpoint(), format!("writes/{m}"), self.stop.clone())
            })
            .collect();
        Observers { leaders, minority, writes }
    }

    /// The shared checks: keep-alives on the minority side acknowledged no later than an
    /// election timeout after `cut` (half a second allowed for the answer's way back); never two
    /// leaders named for longer than an election timeout; every acknowledged write readable.
    fn check(&self, o: &Observers, cut: Option<Instant>) -> Figures {
        let et = self.election_timeout;
        let mut keepalives = Vec::new();
        if let Some(cut) = cut {
            for (m, k) in &o.minority {
                let until = k.acknowledged_until(cut);
                assert!(
                    until <= et + Duration::from_millis(500),
                    "{m} acknowledged keep-alives {until:?} after the cut"
                );
                keepalives.push((m.clone(), until));
            }
        }
        let two_leaders = longest_two_leaders(&o.leaders.lock().unwrap());
        assert!(two_leaders <= et, "two leaders shown for {two_leaders:?}");
        let acked: Vec<String> = o.writes.iter().flat_map(|w| w.lock().unwrap().clone()).collect();
        let leader = self.g.leader(&self.rt);
        check_writes(&self.rt, &self.g.c.node(&leader).endpoint(), &acked);
        Figures { keepalives, two_leaders, writes: acked.len() }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The spec's partition scenario 1 and the fault of a deposed leader: the leader's region
/// (two of five voters) is cut off. The majority elects a new leader; the old one, and the
/// follower beside it, stop acknowledging keep-alives within an election timeout; clients on
/// the old leader's side cannot take the lock; nobody sees two holders.
#[test]
fn a_leader_cut_off_in_a_minority_region_stops_answering_for_the_cluster() {
    let mut s = Setup::start("node-1");
    let old = s.leader_id();
    let o = s.observe(&["node-1", "node-2", "learner-us-east"], &["node-1", "node-3"]);
    let sides = s.both_sides();
    let (cut, healed) = s.cut_regions(&["us-east"], Duration::from_secs(12));
    s.stop.store(true, Ordering::Relaxed);
    let attempts: Vec<Attempt> = sides.into_iter().flat_map(LockLoop::finish).collect();
    let grants = check_locks(&attempts, &s.fence, &[]);
    assert_eq!(
        granted_between(&attempts, "east", cut, healed),
        0,
        "a client on the cut-off side was granted the lock: {attempts:#?}"
    );
    assert!(
        granted_between(&attempts, "west", cut, healed) > 0,
        "the majority granted no lock while us-east was cut off: {attempts:#?}\n{}",
        s.leadership_log()
    );
    let figures = s.check(&o, Some(cut));
    let elected =
        new_leader_at(&o.leaders.lock().unwrap(), cut, old).expect("no new leader elected").duration_since(cut);
    assert_ne!(s.leader_id(), old, "the cut-off leader still leads after the heal");
    eprintln!(
        "scenario 1 (the leader's region cut off): new leader named {elected:?} after the cut; {figures}; {grants} lock grants \
         checked ({} fenced writes)",
        s.fence.writes().len()
    );
}

/// The spec's partition scenario 2: the leader keeps a majority (its own region and the
/// witness) while us-west is cut off. The majority goes on granting locks; us-west's clients
/// are refused, its keep-alives stop being acknowledged within an election timeout, and its
/// members catch up once it comes back.
#[test]
fn a_follower_region_cut_off_leaves_the_majority_working_and_catches_up() {
    let mut s = Setup::start("node-1");
    let old = s.leader_id();
    let o = s.observe(&["node-3", "node-4", "learner-us-west"], &["node-2", "node-3"]);
    let sides = s.both_sides();
    let east_keepalives = s.keep_alives("us-east", s.g.c.node("node-2").endpoint(), 5);
    let (cut, healed) = s.cut_regions(&["us-west"], Duration::from_secs(10));
    s.stop.store(true, Ordering::Relaxed);
    let attempts: Vec<Attempt> = sides.into_iter().flat_map(LockLoop::finish).collect();
    let grants = check_locks(&attempts, &s.fence, &[]);
    assert_eq!(
        granted_between(&attempts, "west", cut, healed),
        0,
        "the cut-off side was granted the lock: {attempts:#?}"
    );
    let during = granted_between(&attempts, "east", cut, healed);
    assert!(
        during > 0,
        "the majority granted no lock while us-west was cut off: {attempts:#?}\n{}",
        s.leadership_log()
    );
    let majority = east_keepalives.acknowledged_until(cut);
    assert!(majority >= Duration::from_secs(14), "the majority side's keep-alives stopped {majority:?} after the cut");
    let figures = s.check(&o, Some(cut));
    assert_eq!(s.leader_id(), old, "the leader with the majority lost its leadership");
    // us-west catches up: its voters reach the leader's revision.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rev = |n: &str| {
            s.rt.block_on(geolock_testkit::geo::status(&s.g.c.node(n).endpoint()))
                .map(|r| r.header.unwrap().revision)
                .unwrap_or(0)
        };
        let (lead, west) = (rev("node-1"), rev("node-3"));
        if west >= lead && lead > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-3 at revision {west} has not caught up with {lead} 20 s after the heal"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "scenario 2 (us-west cut off, the leader keeps a majority): the leader did not change; {figures}; us-east's \
         keep-alives acknowledged throughout ({majority:?}); {grants} lock grants checked ({} during the cut, all on the \
         majority side)",
        during
    );
}

/// The spec's partition scenario 3: every region cut off from the others, so no side has a
/// majority. Nobody answers for the cluster once an election timeout has passed: no member
/// names a leader, no keep-alive is acknowledged. Leases nobody could renew during the cut are
/// not revoked when it heals: the leader that regains its quorum gives them a TTL plus an
/// election timeout, and their clients' keep-alives go on.
#[test]
fn with_no_majority_anywhere_nobody_answers_for_the_cluster_and_leases_outlive_the_cut() {
    let mut s = Setup::start("node-1");
    let et = s.election_timeout;
    // Keep-alives (TTL 5 s, shorter than the cut: the old leader's clock would have expired
    // them) on every side, every side being a minority.
    let o = s.observe(&["node-1", "node-4", "learner-europe"], &["node-1", "node-3"]);
    let sides = s.both_sides();
    let (cut, healed) = s.cut_regions(&["us-east", "us-west", "europe"], Duration::from_secs(8));
    // Every lease outlived the cut, and its keep-alives go on.
    for (m, k) in &o.minority {
        let until = k.acknowledged_until(cut);
        assert!(
            until >= Duration::from_secs(13),
            "via {m}: lease {:x} lost: keep-alives acknowledged only until {until:?}",
            k.id()
        );
        let ttl = s.rt.block_on(async {
            client(&s.voter("us-east")).await.lease_time_to_live(k.id(), None).await.unwrap().ttl()
        });
        assert!(ttl > 0, "via {m}: lease {:x} revoked after the heal (TTL {ttl})", k.id());
    }
    s.stop.store(true, Ordering::Relaxed);
    let attempts: Vec<Attempt> = sides.into_iter().flat_map(LockLoop::finish).collect();
    let grants = check_locks(&attempts, &s.fence, &[]);
    assert_eq!(
        granted_between(&attempts, "", cut, healed),
        0,
        "a lock was granted while no side had a majority: {attempts:#?}"
    );
    // The old leader stops naming itself half an election timeout after its last quorum, its
    // followers an election timeout after its last heartbeat sent with a quorum.
    let samples = o.leaders.lock().unwrap().clone();
    let quiet_from = cut + et * 3 / 2 + Duration::from_millis(500);
    let named: Vec<&StatusSample> =
        samples.iter().filter(|x| x.at > quiet_from && x.at < healed && x.leader != 0).collect();
    assert!(named.is_empty(), "a leader was named while no side had a majority: {:?}", &named[..named.len().min(5)]);
    let last_named =
        samples.iter().filter(|x| x.at > cut && x.at < healed && x.leader != 0).map(|x| x.at.duration_since(cut)).max();
    // Only keep-alives sent before the heal are held to the cut's deadline.
    let during: Vec<(String, Duration)> = o
        .minority
        .iter()
        .map(|(m, k)| {
            (
                m.clone(),
                k.acks
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|t| **t > cut && **t < healed)
                    .max()
                    .map_or(Duration::ZERO, |t| t.duration_since(cut)),
            )
        })
        .collect();
    for (m, until) in &during {
        assert!(*until <= et + Duration::from_millis(500), "via {m}: keep-alives acknowledged {until:?} after the cut");
    }
    let figures = s.check(&Observers { minority: Vec::new(), ..o }, None);
    eprintln!(
        "scenario 3 (no majority anywhere for 8 s): keep-alives acknowledged until {during:?} after the cut; a leader last \
         named {last_named:?} after the cut; every lease (TTL 5 s) kept after the heal; {figures}; {grants} lock grants checked"
    );
}

/// Wait until the fence has seen a write from a holder whose name starts with `who`; returns
/// the token.
fn wait_holding(fence: &Fence, who: &str, limit: Duration) -> i64 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(w) = fence.writes().iter().find(|w| w.who.starts_with(who)) {
            return w.token;
        }
        assert!(Instant::now() < deadline, "{who} did not get the lock within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn first_write(fence: &Fence, who: &str) -> Option<Instant> {
    fence.writes().iter().filter(|w| w.who.starts_with(who)).map(|w| w.at).min()
}

fn last_write(fence: &Fence, who: &str) -> Option<Instant> {
    fence.writes().iter().filter(|w| w.who.starts_with(who)).map(|w| w.at).max()
}

/// The spec's "Handling Lease Expiry During Partition" timeline, with a 5 s TTL for its 30 s:
/// client A holds the lock; its region is cut off from the leader's; its renewals fail; its
/// `lockctl` tells it the lock is gone (stops its command) before the lease ends on the
/// cluster; client B then gets the lock with a greater token; after the heal, A's old token is
/// rejected by the fenced resource.
#[test]
fn the_specs_lease_expiry_timeline_tells_the_cut_off_holder_and_fences_it() {
    let mut s = Setup::start("node-3");
    let ttl = 5u32;
    // T0: A takes the lock from us-east, to hold it as long as it can.
    let a = s.lock_once("us-east", "timeline", ttl, 300.0, "A");
    let token_a = wait_holding(&s.fence, "A", Duration::from_secs(30));
    let o = s.observe(&["node-1", "node-2"], &["node-1", "node-3"]);
    s.sleep(Duration::from_secs(2));
    // T5: the partition isolates A's region; B, in the leader's region, asks for the lock.
    let cut = Instant::now();
    s.g.c.partition("us-east").unwrap();
    let b = s.lock_once("us-west", "timeline", ttl, 2.0, "B");
    let token_b = wait_holding(&s.fence, "B", Duration::from_secs(30));
    let b_at = first_write(&s.fence, "B").unwrap();
    // T35: the partition heals; T36: A uses its old token, and the resource rejects it.
    s.sleep(Duration::from_secs(3));
    s.g.c.heal("us-east").unwrap();
    s.sleep(Duration::from_secs(2));
    assert!(
        !s.fence.write("timeline", "stale-A", token_a),
        "the resource accepted A's token {token_a} after B's {token_b}"
    );
    let b_attempts = b.finish();
    let a_attempts = a.finish();
    let a_told = a_attempts[0].ended;
    assert!(
        a_attempts[0].lost_lease() && a_attempts[0].code != Some(0),
        "A's lockctl did not report the lost lock: {a_attempts:?}"
    );
    let a_last = last_write(&s.fence, "A").unwrap();
    assert!(a_last < b_at, "A wrote {:?} after B's first write", a_last.duration_since(b_at));
    assert!(token_b > token_a, "B's token {token_b} is not greater than A's {token_a}");
    assert_eq!(b_attempts[0].code, Some(0), "B: {b_attempts:?}");
    let told = a_told.duration_since(cut);
    assert!(
        told <= Duration::from_secs(ttl as u64) + Duration::from_millis(1500),
        "A was told only {told:?} after the cut"
    );
    let attempts: Vec<Attempt> = a_attempts.into_iter().chain(b_attempts).collect();
    let grants = check_locks(&attempts, &s.fence, &[]);
    s.stop.store(true, Ordering::Relaxed);
    let figures = s.check(&o, Some(cut));
    eprintln!(
        "lease expiry timeline (TTL {ttl} s): {figures}; A told the lock was gone {told:?} after the cut, its last write {:?} \
         before B's first; B granted (first write) {:?} after the cut with token {token_b} > {token_a}; A's stale write \
         rejected; {grants} grants checked",
        b_at.duration_since(a_last),
        b_at.duration_since(cut)
    );
}

/// A Lock request through `endpoint` with a fresh lease of `ttl_s` that nobody keeps alive
/// unless `keep_alive_via` names a member; returns the lease and the outcome.
async fn raw_lock(
    endpoint: String,
    name: &str,
    ttl_s: i64,
    keep_alive_via: Option<String>,
) -> (i64, Result<lpb::LockResponse, tonic::Status>) {
    let channel = |ep: String| async move {
        tonic::transport::Channel::from_shared(format!("http://{ep}")).unwrap().connect().await.unwrap()
    };
    let ch = channel(endpoint).await;
    let lease = pb::lease_client::LeaseClient::new(ch.clone())
        .lease_grant(pb::LeaseGrantRequest { ttl: ttl_s, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    if let Some(via) = keep_alive_via {
        tokio::spawn(async move {
            let mut c = client(&via).await;
            let (mut keeper, mut answers) = c.lease_keep_alive(lease).await.unwrap();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if keeper.keep_alive().await.is_err() {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), answers.message()).await;
            }
        });
    }
    let r =
        lpb::lock_client::LockClient::new(ch).lock(lpb::LockRequest { name: name.as_bytes().to_vec(), lease }).await;
    (lease, r.map(|r| r.into_inner()))
}

/// A grant is true to the cluster: at the revision its header carries (read through a member
/// that was never cut off), its key exists with the create revision it gave as the fencing
/// token, and no older key holds the lock.
fn check_grant(rt: &tokio::runtime::Runtime, endpoint: &str, name: &str, r: &lpb::LockResponse) -> i64 {
    let at = r.header.as_ref().unwrap().revision;
    let token = r.geolock_fencing_token;
    assert!(token > 0, "granted with fencing token {token}");
    let prefix = format!("{name}/");
    let held = rt.block_on(async {
        let mut c = client(endpoint).await;
        let opts = etcd_client::GetOptions::new().with_prefix().with_revision(at);
        c.get(prefix.as_str(), Some(opts)).await.unwrap()
    });
    let oldest = held
        .kvs()
        .iter()
        .min_by_key(|kv| kv.create_revision())
        .unwrap_or_else(|| panic!("{name}: no key at revision {at}"));
    assert_eq!(
        oldest.key(),
        &r.key[..],
        "{name}: at revision {at} the holder is {:?}, not the granted key",
        oldest.key_str()
    );
    assert_eq!(oldest.create_revision(), token, "{name}: the granted key's create revision is not its token");
    token
}

/// A waiter on a member that is cut off past the waiter's lease: while it is cut off, the
/// holder releases (so the cluster makes the waiter's key the oldest) and then the waiter's
/// lease expires. When the partition heals, the member applies both in one catch-up: the
/// waiter is woken at the head of the queue and its key is deleted by the next entry. It must
/// be refused, not granted; the waiter behind it gets the lock.
#[test]
fn a_waiter_cut_off_past_its_lease_is_not_granted_when_the_partition_heals() {
    let mut s = Setup::start("node-3");
    let h = s.lock_once("us-west", "w", 10, 5.0, "H");
    let token_h = wait_holding(&s.fence, "H", Duration::from_secs(30));
    let held_at = first_write(&s.fence, "H").unwrap();
    let o = s.observe(&["node-1", "node-2"], &["node-2", "node-4"]);
    let node1 = s.g.c.node("node-1").endpoint();
    let waiter = s.regions["us-east"].spawn(async move { raw_lock(node1, "w", 8, None).await });
    // Its key queued behind H's, Q queues behind it from us-west.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.rt.block_on(async {
        client(&s.voter("us-west"))
            .await
            .get("w/", Some(etcd_client::GetOptions::new().with_prefix().with_count_only()))
            .await
            .unwrap()
            .count()
    }) < 2
    {
        assert!(Instant::now() < deadline, "the waiter's key never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let q = s.lock_once("us-west", "w", 10, 1.0, "Q");
    s.sleep(Duration::from_millis(500));
    let cut = Instant::now();
    s.g.c.partition("us-east").unwrap();
    // H releases about 5 s after it got the lock; the waiter's 8 s lease then ends on the
    // cluster, and Q gets the lock.
    let deadline = Instant::now() + Duration::from_secs(30);
    while first_write(&s.fence, "Q").is_none() {
        assert!(Instant::now() < deadline, "Q did not get the lock within 30 s; leadership:\n{}", s.leadership_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let token_q = wait_holding(&s.fence, "Q", Duration::from_secs(1));
    let h_released = last_write(&s.fence, "H").unwrap();
    assert!(h_released < held_at + Duration::from_secs(7), "H held past the waiter's lease: the race is not set up");
    s.sleep(Duration::from_secs(1));
    s.g.c.heal("us-east").unwrap();
    let (lease, outcome) = s.rt.block_on(waiter).unwrap();
    let q_attempts = q.finish();
    let h_attempts = h.finish();
    match &outcome {
        Ok(r) => panic!(
            "the waiter with lease {lease:x}, gone since the cut, was granted {:?} with token {}",
            String::from_utf8_lossy(&r.key),
            r.geolock_fencing_token
        ),
        Err(status) => assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}"),
    }
    assert!(token_q > token_h);
    let attempts: Vec<Attempt> = h_attempts.into_iter().chain(q_attempts).collect();
    let grants = check_locks(&attempts, &s.fence, &[]);
    s.stop.store(true, Ordering::Relaxed);
    let figures = s.check(&o, Some(cut));
    eprintln!(
        "waiter cut off past its lease: refused after the heal ({}); Q granted {:?} after the cut with token {token_q} > {token_h}; \
         {figures}; {grants} grants checked",
        outcome.unwrap_err().message(),
        first_write(&s.fence, "Q").unwrap().duration_since(cut)
    );
}

/// Waiters queued on a follower that is then cut off (by the relays: clients still reach it)
/// while the cluster hands the lock on: some of them keep their leases alive through another
/// member, some do not. When the follower catches up, it answers its queued Lock requests:
/// every grant it gives is true at a revision the cluster committed, the waiters whose leases
/// ended are refused, and nobody holds the lock beside another.
#[test]
fn a_follower_catching_up_grants_queued_locks_only_as_the_cluster_committed_them() {
    let mut s = Setup::start("node-1");
    let via = s.g.c.node("node-3").endpoint();
    // H holds long enough that every waiter's key queues, and node-2 is cut off, before the
    // lock moves on: no waiter can be granted before the cut.
    let holder = s.lock_loop("us-west", via.clone(), "q", 10, 5.0, "H");
    wait_holding(&s.fence, "H", Duration::from_secs(30));
    let o = s.observe(&["node-2"], &["node-2", "node-4"]);
    let node2 = s.g.c.node("node-2").endpoint();
    // Each waiter, once granted, uses the lock and releases it for the next, whatever order
    // their keys queued in.
    let waiters: Vec<_> = (0..4)
        .map(|k| {
            let (node2, via, keep) =
                (node2.clone(), via.clone(), (k % 2 == 0).then(|| s.g.c.node("node-1").endpoint()));
            let log = s.fence.writes.clone();
            s.rt.spawn(async move {
                let (lease, outcome) = raw_lock(node2, "q", 6, keep.clone()).await;
                if let Ok(r) = &outcome {
                    for _ in 0..5 {
                        fence_write(&log, "q".to_string(), format!("raw{k}"), r.geolock_fencing_token);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    client(&via).await.unlock(r.key.clone()).await.unwrap();
                }
                (k, keep.is_some(), lease, outcome)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(4);
    while s.rt.block_on(async {
        client(&via)
            .await
            .get("q/", Some(etcd_client::GetOptions::new().with_prefix().with_count_only()))
            .await
            .unwrap()
            .count()
    }) < 5
    {
        assert!(Instant::now() < deadline, "the waiters' keys did not all queue within 4 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cut = Instant::now();
    s.g.c.isolate("node-2").unwrap();
    s.sleep(Duration::from_secs(12));
    s.g.c.rejoin("node-2").unwrap();
    let mut raw_tokens = Vec::new();
    let mut report = Vec::new();
    for w in waiters {
        let (k, kept, lease, outcome) =
            s.rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), w).await })
                .expect("a waiter never answered")
                .unwrap();
        match outcome {
            Ok(r) => {
                assert!(kept, "waiter {k}, whose lease {lease:x} ended while node-2 was cut off, was granted");
                let token = check_grant(&s.rt, &via, "q", &r);
                raw_tokens.push(token);
                report.push(format!("waiter {k} granted, token {token}"));
            }
            Err(status) => {
                assert!(!kept, "waiter {k}, whose lease was kept alive, was refused: {status:?}");
                report.push(format!("waiter {k} refused ({:?}: {})", status.code(), status.message()));
            }
        }
    }
    s.sleep(Duration::from_secs(2));
    let attempts = holder.finish();
    let grants = check_locks(&attempts, &s.fence, &raw_tokens);
    s.stop.store(true, Ordering::Relaxed);
    let figures = s.check(&o, Some(cut));
    eprintln!("queued locks on a follower catching up: {}; {figures}; {grants} grants checked", report.join(", "));
}

/// Holders keep their locks through leadership transfers and a SIGKILLed leader: the
/// keep-alive stream and the waiting Lock requests outlive each leader change on the server,
/// and `lockctl` reopens what breaks (on another endpoint if its member died).
#[test]
fn holders_keep_their_locks_and_leases_through_leader_changes() {
    // A keep-alive every TTL/3 and a leader lost for an election timeout (2 s) and an
    // election: the TTL must outlast both, as a TTL must in production.
    const TTL_S: u32 = 10;
    let mut s = Setup::start("node-1");
    let ep = |names: &[&str]| names.iter().map(|n| s.g.c.node(n).endpoint()).collect::<Vec<_>>().join(",");
    let (root, hold) = (s.g.c.launcher_in("us-east").unwrap(), 24.0);
    let holders = [
        LockLoop::start(root.clone(), ep(&["node-2", "node-4"]), "h1", TTL_S, hold, "H1", &s.fence.path, true),
        LockLoop::start(root.clone(), ep(&["node-1", "node-3"]), "h2", TTL_S, hold, "H2", &s.fence.path, true),
        LockLoop::start(root.clone(), ep(&["learner-us-east", "node-2"]), "h3", TTL_S, hold, "H3", &s.fence.path, true),
    ];
    for h in ["H1", "H2", "H3"] {
        wait_holding(&s.fence, h, Duration::from_secs(30));
    }
    let o = s.observe(&[], &["node-3", "node-4"]);
    let waiters = [
        LockLoop::start(root.clone(), ep(&["node-4", "node-2"]), "h1", TTL_S, 0.5, "W1", &s.fence.path, false),
        LockLoop::start(root.clone(), ep(&["node-1", "node-3"]), "h2", TTL_S, 0.5, "W2", &s.fence.path, false),
    ];
    let started = Instant::now();
    let voters = s.g.c.voter_endpoints();
    let mut changes = 0;
    for to in ["node-3", "node-2"] {
        crate::common::lockctl_ok(&["member", "transfer-leadership", to, "--endpoints", &voters]);
        changes += 1;
        s.sleep(Duration::from_secs(3));
    }
    let leader = s.g.leader(&s.rt);
    s.g.c.kill(&leader).unwrap();
    changes += 1;
    s.sleep(Duration::from_secs(4));
    s.rt.block_on(s.g.c.restart(&leader)).unwrap();
    s.g.lead_from(&s.rt, "node-1");
    changes += 1;
    assert!(started.elapsed() < Duration::from_secs(hold as u64 - 4), "the leader changes outlasted the holds");
    let holder_attempts: Vec<Attempt> = holders
        .into_iter()
        .flat_map(|h| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while h.attempts.lock().unwrap().is_empty() {
                assert!(Instant::now() < deadline, "a holder never finished");
                std::thread::sleep(Duration::from_millis(100));
            }
            h.finish()
        })
        .collect();
    for a in &holder_attempts {
        assert_eq!(a.code, Some(0), "{} lost its lock through the leader changes: {}", a.who, a.stderr);
    }
    // The waiters' Lock requests waited through every change; each gets the lock once its
    // holder is done.
    for w in ["W1", "W2"] {
        wait_holding(&s.fence, w, Duration::from_secs(30));
    }
    let attempts: Vec<Attempt> =
        holder_attempts.into_iter().chain(waiters.into_iter().flat_map(LockLoop::finish)).collect();
    let grants = check_locks(&attempts, &s.fence, &[]);
    s.stop.store(true, Ordering::Relaxed);
    let figures = s.check(&o, None);
    eprintln!("{figures}; {changes} leader changes (2 transfers, a SIGKILLed leader, a transfer back) under 3 holders: every holder kept its lock and lease; {grants} grants checked");
}
