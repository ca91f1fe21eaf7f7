//! Leases through etcdctl, compared with etcd, and attached keys going away on revoke and expiry.

use std::time::{Duration, Instant};

use crate::common::{etcdctl, etcdctl_ok, Etcd, GeoNode};

/// The hex lease ID from "lease 694d77aa9e38260f granted with TTL(10s)".
fn lease_id(grant_output: &str) -> String {
    grant_output.split_whitespace().nth(1).expect("lease id").to_string()
}

/// Replace the lease ID and the (timing-dependent) remaining TTL, and sort the attached keys
/// (etcd lists them in map order), so outputs can be compared.
fn mask(text: &str, id: &str) -> String {
    let mut t = text.replace(id, "ID");
    if let Some(i) = t.find("attached keys([") {
        let start = i + "attached keys([".len();
        let end = t[start..].find("])").map_or(t.len(), |j| start + j);
        let mut keys: Vec<&str> = t[start..end].split(' ').collect();
        keys.sort();
        t = format!("{}{}{}", &t[..start], keys.join(" "), &t[end..]);
    }
    match t.find("remaining(") {
        Some(i) => {
            let end = t[i..].find(')').map_or(t.len(), |j| i + j);
            format!("{}remaining(S{}", &t[..i], &t[end..])
        }
        None => t,
    }
}

fn lease_session(endpoint: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let grant = etcdctl_ok(endpoint, &["lease", "grant", "60"]);
    let id = lease_id(&grant);
    seen.push(mask(&grant, &id));
    seen.push(mask(&etcdctl_ok(endpoint, &["put", "held/a", "1", "--lease", &id]), &id));
    seen.push(mask(&etcdctl_ok(endpoint, &["put", "held/b", "2", "--lease", &id]), &id));
    seen.push(mask(&etcdctl_ok(endpoint, &["lease", "keep-alive", "--once", &id]), &id));
    seen.push(mask(&etcdctl_ok(endpoint, &["lease", "timetolive", "--keys", &id]), &id));
    seen.push(mask(&etcdctl_ok(endpoint, &["lease", "list"]), &id));
    seen.push(mask(&etcdctl_ok(endpoint, &["lease", "revoke", &id]), &id));
    seen.push(mask(&etcdctl_ok(endpoint, &["get", "held/", "--prefix"]), &id));
    seen.push(mask(&etcdctl_ok(endpoint, &["lease", "timetolive", &id]), &id));
    let out = etcdctl(endpoint, &["put", "x", "y", "--lease", &id], None);
    let err = String::from_utf8_lossy(&out.stderr);
    seen.push(format!(
        "{} {}",
        out.status.code().unwrap_or(-1),
        err.lines().filter(|l| l.starts_with("Error")).collect::<String>()
    ));
    seen
}

#[test]
fn etcdctl_lease_commands_answer_as_etcd_does() {
    let etcd = Etcd::start();
    let want = lease_session(&etcd.endpoint());
    let geo = GeoNode::start();
    let got = lease_session(&geo.endpoint());
    assert_eq!(got, want);
    assert_eq!(got[7], "", "revoke deleted the attached keys");
}

#[test]
fn keys_go_when_their_lease_expires_and_not_before() {
    let geo = GeoNode::start();
    let ep = geo.endpoint();
    let id = lease_id(&etcdctl_ok(&ep, &["lease", "grant", "5"]));
    let granted = Instant::now();
    etcdctl_ok(&ep, &["put", "ephemeral", "v", "--lease", &id]);
    loop {
        let got = etcdctl_ok(&ep, &["get", "ephemeral", "--print-value-only"]);
        let age = granted.elapsed();
        if got.trim().is_empty() {
            assert!(age >= Duration::from_secs(5), "expired early, after {age:?}");
            break;
        }
        assert!(age < Duration::from_secs(15), "still there after {age:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let ttl = etcdctl_ok(&ep, &["lease", "timetolive", &id]);
    assert!(ttl.contains("already expired"), "{ttl}");
}
