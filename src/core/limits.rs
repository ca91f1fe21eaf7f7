//! Every bound geolock enforces, in one place.
//!
//! Names end in `_max` (or `_min`) and carry their unit last. Where etcd has the same bound we use
//! its default, so a client tuned for etcd never meets a tighter limit here. Relations between
//! bounds are checked at compile time at the bottom of this file.

/// Largest encoded client request accepted by the gRPC server (etcd's `--max-request-bytes`).
pub const REQUEST_BYTES_MAX: usize = 1536 * 1024;

/// Largest gRPC message we send or accept at the transport level; etcd allows a little over the
/// request limit so that the request check, not the codec, produces the error.
pub const GRPC_MESSAGE_BYTES_MAX: usize = REQUEST_BYTES_MAX + 512 * 1024;

/// Largest key, in bytes.
pub const KEY_BYTES_MAX: usize = 32 * 1024;

/// Largest value, in bytes. A put also has to fit in `REQUEST_BYTES_MAX` with its key.
pub const VALUE_BYTES_MAX: usize = REQUEST_BYTES_MAX;

/// Operations in one Txn, counting both branches and nested Txns (etcd's `--max-txn-ops`).
pub const TXN_OPS_MAX: usize = 128;

/// Nesting depth of Txn inside Txn.
pub const TXN_DEPTH_MAX: usize = 8;

/// Keys returned by one Range when the client sets no limit. Beyond this the response is cut and
/// `more` is set, so one request can never build an unbounded response.
pub const RANGE_KEYS_MAX: usize = 100_000;

/// Watchers on one Watch stream.
pub const WATCHERS_PER_STREAM_MAX: usize = 1_000;

/// Watch responses queued for one stream before its watchers fall back to catching up from
/// history (they are never dropped: they become unsynced and are resent from the key space).
pub const WATCH_STREAM_QUEUE_MAX: usize = 1_024;

/// Events in one watch response sent while catching up from history.
pub const WATCH_EVENTS_PER_RESPONSE_MAX: usize = 1_000;

/// Leases that may exist at once.
pub const LEASES_MAX: usize = 1_000_000;

/// Leases revoked by one expiry proposal; the rest wait for the next tick.
pub const LEASE_EXPIRIES_PER_PROPOSAL_MAX: usize = 1_000;

/// Lease IDs requested in one TimeToLive with keys: keys listed in one response.
pub const LEASE_KEYS_LISTED_MAX: usize = 100_000;

/// Longest TTL anyone may configure as `lease.max_ttl`, in seconds (etcd's MaxLeaseTTL: 9e10 s).
pub const LEASE_TTL_S_MAX: i64 = 9_000_000_000;

/// Client write proposals waiting in the Raft pipeline of one node.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 10_000;

/// Encoded bytes of the newest log entries the log store keeps in memory to read them back.
pub const LOG_TAIL_CACHE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Log entries handed to one RocksDB write batch by the log store.
pub const LOG_APPEND_BATCH_ENTRIES_MAX: usize = 4_096;

/// Size of the whole key space kept by a data node (etcd's default backend quota).
pub const KEYSPACE_BYTES_MAX: u64 = 2 * 1024 * 1024 * 1024;

/// Largest message between peers other than a snapshot (a batch of log entries, a forwarded
/// request, a reply).
pub const PEER_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Largest snapshot a member assembles from a peer's chunks.
pub const PEER_SNAPSHOT_BYTES_MAX: usize = KEYSPACE_BYTES_MAX as usize + 64 * 1024 * 1024;

/// A snapshot travels to a peer in pieces of this size, one request each.
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// A state-machine snapshot is taken at least this often, whatever the entry count.
pub const SNAPSHOT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Share of the leader's log a learner must hold before it may be promoted (etcd's 90 %).
pub const LEARNER_IN_SYNC_PERCENT: u64 = 90;

