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
