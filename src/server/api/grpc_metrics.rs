//! The gRPC server metrics etcd exports (go-grpc-prometheus's, as etcd runs it with
//! `--metrics=extensive`): `grpc_server_{started,handled,msg_received,msg_sent}_total` and
//! `grpc_server_handling_seconds`, labelled `grpc_type`, `grpc_service`, `grpc_method` (and
//! `grpc_code` once handled), plus etcd's `etcd_network_client_grpc_{received,sent}_bytes_total`.
//! `--metrics basic` (etcd's default) leaves the histogram out; `off` counts and exports nothing.
//! A tower layer around every client service: it reads the path, counts gRPC messages in the
//! bodies by their 5-byte length prefixes, and takes the status from the trailers (or from the
//! headers of a trailers-only answer). Anything not gRPC (the HTTP endpoints) passes untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use std::collections::HashMap;

use prometheus::{Histogram, IntCounter, IntCounterVec};

use crate::config::MetricsLevel;
use crate::metrics::{counter, counter_vec, histogram_vec};

/// Every method labels are kept for: ours from the protos, and the standard health service.
/// Any other path is counted under [`OTHER`], so a client cannot grow the label sets.
fn methods() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    const HEALTH: [(&str, &str, &str); 2] =
        [("grpc.health.v1.Health", "Check", "unary"), ("grpc.health.v1.Health", "Watch", "server_stream")];
    geolock_proto::methods::GRPC_METHODS.iter().copied().chain(HEALTH)
}

/// The labels of a path that names no method we serve.
const OTHER: (&str, &str, &str) = ("unknown", "unknown", "unary");

struct GrpcMetrics {
    handled: IntCounterVec,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
    /// Each method's own series, by request path (`/etcdserverpb.KV/Range`), so that a call
    /// costs one map lookup and then plain counter adds.
    methods: HashMap<String, Method>,
    other: Method,
}

/// One method's labels and series.
struct Method {
    labels: [&'static str; 3],
    started: IntCounter,
    received: IntCounter,
    sent: IntCounter,
    /// Only with `--metrics extensive`, as etcd's.
    handling: Option<Histogram>,
    handled_ok: IntCounter,
}

/// The level the metrics were registered at (the first server's; every server of a process is
/// started from one configuration).
static LEVEL: std::sync::OnceLock<MetricsLevel> = std::sync::OnceLock::new();

static METRICS: LazyLock<GrpcMetrics> = LazyLock::new(|| {
    let labels = ["grpc_type", "grpc_service", "grpc_method"];
    let started = counter_vec("grpc_server_started_total", "RPCs started on the server.", &labels);
    let handled = counter_vec(
        "grpc_server_handled_total",
        "RPCs completed on the server, by status code.",
        &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    );
    // Prometheus's default buckets, which go-grpc-prometheus keeps: 5 ms to 10 s.
    let handling = (LEVEL.get() == Some(&MetricsLevel::Extensive)).then(|| {
        histogram_vec(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its last reply, on the server.",
            &labels,
            prometheus::DEFAULT_BUCKETS.to_vec(),
        )
    });
    let received = counter_vec("grpc_server_msg_received_total", "Request messages received, per RPC method.", &labels);
    let sent = counter_vec("grpc_server_msg_sent_total", "Reply messages sent, per RPC method.", &labels);
    // As go-grpc-prometheus does, every method starts at zero (and `OK`), so that rates and
    // dashboards see a series before the first call.
    let method = |(service, method, kind): (&'static str, &'static str, &'static str)| {
        let l = [kind, service, method];
        Method {
            labels: l,
            started: started.with_label_values(&l),
            received: received.with_label_values(&l),
            sent: sent.with_label_values(&l),
            handling: handling.as_ref().map(|h| h.with_label_values(&l)),
            handled_ok: handled.with_label_values(&[kind, service, method, "OK"]),
        }
    };
    GrpcMetrics {
        methods: methods().map(|m| (format!("/{}/{}", m.0, m.1), method(m))).collect(),
        other: method(OTHER),
        handled,
        bytes_in: counter("etcd_network_client_grpc_received_bytes_total", "Bytes of gRPC requests received."),
        bytes_out: counter("etcd_network_client_grpc_sent_bytes_total", "Bytes of gRPC replies sent."),
    }
});

/// Make the metrics `level` keeps exist (every method at zero) before the first request; at
/// `off`, none.
pub fn register(level: MetricsLevel) {
    if level == MetricsLevel::Off {
        return;
    }
    let _ = LEVEL.set(level);
    LazyLock::force(&METRICS);
}

/// gRPC's status code names, as Go's `codes.Code.String()` spells them (etcd's label values).
fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    usize::try_from(code).ok().and_then(|c| NAMES.get(c)).copied().unwrap_or("Unknown")
}

