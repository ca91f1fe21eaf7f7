//! openraft's state machine, over [`geolock_core::machine::Machine`]: applies committed entries to the
//! key space and leases, stores them (unsynced: the log is the durable copy), and hands the
//! events to the watch hub while still holding the state lock, so watchers see writes in order.
//!
//! On a witness the same state machine keeps only the last applied log id and the membership,
//! and its snapshots carry no data: zero bytes, which no data-bearing member installs.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StoredMembership};
use tokio::sync::mpsc::{self, error::TrySendError};

use super::format::{decode, encode, SnapshotData};
use super::{now_ms, TypeConfig};
use geolock_core::lock::{LockQueues, WaiterId};
use geolock_core::machine::{Applied, Machine, Response};
use geolock_core::storage::{Cf, Engine, WriteBatch};
use geolock_core::watch::{Hub, Output, Reply, StreamId};

type TC = TypeConfig;

pub(super) const APPLIED: &[u8] = b"raft/applied";
const MEMBERSHIP: &[u8] = b"raft/membership";

/// etcd's backend commit latency: here each applied entry's batch written to the engine.
/// etcd's buckets: 1 ms doubling to 8.192 s.
pub(super) static BACKEND_COMMIT_SECONDS: std::sync::LazyLock<prometheus::Histogram> = std::sync::LazyLock::new(|| {
    crate::metrics::histogram(
        "etcd_disk_backend_commit_duration_seconds",
        "Latency of writing an applied entry's changes to the storage engine.",
        crate::metrics::exponential(0.001, 2.0, 14),
    )
});

/// Everything the apply path and the readers share, behind one lock.
pub struct SmState {
    pub machine: Machine,
    pub hub: Hub,
    pub streams: HashMap<StreamId, mpsc::Sender<Reply>>,
    /// Lock and election queues with waiters on this node, and how to wake each waiter.
    pub locks: LockQueues,
    pub lock_waiters: HashMap<WaiterId, tokio::sync::oneshot::Sender<LockWake>>,
    pub last_applied: Option<LogIdOf<TC>>,
    pub membership: StoredMembershipOf<TC>,
    /// Set, with this lock held, when PROMOTE rewrites the member's storage: openraft's state
    /// machine worker outlives `Raft::shutdown` by the commands it had queued, and an entry it
    /// applied after the rewrite would mark as applied the index the new cluster's first entry
    /// takes. Nothing is applied or installed once sealed.
    pub sealed: bool,
}

/// What a lock waiter is woken with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockWake {
    /// Its key is the oldest: it holds the lock (or leads the election).
    Holding,
    /// Its key was deleted before that (lease expired or revoked, or unlocked).
    Lost,
}

impl SmState {
    /// Wake the lock waiters these events settled.
    fn wake_lock_waiters(&mut self, events: &[geolock_core::kv::Event]) {
        let woken = self.locks.on_events(events);
        for (ids, how) in [(woken.holding, LockWake::Holding), (woken.lost, LockWake::Lost)] {
            for id in ids {
                if let Some(tx) = self.lock_waiters.remove(&id) {
                    let _ = tx.send(how);
                }
            }
        }
    }

    /// End every watch stream and lock wait of this member's clients (a fenced member does, so
    /// they reconnect, through DNS, to the new primary).
    pub fn close_client_streams(&mut self) {
        for (stream, _) in self.streams.drain() {
            self.hub.close_stream(stream);
        }
        self.lock_waiters.clear();
    }

    /// Queue replies to their streams. A watcher whose events do not fit falls back to catching
    /// up; a stream that cannot take a control reply is closed (its client reconnects and resumes).
    pub fn deliver(&mut self, outputs: Vec<Output>) {
        for o in outputs {
            let Some(tx) = self.streams.get(&o.stream) else { continue };
            match tx.try_send(o.reply) {
                Ok(()) => {}
                Err(TrySendError::Full(Reply::Events { watch_id, events, .. })) => {
                    let from = events.first().map_or(i64::MAX, |e| e.kv.mod_revision);
                    self.hub.unsync(o.stream, watch_id, from);
                }
                Err(_) => {
                    self.streams.remove(&o.stream);
                    self.hub.close_stream(o.stream);
                }
            }
        }
    }
}

/// The shared handle.
pub struct Shared {
    state: Mutex<SmState>,
    pub(super) engine: Arc<dyn Engine>,
    snapshot_dir: PathBuf,
    /// A witness applies nothing to the key space.
    witness: bool,
    /// The simple tokens applied Authenticate entries made (their own lock, taken inside the
    /// state lock on apply and alone by requests).
    pub tokens: crate::auth::SimpleTokens,
}

