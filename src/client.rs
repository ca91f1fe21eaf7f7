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
    #[error("lost lease {lease:x}, and with it what it held: {why}")]
    LeaseLost { lease: i64, why: String },
    #[error("the server granted {key} but it was not there at revision {revision}: no fencing token to hand out")]
    NoToken { key: String, revision: i64 },
    #[error("cannot run {cmd}: {source}")]
    Exec { cmd: String, source: std::io::Error },
    #[error("no member named {name} (members: {known})")]
    NoSuchMember { name: String, known: String },
}

/// A channel to the first of `endpoints` that answers.
pub(crate) async fn connect(endpoints: &str) -> Result<Channel, ClientError> {
    connect_from(endpoints, 0).await.map(|(ch, _)| ch)
}

/// A channel to the first of `endpoints` that answers, trying them from the `start`-th on
/// (round the list); also returns which one answered.
async fn connect_from(endpoints: &str, start: usize) -> Result<(Channel, usize), ClientError> {
    let all: Vec<&str> = endpoints.split(',').filter(|e| !e.is_empty()).collect();
    for i in (0..all.len()).map(|k| (start + k) % all.len()) {
        let ep = all[i];
        let url = if ep.contains("://") { ep.to_string() } else { format!("http://{ep}") };
        let Ok(endpoint) = Channel::from_shared(url) else { continue };
        let endpoint = endpoint.tcp_nodelay(true).connect_timeout(CONNECT_TIMEOUT);
        if let Ok(Ok(ch)) = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            return Ok((ch, i));
        }
    }
    Err(ClientError::Connect(endpoints.to_string()))
}

/// How long one endpoint gets to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the client goes on retrying a lease grant, an Unlock or a Resign through leader
/// changes.
const RELEASE_RETRY: Duration = Duration::from_secs(10);

/// How long it tries to revoke its lease once done with it.
const REVOKE_RETRY: Duration = Duration::from_secs(2);

/// How long a campaign is tried again through leader changes; the session's lease ends it first
/// if it is lost.
const CAMPAIGN_RETRY: Duration = Duration::from_secs(24 * 3600);

/// Keep-alive requests remembered until answered, for the deadline (see [`Session`]).
const KEEPALIVES_UNANSWERED_MAX: usize = 64;

