//! The local multi-region harness: every node of a topology (`regions/*.yaml`) as a real
//! `lockctl start` process on this machine, with the topology's WAN latency between regions.
//!
//! Run as root, each region gets a network namespace of its own, joined to the root namespace
//! by a veth pair; a partition takes that link down. Otherwise each region gets loopback
//! addresses of its own, and a partition is the relay dropping the region's datagrams. Either
//! way every node's peer (QUIC) traffic passes through a [`Relay`] of its own in the root
//! namespace, which delays each datagram by the one-way latency between the sender's region and
//! the node's: members advertise their relay's address as their peer URL. Client traffic goes
//! straight to the nodes.
//!
//! Voters and witnesses found the cluster; learners join it once it has a leader (MemberAdd as
//! learners, then start with `--initial-cluster-state existing`). Dropping the harness kills
//! every process and removes its namespaces, also when a test fails; a harness killed outright
//! leaves namespaces behind that the next one removes (their names carry the owner's pid).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod failover;
pub use failover::{FailoverRoles, VANTAGE_PORT};

use crate::launch::MemberFlags;
use crate::relay::{DelayFor, Relay};
use crate::topology::Role;
use crate::topology::{Topology, TopologyNode};
use geolock_proto::etcdserverpb as pb;

/// Why the harness could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("harness: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Certs(#[from] crate::certs::CertError),
    #[error("harness: `{cmd}` failed: {stderr}")]
    Ip { cmd: String, stderr: String },
    #[error("harness: node {name} did not come up within {waited:?}: {detail} (log: {log})")]
    NotReady { name: String, waited: Duration, detail: String, log: String },
    #[error("harness: node {name} exited: {status} (log: {log})")]
    Exited { name: String, status: std::process::ExitStatus, log: String },
    #[error("harness: no node or region named {0}")]
    Unknown(String),
    #[error("harness: no free address block for another cluster on this machine")]
    NoAddresses,
    #[error("harness: {0}")]
    Bind(#[from] crate::bind::BindError),
}

/// How to run the harness.
#[derive(Clone, Debug)]
pub struct GeoOptions {
    /// The `lockctl` binary.
    pub lockctl: PathBuf,
    /// Certificates, data directories and logs go here.
    pub dir: PathBuf,
    /// Regions in network namespaces (needs root) rather than on loopback addresses.
    pub namespaces: bool,
    /// More flags for every `lockctl start`.
    pub extra_flags: Vec<String>,
}