impl Shared {
    /// Load the state machine from storage (a witness's keeps no key space).
    pub fn open(
        engine: Arc<dyn Engine>,
        snapshot_dir: PathBuf,
        witness: bool,
        tokens: crate::auth::SimpleTokens,
    ) -> io::Result<Arc<Shared>> {
        let machine = Machine::load(&*engine).map_err(io::Error::other)?;
        let last_applied = read_meta::<Option<LogIdOf<TC>>>(&*engine, APPLIED)?.flatten();
        let membership = read_meta(&*engine, MEMBERSHIP)?.unwrap_or_default();
        std::fs::create_dir_all(&snapshot_dir)?;
        Ok(Arc::new(Shared {
            state: Mutex::new(SmState {
                machine,
                hub: Hub::new(),
                streams: HashMap::new(),
                locks: LockQueues::new(),
                lock_waiters: HashMap::new(),
                last_applied,
                membership,
                sealed: false,
            }),
            engine,
            snapshot_dir,
            witness,
            tokens,
        }))
    }

    /// Lock the state. Never held across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, SmState> {
        self.state.lock().expect("state lock poisoned: a panic while applying")
    }

    /// Keep the simple tokens in step with an applied client command: an Authenticate's token
    /// gets the entry's index appended and is registered; a user deleted or given a new password
    /// loses their tokens, and turning authentication off forgets them all (etcd's token
    /// provider does each of these).
    fn track_tokens(&self, cmd: &geolock_core::machine::Command, done: &mut Response, index: u64) {
        use geolock_core::auth::AuthRequest;
        use geolock_core::machine::Command;
        if let Response::Authenticated { user, token } = done {
            token.push_str(&format!(".{index}"));
            self.tokens.assign(token.clone(), user.clone(), std::time::Instant::now());
            return;
        }
        let Command::Client { request, .. } = cmd else { return };
        match &**request {
            Command::Auth(AuthRequest::UserDelete { name } | AuthRequest::UserChangePassword { name, .. }) => {
                self.tokens.invalidate_user(name)
            }
            Command::Auth(AuthRequest::Disable) => self.tokens.clear(),
            _ => {}
        }
    }

    /// Bytes the engine holds.
    pub fn db_size_bytes(&self) -> u64 {
        self.engine.size_bytes()
    }

    /// The file openraft's current snapshot is kept in.
    pub(super) fn snapshot_file(&self) -> PathBuf {
        self.snapshot_dir.join("current")
    }
}

fn read_meta<T: serde::de::DeserializeOwned>(engine: &dyn Engine, key: &[u8]) -> io::Result<Option<T>> {
    match engine.get(Cf::SmMeta, key).map_err(io::Error::other)? {
        Some(b) => Ok(Some(decode(&b)?)),
        None => Ok(None),
    }
}

const SNAPSHOT_CFS: [Cf; 4] = [Cf::Kv, Cf::Lease, Cf::SmMeta, Cf::Auth];

/// The openraft state machine: a handle on [`Shared`].
#[derive(Clone)]
pub struct StateMachine {
    pub shared: Arc<Shared>,
}

impl StateMachine {
    fn snapshot_path(&self) -> PathBuf {
        self.shared.snapshot_file()
    }
}

impl RaftSnapshotBuilder<TC> for StateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TC, Vec<u8>>, io::Error> {
        // Off the runtime thread, and with the state lock held only while the storage snapshot
        // is taken: scanning a large key space under the lock stalled every apply, and every
        // client with it, for as long as the scan took.
        let shared = self.shared.clone();
        let path = self.snapshot_path();
        if shared.witness {
            let meta = {
                let st = shared.lock();
                SnapshotMeta { last_log_id: st.last_applied, last_membership: st.membership.clone() }
            };
            save_snapshot_file(&path, &meta, &[])?;
            return Ok(Snapshot { meta, snapshot: Vec::new() });
        }
        let build = move || -> io::Result<SnapshotOf<TC, Vec<u8>>> {
            let mut held = Some(shared.lock());
            let mut meta = None;
            let scanned = shared
                .engine
                .scan_at_instant(&SNAPSHOT_CFS, &mut || {
                    if let Some(st) = held.take() {
                        meta =
                            Some(SnapshotMeta { last_log_id: st.last_applied, last_membership: st.membership.clone() });
                    }
                })
                .map_err(io::Error::other)?;
            let meta = meta.expect("the scan calls back at its instant");
            let data = encode(&SnapshotData::new(scanned));
            save_snapshot_file(&path, &meta, &data)?;
            Ok(Snapshot { meta, snapshot: data })
        };
        tokio::task::spawn_blocking(build).await.map_err(io::Error::other)?
    }
}

fn save_snapshot_file(path: &std::path::Path, meta: &SnapshotMetaOf<TC>, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&encode(&(meta, data)))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn sealed() -> io::Error {
    io::Error::other("the state machine is sealed: this member is being promoted to seed a new cluster")
}

