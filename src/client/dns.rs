//! The client name's DNS records and the one change REDIRECT makes to them: an RFC 2136 dynamic
//! update signed with TSIG (RFC 8945, hmac-sha256), sent to the zone's primary server.
//!
//! What clients resolve ([`Endpoint`]): the client name's A and AAAA records (the active region's
//! client addresses) and its `_etcd-client._tcp` SRV records (the name etcd's DNS discovery looks
//! up; RFC 2782 target and port, one per member). [`Updater::swap`] replaces the three record sets
//! in one update message whose prerequisites are the sets it expects to find (RFC 2136 §2.4.2
//! "RRset exists (value dependent)", or §2.4.3 "RRset does not exist" for an empty one), followed
//! by a delete of each set (§2.5.2) and the new records (§2.5.1). The server applies all of it or
//! none of it (§3.2, §3.4), so the change is a compare-and-swap: it is refused when anyone changed
//! the records since they were read, and a second run of the same swap finds them already moved.
//!
//! Messages are hickory-proto's, signed and checked with its `TSigner`, exchanged over one TCP
//! connection with RFC 1035 §4.2.2's two-byte length prefix. Not hickory-net's client: its
//! multiplexer numbers a message after it is built (which breaks a signature made before), and it
//! verifies the answer's TSIG before the answer's code can be seen, so BADKEY and BADSIG (answers
//! the server cannot sign) would arrive as one indistinct verification error. Here each refusal
//! keeps its own [`DnsError`].

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::tsig::{TsigAlgorithm, TsigError};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, TSigner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The SRV owner name under the client name: the one etcd's clients look up for
/// `--discovery-srv` without TLS.
pub const SRV_PREFIX: &str = "_etcd-client._tcp";

/// At most this many addresses and this many SRV targets in an [`Endpoint`]: a region's members,
/// with room. It keeps one update (three sets out, three in, with prerequisites) far below TCP
/// DNS's 65,535-byte message.
pub const ENDPOINT_RECORDS_MAX: usize = 64;

/// TSIG's fudge: how far apart the controller's and the server's clocks may be, in seconds.
/// RFC 8945 §10 recommends 300.
pub const TSIG_FUDGE_S: u16 = 300;

/// A TSIG key as BIND's `key` statement gives it: a name and an hmac-sha256 secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TsigKey {
    pub name: String,
    pub secret: Vec<u8>,
}

impl TsigKey {
    /// A key from its name and its secret in base64 (as `tsig-keygen` writes it).
    ///
    /// Errors: [`DnsError::Key`] when the secret is not base64 or is empty.
    pub fn from_base64(name: &str, secret: &str) -> Result<TsigKey, DnsError> {
        let bad = |detail: String| DnsError::Key { key: name.to_string(), detail };
        let secret = data_encoding::BASE64.decode(secret.trim().as_bytes()).map_err(|e| bad(e.to_string()))?;
        if secret.is_empty() {
            return Err(bad("the secret is empty".into()));
        }
        Ok(TsigKey { name: name.to_string(), secret })
    }
}

impl fmt::Debug for TsigKey {
    /// The name only: a secret has no place in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TsigKey({})", self.name)
    }
}

/// One SRV record's target: a member's host name and client port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SrvTarget {
    /// Absolute, lower case, with its final dot.
    pub host: String,
    pub port: u16,
}

/// What clients resolve for the client name: its addresses and its members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub addrs: BTreeSet<IpAddr>,
    pub members: BTreeSet<SrvTarget>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addrs: Vec<String> = self.addrs.iter().map(|a| a.to_string()).collect();
        let members: Vec<String> = self.members.iter().map(|m| format!("{}:{}", m.host, m.port)).collect();
        write!(f, "[{}] srv [{}]", addrs.join(", "), members.join(", "))
    }
}

/// What a swap did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swapped {
    /// The server applied it now.
    Done,
    /// The records were already the new ones: an earlier run of the same swap applied it.
    AlreadyDone,
}

