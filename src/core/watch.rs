//! Watchers and what each must be sent next.
//!
//! Pure: the hub turns "a revision was applied", "a stream asked for X" and "catch up" into
//! [`Output`]s; the caller delivers them. A watcher is *synced* when it has been sent everything up
//! to the current revision; only synced watchers get new events as they are applied. A watcher
//! that falls behind (new, started in the past, or whose stream's queue was full) is *unsynced*
//! and is caught up from the key-space history, a revision at a time, so no event is skipped or
//! sent twice, and events always go out in revision order.

use std::collections::{BTreeMap, HashMap};

use crate::kv::{Event, EventKind, Mvcc, Rev};
use crate::limits::{WATCHERS_PER_STREAM_MAX, WATCH_EVENTS_PER_RESPONSE_MAX};

/// Identifies one client Watch stream.
pub type StreamId = u64;

/// Watch ID that belongs to no watcher (etcd's InvalidWatchID).
pub const NO_WATCH_ID: i64 = -1;

/// What a client asked to watch (etcdserverpb.WatchCreateRequest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchSpec {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// First revision to deliver; 0 = from the next write on.
    pub start_revision: Rev,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// Requested ID; 0 lets the server choose (etcd's AutoWatchID).
    pub watch_id: i64,
}

/// A message for one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The watcher exists.
    Created { watch_id: i64, revision: Rev },
    /// Events for a watcher; `revision` is the store's revision when they were sent.
    Events { watch_id: i64, events: Vec<Event>, revision: Rev },
    /// The watcher is gone; `compact_revision` is set when its start was compacted away.
    Canceled { watch_id: i64, reason: String, compact_revision: Rev, created: bool },
    /// Everything up to `revision` has been sent (to `watch_id`, or to all with `NO_WATCH_ID`).
    Progress { watch_id: i64, revision: Rev },
}

/// A reply addressed to a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub stream: StreamId,
    pub reply: Reply,
}

#[derive(Clone, Debug)]
struct Watcher {
    spec: WatchSpec,
    /// The next revision this watcher must be sent.
    next_rev: Rev,
    synced: bool,
}

#[derive(Clone, Debug, Default)]
struct Stream {
    next_auto_id: i64,
    /// A progress request arrived while some watcher was unsynced: answer once all are synced.
    progress_deferred: bool,
}

/// Every watcher of this node.
#[derive(Clone, Debug, Default)]
pub struct Hub {
    watchers: BTreeMap<(StreamId, i64), Watcher>,
    streams: HashMap<StreamId, Stream>,
}

fn matches(spec: &WatchSpec, e: &Event) -> bool {
    let k = &e.kv.key[..];
    let in_range = if spec.range_end.is_empty() {
        k == &spec.key[..]
    } else if spec.range_end == [0] {
        k >= &spec.key[..]
    } else {
        k >= &spec.key[..] && k < &spec.range_end[..]
    };
    in_range && !(spec.no_put && e.kind == EventKind::Put) && !(spec.no_delete && e.kind == EventKind::Delete)
}

fn shape(spec: &WatchSpec, e: &Event) -> Event {
    let mut e = e.clone();
    if !spec.prev_kv {
        e.prev_kv = None;
    }
    e
}

impl Hub {
    /// No watchers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of watchers.
    pub fn len(&self) -> usize {
        self.watchers.len()
    }

    /// True if there are no watchers.
    pub fn is_empty(&self) -> bool {
        self.watchers.is_empty()
    }

    /// Whether any watcher of `stream` still has history to be sent.
    pub fn has_unsynced(&self, stream: StreamId) -> bool {
        self.stream_watchers(stream).any(|(_, w)| !w.synced)
    }

    fn stream_watchers(&self, stream: StreamId) -> impl Iterator<Item = (&(StreamId, i64), &Watcher)> {
        self.watchers.range((stream, i64::MIN)..=(stream, i64::MAX))
    }

