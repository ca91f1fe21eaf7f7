//! Topology files (`regions/*.yaml`): the regions, the one-way latency between each pair, and
//! the nodes that stand in each with their role and addresses. One file drives the local
//! multi-region harness (and, later, the Terraform deploy).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use geolock_core::limits::{CONFIG_FILE_BYTES_MAX, LINK_ONE_WAY_MS_MAX, MEMBERS_MAX};

/// Why a topology file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Not YAML of a topology's shape.
    #[error("topology: {0}")]
    Load(#[from] config::ConfigError),
    /// Over the bound on configuration files.
    #[error("topology file {path}: {len} bytes is over config_file_bytes_max ({max})")]
    FileTooLarge { path: PathBuf, len: u64, max: u64 },
    /// Unreadable.
    #[error("topology file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Well formed but inconsistent (the message names what).
    #[error("topology: {0}")]
    Invalid(String),
}

pub use geolock_core::member::Role;

/// A whole topology.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    pub name: String,
    pub regions: Vec<Region>,
    pub latency_ms: Latency,
    /// Raft timing for these latencies; the node defaults where absent.
    #[serde(default)]
    pub raft: RaftTiming,
    pub nodes: Vec<TopologyNode>,
    /// An active-passive pair's failover roles; none for a single cluster across regions.
    #[serde(default)]
    pub failover: Option<FailoverSpec>,
}

/// An active-passive pair (DESIGN.md "Region failover"): the voters' region is the primary;
/// the learners of the `standby` region may be promoted; the failover controller runs there,
/// beside the DNS server it updates, and the arbiter vantage point in the `arbiter` region.
/// Durations in milliseconds, as the controller's configuration takes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverSpec {
    pub standby: String,
    pub arbiter: String,
    /// The DNS zone and the clients' name in it, both absolute (`geolock.test.`).
    pub zone: String,
    pub client_name: String,
    pub write_lease_ms: u64,
    pub detect_window_ms: u64,
    pub probe_interval_ms: u64,
    pub clock_drift_ms: u64,
}

/// Raft timing a topology needs: over a WAN the heartbeat interval must exceed the longest round
/// trip between members (a heartbeat is given one interval to be answered), as etcd's tuning
/// guide also says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RaftTiming {
    pub heartbeat_interval_ms: Option<u64>,
    pub election_timeout_ms: Option<u64>,
}

/// A region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub name: String,
}

/// One-way latencies, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Between two nodes of the same region.
    pub same_region: f64,
    /// One entry for each pair of regions.
    pub between: Vec<Link>,
}

/// The one-way latency between two regions, the same both ways.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub a: String,
    pub b: String,
    pub one_way: f64,
}

/// A node of the topology.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyNode {
    pub name: String,
    pub region: String,
    pub role: Role,
    /// Client address, `host:port`.
    pub client: String,
    /// Peer address, `host:port`.
    pub peer: String,
}

