//! An active-passive topology's failover roles in the harness (`failover:` in the topology
//! file): BIND9 serving the clients' name, beside the standby; the arbiter vantage point
//! (`lockctl failover vantage`) in its region; the failover controller (`lockctl
//! failover-controller`) in the standby region; and the TCP relays their traffic crosses
//! regions through, with the topology's latency (see `tcp_relay`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;

use super::{GeoCluster, GeoError, GeoNode};
use crate::bind::Bind;
use crate::tcp_relay::{Cut, TcpRelay};
use crate::topology::{FailoverSpec, Role};

/// The port the controller and the arbiter serve `geolockpb.Vantage` on, each on its own
/// address.
pub const VANTAGE_PORT: u16 = 2390;

/// The failover roles of a running active-passive topology; dropping them stops them.
pub struct FailoverRoles {
    /// The controller's address (vantage point, approvals).
    pub controller: SocketAddr,
    /// The arbiter's.
    pub arbiter: SocketAddr,
    /// The DNS server the controller updates; the clients' name starts on the primary.
    pub dns: Bind,
    /// The clients' name (absolute).
    pub client_name: String,
    /// The controller's journal (`lockctl failover status --journal`), configuration and log.
    pub journal: PathBuf,
    pub config: PathBuf,
    pub controller_log: PathBuf,
    pub arbiter_log: PathBuf,
    /// `--failover-vantages` for the primary's voters: their relays to the two vantage points.
    pub(super) vantages: String,
    pub(super) write_lease_ms: u64,
    controller_proc: Option<Child>,
    arbiter_proc: Option<Child>,
    _relays: Vec<TcpRelay>,
}