/// How long the leader waits for a member added as a voter to catch up before it gives up
/// promoting it (it stays a learner; `lockctl member promote` can finish the job).
pub const LEARNER_CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Bytes a peer may have in flight to this node on one QUIC connection, and on one stream: with
/// many peers and large entries, what an unbounded window would let them buffer here.
pub const PEER_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
pub const PEER_STREAM_RECEIVE_WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// Largest datagram the WAN relay carries (the largest UDP payload).
pub const RELAY_DATAGRAM_BYTES_MAX: usize = 65_535;

/// Senders one relay keeps a path for; past this it forgets them all and starts again.
pub const RELAY_FLOWS_MAX: usize = 1_024;

/// Datagrams waiting out their delay on one path of the relay; more are dropped.
pub const RELAY_QUEUE_DATAGRAMS_MAX: usize = 4_096;

/// Connections one TCP relay carries at once; more are refused.
pub const RELAY_TCP_CONNECTIONS_MAX: usize = 256;

/// Largest chunk the TCP relay reads before it delays and forwards it.
pub const RELAY_TCP_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// Chunks waiting out their delay in one direction of a TCP relay's connection; the relay
/// reads no more until one leaves (TCP's own flow control then holds the sender).
pub const RELAY_TCP_QUEUE_CHUNKS_MAX: usize = 64;

/// Longest one-way latency a topology file may give a link, in milliseconds.
pub const LINK_ONE_WAY_MS_MAX: f64 = 10_000.0;

/// Members of one cluster.
pub const MEMBERS_MAX: usize = 16;

/// Largest configuration file read at start-up.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// WAL files together, in bytes, on a data-bearing member: past this RocksDB flushes the
/// memtables still holding the oldest WAL so that it retires (and is reused).
pub const WAL_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Retired WAL files kept for reuse.
pub const WAL_FILES_RECYCLED: usize = 4;

/// A witness's RocksDB memtable, in bytes: its log is purged within seconds, so a small
/// memtable bounds its memory and its WAL, whatever the size of the key space.
pub const WITNESS_WRITE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A witness's WAL files together, in bytes: past this RocksDB flushes the memtable and drops
/// the WAL behind it.
pub const WITNESS_WAL_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// A witness's block cache, shared by its column families: it reads its log tail back only to
/// lead, which it does only to hand over.
pub const WITNESS_BLOCK_CACHE_BYTES: usize = 1024 * 1024;

