//! A client library over etcd's v3 API for geolock's own tools (`lockctl`'s client commands, and
//! next the failover controller and the proxy): connections that move on to the next endpoint,
//! a lease kept alive through leader changes, locks with their fencing tokens, elections.
//!
//! It prints nothing and chooses no exit codes; every failure is a [`ClientError`]. The region
//! failover runbook's decision machine is [`failover`], its durable record [`journal`]; its DNS change
//! (REDIRECT) is [`dns`].

pub mod controller;
mod controller_metrics;
pub mod dns;
pub mod failover;
pub mod journal;
pub mod notify;

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::Channel;

use geolock_proto::etcdserverpb as pb;
use geolock_proto::v3electionpb as epb;
use geolock_proto::v3lockpb as lpb;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No endpoint of the comma-separated list accepted a connection.
    #[error("cannot reach any of {0}")]
    Connect(String),
    /// The server answered with this status.
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
    /// The session's lease may have ended, and whatever it held (a lock, a leadership) with it.
    #[error("lost lease {lease:x}, and with it what it held: {why}")]
    LeaseLost { lease: i64, why: String },
    /// A grant that cannot be fenced: its key is missing at the grant's revision, or its token
    /// would be 0.
    #[error("the server granted {key} but it was not there at revision {revision}: no fencing token to hand out")]
    NoToken { key: String, revision: i64 },
}

/// How to reach a cluster: its client endpoints, the TLS to speak there, and the user to be
/// (etcdctl's `--endpoints`, `--cacert`, `--cert`, `--key`, `--user`).
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Comma-separated `host:port` or URLs; `host:port` means `https://` when `tls` is set.
    pub endpoints: String,
    /// Speak TLS, checking the server against these settings.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Authenticate as this user (name, password) on every connection, and send its token.
    pub user: Option<(String, String)>,
}

impl Cluster {
    /// `endpoints` in plain text, as nobody.
    pub fn plain(endpoints: &str) -> Cluster {
        Cluster { endpoints: endpoints.to_string(), ..Cluster::default() }
    }

    /// `endpoints` reached with `creds`, their files read now. An error names the setting or
    /// file at fault, by etcdctl's flag names.
    pub fn with(endpoints: &str, creds: &Credentials) -> Result<Cluster, String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read =
            |flag: &str, path: &PathBuf| std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()));
        let tls = match (&creds.cacert, &creds.cert, &creds.key) {
            (None, None, None) => None,
            (None, _, _) => {
                return Err("cert and key need cacert, the bundle members' certificates are checked against".into())
            }
            (Some(_), Some(_), None) | (Some(_), None, Some(_)) => return Err("cert and key go together".into()),
            (Some(ca), cert, key) => {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("cacert", ca)?));
                if let (Some(cert), Some(key)) = (cert, key) {
                    tls = tls.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
                }
                Some(tls)
            }
        };
        let user = match (&creds.user, &creds.password) {
            (None, None) => None,
            (None, Some(_)) => return Err("password needs user".into()),
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (Some(u), None) => match u.split_once(':') {
                Some((name, password)) => Some((name.to_string(), password.to_string())),
                None => return Err(format!("user {u}: no password; give user {u}:PASSWORD or a password")),
            },
        };
        Ok(Cluster { endpoints: endpoints.to_string(), tls, user })
    }

    /// The member at `endpoint` alone, reached as this cluster's members are.
    pub fn at(&self, endpoint: &str) -> Cluster {
        Cluster { endpoints: endpoint.to_string(), ..self.clone() }
    }
}

/// How a client speaks to members and who it is: etcdctl's `--cacert`, `--cert`, `--key`,
/// `--user` and `--password`, as flags of `lockctl` and settings of the failover controller.
/// All unset: plain text, as nobody.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Speak TLS, checking members' certificates against this CA bundle (PEM).
    pub cacert: Option<PathBuf>,
    /// The client certificate to present (PEM; needs `key` and `cacert`).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// Authenticate as `NAME` (with `password`) or `NAME:PASSWORD`.
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Adds the caller's auth token (etcd's `token` metadata) to every request on a connection.
#[derive(Clone, Debug, Default)]
pub struct Token(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("token", t.clone());
        }
        Ok(req)
    }
}

/// A connection to one member, carrying the user's token if the cluster was given one.
pub type Conn = tonic::service::interceptor::InterceptedService<Channel, Token>;

/// A channel to the first of `endpoints` (comma-separated, `host:port` or URLs) that answers,
/// in plain text and as nobody.
pub async fn connect(endpoints: &str) -> Result<Conn, ClientError> {
    connect_to(&Cluster::plain(endpoints)).await
}