/// Why reading or changing the records failed. Each refusal of the server has its own variant,
/// so the runbook's log tells an operator which of key, secret, policy or records to look at.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{what} {name:?} is not a DNS name: {detail}")]
    Name { what: &'static str, name: String, detail: String },
    #[error("TSIG key {key}: {detail}")]
    Key { key: String, detail: String },
    #[error("an endpoint holds {count} records of one kind; at most {ENDPOINT_RECORDS_MAX} are allowed")]
    TooManyRecords { count: usize },
    #[error("DNS server {server}: {source}")]
    Io { server: SocketAddr, source: std::io::Error },
    #[error("DNS server {server} did not answer within {timeout_ms} ms")]
    Timeout { server: SocketAddr, timeout_ms: u64 },
    #[error("DNS server {server}: a message that cannot be read or written: {detail}")]
    Malformed { server: SocketAddr, detail: String },
    /// NOTAUTH with TSIG error BADKEY (RFC 8945 §5.2.1).
    #[error("DNS server {server} does not know TSIG key {key} (BADKEY): the key's name is not one the server has")]
    UnknownKey { server: SocketAddr, key: String },
    /// NOTAUTH with TSIG error BADSIG (RFC 8945 §5.2.2).
    #[error(
        "DNS server {server} rejected the signature made with TSIG key {key} (BADSIG): the secret is not the server's"
    )]
    BadSignature { server: SocketAddr, key: String },
    /// NOTAUTH with TSIG error BADTIME (RFC 8945 §5.2.3).
    #[error(
        "DNS server {server} rejected the time of the TSIG signature (BADTIME): its clock and ours differ by more than {TSIG_FUDGE_S} s"
    )]
    BadTime { server: SocketAddr },
    /// REFUSED to an update sent without a key.
    #[error("DNS server {server} refused an unsigned update of zone {zone}: configure the TSIG key its update-policy grants")]
    Unsigned { server: SocketAddr, zone: String },
    /// REFUSED to an update signed with a key the server knows.
    #[error("DNS server {server} refused the update of {name} signed with TSIG key {key}: the zone's update-policy does not grant that key this name")]
    RefusedByPolicy { server: SocketAddr, name: String, key: String },
    /// A prerequisite failed and the records are not the ones the swap would have set.
    #[error(
        "the records of {name} changed since they were read: expected {expected}, found {found}; nothing was updated"
    )]
    RecordsChanged { name: String, expected: Endpoint, found: Endpoint },
    /// NOTAUTH without a TSIG error, or NOTZONE.
    #[error("DNS server {server} is not the primary server of zone {zone} ({code})")]
    NotAuthoritative { server: SocketAddr, zone: String, code: ResponseCode },
    #[error("DNS server {server} answered {code} to {what}")]
    Answer { server: SocketAddr, what: &'static str, code: ResponseCode },
    /// A success that does not carry the key's valid signature: it may not be the server's.
    #[error("DNS server {server}'s answer to the update failed TSIG verification: {detail}")]
    Unverified { server: SocketAddr, detail: String },
}

/// Reads and swaps the client name's records at one server.
#[derive(Clone)]
pub struct Updater {
    server: SocketAddr,
    zone: Name,
    name: Name,
    srv_name: Name,
    key: Option<(String, TSigner)>,
    ttl_s: u32,
    timeout: Duration,
}

impl Updater {
    /// An updater for `name` (the client name) in `zone`, whose primary server is `server`;
    /// updates are signed with `key` when there is one. Records it adds live 30 s (so clients
    /// follow a failover within half a minute); answers are awaited 5 s.
    ///
    /// Errors: [`DnsError::Name`] when `zone` or `name` is not a DNS name or `name` is not in
    /// `zone`; [`DnsError::Key`] when hickory refuses the key.
    pub fn new(server: SocketAddr, zone: &str, name: &str, key: Option<TsigKey>) -> Result<Updater, DnsError> {
        let zone_name = absolute("zone", zone)?;
        let name_name = absolute("client name", name)?;
        if !zone_name.zone_of(&name_name) {
            return Err(DnsError::Name {
                what: "client name",
                name: name.into(),
                detail: format!("not in zone {zone}"),
            });
        }
        let srv_name = absolute("SRV name", &format!("{SRV_PREFIX}.{name_name}"))?;
        let key = match key {
            None => None,
            Some(k) => {
                let bad = |detail: String| DnsError::Key { key: k.name.clone(), detail };
                let key_name = absolute("TSIG key name", &k.name)?;
                let signer = TSigner::new(k.secret.clone(), TsigAlgorithm::HmacSha256, key_name, TSIG_FUDGE_S)
                    .map_err(|e| bad(e.to_string()))?;
                Some((k.name, signer))
            }
        };
        Ok(Updater {
            server,
            zone: zone_name,
            name: name_name,
            srv_name,
            key,
            ttl_s: 30,
            timeout: Duration::from_secs(5),
        })
    }