impl Topology {
    /// Read and check a topology file.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let len =
            std::fs::metadata(path).map_err(|source| TopologyError::Read { path: path.to_path_buf(), source })?.len();
        if len > CONFIG_FILE_BYTES_MAX {
            return Err(TopologyError::FileTooLarge { path: path.to_path_buf(), len, max: CONFIG_FILE_BYTES_MAX });
        }
        let text =
            std::fs::read_to_string(path).map_err(|source| TopologyError::Read { path: path.to_path_buf(), source })?;
        Topology::parse(&text)
    }

    /// Parse and check a topology written in YAML.
    pub fn parse(yaml: &str) -> Result<Topology, TopologyError> {
        let t: Topology = config::Config::builder()
            .add_source(config::File::from_str(yaml, config::FileFormat::Yaml))
            .build()?
            .try_deserialize()?;
        t.check()?;
        Ok(t)
    }

    fn check(&self) -> Result<(), TopologyError> {
        let bad = |m: String| Err(TopologyError::Invalid(format!("topology {}: {m}", self.name)));
        let regions: BTreeSet<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
        if regions.len() != self.regions.len() {
            return bad("a region is named twice".into());
        }
        if self.nodes.len() > MEMBERS_MAX {
            return bad(format!("{} nodes is over members_max {MEMBERS_MAX}", self.nodes.len()));
        }
        let mut pairs = BTreeSet::new();
        for l in &self.latency_ms.between {
            if !regions.contains(l.a.as_str()) || !regions.contains(l.b.as_str()) || l.a == l.b {
                return bad(format!("latency between {} and {}: not two regions of this topology", l.a, l.b));
            }
            if !pairs.insert(pair(&l.a, &l.b)) {
                return bad(format!("latency between {} and {} is given twice", l.a, l.b));
            }
        }
        let lats = self.latency_ms.between.iter().map(|l| l.one_way).chain([self.latency_ms.same_region]);
        if let Some(ms) = lats.into_iter().find(|ms| !(0.0..=LINK_ONE_WAY_MS_MAX).contains(ms)) {
            return bad(format!("a latency of {ms} ms is outside 0..={LINK_ONE_WAY_MS_MAX} (link_one_way_ms_max)"));
        }
        for a in &regions {
            for b in &regions {
                if a < b && !pairs.contains(&pair(a, b)) {
                    return bad(format!("no latency given between {a} and {b}"));
                }
            }
        }
        if let Some(hb) = self.raft.heartbeat_interval_ms {
            let rtt = self.longest_round_trip();
            if Duration::from_millis(hb) <= rtt {
                return bad(format!(
                    "raft.heartbeat_interval_ms {hb} does not exceed the longest round trip, {} ms: heartbeats would time out",
                    rtt.as_millis()
                ));
            }
        }
        if let Some(f) = &self.failover {
            self.check_failover(f, &regions)?;
        }
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for n in &self.nodes {
            if !regions.contains(n.region.as_str()) {
                return bad(format!("node {} stands in unknown region {}", n.name, n.region));
            }
            if !names.insert(n.name.as_str()) {
                return bad(format!("node {} is named twice", n.name));
            }
            for addr in [&n.client, &n.peer] {
                if !addrs.insert(addr.as_str()) {
                    return bad(format!("address {addr} is used twice"));
                }
            }
        }
        Ok(())
    }

    fn check_failover(&self, f: &FailoverSpec, regions: &BTreeSet<&str>) -> Result<(), TopologyError> {
        let bad = |m: String| Err(TopologyError::Invalid(format!("topology {}: failover: {m}", self.name)));
        for (what, region) in [("standby", &f.standby), ("arbiter", &f.arbiter)] {
            if !regions.contains(region.as_str()) {
                return bad(format!("{what} region {region} is not a region of this topology"));
            }
        }
        let Some(primary) = self.primary_region() else {
            return bad("the voters (and only voters: no witness) must stand in one region, the primary".into());
        };
        if [&f.standby, &f.arbiter].contains(&&primary.to_string()) || f.standby == f.arbiter {
            return bad(format!("the primary ({primary}), standby and arbiter regions must be three"));
        }
        if !self.nodes.iter().any(|n| n.role == Role::Learner && n.region == f.standby) {
            return bad(format!("no learner stands in the standby region {} to be promoted", f.standby));
        }
        for (what, name) in [("zone", &f.zone), ("client_name", &f.client_name)] {
            if !name.ends_with('.') {
                return bad(format!("{what} {name:?} must be absolute (end with a dot)"));
            }
        }
        if !f.client_name.ends_with(&format!(".{}", f.zone)) {
            return bad(format!("client_name {} is not in zone {}", f.client_name, f.zone));
        }
        Ok(())
    }

    /// The one region every voting member stands in, when there is one and no witness: an
    /// active-passive pair's primary.
    pub fn primary_region(&self) -> Option<&str> {
        let mut voting = self.nodes.iter().filter(|n| n.role != Role::Learner);
        let first = voting.next()?;
        let one = first.role == Role::Voter && voting.all(|n| n.role == Role::Voter && n.region == first.region);
        one.then_some(first.region.as_str())
    }

    /// The one-way delay between two regions.
    pub fn one_way(&self, a: &str, b: &str) -> Duration {
        let ms = if a == b {
            self.latency_ms.same_region
        } else {
            self.latency_ms.between.iter().find(|l| pair(&l.a, &l.b) == pair(a, b)).map_or(0.0, |l| l.one_way)
        };
        Duration::from_secs_f64(ms / 1000.0)
    }

    /// The longest round trip between two regions that hold members.
    pub fn longest_round_trip(&self) -> Duration {
        let mut longest = Duration::ZERO;
        for a in &self.nodes {
            for b in &self.nodes {
                longest = longest.max(self.one_way(&a.region, &b.region) * 2);
            }
        }
        longest
    }

    /// Members that vote (voters and witnesses), per region.
    pub fn votes_per_region(&self) -> BTreeMap<&str, usize> {
        let mut out: BTreeMap<&str, usize> = self.regions.iter().map(|r| (r.name.as_str(), 0)).collect();
        for n in self.nodes.iter().filter(|n| n.role != Role::Learner) {
            *out.entry(n.region.as_str()).or_default() += 1;
        }
        out
    }

    /// Regions whose loss would leave fewer than a majority of the votes: the topology does not
    /// survive losing any of them.
    pub fn regions_that_take_the_majority(&self) -> Vec<&str> {
        let votes = self.votes_per_region();
        let total: usize = votes.values().sum();
        votes.into_iter().filter(|(_, v)| (total - v) * 2 <= total).map(|(r, _)| r).collect()
    }
}

