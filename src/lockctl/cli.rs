//! The `lockctl` command line. `start` runs a node; the other subcommands are clients.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use geolock_server::config::Config;

#[derive(Parser)]
#[command(name = "lockctl", version, about = "geolock: geo-replicated locks over the etcd v3 API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (flags named as etcd's where the two share a setting).
    Start(Box<StartArgs>),
    /// Take a lock, print its key and fencing token, and hold it until interrupted, or run
    /// COMMAND while holding it (with LOCKCTL_LOCK_KEY and LOCKCTL_FENCING_TOKEN set).
    Lock {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        /// TTL of the lease that holds the lock, in seconds.
        #[arg(long, default_value_t = 60)]
        ttl: i64,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Add, remove, list, promote members, or move leadership.
    Member {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        what: crate::commands::MemberCommand,
    },
    /// Run the region failover controller: watch the primary with the other vantage points, and
    /// when it is lost run the runbook (fence, promote, redirect, verify, notify), journaled so
    /// that a restarted controller resumes where it stopped. Exits once the failover is done.
    FailoverController {
        /// The controller's configuration (YAML or TOML; `geolock_client::controller::ControllerConfig`).
        #[arg(long)]
        config: PathBuf,
    },
    /// Region failover by hand: the steps of the runbook the controller runs.
    Failover {
        #[command(subcommand)]
        what: crate::commands::FailoverCommand,
    },
    /// Run a local cluster of voters on loopback with generated certificates, until interrupted.
    Dev {
        /// Where the members keep their data, certificates and logs.
        #[arg(long, default_value = "geolock-dev")]
        dir: PathBuf,
        /// Number of voters (1 to 5).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=5))]
        nodes: u8,
        /// Client port of the first member; the others follow etcd's local numbering
        /// (2379, 22379, 32379, ...), each with its peer port one above.
        #[arg(long, default_value_t = 2379)]
        base_port: u16,
        /// Run this topology instead (`regions/2-2-1.yaml`): every node, role and region, with
        /// the topology's WAN latency between regions (in network namespaces when run as root).
        #[arg(long, conflicts_with_all = ["nodes", "base_port"])]
        topology: Option<PathBuf>,
        /// With --topology: regions on loopback addresses of their own even when run as root
        /// (partitions then happen in the relays).
        #[arg(long, requires = "topology")]
        loopback: bool,
    },
    /// Development certificates: a cluster CA and member certificates signed by it.
    Certs {
        #[command(subcommand)]
        what: CertsCommand,
    },
    /// Campaign with PROPOSAL and hold leadership until interrupted; without PROPOSAL, print
    /// each leader as it changes.
    Elect {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        proposal: Option<String>,
        /// TTL of the lease behind the campaign, in seconds.
        #[arg(long, default_value_t = 60)]
        ttl: i64,
    },
}

/// `lockctl certs ...`
#[derive(Subcommand)]
enum CertsCommand {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create DIR/NAME.crt and DIR/NAME.key for member NAME, signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// A host name or IP address the certificate also names (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

/// Where the failover controller's own service is (plain text: `approve`, `observe`).
#[derive(Args, Debug)]
pub struct EndpointArgs {
    /// Comma-separated client endpoints (`host:port`); the first that answers is used.
    #[arg(long, global = true, default_value = "127.0.0.1:2379", env = "LOCKCTL_ENDPOINTS")]
    pub endpoints: String,
}

/// Where client commands connect, over what and as whom: etcdctl's flags.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Comma-separated client endpoints (`host:port` or URLs); the first that answers is used.
    #[arg(long, global = true, default_value = "127.0.0.1:2379", env = "LOCKCTL_ENDPOINTS")]
    pub endpoints: String,
    #[command(flatten)]
    pub creds: CredentialArgs,
}

impl ClientArgs {
    /// The cluster these flags name, the files read; an error names the setting or file at
    /// fault.
    pub fn cluster(&self) -> Result<geolock_client::Cluster, String> {
        self.creds.reach(&self.endpoints)
    }
}

/// Over what and as whom client commands connect: etcdctl's flags.
#[derive(Args, Debug)]
pub struct CredentialArgs {
    /// Speak TLS, checking members' certificates against this CA bundle (PEM).
    #[arg(long, global = true)]
    pub cacert: Option<PathBuf>,
    /// Present this client certificate (PEM; needs --key and --cacert).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// Authenticate as NAME, with NAME:PASSWORD or with --password.
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// The password of --user NAME.
    #[arg(long, global = true)]
    pub password: Option<String>,
}

impl CredentialArgs {
    /// `endpoints` reached with these credentials, the files read.
    pub fn reach(&self, endpoints: &str) -> Result<geolock_client::Cluster, String> {
        let creds = geolock_client::Credentials {
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
        };
        geolock_client::Cluster::with(endpoints, &creds)
    }
}