/// The service and method a request path names, `unknown` for a path we do not serve (so that
/// names taken from paths stay a bounded set).
pub fn method_name(path: &str) -> (&'static str, &'static str) {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
    methods().find(|(s, m, _)| *s == service && *m == method).map_or((OTHER.0, OTHER.1), |(s, m, _)| (s, m))
}

/// The series of a request path (`/etcdserverpb.KV/Range`).
fn method_of(path: &str) -> &'static Method {
    let m = &*METRICS;
    m.methods.get(path).unwrap_or(&m.other)
}

/// Counts the gRPC messages in a body's bytes by their length prefixes (a flag byte, then a
/// big-endian u32 length), across frames however they are split.
#[derive(Debug, Default)]
struct Messages {
    header: [u8; 5],
    header_len: usize,
    body_left: u64,
}

impl Messages {
    /// Feed the next bytes; returns how many messages begin in them.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut begun = 0;
        while !data.is_empty() {
            if self.body_left > 0 {
                let take = data.len().min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                data = &data[take..];
                self.body_left -= take as u64;
                continue;
            }
            let take = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == 5 {
                begun += 1;
                self.header_len = 0;
                self.body_left = u64::from(u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes")));
            }
        }
        begun
    }
}

/// The tower layer (`Server::builder().layer(GrpcMetricsLayer::new(level))`).
#[derive(Clone, Copy, Debug)]
pub struct GrpcMetricsLayer {
    level: MetricsLevel,
}

impl GrpcMetricsLayer {
    pub fn new(level: MetricsLevel) -> Self {
        GrpcMetricsLayer { level }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = Metered<S>;
    fn layer(&self, inner: S) -> Metered<S> {
        Metered { inner, level: self.level }
    }
}

/// A service whose gRPC calls are counted.
#[derive(Clone, Debug)]
pub struct Metered<S> {
    inner: S,
    level: MetricsLevel,
}

/// One call's series and start, shared by its request and reply bodies.
#[derive(Clone, Copy)]
struct Call {
    method: &'static Method,
    /// When it started, if its handling time is kept (`--metrics extensive`).
    started: Option<Instant>,
}

impl Call {
    fn handled(&self, code: i32) {
        let m = self.method;
        if code == 0 {
            m.handled_ok.inc();
        } else {
            let [kind, service, method] = m.labels;
            METRICS.handled.with_label_values(&[kind, service, method, code_name(code)]).inc();
        }
        if let (Some(started), Some(h)) = (self.started, &m.handling) {
            h.observe(started.elapsed().as_secs_f64());
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for Metered<S>
where
    S: tower_service::Service<http::Request<Counted<B>>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    B: Body,
{
    type Response = http::Response<Counted<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let grpc = self.level != MetricsLevel::Off
            && req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let call = grpc.then(|| {
            let method = method_of(req.uri().path());
            method.started.inc();
            Call { method, started: (self.level == MetricsLevel::Extensive).then(Instant::now) }
        });
        let deadline = call.and_then(|_| grpc_timeout(req.headers()));
        let req = req.map(|body| Counted::new(body, call, Side::Request));
        let fut = self.inner.call(req);
        Box::pin(async move {
            // Settles the call if this future is dropped before the handler answers: the client
            // went away, or tonic's own deadline (outside this layer) ran out.
            let mut pending = Unanswered { call, started: Instant::now(), deadline };
            let resp = fut.await;
            let call = pending.call.take();
            let resp = match resp {
                Ok(resp) => resp,
                Err(e) => {
                    if let Some(call) = call {
                        call.handled(2);
                    }
                    return Err(e);
                }
            };
            // A trailers-only answer (an error before any reply) carries its status in the
            // headers, and its body ends with no trailers.
            let early = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok());
            Ok(resp.map(|body| {
                let mut b = Counted::new(body, call, Side::Reply);
                if let Some(code) = early {
                    if let Some(call) = b.call.take() {
                        call.handled(code);
                    }
                }
                b
            }))
        })
    }
}

/// A call whose handler has not answered yet; see [`Metered::call`].
struct Unanswered {
    call: Option<Call>,
    started: Instant,
    /// The client's `grpc-timeout`.
    deadline: Option<std::time::Duration>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            let expired = self.deadline.is_some_and(|d| self.started.elapsed() >= d);
            call.handled(if expired { 4 } else { 1 });
        }
    }
}

