//! Real processes for the tests: a `lockctl start` node, a real etcd for comparison, and
//! `etcdctl` runs with a deadline. Every process is killed (SIGKILL) when its handle drops, so a
//! failing test leaves nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use geolock_testkit::launch::{free_port, MemberFlags};

/// Run `cmd` to completion, killing it if it outlives `limit`.
pub fn run_with_deadline(mut cmd: Command, stdin: Option<&str>, limit: Duration) -> Output {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} ran over {limit:?}; stdout: {} stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `etcdctl` (Debian's etcd-client, API v3) against `endpoint`.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={endpoint}")).args(args);
    run_with_deadline(cmd, stdin, Duration::from_secs(30))
}

/// stdout of a successful etcdctl run.
pub fn etcdctl_ok(endpoint: &str, args: &[&str]) -> String {
    let out = etcdctl(endpoint, args, None);
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A child process that is SIGKILLed when dropped.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// SIGTERM, then wait (SIGKILL after `limit`).
    pub fn terminate(&mut self, limit: Duration) {
        if let Some(c) = self.child.as_mut() {
            sigterm(c.id());
            let deadline = Instant::now() + limit;
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill();
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn spawn_logged(mut cmd: Command, log: &Path) -> Proc {
    let f = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    Proc { child: Some(child), log: log.to_path_buf() }
}

/// Wait until `endpoint` answers a linearizable read.
fn wait_ready(endpoint: &str, p: &mut Proc) {
    wait_answering(endpoint, p, &["get", "readiness-probe"]);
}

/// Wait until `endpoint` answers `etcdctl` with `args`.
pub fn wait_answering(endpoint: &str, p: &mut Proc, args: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(endpoint, args, None);
        if out.status.success() {
            return;
        }
        if let Some(st) = p.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("process exited with {st} before it was ready: {}", p.log());
        }
        assert!(Instant::now() < deadline, "not ready after 30s: {}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A single-member geolock node started exactly as a single etcd member would be.
pub struct GeoNode {
    pub proc: Proc,
    pub dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    /// Flags beyond the etcd-style ones, kept for restarts.
    extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl GeoNode {
    /// Start a node in a fresh data directory.
    pub fn start() -> GeoNode {
        GeoNode::start_with(&[])
    }

    /// Start a node in a fresh data directory with extra flags.
    pub fn start_with(extra: &[&str]) -> GeoNode {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut n = GeoNode::start_in(&dir, free_port(), free_port(), extra, &["get", "readiness-probe"]);
        n._tmp = Some(tmp);
        n
    }

    /// Start (or restart) a node on `dir` with the given ports; ready once etcdctl `probe`
    /// succeeds.
    fn start_in(dir: &Path, client_port: u16, peer_port: u16, extra: Vec<String>, probe: &[&str]) -> GeoNode {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockctl"));
        cmd.args(MemberFlags::single("n1", dir.join("data"), client_port, peer_port).lockctl_start(None)).args(&extra);
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!("lockctl-{}.log", STARTS.fetch_add(1, Ordering::Relaxed)));
        let mut proc = spawn_logged(cmd, &log);
        let endpoint = format!("127.0.0.1:{client_port}");
        wait_answering(&endpoint, &mut proc, probe);
        GeoNode { proc, dir: dir.to_path_buf(), client_port, peer_port, extra, _tmp: None }
    }

    /// `host:port` for clients.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// SIGKILL the node and start it again on the same data.
    pub fn kill_and_restart(&mut self) {
        self.kill_and_restart_probing(&["get", "readiness-probe"]);
    }

    /// [`GeoNode::kill_and_restart`], ready once etcdctl `probe` succeeds (with credentials,
    /// once authentication is on).
    pub fn kill_and_restart_probing(&mut self, probe: &[&str]) {
        self.proc.kill();
        let tmp = self._tmp.take();
        let mut next = GeoNode::start_in(&self.dir, self.client_port, self.peer_port, self.extra.clone(), probe);
        next._tmp = tmp;
        *self = next;
    }
}

/// `lockctl` as a client of `endpoint`, in the background, its output in a file.
pub fn lockctl_bg(endpoint: &str, args: &[&str], out: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockctl"));
    cmd.args(args).env("LOCKCTL_ENDPOINTS", endpoint);
    spawn_logged(cmd, out)
}

/// `etcdctl` in the background, its output in a file.
pub fn etcdctl_bg(endpoint: &str, args: &[&str], out: &Path) -> Proc {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={endpoint}")).args(args);
    spawn_logged(cmd, out)
}

/// Wait until `path` holds at least `lines` lines; return its text.
pub fn wait_lines(path: &Path, lines: usize, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines {
            return text;
        }
        assert!(Instant::now() < deadline, "{} has only:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real single-member etcd (Debian's etcd-server), fsync on, for side-by-side comparison.
pub struct Etcd {
    _proc: Proc,
    pub client_port: u16,
    pub peer_port: u16,
    _tmp: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_with(&[])
    }

    /// Start a member with extra flags.
    pub fn start_with(extra: &[&str]) -> Etcd {
        let tmp = tempfile::tempdir().unwrap();
        let (cp, pp) = (free_port(), free_port());
        let mut cmd = Command::new("etcd");
        cmd.args(MemberFlags::single("n1", tmp.path().join("data"), cp, pp).args()).args(extra);
        let mut proc = spawn_logged(cmd, &tmp.path().join("etcd.log"));
        wait_ready(&format!("127.0.0.1:{cp}"), &mut proc);
        Etcd { _proc: proc, client_port: cp, peer_port: pp, _tmp: tmp }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}

/// A real three-member etcd cluster on loopback (Debian's etcd-server), each member also given
/// `extra`, for side-by-side comparison with a geolock cluster.
pub struct EtcdCluster {
    pub procs: Vec<Proc>,
    pub client_ports: Vec<u16>,
    _tmp: tempfile::TempDir,
}

impl EtcdCluster {
    pub fn start(extra: &[&str]) -> EtcdCluster {
        let tmp = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial =
            ports.iter().enumerate().map(|(i, p)| format!("e{}=http://127.0.0.1:{}", i + 1, p.1)).collect::<Vec<_>>();
        let mut procs = Vec::new();
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let name = format!("e{}", i + 1);
            let flags = MemberFlags {
                initial_cluster: initial.join(","),
                ..MemberFlags::single(&name, tmp.path().join(&name), *cp, *pp)
            };
            let mut cmd = Command::new("etcd");
            cmd.args(flags.args()).args(extra);
            procs.push(spawn_logged(cmd, &tmp.path().join(format!("{name}.log"))));
        }
        let mut c = EtcdCluster { procs, client_ports: ports.iter().map(|p| p.0).collect(), _tmp: tmp };
        for i in 0..3 {
            let ep = c.endpoint(i);
            wait_ready(&ep, &mut c.procs[i]);
        }
        c
    }

    /// `host:port` of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.client_ports[i])
    }
}

/// Connect the `etcd-client` crate to endpoints (comma-separated).
pub async fn client(endpoints: &str) -> etcd_client::Client {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(15));
    let endpoints: Vec<&str> = endpoints.split(',').collect();
    etcd_client::Client::connect(endpoints, Some(opts)).await.expect("connect")
}

/// A multi-threaded runtime for a test body.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
}

/// A cluster of `lockctl` voters on loopback with generated certificates.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    initial: String,
    /// Flags every member starts with besides the cluster's own.
    extra: Vec<String>,
    /// The peer port each member is known by, where it is not the one it listens on.
    advertised: std::collections::HashMap<String, u16>,
    /// Each member's `--role` where it is not a voter.
    roles: std::collections::HashMap<String, String>,
    tmp: tempfile::TempDir,
}

/// Run `lockctl` as a client (certs, member); panics unless it succeeds. Returns stdout and
/// stderr.
pub fn lockctl_ok(args: &[&str]) -> (String, String) {
    let out = lockctl(args);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "lockctl {args:?}: {stdout}{stderr}");
    (stdout, stderr)
}

