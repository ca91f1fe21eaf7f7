//! Client commands of `lockctl`: `lock`, `elect` and `member`, shaped like etcdctl's.

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
    #[error("no member named {name} (members: {known})")]
    NoSuchMember { name: String, known: String },
}

/// A channel to the first of `endpoints` that answers.
pub(crate) async fn connect(endpoints: &str) -> Result<Channel, ClientError> {
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

/// `lockctl member ...`: the spec's membership procedures over etcd's Cluster API.
#[derive(Debug, clap::Subcommand)]
pub enum MemberCommand {
    /// Add member NAME; it joins as a learner and, unless --learner, is promoted once caught up.
    /// Prints the settings to start it with.
    Add {
        name: String,
        /// Comma-separated peer URLs of the new member.
        #[arg(long)]
        peer_urls: String,
        /// Keep it a learner until `lockctl member promote`.
        #[arg(long)]
        learner: bool,
    },
    /// Take member NAME out of the cluster.
    Remove { name: String },
    /// List the members.
    List,
    /// Make learner NAME a voter (refused until it has caught up).
    Promote { name: String },
    /// Give member NAME new peer URLs.
    Update {
        name: String,
        #[arg(long)]
        peer_urls: String,
    },
    /// Hand leadership to voter NAME.
    TransferLeadership { name: String },
}

/// Run a `lockctl member` command. Returns the exit code.
pub async fn member(endpoints: &str, cmd: MemberCommand) -> Result<u8, ClientError> {
    let ch = connect(endpoints).await?;
    let mut cluster = pb::cluster_client::ClusterClient::new(ch.clone());
    // etcdctl's columns, then the role, the region and the lag behind the leader.
    let list = |members: &[pb::Member]| {
        for m in members {
            println!(
                "{:x}, {}, {}, {}, {}, {}, {}, {}, lag {} entries {} ms",
                m.id,
                if m.client_ur_ls.is_empty() { "unstarted" } else { "started" },
                m.name,
                m.peer_ur_ls.join(","),
                m.client_ur_ls.join(","),
                m.is_learner,
                m.geolock_role,
                if m.geolock_region.is_empty() { "-" } else { &m.geolock_region },
                m.geolock_lag_entries,
                m.geolock_lag_ms
            );
        }
    };
    let warn_even = |members: &[pb::Member]| {
        let voters = members.iter().filter(|m| !m.is_learner).count();
        if voters % 2 == 0 {
            eprintln!(
                "warning: the cluster has {voters} voters; an even count tolerates no more failures than {} voters",
                voters - 1
            );
        }
    };
    let members = cluster.member_list(pb::MemberListRequest { linearizable: true }).await?.into_inner().members;
    let id_of = |name: &str| {
        members.iter().find(|m| m.name == name).map(|m| m.id).ok_or_else(|| ClientError::NoSuchMember {
            name: name.to_string(),
            known: members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    };
    match cmd {
        MemberCommand::List => list(&members),
        MemberCommand::Add { name, peer_urls, learner } => {
            let urls: Vec<String> = peer_urls.split(',').filter(|u| !u.is_empty()).map(str::to_string).collect();
            let mut req = tonic::Request::new(pb::MemberAddRequest { peer_ur_ls: urls.clone(), is_learner: learner });
            let value = name.parse().map_err(|_| tonic::Status::invalid_argument(format!("bad member name {name:?}")))?;
            req.metadata_mut().insert(crate::api::MEMBER_NAME_HEADER, value);
            let resp = cluster.member_add(req).await?.into_inner();
            let header = resp.header.unwrap_or_default();
            let id = resp.member.map_or(0, |m| m.id);
            println!("Member {id:x} added to cluster {:x}", header.cluster_id);
            let initial: Vec<String> = resp
                .members
                .iter()
                .flat_map(|m| {
                    let n = if m.id == id { name.clone() } else { m.name.clone() };
                    m.peer_ur_ls.iter().map(move |u| format!("{n}={u}"))
                })
                .collect();
            println!();
            println!("GEOLOCK_NAME=\"{name}\"");
            println!("GEOLOCK_INITIAL_CLUSTER=\"{}\"", initial.join(","));
            println!("GEOLOCK_INITIAL_ADVERTISE_PEER_URLS=\"{}\"", urls.join(","));
            println!("GEOLOCK_INITIAL_CLUSTER_STATE=\"existing\"");
            if !learner {
                let mut after = resp.members.clone();
                after.iter_mut().filter(|m| m.id == id).for_each(|m| m.is_learner = false);
                warn_even(&after);
            }
        }
        MemberCommand::Remove { name } => {
            let id = id_of(&name)?;
            let resp = cluster.member_remove(pb::MemberRemoveRequest { id }).await?.into_inner();
            println!("Member {id:x} removed from cluster {:x}", resp.header.unwrap_or_default().cluster_id);
            warn_even(&resp.members);
        }
        MemberCommand::Promote { name } => {
            let id = id_of(&name)?;
            let resp = cluster.member_promote(pb::MemberPromoteRequest { id }).await?.into_inner();
            println!("Member {id:x} promoted in cluster {:x}", resp.header.unwrap_or_default().cluster_id);
            warn_even(&resp.members);
        }
        MemberCommand::Update { name, peer_urls } => {
            let id = id_of(&name)?;
            let urls = peer_urls.split(',').filter(|u| !u.is_empty()).map(str::to_string).collect();
            let resp = cluster.member_update(pb::MemberUpdateRequest { id, peer_ur_ls: urls }).await?.into_inner();
            println!("Member {id:x} updated in cluster {:x}", resp.header.unwrap_or_default().cluster_id);
        }
        MemberCommand::TransferLeadership { name } => {
            let id = id_of(&name)?;
            pb::maintenance_client::MaintenanceClient::new(ch)
                .move_leader(pb::MoveLeaderRequest { target_id: id })
                .await?;
            println!("Leadership transferred to {name} ({id:x})");
        }
    }
    Ok(0)
}