    /// Create a watcher. The reply is `Created`, or `Canceled` with `created` set when refused.
    /// The watcher starts unsynced; [`Hub::catch_up`] brings it level.
    pub fn create(&mut self, stream: StreamId, spec: WatchSpec, kv: &Mvcc) -> Output {
        let revision = kv.current_rev();
        let refuse = |reason: String| Output {
            stream,
            reply: Reply::Canceled { watch_id: NO_WATCH_ID, reason, compact_revision: 0, created: true },
        };
        // etcd's check: a range that ends at or before its key watches nothing and is refused
        // (the empty key is etcd's "\0", the smallest; a range end of "\0" is "to the end").
        let end = &spec.range_end;
        if !end.is_empty() && end.as_slice() != [0] && spec.key.as_slice().max(&[0][..]) >= end.as_slice() {
            return refuse("mvcc: watcher range is empty".to_string());
        }
        let count = self.stream_watchers(stream).count();
        if count >= WATCHERS_PER_STREAM_MAX {
            return refuse(format!(
                "etcdserver: too many watchers on one stream (watchers_per_stream_max {WATCHERS_PER_STREAM_MAX})"
            ));
        }
        let st = self.streams.entry(stream).or_default();
        let watch_id = if spec.watch_id == 0 {
            while self.watchers.contains_key(&(stream, st.next_auto_id)) {
                st.next_auto_id += 1;
            }
            st.next_auto_id += 1;
            st.next_auto_id - 1
        } else if spec.watch_id < 0 || self.watchers.contains_key(&(stream, spec.watch_id)) {
            return refuse("mvcc: duplicate watch ID provided on the WatchStream".to_string());
        } else {
            spec.watch_id
        };
        // 0 is "from now". A negative start revision reads no history either, as in etcd (its
        // history scan encodes the revision unsigned, so it finds nothing), unless it is below
        // the compact revision (-1 before any compaction): then it is canceled as compacted.
        let from_now = spec.start_revision == 0 || (spec.start_revision < 0 && spec.start_revision >= kv.compact_rev());
        let next_rev = if from_now { revision + 1 } else { spec.start_revision };
        self.watchers.insert((stream, watch_id), Watcher { spec, next_rev, synced: false });
        Output { stream, reply: Reply::Created { watch_id, revision } }
    }

    /// Remove a watcher; `None` if there was none.
    pub fn cancel(&mut self, stream: StreamId, watch_id: i64) -> Option<Output> {
        self.watchers.remove(&(stream, watch_id))?;
        Some(Output {
            stream,
            reply: Reply::Canceled { watch_id, reason: String::new(), compact_revision: 0, created: false },
        })
    }

    /// Forget a stream and its watchers (the client went away).
    pub fn close_stream(&mut self, stream: StreamId) {
        let ids: Vec<_> = self.stream_watchers(stream).map(|(k, _)| *k).collect();
        for k in ids {
            self.watchers.remove(&k);
        }
        self.streams.remove(&stream);
    }

    /// Events of revision `revision` were applied: what synced watchers must be sent.
    pub fn on_apply(&mut self, events: &[Event], revision: Rev) -> Vec<Output> {
        let mut out = Vec::new();
        if events.is_empty() {
            return out;
        }
        for ((stream, watch_id), w) in self.watchers.iter_mut() {
            if !w.synced || w.next_rev > revision {
                continue;
            }
            debug_assert!(w.next_rev <= revision, "a synced watcher is never ahead of the store");
            let evs: Vec<Event> = events.iter().filter(|e| matches(&w.spec, e)).map(|e| shape(&w.spec, e)).collect();
            w.next_rev = revision + 1;
            if !evs.is_empty() {
                out.push(Output {
                    stream: *stream,
                    reply: Reply::Events { watch_id: *watch_id, events: evs, revision },
                });
            }
        }
        out
    }

    /// The key space entered a new revision epoch, whose first revision is `revision` (a region
    /// failover): every watcher is cancelled with that revision as its compact revision, so etcd's
    /// clients take it as a compaction (re-read, then watch again from the new revision), and
    /// with a reason that says why.
    pub fn enter_epoch(&mut self, revision: Rev) -> Vec<Output> {
        let reason = format!(
            "geolock: the cluster entered revision epoch {} after a region failover; re-read and watch again",
            crate::kv::epoch_of(revision)
        );
        let all = std::mem::take(&mut self.watchers);
        all.into_keys()
            .map(|(stream, watch_id)| Output {
                stream,
                reply: Reply::Canceled { watch_id, reason: reason.clone(), compact_revision: revision, created: false },
            })
            .collect()
    }

    /// The reply for `watch_id` could not be queued: resend from `from_rev` by catching up.
    pub fn unsync(&mut self, stream: StreamId, watch_id: i64, from_rev: Rev) {
        if let Some(w) = self.watchers.get_mut(&(stream, watch_id)) {
            w.synced = false;
            w.next_rev = w.next_rev.min(from_rev);
        }
    }

