//! `lockctl`'s client commands `lock`, `elect`, `member` and `failover`, shaped like etcdctl's: what they
//! print and their exit codes, over the client library.

use geolock_client::{acquire, campaign, connect_to, resign, unlock, ClientError, Cluster, Held, Session};
use geolock_proto::etcdserverpb as pb;
use geolock_proto::v3electionpb as epb;

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A call to the cluster failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server refused a request.
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
    /// The command to run while holding the lock could not be started or waited for.
    #[error("cannot run {cmd}: {source}")]
    Exec { cmd: String, source: std::io::Error },
    /// The failover controller stopped.
    #[error(transparent)]
    Controller(#[from] geolock_client::controller::ControllerError),
    /// The failover controller's configuration file does not read.
    #[error("{path}: {detail}")]
    ControllerConfig { path: String, detail: String },
    /// `lockctl failover vantage` could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    /// `lockctl member` named a member the cluster does not have.
    #[error("no member named {name} (members: {known})")]
    NoSuchMember { name: String, known: String },
    /// `lockctl failover rejoin` cannot go on.
    #[error("rejoin: {0}")]
    Rejoin(String),
    /// The client flags do not make a connection setting.
    #[error("{0}")]
    Flags(String),
}

impl From<String> for CommandError {
    fn from(why: String) -> CommandError {
        CommandError::Flags(why)
    }
}

/// `lockctl lock NAME [COMMAND...]`. Returns the exit code.
pub async fn lock(cluster: &Cluster, name: &str, ttl: i64, command: &[String]) -> Result<u8, CommandError> {
    let mut session = Session::grant(cluster, ttl).await?;
    let Held { key, token } = acquire(cluster, name, &mut session).await?;
    let key_text = String::from_utf8_lossy(&key).into_owned();
    println!("{key_text}");
    println!("fencing token {token}");
    let code = if let Some((program, args)) = command.split_first() {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("LOCKCTL_LOCK_KEY", &key_text)
            .env("LOCKCTL_FENCING_TOKEN", token.to_string())
            .env("ETCD_LOCK_KEY", &key_text)
            .env("ETCD_LOCK_REV", token.to_string())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| CommandError::Exec { cmd: program.clone(), source })?;
        tokio::select! {
            status = child.wait() => status.map_err(|source| CommandError::Exec { cmd: program.clone(), source })?.code().unwrap_or(1) as u8,
            lost = session.lost() => {
                // The lock may belong to someone else now: the command must not go on using it.
                let _ = child.kill().await;
                return Err(lost.into());
            }
        }
    } else {
        tokio::select! {
            _ = geolock_server::roles::until_signal() => 0,
            lost = session.lost() => return Err(lost.into()),
        }
    };
    let unlock = unlock(cluster, &key).await;
    session.revoke(cluster).await;
    unlock?;
    Ok(code)
}

/// `lockctl elect NAME [PROPOSAL]`. Returns the exit code.
pub async fn elect(cluster: &Cluster, name: &str, proposal: Option<&str>, ttl: i64) -> Result<u8, CommandError> {
    let Some(proposal) = proposal else {
        let ch = connect_to(cluster).await?;
        let mut election = epb::election_client::ElectionClient::new(ch);
        let mut leaders = election.observe(epb::LeaderRequest { name: name.as_bytes().to_vec() }).await?.into_inner();
        while let Some(l) = leaders.message().await? {
            if let Some(kv) = l.kv {
                println!("{}", String::from_utf8_lossy(&kv.key));
                println!("{}", String::from_utf8_lossy(&kv.value));
            }
        }
        return Ok(0);
    };
    let mut session = Session::grant(cluster, ttl).await?;
    let leader = campaign(cluster, name, &mut session, proposal.as_bytes()).await?;
    println!("{}", String::from_utf8_lossy(&leader.key));
    println!("{proposal}");
    println!("fencing token {}", leader.rev);
    tokio::select! {
        _ = geolock_server::roles::until_signal() => {}
        lost = session.lost() => return Err(lost.into()),
    }
    let resign = resign(cluster, &leader).await;
    session.revoke(cluster).await;
    resign?;
    Ok(0)
}

