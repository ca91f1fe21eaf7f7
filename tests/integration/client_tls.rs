//! TLS on the client port with etcd's flags (`--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth`, `https://` client URLs): Debian's etcdctl against a real etcd 3.4 and
//! geolock side by side, and certificates replaced while geolock runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::auth::normalized;
use crate::common::{etcdctl, etcdctl_bg, free_port, spawn_logged, wait_answering, MemberFlags, Proc};
use geolock_testkit::certs;

/// A member (`etcd` or `lockctl`) serving clients over TLS with `tls_flags`, ready once etcdctl
/// with `probe_creds` reads through it. Returns it and its `https://` endpoint.
fn start_tls(program: &str, dir: &Path, tls_flags: &[String], probe_creds: &[String]) -> (Proc, String) {
    std::fs::create_dir_all(dir).unwrap();
    let (cp, pp) = (free_port(), free_port());
    let flags = MemberFlags { client_tls: true, ..MemberFlags::single("n1", dir.join("data"), cp, pp) };
    let mut cmd = Command::new(if program == "etcd" { "etcd" } else { env!("CARGO_BIN_EXE_lockctl") });
    if program != "etcd" {
        cmd.arg("start");
    }
    cmd.args(flags.args()).args(tls_flags).args(["--bcrypt-cost", "4"]);
    let mut proc = spawn_logged(cmd, &dir.join(format!("{program}.log")));
    let endpoint = format!("https://127.0.0.1:{cp}");
    let probe: Vec<&str> = probe_creds.iter().map(String::as_str).chain(["get", "readiness-probe"]).collect();
    wait_answering(&endpoint, &mut proc, &probe);
    (proc, endpoint)
}

/// etcdctl's flags to connect with CA `ca` and, if given, the client certificate `stem` of `dir`.
fn creds(ca: &Path, client: Option<(&Path, &str)>) -> Vec<String> {
    let mut a = vec![format!("--cacert={}", ca.display())];
    if let Some((dir, stem)) = client {
        a.push(format!("--cert={}", dir.join(format!("{stem}.crt")).display()));
        a.push(format!("--key={}", dir.join(format!("{stem}.key")).display()));
    }
    a
}

fn path(dir: &Path, f: &str) -> String {
    dir.join(f).display().to_string()
}

/// A CA in `dir/pki`, a server certificate for 127.0.0.1 and client certificates `root`,
/// `alice` (their common names) and `anonymous` (none); and the member flags that serve with
/// them and require a client certificate.
fn pki_with_users(dir: &Path) -> (PathBuf, [String; 4]) {
    let pki = dir.join("pki");
    certs::init_ca(&pki).unwrap();
    certs::issue(&pki, "server", &["127.0.0.1".to_string()]).unwrap();
    for (stem, cn) in [("root", Some("root")), ("alice", Some("alice")), ("anonymous", None)] {
        certs::issue_client(&pki, stem, cn).unwrap();
    }
    let tls_flags = [
        format!("--cert-file={}", path(&pki, "server.crt")),
        format!("--key-file={}", path(&pki, "server.key")),
        format!("--trusted-ca-file={}", path(&pki, "ca.crt")),
        "--client-cert-auth".to_string(),
    ];
    (pki, tls_flags)
}