    /// The next message for each unsynced watcher of `stream`, from history: a batch of events,
    /// or a cancel if its next revision was compacted. A watcher with nothing more to send
    /// becomes synced. Deliver the outputs in order; on a failed delivery call [`Hub::unsync`].
    pub fn catch_up(&mut self, stream: StreamId, kv: &Mvcc) -> Vec<Output> {
        let current = kv.current_rev();
        let mut out = Vec::new();
        let mut canceled = Vec::new();
        for ((_, watch_id), w) in self.watchers.range_mut((stream, i64::MIN)..=(stream, i64::MAX)) {
            if w.synced {
                continue;
            }
            if w.next_rev < kv.compact_rev() {
                canceled.push(*watch_id);
                out.push(Output {
                    stream,
                    reply: Reply::Canceled {
                        watch_id: *watch_id,
                        // etcd 3.4 says it with the compact revision alone (its clients
                        // look at that), and no reason.
                        reason: String::new(),
                        compact_revision: kv.compact_rev(),
                        created: false,
                    },
                });
                continue;
            }
            let evs: Vec<Event> = kv
                .history(&w.spec.key, &w.spec.range_end, w.next_rev, current, WATCH_EVENTS_PER_RESPONSE_MAX)
                .into_iter()
                .filter(|e| matches(&w.spec, e))
                .map(|e| shape(&w.spec, &e))
                .collect();
            let sent_to = match evs.last() {
                // History stops at a whole revision; if it was cut, the next batch starts after.
                Some(last) if evs.len() >= WATCH_EVENTS_PER_RESPONSE_MAX => last.kv.mod_revision,
                _ => current,
            };
            w.next_rev = w.next_rev.max(sent_to + 1);
            w.synced = w.next_rev > current;
            if !evs.is_empty() {
                out.push(Output {
                    stream,
                    reply: Reply::Events { watch_id: *watch_id, events: evs, revision: current },
                });
            }
        }
        for id in canceled {
            self.watchers.remove(&(stream, id));
        }
        if let Some(st) = self.streams.get_mut(&stream) {
            if st.progress_deferred
                && !self.watchers.range((stream, i64::MIN)..=(stream, i64::MAX)).any(|(_, w)| !w.synced)
            {
                st.progress_deferred = false;
                out.push(Output { stream, reply: Reply::Progress { watch_id: NO_WATCH_ID, revision: current } });
            }
        }
        out
    }

    /// A client's progress request: answered at once if every watcher of the stream is synced,
    /// else as soon as they are.
    pub fn request_progress(&mut self, stream: StreamId, kv: &Mvcc) -> Option<Output> {
        if self.has_unsynced(stream) {
            self.streams.entry(stream).or_default().progress_deferred = true;
            return None;
        }
        Some(Output { stream, reply: Reply::Progress { watch_id: NO_WATCH_ID, revision: kv.current_rev() } })
    }