/// Whether a failed call may succeed if made again, on this endpoint or another: the cluster
/// was between leaders, or the connection broke.
fn transient(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// A lease kept alive in the background until dropped; `lost` resolves once it may have ended.
///
/// The keep-alive stream is reopened, on the next endpoint if need be, whenever it breaks, as
/// etcd's client does: a leader change must not cost a holder its lease. The lease counts as
/// lost once no keep-alive has been acknowledged for a whole TTL, measured from when the
/// acknowledged request was *sent* (the leader renewed it after that, so the lease cannot end
/// before then), or when the cluster answers TTL 0. etcd's client measures from the answer's
/// arrival, which is later than the renewal by up to a round trip: a holder cut off right after
/// would go on past the cluster's expiry, and another client could take the lock meanwhile.
struct Session {
    id: i64,
    keepalive: tokio::task::JoinHandle<()>,
    lost: tokio::sync::oneshot::Receiver<String>,
}

impl Session {
    /// Grant the lease, through leader changes: a grant whose answer was lost leaves a lease
    /// nobody keeps alive, which ends at its TTL.
    async fn grant(endpoints: &str, ttl: i64) -> Result<Session, ClientError> {
        let sent = tokio::time::Instant::now();
        let granted = retry_for(RELEASE_RETRY, endpoints, |ch| async move {
            pb::lease_client::LeaseClient::new(ch).lease_grant(pb::LeaseGrantRequest { ttl, id: 0 }).await
        })
        .await?;
        let (id, ttl) = (granted.id, granted.ttl);
        let (lost_tx, lost) = tokio::sync::oneshot::channel();
        let keepalive = tokio::spawn(keep_alive(endpoints.to_string(), id, ttl, sent + secs(ttl), lost_tx));
        Ok(Session { id, keepalive, lost })
    }

    /// Give the lease up, best effort: one that cannot be revoked now ends at its TTL.
    async fn revoke(self, endpoints: &str) {
        self.keepalive.abort();
        let _ = retry_for(REVOKE_RETRY, endpoints, |ch| async move {
            pb::lease_client::LeaseClient::new(ch).lease_revoke(pb::LeaseRevokeRequest { id: self.id }).await
        })
        .await;
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(0) as u64)
}

/// Keep lease `id` alive until its deadline passes unrenewed; then report why on `lost`.
async fn keep_alive(
    endpoints: String,
    id: i64,
    ttl: i64,
    mut deadline: tokio::time::Instant,
    lost: tokio::sync::oneshot::Sender<String>,
) {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    let every = Duration::from_millis((ttl.max(1) as u64 * 1000) / 3);
    let mut start = 0;
    let why = 'session: loop {
        let attempt = tokio::select! {
            c = connect_from(&endpoints, start) => c,
            _ = tokio::time::sleep_until(deadline) => break 'session format!("no keep-alive acknowledged within its TTL of {ttl} s"),
        };
        let Ok((ch, at)) = attempt else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // Send times of requests not yet answered, oldest first. Answers come in order; one
        // the server skipped (it had no leader) leaves an older time at the front, which only
        // makes the deadline earlier.
        let sent: Arc<Mutex<VecDeque<tokio::time::Instant>>> = Arc::default();
        let record = sent.clone();
        let reqs = futures::stream::unfold(true, move |first| {
            let record = record.clone();
            async move {
                if !first {
                    tokio::time::sleep(every).await;
                }
                let mut q = record.lock().unwrap();
                if q.len() < KEEPALIVES_UNANSWERED_MAX {
                    q.push_back(tokio::time::Instant::now());
                }
                Some((pb::LeaseKeepAliveRequest { id }, false))
            }
        });
        let mut leases = pb::lease_client::LeaseClient::new(ch);
        let opened = tokio::select! {
            r = leases.lease_keep_alive(reqs) => r,
            _ = tokio::time::sleep_until(deadline) => break 'session format!("no keep-alive acknowledged within its TTL of {ttl} s"),
        };
        let mut answers = match opened {
            Ok(r) => r.into_inner(),
            Err(_) => {
                start = at + 1;
                continue;
            }
        };
        loop {
            tokio::select! {
                answer = answers.message() => match answer {
                    Ok(Some(r)) if r.ttl <= 0 => break 'session "the cluster reports it expired or revoked".to_string(),
                    Ok(Some(r)) => {
                        let sent_at = sent.lock().unwrap().pop_front();
                        if let Some(t) = sent_at {
                            deadline = deadline.max(t + secs(r.ttl));
                        }
                    }
                    // The stream broke (member stopped or cut off): reopen it, elsewhere first.
                    Ok(None) | Err(_) => {
                        start = at + 1;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break 'session format!("no keep-alive acknowledged within its TTL of {ttl} s"),
            }
        }
    };
    let _ = lost.send(why);
}

/// Call `f` on a channel to one of `endpoints` until it succeeds, fails for good, or `limit`
/// has passed; transient failures move on to the next endpoint.
async fn retry_for<T, F, Fut>(limit: Duration, endpoints: &str, mut f: F) -> Result<T, ClientError>
where
    F: FnMut(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut start = 0;
    loop {
        let err = match connect_from(endpoints, start).await {
            Ok((ch, at)) => match f(ch).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if transient(&s) => {
                    start = at + 1;
                    ClientError::Rpc(s)
                }
                Err(s) => return Err(s.into()),
            },
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(err);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A lock held: its key and fencing token.
struct Held {
    key: Vec<u8>,
    token: i64,
}

/// Take lock `name` for the session's lease, through leader changes and broken connections
/// (the request is the same each time: the server finds the lease's key and queues it again).
async fn acquire(endpoints: &str, name: &str, session: &mut Session) -> Result<Held, ClientError> {
    let req = lpb::LockRequest { name: name.as_bytes().to_vec(), lease: session.id };
    let mut start = 0;
    loop {
        let attempt = async {
            let (ch, at) = connect_from(endpoints, start).await?;
            let resp = lpb::lock_client::LockClient::new(ch.clone()).lock(req.clone()).await.map_err(|s| (s, at));
            Ok::<_, ClientError>((ch, resp))
        };
        let (ch, resp) = tokio::select! {
            r = attempt => match r {
                Ok(r) => r,
                Err(e) => return Err(e),
            },
            why = &mut session.lost => return Err(ClientError::LeaseLost { lease: session.id, why: why.unwrap_or_default() }),
        };
        match resp {
            Ok(r) => {
                let r = r.into_inner();
                let token = fencing_token(ch, &r).await?;
                return Ok(Held { key: r.key, token });
            }
            Err((s, at)) if transient(&s) => {
                start = at + 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err((s, _)) => return Err(s.into()),
        }
    }
}

/// The fencing token of a granted lock: geolock sends it with the grant, confirmed at the
/// header's revision. From a server that does not (etcd), it is the lock key's create revision
/// read at that very revision. A key missing there, or a token of 0, is never handed on: 0
/// passes an etcd-style fence, since a missing key's create revision reads as 0.
async fn fencing_token(ch: Channel, r: &lpb::LockResponse) -> Result<i64, ClientError> {
    let key_text = || String::from_utf8_lossy(&r.key).into_owned();
    if r.geolock_fencing_token > 0 {
        return Ok(r.geolock_fencing_token);
    }
    let at = r.header.as_ref().map_or(0, |h| h.revision);
    let got = pb::kv_client::KvClient::new(ch)
        .range(pb::RangeRequest { key: r.key.clone(), revision: at, ..Default::default() })
        .await?
        .into_inner();
    match got.kvs.first().map(|kv| kv.create_revision) {
        Some(token) if token > 0 => Ok(token),
        _ => Err(ClientError::NoToken { key: key_text(), revision: at }),
    }
}

/// `lockctl lock NAME [COMMAND...]`. Returns the exit code.
pub async fn lock(endpoints: &str, name: &str, ttl: i64, command: &[String]) -> Result<u8, ClientError> {
    let mut session = Session::grant(endpoints, ttl).await?;
    let Held { key, token } = acquire(endpoints, name, &mut session).await?;
    let key_text = String::from_utf8_lossy(&key).into_owned();
    println!("{key_text}");
    println!("fencing token {token}");
    let lost = |why: Result<String, _>| ClientError::LeaseLost { lease: session.id, why: why.unwrap_or_default() };
    let code = if let Some((program, args)) = command.split_first() {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("LOCKCTL_LOCK_KEY", &key_text)
            .env("LOCKCTL_FENCING_TOKEN", token.to_string())
            .env("ETCD_LOCK_KEY", &key_text)
            .env("ETCD_LOCK_REV", token.to_string())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ClientError::Exec { cmd: program.clone(), source })?;
        tokio::select! {
            status = child.wait() => status.map_err(|source| ClientError::Exec { cmd: program.clone(), source })?.code().unwrap_or(1) as u8,
            why = &mut session.lost => {
                // The lock may belong to someone else now: the command must not go on using it.
                let _ = child.kill().await;
                return Err(lost(why));
            }
        }
    } else {
        tokio::select! {
            _ = crate::roles::until_signal() => 0,
            why = &mut session.lost => return Err(lost(why)),
        }
    };
    let unlock = retry_for(RELEASE_RETRY, endpoints, |ch| {
        let key = key.clone();
        async move { lpb::lock_client::LockClient::new(ch).unlock(lpb::UnlockRequest { key }).await }
    })
    .await;
    session.revoke(endpoints).await;
    unlock?;
    Ok(code)
}

/// `lockctl elect NAME [PROPOSAL]`. Returns the exit code.
pub async fn elect(endpoints: &str, name: &str, proposal: Option<&str>, ttl: i64) -> Result<u8, ClientError> {
    let Some(proposal) = proposal else {
        let ch = connect(endpoints).await?;
        let mut election = epb::election_client::ElectionClient::new(ch);
        let mut leaders = election.observe(epb::LeaderRequest { name: name.as_bytes().to_vec() }).await?.into_inner();
        while let Some(l) = leaders.message().await? {
            if let Some(kv) = l.kv {
                println!("{}", String::from_utf8_lossy(&kv.key));
                println!("{}", String::from_utf8_lossy(&kv.value));
            }
        }
        return Ok(0);
    };
    let mut session = Session::grant(endpoints, ttl).await?;
    let req = epb::CampaignRequest { name: name.as_bytes().to_vec(), lease: session.id, value: proposal.as_bytes().to_vec() };
    let campaign = retry_for(CAMPAIGN_RETRY, endpoints, |ch| {
        let req = req.clone();
        async move { epb::election_client::ElectionClient::new(ch).campaign(req).await }
    });
    let leader = tokio::select! {
        r = campaign => r?.leader,
        why = &mut session.lost => return Err(ClientError::LeaseLost { lease: session.id, why: why.unwrap_or_default() }),
    };
    let Some(leader) = leader.filter(|l| l.rev > 0) else {
        return Err(ClientError::NoToken { key: name.to_string(), revision: 0 });
    };
    println!("{}", String::from_utf8_lossy(&leader.key));
    println!("{proposal}");
    println!("fencing token {}", leader.rev);
    tokio::select! {
        _ = crate::roles::until_signal() => {}
        why = &mut session.lost => return Err(ClientError::LeaseLost { lease: session.id, why: why.unwrap_or_default() }),
    }
    let resign = retry_for(RELEASE_RETRY, endpoints, |ch| {
        let leader = leader.clone();
        async move { epb::election_client::ElectionClient::new(ch).resign(epb::ResignRequest { leader: Some(leader) }).await }
    })
    .await;
    session.revoke(endpoints).await;
    resign?;
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
