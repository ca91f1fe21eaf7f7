//! The formats a member writes to its log, its snapshots and its state-machine metadata, and
//! sends to other members inside log entries and snapshots: the replicated and persisted formats.
//!
//! Every record starts with [`FORMAT_VERSION`]; a reader refuses a record of a version it does
//! not know rather than misread it. The body is postcard, which encodes an enum variant by its
//! position and a struct field by its place: so the types written here (`Command` and the
//! requests inside it from the core, [`Member`], [`MemberRole`], openraft's log ids, votes and
//! memberships, [`SnapshotData`]) only ever gain variants at their end, and any other change
//! to them is a new version. `format_fixture.bin`, written by version 1, must decode to the same
//! values and re-encode to the same bytes (the tests below), so a change that breaks the format
//! fails here rather than on a running cluster.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::Role;
use geolock_core::storage::{Cf, Pairs};

/// The version of every record this build writes and the only one it reads.
pub(super) const FORMAT_VERSION: u8 = 1;

/// A record that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("empty record")]
    Empty,
    #[error("a record of format version {found}: this build reads version {FORMAT_VERSION} only")]
    Version { found: u8 },
    #[error("a record of format version {FORMAT_VERSION} does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("a snapshot holds column family {name:?}, which this build does not have")]
    UnknownColumnFamily { name: String },
}

impl From<FormatError> for std::io::Error {
    fn from(e: FormatError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// `v` as a record: the version byte, then its postcard encoding.
pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // Encoding into a Vec fails only for types serde cannot express (maps with non-string keys
    // in some formats, sequences of unknown length); none of ours is one.
    postcard::to_io(v, &mut out).expect("replicated types encode");
    out
}

/// The value of a record written by [`encode`].
pub(super) fn decode<T: DeserializeOwned>(record: &[u8]) -> Result<T, FormatError> {
    match record.split_first() {
        None => Err(FormatError::Empty),
        Some((&FORMAT_VERSION, body)) => Ok(postcard::from_bytes(body)?),
        Some((&found, _)) => Err(FormatError::Version { found }),
    }
}

/// The record [`encode`] wrote under `key` in `cf`, if any; `what` names it in the error
/// a record that does not decode gives.
pub(super) fn read<T: DeserializeOwned>(
    engine: &dyn geolock_core::storage::Engine,
    cf: geolock_core::storage::Cf,
    key: &[u8],
    what: &'static str,
) -> Result<Option<T>, geolock_core::storage::StorageError> {
    engine
        .get(cf, key)?
        .map(|v| decode(&v).map_err(|e| geolock_core::storage::StorageError::Corrupt { what, detail: e.to_string() }))
        .transpose()
}

/// A member's role as the membership records it, apart from the configuration's [`Role`], so
/// that a change to configuration cannot change what is replicated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberRole {
    #[default]
    Voter,
    Witness,
    Learner,
}

impl From<Role> for MemberRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Voter => MemberRole::Voter,
            Role::Witness => MemberRole::Witness,
            Role::Learner => MemberRole::Learner,
        }
    }
}

impl From<MemberRole> for Role {
    fn from(r: MemberRole) -> Self {
        match r {
            MemberRole::Voter => Role::Voter,
            MemberRole::Witness => Role::Witness,
            MemberRole::Learner => Role::Learner,
        }
    }
}

/// A snapshot's contents: every pair of the state machine's column families, each family named
/// as on disk (never by its place in a list, which a new family would shift).
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapshotData {
    families: Vec<(String, Pairs)>,
}

impl SnapshotData {
    /// The snapshot of these column families' pairs.
    pub(super) fn new(families: Vec<(Cf, Pairs)>) -> SnapshotData {
        SnapshotData { families: families.into_iter().map(|(cf, pairs)| (cf.name().to_string(), pairs)).collect() }
    }

    /// The same snapshot with the pairs of `cf` alone.
    pub(super) fn only(self, cf: Cf) -> SnapshotData {
        SnapshotData { families: self.families.into_iter().filter(|(name, _)| name == cf.name()).collect() }
    }