impl RaftStateMachine<TC> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogIdOf<TC>>, StoredMembershipOf<TC>), io::Error> {
        let st = self.shared.lock();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TC>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let applied = {
                let mut st = self.shared.lock();
                let st = &mut *st;
                if st.sealed {
                    return Err(sealed());
                }
                let mut batch = WriteBatch::default();
                let mut events = Vec::new();
                let applied = match entry.payload {
                    EntryPayload::Normal(cmd) if self.shared.witness => {
                        let mut result = st.machine.apply_auth_only(&cmd, &mut batch);
                        if let Ok(done) = &mut result {
                            self.shared.track_tokens(&cmd, done, entry.log_id.index);
                        }
                        Applied { revision: 0, result }
                    }
                    EntryPayload::Normal(cmd) => {
                        let mut applied = st.machine.apply(&cmd, now_ms(), &mut batch, &mut events);
                        if let Ok(done) = &mut applied.result {
                            super::metrics::count_mvcc(done);
                            self.shared.track_tokens(&cmd, done, entry.log_id.index);
                        }
                        applied
                    }
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembership::new(Some(entry.log_id), m);
                        batch.put(Cf::SmMeta, MEMBERSHIP, encode(&st.membership));
                        Applied { revision: st.machine.kv.current_rev(), result: Ok(Response::Nothing) }
                    }
                    EntryPayload::Blank => {
                        Applied { revision: st.machine.kv.current_rev(), result: Ok(Response::Nothing) }
                    }
                };
                st.last_applied = Some(entry.log_id);
                batch.put(Cf::SmMeta, APPLIED, encode(&st.last_applied));
                let timer = BACKEND_COMMIT_SECONDS.start_timer();
                self.shared.engine.write(batch, false).map_err(io::Error::other)?;
                timer.observe_duration();
                if !events.is_empty() {
                    st.wake_lock_waiters(&events);
                    let out = st.hub.on_apply(&events, applied.revision);
                    st.deliver(out);
                }
                if applied.result == Ok(Response::EnterEpoch) {
                    let out = st.hub.enter_epoch(applied.revision);
                    st.deliver(out);
                }
                applied
            };
            if let Some(r) = responder {
                r.send(applied);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMetaOf<TC>, snapshot: Vec<u8>) -> Result<(), io::Error> {
        // Each write to the engine below is made under the lock a promotion seals the state
        // machine with, and only while it is not sealed.
        if self.shared.witness {
            let mut st = self.shared.lock();
            if st.sealed {
                return Err(sealed());
            }
            // Of the data that came with it, a witness keeps the auth store only (it checks
            // who may change the membership), and the metadata. A snapshot without data (from
            // a build that sent none to witnesses) leaves the auth store it has: wiping it
            // would turn authentication off here.
            let mut b = WriteBatch::default();
            if !snapshot.is_empty() {
                b.delete_range(Cf::Auth, Vec::new(), vec![0xff; 64]);
                let data: SnapshotData = decode(&snapshot)?;
                for (cf, pairs) in data.into_families()? {
                    if cf == Cf::Auth {
                        pairs.into_iter().for_each(|(k, v)| b.put(cf, k, v));
                    }
                }
            }
            b.put(Cf::SmMeta, APPLIED, encode(&meta.last_log_id));
            b.put(Cf::SmMeta, MEMBERSHIP, encode(&meta.last_membership));
            self.shared.engine.write(b, true).map_err(io::Error::other)?;
            save_snapshot_file(&self.snapshot_path(), meta, &[])?;
            st.machine = Machine::load(&*self.shared.engine).map_err(io::Error::other)?;
            self.shared.tokens.clear();
            st.last_applied = meta.last_log_id;
            st.membership = meta.last_membership.clone();
            return Ok(());
        }
        // The peer transport refuses a witness's data-less snapshot before it gets here; this
        // is the last line, because installing it would erase the key space.
        if snapshot.is_empty() {
            return Err(io::Error::other(
                "a snapshot without data (a witness's) cannot be installed on a data-bearing member",
            ));
        }
        let data: SnapshotData = decode(&snapshot)?;
        let mut b = WriteBatch::default();
        for cf in SNAPSHOT_CFS {
            b.delete_range(cf, Vec::new(), vec![0xff; 64]);
        }
        for (cf, pairs) in data.into_families()? {
            if !SNAPSHOT_CFS.contains(&cf) {
                return Err(io::Error::other(format!(
                    "a snapshot holds column family {}, which snapshots never hold",
                    cf.name()
                )));
            }
            for (k, v) in pairs {
                b.put(cf, k, v);
            }
        }
        b.put(Cf::SmMeta, APPLIED, encode(&meta.last_log_id));
        b.put(Cf::SmMeta, MEMBERSHIP, encode(&meta.last_membership));
        {
            let st = self.shared.lock();
            if st.sealed {
                return Err(sealed());
            }
            self.shared.engine.write(b, true).map_err(io::Error::other)?;
        }
        save_snapshot_file(&self.snapshot_path(), meta, &snapshot)?;
        let machine = Machine::load(&*self.shared.engine).map_err(io::Error::other)?;
        let mut st = self.shared.lock();
        st.machine = machine;
        // The users and passwords may all have changed: every client authenticates again.
        self.shared.tokens.clear();
        st.last_applied = meta.last_log_id;
        st.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TC, Vec<u8>>>, io::Error> {
        match std::fs::read(self.snapshot_path()) {
            Ok(bytes) => {
                let (meta, data): (SnapshotMetaOf<TC>, Vec<u8>) = decode(&bytes)?;
                Ok(Some(Snapshot { meta, snapshot: data }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}
