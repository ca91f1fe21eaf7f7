//! Node configuration: built-in defaults, then a YAML or TOML file, then `GEOLOCK_*` environment
//! variables (`__` separates sections: `GEOLOCK_RAFT__ELECTION_TIMEOUT=2s`), then command-line
//! flags. Names follow etcd's flags where the two share a setting; the file layout also accepts
//! the spec's cluster example (`cluster`, `nodes`, `raft`, `lease`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use geolock_core::limits::AUTH_TOKEN_TTL_S_MAX;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config file {path}: {len} bytes is over config_file_bytes_max ({max})")]
    FileTooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config: {0}")]
    Invalid(String),
}

pub use geolock_core::member::Role;

/// PEM files of a node's peer identity (etcd's `--peer-trusted-ca-file`, `--peer-cert-file`,
/// `--peer-key-file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificates revoked by the CA (PEM CRLs): a peer presenting one is refused.
    pub crl: Option<PathBuf>,
}

/// `cluster:` section of the file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterSection {
    pub name: String,
    pub initial_cluster_state: String,
}

/// One entry of the `nodes:` list: a member's addresses, as the spec's example writes them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeEntry {
    pub name: String,
    /// Peer address, `host:port`.
    pub address: String,
    /// Client address, `host:port`.
    pub client_address: String,
    pub availability_zone: String,
}

/// `raft:` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RaftSection {
    #[serde(with = "duration_text")]
    pub election_timeout: Duration,
    #[serde(with = "duration_text")]
    pub heartbeat_interval: Duration,
    /// Entries between snapshots.
    pub snapshot_count: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            election_timeout: Duration::from_millis(1000),
            heartbeat_interval: Duration::from_millis(100),
            snapshot_count: 10_000,
        }
    }
}

/// `lease:` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeaseSection {
    #[serde(with = "duration_text")]
    pub min_ttl: Duration,
    #[serde(with = "duration_text")]
    pub max_ttl: Duration,
    #[serde(with = "duration_text")]
    pub default_ttl: Duration,
}

impl Default for LeaseSection {
    fn default() -> Self {
        LeaseSection {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(3600),
            default_ttl: Duration::from_secs(30),
        }
    }
}

/// `tracing:` section: OpenTelemetry traces over OTLP/gRPC, named as etcd 3.5's flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TracingSection {
    pub experimental_enable_distributed_tracing: bool,
    /// The collector's OTLP/gRPC `host:port` (or URL).
    pub experimental_distributed_tracing_address: String,
    pub experimental_distributed_tracing_service_name: String,
    /// `service.instance.id` of this member's spans; its name when empty.
    pub experimental_distributed_tracing_instance_id: String,
    /// Requests traced per million, when the client's trace context does not decide.
    pub experimental_distributed_tracing_sampling_rate: u32,
}

impl Default for TracingSection {
    fn default() -> Self {
        TracingSection {
            experimental_enable_distributed_tracing: false,
            experimental_distributed_tracing_address: "localhost:4317".into(),
            experimental_distributed_tracing_service_name: "geolock".into(),
            experimental_distributed_tracing_instance_id: String::new(),
            experimental_distributed_tracing_sampling_rate: 0,
        }
    }
}

/// `otlp_metrics:` section: every metric of `/metrics` pushed to an OpenTelemetry collector over
/// OTLP/gRPC (geolock's; etcd has none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OtlpMetricsSection {
    /// The collector's OTLP/gRPC `host:port` (or `http://host:port`: plain, no TLS); empty: no
    /// export.
    pub address: String,
    /// Between exports: OpenTelemetry's default (`OTEL_METRIC_EXPORT_INTERVAL`), 60 s.
    #[serde(with = "duration_text")]
    pub interval: Duration,
}

impl Default for OtlpMetricsSection {
    fn default() -> Self {
        OtlpMetricsSection { address: String::new(), interval: Duration::from_secs(60) }
    }
}

/// How much of the per-RPC gRPC metrics a member keeps (etcd's `--metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsLevel {
    /// geolock's own: no per-RPC counting at all (the other metrics stay), for measuring what
    /// the counting costs.
    Off,
    /// etcd's default: `grpc_server_{started,handled,msg_received,msg_sent}_total`.
    #[default]
    Basic,
    /// Also the `grpc_server_handling_seconds` histogram, which etcd's mixin alert
    /// `etcdGRPCRequestsSlow` reads.
    Extensive,
}