/// A connection to the first of `cluster`'s endpoints that answers.
pub async fn connect_to(cluster: &Cluster) -> Result<Conn, ClientError> {
    connect_from(cluster, 0).await.map(|(ch, _)| ch)
}

/// A connection to the first of `cluster`'s endpoints that answers, trying them from the
/// `start`-th on (round the list); also returns which one answered. With a user, the member
/// that answered authenticates it first: a refusal there (a wrong password, say) is returned
/// as it is, since no other member would answer otherwise.
async fn connect_from(cluster: &Cluster, start: usize) -> Result<(Conn, usize), ClientError> {
    let all: Vec<&str> = cluster.endpoints.split(',').filter(|e| !e.is_empty()).collect();
    let scheme = if cluster.tls.is_some() { "https" } else { "http" };
    for i in (0..all.len()).map(|k| (start + k) % all.len()) {
        let ep = all[i];
        let url = if ep.contains("://") { ep.to_string() } else { format!("{scheme}://{ep}") };
        let Ok(mut endpoint) = Channel::from_shared(url) else { continue };
        if let Some(tls) = &cluster.tls {
            let Ok(with_tls) = endpoint.tls_config(tls.clone()) else { continue };
            endpoint = with_tls;
        }
        let endpoint = endpoint.tcp_nodelay(true).connect_timeout(CONNECT_TIMEOUT);
        let Ok(Ok(ch)) = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await else { continue };
        let Some((name, password)) = &cluster.user else { return Ok((Conn::new(ch, Token::default()), i)) };
        let req = pb::AuthenticateRequest { name: name.clone(), password: password.clone() };
        let token = match pb::auth_client::AuthClient::new(ch.clone()).authenticate(req).await {
            Ok(r) => r.into_inner().token,
            Err(s) if transient(&s) => continue,
            Err(s) => return Err(s.into()),
        };
        let token =
            token.parse().map_err(|_| tonic::Status::internal(format!("{ep} sent a token that is not ASCII")))?;
        return Ok((Conn::new(ch, Token(Some(token))), i));
    }
    Err(ClientError::Connect(cluster.endpoints.clone()))
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
///
/// A token that expired or was made stale by an auth change counts too: a new connection
/// authenticates again (etcd's client does the same on these two texts).
fn transient(s: &tonic::Status) -> bool {
    // etcd sends the first as Unauthenticated, the second as InvalidArgument.
    let stale_token = matches!(
        (s.code(), s.message()),
        (tonic::Code::Unauthenticated, "etcdserver: invalid auth token")
            | (tonic::Code::InvalidArgument, "etcdserver: revision of auth store is old")
    );
    stale_token
        || matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled
        )
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
pub struct Session {
    id: i64,
    keepalive: tokio::task::JoinHandle<()>,
    lost: tokio::sync::oneshot::Receiver<String>,
}

impl Session {
    /// Grant the lease, through leader changes: a grant whose answer was lost leaves a lease
    /// nobody keeps alive, which ends at its TTL.
    pub async fn grant(cluster: &Cluster, ttl: i64) -> Result<Session, ClientError> {
        let sent = tokio::time::Instant::now();
        let granted = retry_for(RELEASE_RETRY, cluster, |ch| async move {
            pb::lease_client::LeaseClient::new(ch).lease_grant(pb::LeaseGrantRequest { ttl, id: 0 }).await
        })
        .await?;
        let (id, ttl) = (granted.id, granted.ttl);
        let (lost_tx, lost) = tokio::sync::oneshot::channel();
        let keepalive = tokio::spawn(keep_alive(cluster.clone(), id, ttl, sent + secs(ttl), lost_tx));
        Ok(Session { id, keepalive, lost })
    }

    /// The lease's ID.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Resolves once the lease may have ended, saying why (as [`ClientError::LeaseLost`]).
    /// Cancel-safe: meant for `select!` beside what the lease holds.
    pub async fn lost(&mut self) -> ClientError {
        let why = (&mut self.lost).await.unwrap_or_default();
        ClientError::LeaseLost { lease: self.id, why }
    }

    /// Give the lease up, best effort: one that cannot be revoked now ends at its TTL.
    pub async fn revoke(self, cluster: &Cluster) {
        self.keepalive.abort();
        let _ = retry_for(REVOKE_RETRY, cluster, |ch| async move {
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
    cluster: Cluster,
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
            c = connect_from(&cluster, start) => c,
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

/// Call `f` on a connection to one of `cluster`'s endpoints until it succeeds, fails for good, or `limit`
/// has passed; transient failures move on to the next endpoint.
pub async fn retry_for<T, F, Fut>(limit: Duration, cluster: &Cluster, mut f: F) -> Result<T, ClientError>
where
    F: FnMut(Conn) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut start = 0;
    loop {
        let err = match connect_from(cluster, start).await {
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
pub struct Held {
    /// The lock's key (the lock name, `/`, the session's lease ID in hex).
    pub key: Vec<u8>,
    /// The fencing token: the key's create revision, which only grows from holder to holder.
    pub token: i64,
}

/// Take lock `name` for the session's lease, through leader changes and broken connections
/// (the request is the same each time: the server finds the lease's key and queues it again).
pub async fn acquire(cluster: &Cluster, name: &str, session: &mut Session) -> Result<Held, ClientError> {
    let req = lpb::LockRequest { name: name.as_bytes().to_vec(), lease: session.id };
    let mut start = 0;
    loop {
        let attempt = async {
            let (ch, at) = connect_from(cluster, start).await?;
            let resp = lpb::lock_client::LockClient::new(ch.clone()).lock(req.clone()).await.map_err(|s| (s, at));
            Ok::<_, ClientError>((ch, resp))
        };
        let (ch, resp) = tokio::select! {
            r = attempt => match r {
                Ok(r) => r,
                Err(e) => return Err(e),
            },
            lost = session.lost() => return Err(lost),
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
async fn fencing_token(ch: Conn, r: &lpb::LockResponse) -> Result<i64, ClientError> {
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

/// Release the lock held under `key`, through leader changes.
pub async fn unlock(cluster: &Cluster, key: &[u8]) -> Result<(), ClientError> {
    retry_for(RELEASE_RETRY, cluster, |ch| {
        let key = key.to_vec();
        async move { lpb::lock_client::LockClient::new(ch).unlock(lpb::UnlockRequest { key }).await }
    })
    .await
    .map(drop)
}

/// Campaign in election `name` with `value` under the session's lease, through leader changes,
/// until elected or the lease is lost. Returns the leader key, whose `rev` is the fencing token.
pub async fn campaign(
    cluster: &Cluster,
    name: &str,
    session: &mut Session,
    value: &[u8],
) -> Result<epb::LeaderKey, ClientError> {
    let req = epb::CampaignRequest { name: name.as_bytes().to_vec(), lease: session.id, value: value.to_vec() };
    let campaign = retry_for(CAMPAIGN_RETRY, cluster, |ch| {
        let req = req.clone();
        async move { epb::election_client::ElectionClient::new(ch).campaign(req).await }
    });
    let leader = tokio::select! {
        r = campaign => r?.leader,
        lost = session.lost() => return Err(lost),
    };
    leader.filter(|l| l.rev > 0).ok_or_else(|| ClientError::NoToken { key: name.to_string(), revision: 0 })
}

/// Give up the leadership `leader` holds, through leader changes.
pub async fn resign(cluster: &Cluster, leader: &epb::LeaderKey) -> Result<(), ClientError> {
    retry_for(RELEASE_RETRY, cluster, |ch| {
        let leader = leader.clone();
        async move {
            epb::election_client::ElectionClient::new(ch).resign(epb::ResignRequest { leader: Some(leader) }).await
        }
    })
    .await
    .map(drop)
}

/// Add member `name` at `peer_urls` through the first of `cluster`'s endpoints that answers (etcd's
/// MemberAdd, with the name geolock needs in gRPC metadata `MEMBER_NAME_HEADER`); a voter
/// (`learner` false) is added as a learner and promoted by the leader once caught up.
///
/// Errors: [`ClientError::Connect`]; the cluster's refusal as [`ClientError::Rpc`] (etcd's
/// texts: "etcdserver: member ID already exist", "etcdserver: Peer URLs already exists", ...),
/// and a name that cannot travel as metadata as `InvalidArgument`.
pub async fn member_add(
    cluster: &Cluster,
    name: &str,
    peer_urls: Vec<String>,
    learner: bool,
) -> Result<pb::MemberAddResponse, ClientError> {
    let value = name.parse().map_err(|_| tonic::Status::invalid_argument(format!("bad member name {name:?}")))?;
    let ch = connect_to(cluster).await?;
    let mut req = tonic::Request::new(pb::MemberAddRequest { peer_ur_ls: peer_urls, is_learner: learner });
    req.metadata_mut().insert(geolock_proto::MEMBER_NAME_HEADER, value);
    Ok(pb::cluster_client::ClusterClient::new(ch).member_add(req).await?.into_inner())
}