    /// The same updater, adding records that live `ttl_s` seconds.
    pub fn with_ttl_s(mut self, ttl_s: u32) -> Updater {
        self.ttl_s = ttl_s;
        self
    }

    /// The client name's records as the server has them now (an absent name or set is empty).
    pub async fn read(&self) -> Result<Endpoint, DnsError> {
        let mut found = Endpoint::default();
        for (owner, rtype) in
            [(&self.name, RecordType::A), (&self.name, RecordType::AAAA), (&self.srv_name, RecordType::SRV)]
        {
            for data in self.query(owner, rtype).await? {
                match data {
                    RData::A(a) => {
                        found.addrs.insert(IpAddr::V4(a.0));
                    }
                    RData::AAAA(a) => {
                        found.addrs.insert(IpAddr::V6(a.0));
                    }
                    RData::SRV(s) => {
                        let mut target = s.target.to_lowercase();
                        target.set_fqdn(true);
                        let host = target.to_string();
                        found.members.insert(SrvTarget { host, port: s.port });
                    }
                    _ => {}
                }
            }
        }
        Ok(found)
    }

    /// The members a client finds by DNS discovery of the client name (as etcd's
    /// `--discovery-srv`): each `_etcd-client._tcp` SRV target's A and AAAA addresses, as this
    /// server answers them, with the target's port. Empty when the name has no SRV record.
    ///
    /// Errors: the server's failure to answer, or an answer other than NOERROR and NXDOMAIN.
    pub async fn members(&self) -> Result<Vec<SocketAddr>, DnsError> {
        let mut found = Vec::new();
        for member in self.read().await?.members {
            let host = absolute("SRV target", &member.host)?;
            for rtype in [RecordType::A, RecordType::AAAA] {
                for data in self.query(&host, rtype).await? {
                    match data {
                        RData::A(a) => found.push(SocketAddr::new(IpAddr::V4(a.0), member.port)),
                        RData::AAAA(a) => found.push(SocketAddr::new(IpAddr::V6(a.0), member.port)),
                        _ => {}
                    }
                }
            }
        }
        Ok(found)
    }