    /// Periodic progress notifications for synced watchers that asked for them.
    pub fn progress_tick(&self, kv: &Mvcc) -> Vec<Output> {
        self.watchers
            .iter()
            .filter(|(_, w)| w.synced && w.spec.progress_notify)
            .map(|((stream, watch_id), _)| Output {
                stream: *stream,
                reply: Reply::Progress { watch_id: *watch_id, revision: kv.current_rev() },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{PutRequest, WriteEffects};
    use crate::storage::WriteBatch;

    fn put(kv: &mut Mvcc, k: &str) -> (Rev, Vec<Event>) {
        let mut b = WriteBatch::default();
        let mut fx = WriteEffects::default();
        kv.put(&PutRequest { key: k.into(), value: b"v".to_vec(), ..Default::default() }, &mut b, &mut fx).unwrap();
        (kv.finish(&mut b), fx.events)
    }

    fn revs(out: &[Output]) -> Vec<Rev> {
        out.iter()
            .flat_map(|o| match &o.reply {
                Reply::Events { events, .. } => events.iter().map(|e| e.kv.mod_revision).collect(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn a_new_epoch_cancels_every_watcher_as_compacted_and_says_why() {
        let mut kv = Mvcc::new();
        let mut hub = Hub::new();
        put(&mut kv, "a"); // 2
        for stream in [1, 2] {
            let spec = WatchSpec { key: b"a".to_vec(), ..Default::default() };
            assert!(matches!(hub.create(stream, spec, &kv).reply, Reply::Created { .. }));
        }
        let first = kv.enter_epoch(3, &mut WriteBatch::default()).unwrap();
        let reason = "geolock: the cluster entered revision epoch 3 after a region failover; re-read and watch again";
        let canceled = |stream| Output {
            stream,
            reply: Reply::Canceled { watch_id: 0, reason: reason.into(), compact_revision: 3 << 40, created: false },
        };
        assert_eq!(hub.enter_epoch(first), vec![canceled(1), canceled(2)]);
        assert!(hub.is_empty());
        // Watching again from the revision the client last saw is refused as compacted.
        let again = WatchSpec { key: b"a".to_vec(), start_revision: 3, ..Default::default() };
        hub.create(1, again, &kv);
        let out = hub.catch_up(1, &kv);
        assert!(matches!(out[0].reply, Reply::Canceled { compact_revision, .. } if compact_revision == 3 << 40));
    }

    #[test]
    fn a_watcher_from_the_past_catches_up_then_follows_live_without_gap_or_duplicate() {
        let mut kv = Mvcc::new();
        let mut hub = Hub::new();
        put(&mut kv, "a/1"); // 2
        put(&mut kv, "b"); // 3
        put(&mut kv, "a/2"); // 4
        let spec =
            WatchSpec { key: b"a/".to_vec(), range_end: b"a0".to_vec(), start_revision: 2, ..Default::default() };
        let created = hub.create(1, spec, &kv);
        assert_eq!(created.reply, Reply::Created { watch_id: 0, revision: 4 });
        // Writes that land before the catch-up are not sent live to an unsynced watcher...
        let (r, ev) = put(&mut kv, "a/3"); // 5
        assert!(hub.on_apply(&ev, r).is_empty());
        // ...but come with the history.
        assert_eq!(revs(&hub.catch_up(1, &kv)), vec![2, 4, 5]);
        assert!(!hub.has_unsynced(1));
        let (r, ev) = put(&mut kv, "a/4"); // 6
        assert_eq!(revs(&hub.on_apply(&ev, r)), vec![6]);
    }

    #[test]
    fn a_full_queue_falls_back_to_history() {
        let mut kv = Mvcc::new();
        let mut hub = Hub::new();
        hub.create(1, WatchSpec { key: b"k".to_vec(), ..Default::default() }, &kv);
        assert!(hub.catch_up(1, &kv).is_empty());
        let (r, ev) = put(&mut kv, "k"); // 2, delivery fails
        assert_eq!(revs(&hub.on_apply(&ev, r)), vec![2]);
        hub.unsync(1, 0, 2);
        let (r, ev) = put(&mut kv, "k"); // 3
        assert!(hub.on_apply(&ev, r).is_empty());
        assert_eq!(revs(&hub.catch_up(1, &kv)), vec![2, 3]);
    }

    #[test]
    fn compacted_start_is_canceled_with_the_compact_revision() {
        let mut kv = Mvcc::new();
        let mut hub = Hub::new();
        put(&mut kv, "k");
        put(&mut kv, "k");
        kv.compact(3, &mut WriteBatch::default()).unwrap();
        hub.create(1, WatchSpec { key: b"k".to_vec(), start_revision: 2, ..Default::default() }, &kv);
        let out = hub.catch_up(1, &kv);
        assert!(matches!(out[0].reply, Reply::Canceled { watch_id: 0, compact_revision: 3, .. }));
        assert!(hub.is_empty());
    }

    #[test]
    fn filters_ids_and_progress() {
        let mut kv = Mvcc::new();
        let mut hub = Hub::new();
        let spec = WatchSpec { key: b"k".to_vec(), no_put: true, watch_id: 7, ..Default::default() };
        assert_eq!(hub.create(1, spec.clone(), &kv).reply, Reply::Created { watch_id: 7, revision: 1 });
        assert!(matches!(hub.create(1, spec, &kv).reply, Reply::Canceled { watch_id: NO_WATCH_ID, created: true, .. }));
        assert_eq!(hub.request_progress(1, &kv), None, "deferred while unsynced");
        let out = hub.catch_up(1, &kv);
        assert_eq!(out[0].reply, Reply::Progress { watch_id: NO_WATCH_ID, revision: 1 });
        let (r, ev) = put(&mut kv, "k");
        assert!(hub.on_apply(&ev, r).is_empty(), "puts filtered");
        assert!(hub.cancel(1, 7).is_some());
        assert!(hub.cancel(1, 7).is_none());
    }
}
