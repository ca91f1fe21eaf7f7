//! `lockctl dev`: a local cluster of voters on loopback, with generated certificates, for
//! trying geolock out and for development. Each member is a child `lockctl start` process
//! logging to `<dir>/<name>.log`; they stop when `lockctl dev` is interrupted. With
//! `--topology`, every node of a multi-region topology instead (see `geolock_testkit::geo`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use geolock_testkit::launch::MemberFlags;

/// Why the dev cluster could not run.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Geo(#[from] geolock_testkit::geo::GeoError),
    #[error(transparent)]
    Topology(#[from] geolock_testkit::topology::TopologyError),
    #[error(transparent)]
    Certs(#[from] geolock_testkit::certs::CertError),
    #[error("dev cluster: {0}")]
    Io(#[from] std::io::Error),
    #[error("dev cluster: member {name} exited: {status} (see {log})")]
    Exited { name: String, status: std::process::ExitStatus, log: String },
}

/// Client and peer ports of member `i`, as etcd's local Procfile numbers them:
/// 2379/2380, 22379/22380, 32379/32380, ...
fn ports(base: u16, i: usize) -> (u16, u16) {
    let client = if i == 0 { base } else { base + (i as u16) * 10_000 + 10_000 };
    (client, client + 1)
}

/// Run `nodes` voters with data under `dir` until SIGINT or SIGTERM.
pub async fn run(dir: &Path, nodes: usize, base_port: u16) -> Result<(), DevError> {
    let certs = dir.join("certs");
    if !certs.join("ca.crt").exists() {
        geolock_testkit::certs::init_ca(&certs)?;
    }
    let names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
    let initial = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n}=http://127.0.0.1:{}", ports(base_port, i).1))
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if !certs.join(format!("{name}.crt")).exists() {
            geolock_testkit::certs::issue(&certs, name, &["127.0.0.1".to_string(), "localhost".to_string()])?;
        }
        let (cp, pp) = ports(base_port, i);
        let flags =
            MemberFlags { initial_cluster: initial.clone(), ..MemberFlags::single(name, dir.join(name), cp, pp) };
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = tokio::process::Command::new(&exe)
            .args(flags.lockctl_start(Some(&certs)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        println!("{name}: client http://127.0.0.1:{cp}  peer 127.0.0.1:{pp}  log {}", log_path.display());
        children.push((name.clone(), log_path, child));
    }
    let endpoints = (0..nodes).map(|i| format!("127.0.0.1:{}", ports(base_port, i).0)).collect::<Vec<_>>().join(",");
    println!("endpoints: {endpoints}");
    println!("try: ETCDCTL_API=3 etcdctl --endpoints={endpoints} put hello world");
    let exited = async {
        loop {
            for (name, log, child) in children.iter_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(DevError::Exited { name: name.clone(), status, log: log.display().to_string() });
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let outcome = tokio::select! {
        _ = geolock_server::roles::until_signal() => Ok(()),
        e = exited => e,
    };
    for (_, _, child) in children.iter_mut() {
        if let Some(pid) = child.id() {
            // SIGTERM first, so a leader can hand over and every member stops cleanly.
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
    for (_, _, child) in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
    outcome
}

/// Run every node of the topology in `file`, with data under `dir/<topology name>` (emptied
/// first), until SIGINT or SIGTERM.
pub async fn run_topology(dir: &Path, file: &Path, loopback: bool) -> Result<(), DevError> {
    let topology = geolock_testkit::topology::Topology::load(file)?;
    // Relays take new ports on every run, and members' peer URLs with them: start afresh.
    let dir = dir.join(&topology.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let mut opts = geolock_testkit::geo::GeoOptions::new(std::env::current_exe()?, dir.clone());
    opts.namespaces &= !loopback;
    println!(
        "starting {} ({} nodes in {} regions, {}) ...",
        topology.name,
        topology.nodes.len(),
        topology.regions.len(),
        if opts.namespaces { "a network namespace per region" } else { "loopback addresses per region" }
    );
    let cluster = geolock_testkit::geo::GeoCluster::start(topology, opts).await?;
    for n in &cluster.nodes {
        println!(
            "{:<18} {:<8} {:<8} client {}  pid {}  log {}",
            n.name,
            n.region,
            n.role,
            n.endpoint(),
            n.pid().map_or("-".to_string(), |p| p.to_string()),
            n.log.display()
        );
    }
    let t = &cluster.topology;
    for l in &t.latency_ms.between {
        println!("{} <-> {}: {} ms round trip", l.a, l.b, l.one_way * 2.0);
    }
    if let Some(f) = &cluster.failover {
        println!(
            "failover controller {} (log {}), arbiter {} (log {})",
            f.controller,
            f.controller_log.display(),
            f.arbiter,
            f.arbiter_log.display()
        );
        println!(
            "DNS: BIND9 on {} serves {}: dig @{} -p {} +short {} A",
            f.dns.addr,
            f.client_name,
            f.dns.addr.ip(),
            f.dns.addr.port(),
            f.client_name
        );
        println!("the controller's runbook: lockctl failover status --journal {}", f.journal.display());
    }
    println!("voters: {}", cluster.voter_endpoints());
    println!("try: ETCDCTL_API=3 etcdctl --endpoints={} put hello world", cluster.voter_endpoints());
    geolock_server::roles::until_signal().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_follow_etcds_local_convention() {
        assert_eq!(super::ports(2379, 0), (2379, 2380));
        assert_eq!(super::ports(2379, 1), (22379, 22380));
        assert_eq!(super::ports(2379, 2), (32379, 32380));
    }
}