impl GeoOptions {
    /// Namespaces when run as root, as the harness prefers.
    pub fn new(lockctl: PathBuf, dir: PathBuf) -> GeoOptions {
        GeoOptions { lockctl, dir, namespaces: running_as_root(), extra_flags: Vec::new() }
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// A node of the running topology.
#[derive(Debug)]
pub struct GeoNode {
    pub name: String,
    pub region: String,
    pub role: Role,
    /// Where clients reach it.
    pub client: SocketAddr,
    /// Where it listens for peers.
    pub peer: SocketAddr,
    /// Where peers reach it: its relay.
    pub advertised_peer: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    proc: Option<Child>,
}

impl GeoNode {
    /// `host:port` for clients.
    pub fn endpoint(&self) -> String {
        self.client.to_string()
    }

    /// Whether its process runs.
    pub fn running(&self) -> bool {
        self.proc.is_some()
    }

    /// Its process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|c| c.id())
    }
}

/// The regions the relays cut off.
#[derive(Debug, Default)]
pub(crate) struct Cuts {
    /// From everything, their own members too ([`GeoCluster::partition`] on loopback).
    whole: BTreeSet<String>,
    /// From the other regions only ([`GeoCluster::cut_wan`]).
    wan: BTreeSet<String>,
    /// Between two regions, each pair in name order ([`GeoCluster::cut_between`]).
    pairs: BTreeSet<(String, String)>,
}

impl Cuts {
    /// Whether traffic from region `from` to region `to` is dropped.
    pub(crate) fn drops(&self, from: &str, to: &str) -> bool {
        let any = |set: &BTreeSet<String>| set.contains(from) || set.contains(to);
        any(&self.whole) || (from != to && (any(&self.wan) || self.pairs.contains(&pair(from, to))))
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.min(b).to_string(), a.max(b).to_string())
}

/// Regions in namespaces: one per region, with the root end of its veth pair.
#[derive(Debug)]
struct Namespace {
    name: String,
    root_link: String,
}

/// A running topology; dropping it stops everything.
pub struct GeoCluster {
    pub topology: Topology,
    pub nodes: Vec<GeoNode>,
    opts: GeoOptions,
    certs: PathBuf,
    namespaces: HashMap<String, Namespace>,
    /// Regions cut off: whole in loopback mode, and from the other regions only in either
    /// (the relays drop their datagrams).
    cut: Arc<Mutex<Cuts>>,
    /// Members whose peer traffic the relays drop, by address, in either mode.
    isolated: Arc<Mutex<BTreeSet<IpAddr>>>,
    /// An active-passive topology's controller, arbiter and DNS server.
    pub failover: Option<FailoverRoles>,
    _relays: Vec<Relay>,
    _block: Block,
}

/// Address blocks in use by harnesses of this process.
static BLOCKS: Mutex<BTreeSet<u8>> = Mutex::new(BTreeSet::new());
static NEXT_BLOCK: AtomicU32 = AtomicU32::new(0);

/// Released when its cluster is dropped.
struct Block(u8);

fn take_block(namespaces: bool) -> Result<u8, GeoError> {
    // Pick a block unused here and, for namespaces, not already on an interface of this machine
    // (another test process may run a harness).
    let taken_elsewhere =
        if namespaces { ip_output(&["-o", "-4", "addr", "show"]).unwrap_or_default() } else { String::new() };
    let start = std::process::id().wrapping_add(NEXT_BLOCK.fetch_add(1, Ordering::Relaxed) * 7);
    let mut blocks = BLOCKS.lock().unwrap();
    for i in 0..64u32 {
        let b = ((start + i) % 64) as u8;
        if blocks.contains(&b) || taken_elsewhere.contains(&format!(" 10.{}.", 64 + b)) {
            continue;
        }
        blocks.insert(b);
        return Ok(b);
    }
    Err(GeoError::NoAddresses)
}

impl Drop for Block {
    fn drop(&mut self) {
        BLOCKS.lock().unwrap().remove(&self.0);
    }
}

fn ip_output(args: &[&str]) -> Result<String, GeoError> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(GeoError::Ip {
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn ip(args: &[&str]) -> Result<(), GeoError> {
    ip_output(args).map(|_| ())
}

/// Remove namespaces left by harnesses whose process is gone.
fn remove_stale_namespaces() {
    let Ok(list) = ip_output(&["netns", "list"]) else { return };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = ns.strip_prefix("gl").and_then(|r| r.split('c').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

impl GeoCluster {
    /// Start every node of `topology`; returns once every node serves.
    pub async fn start(topology: Topology, opts: GeoOptions) -> Result<GeoCluster, GeoError> {
        std::fs::create_dir_all(&opts.dir)?;
        let block = take_block(opts.namespaces)?;
        let region_index: HashMap<&str, u8> =
            topology.regions.iter().enumerate().map(|(i, r)| (r.name.as_str(), i as u8 + 1)).collect();
        if opts.namespaces {
            remove_stale_namespaces();
        }
        let mut cluster = GeoCluster {
            topology: topology.clone(),
            nodes: Vec::new(),
            opts: opts.clone(),
            certs: opts.dir.join("certs"),
            namespaces: HashMap::new(),
            cut: Arc::new(Mutex::new(Cuts::default())),
            isolated: Arc::new(Mutex::new(BTreeSet::new())),
            failover: None,
            _relays: Vec::new(),
            _block: Block(block),
        };
        // Addresses: region r of block b is 10.(64+b).r.0/24 in namespaces (the root end .1,
        // nodes from .10), or 127.(64+b).r.0/24 on loopback (relays on .1, nodes from .10).
        let first_octet = if opts.namespaces { 10 } else { 127 };
        let root_ip = |r: u8| IpAddr::V4(Ipv4Addr::new(first_octet, 64 + block, r, 1));
        let node_ip = |r: u8, j: u8| IpAddr::V4(Ipv4Addr::new(first_octet, 64 + block, r, 10 + j));
        let mut in_region: HashMap<&str, u8> = HashMap::new();
        let mut placed = Vec::new();
        for n in &topology.nodes {
            let r = region_index[n.region.as_str()];
            let j = in_region.entry(n.region.as_str()).or_default();
            placed.push((n, r, node_ip(r, *j)));
            *j += 1;
        }
        // The failover controller and arbiter each take the next address of their region.
        let vantage_ips: Option<(IpAddr, IpAddr)> = topology.failover.as_ref().map(|f| {
            let mut next = |region: &'_ str| {
                let r = region_index[region];
                let j = in_region.get(region).copied().unwrap_or_default();
                in_region.insert(if region == f.standby { &f.standby } else { &f.arbiter }, j + 1);
                node_ip(r, j)
            };
            (next(&f.standby), next(&f.arbiter))
        });
        let mut region_addrs: Vec<(u8, IpAddr)> = placed.iter().map(|(_, r, addr)| (*r, *addr)).collect();
        if let (Some((ctl, arb)), Some(f)) = (vantage_ips, &topology.failover) {
            region_addrs.push((region_index[f.standby.as_str()], ctl));
            region_addrs.push((region_index[f.arbiter.as_str()], arb));
        }
        if opts.namespaces {
            let pid = std::process::id();
            for region in &topology.regions {
                let r = region_index[region.name.as_str()];
                let ns = Namespace { name: format!("gl{pid}c{block}r{r}"), root_link: format!("gl{block}r{r}") };
                let inner = format!("gl{block}r{r}n");
                ip(&["netns", "add", &ns.name])?;
                // Owned by the cluster from here, so that a failure below still removes it.
                cluster.namespaces.insert(region.name.clone(), ns);
                let ns = &cluster.namespaces[&region.name];
                ip(&["link", "add", &ns.root_link, "type", "veth", "peer", "name", &inner])?;
                ip(&["link", "set", &inner, "netns", &ns.name])?;
                ip(&["addr", "add", &format!("{}/24", root_ip(r)), "dev", &ns.root_link])?;
                ip(&["link", "set", &ns.root_link, "up"])?;
                for (_, addr) in region_addrs.iter().filter(|(nr, _)| *nr == r) {
                    ip(&["-n", &ns.name, "addr", "add", &format!("{addr}/24"), "dev", &inner])?;
                }
                ip(&["-n", &ns.name, "link", "set", &inner, "up"])?;
                ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
                ip(&["-n", &ns.name, "route", "add", "default", "via", &root_ip(r).to_string()])?;
            }
        }
        // Which region a sender is in, by its address.
        let region_of: Arc<HashMap<IpAddr, String>> =
            Arc::new(placed.iter().map(|(n, _, addr)| (*addr, n.region.clone())).collect());
        crate::certs::init_ca(&cluster.certs)?;
        let mut relays = Vec::new();
        for (n, r, addr) in &placed {
            crate::certs::issue(&cluster.certs, &n.name, &[addr.to_string(), "127.0.0.1".to_string()])?;
            let peer = SocketAddr::new(*addr, port_of(&n.peer)?);
            let client = SocketAddr::new(*addr, port_of(&n.client)?);
            let delay_for =
                delays(&topology, n, *addr, region_of.clone(), cluster.cut.clone(), cluster.isolated.clone());
            let relay = Relay::start(SocketAddr::new(root_ip(*r), 0), peer, delay_for).await?;
            let data_dir = opts.dir.join(&n.name);
            cluster.nodes.push(GeoNode {
                name: n.name.clone(),
                region: n.region.clone(),
                role: n.role,
                client,
                peer,
                advertised_peer: relay.listen,
                log: opts.dir.join(format!("{}.log", n.name)),
                data_dir,
                args: Vec::new(),
                proc: None,
            });
            relays.push(relay);
        }
        cluster._relays = relays;
        if let (Some((ctl, arb)), Some(spec)) = (vantage_ips, &topology.failover) {
            let roots: failover::Roots =
                topology.regions.iter().map(|r| (r.name.clone(), root_ip(region_index[r.name.as_str()]))).collect();
            let (ctl, arb) = (SocketAddr::new(ctl, VANTAGE_PORT), SocketAddr::new(arb, VANTAGE_PORT));
            cluster.failover = Some(failover::start(&cluster, spec, ctl, arb, &roots).await?);
        }
        let founders: Vec<usize> =
            (0..cluster.nodes.len()).filter(|i| cluster.nodes[*i].role != Role::Learner).collect();
        let initial = founders
            .iter()
            .map(|i| format!("{}=http://{}", cluster.nodes[*i].name, cluster.nodes[*i].advertised_peer))
            .collect::<Vec<_>>()
            .join(",");
        for i in founders.clone() {
            cluster.nodes[i].args = cluster.start_args(i, &initial, "new");
            cluster.spawn(i)?;
        }
        for i in founders {
            cluster.wait_serving(i, Duration::from_secs(60)).await?;
        }
        let learners: Vec<usize> =
            (0..cluster.nodes.len()).filter(|i| cluster.nodes[*i].role == Role::Learner).collect();
        let mut joined = initial;
        for i in learners {
            let (name, url) = (cluster.nodes[i].name.clone(), format!("http://{}", cluster.nodes[i].advertised_peer));
            add_learner(&cluster.voter_endpoints(), &name, &url).await?;
            joined = format!("{joined},{name}={url}");
            cluster.nodes[i].args = cluster.start_args(i, &joined, "existing");
            cluster.spawn(i)?;
            cluster.wait_serving(i, Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    fn start_args(&self, i: usize, initial: &str, state: &str) -> Vec<String> {
        let n = &self.nodes[i];
        let flags = MemberFlags {
            name: n.name.clone(),
            data_dir: n.data_dir.clone(),
            client: n.client.to_string(),
            peer: n.peer.to_string(),
            advertised_peer: Some(n.advertised_peer.to_string()),
            initial_cluster: initial.to_string(),
            initial_cluster_state: Some(state.to_string()),
            client_tls: false,
        };
        let mut a: Vec<String> =
            flags.lockctl_start(Some(&self.certs)).iter().map(|s| s.to_string_lossy().into_owned()).collect();
        a.extend(["--role".into(), n.role.to_string(), "--region".into(), n.region.clone()]);
        if let Some(ms) = self.topology.raft.heartbeat_interval_ms {
            a.extend(["--heartbeat-interval".into(), ms.to_string()]);
        }
        if let Some(ms) = self.topology.raft.election_timeout_ms {
            a.extend(["--election-timeout".into(), ms.to_string()]);
        }
        // The primary's voters write only while both vantage points grant the region write lease.
        if let (Role::Voter, Some(f)) = (n.role, &self.failover) {
            a.extend(["--failover-vantages".into(), f.vantages.clone()]);
            a.extend(["--failover-write-lease-ms".into(), f.write_lease_ms.to_string()]);
        }
        a.extend(self.opts.extra_flags.iter().cloned());
        a
    }

    fn spawn(&mut self, i: usize) -> Result<(), GeoError> {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log)?;
        let mut cmd = self.launcher_in(&n.region)?.command(&self.opts.lockctl);
        cmd.args(&n.args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn()?;
        self.nodes[i].proc = Some(child);
        Ok(())
    }

    /// Wait until node `i` answers a read (linearizable on voters, serializable elsewhere).
    async fn wait_serving(&mut self, i: usize, limit: Duration) -> Result<(), GeoError> {
        self.wait_until(i, limit, false).await
    }

    /// Wait until node `i` serves reads, or with `status_only` only reports its status.
    async fn wait_until(&mut self, i: usize, limit: Duration, status_only: bool) -> Result<(), GeoError> {
        let deadline = Instant::now() + limit;
        let serializable = self.nodes[i].role != Role::Voter;
        loop {
            let probe = if status_only || self.nodes[i].role == Role::Witness {
                // A witness serves no reads: it is up once it reports status.
                status(&self.nodes[i].endpoint()).await.map(|_| ())
            } else {
                read_probe(&self.nodes[i].endpoint(), serializable).await
            };
            let detail = match probe {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let n = &mut self.nodes[i];
            if let Some(status) = n.proc.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                n.proc = None;
                return Err(GeoError::Exited { name: n.name.clone(), status, log: n.log.display().to_string() });
            }
            if Instant::now() > deadline {
                return Err(GeoError::NotReady {
                    name: n.name.clone(),
                    waited: limit,
                    detail,
                    log: n.log.display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn index(&self, name: &str) -> Result<usize, GeoError> {
        self.nodes.iter().position(|n| n.name == name).ok_or_else(|| GeoError::Unknown(name.to_string()))
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &GeoNode {
        &self.nodes[self.index(name).expect("a node of the topology")]
    }

    /// Client endpoints of the running voters, comma-separated.
    pub fn voter_endpoints(&self) -> String {
        self.endpoints(|n| n.role == Role::Voter)
    }

    /// Client endpoints of the running nodes that `keep` selects, comma-separated.
    pub fn endpoints(&self, keep: impl Fn(&GeoNode) -> bool) -> String {
        self.nodes.iter().filter(|n| n.running() && keep(n)).map(|n| n.endpoint()).collect::<Vec<_>>().join(",")
    }

    /// SIGKILL node `name`.
    pub fn kill(&mut self, name: &str) -> Result<(), GeoError> {
        let i = self.index(name)?;
        if let Some(mut c) = self.nodes[i].proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Start node `name` again on its data, and wait until it serves.
    pub async fn restart(&mut self, name: &str) -> Result<(), GeoError> {
        let i = self.index(name)?;
        self.kill(name)?;
        self.spawn(i)?;
        self.wait_serving(i, Duration::from_secs(60)).await
    }

    /// Start node `name` again on its data, and wait only until it reports its status: an old
    /// primary's voter without its region write lease serves no linearizable read.
    pub async fn restart_reporting(&mut self, name: &str) -> Result<(), GeoError> {
        let i = self.index(name)?;
        self.kill(name)?;
        self.spawn(i)?;
        self.wait_until(i, Duration::from_secs(60), true).await
    }

    /// Cut region `region` off from every other (its nodes keep running). In namespaces its
    /// link goes down: its members no longer reach each other either (their peer traffic
    /// passes the root namespace's relays), nor clients outside it. See also
    /// [`GeoCluster::cut_wan`].
    pub fn partition(&mut self, region: &str) -> Result<(), GeoError> {
        self.set_link(region, false)
    }

    /// Cut region `region` off from every other region, as a WAN partition does: its members
    /// still reach each other, and clients in it (see [`GeoCluster::runtime_in`]) reach them;
    /// the relays drop every datagram and connection between it and another region.
    pub fn cut_wan(&mut self, region: &str) -> Result<(), GeoError> {
        self.index_region(region)?;
        self.cut.lock().unwrap().wan.insert(region.to_string());
        Ok(())
    }

    /// Undo [`GeoCluster::cut_wan`].
    pub fn heal_wan(&mut self, region: &str) -> Result<(), GeoError> {
        self.index_region(region)?;
        self.cut.lock().unwrap().wan.remove(region);
        Ok(())
    }

    /// Cut regions `a` and `b` off from each other only (a one-sided partition, as the
    /// other regions see it); `up` undoes it.
    pub fn cut_between(&mut self, a: &str, b: &str, up: bool) -> Result<(), GeoError> {
        self.index_region(a)?;
        self.index_region(b)?;
        let pairs = &mut self.cut.lock().unwrap().pairs;
        match up {
            true => pairs.remove(&pair(a, b)),
            false => pairs.insert(pair(a, b)),
        };
        Ok(())
    }

    fn index_region(&self, region: &str) -> Result<(), GeoError> {
        match self.topology.regions.iter().any(|r| r.name == region) {
            true => Ok(()),
            false => Err(GeoError::Unknown(region.to_string())),
        }
    }

    /// Undo [`GeoCluster::partition`].
    pub fn heal(&mut self, region: &str) -> Result<(), GeoError> {
        self.set_link(region, true)
    }

    fn set_link(&mut self, region: &str, up: bool) -> Result<(), GeoError> {
        if !self.topology.regions.iter().any(|r| r.name == region) {
            return Err(GeoError::Unknown(region.to_string()));
        }
        match self.namespaces.get(region) {
            Some(ns) => ip(&["link", "set", &ns.root_link, if up { "up" } else { "down" }]),
            None => {
                let whole = &mut self.cut.lock().unwrap().whole;
                if up {
                    whole.remove(region);
                } else {
                    whole.insert(region.to_string());
                }
                Ok(())
            }
        }
    }

    /// Cut member `name` off from every other member, its own region's too: the relays drop its
    /// peer traffic both ways. Clients still reach it, so it goes on serving what it can.
    pub fn isolate(&mut self, name: &str) -> Result<(), GeoError> {
        let ip = self.nodes[self.index(name)?].peer.ip();
        self.isolated.lock().unwrap().insert(ip);
        Ok(())
    }

    /// Undo [`GeoCluster::isolate`].
    pub fn rejoin(&mut self, name: &str) -> Result<(), GeoError> {
        let ip = self.nodes[self.index(name)?].peer.ip();
        self.isolated.lock().unwrap().remove(&ip);
        Ok(())
    }

    /// Starts programs in region `region`: inside its network namespace, so that they reach
    /// that region's members while the region is cut off (and only them then).
    pub fn launcher_in(&self, region: &str) -> Result<RegionLauncher, GeoError> {
        if !self.topology.regions.iter().any(|r| r.name == region) {
            return Err(GeoError::Unknown(region.to_string()));
        }
        Ok(RegionLauncher { namespace: self.namespaces.get(region).map(|ns| ns.name.clone()) })
    }

    /// A runtime whose tasks run in region `region` (a thread of this process moved into the
    /// region's namespace), for clients that must reach that region's members while it is cut
    /// off. Tasks must be spawned onto it (`spawn`), not driven from another thread.
    pub fn runtime_in(&self, region: &str) -> Result<RegionRuntime, GeoError> {
        let ns = match self.namespaces.get(region) {
            Some(ns) => Some(std::fs::File::open(format!("/run/netns/{}", ns.name))?),
            None if self.topology.regions.iter().any(|r| r.name == region) => None,
            None => return Err(GeoError::Unknown(region.to_string())),
        };
        RegionRuntime::start(ns)
    }

    /// Lose region `region` whole: SIGKILL its nodes and cut it off.
    pub fn drop_region(&mut self, region: &str) -> Result<(), GeoError> {
        let names: Vec<String> = self.nodes.iter().filter(|n| n.region == region).map(|n| n.name.clone()).collect();
        self.partition(region)?;
        for n in names {
            self.kill(&n)?;
        }
        Ok(())
    }

    /// What node `name` has logged.
    pub fn log(&self, name: &str) -> String {
        self.index(name).ok().and_then(|i| std::fs::read_to_string(&self.nodes[i].log).ok()).unwrap_or_default()
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }
}

impl Drop for GeoCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.proc.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for ns in self.namespaces.values() {
            let _ = ip(&["netns", "del", &ns.name]);
        }
    }
}

/// Builds commands that run in one region (see [`GeoCluster::launcher_in`]).
#[derive(Clone, Debug)]
pub struct RegionLauncher {
    namespace: Option<String>,
}

impl RegionLauncher {
    /// A command that runs `program` in the region.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.namespace {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

/// A current-thread tokio runtime on a thread of its own, optionally inside a network namespace;
/// stopped when dropped.
pub struct RegionRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RegionRuntime {
    #[allow(unsafe_code)]
    fn start(namespace: Option<std::fs::File>) -> Result<RegionRuntime, GeoError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Some(ns) = namespace {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a namespace file this thread owns; it moves only this thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let _ = ready_tx.send(Err(std::io::Error::last_os_error()));
                    return;
                }
            }
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(rt.handle().clone()));
            rt.block_on(async {
                let _ = stopped.await;
            });
        });
        let handle =
            ready_rx.recv().map_err(|_| GeoError::Io(std::io::Error::other("region runtime thread died")))??;
        Ok(RegionRuntime { handle, stop: Some(stop), thread: Some(thread) })
    }

    /// The runtime's handle; tasks spawned on it run in the region.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Run `f` in the region; await the handle for its output.
    pub fn spawn<F: std::future::Future + Send + 'static>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }
}

impl Drop for RegionRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn port_of(addr: &str) -> Result<u16, GeoError> {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| GeoError::Io(std::io::Error::other(format!("no port in address {addr}"))))
}

/// The relay in front of node `n` (at `addr`): a datagram from a sender in region R waits the
/// one-way latency between R and `n`'s region; one from or to a cut region, or from or to an
/// isolated member, is dropped.
fn delays(
    topology: &Topology,
    n: &TopologyNode,
    addr: IpAddr,
    region_of: Arc<HashMap<IpAddr, String>>,
    cut: Arc<Mutex<Cuts>>,
    isolated: Arc<Mutex<BTreeSet<IpAddr>>>,
) -> DelayFor {
    let topology = topology.clone();
    let here = n.region.clone();
    Arc::new(move |from: SocketAddr| {
        let there = region_of.get(&from.ip())?;
        if cut.lock().unwrap().drops(there, &here) {
            return None;
        }
        let isolated = isolated.lock().unwrap();
        if isolated.contains(&from.ip()) || isolated.contains(&addr) {
            return None;
        }
        Some(topology.one_way(there, &here))
    })
}

/// A read of a probe key, to tell whether a node serves.
async fn read_probe(endpoint: &str, serializable: bool) -> Result<(), String> {
    let ch = geolock_client::connect(endpoint).await.map_err(|e| e.to_string())?;
    let req = pb::RangeRequest { key: b"readiness-probe".to_vec(), serializable, ..Default::default() };
    let mut kv = pb::kv_client::KvClient::new(ch);
    match tokio::time::timeout(Duration::from_secs(5), kv.range(req)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.message().to_string()),
        Err(_) => Err("read timed out".into()),
    }
}

/// Maintenance.Status of a node.
pub async fn status(endpoint: &str) -> Result<pb::StatusResponse, String> {
    let ch = geolock_client::connect(endpoint).await.map_err(|e| e.to_string())?;
    let mut m = pb::maintenance_client::MaintenanceClient::new(ch);
    match tokio::time::timeout(Duration::from_secs(5), m.status(pb::StatusRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(e)) => Err(e.message().to_string()),
        Err(_) => Err("status timed out".into()),
    }
}

/// Add learner `name` at `peer_url` through one of `endpoints`.
async fn add_learner(endpoints: &str, name: &str, peer_url: &str) -> Result<(), GeoError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let cluster = geolock_client::Cluster::plain(endpoints);
    loop {
        let attempt = geolock_client::member_add(&cluster, name, vec![peer_url.to_string()], true);
        match attempt.await.map(drop).map_err(|e| e.to_string()) {
            Ok(()) => return Ok(()),
            Err(e) if e.contains("already exist") => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(GeoError::NotReady {
                    name: name.to_string(),
                    waited: Duration::from_secs(30),
                    detail: format!("member add: {e}"),
                    log: String::new(),
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
