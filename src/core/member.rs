//! Member identity: how a member's ID follows from its name, and the roles a member plays.

use serde::{Deserialize, Serialize};

/// The role a member is started in (DESIGN.md "Roles"): what `--role` and a topology file's
/// `role:` say. Replicated records carry their own type (the server's `MemberRole`), so that
/// this one can change with configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Votes and holds the key space.
    #[default]
    Voter,
    /// Votes and holds only the tail of the log.
    Witness,
    /// Holds the key space and serves reads and watches; does not vote.
    Learner,
}

impl std::fmt::Display for Role {
    /// As `--role` takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Voter => "voter",
            Role::Witness => "witness",
            Role::Learner => "learner",
        })
    }
}

/// A member ID derived from its name (FNV-1a, 64 bits; never 0, which etcd's API reads as "no
/// member"): stable across restarts and the same on every member, so that a name given to
/// `lockctl member add` and the ID every member shows agree without a round of messages.
pub fn member_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_are_stable_and_nonzero() {
        assert_eq!(member_id("n1"), member_id("n1"));
        assert_ne!(member_id("n1"), member_id("n2"));
        assert_ne!(member_id(""), 0);
    }
}
