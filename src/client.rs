//! Client commands of `lockctl`: `lock` and `elect`, shaped like etcdctl's.

use std::time::Duration;

use tonic::transport::Channel;

use crate::api::proto::etcdserverpb as pb;
use crate::api::proto::v3electionpb as epb;
use crate::api::proto::v3lockpb as lpb;

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach any of {0}")]
    Connect(String),
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
    #[error("lease {0:x} expired while held")]
    LeaseLost(i64),
    #[error("cannot run {cmd}: {source}")]
    Exec { cmd: String, source: std::io::Error },
}

async fn connect(endpoints: &str) -> Result<Channel, ClientError> {
    for ep in endpoints.split(',').filter(|e| !e.is_empty()) {
        let url = if ep.contains("://") { ep.to_string() } else { format!("http://{ep}") };
        let Ok(endpoint) = Channel::from_shared(url) else { continue };
        if let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(5), endpoint.tcp_nodelay(true).connect()).await {
            return Ok(ch);
        }
    }
    Err(ClientError::Connect(endpoints.to_string()))
}

/// A lease kept alive in the background until dropped; `lost` resolves if it expires.
struct Session {
    id: i64,
    keepalive: tokio::task::JoinHandle<()>,
    lost: tokio::sync::oneshot::Receiver<()>,
}

impl Session {
    async fn grant(ch: &Channel, ttl: i64) -> Result<Session, ClientError> {
        let mut leases = pb::lease_client::LeaseClient::new(ch.clone());
        let id = leases.lease_grant(pb::LeaseGrantRequest { ttl, id: 0 }).await?.into_inner().id;
        let (lost_tx, lost) = tokio::sync::oneshot::channel();
        let every = Duration::from_millis((ttl.max(1) as u64 * 1000) / 3);
        let keepalive = tokio::spawn(async move {
            let reqs = futures::stream::unfold((), move |()| async move {
                tokio::time::sleep(every).await;
                Some((pb::LeaseKeepAliveRequest { id }, ()))
            });
            let Ok(resp) = leases.lease_keep_alive(reqs).await else {
                let _ = lost_tx.send(());
                return;
            };
            let mut resp = resp.into_inner();
            while let Ok(Some(r)) = resp.message().await {
                if r.ttl <= 0 {
                    break;
                }
            }
            let _ = lost_tx.send(());
        });
        Ok(Session { id, keepalive, lost })
    }

    async fn revoke(self, ch: &Channel) {
        self.keepalive.abort();
        let _ = pb::lease_client::LeaseClient::new(ch.clone()).lease_revoke(pb::LeaseRevokeRequest { id: self.id }).await;
    }
}

/// `lockctl lock NAME [COMMAND...]`. Returns the exit code.
pub async fn lock(endpoints: &str, name: &str, ttl: i64, command: &[String]) -> Result<u8, ClientError> {
    let ch = connect(endpoints).await?;
    let mut session = Session::grant(&ch, ttl).await?;
    let mut locks = lpb::lock_client::LockClient::new(ch.clone());
    let key = locks.lock(lpb::LockRequest { name: name.as_bytes().to_vec(), lease: session.id }).await?.into_inner().key;
    // The fencing token is the create revision of the lock key.
    let got = pb::kv_client::KvClient::new(ch.clone())
        .range(pb::RangeRequest { key: key.clone(), ..Default::default() })
        .await?
        .into_inner();
    let token = got.kvs.first().map_or(0, |kv| kv.create_revision);
    let key_text = String::from_utf8_lossy(&key).into_owned();
    println!("{key_text}");
    println!("fencing token {token}");
    let code = if let Some((program, args)) = command.split_first() {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("LOCKCTL_LOCK_KEY", &key_text)
            .env("LOCKCTL_FENCING_TOKEN", token.to_string())
            .env("ETCD_LOCK_KEY", &key_text)
            .env("ETCD_LOCK_REV", token.to_string())
            .spawn()
            .map_err(|source| ClientError::Exec { cmd: program.clone(), source })?;
        tokio::select! {
            status = child.wait() => status.map_err(|source| ClientError::Exec { cmd: program.clone(), source })?.code().unwrap_or(1) as u8,
            _ = &mut session.lost => {
                let _ = child.kill().await;
                return Err(ClientError::LeaseLost(session.id));
            }
        }
    } else {
        tokio::select! {
            _ = crate::roles::until_signal() => 0,
            _ = &mut session.lost => return Err(ClientError::LeaseLost(session.id)),
        }
    };
    locks.unlock(lpb::UnlockRequest { key }).await?;
    session.revoke(&ch).await;
    Ok(code)
}

/// `lockctl elect NAME [PROPOSAL]`. Returns the exit code.
pub async fn elect(endpoints: &str, name: &str, proposal: Option<&str>, ttl: i64) -> Result<u8, ClientError> {
    let ch = connect(endpoints).await?;
    let mut election = epb::election_client::ElectionClient::new(ch.clone());
    let Some(proposal) = proposal else {
        let mut leaders = election.observe(epb::LeaderRequest { name: name.as_bytes().to_vec() }).await?.into_inner();
        while let Some(l) = leaders.message().await? {
            if let Some(kv) = l.kv {
                println!("{}", String::from_utf8_lossy(&kv.key));
                println!("{}", String::from_utf8_lossy(&kv.value));
            }
        }
        return Ok(0);
    };
    let mut session = Session::grant(&ch, ttl).await?;
    let leader = election
        .campaign(epb::CampaignRequest {
            name: name.as_bytes().to_vec(),
            lease: session.id,
            value: proposal.as_bytes().to_vec(),
        })
        .await?
        .into_inner()
        .leader;
    let Some(leader) = leader else { return Ok(1) };
    println!("{}", String::from_utf8_lossy(&leader.key));
    println!("{proposal}");
    println!("fencing token {}", leader.rev);
    tokio::select! {
        _ = crate::roles::until_signal() => {}
        _ = &mut session.lost => return Err(ClientError::LeaseLost(session.id)),
    }
    election.resign(epb::ResignRequest { leader: Some(leader) }).await?;
    session.revoke(&ch).await;
    Ok(0)
}
