//! The etcd v3 client API, served with tonic: request validation against [`geolock_core::limits`],
//! conversion to the state machine's types, and the one error table ([`errors`]).

mod auth_service;
mod convert;
mod errors;
mod failover_service;
mod grpc_metrics;
mod grpc_tracing;
mod http;
mod lock_service;
use geolock_proto as proto;
mod watch_service;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

pub use errors::ApiError;
use geolock_proto::MEMBER_NAME_HEADER;
use proto::etcdserverpb as pb;

use crate::config::Role;
use crate::raft::{Member, MemberChange, Node, NodeError};
use geolock_core::auth::{AuthError, Caller};
use geolock_core::lease::Lessor;
use geolock_core::limits::{GRPC_MESSAGE_BYTES_MAX, REQUEST_BYTES_MAX};
use geolock_core::machine::{Command, Response as Done};

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The etcd API version we speak; clients use it to decide which features to use.
pub const API_VERSION: &str = "3.5.0";

/// Serve every client service on `listener` until `shutdown` resolves: the etcd gRPC API,
/// `grpc.health.v1`, and over HTTP/1.1 or HTTP/2 the paths of [`http`] (`/metrics`, `/health`,
/// `/livez`, `/readyz`), as etcd's client port does.
pub async fn serve(
    node: Arc<Node>,
    hierarchical_prefixes: &[String],
    metrics: crate::config::MetricsLevel,
    tracing: bool,
    auth: AuthSettings,
    listener: Listener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    use pb::auth_server::AuthServer;
    use pb::cluster_server::ClusterServer;
    use pb::kv_server::KvServer;
    use pb::lease_server::LeaseServer;
    use pb::maintenance_server::MaintenanceServer;
    use pb::watch_server::WatchServer;
    let hierarchical = Arc::new(hierarchical_prefixes.iter().map(|p| p.as_bytes().to_vec()).collect());
    let api = Api { node, hierarchical, caller: None, auth };
    grpc_metrics::register(metrics);
    http::register();
    crate::raft::register_metrics();
    macro_rules! sized {
        ($s:expr) => {
            $s.max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX).max_encoding_message_size(usize::MAX)
        };
    }
    // A witness holds no key space: it answers status and membership, and refuses the rest
    // with an error that says so, before any handler runs.
    let role = api.node.role();
    let serves = move |req: Request<()>| match role {
        Role::Witness => Err(Status::from(ApiError::Node(NodeError::Role {
            role,
            what: "key-space requests (KV, Lease, Watch, Lock, Election)",
        }))),
        Role::Voter | Role::Learner => Ok(req),
    };
    let health = grpc_health(&api.node);
    use tonic::service::interceptor::InterceptedService as Guarded;
    let router = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(grpc_metrics::GrpcMetricsLayer::new(metrics))
        .layer(grpc_tracing::GrpcTracingLayer { enabled: tracing })
        .add_routes(tonic::service::Routes::from(http::router(api.clone())))
        .add_service(health)
        .add_service(Guarded::new(sized!(KvServer::new(api.clone())), serves))
        .add_service(Guarded::new(sized!(LeaseServer::new(api.clone())), serves))
        .add_service(Guarded::new(sized!(WatchServer::new(api.clone())), serves))
        .add_service(sized!(MaintenanceServer::new(api.clone())))
        .add_service(sized!(ClusterServer::new(api.clone())))
        .add_service(sized!(AuthServer::new(api.clone())))
        .add_service(sized!(proto::geolockpb::failover_server::FailoverServer::new(api.clone())))
        .add_service(Guarded::new(sized!(proto::v3lockpb::lock_server::LockServer::new(api.clone())), serves))
        .add_service(Guarded::new(
            sized!(proto::v3electionpb::election_server::ElectionServer::new(api.clone())),
            serves,
        ));
    match listener {
        Listener::Plain(l) => router.serve_with_incoming_shutdown(incoming(l), shutdown).await,
        Listener::Tls(l, tls) => router.serve_with_incoming_shutdown(tls.incoming(l), shutdown).await,
    }
}