    /// The `rtype` records of `owner` the server answers with.
    async fn query(&self, owner: &Name, rtype: RecordType) -> Result<Vec<RData>, DnsError> {
        let mut q = Message::query();
        q.add_query(Query::query(owner.clone(), rtype));
        let (answer, _) = self.exchange(q, false).await?;
        match answer.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            code => return Err(DnsError::Answer { server: self.server, what: "a query", code }),
        }
        Ok(answer.answers.into_iter().filter(|r| r.name == *owner).map(|r| r.data).collect())
    }

    /// Replace `expected` by `new` in one update whose prerequisites are `expected`.
    ///
    /// Errors: [`DnsError::RecordsChanged`] when the records are neither `expected` nor `new`;
    /// the refusals of the server each as their own variant; [`DnsError::Unverified`] when the
    /// server's success is not signed with the key.
    pub async fn swap(&self, expected: &Endpoint, new: &Endpoint) -> Result<Swapped, DnsError> {
        let update = self.update_message(expected, new)?;
        let signed = self.key.is_some();
        let (answer, verified) = self.exchange(update, true).await?;
        let server = self.server;
        let key = || self.key.as_ref().map(|(n, _)| n.clone()).unwrap_or_default();
        let tsig_error = answer.signature().and_then(|t| t.data.error);
        match answer.response_code {
            ResponseCode::NoError => match verified {
                Some(Err(detail)) => Err(DnsError::Unverified { server, detail }),
                _ => Ok(Swapped::Done),
            },
            ResponseCode::NotAuth => Err(match tsig_error {
                Some(TsigError::BadKey) => DnsError::UnknownKey { server, key: key() },
                Some(TsigError::BadSig) => DnsError::BadSignature { server, key: key() },
                Some(TsigError::BadTime) => DnsError::BadTime { server },
                _ => DnsError::NotAuthoritative { server, zone: self.zone.to_string(), code: answer.response_code },
            }),
            ResponseCode::Refused if signed => {
                Err(DnsError::RefusedByPolicy { server, name: self.name.to_string(), key: key() })
            }
            ResponseCode::Refused => Err(DnsError::Unsigned { server, zone: self.zone.to_string() }),
            ResponseCode::NXRRSet | ResponseCode::YXRRSet | ResponseCode::NXDomain | ResponseCode::YXDomain => {
                let found = self.read().await?;
                if found == *new {
                    Ok(Swapped::AlreadyDone)
                } else {
                    Err(DnsError::RecordsChanged { name: self.name.to_string(), expected: expected.clone(), found })
                }
            }
            ResponseCode::NotZone => {
                Err(DnsError::NotAuthoritative { server, zone: self.zone.to_string(), code: answer.response_code })
            }
            code => Err(DnsError::Answer { server, what: "the update", code }),
        }
    }

    /// The compare-and-swap message: for each of A, AAAA and SRV, the prerequisite that the set
    /// is `expected`'s, a delete of the set, and `new`'s records.
    fn update_message(&self, expected: &Endpoint, new: &Endpoint) -> Result<Message, DnsError> {
        let mut m = Message::new(0, MessageType::Query, OpCode::Update);
        m.add_zone(Query::query(self.zone.clone(), RecordType::SOA));
        for (owner, rtype) in
            [(&self.name, RecordType::A), (&self.name, RecordType::AAAA), (&self.srv_name, RecordType::SRV)]
        {
            let before = self.rdata(expected, rtype)?;
            if before.is_empty() {
                let mut absent = Record::update0(owner.clone(), 0, rtype);
                absent.dns_class = DNSClass::NONE;
                m.add_pre_requisite(absent);
            }
            for rdata in before {
                m.add_pre_requisite(Record::from_rdata(owner.clone(), 0, rdata));
            }
            let mut delete = Record::update0(owner.clone(), 0, rtype);
            delete.dns_class = DNSClass::ANY;
            m.add_update(delete);
            for rdata in self.rdata(new, rtype)? {
                m.add_update(Record::from_rdata(owner.clone(), self.ttl_s, rdata));
            }
        }
        Ok(m)
    }

    /// `endpoint`'s records of type `rtype`.
    fn rdata(&self, endpoint: &Endpoint, rtype: RecordType) -> Result<Vec<RData>, DnsError> {
        let count = endpoint.addrs.len().max(endpoint.members.len());
        if count > ENDPOINT_RECORDS_MAX {
            return Err(DnsError::TooManyRecords { count });
        }
        let mut out = Vec::new();
        match rtype {
            RecordType::A => out.extend(endpoint.addrs.iter().filter_map(|a| match a {
                IpAddr::V4(v4) => Some(RData::A(A(*v4))),
                IpAddr::V6(_) => None,
            })),
            RecordType::AAAA => out.extend(endpoint.addrs.iter().filter_map(|a| match a {
                IpAddr::V6(v6) => Some(RData::AAAA(AAAA(*v6))),
                IpAddr::V4(_) => None,
            })),
            _ => {
                for m in &endpoint.members {
                    let target = absolute("SRV target", &m.host)?;
                    out.push(RData::SRV(SRV::new(0, 0, m.port, target)));
                }
            }
        }
        Ok(out)
    }

    /// Send `msg` (signed when `sign` and there is a key) and read the answer. The second value
    /// is the TSIG verification of a signed exchange's answer: `None` when nothing was signed.
    async fn exchange(&self, mut msg: Message, sign: bool) -> Result<(Message, Option<Result<(), String>>), DnsError> {
        let server = self.server;
        let malformed = |detail: String| DnsError::Malformed { server, detail };
        msg.metadata.id = rand::random();
        msg.metadata.recursion_desired = false;
        if msg.op_code != OpCode::Update {
            msg.set_edns(Edns::new());
        }
        let mut verifier = None;
        if let (true, Some((_, signer))) = (sign, &self.key) {
            let now_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            verifier = msg.finalize(signer, now_s).map_err(|e| malformed(e.to_string()))?;
        }
        let bytes = msg.to_vec().map_err(|e| malformed(e.to_string()))?;
        let len = u16::try_from(bytes.len()).map_err(|_| malformed(format!("{} bytes", bytes.len())))?;
        let io = |source| DnsError::Io { server, source };
        let answer = async {
            let mut tcp = TcpStream::connect(server).await.map_err(io)?;
            tcp.write_all(&len.to_be_bytes()).await.map_err(io)?;
            tcp.write_all(&bytes).await.map_err(io)?;
            let answer_len = tcp.read_u16().await.map_err(io)?;
            let mut answer = vec![0; usize::from(answer_len)];
            tcp.read_exact(&mut answer).await.map_err(io)?;
            Ok::<_, DnsError>(answer)
        };
        let timeout_ms = self.timeout.as_millis() as u64;
        let raw = tokio::time::timeout(self.timeout, answer)
            .await
            .map_err(|_| DnsError::Timeout { server, timeout_ms })??;
        let answer = Message::from_vec(&raw).map_err(|e| malformed(e.to_string()))?;
        if answer.id != msg.id {
            return Err(malformed(format!("answer id {} to message id {}", answer.id, msg.id)));
        }
        let verified = verifier.map(|mut v| v.verify(&raw).map(drop).map_err(|e| e.to_string()));
        Ok((answer, verified))
    }
}