/// How often the leader tells witnesses how far every data-bearing voter has confirmed the log.
pub const WITNESS_PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Entries a witness may keep before the leader raises an alarm (a data voter is not
/// confirming, so the witness cannot purge).
pub const WITNESS_LOG_ENTRIES_ALARM: u64 = 100_000;

/// Election timeouts without a leader before a witness considers leading to hand over.
pub const WITNESS_TAKEOVER_ELECTION_TIMEOUTS: u32 = 3;

/// Samples of when the leader's log reached an index, kept to tell a member's lag in time; at
/// one sample per leadership tick (50 ms) this covers minutes of continuous writes.
pub const LAG_SAMPLES_MAX: usize = 8_192;

const _: () = assert!(KEY_BYTES_MAX < REQUEST_BYTES_MAX);
const _: () = assert!(VALUE_BYTES_MAX <= REQUEST_BYTES_MAX);
const _: () = assert!(GRPC_MESSAGE_BYTES_MAX > REQUEST_BYTES_MAX);
const _: () = assert!(TXN_DEPTH_MAX <= TXN_OPS_MAX);
const _: () = assert!(WATCH_EVENTS_PER_RESPONSE_MAX <= WATCH_STREAM_QUEUE_MAX);
const _: () = assert!(LEASE_EXPIRIES_PER_PROPOSAL_MAX <= LEASES_MAX);
const _: () = assert!(PEER_MESSAGE_BYTES_MAX > 2 * GRPC_MESSAGE_BYTES_MAX);
const _: () = assert!(SNAPSHOT_CHUNK_BYTES < PEER_MESSAGE_BYTES_MAX / 2);
const _: () = assert!(LEARNER_IN_SYNC_PERCENT <= 100);
const _: () = assert!(PEER_STREAM_RECEIVE_WINDOW_BYTES as usize > GRPC_MESSAGE_BYTES_MAX);
const _: () = assert!(PEER_RECEIVE_WINDOW_BYTES >= PEER_STREAM_RECEIVE_WINDOW_BYTES);

/// Distinct lock names (their first path segment) metrics keep series for; later ones share
/// the label `other`. Each name costs a few dozen series (a waiter gauge, a counter, a
/// histogram's buckets), and a name comes from any client, so without this bound a client
/// could grow the exposition without end.
pub const LOCK_METRIC_NAMES_MAX: usize = 64;

/// Finished trace spans waiting for export. A put makes four (the RPC, propose, commit, apply);
/// at the ~10 000 puts per second a node takes here, fully sampled, this is 50 ms of spans: a
/// collector that stalls longer loses spans (counted), never requests' time.
pub const TRACE_SPANS_QUEUED_MAX: usize = 2048;

/// Bounds of the OTLP metrics export interval (`otlp_metrics.interval`). Each export gathers
/// every series and sends them in one request; below a second that is load on the member and
/// the collector for no reader (OpenTelemetry's default interval is 60 s); above an hour a
/// collector would take the member for gone.
pub const OTLP_METRICS_INTERVAL_MS_MIN: u64 = 1_000;
pub const OTLP_METRICS_INTERVAL_MS_MAX: u64 = 3_600_000;
const _: () = assert!(OTLP_METRICS_INTERVAL_MS_MIN < OTLP_METRICS_INTERVAL_MS_MAX);

/// Longest user or role name, in bytes. etcd has no bound but the request size; a name is
/// stored in every token table entry and in the auth records of every member, and 256 bytes
/// is more than any directory service's account names.
pub const AUTH_NAME_BYTES_MAX: usize = 256;

/// Users and roles that may exist. The whole auth store is held in memory on every member and
/// a permission check walks one user's roles, so these bound both.
pub const AUTH_USERS_MAX: usize = 10_000;
pub const AUTH_ROLES_MAX: usize = 10_000;

/// Roles granted to one user, and permissions granted to one role: a permission check looks
/// at every permission of every role of the caller, at most their product (100 000 ranges).
pub const ROLES_PER_USER_MAX: usize = 100;
pub const PERMISSIONS_PER_ROLE_MAX: usize = 1_000;

/// Password checks and hashes waiting for a bcrypt slot on one member. Past it, Authenticate is
/// answered etcd's "too many requests" at once: at etcd's cost 10 one slot checks about 20
/// passwords a second, so a longer queue would only hand its last callers a timeout, and
/// wrong-password floods would hold real logins behind them.
pub const BCRYPT_QUEUED_MAX: usize = 256;

/// Longest password, in bytes: bcrypt reads only the first 72 (later bytes would be ignored
/// silently, so a longer password is refused instead).
pub const AUTH_PASSWORD_BYTES_MAX: usize = 72;

/// Simple tokens a member keeps at once. Each Authenticate adds one on every member and it
/// lives for the token TTL after its last use (5 minutes by default); past this bound the
/// token closest to its expiry is dropped, and its client authenticates again.
pub const SIMPLE_TOKENS_MAX: usize = 100_000;

/// Longest token life, in seconds (a year): a token's expiry is an instant, and a TTL past
/// what the clock can add would overflow it.
pub const AUTH_TOKEN_TTL_S_MAX: u64 = 365 * 24 * 3600;

const _: () = assert!(AUTH_NAME_BYTES_MAX < KEY_BYTES_MAX);
const _: () = assert!(ROLES_PER_USER_MAX * PERMISSIONS_PER_ROLE_MAX <= 100_000);