/// `watch:` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchSection {
    /// How often watchers that asked for progress notifications get one (etcd: 10 minutes).
    #[serde(with = "duration_text")]
    pub progress_notify_interval: Duration,
}

impl Default for WatchSection {
    fn default() -> Self {
        WatchSection { progress_notify_interval: Duration::from_secs(600) }
    }
}

/// `lock:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LockSection {
    /// Lock names under these prefixes are hierarchical: `/a/b/c` needs `/a/b` held by the
    /// same lease (when `/a/b` is itself under the prefix).
    pub hierarchical_prefixes: Vec<String>,
}

/// `failover:` section: the region write lease of an active-passive primary (DESIGN.md "Region
/// failover", FENCE).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FailoverSection {
    /// The vantage points' gRPC endpoints (`host:port`, comma-separated). Empty: no write lease
    /// (a cluster without a failover controller writes as ever).
    pub vantages: String,
    /// How long a leader writes on a majority of grants, from before it asked for them.
    #[serde(with = "duration_text")]
    pub write_lease: Duration,
}

impl Default for FailoverSection {
    /// The controller's default lease (`client::failover::Settings`): 10 s.
    fn default() -> Self {
        FailoverSection { vantages: String::new(), write_lease: Duration::from_secs(10) }
    }
}

/// Everything a node needs to start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// This member's name.
    pub name: String,
    /// Where the log and state live; empty means `<name>.geolock` in the working directory.
    pub data_dir: String,
    /// Comma-separated URLs to serve clients on (`http://host:port`).
    pub listen_client_urls: String,
    /// Comma-separated client URLs told to others.
    pub advertise_client_urls: String,
    /// How many gRPC metrics to keep (etcd's `--metrics`).
    pub metrics: MetricsLevel,
    /// Comma-separated `http://host:port` URLs serving `/metrics`, the health endpoints and the
    /// cluster page alone, in plain HTTP (etcd's `--listen-metrics-urls`); empty: none. The
    /// client URLs serve the same paths too.
    pub listen_metrics_urls: String,
    /// Comma-separated URLs to accept peers on; whatever the scheme, peers speak QUIC.
    pub listen_peer_urls: String,
    /// Comma-separated peer URLs told to others.
    pub initial_advertise_peer_urls: String,
    /// `name=peer-url,...` of the first members.
    pub initial_cluster: String,
    /// `new` or `existing`.
    pub initial_cluster_state: String,
    /// Client TLS, served on every `https://` client URL (etcd's `--cert-file`, `--key-file`).
    pub cert_file: String,
    pub key_file: String,
    /// The CA bundle client certificates are checked against (etcd's `--trusted-ca-file`).
    pub trusted_ca_file: String,
    /// Require a client certificate signed by `trusted_ca_file`, and take its common name as
    /// the user of a request that carries no token (etcd's `--client-cert-auth`).
    pub client_cert_auth: bool,
    /// PEM files of this member's peer identity; required when the cluster has more than one
    /// member (etcd's `--peer-trusted-ca-file`, `--peer-cert-file`, `--peer-key-file`).
    pub peer_trusted_ca_file: String,
    pub peer_cert_file: String,
    pub peer_key_file: String,
    /// PEM certificate revocation lists of the peer CA (etcd's `--peer-crl-file`).
    pub peer_crl_file: String,
    pub role: Role,
    pub region: String,
    /// Bytes of keys and values, every kept revision counted, past which this member refuses
    /// writes with etcd's "database space exceeded" (etcd's `--quota-backend-bytes`). 0 means
    /// the default, [`geolock_core::limits::KEYSPACE_BYTES_MAX`], which is also the most.
    pub quota_backend_bytes: u64,
    /// How clients' tokens are made (etcd's `--auth-token`): `simple`, or
    /// `jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256|…|ES384,ttl=5m`.
    pub auth_token: String,
    /// Seconds a simple token lives after its last use (etcd's `--auth-token-ttl`).
    pub auth_token_ttl: u64,
    /// bcrypt's cost for hashing passwords, 4 to 31 (etcd's `--bcrypt-cost`); each step doubles
    /// the time one Authenticate, user add or password change costs.
    pub bcrypt_cost: u32,
    pub cluster: ClusterSection,
    pub nodes: Vec<NodeEntry>,
    pub raft: RaftSection,
    pub lease: LeaseSection,
    pub watch: WatchSection,
    pub lock: LockSection,
    pub failover: FailoverSection,
    pub tracing: TracingSection,
    pub otlp_metrics: OtlpMetricsSection,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "default".into(),
            data_dir: String::new(),
            listen_client_urls: "http://127.0.0.1:2379".into(),
            advertise_client_urls: "http://127.0.0.1:2379".into(),
            listen_metrics_urls: String::new(),
            metrics: MetricsLevel::default(),
            listen_peer_urls: "http://127.0.0.1:2380".into(),
            initial_advertise_peer_urls: "http://127.0.0.1:2380".into(),
            initial_cluster: String::new(),
            initial_cluster_state: "new".into(),
            cert_file: String::new(),
            key_file: String::new(),
            trusted_ca_file: String::new(),
            client_cert_auth: false,
            peer_crl_file: String::new(),
            peer_trusted_ca_file: String::new(),
            peer_cert_file: String::new(),
            peer_key_file: String::new(),
            role: Role::Voter,
            region: String::new(),
            quota_backend_bytes: 0,
            auth_token: "simple".into(),
            auth_token_ttl: 300,
            // etcd's default (Go's bcrypt.DefaultCost): about 50 ms of CPU per hash here.
            bcrypt_cost: 10,
            cluster: ClusterSection::default(),
            nodes: Vec::new(),
            raft: RaftSection::default(),
            lease: LeaseSection::default(),
            watch: WatchSection::default(),
            lock: LockSection::default(),
            failover: FailoverSection::default(),
            tracing: TracingSection::default(),
            otlp_metrics: OtlpMetricsSection::default(),
        }
    }
}