/// Flags of `lockctl start`. Each overrides the file and the environment.
#[derive(Args, Debug, Default)]
struct StartArgs {
    /// YAML or TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    data_dir: Option<String>,
    #[arg(long)]
    listen_client_urls: Option<String>,
    #[arg(long)]
    advertise_client_urls: Option<String>,
    /// Plain-HTTP URLs serving /metrics, /health, /livez, /readyz and the cluster page alone
    /// (etcd's flag), for when the client URLs need client certificates.
    #[arg(long)]
    listen_metrics_urls: Option<String>,
    /// basic (etcd's default), extensive (adds the gRPC handling-time histogram) or off.
    #[arg(long)]
    metrics: Option<String>,
    /// Export OpenTelemetry traces over OTLP/gRPC (etcd's flag).
    #[arg(long)]
    experimental_enable_distributed_tracing: bool,
    /// The OTLP collector's host:port (etcd's flag; default localhost:4317).
    #[arg(long)]
    experimental_distributed_tracing_address: Option<String>,
    /// The spans' service.name (etcd's flag; default geolock).
    #[arg(long)]
    experimental_distributed_tracing_service_name: Option<String>,
    /// The spans' service.instance.id (etcd's flag; default the member's name).
    #[arg(long)]
    experimental_distributed_tracing_instance_id: Option<String>,
    /// Requests traced per million when the client's trace context does not decide (etcd's flag).
    #[arg(long)]
    experimental_distributed_tracing_sampling_rate: Option<u32>,
    /// Push every metric of /metrics to this OTLP/gRPC collector (host:port, plain); default none.
    #[arg(long)]
    otlp_metrics_address: Option<String>,
    /// Milliseconds between OTLP metric exports (default 60000).
    #[arg(long)]
    otlp_metrics_interval_ms: Option<u64>,
    #[arg(long)]
    listen_peer_urls: Option<String>,
    #[arg(long)]
    initial_advertise_peer_urls: Option<String>,
    #[arg(long)]
    initial_cluster: Option<String>,
    /// `new` or `existing`.
    #[arg(long)]
    initial_cluster_state: Option<String>,
    /// Client TLS certificate (PEM), served on `https://` client URLs (etcd's flag).
    #[arg(long)]
    cert_file: Option<String>,
    /// Client TLS key (PEM) (etcd's flag).
    #[arg(long)]
    key_file: Option<String>,
    /// CA bundle client certificates are checked against (PEM) (etcd's flag).
    #[arg(long)]
    trusted_ca_file: Option<String>,
    /// Require client certificates; a certificate's common name is the user of a request
    /// without a token (etcd's flag).
    #[arg(long)]
    client_cert_auth: bool,
    /// CA that signs every member's peer certificate (PEM).
    #[arg(long)]
    peer_trusted_ca_file: Option<String>,
    /// This member's peer certificate (PEM), naming the member.
    #[arg(long)]
    peer_cert_file: Option<String>,
    /// This member's peer key (PEM).
    #[arg(long)]
    peer_key_file: Option<String>,
    /// Revoked peer certificates (PEM CRLs of the peer CA), read again when it changes
    /// (etcd's flag).
    #[arg(long)]
    peer_crl_file: Option<String>,
    /// voter, witness or learner.
    #[arg(long)]
    role: Option<String>,
    #[arg(long)]
    region: Option<String>,
    /// Election timeout in milliseconds (etcd's flag).
    #[arg(long)]
    election_timeout: Option<u64>,
    /// Heartbeat interval in milliseconds (etcd's flag).
    #[arg(long)]
    heartbeat_interval: Option<u64>,
    /// Applied entries between snapshots (etcd's flag).
    #[arg(long)]
    snapshot_count: Option<u64>,
    /// Bytes of keys and values past which writes are refused (etcd's flag; 0 = 2 GiB).
    #[arg(long)]
    quota_backend_bytes: Option<u64>,
    /// How client tokens are made (etcd's flag): simple, or
    /// jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256|ES256|…,ttl=5m.
    #[arg(long)]
    auth_token: Option<String>,
    /// Seconds a simple token lives after its last use (etcd's flag; default 300).
    #[arg(long)]
    auth_token_ttl: Option<u64>,
    /// bcrypt cost of password hashes, 4 to 31 (etcd's flag; default 10).
    #[arg(long)]
    bcrypt_cost: Option<u32>,
    /// Vantage points (`host:port`, comma-separated) whose majority must grant the leader its
    /// region write lease before it takes writes (an active-passive primary).
    #[arg(long)]
    failover_vantages: Option<String>,
    /// The region write lease, in milliseconds.
    #[arg(long)]
    failover_write_lease_ms: Option<u64>,
}