/// Run `lockctl` as a client; returns its exit status, stdout and stderr.
pub fn lockctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockctl"));
    cmd.args(args);
    run_with_deadline(cmd, None, Duration::from_secs(60))
}

/// Wait until `acked` holds at least `count` entries; panics if it stalls for 30 s.
pub fn wait_for_acks<T>(acked: &std::sync::Mutex<Vec<T>>, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < count {
        assert!(Instant::now() < deadline, "writes stalled at {}", acked.lock().unwrap().len());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One member of a [`Cluster`].
pub struct ClusterNode {
    pub name: String,
    pub proc: Proc,
    pub client_port: u16,
    pub peer_port: u16,
}

impl Cluster {
    /// Start `n` voters and wait until every one serves linearizable reads.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// Start `n` voters, each also given the flags `extra`.
    pub fn start_with(n: usize, extra: &[&str]) -> Cluster {
        let ports = (0..n).map(|_| (free_port(), free_port())).map(|(c, p)| (c, p, p)).collect();
        Cluster::start_on(ports, extra)
    }

    /// Start a voter on each (client port, peer port it listens on, peer port it is known by):
    /// a member known by another port than its own is reached through a relay there.
    pub fn start_on(ports: Vec<(u16, u16, u16)>, extra: &[&str]) -> Cluster {
        let mut c = Cluster::spawn_all(ports, extra);
        for i in 0..c.nodes.len() {
            c.wait_ready(i);
        }
        c
    }

    /// A cluster whose member `i` starts with `--role roles[i]` (voter, witness); waits until
    /// each voter serves linearizable reads and each witness answers a status request.
    pub fn start_roles(roles: &[&str]) -> Cluster {
        Cluster::start_roles_with(roles, &[])
    }

    /// [`Cluster::start_roles`], each member also given the flags `extra`.
    pub fn start_roles_with(roles: &[&str], extra: &[&str]) -> Cluster {
        let ports = roles.iter().map(|_| (free_port(), free_port())).map(|(c, p)| (c, p, p)).collect();
        let mut c = Cluster::spawn_all_roles(ports, extra, roles);
        for (i, role) in roles.iter().enumerate() {
            let ep = c.endpoint(i);
            match *role {
                "witness" => wait_answering(&ep, &mut c.nodes[i].proc, &["endpoint", "status"]),
                _ => wait_ready(&ep, &mut c.nodes[i].proc),
            }
        }
        c
    }

    /// [`Cluster::start_with`] for members that may refuse linearizable reads (an active-passive
    /// primary without its region write lease): waits for each to answer a serializable one.
    pub fn start_serving_serializable(n: usize, extra: &[&str]) -> Cluster {
        let ports = (0..n).map(|_| (free_port(), free_port())).map(|(c, p)| (c, p, p)).collect();
        let mut c = Cluster::spawn_all(ports, extra);
        for i in 0..n {
            let ep = c.endpoint(i);
            wait_answering(&ep, &mut c.nodes[i].proc, &["get", "readiness-probe", "--consistency=s"]);
        }
        c
    }

    fn spawn_all(ports: Vec<(u16, u16, u16)>, extra: &[&str]) -> Cluster {
        let voters = vec!["voter"; ports.len()];
        Cluster::spawn_all_roles(ports, extra, &voters)
    }

    fn spawn_all_roles(ports: Vec<(u16, u16, u16)>, extra: &[&str], roles: &[&str]) -> Cluster {
        let n = ports.len();
        let tmp = tempfile::tempdir().unwrap();
        let certs = tmp.path().join("certs");
        let lockctl = |args: &[&str]| {
            lockctl_ok(args);
        };
        lockctl(&["certs", "init", "--dir", certs.to_str().unwrap()]);
        let initial =
            (0..n).map(|i| format!("n{}=http://127.0.0.1:{}", i + 1, ports[i].2)).collect::<Vec<_>>().join(",");
        for i in 0..n {
            lockctl(&[
                "certs",
                "issue",
                "--dir",
                certs.to_str().unwrap(),
                "--name",
                &format!("n{}", i + 1),
                "--host",
                "127.0.0.1",
            ]);
        }
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let advertised = ports.iter().enumerate().map(|(i, p)| (format!("n{}", i + 1), p.2)).collect();
        let roles =
            (0..n).filter(|i| roles[*i] != "voter").map(|i| (format!("n{}", i + 1), roles[i].to_string())).collect();
        let mut c = Cluster { nodes: Vec::new(), initial, extra, advertised, roles, tmp };
        for (i, (cp, pp, _)) in ports.into_iter().enumerate() {
            let name = format!("n{}", i + 1);
            let proc = c.spawn(&name, cp, pp, "new");
            c.nodes.push(ClusterNode { name, proc, client_port: cp, peer_port: pp });
        }
        c
    }

    fn spawn(&self, name: &str, client_port: u16, peer_port: u16, state: &str) -> Proc {
        let data = self.tmp.path().join(name);
        self.spawn_with(
            name,
            &data,
            client_port,
            peer_port,
            state,
            &self.tmp.path().join("certs"),
            &self.initial.clone(),
        )
    }

    /// A process that claims to be member `name` of `initial`, with the CA and certificates in
    /// `certs` (which may not be this cluster's).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_with(
        &self,
        name: &str,
        data: &Path,
        client_port: u16,
        peer_port: u16,
        state: &str,
        certs: &Path,
        initial: &str,
    ) -> Proc {
        let flags = MemberFlags {
            advertised_peer: Some(format!("127.0.0.1:{}", self.advertised.get(name).copied().unwrap_or(peer_port))),
            initial_cluster: initial.to_string(),
            initial_cluster_state: Some(state.to_string()),
            ..MemberFlags::single(name, data.to_path_buf(), client_port, peer_port)
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockctl"));
        cmd.args(flags.lockctl_start(Some(certs))).args(&self.extra);
        if let Some(role) = self.roles.get(name) {
            cmd.args(["--role", role]);
        }
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = self.tmp.path().join(format!("{name}-{}.log", STARTS.fetch_add(1, Ordering::Relaxed)));
        spawn_logged(cmd, &log)
    }

    fn wait_ready(&mut self, i: usize) {
        let ep = self.endpoint(i);
        wait_ready(&ep, &mut self.nodes[i].proc);
    }

    /// `host:port` of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Every member's endpoint, comma-separated.
    pub fn endpoints(&self) -> String {
        (0..self.nodes.len()).map(|i| self.endpoint(i)).collect::<Vec<_>>().join(",")
    }

    /// Index of the member that leads, as the members report it.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in 0..self.nodes.len() {
                if self.nodes[i].proc.child.is_none() {
                    continue;
                }
                let out = etcdctl(&self.endpoint(i), &["endpoint", "status", "-w", "json"], None);
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { continue };
                let s = &v[0]["Status"];
                if s["leader"].as_u64().is_some() && s["leader"] == s["header"]["member_id"] {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no leader after 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The cluster's working directory.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The `--initial-cluster` value of the members.
    pub fn initial(&self) -> &str {
        &self.initial
    }

    /// The log of member `i`'s latest run.
    pub fn log(&self, i: usize) -> String {
        self.nodes[i].proc.log()
    }

    /// Add member `name` with `lockctl member add --learner` (asked of member `via`), then start
    /// it with `--initial-cluster-state existing`, and wait until it serves. Returns its index
    /// and the output of `member add`.
    pub fn add_learner(&mut self, name: &str, via: usize) -> (usize, String) {
        self.add_learner_on(name, via, free_port())
    }

    /// [`Cluster::add_learner`], its client port `client_port`.
    pub fn add_learner_on(&mut self, name: &str, via: usize, client_port: u16) -> (usize, String) {
        let certs = self.tmp.path().join("certs");
        lockctl_ok(&["certs", "issue", "--dir", certs.to_str().unwrap(), "--name", name, "--host", "127.0.0.1"]);
        let (cp, pp) = (client_port, free_port());
        let peer = format!("http://127.0.0.1:{pp}");
        let (out, _) =
            lockctl_ok(&["member", "add", name, "--peer-urls", &peer, "--learner", "--endpoints", &self.endpoint(via)]);
        self.initial = format!("{},{name}={peer}", self.initial);
        let proc = self.spawn(name, cp, pp, "existing");
        self.nodes.push(ClusterNode { name: name.to_string(), proc, client_port: cp, peer_port: pp });
        let i = self.nodes.len() - 1;
        self.wait_ready(i);
        (i, out)
    }

    /// SIGTERM member `i` and wait for it to exit.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].proc.terminate(Duration::from_secs(15));
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].proc.kill();
    }

    /// Start member `i` again on its data and wait until it serves.
    pub fn restart(&mut self, i: usize) {
        self.respawn(i);
        self.wait_ready(i);
    }

    /// Start member `i` again on its data, without waiting for it to serve (a fenced member
    /// never serves a linearizable read).
    /// Start member `i` again, on its data directory, as a member joining the existing cluster
    /// `initial` names (a member rejoining another cluster); without waiting.
    pub fn respawn_into(&mut self, i: usize, initial: &str) {
        let (name, cp, pp) = (self.nodes[i].name.clone(), self.nodes[i].client_port, self.nodes[i].peer_port);
        let (data, certs) = (self.data_dir(i), self.tmp.path().join("certs"));
        self.nodes[i].proc = self.spawn_with(&name, &data, cp, pp, "existing", &certs, initial);
    }

    /// Member `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.tmp.path().join(&self.nodes[i].name)
    }

    /// The peer URL member `i` is known by.
    pub fn peer_url(&self, i: usize) -> String {
        let name = &self.nodes[i].name;
        format!("http://127.0.0.1:{}", self.advertised.get(name).copied().unwrap_or(self.nodes[i].peer_port))
    }

    pub fn respawn(&mut self, i: usize) {
        let (name, cp, pp) = (self.nodes[i].name.clone(), self.nodes[i].client_port, self.nodes[i].peer_port);
        self.nodes[i].proc = self.spawn(&name, cp, pp, "new");
    }
}

