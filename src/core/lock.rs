//! Lock queues: for each lock prefix (`name/`) that someone waits on, the live keys under it in
//! FIFO order of their create revision, and who waits for which key to become the oldest.
//!
//! The key layout is etcd's lock and election recipe (`name/<lease id in hex>`, the oldest key
//! holds), so `etcdctl lock`, `etcdctl elect` and native callers share one queue. The queue is
//! derived from the key space: built from it when the first waiter of a prefix arrives, then kept
//! up to date from the applied events, and dropped when its last waiter leaves. A delete that
//! makes a waiter's key the oldest wakes exactly that waiter, in the apply of the delete: no
//! polling, no watch, no herd. Each event costs one map look-up per `/` in its key and an
//! ordered-map update; waking the next holder does not depend on the queue's length.
//!
//! Pure: no clock, no tokio; waiters are opaque IDs the caller maps to its own channels.

use std::collections::{BTreeMap, HashMap};

use crate::kv::{Event, EventKind, Mvcc, RangeRequest, Rev};

/// Identifies one waiting caller.
pub type WaiterId = u64;

#[derive(Debug, Default)]
struct Queue {
    /// Live keys under the prefix by create revision: the first one holds.
    keys: BTreeMap<Rev, Vec<u8>>,
    /// Waiters by the create revision of their key.
    waiters: HashMap<Rev, Vec<WaiterId>>,
}

impl Queue {
    fn head(&self) -> Option<Rev> {
        self.keys.keys().next().copied()
    }
}

/// Every lock prefix with waiters.
#[derive(Debug, Default)]
pub struct LockQueues {
    queues: HashMap<Vec<u8>, Queue>,
}

/// The prefix every key of lock (or election) `name` lives under.
pub fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// The key lease `lease` holds or waits with in lock `name`: `name/<lease hex>`, as etcd's.
pub fn key_of(name: &[u8], lease: i64) -> Vec<u8> {
    let mut k = prefix_of(name);
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

/// The end of the range of keys that start with `prefix` (etcd's `WithPrefix`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The oldest live key under `prefix`: the holder of the lock, the leader of the election.
pub fn holder(kv: &Mvcc, prefix: &[u8]) -> Option<crate::kv::KeyValue> {
    let all = RangeRequest { key: prefix.to_vec(), range_end: prefix_end(prefix), ..Default::default() };
    // One pass over the prefix; only the oldest is kept.
    let r = kv.range(&all).ok()?;
    r.kvs.into_iter().min_by_key(|kv| kv.create_revision)
}

/// A lock (or election leadership) confirmed held: what a caller may be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The create revision of the holder's key: the fencing token.
    pub token: Rev,
    /// A revision at which the key existed with that create revision as the oldest under its
    /// prefix; the response header carries it.
    pub revision: Rev,
}

/// Confirm that `key`, created at `rev`, holds at the state `kv` has applied: it still exists
/// with that create revision. Being woken as the head of the queue is not enough: the entry
/// applied right after the wake can delete the key (its lease expired while its holder was cut
/// off, two leases expired in one tick), and a caller told it holds would then run beside the
/// real holder with token 0. etcd's lock recipe re-reads the key after waiting for the same
/// reason. The key that was oldest stays oldest while it exists (create revisions only grow),
/// so existence at a later revision is holding at it.
pub fn confirm(kv: &Mvcc, key: &[u8], rev: Rev) -> Option<Grant> {
    let live = kv.get(key)?;
    (live.create_revision == rev).then(|| Grant { token: rev, revision: kv.current_rev() })
}

impl LockQueues {
    /// No queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of waiters, over all prefixes.
    #[cfg(test)]
    fn waiters(&self) -> usize {
        self.queues.values().map(|q| q.waiters.values().map(Vec::len).sum::<usize>()).sum()
    }

    /// The `max` longest queues among the prefixes with waiters here: each prefix with its
    /// keys (holder and every waiter, whichever member they wait on), longest first, then by
    /// prefix.
    pub fn longest(&self, max: usize) -> Vec<(Vec<u8>, usize)> {
        let mut all: Vec<(Vec<u8>, usize)> = self.queues.iter().map(|(p, q)| (p.clone(), q.keys.len())).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(max);
        all
    }