/// `name` as an absolute DNS name.
fn absolute(what: &'static str, name: &str) -> Result<Name, DnsError> {
    let n = Name::from_ascii(name).map_err(|e| DnsError::Name { what, name: name.into(), detail: e.to_string() })?;
    let mut n = n.to_lowercase();
    n.set_fqdn(true);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_keys_and_names_are_refused_before_anything_is_sent() {
        let server: SocketAddr = ([127, 0, 0, 1], 53).into();
        assert!(matches!(TsigKey::from_base64("k", "not base64!"), Err(DnsError::Key { .. })));
        assert!(matches!(TsigKey::from_base64("k", ""), Err(DnsError::Key { .. })));
        let key = TsigKey::from_base64("k", "c2VjcmV0").unwrap();
        assert_eq!(key.secret, b"secret");
        assert_eq!(format!("{key:?}"), "TsigKey(k)", "the secret stays out of logs");
        let e = Updater::new(server, "geolock.test", "clients.example.org", None).err().unwrap();
        assert_eq!(e.to_string(), "client name \"clients.example.org\" is not a DNS name: not in zone geolock.test");
        assert!(matches!(Updater::new(server, "geolock..test", "a.geolock.test", None), Err(DnsError::Name { .. })));
    }

    #[test]
    fn the_update_expects_each_set_as_it_was_read_then_replaces_it() {
        let server: SocketAddr = ([127, 0, 0, 1], 53).into();
        let dns = Updater::new(server, "geolock.test", "c.geolock.test", None).unwrap();
        let old = Endpoint {
            addrs: ["10.0.0.1".parse().unwrap()].into(),
            members: [SrvTarget { host: "n1.geolock.test.".into(), port: 2379 }].into(),
        };
        let new = Endpoint { addrs: ["fd00::2".parse().unwrap()].into(), members: BTreeSet::new() };
        let m = dns.update_message(&old, &new).unwrap();
        let show = |records: &[Record]| -> Vec<String> {
            records
                .iter()
                .map(|r| format!("{} {} {} {} {}", r.name, r.dns_class, r.ttl, r.record_type(), r.data))
                .collect()
        };
        assert_eq!(
            show(m.prerequisites()),
            [
                "c.geolock.test. IN 0 A 10.0.0.1",
                // No AAAA was read: the prerequisite is that there is none (RFC 2136 §2.4.3; hickory
                // shows an empty record as UPDATE).
                "c.geolock.test. NONE 0 AAAA UPDATE",
                "_etcd-client._tcp.c.geolock.test. IN 0 SRV 0 0 2379 n1.geolock.test.",
            ]
        );
        assert_eq!(
            show(m.updates()),
            [
                "c.geolock.test. ANY 0 A UPDATE",
                "c.geolock.test. ANY 0 AAAA UPDATE",
                "c.geolock.test. IN 30 AAAA fd00::2",
                "_etcd-client._tcp.c.geolock.test. ANY 0 SRV UPDATE",
            ]
        );
        let too_many = Endpoint { addrs: (0..=64u8).map(|i| [10, 0, 0, i].into()).collect(), ..Endpoint::default() };
        assert!(matches!(dns.update_message(&old, &too_many), Err(DnsError::TooManyRecords { count: 65 })));
    }
}