/// A request's `grpc-timeout` header (digits and a unit: H, M, S, m, u, n).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Request,
    Reply,
}

pin_project_lite::pin_project! {
    /// A body whose gRPC messages and bytes are counted; a reply body also settles its call
    /// (status from its trailers, or `Canceled` if dropped before they came).
    pub struct Counted<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
        method: Option<&'static Method>,
        side: Side,
        messages: Messages,
    }

    impl<B> PinnedDrop for Counted<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.side == Side::Reply {
                if let Some(call) = this.call.take() {
                    call.handled(1);
                }
            }
        }
    }
}

impl<B> Counted<B> {
    fn new(inner: B, call: Option<Call>, side: Side) -> Self {
        let method = call.map(|c| c.method);
        // Only a reply body settles its call.
        let call = if side == Side::Reply { call } else { None };
        Counted { inner, call, method, side, messages: Messages::default() }
    }
}

impl<B: Body<Data = bytes::Bytes>> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<bytes::Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let Some(method) = *this.method else { return polled };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = this.messages.feed(data);
                    let (counter, total) = match this.side {
                        Side::Request => (&method.received, &METRICS.bytes_in),
                        Side::Reply => (&method.sent, &METRICS.bytes_out),
                    };
                    counter.inc_by(n);
                    total.inc_by(data.len() as u64);
                } else if let Some(trailers) = frame.trailers_ref() {
                    if let Some(call) = this.call.take() {
                        let code = trailers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok());
                        call.handled(code.unwrap_or(2));
                    }
                }
            }
            Poll::Ready(None) => {
                // The body ended without trailers: a trailers-only answer was settled already,
                // so a call still unsettled got no status at all.
                if let Some(call) = this.call.take() {
                    call.handled(2);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_counted_however_frames_split_them() {
        let mut wire = Vec::new();
        for body in [&b"abc"[..], b"", b"0123456789"] {
            wire.push(0);
            wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
            wire.extend_from_slice(body);
        }
        let mut whole = Messages::default();
        assert_eq!(whole.feed(&wire), 3);
        for split in 1..wire.len() {
            let mut m = Messages::default();
            assert_eq!(m.feed(&wire[..split]) + m.feed(&wire[split..]), 3, "split at {split}");
        }
        let mut bytewise = Messages::default();
        assert_eq!(wire.iter().map(|b| bytewise.feed(std::slice::from_ref(b))).sum::<u64>(), 3);
    }

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_spells_them() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(h("5S"), Some(std::time::Duration::from_secs(5)));
        assert_eq!(h("250m"), Some(std::time::Duration::from_millis(250)));
        assert_eq!(h("1H"), Some(std::time::Duration::from_secs(3600)));
        assert_eq!(h("7"), None);
        assert_eq!(h("x5S"), None);
        assert_eq!(h(""), None);
    }

    #[test]
    fn paths_map_to_etcds_labels_and_strangers_to_one_set() {
        let labels = |p| method_of(p).labels;
        assert_eq!(labels("/etcdserverpb.KV/Range"), ["unary", "etcdserverpb.KV", "Range"]);
        assert_eq!(labels("/etcdserverpb.Watch/Watch"), ["bidi_stream", "etcdserverpb.Watch", "Watch"]);
        assert_eq!(labels("/v3electionpb.Election/Observe"), ["server_stream", "v3electionpb.Election", "Observe"]);
        assert_eq!(labels("/grpc.health.v1.Health/Check"), ["unary", "grpc.health.v1.Health", "Check"]);
        assert_eq!(labels("/etcdserverpb.KV/Nope"), ["unary", "unknown", "unknown"]);
        assert_eq!(labels("/x"), ["unary", "unknown", "unknown"]);
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(14), "Unavailable");
        assert_eq!(code_name(99), "Unknown");
    }
}