impl StartArgs {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        let mut o = Vec::new();
        let mut add = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                o.push((k, v.clone()));
            }
        };
        add("name", &self.name);
        add("data_dir", &self.data_dir);
        add("listen_client_urls", &self.listen_client_urls);
        add("advertise_client_urls", &self.advertise_client_urls);
        add("listen_metrics_urls", &self.listen_metrics_urls);
        add("metrics", &self.metrics);
        if self.experimental_enable_distributed_tracing {
            add("tracing.experimental_enable_distributed_tracing", &Some("true".to_string()));
        }
        add("tracing.experimental_distributed_tracing_address", &self.experimental_distributed_tracing_address);
        add(
            "tracing.experimental_distributed_tracing_service_name",
            &self.experimental_distributed_tracing_service_name,
        );
        add("tracing.experimental_distributed_tracing_instance_id", &self.experimental_distributed_tracing_instance_id);
        add(
            "tracing.experimental_distributed_tracing_sampling_rate",
            &self.experimental_distributed_tracing_sampling_rate.map(|r| r.to_string()),
        );
        add("otlp_metrics.address", &self.otlp_metrics_address);
        add("otlp_metrics.interval", &self.otlp_metrics_interval_ms.map(|ms| format!("{ms}ms")));
        add("listen_peer_urls", &self.listen_peer_urls);
        add("initial_advertise_peer_urls", &self.initial_advertise_peer_urls);
        add("initial_cluster", &self.initial_cluster);
        add("initial_cluster_state", &self.initial_cluster_state);
        add("cert_file", &self.cert_file);
        add("key_file", &self.key_file);
        add("trusted_ca_file", &self.trusted_ca_file);
        if self.client_cert_auth {
            add("client_cert_auth", &Some("true".to_string()));
        }
        add("peer_trusted_ca_file", &self.peer_trusted_ca_file);
        add("peer_cert_file", &self.peer_cert_file);
        add("peer_key_file", &self.peer_key_file);
        add("peer_crl_file", &self.peer_crl_file);
        add("role", &self.role);
        add("region", &self.region);
        add("raft.election_timeout", &self.election_timeout.map(|ms| format!("{ms}ms")));
        add("raft.heartbeat_interval", &self.heartbeat_interval.map(|ms| format!("{ms}ms")));
        add("raft.snapshot_count", &self.snapshot_count.map(|n| n.to_string()));
        add("quota_backend_bytes", &self.quota_backend_bytes.map(|n| n.to_string()));
        add("auth_token", &self.auth_token);
        add("auth_token_ttl", &self.auth_token_ttl.map(|n| n.to_string()));
        add("bcrypt_cost", &self.bcrypt_cost.map(|n| n.to_string()));
        add("failover.vantages", &self.failover_vantages);
        add("failover.write_lease", &self.failover_write_lease_ms.map(|ms| format!("{ms}ms")));
        o
    }
}

/// Parse the command line and run it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GEOLOCK_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Dev { dir, nodes, base_port, topology, loopback } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            let outcome = match topology {
                Some(t) => rt.block_on(crate::dev::run_topology(&dir, &t, loopback)),
                None => rt.block_on(crate::dev::run(&dir, nodes as usize, base_port)),
            };
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lockctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Certs { what } => {
            let done = match what {
                CertsCommand::Init { dir } => {
                    geolock_testkit::certs::init_ca(&dir).map(|()| format!("{}", dir.join("ca.crt").display()))
                }
                CertsCommand::Issue { dir, name, hosts } => geolock_testkit::certs::issue(&dir, &name, &hosts)
                    .map(|(crt, key)| format!("{} {}", crt.display(), key.display())),
            };
            match done {
                Ok(files) => {
                    println!("{files}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lockctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Lock { client, name, ttl, command } => {
            run_client(async { crate::commands::lock(&client.cluster()?, &name, ttl, &command).await })
        }
        Command::Member { client, what } => {
            run_client(async { crate::commands::member(&client.cluster()?, what).await })
        }
        Command::Failover { what } => run_client(crate::commands::failover(what)),
        Command::FailoverController { config } => run_client(crate::commands::failover_controller(&config)),
        Command::Elect { client, name, proposal, ttl } => {
            run_client(async { crate::commands::elect(&client.cluster()?, &name, proposal.as_deref(), ttl).await })
        }
        Command::Start(args) => {
            let overrides = args.overrides();
            let cfg = match Config::load(args.config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("lockctl: {e}");
                    return ExitCode::from(2);
                }
            };
            geolock_server::roles::no_transparent_huge_pages();
            // One thread for the async side: Raft, gRPC and apply hand work to each other many
            // times per request, and on a single thread those hand-offs are cheap. Fsyncs run on
            // the log flusher's own thread and RocksDB keeps its background threads. Measured in
            // bench/: 16-client put throughput about 1.2x the multi-threaded runtime's.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(geolock_server::roles::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lockctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run_client(f: impl std::future::Future<Output = Result<u8, crate::commands::CommandError>>) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(f) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("lockctl: {e}");
            ExitCode::FAILURE
        }
    }
}