/// `lockctl member ...`: the spec's membership procedures over etcd's Cluster API.
#[derive(Debug, clap::Subcommand)]
pub enum MemberCommand {
    /// Add member NAME; it joins as a learner and, unless --learner, is promoted once caught up.
    /// Prints the settings to start it with.
    Add {
        name: String,
        /// Comma-separated peer URLs of the new member.
        #[arg(long)]
        peer_urls: String,
        /// Keep it a learner until `lockctl member promote`.
        #[arg(long)]
        learner: bool,
    },
    /// Take member NAME out of the cluster.
    Remove { name: String },
    /// List the members.
    List,
    /// Make learner NAME a voter (refused until it has caught up).
    Promote { name: String },
    /// Give member NAME new peer URLs.
    Update {
        name: String,
        #[arg(long)]
        peer_urls: String,
    },
    /// Hand leadership to voter NAME.
    TransferLeadership { name: String },
}

/// Run a `lockctl member` command. Returns the exit code.
pub async fn member(at: &Cluster, cmd: MemberCommand) -> Result<u8, CommandError> {
    let ch = connect_to(at).await?;
    let mut cluster = pb::cluster_client::ClusterClient::new(ch.clone());
    // etcdctl's columns, then the role, the region and the lag behind the leader.
    let list = |members: &[pb::Member]| {
        for m in members {
            println!(
                "{:x}, {}, {}, {}, {}, {}, {}, {}, lag {} entries {} ms",
                m.id,
                if m.client_ur_ls.is_empty() { "unstarted" } else { "started" },
                m.name,
                m.peer_ur_ls.join(","),
                m.client_ur_ls.join(","),
                m.is_learner,
                m.geolock_role,
                if m.geolock_region.is_empty() { "-" } else { &m.geolock_region },
                m.geolock_lag_entries,
                m.geolock_lag_ms
            );
        }
    };
    let warn_even = |members: &[pb::Member]| {
        let voters = members.iter().filter(|m| !m.is_learner).count();
        if voters.is_multiple_of(2) {
            eprintln!(
                "warning: the cluster has {voters} voters; an even count tolerates no more failures than {} voters",
                voters - 1
            );
        }
    };
    let members = cluster.member_list(pb::MemberListRequest { linearizable: true }).await?.into_inner().members;
    let id_of = |name: &str| {
        members.iter().find(|m| m.name == name).map(|m| m.id).ok_or_else(|| CommandError::NoSuchMember {
            name: name.to_string(),
            known: members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    };
    match cmd {
        MemberCommand::List => list(&members),
        MemberCommand::Add { name, peer_urls, learner } => {
            let urls: Vec<String> = peer_urls.split(',').filter(|u| !u.is_empty()).map(str::to_string).collect();
            let resp = geolock_client::member_add(at, &name, urls.clone(), learner).await?;
            let header = resp.header.unwrap_or_default();
            let id = resp.member.map_or(0, |m| m.id);
            println!("Member {id:x} added to cluster {:x}", header.cluster_id);
            let initial: Vec<String> = resp
                .members
                .iter()
                .flat_map(|m| {
                    let n = if m.id == id { name.clone() } else { m.name.clone() };
                    m.peer_ur_ls.iter().map(move |u| format!("{n}={u}"))
                })
                .collect();
            println!();
            println!("GEOLOCK_NAME=\"{name}\"");
            println!("GEOLOCK_INITIAL_CLUSTER=\"{}\"", initial.join(","));
            println!("GEOLOCK_INITIAL_ADVERTISE_PEER_URLS=\"{}\"", urls.join(","));
            println!("GEOLOCK_INITIAL_CLUSTER_STATE=\"existing\"");
            if !learner {
                let mut after = resp.members.clone();
                after.iter_mut().filter(|m| m.id == id).for_each(|m| m.is_learner = false);
                warn_even(&after);
            }
        }
        MemberCommand::Remove { name } => {
            let id = id_of(&name)?;
            let resp = cluster.member_remove(pb::MemberRemoveRequest { id }).await?.into_inner();
            println!("Member {id:x} removed from cluster {:x}", resp.header.unwrap_or_default().cluster_id);
            warn_even(&resp.members);
        }
        MemberCommand::Promote { name } => {
            let id = id_of(&name)?;
            let resp = cluster.member_promote(pb::MemberPromoteRequest { id }).await?.into_inner();
            println!("Member {id:x} promoted in cluster {:x}", resp.header.unwrap_or_default().cluster_id);
            warn_even(&resp.members);
        }
        MemberCommand::Update { name, peer_urls } => {
            let id = id_of(&name)?;
            let urls = peer_urls.split(',').filter(|u| !u.is_empty()).map(str::to_string).collect();
            let resp = cluster.member_update(pb::MemberUpdateRequest { id, peer_ur_ls: urls }).await?.into_inner();
            println!("Member {id:x} updated in cluster {:x}", resp.header.unwrap_or_default().cluster_id);
        }
        MemberCommand::TransferLeadership { name } => {
            let id = id_of(&name)?;
            pb::maintenance_client::MaintenanceClient::new(ch)
                .move_leader(pb::MoveLeaderRequest { target_id: id })
                .await?;
            println!("Leadership transferred to {name} ({id:x})");
        }
    }
    Ok(0)
}

/// `lockctl failover ...`
#[derive(clap::Subcommand)]
pub enum FailoverCommand {
    /// FENCE: record on each member of ENDPOINTS (every one, not the first that answers) that
    /// the failover into revision epoch EPOCH fenced it out: it refuses writes from then on,
    /// also after a restart, until `lockctl failover rejoin`.
    Fence {
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        #[arg(long)]
        epoch: u64,
    },
    /// Run a vantage point of an active-passive pair (the arbiter in a third region): grant the
    /// primary's leader its region write lease, and probe the primary for DETECT, until
    /// interrupted.
    Vantage {
        /// Where to serve `geolockpb.Vantage` (`host:port`).
        #[arg(long)]
        listen: String,
        /// The primary's members' client endpoints, comma-separated.
        #[arg(long)]
        primary: String,
        /// How often to probe the primary, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        probe_interval_ms: u64,
        /// How the primary's members are probed (Status needs a user while auth is on).
        #[command(flatten)]
        creds: crate::cli::CredentialArgs,
    },
    /// Where the failover controller whose journal is JOURNAL stands, and its timeline.
    Status {
        #[arg(long)]
        journal: std::path::PathBuf,
    },
    /// Approve, at the failover controller at ENDPOINTS (its `listen` address), the failover
    /// that awaits approval with TOKEN (hexadecimal, as the controller's log and `lockctl
    /// failover status` print it).
    Approve {
        #[command(flatten)]
        client: crate::cli::EndpointArgs,
        #[arg(long, value_parser = parse_token)]
        token: u64,
    },
    /// ROLLBACK: make a recovered member of the old primary (or a standby member JOIN did not
    /// reach) a learner of the new primary at ENDPOINTS (one member of it), never a voter.
    /// With `--member`, the member runs: it is wiped in place (its data is not kept) and
    /// restarts as the new primary's learner. With `--name`, `--peer-urls` and `--data-dir`,
    /// it is stopped: its data directory is moved aside (kept, for the lost window), it is
    /// added as a learner, and the flags to start it with are printed.
    Rejoin {
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        /// The running member's client endpoint.
        #[arg(long, conflicts_with_all = ["name", "peer_urls", "data_dir"], required_unless_present = "name")]
        member: Option<String>,
        /// The stopped member's name.
        #[arg(long, requires_all = ["peer_urls", "data_dir"])]
        name: Option<String>,
        /// Its peer URLs, comma-separated.
        #[arg(long)]
        peer_urls: Option<String>,
        /// Its data directory.
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
    /// How the vantage point at ENDPOINTS last saw the primary.
    Observe {
        #[command(flatten)]
        client: crate::cli::EndpointArgs,
    },
    /// PROMOTE: the learner at ENDPOINTS (one member) seeds a new cluster from the state it
    /// applied, in revision epoch EPOCH, and restarts as its leader.
    Promote {
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        #[arg(long)]
        epoch: u64,
    },
}

/// An approval token as printed: hexadecimal, with or without `0x`.
fn parse_token(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|e| format!("an approval token is hexadecimal, as the controller printed it: {e}"))
}

/// Run a `lockctl failover` command. Prints one line a member; exits 1 if any member was not
/// fenced.
pub async fn failover(cmd: FailoverCommand) -> Result<u8, CommandError> {
    match cmd {
        FailoverCommand::Fence { client, epoch } => {
            let mut failed = 0;
            let mut fenced = Vec::new();
            let primary = client.cluster()?;
            for endpoint in client.endpoints.split(',').filter(|e| !e.is_empty()) {
                match geolock_client::failover::fence(&primary.at(endpoint), epoch).await {
                    Ok(r) => {
                        let member = r.header.unwrap_or_default().member_id;
                        println!(
                            "{endpoint}: member {member:x} fenced by epoch {}, applied index {}",
                            r.fenced_epoch, r.applied_index
                        );
                        fenced.push((member, r.voter_configs.into_iter().map(|v| v.ids).collect()));
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{endpoint}: not fenced: {e}");
                    }
                }
            }
            match geolock_client::failover::fenced_by_majority(&fenced) {
                true => println!("a majority of every voter set is fenced: the old primary cannot commit again"),
                false => println!("not a majority of the voters: the old primary may still commit"),
            }
            Ok(u8::from(failed > 0))
        }
        FailoverCommand::Vantage { listen, primary, probe_interval_ms, creds } => {
            let primary = creds.reach(&primary)?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|source| CommandError::Listen { addr: listen.clone(), source })?;
            let vantage = geolock_client::failover::Vantage::new(true, None);
            let every = std::time::Duration::from_millis(probe_interval_ms.max(1));
            tokio::spawn(vantage.clone().watch_primary(primary, every));
            eprintln!("lockctl: vantage point on {listen}, granting the region write lease");
            tokio::select! {
                served = vantage.serve(listener) => served.map_err(|e| tonic::Status::unavailable(e.to_string()))?,
                _ = geolock_server::roles::until_signal() => {}
            }
            Ok(0)
        }
        FailoverCommand::Status { journal } => {
            let records = geolock_client::journal::Journal::read(&journal).map_err(|e| {
                CommandError::ControllerConfig { path: journal.display().to_string(), detail: e.to_string() }
            })?;
            use geolock_client::failover::{Phase, Runbook};
            let runbook = Runbook::replayed(&records);
            match runbook.phase() {
                Phase::AwaitingApproval { token, expires_at_ms } => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    match expires_at_ms.checked_sub(now) {
                        Some(left) => println!(
                            "awaiting approval: lockctl failover approve --token {token:x} (valid for {} s more)",
                            left / 1000
                        ),
                        None => println!("awaiting approval; token {token:x} has expired, a new one follows"),
                    }
                }
                Phase::Watching if !runbook.armed() => {
                    println!("waiting to see the primary healthy once ({} records)", records.len())
                }
                Phase::Watching => println!("watching the primary ({} records)", records.len()),
                Phase::Deciding { epoch } | Phase::Running { epoch, .. } | Phase::WaitingForLease { epoch } => {
                    println!("failing over into revision epoch {epoch}")
                }
                Phase::Done { epoch } => println!("failed over into revision epoch {epoch}"),
            }
            for line in geolock_client::failover::timeline(&records) {
                println!("{line}");
            }
            if !matches!(runbook.phase(), Phase::Watching | Phase::AwaitingApproval { .. }) {
                let window = geolock_client::failover::lost_window(&records);
                println!("{}", geolock_client::failover::describe_lost_window(window));
            }
            Ok(0)
        }
        FailoverCommand::Approve { client, token } => {
            let epoch = geolock_client::failover::approve(&client.endpoints, token).await?;
            println!("approved: failing over into revision epoch {epoch}");
            Ok(0)
        }
        FailoverCommand::Rejoin { client, member: Some(member), .. } => {
            let new = geolock_client::failover::NewPrimary::ask(&client.cluster()?)
                .await
                .map_err(|e| CommandError::Rejoin(e.to_string()))?;
            let name = geolock_client::failover::join(&new, &member, false).await?;
            println!(
                "{name} wiped and restarting as a learner of the primary in revision epoch {} (cluster {:x})",
                new.epoch, new.cluster_id
            );
            Ok(0)
        }
        FailoverCommand::Rejoin { client, member: None, name, peer_urls, data_dir } => {
            let (Some(name), Some(peer_urls), Some(data_dir)) = (name, peer_urls, data_dir) else {
                return Err(CommandError::Rejoin("give --member, or --name with --peer-urls and --data-dir".into()));
            };
            let new = geolock_client::failover::NewPrimary::ask(&client.cluster()?)
                .await
                .map_err(|e| CommandError::Rejoin(e.to_string()))?;
            if data_dir.exists() {
                let secs =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let mut aside = data_dir.clone().into_os_string();
                aside.push(format!(".before-rejoin-{secs}"));
                std::fs::rename(&data_dir, &aside)
                    .map_err(|e| CommandError::Rejoin(format!("moving {} aside: {e}", data_dir.display())))?;
                println!(
                    "moved {} to {} (the old primary's data, for the lost window: remove it when done)",
                    data_dir.display(),
                    std::path::Path::new(&aside).display()
                );
            }
            println!("joining the primary in revision epoch {} as a learner", new.epoch);
            member(&new.at, MemberCommand::Add { name, peer_urls, learner: true }).await
        }
        FailoverCommand::Observe { client } => {
            match geolock_client::failover::observe(&client.endpoints).await? {
                None => println!("not yet observed"),
                Some((age, h)) => println!(
                    "{} {} ms ago: {}",
                    if h.healthy { "healthy" } else { "unhealthy" },
                    age.as_millis(),
                    h.detail
                ),
            }
            Ok(0)
        }
        FailoverCommand::Promote { client, epoch } => {
            let r = geolock_client::failover::promote(&client.cluster()?, epoch).await?;
            println!(
                "member {:x} seeds cluster {:x} in revision epoch {epoch} from applied index {} ({} received entries dropped)",
                r.header.unwrap_or_default().member_id,
                r.cluster_id,
                r.applied_index,
                r.dropped_entries
            );
            Ok(0)
        }
    }
}

/// `lockctl failover-controller --config FILE`: run the controller until the failover is done.
pub async fn failover_controller(path: &std::path::Path) -> Result<u8, CommandError> {
    let bad = |detail: String| CommandError::ControllerConfig { path: path.display().to_string(), detail };
    let cfg: geolock_client::controller::ControllerConfig = config::Config::builder()
        .add_source(config::File::from(path))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| bad(e.to_string()))?;
    let epoch = geolock_client::controller::run(cfg).await?;
    println!("failed over into revision epoch {epoch}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_client_library_splits_revisions_into_epochs_as_the_key_space_does() {
        assert_eq!(geolock_client::failover::REV_COUNTER_BITS, geolock_core::kv::REV_COUNTER_BITS);
        for rev in [0, 1, (1 << 40) - 1, 1 << 40, 3 << 40 | 7, i64::MAX] {
            assert_eq!(geolock_client::failover::epoch_of(rev), geolock_core::kv::epoch_of(rev), "{rev}");
        }
    }
}