fn pair<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_TWO_ONE: &str = include_str!("../../regions/2-2-1.yaml");

    #[test]
    fn the_2_2_1_topology_loads_and_survives_the_loss_of_any_region() {
        let t = Topology::parse(TWO_TWO_ONE).unwrap();
        assert_eq!(t.one_way("us-east", "us-west"), Duration::from_millis(30));
        assert_eq!(t.one_way("europe", "us-east"), Duration::from_millis(50));
        assert_eq!(t.one_way("us-west", "us-west"), Duration::from_micros(500));
        let count = |role| t.nodes.iter().filter(|n| n.role == role).count();
        assert_eq!((count(Role::Voter), count(Role::Witness), count(Role::Learner)), (4, 1, 3));
        let votes = t.votes_per_region();
        assert_eq!(votes.values().copied().collect::<Vec<_>>(), vec![1, 2, 2]); // europe, us-east, us-west
        assert!(t.regions_that_take_the_majority().is_empty());
        // Without the witness, losing either data region loses the majority.
        let mut two_two = t.clone();
        two_two.nodes.retain(|n| n.role != Role::Witness);
        assert_eq!(two_two.regions_that_take_the_majority(), vec!["us-east", "us-west"]);
    }

    const ACTIVE_PASSIVE: &str = include_str!("../../regions/active-passive.yaml");

    #[test]
    fn the_active_passive_topology_loads_with_its_failover_roles() {
        let t = Topology::parse(ACTIVE_PASSIVE).unwrap();
        assert_eq!(t.primary_region(), Some("us-east"));
        let f = t.failover.as_ref().unwrap();
        assert_eq!((f.standby.as_str(), f.arbiter.as_str()), ("us-west", "europe"));
        let count = |role, region: &str| t.nodes.iter().filter(|n| n.role == role && n.region == region).count();
        assert_eq!((count(Role::Voter, "us-east"), count(Role::Learner, "us-west")), (3, 3));
        // Losing the primary region loses the majority: the failover controller is what recovers.
        assert_eq!(t.regions_that_take_the_majority(), vec!["us-east"]);
        let with = |from: &str, to: &str| Topology::parse(&ACTIVE_PASSIVE.replace(from, to)).unwrap_err().to_string();
        assert!(with("arbiter: europe", "arbiter: asia").contains("arbiter region asia is not a region"));
        assert!(with("arbiter: europe", "arbiter: us-west").contains("must be three"));
        // A witness among the primary's voters: no single region of voters only.
        let witness = with("role: voter, client: \"127.0.1.3", "role: witness, client: \"127.0.1.3");
        assert!(witness.contains("must stand in one region"), "{witness}");
        assert!(with("client_name: clients.geolock.test.", "client_name: clients.example.com.").contains("not in zone"));
        assert!(with("zone: geolock.test.", "zone: geolock.test").contains("must be absolute"));
    }

    #[test]
    fn mistakes_in_a_topology_are_named() {
        let missing_link = TWO_TWO_ONE.replace("    - { a: us-west, b: europe, one_way: 70 }\n", "");
        let e = Topology::parse(&missing_link).unwrap_err().to_string();
        assert!(e.contains("no latency given between europe and us-west"), "{e}");
        let unknown = TWO_TWO_ONE.replace("region: europe, role: witness", "region: asia, role: witness");
        let e = Topology::parse(&unknown).unwrap_err().to_string();
        assert!(e.contains("node node-5 stands in unknown region asia"), "{e}");
        let slow = TWO_TWO_ONE.replace("one_way: 70", "one_way: 70000");
        let e = Topology::parse(&slow).unwrap_err().to_string();
        assert!(e.contains("link_one_way_ms_max"), "{e}");
        let twice = TWO_TWO_ONE.replace("127.0.1.2:2380", "127.0.1.1:2380");
        let e = Topology::parse(&twice).unwrap_err().to_string();
        assert!(e.contains("address 127.0.1.1:2380 is used twice"), "{e}");
    }
}