impl FailoverRoles {
    /// How the controller exited, once it has (it exits when a failover is done).
    pub fn controller_exit(&mut self) -> Option<ExitStatus> {
        self.controller_proc.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for FailoverRoles {
    fn drop(&mut self) {
        for c in [self.controller_proc.as_mut(), self.arbiter_proc.as_mut()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where each region's traffic to another leaves from: the root end of its link (in
/// namespaces), or its relay address (on loopback).
pub(super) type Roots = HashMap<String, IpAddr>;

/// A relay from region `from` to `target`, which stands in region `to`.
async fn relay(c: &GeoCluster, roots: &Roots, from: &str, target: SocketAddr, to: &str) -> Result<TcpRelay, GeoError> {
    let cut = c.cut.clone();
    let (a, b) = (from.to_string(), to.to_string());
    let is_cut: Cut = Arc::new(move || cut.lock().unwrap().drops(&a, &b));
    Ok(TcpRelay::start(SocketAddr::new(roots[from], 0), target, c.topology.one_way(from, to), is_cut).await?)
}

/// `name.region` in the zone: a node's host name.
fn host(n: &GeoNode, zone: &str) -> String {
    format!("{}.{}.{}", n.name, n.region, zone.trim_end_matches('.'))
}

/// Start the roles for `spec`, the controller on `controller` and the arbiter on `arbiter`
/// (addresses of their regions), before the primary's voters, which need both to grant their
/// write lease.
pub(super) async fn start(
    c: &GeoCluster,
    spec: &FailoverSpec,
    controller: SocketAddr,
    arbiter: SocketAddr,
    roots: &Roots,
) -> Result<FailoverRoles, GeoError> {
    let primary = c.topology.primary_region().expect("a failover topology has one primary region").to_string();
    let dir = c.opts.dir.join("failover");
    std::fs::create_dir_all(&dir)?;
    let voters: Vec<&GeoNode> = c.nodes.iter().filter(|n| n.role == Role::Voter).collect();
    let standby: Vec<&GeoNode> =
        c.nodes.iter().filter(|n| n.role == Role::Learner && n.region == spec.standby).collect();
    let mut relays = Vec::new();
    let mut through = |r: TcpRelay| {
        let at = r.listen.to_string();
        relays.push(r);
        at
    };
    let vantages = [
        through(relay(c, roots, &primary, controller, &spec.standby).await?),
        through(relay(c, roots, &primary, arbiter, &spec.arbiter).await?),
    ]
    .join(",");
    let mut seen_from_standby = Vec::new();
    let mut seen_from_arbiter = Vec::new();
    for v in &voters {
        seen_from_standby.push(through(relay(c, roots, &spec.standby, v.client, &primary).await?));
        seen_from_arbiter.push(through(relay(c, roots, &spec.arbiter, v.client, &primary).await?));
    }
    let arbiter_from_standby = through(relay(c, roots, &spec.standby, arbiter, &spec.arbiter).await?);

    // Every node's host name, and the clients' name on the primary.
    let mut records: Vec<String> =
        c.nodes.iter().map(|n| format!("{}. IN A {}", host(n, &spec.zone), n.client.ip())).collect();
    for v in &voters {
        records.push(format!("{} IN A {}", spec.client_name, v.client.ip()));
        records.push(format!(
            "_etcd-client._tcp.{} IN SRV 0 0 {} {}.",
            spec.client_name,
            v.client.port(),
            host(v, &spec.zone)
        ));
    }
    let IpAddr::V4(dns_ip) = roots[&spec.standby] else { unreachable!("the harness's addresses are IPv4") };
    let dns = Bind::start_on(&dir, dns_ip, &spec.zone, &records)?;

    let region_records = |nodes: &[&GeoNode]| {
        let addrs: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.client.ip())).collect();
        let srv: Vec<String> =
            nodes.iter().map(|n| format!("\"{}:{}\"", host(n, &spec.zone), n.client.port())).collect();
        format!("{{ addrs: [{}], srv: [{}] }}", addrs.join(", "), srv.join(", "))
    };
    let journal = dir.join("journal");
    let config = dir.join("controller.yaml");
    let text = format!(
        "name: standby\nlisten: \"{controller}\"\njournal: \"{journal}\"\nprimary: \"{primary_eps}\"\n\
         standby: \"{standby_eps}\"\narbiters: [\"{arbiter_from_standby}\"]\nepoch: 0\nmode: auto\n\
         detect_window_ms: {window}\nprobe_interval_ms: {probe}\nwrite_lease_ms: {lease}\nclock_drift_ms: {drift}\n\
         step_retry_ms: 1000\n\
         dns:\n  server: \"{server}\"\n  zone: \"{zone}\"\n  name: \"{name}\"\n  key_name: \"{key}\"\n  key_secret: \"{secret}\"\n  \
         primary: {primary_records}\n  standby: {standby_records}\n",
        journal = journal.display(),
        primary_eps = seen_from_standby.join(","),
        standby_eps = standby.iter().map(|n| n.endpoint()).collect::<Vec<_>>().join(","),
        window = spec.detect_window_ms,
        probe = spec.probe_interval_ms,
        lease = spec.write_lease_ms,
        drift = spec.clock_drift_ms,
        server = dns.addr,
        zone = spec.zone,
        name = spec.client_name,
        key = dns.key.name,
        secret = data_encoding::BASE64.encode(&dns.key.secret),
        primary_records = region_records(&voters),
        standby_records = region_records(&standby),
    );
    std::fs::write(&config, text)?;

    let spawn = |region: &str, args: &[String], log: &PathBuf| -> Result<Child, GeoError> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = c.launcher_in(region)?.command(&c.opts.lockctl);
        cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        Ok(cmd.spawn()?)
    };
    let arbiter_log = dir.join("arbiter.log");
    let probe = spec.probe_interval_ms.to_string();
    let arbiter_args: Vec<String> =
        ["failover", "vantage", "--listen", &arbiter.to_string(), "--primary", &seen_from_arbiter.join(",")]
            .into_iter()
            .chain(["--probe-interval-ms", &probe])
            .map(str::to_string)
            .collect();
    let mut roles = FailoverRoles {
        controller,
        arbiter,
        dns,
        client_name: spec.client_name.clone(),
        journal,
        config: config.clone(),
        controller_log: dir.join("controller.log"),
        arbiter_log: arbiter_log.clone(),
        vantages,
        write_lease_ms: spec.write_lease_ms,
        controller_proc: None,
        arbiter_proc: None,
        _relays: relays,
    };
    roles.arbiter_proc = Some(spawn(&spec.arbiter, &arbiter_args, &arbiter_log)?);
    let controller_args = ["failover-controller".to_string(), "--config".into(), config.display().to_string()];
    roles.controller_proc = Some(spawn(&spec.standby, &controller_args, &roles.controller_log)?);
    Ok(roles)
}