/// A member of the initial cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialMember {
    pub name: String,
    pub peer_addr: String,
}

impl Config {
    /// Load defaults, then `file`, then the environment, then `overrides` (flag name with
    /// dashes or underscores, value).
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Config, ConfigError> {
        let defaults = config::Config::try_from(&Config::default())?;
        let mut b = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            let len =
                std::fs::metadata(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?.len();
            let max = geolock_core::limits::CONFIG_FILE_BYTES_MAX;
            if len > max {
                return Err(ConfigError::FileTooLarge { path: path.to_path_buf(), len, max });
            }
            b = b.add_source(config::File::from(path));
        }
        b = b.add_source(config::Environment::with_prefix("GEOLOCK").prefix_separator("_").separator("__"));
        for (k, v) in overrides {
            b = b.set_override(k.replace('-', "_"), v.clone())?;
        }
        let cfg: Config = b.build()?.try_deserialize()?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let l = &self.lease;
        if !(l.min_ttl <= l.default_ttl && l.default_ttl <= l.max_ttl) {
            return Err(ConfigError::Invalid("lease: need min_ttl <= default_ttl <= max_ttl".into()));
        }
        if self.tracing.experimental_distributed_tracing_sampling_rate > 1_000_000 {
            return Err(ConfigError::Invalid(format!(
                "tracing: experimental_distributed_tracing_sampling_rate is per million, not {}",
                self.tracing.experimental_distributed_tracing_sampling_rate
            )));
        }
        let address = &self.otlp_metrics.address;
        if address.contains("://") && !address.starts_with("http://") {
            return Err(ConfigError::Invalid(format!(
                "otlp_metrics: address {address:?}: plain http:// or host:port only (no TLS to the collector)"
            )));
        }
        let every = self.otlp_metrics.interval.as_millis();
        let (min, max) =
            (geolock_core::limits::OTLP_METRICS_INTERVAL_MS_MIN, geolock_core::limits::OTLP_METRICS_INTERVAL_MS_MAX);
        if !(u128::from(min)..=u128::from(max)).contains(&every) {
            return Err(ConfigError::Invalid(format!(
                "otlp_metrics: interval must be between {min}ms and {max}ms, not {every}ms"
            )));
        }
        if l.max_ttl.as_secs() as i64 > geolock_core::limits::LEASE_TTL_S_MAX || l.min_ttl.as_secs() == 0 {
            return Err(ConfigError::Invalid(format!(
                "lease: TTLs must be between 1s and {}s",
                geolock_core::limits::LEASE_TTL_S_MAX
            )));
        }
        if self.quota_backend_bytes > geolock_core::limits::KEYSPACE_BYTES_MAX {
            return Err(ConfigError::Invalid(format!(
                "quota_backend_bytes {} is over keyspace_bytes_max ({})",
                self.quota_backend_bytes,
                geolock_core::limits::KEYSPACE_BYTES_MAX
            )));
        }
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(ConfigError::Invalid(format!(
                "bcrypt_cost must be between 4 and 31, not {}",
                self.bcrypt_cost
            )));
        }
        crate::auth::TokenProvider::from_option(&self.auth_token).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !(1..=AUTH_TOKEN_TTL_S_MAX).contains(&self.auth_token_ttl) {
            return Err(ConfigError::Invalid(format!(
                "auth_token_ttl must be 1 to {AUTH_TOKEN_TTL_S_MAX} seconds (auth_token_ttl_s_max), not {}",
                self.auth_token_ttl
            )));
        }
        let r = &self.raft;
        if r.heartbeat_interval.is_zero() || r.election_timeout <= r.heartbeat_interval * 2 {
            return Err(ConfigError::Invalid(
                "raft: election_timeout must be more than twice heartbeat_interval".into(),
            ));
        }
        if !matches!(self.initial_cluster_state(), "new" | "existing") {
            return Err(ConfigError::Invalid(format!(
                "initial_cluster_state must be new or existing, not {:?}",
                self.initial_cluster_state()
            )));
        }
        self.client_tls()?;
        self.initial_members()?;
        Ok(())
    }

    /// `new` or `existing`, from the flag or the file's `cluster:` section.
    pub fn initial_cluster_state(&self) -> &str {
        if !self.cluster.initial_cluster_state.is_empty() && self.initial_cluster_state == "new" {
            &self.cluster.initial_cluster_state
        } else {
            &self.initial_cluster_state
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        if self.data_dir.is_empty() {
            PathBuf::from(format!("{}.geolock", self.name))
        } else {
            PathBuf::from(&self.data_dir)
        }
    }

    /// The first members: `initial_cluster`, else the `nodes:` list, else this node alone.
    pub fn initial_members(&self) -> Result<Vec<InitialMember>, ConfigError> {
        if !self.initial_cluster.is_empty() {
            let mut out = Vec::new();
            for part in self.initial_cluster.split(',').filter(|p| !p.is_empty()) {
                let (name, url) = part
                    .split_once('=')
                    .ok_or_else(|| ConfigError::Invalid(format!("initial_cluster: {part:?} is not name=url")))?;
                out.push(InitialMember { name: name.to_string(), peer_addr: host_port(url)? });
            }
            return Ok(out);
        }
        if !self.nodes.is_empty() {
            return Ok(self
                .nodes
                .iter()
                .map(|n| InitialMember { name: n.name.clone(), peer_addr: n.address.clone() })
                .collect());
        }
        Ok(vec![InitialMember { name: self.name.clone(), peer_addr: self.peer_addr()? }])
    }

    /// Each client listener's `host:port`, and whether it serves TLS (an `https://` URL).
    pub fn client_listeners(&self) -> Result<Vec<(String, bool)>, ConfigError> {
        let urls = self.listen_client_urls.split(',').filter(|u| !u.is_empty());
        urls.map(|u| Ok((host_port(u)?, u.starts_with("https://")))).collect()
    }

    /// The client TLS files, if any client URL is `https://`; an `https://` URL without a
    /// certificate and key, or `client_cert_auth` without a CA bundle, is refused.
    pub fn client_tls(&self) -> Result<Option<crate::client_tls::ClientTlsFiles>, ConfigError> {
        if !self.client_listeners()?.iter().any(|(_, tls)| *tls) {
            // A member told to require client certificates must not serve without them.
            if self.client_cert_auth {
                return Err(ConfigError::Invalid("client_cert_auth needs an https:// client URL".into()));
            }
            return Ok(None);
        }
        if self.cert_file.is_empty() || self.key_file.is_empty() {
            return Err(ConfigError::Invalid("an https:// client URL needs cert_file and key_file".into()));
        }
        if self.client_cert_auth && self.trusted_ca_file.is_empty() {
            return Err(ConfigError::Invalid("client_cert_auth needs trusted_ca_file".into()));
        }
        Ok(Some(crate::client_tls::ClientTlsFiles {
            cert: PathBuf::from(&self.cert_file),
            key: PathBuf::from(&self.key_file),
            ca: (!self.trusted_ca_file.is_empty()).then(|| PathBuf::from(&self.trusted_ca_file)),
            client_cert_auth: self.client_cert_auth,
        }))
    }

    /// `host:port` of each metrics URL.
    pub fn metrics_listen_addrs(&self) -> Result<Vec<String>, ConfigError> {
        self.listen_metrics_urls.split(',').filter(|u| !u.is_empty()).map(host_port).collect()
    }

    /// Client URLs advertised to others.
    pub fn client_urls(&self) -> Vec<String> {
        let src =
            if self.advertise_client_urls.is_empty() { &self.listen_client_urls } else { &self.advertise_client_urls };
        src.split(',').filter(|u| !u.is_empty()).map(str::to_string).collect()
    }

    /// Peer URLs advertised to others.
    pub fn peer_urls(&self) -> Vec<String> {
        let src = if self.initial_advertise_peer_urls.is_empty() {
            &self.listen_peer_urls
        } else {
            &self.initial_advertise_peer_urls
        };
        src.split(',').filter(|u| !u.is_empty()).map(str::to_string).collect()
    }

    /// `host:port` peers reach this node at.
    pub fn peer_addr(&self) -> Result<String, ConfigError> {
        let url = self.peer_urls().into_iter().next().ok_or_else(|| ConfigError::Invalid("no peer URL".into()))?;
        host_port(&url)
    }

    /// The peer TLS files, if all three are set.
    pub fn peer_tls(&self) -> Result<Option<TlsFiles>, ConfigError> {
        let set = [&self.peer_trusted_ca_file, &self.peer_cert_file, &self.peer_key_file];
        match set.iter().filter(|f| !f.is_empty()).count() {
            0 => Ok(None),
            3 => Ok(Some(TlsFiles {
                ca: PathBuf::from(&self.peer_trusted_ca_file),
                cert: PathBuf::from(&self.peer_cert_file),
                key: PathBuf::from(&self.peer_key_file),
                crl: (!self.peer_crl_file.is_empty()).then(|| PathBuf::from(&self.peer_crl_file)),
            })),
            _ => Err(ConfigError::Invalid(
                "peer TLS needs all of peer_trusted_ca_file, peer_cert_file and peer_key_file".into(),
            )),
        }
    }

    /// The space quota in bytes, the default filled in.
    pub fn quota_bytes(&self) -> u64 {
        match self.quota_backend_bytes {
            0 => geolock_core::limits::KEYSPACE_BYTES_MAX,
            q => q,
        }
    }

    /// The lease TTL bounds in whole seconds.
    pub fn ttl_bounds(&self) -> geolock_core::lease::TtlBounds {
        geolock_core::lease::TtlBounds {
            min_ttl_s: self.lease.min_ttl.as_secs() as i64,
            max_ttl_s: self.lease.max_ttl.as_secs() as i64,
            default_ttl_s: self.lease.default_ttl.as_secs() as i64,
        }
    }
}