/// With `--client-cert-auth`, a verified certificate's common name is the user of a request
/// without a token, a token (`--user`) wins over it, a certificate without a common name names
/// a user nobody is, and a client without a certificate is refused: the same answers from etcd and
/// geolock, step by step, with etcdctl's `--cacert`, `--cert`, `--key`.
#[test]
fn client_certificates_name_users_as_on_etcd() {
    let tmp = tempfile::tempdir().unwrap();
    let (pki, tls_flags) = pki_with_users(tmp.path());
    let ca = pki.join("ca.crt");
    let as_root = creds(&ca, Some((&pki, "root")));
    let as_alice = creds(&ca, Some((&pki, "alice")));
    let as_anonymous = creds(&ca, Some((&pki, "anonymous")));
    let steps: Vec<(&Vec<String>, Vec<&str>)> = vec![
        (&as_root, vec!["user", "add", "root:rootpw"]),
        (&as_root, vec!["user", "grant-role", "root", "root"]),
        (&as_root, vec!["user", "add", "alice:alicepw"]),
        (&as_root, vec!["role", "add", "a"]),
        (&as_root, vec!["role", "grant-permission", "a", "--prefix=true", "readwrite", "a/"]),
        (&as_root, vec!["user", "grant-role", "alice", "a"]),
        (&as_root, vec!["auth", "enable"]),
        (&as_alice, vec!["put", "a/x", "1"]),
        (&as_alice, vec!["get", "a/x"]),
        (&as_alice, vec!["put", "b/x", "1"]),
        (&as_alice, vec!["user", "list"]),
        (&as_root, vec!["user", "list"]),
        (&as_root, vec!["put", "b/x", "1"]),
        (&as_anonymous, vec!["get", "a/x"]),
        (&as_anonymous, vec!["put", "a/x", "2"]),
        (&as_anonymous, vec!["user", "list"]),
        (&as_anonymous, vec!["--user", "alice:alicepw", "get", "a/x"]),
        (&as_alice, vec!["--user", "root:rootpw", "get", "b/x"]),
        (&as_alice, vec!["--user", "alice:wrong", "get", "a/x"]),
        (&as_root, vec!["auth", "disable"]),
    ];
    let (etcd_dir, geo_dir) = (tmp.path().join("etcd"), tmp.path().join("geo"));
    let (_etcd, etcd_ep) = start_tls("etcd", &etcd_dir, &tls_flags, &as_root);
    let (_geo, geo_ep) = start_tls("lockctl", &geo_dir, &tls_flags, &as_root);
    for (who, args) in &steps {
        let a: Vec<&str> = who.iter().map(String::as_str).chain(args.iter().copied()).collect();
        let (e, g) = (normalized(&etcdctl(&etcd_ep, &a, None)), normalized(&etcdctl(&geo_ep, &a, None)));
        assert_eq!(g, e, "etcdctl {a:?}: geolock (left) and etcd (right) differ");
    }
    // A client without a certificate gets no further than the handshake on either.
    let bare = creds(&ca, None);
    let a: Vec<&str> = bare.iter().map(String::as_str).chain(["--dial-timeout=2s", "get", "a/x"]).collect();
    for ep in [&etcd_ep, &geo_ep] {
        assert!(!etcdctl(ep, &a, None).status.success(), "{ep} served a client without a certificate");
    }
}

/// Whether a new connection with `args` (etcdctl credentials) reads through `endpoint`.
fn connects(endpoint: &str, args: &[String]) -> bool {
    let a: Vec<&str> = args.iter().map(String::as_str).chain(["--dial-timeout=2s", "get", "k"]).collect();
    etcdctl(endpoint, &a, None).status.success()
}

/// Poll until `cond` holds, at most 20 s (files are checked every second).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "not within 20 s: {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn write_atomically(to: &Path, text: &[u8]) {
    let tmp = to.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// The server certificate and the CA bundle are replaced while geolock serves: a CA rotation