/// What `dig` (BIND's own tool, not our reader) gets from `bind` for `name` and `rtype`, over
/// TCP, one answer a line, sorted.
pub fn dig(bind: &geolock_testkit::bind::Bind, name: &str, rtype: &str) -> Vec<String> {
    let mut cmd = Command::new("dig");
    cmd.args([&format!("@{}", bind.addr.ip()), "-p", &bind.addr.port().to_string(), "+short", "+tcp", name, rtype]);
    let out = run_with_deadline(cmd, None, Duration::from_secs(20));
    assert!(out.status.success(), "dig: {}", String::from_utf8_lossy(&out.stderr));
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// `etcdctl put` on `endpoint` within `timeout` (etcdctl's `--command-timeout`, such as `2s`):
/// whether it succeeded, and what it printed on both streams.
pub fn put_outcome(endpoint: &str, key: &str, value: &str, timeout: &str) -> (bool, String) {
    let out = etcdctl(endpoint, &[&format!("--command-timeout={timeout}"), "put", key, value], None);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// A resource that accepts a writer only with a fencing token greater than every token it
/// accepted before, and notices two writers inside it at once.
#[derive(Default)]
pub struct FencedResource {
    last_token: Mutex<i64>,
    inside: AtomicBool,
    accepted: Mutex<Vec<i64>>,
    rejections: AtomicUsize,
    overlaps: AtomicUsize,
}

impl FencedResource {
    pub async fn write(&self, token: i64) {
        if self.inside.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        {
            let mut last = self.last_token.lock().unwrap();
            if token <= *last {
                self.rejections.fetch_add(1, Ordering::SeqCst);
            } else {
                *last = token;
                self.accepted.lock().unwrap().push(token);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.inside.store(false, Ordering::SeqCst);
    }

    /// How many writes it accepted; or what went wrong: a token rejected, two holders inside
    /// at once, tokens not strictly increasing.
    pub fn verdict(&self) -> Result<usize, String> {
        let (r, o) = (self.rejections.load(Ordering::SeqCst), self.overlaps.load(Ordering::SeqCst));
        let accepted = self.accepted.lock().unwrap();
        if r > 0 || o > 0 {
            return Err(format!("{r} rejected tokens, {o} overlapping holds"));
        }
        if !accepted.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!("tokens not strictly increasing: {accepted:?}"));
        }
        Ok(accepted.len())
    }
}

/// A sample line: its metric name, labels and value.
pub fn parse_sample(line: &str) -> Option<(String, std::collections::BTreeMap<String, String>, f64)> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = std::collections::BTreeMap::new();
    let mut rest = rest;
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end;
        loop {
            let (start, c) = chars.next()?;
            if c == '}' {
                end = start;
                break;
            }
            if c == ',' {
                continue;
            }
            let eq = body[start..].find('=')? + start;
            let key = body[start..eq].to_string();
            while chars.peek().is_some_and(|(i, _)| *i <= eq + 1) {
                chars.next();
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '\\' => value.push(chars.next()?.1),
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
        }
        rest = &body[end + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = if value == "+Inf" { f64::INFINITY } else { value.parse().ok()? };
    Some((name.to_string(), labels, value))
}

/// The value of the first sample in a Prometheus exposition named `name` whose labels include
/// `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(parse_sample).find_map(|(n, ls, v)| {
        (n == name && labels.iter().all(|(k, want)| ls.get(*k).is_some_and(|got| got == want))).then_some(v)
    })
}

/// An HTTP client that gives up after `timeout`.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    // reqwest takes the process's rustls provider (for https, unused here); the project's is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(timeout).build().unwrap()
}

/// GET `url`: status and body. Panics if nothing answers within 15 s.
pub fn get(url: &str) -> (u16, String) {
    rt().block_on(async {
        let client = http_client(Duration::from_secs(15));
        let resp = client.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    })
}