/// A client listener: plain (`http://`) or TLS (`https://`) with the client TLS settings.
pub enum Listener {
    Plain(tokio::net::TcpListener),
    Tls(tokio::net::TcpListener, Arc<crate::client_tls::ClientTls>),
}

/// What a request says about who sends it: a token in its metadata, and on a TLS connection
/// with a verified client certificate, that certificate's common name.
#[derive(Clone, Default)]
pub struct Credentials {
    token: Option<String>,
    common_name: Option<String>,
}

impl Credentials {
    /// The credentials `req` carries.
    pub fn of<T>(req: &Request<T>) -> Credentials {
        let md = req.metadata();
        let token = TOKEN_METADATA.iter().find_map(|k| md.get(*k)).and_then(|v| v.to_str().ok());
        let token = token.map(|t| t.strip_prefix("Bearer ").unwrap_or(t).to_string());
        let common_name =
            req.peer_certs().and_then(|certs| certs.first().and_then(|c| crate::client_tls::common_name(c)));
        Credentials { token, common_name }
    }
}

/// Serve only the HTTP paths of [`http`], in plain HTTP (etcd's `--listen-metrics-urls`).
pub async fn serve_metrics(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let tokens = Arc::new(crate::auth::TokenProvider::Simple);
    let auth = AuthSettings { bcrypt_cost: 0, tokens, client_cert_auth: false };
    let api = Api { node, hierarchical: Arc::default(), caller: None, auth };
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(tonic::service::Routes::from(http::router(api)))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
}