/// (old CA, then old and new, then new only) with no downtime, new connections picking up each
/// step, a watch stream opened before the first step still receiving events after the last,
/// and a malformed file refused with a log line while the settings in use stay.
#[test]
fn certificates_and_ca_bundles_are_replaced_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
    for dir in [&old, &new] {
        certs::init_ca(dir).unwrap();
        certs::issue(dir, "server", &["127.0.0.1".to_string()]).unwrap();
        certs::issue_client(dir, "client", Some("client")).unwrap();
    }
    let live = tmp.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let (cert, key, bundle) = (live.join("server.crt"), live.join("server.key"), live.join("ca-bundle.crt"));
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    std::fs::write(&cert, read(old.join("server.crt"))).unwrap();
    std::fs::write(&key, read(old.join("server.key"))).unwrap();
    std::fs::write(&bundle, read(old.join("ca.crt"))).unwrap();
    let tls_flags = [
        format!("--cert-file={}", cert.display()),
        format!("--key-file={}", key.display()),
        format!("--trusted-ca-file={}", bundle.display()),
        "--client-cert-auth".to_string(),
    ];
    let trusting_old = creds(&old.join("ca.crt"), Some((&old, "client")));
    let old_client_new_server = creds(&new.join("ca.crt"), Some((&old, "client")));
    let trusting_new = creds(&new.join("ca.crt"), Some((&new, "client")));
    let (mut geo, ep) = start_tls("lockctl", tmp.path(), &tls_flags, &trusting_old);
    let watch_out = tmp.path().join("watch.out");
    let watch_args: Vec<&str> = trusting_old.iter().map(String::as_str).chain(["watch", "k"]).collect();
    let _watch = etcdctl_bg(&ep, &watch_args, &watch_out);
    let put = |creds: &[String], v: &str| {
        let a: Vec<&str> = creds.iter().map(String::as_str).chain(["put", "k", v]).collect();
        let out = etcdctl(&ep, &a, None);
        assert!(out.status.success(), "put {v}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // The watch is registered once a put reaches it.
    eventually("the watch sees a put", || {
        put(&trusting_old, "0");
        std::fs::read_to_string(&watch_out).unwrap_or_default().contains("PUT")
    });

    // Both CAs trusted, the server's certificate from the new one: clients of either CA in.
    let both = [read(old.join("ca.crt")), read(new.join("ca.crt"))].concat();
    write_atomically(&bundle, &both);
    write_atomically(&key, &read(new.join("server.key")));
    write_atomically(&cert, &read(new.join("server.crt")));
    eventually("a new connection sees the new server certificate", || connects(&ep, &old_client_new_server));
    assert!(connects(&ep, &trusting_new));
    assert!(!connects(&ep, &trusting_old), "a client trusting only the old CA accepted the new certificate");
    put(&trusting_new, "1");

    // The old CA leaves the bundle: its clients are refused, the new CA's are not.
    write_atomically(&bundle, &read(new.join("ca.crt")));
    eventually("a client of the old CA is refused", || !connects(&ep, &old_client_new_server));
    assert!(connects(&ep, &trusting_new));

    // A malformed certificate is refused; the one in use stays.
    write_atomically(&cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
    eventually("the malformed file is logged", || geo.log().contains("keeping the client TLS settings in use"));
    assert!(connects(&ep, &trusting_new));
    put(&trusting_new, "2");

    // The watch opened before any of this saw every put.
    eventually("the old watch stream sees the last put", || {
        std::fs::read_to_string(&watch_out).unwrap_or_default().ends_with("PUT\nk\n2\n")
    });
    let seen = std::fs::read_to_string(&watch_out).unwrap();
    // etcdctl prints each event as three lines: PUT, the key, the value.
    let lines: Vec<&str> = seen.lines().collect();
    let values: Vec<&str> = lines.chunks(3).filter_map(|e| e.get(2).copied()).collect();
    assert!(values.ends_with(&["0", "1", "2"]), "the old watch stream saw {seen:?}");
    geo.terminate(std::time::Duration::from_secs(10));
}

/// A geolock node in `dir` serving TLS with `--client-cert-auth` ([`pki_with_users`]), with
/// users root (role root) and alice (READWRITE on `a/`) and auth on; `as_root` is etcdctl's
/// credentials for root's certificate, `ep` the node's `https://` endpoint.
struct AuthNode {
    pki: PathBuf,
    ca: PathBuf,
    as_root: Vec<String>,
    geo: Proc,
    ep: String,
}

fn start_with_auth(dir: &Path) -> AuthNode {
    let (pki, tls_flags) = pki_with_users(dir);
    let ca = pki.join("ca.crt");
    let as_root = creds(&ca, Some((&pki, "root")));
    let (geo, ep) = start_tls("lockctl", dir, &tls_flags, &as_root);
    for step in [
        vec!["user", "add", "root:rootpw"],
        vec!["user", "grant-role", "root", "root"],
        vec!["user", "add", "alice:alicepw"],
        vec!["role", "add", "a"],
        vec!["role", "grant-permission", "a", "--prefix=true", "readwrite", "a/"],
        vec!["user", "grant-role", "alice", "a"],
        vec!["auth", "enable"],
    ] {
        let a: Vec<&str> = as_root.iter().map(String::as_str).chain(step.iter().copied()).collect();
        let out = etcdctl(&ep, &a, None);
        assert!(out.status.success(), "etcdctl {a:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    AuthNode { pki, ca, as_root, geo, ep }
}

/// `lockctl`'s client commands with etcdctl's `--cacert`, `--cert`, `--key` and `--user`: a lock
/// taken as the certificate's common name and as a user with a password, refused outside the
/// user's keys, a wrong password and incomplete flags named in the error.
#[test]
fn lockctl_client_commands_speak_tls_and_authenticate() {
    let tmp = tempfile::tempdir().unwrap();
    let AuthNode { pki, ca, as_root, mut geo, ep } = start_with_auth(tmp.path());
    // `host:port` with --cacert means https; the lock runs `true` and is released.
    let endpoint = ep.trim_start_matches("https://").to_string();
    let lockctl = |who: &[String], name: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_lockctl"))
            .args(["lock", "--endpoints", &endpoint, "--ttl", "5"])
            .args(who)
            .args([name, "true"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let as_alice = creds(&ca, Some((&pki, "alice")));
    let by_password: Vec<String> =
        creds(&ca, Some((&pki, "anonymous"))).into_iter().chain(["--user".into(), "alice:alicepw".into()]).collect();
    let wrong_password: Vec<String> =
        creds(&ca, Some((&pki, "anonymous"))).into_iter().chain(["--user".into(), "alice:nope".into()]).collect();
    let no_ca = vec![format!("--cert={}", path(&pki, "alice.crt")), format!("--key={}", path(&pki, "alice.key"))];
    for (who, name, ok, says) in [
        (&as_alice, "a/lock", true, "fencing token"),
        (&by_password, "a/lock", true, "fencing token"),
        (&as_alice, "b/lock", false, "etcdserver: permission denied"),
        (&by_password, "b/lock", false, "etcdserver: permission denied"),
        // Its lease is refused first: LeaseGrant needs a user while auth is on (README).
        (&creds(&ca, Some((&pki, "anonymous"))), "a/lock", false, "etcdserver: user name is empty"),
        (&wrong_password, "a/lock", false, "etcdserver: authentication failed, invalid user ID or password"),
        (&no_ca, "a/lock", false, "cert and key need cacert"),
    ] {
        let (success, said) = lockctl(who, name);
        assert_eq!(success, ok, "lockctl lock {name} with {who:?}: {said}");
        assert!(said.contains(says), "lockctl lock {name} with {who:?} said {said:?}, not {says:?}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_lockctl"))
        .args(["member", "list", "--endpoints", &endpoint])
        .args(&as_root)
        .output()
        .unwrap();
    assert!(out.status.success(), "lockctl member list as root: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("n1"), "{}", String::from_utf8_lossy(&out.stdout));
    geo.terminate(std::time::Duration::from_secs(10));
}

/// The failover commands over TLS with credentials: a vantage point probing a primary whose
/// Status needs a user sees it healthy with root's certificate and not with one naming nobody;
/// FENCE is root's, refused to alice, and once root fenced the member it takes no write.
#[test]
fn failover_commands_reach_members_over_tls_as_a_user() {
    let tmp = tempfile::tempdir().unwrap();
    let AuthNode { pki, ca, as_root, mut geo, ep } = start_with_auth(tmp.path());
    let endpoint = ep.trim_start_matches("https://").to_string();
    let strs = |v: &[String]| v.iter().map(String::clone).collect::<Vec<_>>();

    // Two vantage points, one probing as root, one with a certificate that names nobody.
    let mut vantages = Vec::new();
    for who in ["root", "anonymous"] {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockctl"));
        cmd.args(["failover", "vantage", "--listen", &listen, "--primary", &endpoint, "--probe-interval-ms", "200"]);
        cmd.args(creds(&ca, Some((&pki, who))));
        vantages.push((who, listen, spawn_logged(cmd, &tmp.path().join(format!("vantage-{who}.log")))));
    }
    for (who, listen, _) in &vantages {
        let healthy = *who == "root";
        eventually(&format!("the vantage point probing as {who} reports"), || {
            let out = crate::common::lockctl(&["failover", "observe", "--endpoints", listen]);
            let said = String::from_utf8_lossy(&out.stdout).into_owned();
            if healthy {
                said.starts_with("healthy")
            } else {
                said.starts_with("unhealthy") && said.contains("etcdserver: user name is empty")
            }
        });
    }

    let fence = |who: &str| {
        let mut a = vec!["failover".to_string(), "fence".into(), "--endpoints".into(), endpoint.clone()];
        a.extend(strs(&creds(&ca, Some((&pki, who)))));
        a.extend(["--epoch".into(), "1".into()]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = crate::common::lockctl(&a);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, said) = fence("alice");
    assert!(!ok && said.contains("etcdserver: permission denied"), "fence as alice: {said}");
    let (ok, said) = fence("root");
    assert!(ok && said.contains("fenced by epoch 1"), "fence as root: {said}");
    let put: Vec<&str> =
        as_root.iter().map(String::as_str).chain(["--command-timeout=3s", "put", "a/x", "1"]).collect();
    let out = etcdctl(&ep, &put, None);
    assert!(!out.status.success(), "a fenced member took a write: {}", String::from_utf8_lossy(&out.stdout));
    for (_, _, mut v) in vantages {
        v.terminate(std::time::Duration::from_secs(5));
    }
    geo.terminate(std::time::Duration::from_secs(10));
}
