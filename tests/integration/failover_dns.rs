//! REDIRECT's DNS change against a real BIND9: one signed compare-and-swap of the client name's
//! A, AAAA and SRV records, a no-op when run again, and each refusal of the server its own error.

use std::collections::BTreeSet;

use geolock_client::dns::{DnsError, Endpoint, SrvTarget, Swapped, TsigKey, Updater};
use geolock_testkit::bind::Bind;

use crate::common::{dig, rt};

const ZONE: &str = "geolock.test.";
const NAME: &str = "clients.geolock.test.";

/// A region's endpoint: client addresses `10.0.<region>.1..=3` and `fd00::<region>`, members
/// `n1..n3.<name>.geolock.test.` on port 2379.
fn region(n: u8, name: &str) -> Endpoint {
    let mut addrs: BTreeSet<std::net::IpAddr> = (1..=3).map(|h| [10, 0, n, h].into()).collect();
    addrs.insert(format!("fd00::{n}").parse().unwrap());
    let members = (1..=3).map(|i| SrvTarget { host: format!("n{i}.{name}.{ZONE}"), port: 2379 }).collect();
    Endpoint { addrs, members }
}

/// The zone-file lines that serve `e` at the client name.
fn zone_lines(e: &Endpoint) -> Vec<String> {
    let mut lines: Vec<String> =
        e.addrs.iter().map(|a| format!("{NAME} IN {} {a}", if a.is_ipv4() { "A" } else { "AAAA" })).collect();
    lines.extend(e.members.iter().map(|m| format!("_etcd-client._tcp.{NAME} IN SRV 0 0 {} {}", m.port, m.host)));
    lines
}

fn updater(bind: &Bind, key: Option<TsigKey>) -> Updater {
    Updater::new(bind.addr, ZONE, NAME, key).unwrap()
}

#[test]
fn one_signed_swap_moves_addresses_and_srv_together_and_running_it_again_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (east, west) = (region(1, "us-east"), region(2, "us-west"));
    let bind = Bind::start(dir.path(), ZONE, &zone_lines(&east)).unwrap();
    let dns = updater(&bind, Some(bind.key.clone()));
    rt().block_on(async {
        assert_eq!(dns.read().await.unwrap(), east);
        assert_eq!(dns.swap(&east, &west).await.unwrap(), Swapped::Done);
        assert_eq!(dns.read().await.unwrap(), west);
        // The step run again (a controller killed after the update and before its journal record).
        assert_eq!(dns.swap(&east, &west).await.unwrap(), Swapped::AlreadyDone);
        assert_eq!(dns.read().await.unwrap(), west);
    });
    assert_eq!(dig(&bind, NAME, "A"), ["10.0.2.1", "10.0.2.2", "10.0.2.3"]);
    assert_eq!(dig(&bind, NAME, "AAAA"), ["fd00::2"]);
    assert_eq!(
        dig(&bind, &format!("_etcd-client._tcp.{NAME}"), "SRV"),
        (1..=3).map(|i| format!("0 0 2379 n{i}.us-west.{ZONE}")).collect::<Vec<_>>()
    );
    // An empty endpoint is a real target too (a name withdrawn): the sets go, and come back.
    rt().block_on(async {
        assert_eq!(dns.swap(&west, &Endpoint::default()).await.unwrap(), Swapped::Done);
        assert_eq!(dns.read().await.unwrap(), Endpoint::default());
        assert_eq!(dns.swap(&Endpoint::default(), &east).await.unwrap(), Swapped::Done);
        assert_eq!(dns.read().await.unwrap(), east);
    });
}

#[test]
fn a_wrong_key_name_a_wrong_secret_no_key_a_refusing_policy_and_changed_records_each_fail_their_own_way() {
    let dir = tempfile::tempdir().unwrap();
    let (east, west, europe) = (region(1, "us-east"), region(2, "us-west"), region(3, "europe"));
    let bind = Bind::start(dir.path(), ZONE, &zone_lines(&east)).unwrap();
    let other_secret = TsigKey { name: bind.key.name.clone(), secret: bind.bystander_key.secret.clone() };
    let unknown = TsigKey { name: "nobody".into(), secret: bind.key.secret.clone() };
    rt().block_on(async {
        let tries = [
            (updater(&bind, Some(unknown)), &east),
            (updater(&bind, Some(other_secret)), &east),
            (updater(&bind, None), &east),
            (updater(&bind, Some(bind.bystander_key.clone())), &east),
            // Right key, but the records are not the ones expected (someone moved them).
            (updater(&bind, Some(bind.key.clone())), &europe),
        ];
        let mut errors = Vec::new();
        for (dns, expected) in &tries {
            errors.push(dns.swap(expected, &west).await.unwrap_err());
        }
        let [unknown, bad_sig, unsigned, policy, changed] = &errors[..] else { unreachable!() };
        assert!(matches!(unknown, DnsError::UnknownKey { key, .. } if key == "nobody"), "{unknown}");
        assert!(matches!(bad_sig, DnsError::BadSignature { key, .. } if key == "geolock-failover"), "{bad_sig}");
        assert!(matches!(unsigned, DnsError::Unsigned { zone, .. } if zone == ZONE), "{unsigned}");
        assert!(matches!(policy, DnsError::RefusedByPolicy { key, .. } if key == "bystander"), "{policy}");
        assert!(
            matches!(changed, DnsError::RecordsChanged { expected, found, .. } if *expected == europe && *found == east),
            "{changed}"
        );
        let texts: BTreeSet<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(texts.len(), errors.len(), "each error reads differently: {texts:#?}");
        // None of them changed anything.
        assert_eq!(updater(&bind, None).read().await.unwrap(), east);
    });
    assert_eq!(dig(&bind, NAME, "A"), ["10.0.1.1", "10.0.1.2", "10.0.1.3"]);
    // named's own account of each refusal, in the order sent.
    let log = bind.log();
    let reasons = [
        "TSIG nobody: tsig verify failure (BADKEY)",
        "TSIG geolock-failover: tsig verify failure (BADSIG)",
        "updating zone 'geolock.test/IN': update failed: rejected by secure update (REFUSED)",
        "key bystander: updating zone 'geolock.test/IN': update failed: rejected by secure update (REFUSED)",
        "prerequisite not satisfied (NXRRSET)",
    ];
    let at: Vec<Option<usize>> = reasons.iter().map(|r| log.find(r)).collect();
    assert!(at.iter().all(Option::is_some) && at.is_sorted(), "{at:?} in named's log:\n{log}");
}

/// Found by `lockctl dev --topology regions/active-passive.yaml` run from a working directory:
/// named changes to its directory before it reads the zone, so a relative directory named
/// another place and the zone was not loaded (and named ran without it). A relative directory
/// now works, and a zone that does not load is an error at start.
#[test]
fn named_started_on_a_relative_directory_loads_its_zone_and_a_bad_zone_is_refused() {
    let dir = tempfile::Builder::new().prefix(".bind-relative").tempdir_in(".").unwrap();
    let relative = std::path::Path::new(".").join(dir.path().file_name().unwrap());
    let bind = Bind::start(&relative, ZONE, &zone_lines(&region(1, "us-east"))).unwrap();
    assert_eq!(dig(&bind, NAME, "A"), ["10.0.1.1", "10.0.1.2", "10.0.1.3"]);
    drop(bind);
    let bad = tempfile::tempdir().unwrap();
    let e = Bind::start(bad.path(), ZONE, &["this is not a record".to_string()]).err().expect("refused");
    assert!(e.to_string().contains("named did not load the zone"), "{e}");
}