/// `host:port` of a URL such as `http://127.0.0.1:2380` (scheme optional).
pub fn host_port(url: &str) -> Result<String, ConfigError> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || !rest.contains(':') || rest.contains('/') {
        return Err(ConfigError::Invalid(format!("{url:?} is not a URL with a host and port")));
    }
    Ok(rest.to_string())
}

/// Durations written as text (`100ms`, `5s`, `1h`), or as a number of milliseconds.
mod duration_text {
    use std::time::Duration;

    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration such as 100ms, 5s or 1h, or milliseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v.trim()).map_err(|e| E::custom(format!("{v:?}: {e}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Ok(Duration::from_millis(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                u64::try_from(v).map(Duration::from_millis).map_err(|_| E::custom("negative duration"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's "5-Node Cluster Configuration", exactly as written there.
    const SPEC_EXAMPLE: &str = r#"# Example etcd-style configuration
cluster:
  name: lock-manager-prod
  initial_cluster_state: new

nodes:
  - name: node-1
    address: 10.0.1.10:2380
    client_address: 10.0.1.10:2379
    availability_zone: us-east-1a

  - name: node-2
    address: 10.0.1.11:2380
    client_address: 10.0.1.11:2379
    availability_zone: us-east-1b

  - name: node-3
    address: 10.0.1.12:2380
    client_address: 10.0.1.12:2379
    availability_zone: us-east-1c

  - name: node-4
    address: 10.0.1.13:2380
    client_address: 10.0.1.13:2379
    availability_zone: us-east-1a

  - name: node-5
    address: 10.0.1.14:2380
    client_address: 10.0.1.14:2379
    availability_zone: us-east-1b

raft:
  election_timeout: 1000ms
  heartbeat_interval: 100ms
  snapshot_count: 10000

lease:
  min_ttl: 5s
  max_ttl: 1h
  default_ttl: 30s
"#;

    #[test]
    fn the_spec_example_loads_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.yaml");
        std::fs::write(&path, SPEC_EXAMPLE).unwrap();
        let c = Config::load(Some(&path), &[("name", "node-3".into())]).unwrap();
        assert_eq!(c.cluster.name, "lock-manager-prod");
        assert_eq!(c.nodes.len(), 5);
        assert_eq!(c.nodes[2].client_address, "10.0.1.12:2379");
        assert_eq!(c.raft.election_timeout, Duration::from_millis(1000));
        assert_eq!(c.lease.max_ttl, Duration::from_secs(3600));
        let m = c.initial_members().unwrap();
        assert_eq!(m[4], InitialMember { name: "node-5".into(), peer_addr: "10.0.1.14:2380".into() });
        assert_eq!(c.name, "node-3");
    }

    #[test]
    fn flags_override_files_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(&path, "name = \"a\"\n[raft]\nelection_timeout = \"2s\"\n").unwrap();
        let c = Config::load(Some(&path), &[("name", "b".into()), ("initial-cluster", "b=http://127.0.0.1:9".into())])
            .unwrap();
        assert_eq!(c.name, "b");
        assert_eq!(c.raft.election_timeout, Duration::from_secs(2));
        assert_eq!(c.raft.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(c.initial_members().unwrap()[0].peer_addr, "127.0.0.1:9");
    }

    #[test]
    fn environment_variables_sit_between_the_file_and_the_flags() {
        // A variable no other test reads, so tests running in parallel are not disturbed.
        std::env::set_var("GEOLOCK_WATCH__PROGRESS_NOTIFY_INTERVAL", "42s");
        let from_env = Config::load(None, &[]).unwrap();
        let from_flag = Config::load(None, &[("watch.progress_notify_interval", "7s".into())]).unwrap();
        std::env::remove_var("GEOLOCK_WATCH__PROGRESS_NOTIFY_INTERVAL");
        assert_eq!(from_env.watch.progress_notify_interval, Duration::from_secs(42));
        assert_eq!(from_flag.watch.progress_notify_interval, Duration::from_secs(7));
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let err = Config::load(None, &[("lease.min_ttl", "2h".into())]).unwrap_err().to_string();
        assert!(err.contains("min_ttl <= default_ttl"), "{err}");
        let err = Config::load(None, &[("quota-backend-bytes", "3000000000".into())]).unwrap_err().to_string();
        assert!(err.contains("over keyspace_bytes_max"), "{err}");
        let quota = Config::load(None, &[("quota-backend-bytes", "1048576".into())]).unwrap();
        assert_eq!(
            (quota.quota_bytes(), Config::default().quota_bytes()),
            (1_048_576, geolock_core::limits::KEYSPACE_BYTES_MAX)
        );
        let err = Config::load(None, &[("initial-cluster", "nourl".into())]).unwrap_err().to_string();
        assert!(err.contains("name=url"), "{err}");
        for interval in ["999ms", "2h"] {
            let err = Config::load(None, &[("otlp_metrics.interval", interval.into())]).unwrap_err().to_string();
            assert!(err.contains("otlp_metrics: interval must be between 1000ms and 3600000ms"), "{err}");
        }
        let err = Config::load(None, &[("otlp_metrics.address", "https://collector:4317".into())]).unwrap_err();
        assert!(err.to_string().contains("plain http:// or host:port only"), "{err}");
        for fine in ["collector:4317", "http://collector:4317"] {
            assert_eq!(
                Config::load(None, &[("otlp_metrics.address", fine.into())]).unwrap().otlp_metrics.address,
                fine
            );
        }
        let rate = Config::load(None, &[("tracing.experimental_distributed_tracing_sampling_rate", "1000001".into())]);
        assert!(rate.unwrap_err().to_string().contains("per million"));
    }
}