    /// Every column family's pairs; refused if it names a family this build does not have.
    pub(super) fn into_families(self) -> Result<Vec<(Cf, Pairs)>, FormatError> {
        self.families
            .into_iter()
            .map(|(name, pairs)| match Cf::ALL.into_iter().find(|cf| cf.name() == name) {
                Some(cf) => Ok((cf, pairs)),
                None => Err(FormatError::UnknownColumnFamily { name }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::entry::RaftEntry;
    use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, StoredMembershipOf, VoteOf};
    use openraft::Membership;

    use super::super::{Member, TypeConfig};
    use super::*;
    use geolock_core::kv::{PutRequest, RequestOp, TxnRequest};
    use geolock_core::machine::Command;

    type Entry = EntryOf<TypeConfig>;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/raft/format_fixture.bin");

    fn log_id(term: u64, index: u64) -> LogIdOf<TypeConfig> {
        openraft::testing::log_id::<TypeConfig>(term, 7, index)
    }

    fn membership() -> Membership<u64, Member> {
        let member = |name: &str, role| Member {
            name: name.into(),
            peer_addr: format!("{name}:2380"),
            peer_urls: vec![format!("https://{name}:2380")],
            client_urls: vec![format!("https://{name}:2379")],
            role,
            region: "us-east".into(),
        };
        let nodes = BTreeMap::from([
            (1, member("a", MemberRole::Voter)),
            (2, member("w", MemberRole::Witness)),
            (3, member("l", MemberRole::Learner)),
        ]);
        Membership::new(vec![BTreeSet::from([1, 2])], nodes).unwrap()
    }

    /// One of each record version 1 writes, each encoded on its own.
    fn records() -> Vec<Vec<u8>> {
        let put =
            PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), lease: 0x1234, prev_kv: true, ..Default::default() };
        let txn = TxnRequest { compare: vec![], success: vec![RequestOp::Put(put.clone())], failure: vec![] };
        let entries: Vec<Entry> = vec![
            Entry::new_blank(log_id(2, 10)),
            Entry::new_normal(log_id(2, 11), Command::Put(put)),
            Entry::new_normal(log_id(2, 12), Command::Txn(txn)),
            Entry::new_normal(log_id(2, 13), Command::LeaseGrant { id: 0x1234, ttl_s: 30 }),
            Entry::new_normal(log_id(2, 14), Command::Compact { revision: 5 }),
            Entry::new_membership(log_id(2, 15), membership()),
        ];
        let stored = StoredMembershipOf::<TypeConfig>::new(Some(log_id(2, 15)), membership());
        let meta = SnapshotMetaOf::<TypeConfig> { last_log_id: Some(log_id(2, 15)), last_membership: stored.clone() };
        let data = SnapshotData::new(vec![(Cf::Kv, vec![(b"rev".to_vec(), b"kv".to_vec())]), (Cf::Lease, vec![])]);
        let mut out: Vec<Vec<u8>> = entries.iter().map(encode).collect();
        out.push(encode(&VoteOf::<TypeConfig>::new_committed(2, 7)));
        out.push(encode(&Some(log_id(1, 3))));
        out.push(encode(&stored));
        out.push(encode(&data));
        out.push(encode(&(&meta, encode(&data))));
        // Added to version 1 with revision epochs: a new command is a new variant at the end,
        // which leaves every record above as it was (an older member cannot read it, so a
        // failover's new cluster runs one build).
        out.push(encode(&Entry::new_normal(log_id(2, 16), Command::EnterEpoch { epoch: 3 })));
        out
    }

    #[test]
    fn version_1_records_decode_and_encode_as_the_fixture_holds_them() {
        let want = records();
        if std::env::var_os("GEOLOCK_WRITE_FORMAT_FIXTURE").is_some() {
            std::fs::write(FIXTURE, postcard::to_allocvec(&want).unwrap()).unwrap();
        }
        let fixture: Vec<Vec<u8>> = postcard::from_bytes(&std::fs::read(FIXTURE).unwrap()).unwrap();
        assert_eq!(fixture.len(), want.len(), "the fixture holds one record of each kind");
        // Byte for byte: a change to any type inside these records shows here.
        for (i, (got, want)) in fixture.iter().zip(&want).enumerate() {
            assert_eq!(got, want, "record {i} no longer encodes as version 1 wrote it");
        }
        // And they read back as the values they were written from.
        let entry: Entry = decode(&fixture[1]).unwrap();
        assert_eq!(entry.log_id, log_id(2, 11));
        let stored: StoredMembershipOf<TypeConfig> = decode(&fixture[8]).unwrap();
        assert_eq!(stored.membership().get_node(&2).unwrap().role, MemberRole::Witness);
        let data: SnapshotData = decode(&fixture[9]).unwrap();
        let families = data.into_families().unwrap();
        assert_eq!(families[0], (Cf::Kv, vec![(b"rev".to_vec(), b"kv".to_vec())]));
    }

    #[test]
    fn a_record_of_another_version_or_none_is_refused() {
        let mut record = encode(&5u64);
        assert_eq!(decode::<u64>(&record).unwrap(), 5);
        record[0] = 2;
        assert!(matches!(decode::<u64>(&record), Err(FormatError::Version { found: 2 })));
        assert!(matches!(decode::<u64>(&[]), Err(FormatError::Empty)));
        assert!(matches!(decode::<u64>(&[FORMAT_VERSION]), Err(FormatError::Decode(_))));
        let unknown = SnapshotData { families: vec![("no_such_family".into(), vec![])] };
        assert!(matches!(unknown.into_families(), Err(FormatError::UnknownColumnFamily { .. })));
    }
}
