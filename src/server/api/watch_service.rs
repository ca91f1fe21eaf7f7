//! The Watch service: one bidirectional stream per client, many watchers per stream.
//!
//! Replies are queued by the node under its state lock (so they are ordered with the writes
//! that produced them) into a bounded per-stream channel; this task turns them into
//! `WatchResponse`s. Watchers that fall behind are caught up here, a batch at a time.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::proto::etcdserverpb as pb;
use super::{convert, Api, ApiError, Credentials, Stream_};
use crate::raft::NodeError;
use geolock_core::limits::WATCH_STREAM_QUEUE_MAX;
use geolock_core::watch::{Reply, WatchSpec};

/// How often a stream with watchers still catching up retries; they retry only when the
/// client has drained some of the queue.
const CATCH_UP_RETRY: Duration = Duration::from_millis(5);

fn spec_of(c: pb::WatchCreateRequest) -> WatchSpec {
    let no_put = pb::watch_create_request::FilterType::Noput as i32;
    let no_delete = pb::watch_create_request::FilterType::Nodelete as i32;
    WatchSpec {
        no_put: c.filters.contains(&no_put),
        no_delete: c.filters.contains(&no_delete),
        key: c.key,
        range_end: c.range_end,
        start_revision: c.start_revision,
        prev_kv: c.prev_kv,
        progress_notify: c.progress_notify,
        watch_id: c.watch_id,
    }
}

/// Closes a watch stream on the node however its task ends.
pub(super) struct CloseOnDrop(pub std::sync::Arc<crate::raft::Node>, pub geolock_core::watch::StreamId);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.watch_close(self.1);
    }
}

impl Api {
    /// Whether the stream's caller may watch what `c` asks for: READ on its whole range, its
    /// token looked up again for each watch as etcd does. If not, the answer etcd gives: a
    /// watch created and canceled at once, ID -1, the reason the gRPC error etcd's text would be.
    async fn may_watch(&self, creds: &Credentials, c: &pb::WatchCreateRequest) -> Result<(), pb::WatchResponse> {
        let allowed = match self.as_caller(creds).await {
            Ok(api) => api.may_read(&c.key, &c.range_end),
            Err(e) => Err(e),
        };
        allowed.map_err(|e| {
            let status = Status::from(e);
            pb::WatchResponse {
                header: Some(self.header(self.node.current_rev())),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: format!("rpc error: code = {:?} desc = {}", status.code(), status.message()),
                ..Default::default()
            }
        })
    }
}

#[tonic::async_trait]
impl pb::watch_server::Watch for Api {
    type WatchStream = Stream_<pb::WatchResponse>;

    async fn watch(&self, req: Request<Streaming<pb::WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        if let Some(epoch) = self.node.fenced_epoch() {
            return Err(ApiError::from(NodeError::Fenced { epoch }).into());
        }
        let creds = Credentials::of(&req);
        let mut inbound = req.into_inner();
        let (tx, mut replies) = mpsc::channel::<Reply>(WATCH_STREAM_QUEUE_MAX);
        let stream = self.node.watch_open(tx);
        let (out_tx, out_rx) = mpsc::channel::<Result<pb::WatchResponse, Status>>(16);

        // Requests from the client.
        let node = self.node.clone();
        let (api, denials) = (self.clone(), out_tx.clone());
        let reader = tokio::spawn(async move {
            // Closes the stream's watchers however this task ends, aborted included.
            let _close = CloseOnDrop(node.clone(), stream);
            loop {
                let unsynced = node.watch_catch_up(stream);
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = tokio::time::sleep(CATCH_UP_RETRY), if unsynced => continue,
                };
                use pb::watch_request::RequestUnion as U;
                match msg {
                    Ok(Some(pb::WatchRequest { request_union: Some(U::CreateRequest(c)) })) => {
                        match api.may_watch(&creds, &c).await {
                            Ok(()) => node.watch_create(stream, spec_of(c)),
                            Err(denied) => {
                                if denials.send(Ok(denied)).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    Ok(Some(pb::WatchRequest { request_union: Some(U::CancelRequest(c)) })) => {
                        node.watch_cancel(stream, c.watch_id);
                    }
                    Ok(Some(pb::WatchRequest { request_union: Some(U::ProgressRequest(_)) })) => {
                        node.watch_progress(stream);
                    }
                    Ok(Some(pb::WatchRequest { request_union: None })) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        });

        // Replies to the client.
        let api = self.clone();
        tokio::spawn(async move {
            while let Some(reply) = replies.recv().await {
                let resp = match reply {
                    Reply::Created { watch_id, revision } => pb::WatchResponse {
                        header: Some(api.header(revision)),
                        watch_id,
                        created: true,
                        ..Default::default()
                    },
                    Reply::Events { watch_id, events, revision } => pb::WatchResponse {
                        header: Some(api.header(revision)),
                        watch_id,
                        events: events.into_iter().map(convert::event_out).collect(),
                        ..Default::default()
                    },
                    Reply::Canceled { watch_id, reason, compact_revision, created } => pb::WatchResponse {
                        header: Some(api.header(api.node.current_rev())),
                        watch_id,
                        created,
                        canceled: true,
                        compact_revision,
                        cancel_reason: reason,
                        ..Default::default()
                    },
                    Reply::Progress { watch_id, revision } => {
                        pb::WatchResponse { header: Some(api.header(revision)), watch_id, ..Default::default() }
                    }
                };
                if out_tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
            // The node dropped our queue: it overflowed with control replies, the member was
            // fenced, or the node stops.
            if !reader.is_finished() {
                let why = match api.node.fenced_epoch() {
                    Some(epoch) => ApiError::from(NodeError::Fenced { epoch }),
                    None => ApiError::WatchQueueFull { max: WATCH_STREAM_QUEUE_MAX },
                };
                let _ = out_tx.send(Err(why.into())).await;
                reader.abort();
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx))))
    }
}