/// `grpc.health.v1.Health` for the whole server (service name ""): serving while this member
/// knows a leader, never on a witness, which serves no client requests. Kept up to date each
/// half second while the node lives.
fn grpc_health(
    node: &Arc<Node>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    let node = Arc::downgrade(node);
    tokio::spawn(async move {
        use tonic_health::ServingStatus;
        loop {
            let Some(n) = node.upgrade() else { return };
            let serving = n.role() != Role::Witness && n.status().leader != 0;
            drop(n);
            let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
            reporter.set_service_status("", status).await;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    service
}

/// Accepted connections with Nagle's algorithm off: a response written in two frames must not
/// wait for the client's delayed ACK (40 ms) between them.
fn incoming(listener: tokio::net::TcpListener) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// The services; cheap to clone. A request is served by a copy that carries its caller.
#[derive(Clone)]
pub struct Api {
    node: Arc<Node>,
    /// Lock names under these prefixes need their parent lock held by the same lease.
    hierarchical: Arc<Vec<Vec<u8>>>,
    /// Who sends the request this copy serves, as [`Api::as_caller`] established it; `None`
    /// while authentication is off or when the request carried no credentials.
    caller: Option<Caller>,
    auth: AuthSettings,
}

/// How a member's client API hashes passwords and makes and checks tokens.
#[derive(Clone)]
pub struct AuthSettings {
    /// bcrypt's cost for the passwords this member hashes.
    pub bcrypt_cost: u32,
    pub tokens: Arc<crate::auth::TokenProvider>,
    /// A verified client certificate's common name is the user of a request without a token
    /// (etcd's `--client-cert-auth`).
    pub client_cert_auth: bool,
}

/// The gRPC metadata keys a token comes in: etcd's clients send `token`, its gateway's HTTP
/// clients `authorization` (with or without `Bearer `).
const TOKEN_METADATA: [&str; 2] = ["token", "authorization"];

fn check_size<M: Message>(m: &M) -> Result<(), ApiError> {
    let len = m.encoded_len();
    if len > REQUEST_BYTES_MAX {
        return Err(ApiError::RequestTooLarge { len, max: REQUEST_BYTES_MAX });
    }
    Ok(())
}

impl Api {
    /// A copy of the services for a request with these credentials: its caller is the user
    /// its token names or, without a token and with `--client-cert-auth`, its certificate's
    /// common name (etcd's order). While authentication is off none
    /// is looked at (etcd ignores them); a token no member made, or one that expired, is
    /// refused with etcd's invalid-token error, on which its clients authenticate again.
    async fn as_caller(&self, creds: &Credentials) -> Result<Api, ApiError> {
        if !self.node.read(|m| m.auth.enabled()) {
            return Ok(Api { caller: None, ..self.clone() });
        }
        let caller = match (&creds.token, &creds.common_name) {
            (Some(t), _) => {
                let who = match &*self.auth.tokens {
                    crate::auth::TokenProvider::Simple => self.node.token_caller(t).await,
                    crate::auth::TokenProvider::Jwt(jwt) => jwt.verify(t),
                };
                Some(who.ok_or(AuthError::InvalidToken)?)
            }
            // A certificate without a common name names the user "", whom no permission
            // check finds: etcd answers such a caller "permission denied", not "user name is
            // empty".
            (None, Some(cn)) if self.auth.client_cert_auth => {
                Some(Caller { user: cn.clone(), revision: self.node.read(|m| m.auth.revision()) })
            }
            (None, _) => None,
        };
        Ok(Api { caller, ..self.clone() })
    }

    /// The caller may read `[key, range_end)`, as the state applied here says.
    fn may_read(&self, key: &[u8], range_end: &[u8]) -> Result<(), ApiError> {
        Ok(self.node.read(|m| m.authorize_read(self.caller.as_ref(), key, range_end))?)
    }

    /// The caller is a root user (or authentication is off): Maintenance, Cluster changes and
    /// auth management, as etcd.
    fn must_be_admin(&self) -> Result<(), ApiError> {
        Ok(self.node.read(|m| m.auth.check_admin(self.caller.as_ref()))?)
    }

    /// The caller gave credentials, or authentication is off (etcd 3.6's `requireAuthInfo`).
    fn must_be_authenticated(&self) -> Result<(), ApiError> {
        Ok(self.node.read(|m| m.auth.check_authenticated(self.caller.as_ref()))?)
    }

    fn header(&self, revision: i64) -> pb::ResponseHeader {
        let h = self.node.header();
        pb::ResponseHeader { cluster_id: h.cluster_id, member_id: h.member_id, revision, raft_term: h.raft_term }
    }

    /// etcd's space quota, checked before anything else about a write (its quota interceptor
    /// runs before the request is looked at): the bytes of keys and values held here plus what
    /// the write adds (for a Txn, its costlier branch) must fit this member's quota. The state
    /// machine refuses past [`geolock_core::limits::KEYSPACE_BYTES_MAX`] on every member alike.
    fn check_quota(&self, cmd: &Command) -> Result<(), ApiError> {
        fn txn_adds(t: &geolock_core::kv::TxnRequest) -> u64 {
            let branch = |ops: &[geolock_core::kv::RequestOp]| -> u64 {
                ops.iter()
                    .map(|op| match op {
                        geolock_core::kv::RequestOp::Put(p) => (p.key.len() + p.value.len()) as u64,
                        geolock_core::kv::RequestOp::Txn(inner) => txn_adds(inner),
                        geolock_core::kv::RequestOp::Range(_) | geolock_core::kv::RequestOp::DeleteRange(_) => 0,
                    })
                    .sum()
            };
            branch(&t.success).max(branch(&t.failure))
        }
        let adds = match cmd {
            Command::Put(p) => (p.key.len() + p.value.len()) as u64,
            Command::Txn(t) => txn_adds(t),
            _ => 0,
        };
        if adds == 0 {
            return Ok(());
        }
        let (bytes, max) = (self.node.read(|m| m.kv.bytes()) + adds, self.node.quota_bytes());
        if bytes > max {
            return Err(geolock_core::kv::KvError::NoSpace { bytes, max }.into());
        }
        Ok(())
    }

    /// Propose a validated command as the caller's and wait for it to be applied.
    async fn propose(&self, cmd: Command) -> Result<(Done, i64), ApiError> {
        self.check_quota(&cmd)?;
        geolock_core::machine::validate(&cmd)?;
        let cmd = Command::Client { caller: self.caller.clone(), request: Box::new(cmd) };
        let applied = self.node.propose(cmd).await?;
        let done = applied.result.map_err(ApiError::from)?;
        Ok((done, applied.revision))
    }

    async fn read<R>(
        &self,
        serializable: bool,
        f: impl FnOnce(&geolock_core::machine::Machine) -> Result<R, ApiError>,
    ) -> Result<(R, i64), ApiError> {
        if !serializable {
            self.node.linearize().await?;
        }
        self.node.read(|m| f(m).map(|r| (r, m.kv.current_rev())))
    }
}

fn unexpected(d: Done) -> Status {
    ApiError::UnexpectedApply { got: format!("{d:?}") }.into()
}

#[tonic::async_trait]
impl pb::kv_server::Kv for Api {
    async fn range(&self, req: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        check_size(&r)?;
        geolock_core::kv::check_key(&r.key).map_err(ApiError::from)?;
        let r = convert::range_in(r)?;
        crate::raft::count_range();
        let who = api.caller.as_ref();
        let (resp, rev) = api
            .read(r.serializable, |m| {
                m.authorize_read(who, &r.key, &r.range_end)?;
                Ok(m.range(&r)?)
            })
            .await?;
        Ok(Response::new(convert::range_out(resp, self.header(rev))))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let p = req.into_inner();
        check_size(&p)?;
        match api.propose(Command::Put(convert::put_in(p))).await? {
            (Done::Put(r), rev) => Ok(Response::new(convert::put_out(r, self.header(rev)))),
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let d = req.into_inner();
        check_size(&d)?;
        match api.propose(Command::DeleteRange(convert::delete_in(d))).await? {
            (Done::DeleteRange(r), rev) => Ok(Response::new(convert::delete_out(r, self.header(rev)))),
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let t = req.into_inner();
        check_size(&t)?;
        let t = convert::txn_in(t)?;
        if convert::txn_is_read_only(&t) {
            // Read-only Txns are served like reads, linearizably, without a log entry.
            geolock_core::kv::validate_txn(&t).map_err(ApiError::from)?;
            let who = api.caller.as_ref();
            let (resp, rev) = api
                .read(false, |m| {
                    m.authorize_txn(&t, who)?;
                    Ok(m.read_only_txn(&t)?)
                })
                .await?;
            crate::raft::count_txn(&resp);
            return Ok(Response::new(convert::txn_out(resp, &self.header(rev))));
        }
        match api.propose(Command::Txn(t)).await? {
            (Done::Txn(r), rev) => Ok(Response::new(convert::txn_out(r, &self.header(rev)))),
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn compact(&self, req: Request<pb::CompactionRequest>) -> Result<Response<pb::CompactionResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let c = req.into_inner();
        // Refuse before proposing when the answer is already known.
        self.node.read(|m| m.kv.check_compact(c.revision)).map_err(ApiError::from)?;
        match api.propose(Command::Compact { revision: c.revision }).await? {
            (Done::Compact, rev) => Ok(Response::new(pb::CompactionResponse { header: Some(self.header(rev)) })),
            (other, _) => Err(unexpected(other)),
        }
    }
}

#[tonic::async_trait]
impl pb::lease_server::Lease for Api {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        api.must_be_authenticated()?;
        let g = req.into_inner();
        let ttl_s = Lessor::effective_ttl(&self.node.ttl_bounds(), g.ttl).map_err(ApiError::from)?;
        // Any ID but 0 ("choose one") is the client's to pick, negative ones too, as in etcd.
        let id = if g.id == 0 { self.node.new_lease_id() } else { g.id };
        match api.propose(Command::LeaseGrant { id, ttl_s }).await? {
            (Done::LeaseGrant { id, ttl_s }, rev) => Ok(Response::new(pb::LeaseGrantResponse {
                header: Some(self.header(rev)),
                id,
                ttl: ttl_s,
                error: String::new(),
            })),
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        api.must_be_authenticated()?;
        let id = req.into_inner().id;
        match api.propose(Command::LeaseRevoke { id }).await? {
            (Done::LeaseRevoke, rev) => Ok(Response::new(pb::LeaseRevokeResponse { header: Some(self.header(rev)) })),
            (other, _) => Err(unexpected(other)),
        }
    }

    type LeaseKeepAliveStream = Stream_<pb::LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let creds = Credentials::of(&req);
        let mut inbound = req.into_inner();
        let api = self.clone();
        // The stream outlives leader changes: a keep-alive the cluster could not answer (no
        // leader within three election timeouts, or this member cut off from it) gets no answer,
        // so the client is not told its lease was renewed, and the next one is tried afresh.
        // etcd's server retries a renewal through leader changes the same way; only a refusal
        // that will not change (this member's role) ends the stream.
        let out = async_stream_from(move |tx| async move {
            while let Ok(Some(k)) = inbound.message().await {
                // Each renewal is checked with the stream's token looked up again, as etcd
                // does: a token that expired or a permission revoked since ends the stream.
                let allowed = match api.as_caller(&creds).await {
                    Ok(a) => {
                        let who = a.caller.as_ref();
                        a.node.read(|m| m.authorize_lease_keys(k.id, who)).map_err(ApiError::from)
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = allowed {
                    let _ = tx.send(Err(e.into())).await;
                    break;
                }
                let reply = match api.node.lease_keep_alive(k.id).await {
                    Ok(ttl) => Ok(pb::LeaseKeepAliveResponse {
                        header: Some(api.header(api.node.current_rev())),
                        id: k.id,
                        ttl,
                    }),
                    // etcd answers a keep-alive for a lease that is gone with TTL 0.
                    Err(NodeError::Apply(geolock_core::machine::ApplyError::Lease(_))) => {
                        Ok(pb::LeaseKeepAliveResponse {
                            header: Some(api.header(api.node.current_rev())),
                            id: k.id,
                            ttl: 0,
                        })
                    }
                    Err(e) if e.is_transient() => {
                        tracing::debug!("keep-alive of lease {:x} not answered: {e}", k.id);
                        continue;
                    }
                    Err(e) => Err(Status::from(ApiError::from(e))),
                };
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        api.must_be_authenticated()?;
        let r = req.into_inner();
        if r.keys {
            // etcd's checkLeaseTimeToLive: the keys are listed only to whoever may read them.
            let who = api.caller.as_ref();
            self.node
                .read(|m| -> Result<(), AuthError> {
                    if m.auth.check_admin(who).is_ok() {
                        return Ok(());
                    }
                    let Some(lease) = m.leases.get(r.id) else { return Ok(()) };
                    lease.keys.iter().try_for_each(|k| m.authorize_read(who, k, &[]))
                })
                .map_err(ApiError::from)?;
        }
        let rev = self.node.current_rev();
        match self.node.lease_time_to_live(r.id, r.keys).await {
            Ok(info) => Ok(Response::new(pb::LeaseTimeToLiveResponse {
                header: Some(self.header(rev)),
                id: r.id,
                ttl: info.remaining_s,
                granted_ttl: info.granted_s,
                keys: info.keys,
            })),
            // etcd reports a missing lease as TTL -1, not as an error.
            Err(NodeError::Apply(geolock_core::machine::ApplyError::Lease(_))) => {
                Ok(Response::new(pb::LeaseTimeToLiveResponse {
                    header: Some(self.header(rev)),
                    id: r.id,
                    ttl: -1,
                    granted_ttl: 0,
                    keys: vec![],
                }))
            }
            Err(e) => Err(ApiError::from(e).into()),
        }
    }

    async fn lease_leases(
        &self,
        req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        self.node.linearize().await.map_err(ApiError::from)?;
        // etcd's checkLeaseLeases: a user, and unless root, READ on every key of every lease.
        let who = api.caller.as_ref();
        let (ids, rev) = self
            .node
            .read(|m| -> Result<_, AuthError> {
                m.auth.check_authenticated(who)?;
                if m.auth.enabled() && m.auth.check_admin(who).is_err() {
                    for id in m.leases.ids() {
                        let keys = m.leases.get(id).map(|l| l.keys.iter()).into_iter().flatten();
                        keys.into_iter().try_for_each(|k| m.authorize_read(who, k, &[]))?;
                    }
                }
                Ok((m.leases.ids(), m.kv.current_rev()))
            })
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: Some(self.header(rev)),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }))
    }
}

/// A response stream fed by a task that owns the sending half.
fn async_stream_from<T, F, Fut>(f: F) -> Stream_<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for Api {
    async fn alarm(&self, req: Request<pb::AlarmRequest>) -> Result<Response<pb::AlarmResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        // etcd: listing alarms needs a user, raising or clearing one needs root.
        if req.get_ref().action == pb::alarm_request::AlarmAction::Get as i32 {
            api.must_be_authenticated()?;
        } else {
            api.must_be_admin()?;
        }
        Ok(Response::new(pb::AlarmResponse { header: Some(self.header(self.node.current_rev())), alarms: vec![] }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_authenticated()?;
        let s = self.node.status();
        let me = self.node.header().member_id;
        // Lag is the leader's figure: a member that names no leader answers at once, without it
        // (asking for it would wait for a leader, and status probes time out on a lost primary).
        let lag = if s.leader == 0 {
            Default::default()
        } else {
            self.node.lags().await.get(&me).copied().unwrap_or_default()
        };
        let region = self.node.members().into_iter().find(|m| m.id == me).map(|m| m.region).unwrap_or_default();
        Ok(Response::new(pb::StatusResponse {
            header: Some(self.header(s.revision)),
            version: API_VERSION.to_string(),
            db_size: s.db_size_bytes as i64,
            leader: s.leader,
            raft_index: s.raft_index,
            raft_term: s.raft_term,
            raft_applied_index: s.applied_index,
            errors: vec![],
            db_size_in_use: s.db_size_bytes as i64,
            is_learner: s.is_learner,
            geolock_role: shown_role(s.role, s.is_learner).to_string(),
            geolock_region: region,
            geolock_lag_entries: lag.entries,
            geolock_lag_ms: lag.ms,
        }))
    }

    async fn defragment(
        &self,
        req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_admin()?;
        Ok(Response::new(pb::DefragmentResponse { header: Some(self.header(self.node.current_rev())) }))
    }

    async fn hash(&self, req: Request<pb::HashRequest>) -> Result<Response<pb::HashResponse>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_admin()?;
        Err(ApiError::Unimplemented("Maintenance.Hash").into())
    }

    async fn hash_kv(&self, req: Request<pb::HashKvRequest>) -> Result<Response<pb::HashKvResponse>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_admin()?;
        let rev = req.into_inner().revision;
        let (hash, compact, cur) = self
            .node
            .read(|m| m.kv.hash(rev).map(|h| (h, m.kv.compact_rev(), m.kv.current_rev())))
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::HashKvResponse { header: Some(self.header(cur)), hash, compact_revision: compact }))
    }

    type SnapshotStream = Stream_<pb::SnapshotResponse>;

    async fn snapshot(&self, req: Request<pb::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_admin()?;
        Err(ApiError::Unimplemented("Maintenance.Snapshot").into())
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_admin()?;
        let to = req.into_inner().target_id;
        self.node.change_members(MemberChange::MoveLeader { to }).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::MoveLeaderResponse { header: Some(self.header(self.node.current_rev())) }))
    }

    async fn downgrade(&self, req: Request<pb::DowngradeRequest>) -> Result<Response<pb::DowngradeResponse>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_admin()?;
        Err(ApiError::Unimplemented("Maintenance.Downgrade").into())
    }
}

/// The role a member plays now: a voter started as a learner and since promoted votes.
fn shown_role(started_as: Role, is_learner: bool) -> Role {
    match started_as {
        Role::Witness => Role::Witness,
        Role::Voter | Role::Learner if is_learner => Role::Learner,
        Role::Voter | Role::Learner => Role::Voter,
    }
}

impl Api {
    async fn members(&self) -> Vec<pb::Member> {
        let lags = self.node.lags().await;
        self.node
            .members()
            .into_iter()
            .map(|m| {
                let lag = lags.get(&m.id).copied().unwrap_or_default();
                pb::Member {
                    id: m.id,
                    name: m.name,
                    peer_ur_ls: m.peer_urls,
                    client_ur_ls: m.client_urls,
                    is_learner: m.is_learner,
                    geolock_role: shown_role(m.role, m.is_learner).to_string(),
                    geolock_region: m.region,
                    geolock_lag_entries: lag.entries,
                    geolock_lag_ms: lag.ms,
                }
            })
            .collect()
    }

    async fn change(&self, change: MemberChange) -> Result<(), ApiError> {
        self.node.change_members(change).await.map_err(ApiError::from)
    }
}

/// The `host:port` of a member's first peer URL; a member must have one.
fn peer_addr(urls: &[String]) -> Result<String, ApiError> {
    let first =
        urls.first().ok_or_else(|| ApiError::InvalidArgument("given member URLs are invalid: none given".into()))?;
    crate::config::host_port(first)
        .map_err(|e| ApiError::InvalidArgument(format!("given member URLs are invalid: {e}")))
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Api {
    async fn member_add(&self, r: Request<pb::MemberAddRequest>) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.as_caller(&Credentials::of(&r)).await?.must_be_admin()?;
        let name = r
            .metadata()
            .get(MEMBER_NAME_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "geolock needs the new member's name, which etcd's MemberAdd does not carry: \
                     use `lockctl member add NAME --peer-urls URL` (gRPC metadata {MEMBER_NAME_HEADER})"
                ))
            })?;
        let req = r.into_inner();
        let peer_addr = peer_addr(&req.peer_ur_ls)?;
        let id = geolock_core::member::member_id(&name);
        let member = Member { name: name.clone(), peer_addr, peer_urls: req.peer_ur_ls.clone(), ..Default::default() };
        self.change(MemberChange::Add { id, member, learner: req.is_learner }).await?;
        let added = pb::Member {
            id,
            name,
            peer_ur_ls: req.peer_ur_ls,
            is_learner: true,
            geolock_role: Role::Learner.to_string(),
            ..Default::default()
        };
        Ok(Response::new(pb::MemberAddResponse {
            header: Some(self.header(self.node.current_rev())),
            member: Some(added),
            members: self.members().await,
        }))
    }

    async fn member_remove(
        &self,
        r: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.as_caller(&Credentials::of(&r)).await?.must_be_admin()?;
        self.change(MemberChange::Remove { id: r.into_inner().id }).await?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: Some(self.header(self.node.current_rev())),
            members: self.members().await,
        }))
    }

    async fn member_update(
        &self,
        r: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.as_caller(&Credentials::of(&r)).await?.must_be_admin()?;
        let req = r.into_inner();
        let peer_addr = peer_addr(&req.peer_ur_ls)?;
        self.change(MemberChange::Update { id: req.id, peer_urls: req.peer_ur_ls, peer_addr }).await?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: Some(self.header(self.node.current_rev())),
            members: self.members().await,
        }))
    }

    async fn member_list(&self, r: Request<pb::MemberListRequest>) -> Result<Response<pb::MemberListResponse>, Status> {
        self.as_caller(&Credentials::of(&r)).await?.must_be_authenticated()?;
        // A linearizable list (etcd 3.5's field, which lockctl sets) is answered only by a
        // member that reaches the leader; a cut-off member would list a stale membership with
        // lags it cannot know.
        if r.into_inner().linearizable {
            self.node.linearize().await.map_err(ApiError::from)?;
        }
        Ok(Response::new(pb::MemberListResponse {
            header: Some(self.header(self.node.current_rev())),
            members: self.members().await,
        }))
    }

    async fn member_promote(
        &self,
        r: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.as_caller(&Credentials::of(&r)).await?.must_be_admin()?;
        self.change(MemberChange::Promote { id: r.into_inner().id }).await?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: Some(self.header(self.node.current_rev())),
            members: self.members().await,
        }))
    }
}