    /// `waiter` waits until the key created at `rev` is the oldest under `prefix`. Registers it
    /// only if the answer is [`Wait::Queued`].
    pub fn wait(&mut self, prefix: &[u8], rev: Rev, waiter: WaiterId, kv: &Mvcc) -> Wait {
        let q = self.queues.entry(prefix.to_vec()).or_insert_with(|| {
            let all = RangeRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                keys_only: true,
                ..Default::default()
            };
            let keys = kv.range(&all).map(|r| r.kvs).unwrap_or_default();
            Queue { keys: keys.into_iter().map(|k| (k.create_revision, k.key)).collect(), waiters: HashMap::new() }
        });
        let outcome = if q.head() == Some(rev) {
            Wait::Holding
        } else if !q.keys.contains_key(&rev) {
            Wait::Gone
        } else {
            q.waiters.entry(rev).or_default().push(waiter);
            Wait::Queued
        };
        if q.waiters.is_empty() {
            self.queues.remove(prefix);
        }
        outcome
    }

    /// A waiter gave up.
    pub fn cancel(&mut self, prefix: &[u8], rev: Rev, waiter: WaiterId) {
        let Some(q) = self.queues.get_mut(prefix) else { return };
        if let Some(ws) = q.waiters.get_mut(&rev) {
            ws.retain(|w| *w != waiter);
            if ws.is_empty() {
                q.waiters.remove(&rev);
            }
        }
        if q.waiters.is_empty() {
            self.queues.remove(prefix);
        }
    }

    /// Follow applied events; return the waiters whose key became the oldest (they hold now)
    /// and those whose key was deleted before it got there (they lost their place).
    pub fn on_events(&mut self, events: &[Event]) -> Woken {
        let mut woken = Woken::default();
        if self.queues.is_empty() {
            return woken;
        }
        let mut touched: Vec<Vec<u8>> = Vec::new();
        for e in events {
            let key = &e.kv.key;
            for (i, b) in key.iter().enumerate() {
                if *b != b'/' {
                    continue;
                }
                let Some(q) = self.queues.get_mut(&key[..=i]) else { continue };
                match (e.kind, &e.prev_kv) {
                    (EventKind::Put, None) => {
                        q.keys.insert(e.kv.create_revision, key.clone());
                    }
                    (EventKind::Put, Some(_)) => {}
                    (EventKind::Delete, Some(prev)) => {
                        q.keys.remove(&prev.create_revision);
                        if let Some(ws) = q.waiters.remove(&prev.create_revision) {
                            woken.lost.extend(ws);
                        }
                        touched.push(key[..=i].to_vec());
                    }
                    (EventKind::Delete, None) => {}
                }
            }
        }
        for prefix in touched {
            let Some(q) = self.queues.get_mut(&prefix) else { continue };
            if let Some(head) = q.head() {
                if let Some(ws) = q.waiters.remove(&head) {
                    woken.holding.extend(ws);
                }
            }
            if q.waiters.is_empty() {
                self.queues.remove(&prefix);
            }
        }
        woken
    }
}

/// Where a new waiter stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Its key is the oldest: it holds.
    Holding,
    /// Others are ahead; it will be woken.
    Queued,
    /// Its key no longer exists (its lease ended, or it was unlocked).
    Gone,
}

