//! The HTTP side of a member, served on its client URLs beside gRPC and alone on its metrics
//! URLs: `/metrics` (Prometheus text), and etcd 3.5's health endpoints:
//!
//! - `/health`: 200 `{"health":"true","reason":""}`, or 503 with the reason (`RAFT NO LEADER`,
//!   `RANGE ERROR:…`). `?serializable=true` skips the leader check and reads locally;
//!   `?exclude=ALARM` ignores that alarm (geolock raises none yet).
//! - `/livez` and `/readyz`: named checks, `ok` or 503 listing each (`[+]name ok`,
//!   `[-]name failed: why`); `?verbose` lists them on success too, `?exclude=name` skips one,
//!   `/readyz/<name>` runs one. Liveness is a local read; readiness adds a linearizable read
//!   and refuses a learner (`non_learner`, etcd's) and a witness (`non_witness`, ours: it holds
//!   no key space, so a load balancer must never send it clients).
//!
//! Each serves GET alone; other methods, HEAD included, get 405 with `Allow: GET`.
//!
//! Rules and texts from etcd's `server/etcdserver/api/etcdhttp/health.go` (v3.5).
//!
//! And the cluster page: `/` (one HTML file, everything embedded) drawing `/cluster.json`,
//! which this member assembles from every member's own account (`raft::MemberView`).

use std::sync::LazyLock;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec};

use super::Api;
use crate::config::Role;
use crate::metrics::{counter, counter_vec, gauge_vec};

/// How long a health check's read may take: etcd's request timeout with its default election
/// timeout (5 s + 2 × 1 s).
const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(7);

struct HealthMetrics {
    success: IntCounter,
    failures: IntCounter,
    check: IntGaugeVec,
    checks: IntCounterVec,
}

static HEALTH: LazyLock<HealthMetrics> = LazyLock::new(|| HealthMetrics {
    success: counter("etcd_server_health_success", "/health answers that were healthy."),
    failures: counter("etcd_server_health_failures", "/health answers that were not healthy."),
    check: gauge_vec(
        "etcd_server_healthcheck",
        "Each livez/readyz check's last result: 1 ok, 0 failed.",
        &["type", "name"],
    ),
    checks: counter_vec(
        "etcd_server_healthchecks_total",
        "livez/readyz checks run, by result (success, error).",
        &["type", "name", "status"],
    ),
});

/// Make the health metrics exist before the first check.
pub fn register() {
    LazyLock::force(&HEALTH);
}

/// The routes, for `Routes::from` beside the gRPC services.
pub fn router(api: Api) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/cluster.json", get(cluster))
        .route("/metrics", get(metrics))
        .route("/health", get_only(health))
        .route("/livez", get_only(|s, u| checks(s, u, Kind::Livez, None)))
        .route("/readyz", get_only(|s, u| checks(s, u, Kind::Readyz, None)))
        .route("/livez/{check}", get_only(|s, u, Path(c): Path<String>| checks(s, u, Kind::Livez, Some(c))))
        .route("/readyz/{check}", get_only(|s, u, Path(c): Path<String>| checks(s, u, Kind::Readyz, Some(c))))
        .fallback(unserved)
        .with_state(api)
}

/// A health path: GET alone, as etcd's health handlers answer; any other method, HEAD included
/// (which axum would otherwise answer as GET), gets etcd's 405 with `Allow: GET`.
fn get_only<H: axum::handler::Handler<T, Api>, T: 'static>(handler: H) -> axum::routing::MethodRouter<Api> {
    get(handler).head(not_get).fallback(not_get)
}

async fn not_get() -> Response {
    let mut r = go_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET"));
    r
}

/// A path nothing serves: a gRPC call gets gRPC's `Unimplemented` (as tonic's own router
/// answers one), anything else Go's 404 (as etcd's).
async fn unserved(headers: axum::http::HeaderMap) -> Response {
    if headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")) {
        let trailers_only = [(header::CONTENT_TYPE.as_str(), "application/grpc"), ("grpc-status", "12")];
        return (StatusCode::OK, trailers_only).into_response();
    }
    go_error(StatusCode::NOT_FOUND, "404 page not found")
}

