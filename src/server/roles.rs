//! Wiring for each role: what runs, bound to which addresses. No logic of its own.

use std::sync::Arc;

use crate::config::{Config, Role};
use crate::raft::{Node, StartError, Task};

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("client API: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tracing(#[from] crate::otel::TracingError),
    #[error(transparent)]
    OtlpMetrics(#[from] crate::otlp_metrics::OtlpMetricsError),
    #[error(transparent)]
    Tokens(#[from] crate::auth::TokenOptionError),
    #[error(transparent)]
    ClientTls(#[from] crate::client_tls::ClientTlsError),
    #[error("starting again after PROMOTE: {0}")]
    Restart(std::io::Error),
}

/// Run a node with this configuration until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), RunError> {
    let client_tls = cfg.client_tls()?.map(crate::client_tls::ClientTls::load).transpose()?;
    if let Some(tls) = &client_tls {
        crate::client_tls::watch(tls);
    }
    let mut addrs = Vec::new();
    let mut listeners = Vec::new();
    for (addr, tls) in cfg.client_listeners()? {
        let l = bind(&addr).await?;
        listeners.push(match (&client_tls, tls) {
            (Some(t), true) => crate::api::Listener::Tls(l, t.clone()),
            _ => crate::api::Listener::Plain(l),
        });
        addrs.push(addr);
    }
    let mut metrics_listeners = Vec::new();
    for addr in &cfg.metrics_listen_addrs()? {
        metrics_listeners.push(bind(addr).await?);
    }
    crate::otel::init(&cfg.tracing, &cfg.name)?;
    let otlp_metrics = crate::otlp_metrics::Exporter::new(&cfg)?;
    // The configuration check read these keys already; this is the copy that serves.
    let tokens = crate::auth::TokenProvider::from_option(&cfg.auth_token)?;
    let auth = crate::api::AuthSettings {
        bcrypt_cost: cfg.bcrypt_cost,
        tokens: Arc::new(tokens),
        client_cert_auth: cfg.client_cert_auth,
    };
    let node = Node::start(&cfg).await?;
    for task in tasks(&cfg) {
        node.spawn(task);
    }
    if let Some(exporter) = otlp_metrics {
        let node = Arc::downgrade(&node);
        tokio::spawn(exporter.run(move || node.upgrade().map(|n| n.refresh_metrics()).is_some()));
    }
    // As etcd, serve clients once this member is published and caught up; without a quorum
    // that can take long, and then the member serves anyway so that it can say so.
    if !node.wait_ready(cfg.raft.election_timeout * 5).await {
        tracing::warn!("serving before this member was published and caught up with the cluster: no leader yet");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for l in listeners {
        let mut rx = stop_rx.clone();
        let node = node.clone();
        let hierarchical = cfg.lock.hierarchical_prefixes.clone();
        let (metrics, tracing) = (cfg.metrics, cfg.tracing.experimental_enable_distributed_tracing);
        let auth = auth.clone();
        servers.push(tokio::spawn(async move {
            crate::api::serve(node, &hierarchical, metrics, tracing, auth, l, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await
        }));
    }
    for l in metrics_listeners {
        let mut rx = stop_rx.clone();
        let node = node.clone();
        servers.push(tokio::spawn(async move {
            crate::api::serve_metrics(node, l, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await
        }));
    }
    tracing::info!(name = %cfg.name, client = ?addrs, data_dir = %cfg.data_dir().display(), "geolock node ready");
    let restart = tokio::select! {
        _ = until_signal() => false,
        _ = node.restart_requested() => true,
    };
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    for s in servers {
        if let Ok(Err(e)) = s.await {
            tracing::warn!("client API: {e}");
        }
    }
    Arc::clone(&node).shutdown().await;
    if restart {
        return Err(exec_self());
    }
    Ok(())
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, RunError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| RunError::Listen { addr: addr.to_string(), source })
}

/// Start this process again in place, same PID, arguments and output, once PROMOTE rewrote its
/// storage: it comes up as the new cluster, as from a restart after SIGKILL (what the seed
/// wrote is synced; the rest is in RocksDB's log). Returns only if the exec failed.
fn exec_self() -> RunError {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return RunError::Restart(e),
    };
    RunError::Restart(std::process::Command::new(exe).args(std::env::args_os().skip(1)).exec())
}

/// What a member runs beside the client API, by role. A learner runs what a voter runs, since it
/// becomes one when promoted; a witness also runs its supervisor, which decides when it
/// campaigns. An active-passive primary's members renew the region write lease while leading.
fn tasks(cfg: &Config) -> Vec<Task> {
    let voter = [
        Task::PeerServer,
        Task::Leadership,
        Task::WitnessPurgePoint,
        Task::Snapshots,
        Task::Publish,
        Task::WatchProgress { every: cfg.watch.progress_notify_interval },
        Task::PeerMetrics,
    ];
    let mut tasks = match cfg.role {
        Role::Voter | Role::Learner => voter.to_vec(),
        Role::Witness => [&voter[..], &[Task::WitnessSupervisor]].concat(),
    };
    if !cfg.failover.vantages.is_empty() {
        tasks.push(Task::WriteLease);
    }
    tasks
}

/// Resolves on SIGINT or SIGTERM.
pub async fn until_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Keep the kernel from backing this process's memory with transparent huge pages: with THP on
/// "always", every 2 MiB region the allocator or RocksDB touches becomes resident whole, which
/// more than doubled a node's resident memory (RocksDB's own guidance is to turn THP off).
#[allow(unsafe_code)]
pub fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes no memory we hold.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!("could not turn transparent huge pages off: {}", std::io::Error::last_os_error());
    }
}