/// Waiters an apply settled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Woken {
    /// Their key is now the oldest: they hold the lock.
    pub holding: Vec<WaiterId>,
    /// Their key was deleted while they waited.
    pub lost: Vec<WaiterId>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{DeleteRangeRequest, PutRequest, WriteEffects};
    use crate::storage::WriteBatch;

    fn put(kv: &mut Mvcc, key: &[u8]) -> (Rev, Vec<Event>) {
        let mut fx = WriteEffects::default();
        let mut b = WriteBatch::default();
        kv.put(&PutRequest { key: key.to_vec(), ..Default::default() }, &mut b, &mut fx).unwrap();
        (kv.finish(&mut b), fx.events)
    }

    fn del(kv: &mut Mvcc, key: &[u8]) -> Vec<Event> {
        let mut fx = WriteEffects::default();
        let mut b = WriteBatch::default();
        kv.delete_range(&DeleteRangeRequest { key: key.to_vec(), ..Default::default() }, &mut b, &mut fx);
        kv.finish(&mut b);
        fx.events
    }

    #[test]
    fn keys_follow_etcds_recipe() {
        assert_eq!(key_of(b"/jobs/db", 0x694d77aa9e38260f), b"/jobs/db/694d77aa9e38260f".to_vec());
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }

    #[test]
    fn a_delete_wakes_exactly_the_next_waiter_in_fifo_order() {
        let mut kv = Mvcc::new();
        let mut q = LockQueues::new();
        let (r1, _) = put(&mut kv, b"L/1");
        let (r2, _) = put(&mut kv, b"L/2");
        assert_eq!(q.wait(b"L/", r1, 1, &kv), Wait::Holding);
        assert_eq!(q.wait(b"L/", r2, 2, &kv), Wait::Queued);
        // A third waiter arrives after the queue exists: its key comes from the events.
        let (r3, ev) = put(&mut kv, b"L/3");
        assert_eq!(q.on_events(&ev), Woken::default());
        assert_eq!(q.wait(b"L/", r3, 3, &kv), Wait::Queued);
        // Unrelated keys, even with a common start, change nothing.
        let (_, ev) = put(&mut kv, b"Lx/1");
        assert_eq!(q.on_events(&ev), Woken::default());
        assert_eq!(q.on_events(&del(&mut kv, b"L/1")), Woken { holding: vec![2], lost: vec![] });
        assert_eq!(q.on_events(&del(&mut kv, b"L/2")), Woken { holding: vec![3], lost: vec![] });
        assert_eq!(q.waiters(), 0);
        assert!(q.queues.is_empty(), "a queue without waiters is dropped");
    }

    /// Keys L/1, L/2 and L/3 created in that order: L/1 holds, waiters 2 and 3 queue behind it.
    fn a_holder_and_two_waiters() -> (Mvcc, LockQueues, [Rev; 3]) {
        let mut kv = Mvcc::new();
        let mut q = LockQueues::new();
        let (r1, _) = put(&mut kv, b"L/1");
        let (r2, _) = put(&mut kv, b"L/2");
        let (r3, _) = put(&mut kv, b"L/3");
        assert_eq!(q.wait(b"L/", r2, 2, &kv), Wait::Queued);
        assert_eq!(q.wait(b"L/", r3, 3, &kv), Wait::Queued);
        (kv, q, [r1, r2, r3])
    }

    #[test]
    fn a_waiter_whose_key_goes_loses_its_place_and_the_queue_moves_on() {
        let (mut kv, mut q, [r1, _, _]) = a_holder_and_two_waiters();
        assert_eq!(q.on_events(&del(&mut kv, b"L/2")), Woken { holding: vec![], lost: vec![2] });
        assert_eq!(q.on_events(&del(&mut kv, b"L/1")), Woken { holding: vec![3], lost: vec![] });
        assert_eq!(q.wait(b"L/", r1, 1, &kv), Wait::Gone);
    }

    /// Fault 1 of issue 11: a waiter reaches the head of the queue in one entry, and the next
    /// entry deletes its key (its lease was revoked during a catch-up). The wake alone must not
    /// be taken for a grant: the confirmation at the later state refuses it, and the next
    /// waiter is the one that holds, with a greater token.
    #[test]
    fn a_waiter_woken_at_the_head_whose_key_goes_in_the_next_entry_is_not_granted() {
        let (mut kv, mut q, [r1, r2, r3]) = a_holder_and_two_waiters();
        // Entry N: the holder unlocks; waiter 2 is woken at the head, and holds at N.
        assert_eq!(q.on_events(&del(&mut kv, b"L/1")), Woken { holding: vec![2], lost: vec![] });
        assert_eq!(confirm(&kv, b"L/2", r2), Some(Grant { token: r2, revision: kv.current_rev() }));
        // Entry N+1, applied before waiter 2's answer is sent: its lease ends.
        assert_eq!(q.on_events(&del(&mut kv, b"L/2")), Woken { holding: vec![3], lost: vec![] });
        assert_eq!(confirm(&kv, b"L/2", r2), None, "a key gone by the time of the answer grants nothing");
        let grant = confirm(&kv, b"L/3", r3).expect("waiter 3 holds");
        assert!(grant.token > r2 && grant.revision == kv.current_rev());
        // A key of the same name created again is another holder, not the old one.
        let (r2b, _) = put(&mut kv, b"L/2");
        assert_eq!(confirm(&kv, b"L/2", r2), None);
        assert!(r2b > r3 && r1 < r2);
    }

    #[test]
    fn nested_keys_queue_under_every_enclosing_prefix() {
        let mut kv = Mvcc::new();
        let mut q = LockQueues::new();
        let (_, _) = put(&mut kv, b"a/b/1");
        let (rc, _) = put(&mut kv, b"a/b/c/1");
        let (rw, _) = put(&mut kv, b"a/b/2");
        assert_eq!(q.wait(b"a/b/", rw, 9, &kv), Wait::Queued);
        assert_eq!(q.wait(b"a/b/c/", rc, 8, &kv), Wait::Holding);
        assert_eq!(q.on_events(&del(&mut kv, b"a/b/1")), Woken::default(), "a/b/c/1 is still ahead");
        assert_eq!(q.on_events(&del(&mut kv, b"a/b/c/1")), Woken { holding: vec![9], lost: vec![] });
    }

    #[test]
    fn the_longest_queues_come_first_and_count_every_key() {
        let mut kv = Mvcc::new();
        let mut q = LockQueues::new();
        let (a1, _) = put(&mut kv, b"a/1");
        let (a2, _) = put(&mut kv, b"a/2");
        let (_, _) = put(&mut kv, b"b/1");
        let (b2, _) = put(&mut kv, b"b/2");
        let (b3, _) = put(&mut kv, b"b/3");
        let (_, _) = put(&mut kv, b"c/1");
        assert_eq!(q.wait(b"a/", a1, 1, &kv), Wait::Holding, "a holder is not queued");
        assert!(q.longest(5).is_empty());
        assert_eq!(q.wait(b"a/", a2, 2, &kv), Wait::Queued);
        assert_eq!(q.wait(b"b/", b2, 3, &kv), Wait::Queued);
        assert_eq!(q.wait(b"b/", b3, 4, &kv), Wait::Queued);
        assert_eq!(q.longest(5), vec![(b"b/".to_vec(), 3), (b"a/".to_vec(), 2)]);
        assert_eq!(q.longest(1), vec![(b"b/".to_vec(), 3)]);
        q.on_events(&del(&mut kv, b"b/1"));
        assert_eq!(q.longest(5), vec![(b"a/".to_vec(), 2), (b"b/".to_vec(), 2)]);
    }
}