/// The query's values for `name`, empty ones dropped (as etcd's `getQuerySet`).
fn query_values(uri: &Uri, name: &str) -> Vec<String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .filter(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.into_owned())
        .collect()
}

fn has_query(uri: &Uri, name: &str) -> bool {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).any(|(k, _)| k == name)
}

/// The cluster page.
async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("cluster.html")).into_response()
}

/// The cluster as the page draws it: every member (its own account, or why it could not be
/// had; lag as the leader sees it), the regions, the median round trip between each pair of
/// regions over every member's connections, and the longest lock queues any member reports.
async fn cluster(State(api): State<Api>) -> Response {
    let node = &api.node;
    let members = node.members();
    let (views, lags) = futures::join!(node.cluster_view(), node.lags());
    let name_of = |id: u64| members.iter().find(|m| m.id == id).map(|m| m.name.clone());
    let region_of = |id: u64| members.iter().find(|m| m.id == id).map(|m| m.region.clone());
    let mut regions: Vec<String> = Vec::new();
    let mut pairs: std::collections::BTreeMap<(String, String), Vec<f64>> = Default::default();
    let mut locks: std::collections::BTreeMap<String, usize> = Default::default();
    let mut leader = None;
    let mut out = Vec::new();
    for m in &members {
        if !regions.contains(&m.region) {
            regions.push(m.region.clone());
        }
        let view = views.iter().find(|(id, _)| *id == m.id).map(|(_, v)| v.clone());
        let view = view.unwrap_or_else(|| Err("not asked".into()));
        let lag = lags.get(&m.id);
        let mut entry = serde_json::json!({
            "id": format!("{:x}", m.id),
            "name": m.name,
            "region": m.region,
            "client_urls": m.client_urls,
            "lag_entries": lag.map(|l| l.entries),
            "lag_ms": lag.map(|l| l.ms),
        });
        match view {
            Ok(v) => {
                if v.leader == v.id {
                    leader = Some(v.name.clone());
                }
                for (peer, rtt) in &v.rtt_ms {
                    if let Some(to) = region_of(*peer).filter(|to| *to != v.region) {
                        pairs.entry((v.region.clone(), to)).or_default().push(*rtt);
                    }
                }
                for (name, n) in &v.locks {
                    let e = locks.entry(name.clone()).or_default();
                    *e = (*e).max(*n);
                }
                entry["reachable"] = true.into();
                entry["role"] = v.role.into();
                entry["term"] = v.term.into();
                entry["applied_index"] = v.applied_index.into();
                entry["healthy"] = (v.leader != 0).into();
                entry["is_leader"] = (v.leader == v.id).into();
                entry["leader"] = name_of(v.leader).into();
            }
            Err(e) => {
                let role = if m.is_learner { "learner".to_string() } else { m.role.to_string() };
                entry["reachable"] = false.into();
                entry["role"] = role.into();
                entry["error"] = e.into();
                entry["healthy"] = false.into();
                entry["is_leader"] = false.into();
            }
        }
        out.push(entry);
    }
    let latency: Vec<serde_json::Value> = pairs
        .into_iter()
        .map(|((from, to), mut rtts)| {
            rtts.sort_by(f64::total_cmp);
            serde_json::json!({"from": from, "to": to, "rtt_ms": rtts[rtts.len() / 2]})
        })
        .collect();
    let mut locks: Vec<(String, usize)> = locks.into_iter().collect();
    locks.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    locks.truncate(crate::raft::HOT_LOCKS_MAX);
    // Lock names are key names, and this page asks for no credentials: while authentication
    // is on they are left out, as a Range of them would be refused.
    let locks_hidden = node.read(|m| m.auth.enabled());
    if locks_hidden {
        locks.clear();
    }
    let body = serde_json::json!({
        "member": name_of(node.header().member_id),
        "cluster_id": format!("{:x}", node.header().cluster_id),
        "leader": leader,
        "members": out,
        "regions": regions,
        "latency_ms": latency,
        "locks_hidden": locks_hidden,
        "locks": locks.into_iter().map(|(name, queued)| serde_json::json!({"name": name, "queued": queued})).collect::<Vec<_>>(),
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn metrics(State(api): State<Api>) -> Response {
    api.node.refresh_metrics();
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], crate::metrics::exposition()).into_response()
}

/// Go's `http.Error`: the text and a newline, as plain text that must not be sniffed.
fn go_error(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        format!("{text}\n"),
    )
        .into_response()
}

/// A key-space read as the health checks make it (etcd's: keys only, limit 1).
async fn read(api: &Api, serializable: bool) -> Result<(), String> {
    let r = tokio::time::timeout(HEALTH_READ_TIMEOUT, api.read(serializable, |_| Ok(()))).await;
    match r {
        Err(_) => {
            Err(tonic::Status::from(super::ApiError::Node(crate::raft::NodeError::Timeout)).message().to_string())
        }
        Ok(Err(e)) => Err(tonic::Status::from(e).message().to_string()),
        Ok(Ok(_)) => Ok(()),
    }
}

async fn health(State(api): State<Api>, uri: Uri) -> Response {
    let serializable = query_values(&uri, "serializable").iter().any(|v| v == "true");
    // No alarms are raised yet (Maintenance.Alarm lists none), so `exclude` has nothing to skip.
    let reason = if !serializable && api.node.status().leader == 0 {
        Some("RAFT NO LEADER".to_string())
    } else {
        read(&api, serializable).await.err().map(|e| format!("RANGE ERROR:{e}"))
    };
    let healthy = reason.is_none();
    let body = serde_json::json!({"health": healthy.to_string(), "reason": reason.unwrap_or_default()}).to_string();
    if healthy {
        HEALTH.success.inc();
        (StatusCode::OK, body).into_response()
    } else {
        HEALTH.failures.inc();
        go_error(StatusCode::SERVICE_UNAVAILABLE, &body)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Livez,
    Readyz,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Livez => "livez",
            Kind::Readyz => "readyz",
        }
    }

    /// The checks, in the order they run and are listed.
    fn checks(self) -> &'static [&'static str] {
        match self {
            Kind::Livez => &["serializable_read"],
            Kind::Readyz => {
                &["data_corruption", "serializable_read", "linearizable_read", "non_learner", "non_witness"]
            }
        }
    }
}

async fn run_check(api: &Api, name: &str) -> Result<(), String> {
    match name {
        // No corruption check runs yet, so this alarm is never raised (Maintenance.Alarm).
        "data_corruption" => Ok(()),
        "serializable_read" => read(api, true).await,
        "linearizable_read" => read(api, false).await,
        "non_learner" if api.node.status().is_learner => Err("not supported for learner".into()),
        "non_witness" if api.node.role() == Role::Witness => {
            Err("not supported for witness: it holds no key space and serves no client requests".into())
        }
        _ => Ok(()),
    }
}

async fn checks(State(api): State<Api>, uri: Uri, kind: Kind, one: Option<String>) -> Response {
    let names: Vec<&str> = match &one {
        Some(c) if kind.checks().contains(&c.as_str()) => vec![c.as_str()],
        Some(_) => return go_error(StatusCode::NOT_FOUND, "404 page not found"),
        None => {
            let excluded = query_values(&uri, "exclude");
            kind.checks().iter().copied().filter(|c| !excluded.iter().any(|e| e == c)).collect()
        }
    };
    let mut report = String::new();
    let mut failed = false;
    for name in names {
        let outcome = run_check(&api, name).await;
        let (status, value) = match &outcome {
            Ok(()) => ("success", 1),
            Err(_) => ("error", 0),
        };
        HEALTH.check.with_label_values(&[kind.name(), name]).set(value);
        HEALTH.checks.with_label_values(&[kind.name(), name, status]).inc();
        match outcome {
            Ok(()) => report.push_str(&format!("[+]{name} ok\n")),
            Err(why) => {
                failed = true;
                report.push_str(&format!("[-]{name} failed: {why}\n"));
            }
        }
    }
    if failed {
        // Go's http.Error adds a newline after the report's own.
        return go_error(StatusCode::SERVICE_UNAVAILABLE, &report);
    }
    let body = if has_query(&uri, "verbose") { format!("{report}ok\n") } else { "ok\n".to_string() };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        body,
    )
        .into_response()
}
