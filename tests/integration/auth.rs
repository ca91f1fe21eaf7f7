//! Authentication and role-based access control, as etcd's: etcd's RBAC guide run by Debian's
//! etcdctl against a real etcd 3.4 and a geolock node side by side, every step's output and exit
//! status compared; tokens and the auth revision through the etcd-client crate.

use crate::common::{client, etcdctl, rt, Etcd, GeoNode};

/// The guide's steps (etcd's "Role-based access control" page), with the refusals its rules
/// imply, in order. `stdin` feeds `--interactive=false` password prompts.
const GUIDE: &[(&[&str], Option<&str>)] = &[
    (&["user", "add", "root:rootpw"], None),
    (&["user", "grant-role", "root", "root"], None),
    (&["role", "add", "myrole"], None),
    (&["role", "add", "myrole"], None),
    (&["role", "grant-permission", "myrole", "read", "/foo"], None),
    (&["role", "grant-permission", "myrole", "--prefix=true", "readwrite", "/foo/"], None),
    (&["role", "grant-permission", "myrole", "--from-key=true", "write", "/zz"], None),
    (&["role", "grant-permission", "nosuchrole", "read", "/x"], None),
    (&["role", "get", "myrole"], None),
    (&["role", "revoke-permission", "myrole", "/foo/bar"], None),
    (&["role", "revoke-permission", "myrole", "/foo"], None),
    (&["role", "grant-permission", "myrole", "read", "/foo"], None),
    (&["user", "add", "alice:alicepw"], None),
    (&["user", "add", "alice:again"], None),
    (&["user", "grant-role", "alice", "myrole"], None),
    (&["user", "grant-role", "alice", "nosuchrole"], None),
    (&["user", "grant-role", "nobody", "myrole"], None),
    (&["user", "get", "alice"], None),
    (&["user", "get", "--detail", "alice"], None),
    (&["user", "list"], None),
    (&["role", "list"], None),
    (&["put", "/foo/a", "one"], None),
    (&["auth", "enable"], None),
    (&["get", "/foo/a"], None),
    (&["--user", "alice:alicepw", "get", "/foo/a"], None),
    (&["--user", "alice:alicepw", "put", "/foo/b", "two"], None),
    (&["--user", "alice:alicepw", "put", "/bar", "x"], None),
    (&["--user", "alice:wrong", "get", "/foo/a"], None),
    (&["--user", "nobody:pw", "get", "/foo/a"], None),
    // READ on /foo and on the prefix /foo/ do not cover the keys between them (/foo0, /fooa).
    (&["--user", "alice:alicepw", "get", "--prefix", "/foo"], None),
    (&["--user", "alice:alicepw", "get", "--prefix", "/foo/"], None),
    (&["--user", "alice:alicepw", "get", "--from-key", "/zz"], None),
    (&["--user", "alice:alicepw", "put", "/zzz", "w"], None),
    (&["--user", "alice:alicepw", "del", "--prev-kv", "/zzz"], None),
    (&["--user", "alice:alicepw", "del", "/zzz"], None),
    (&["--user", "alice:alicepw", "role", "list"], None),
    (&["--user", "alice:alicepw", "user", "get", "alice"], None),
    (&["--user", "alice:alicepw", "user", "get", "root"], None),
    (&["--user", "alice:alicepw", "role", "get", "myrole"], None),
    (&["--user", "alice:alicepw", "user", "add", "mallory:pw"], None),
    (&["--user", "root:rootpw", "role", "list"], None),
    (&["--user", "root:rootpw", "user", "passwd", "alice", "--interactive=false"], Some("newpw\n")),
    (&["--user", "alice:alicepw", "get", "/foo/a"], None),
    (&["--user", "alice:newpw", "get", "/foo/a"], None),
    (&["--user", "root:rootpw", "user", "revoke-role", "alice", "myrole"], None),
    (&["--user", "root:rootpw", "user", "revoke-role", "alice", "myrole"], None),
    (&["--user", "alice:newpw", "get", "/foo/a"], None),
    (&["--user", "root:rootpw", "user", "delete", "root"], None),
    (&["--user", "root:rootpw", "user", "revoke-role", "root", "root"], None),
    (&["--user", "root:rootpw", "role", "delete", "root"], None),
    (&["--user", "root:rootpw", "auth", "disable"], None),
    (&["get", "/foo/a"], None),
    (&["user", "delete", "alice"], None),
    (&["user", "delete", "alice"], None),
    (&["role", "delete", "myrole"], None),
    (&["role", "list"], None),
];

/// etcdctl's output with what differs between any two runs taken out: the client's own
/// warning lines (JSON logs with timestamps and endpoints) from its retries.
pub fn normalized(out: &std::process::Output) -> (bool, String, String) {
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b).lines().filter(|l| !l.starts_with("{\"level\"")).collect::<Vec<_>>().join("\n")
    };
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn etcds_rbac_guide_gives_the_same_output_on_geolock_as_on_etcd() {
    let etcd = Etcd::start_with(&["--bcrypt-cost", "4"]);
    let geo = GeoNode::start_with(&["--bcrypt-cost", "4"]);
    let mut refused = 0;
    for (args, stdin) in GUIDE {
        let want = normalized(&etcdctl(&etcd.endpoint(), args, *stdin));
        let got = normalized(&etcdctl(&geo.endpoint(), args, *stdin));
        assert_eq!(got, want, "etcdctl {args:?}: geolock (left) and etcd (right) differ");
        refused += usize::from(!want.0);
    }
    // The guide is worth comparing only if both refused what the rules refuse.
    assert!(refused >= 20, "only {refused} steps were refused");

    // A permission on a range that ends before it starts, or where it starts, holds no key:
    // etcd 3.4 grants it, etcd 3.5 and geolock refuse it (README, Differs from etcd 3.4).
    for endpoint in [etcd.endpoint(), geo.endpoint()] {
        assert!(normalized(&etcdctl(&endpoint, &["role", "add", "ranges"], None)).0);
    }
    for end in ["/a", "/b"] {
        let args = ["role", "grant-permission", "ranges", "read", "/b", end];
        let (ok, _, err) = normalized(&etcdctl(&geo.endpoint(), &args, None));
        assert!(!ok && err == "Error: etcdserver: invalid auth management", "{args:?}: {err}");
        assert!(normalized(&etcdctl(&etcd.endpoint(), &args, None)).0, "etcd 3.4 grants {args:?}");
    }

    // Bad input etcd has no bound for: names over auth_name_bytes_max are refused, naming the
    // bound, and nothing of the request is applied.
    let long = "n".repeat(257);
    for args in [
        vec!["user", "add", &format!("{long}:pw")],
        vec!["role", "add", &long],
        vec!["user", "grant-role", &long, "root"],
    ] {
        let (ok, _, err) = normalized(&etcdctl(&geo.endpoint(), &args, None));
        assert!(!ok && err.contains("auth_name_bytes_max (256)"), "{args:?}: {err}");
    }
    let too_long_pw = format!("bob:{}", "p".repeat(73));
    let (ok, _, err) = normalized(&etcdctl(&geo.endpoint(), &["user", "add", &too_long_pw], None));
    assert!(!ok && err.contains("auth_password_bytes_max (72)"), "{err}");
    let (_, users, _) = normalized(&etcdctl(&geo.endpoint(), &["user", "list"], None));
    let (_, roles, _) = normalized(&etcdctl(&geo.endpoint(), &["role", "list"], None));
    assert_eq!((users.as_str(), roles.as_str()), ("root", "ranges"));
}

/// A simple token is valid on the member that made it only while auth is on, and stops
/// working for a user whose password changed; a change to users or roles makes a request
/// checked before it fail with etcd's old-revision error at apply (covered by the core's
/// tests); here what a client sees.
#[test]
fn a_password_change_ends_the_users_tokens_and_disabling_ends_them_all() {
    let geo = GeoNode::start_with(&["--bcrypt-cost", "4"]);
    rt().block_on(async {
        let mut c = client(&geo.endpoint()).await;
        c.user_add("root", "rootpw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.user_add("bob", "bobpw", None).await.unwrap();
        c.role_add("rw").await.unwrap();
        c.role_grant_permission("rw", etcd_client::Permission::read_write("k").with_prefix()).await.unwrap();
        c.user_grant_role("bob", "rw").await.unwrap();
        c.auth_enable().await.unwrap();
        let opts = |u: &str, p: &str| Some(etcd_client::ConnectOptions::new().with_user(u, p));
        let endpoint = [format!("http://{}", geo.endpoint())];
        let mut bob = etcd_client::Client::connect(endpoint.clone(), opts("bob", "bobpw")).await.unwrap();
        let mut root = etcd_client::Client::connect(endpoint.clone(), opts("root", "rootpw")).await.unwrap();
        bob.put("k1", "v", None).await.unwrap();
        let denied = bob.put("other", "v", None).await.unwrap_err().to_string();
        assert!(denied.contains("etcdserver: permission denied"), "{denied}");
        root.user_change_password("bob", "bobpw2").await.unwrap();
        let err = bob.get("k1", None).await.unwrap_err().to_string();
        assert!(err.contains("etcdserver: invalid auth token"), "{err}");
        let mut bob = etcd_client::Client::connect(endpoint.clone(), opts("bob", "bobpw2")).await.unwrap();
        assert_eq!(bob.get("k1", None).await.unwrap().kvs().len(), 1);
        root.auth_disable().await.unwrap();
        // With auth off, tokens are not looked at: the old one is simply ignored.
        assert_eq!(bob.get("k1", None).await.unwrap().kvs().len(), 1);
        assert_eq!(c.get("k1", None).await.unwrap().kvs().len(), 1, "no token needed any more");
    });
}

/// What the matrix's clients need: a lease of root's with the key `secret` on it, and one of
/// root's with no keys.
struct Fixture {
    secret_lease: i64,
    keyless_lease: i64,
}

/// One case of the matrix, as `alice` (READWRITE on the prefix `a/`, READ on `r`, WRITE on
/// `w`): `Ok` if the request went through, else the error it got.
async fn case(c: &mut etcd_client::Client, f: &Fixture, name: &str) -> Result<(), String> {
    use etcd_client::{
        Compare, CompareOp, DeleteOptions, GetOptions, LeaseTimeToLiveOptions, LockOptions, ProclaimOptions,
        PutOptions, ResignOptions, Txn, TxnOp, WatchOptions,
    };
    let e = |e: etcd_client::Error| e.to_string();
    match name {
        "range prefix a/" => c.get("a/", Some(GetOptions::new().with_prefix())).await.map(drop).map_err(e),
        "range r" => c.get("r", None).await.map(drop).map_err(e),
        "range b/" => c.get("b/", Some(GetOptions::new().with_prefix())).await.map(drop).map_err(e),
        "range from r on" => c.get("r", Some(GetOptions::new().with_from_key())).await.map(drop).map_err(e),
        "put a/x" => c.put("a/x", "1", None).await.map(drop).map_err(e),
        "put a/x prev_kv" => c.put("a/x", "2", Some(PutOptions::new().with_prev_key())).await.map(drop).map_err(e),
        "put w" => c.put("w", "1", None).await.map(drop).map_err(e),
        "put w prev_kv" => c.put("w", "2", Some(PutOptions::new().with_prev_key())).await.map(drop).map_err(e),
        "put r" => c.put("r", "1", None).await.map(drop).map_err(e),
        "put b/x" => c.put("b/x", "1", None).await.map(drop).map_err(e),
        "put a/x on root's lease" => {
            c.put("a/x", "3", Some(PutOptions::new().with_lease(f.secret_lease))).await.map(drop).map_err(e)
        }
        "delete a/x prev_kv" => c.delete("a/x", Some(DeleteOptions::new().with_prev_key())).await.map(drop).map_err(e),
        "delete w prev_kv" => c.delete("w", Some(DeleteOptions::new().with_prev_key())).await.map(drop).map_err(e),
        "txn on a/" => {
            let t = Txn::new()
                .when([Compare::value("a/x", CompareOp::Equal, "1")])
                .and_then([TxnOp::put("a/y", "1", None)])
                .or_else([TxnOp::get("a/x", None)]);
            c.txn(t).await.map(drop).map_err(e)
        }
        "txn comparing secret" => {
            let t = Txn::new()
                .when([Compare::value("secret", CompareOp::Equal, "s")])
                .and_then([TxnOp::put("a/y", "1", None)]);
            c.txn(t).await.map(drop).map_err(e)
        }
        "txn putting b/x in its other branch" => {
            let t = Txn::new().and_then([TxnOp::put("a/y", "1", None)]).or_else([TxnOp::put("b/x", "1", None)]);
            c.txn(t).await.map(drop).map_err(e)
        }
        "txn put w prev_kv" => {
            let t = Txn::new().and_then([TxnOp::put("w", "1", Some(PutOptions::new().with_prev_key()))]);
            c.txn(t).await.map(drop).map_err(e)
        }
        "txn put a/x on root's lease" => {
            let t = Txn::new().and_then([TxnOp::put("a/x", "1", Some(PutOptions::new().with_lease(f.secret_lease)))]);
            c.txn(t).await.map(drop).map_err(e)
        }
        "watch prefix a/" | "watch from r on" => {
            let opts = if name == "watch prefix a/" {
                WatchOptions::new().with_prefix()
            } else {
                WatchOptions::new().with_from_key()
            };
            let key = if name == "watch prefix a/" { "a/" } else { "r" };
            let mut w = c.watch(key, Some(opts)).await.map_err(e)?;
            let first = w.message().await.map_err(e)?.ok_or("watch stream ended")?;
            match first.canceled() {
                false => Ok(()),
                true => Err(format!("watch {} canceled: {}", first.watch_id(), first.cancel_reason())),
            }
        }
        "own lease: put a/l, time-to-live with keys, revoke" => {
            let id = c.lease_grant(60, None).await.map_err(e)?.id();
            c.put("a/l", "1", Some(PutOptions::new().with_lease(id))).await.map_err(e)?;
            let ttl = c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())).await.map_err(e)?;
            assert_eq!(ttl.keys(), [b"a/l".to_vec()]);
            c.lease_revoke(id).await.map(drop).map_err(e)
        }
        "keep root's keyless lease alive" => {
            let (mut keeper, mut renewals) = c.lease_keep_alive(f.keyless_lease).await.map_err(e)?;
            keeper.keep_alive().await.map_err(e)?;
            match renewals.message().await.map_err(e)? {
                Some(r) if r.ttl() > 0 => Ok(()),
                Some(_) => Err("the lease is gone".into()),
                None => Err("the keep-alive stream ended".into()),
            }
        }
        "grant a lease" => c.lease_grant(60, None).await.map(drop).map_err(e),
        "compact to the current revision" => {
            let rev = c.get("r", None).await.map_err(e)?.header().ok_or("no header")?.revision();
            c.compact(rev, None).await.map(drop).map_err(e)
        }
        "lock a/lock without a lease, unlock" => {
            // etcd's lock server holds it with a 60 s lease of its own making.
            let held = c.lock("a/lock", None).await.map_err(e)?;
            let lease = c.get(held.key(), None).await.map_err(e)?.kvs().first().ok_or("no lock key")?.lease();
            let ttl = c.lease_time_to_live(lease, None).await.map_err(e)?;
            assert!(ttl.granted_ttl() == 60 && ttl.ttl() > 0, "{ttl:?}");
            c.unlock(held.key().to_vec()).await.map(drop).map_err(e)
        }
        "revoke root's lease" => c.lease_revoke(f.secret_lease).await.map(drop).map_err(e),
        "time-to-live with keys of root's lease" => c
            .lease_time_to_live(f.secret_lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .map(drop)
            .map_err(e),
        "lock a/lock, unlock" | "lock b/lock" => {
            let id = c.lease_grant(60, None).await.map_err(e)?.id();
            let lock = if name == "lock b/lock" { "b/lock" } else { "a/lock" };
            let held = c.lock(lock, Some(LockOptions::new().with_lease(id))).await.map_err(e)?;
            c.unlock(held.key().to_vec()).await.map(drop).map_err(e)
        }
        "campaign a/el, proclaim, leader, observe, resign" | "campaign b/el" => {
            let id = c.lease_grant(60, None).await.map_err(e)?.id();
            let el = if name == "campaign b/el" { "b/el" } else { "a/el" };
            let won = c.campaign(el, "v1", id).await.map_err(e)?;
            let leader = won.leader().ok_or("no leader key")?.clone();
            c.proclaim("v2", Some(ProclaimOptions::new().with_leader(leader.clone()))).await.map_err(e)?;
            c.leader(el).await.map_err(e)?;
            let mut seen = c.observe(el).await.map_err(e)?;
            seen.message().await.map_err(e)?.ok_or("observe ended")?;
            c.resign(Some(ResignOptions::new().with_leader(leader))).await.map(drop).map_err(e)
        }
        "leader b/el" => c.leader("b/el").await.map(drop).map_err(e),
        "observe b/el" => c.observe("b/el").await.map(drop).map_err(e),
        "status" => c.status().await.map(drop).map_err(e),
        "defragment" => c.defragment().await.map(drop).map_err(e),
        "hash_kv" => c.hash_kv(0).await.map(drop).map_err(e),
        "move leader" => c.move_leader(1).await.map(drop).map_err(e),
        "member add" => c.member_add(["http://127.0.0.1:1"], None).await.map(drop).map_err(e),
        "user list" => c.user_list().await.map(drop).map_err(e),
        other => panic!("no case {other}"),
    }
}

/// Every case `alice` may make.
const ALLOWED: &[&str] = &[
    "range prefix a/",
    "range r",
    "put a/x",
    "put a/x prev_kv",
    "put w",
    "delete a/x prev_kv",
    "txn on a/",
    "watch prefix a/",
    "own lease: put a/l, time-to-live with keys, revoke",
    "lock a/lock, unlock",
    "lock a/lock without a lease, unlock",
    "campaign a/el, proclaim, leader, observe, resign",
    "status",
    "grant a lease",
    "compact to the current revision",
];

/// Cases a client without credentials may not make while authentication is on, each refused
/// with etcd's user-empty error: reads, and what etcd lets anyone do but geolock does not
/// (compaction), or lets through for a lease with no keys (renewing another's lease).
const ANONYMOUS_DENIED: &[&str] = &[
    "range prefix a/",
    "grant a lease",
    "compact to the current revision",
    "keep root's keyless lease alive",
    "status",
];

/// Cases only a root user may make, which a witness serves as every member does: it holds the
/// auth store, though no key space.
const ADMIN_ONLY: &[&str] = &["defragment", "move leader", "member add", "user list"];

/// Every case `alice` may not make, etcd's three published bypasses among them: a from-key
/// Watch (and Range) with READ on one key; `prev_kv` and a put onto another's lease, alone and
/// in a Txn; LeaseTimeToLive with keys naming keys she may not read.
const DENIED: &[&str] = &[
    "range b/",
    "range from r on",
    "watch from r on",
    "put b/x",
    "put r",
    "put w prev_kv",
    "delete w prev_kv",
    "put a/x on root's lease",
    "txn comparing secret",
    "txn putting b/x in its other branch",
    "txn put w prev_kv",
    "txn put a/x on root's lease",
    "revoke root's lease",
    "time-to-live with keys of root's lease",
    "lock b/lock",
    "campaign b/el",
    "leader b/el",
    "observe b/el",
    "defragment",
    "hash_kv",
    "move leader",
    "member add",
    "user list",
];

/// Every service and path, allowed and denied, on the leader, on a follower (writes forwarded
/// to the leader, checked where applied) and on a learner; and nothing but a user-empty
/// refusal for a client without credentials. On a witness, which serves only membership,
/// status and auth, what needs root is refused to others.
#[test]
fn permissions_hold_on_every_service_on_leader_follower_learner_and_witness() {
    use etcd_client::{ConnectOptions, Permission, PutOptions};
    let mut c = crate::common::Cluster::start_roles_with(&["voter", "voter", "witness"], &["--bcrypt-cost", "4"]);
    let (learner, _) = c.add_learner("n4", 0);
    let (witness, leader) = (2, c.leader());
    let follower = (0..2).find(|i| *i != leader).unwrap();
    rt().block_on(async {
        let mut admin = client(&c.endpoint(leader)).await;
        admin.user_add("root", "rootpw", None).await.unwrap();
        admin.user_grant_role("root", "root").await.unwrap();
        admin.user_add("alice", "alicepw", None).await.unwrap();
        admin.role_add("a").await.unwrap();
        for p in [Permission::read_write("a/").with_prefix(), Permission::read("r"), Permission::write("w")] {
            admin.role_grant_permission("a", p).await.unwrap();
        }
        admin.user_grant_role("alice", "a").await.unwrap();
        let f = Fixture {
            secret_lease: admin.lease_grant(600, None).await.unwrap().id(),
            keyless_lease: admin.lease_grant(600, None).await.unwrap().id(),
        };
        admin.put("secret", "s", Some(PutOptions::new().with_lease(f.secret_lease))).await.unwrap();
        admin.put("r", "r", None).await.unwrap();
        admin.auth_enable().await.unwrap();
        for (role, i) in [("leader", leader), ("follower", follower), ("learner", learner)] {
            let endpoint = [format!("http://{}", c.endpoint(i))];
            let opts = ConnectOptions::new().with_user("alice", "alicepw");
            let mut alice = etcd_client::Client::connect(endpoint.clone(), Some(opts)).await.unwrap();
            for name in ALLOWED {
                if let Err(err) = case(&mut alice, &f, name).await {
                    panic!("on the {role}, {name}: refused: {err}");
                }
            }
            for name in DENIED {
                match case(&mut alice, &f, name).await {
                    Ok(()) => panic!("on the {role}, {name}: allowed"),
                    Err(err) => assert!(err.contains("etcdserver: permission denied"), "on the {role}, {name}: {err}"),
                }
            }
            let mut nobody = etcd_client::Client::connect(endpoint, None).await.unwrap();
            for name in ANONYMOUS_DENIED {
                let err = case(&mut nobody, &f, name).await.expect_err(&format!("on the {role}, anonymous {name}"));
                assert!(err.contains("etcdserver: user name is empty"), "on the {role}, anonymous {name}: {err}");
            }
        }
        let endpoint = [format!("http://{}", c.endpoint(witness))];
        let opts = ConnectOptions::new().with_user("alice", "alicepw");
        let mut alice = etcd_client::Client::connect(endpoint.clone(), Some(opts)).await.unwrap();
        case(&mut alice, &f, "status").await.unwrap_or_else(|e| panic!("on the witness, status: refused: {e}"));
        for name in ADMIN_ONLY {
            let err = case(&mut alice, &f, name).await.expect_err(&format!("on the witness, {name}"));
            assert!(err.contains("etcdserver: permission denied"), "on the witness, {name}: {err}");
            let mut nobody = etcd_client::Client::connect(endpoint.clone(), None).await.unwrap();
            let err = case(&mut nobody, &f, name).await.expect_err(&format!("on the witness, anonymous {name}"));
            assert!(err.contains("etcdserver: user name is empty"), "on the witness, anonymous {name}: {err}");
        }
        let opts = ConnectOptions::new().with_user("root", "rootpw");
        let mut root = etcd_client::Client::connect(endpoint, Some(opts)).await.unwrap();
        case(&mut root, &f, "user list").await.unwrap_or_else(|e| panic!("on the witness, root's user list: {e}"));
        // Nothing denied changed anything: the secret and its lease are as root left them.
        let mut root = etcd_client::Client::connect(
            [format!("http://{}", c.endpoint(leader))],
            Some(ConnectOptions::new().with_user("root", "rootpw")),
        )
        .await
        .unwrap();
        let secret = root.get("secret", None).await.unwrap();
        assert_eq!((secret.kvs()[0].value(), secret.kvs()[0].lease()), (&b"s"[..], f.secret_lease));
        assert!(root.get("b/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap().kvs().is_empty());
    });
}

/// The etcd-client crate's own test file (its `tests/client.rs`, from the source cargo
/// downloaded, made callable here by `src/lockctl/build.rs`).
mod etcd_client_suite {
    #![allow(warnings, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/etcd_client_suite.rs"));
}

/// The etcd-client crate's own tests of users, roles, authentication and token refresh (its
/// Lock service case among them, with a lock taken without a lease, as etcd's server grants
/// one), run as its authors run them against etcd: a user `root` with password `rootpwd` and
/// role `root` exists, and tokens expire within their 4 s wait.
#[test]
fn the_etcd_client_crates_own_auth_tests_pass() {
    let geo = GeoNode::start_with(&["--bcrypt-cost", "4", "--auth-token-ttl", "2"]);
    etcd_client_suite::testing::ENDPOINT.set(geo.endpoint()).expect("set once");
    rt().block_on(async {
        let mut c = client(&geo.endpoint()).await;
        c.user_add("root", "rootpwd", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        use etcd_client_suite as suite;
        suite::test_user().await.expect("test_user");
        suite::test_role().await.expect("test_role");
        suite::test_lock().await.expect("test_lock");
        suite::test_auth().await.expect("test_auth");
        suite::test_auth_refresh_token().await.expect("test_auth_refresh_token");
        suite::test_auth_refresh_token_once_for_concurrent_calls()
            .await
            .expect("test_auth_refresh_token_once_for_concurrent_calls");
    });
}

/// A key pair made by openssl in `dir` for `method` (RSA for RS*, P-256 for ES256), as PEM
/// files: (public, private).
fn jwt_keys(dir: &std::path::Path, method: &str) -> (String, String) {
    let (public, private) = (dir.join(format!("{method}.pub")), dir.join(format!("{method}.key")));
    let algorithm: &[&str] = if method.starts_with("ES") {
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    } else {
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    };
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().expect("openssl (tests/deps.sh)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[&["genpkey"], algorithm, &["-out", private.to_str().unwrap()]].concat());
    run(&["pkey", "-in", private.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
    (public.display().to_string(), private.display().to_string())
}

/// JWTs (`--auth-token jwt,...`) signed with RS256 and ES256: a token outlives a restart of
/// the member that signed it (nothing about it is kept), and is refused with etcd's
/// old-revision error once users or roles change after it was issued. (Expiry and forgery:
/// the server's unit tests.)
#[test]
fn signed_tokens_survive_a_restart_and_end_with_an_auth_change() {
    use etcd_client::ConnectOptions;
    let keys = tempfile::tempdir().unwrap();
    for method in ["RS256", "ES256"] {
        let (public, private) = jwt_keys(keys.path(), method);
        let option = format!("jwt,pub-key={public},priv-key={private},sign-method={method},ttl=10m");
        let mut geo = GeoNode::start_with(&["--bcrypt-cost", "4", "--auth-token", &option]);
        let endpoint = [format!("http://{}", geo.endpoint())];
        // One runtime for the whole case: a client's connection lives on the runtime it was
        // made on, and must outlive the restart.
        let rt = rt();
        rt.block_on(async {
            let mut c = client(&geo.endpoint()).await;
            c.user_add("root", "rootpw", None).await.unwrap();
            c.user_grant_role("root", "root").await.unwrap();
            c.auth_enable().await.unwrap();
        });
        let opts = || Some(ConnectOptions::new().with_user("root", "rootpw"));
        let mut root = rt.block_on(etcd_client::Client::connect(endpoint.clone(), opts())).unwrap();
        rt.block_on(root.put("k", "v", None)).unwrap();
        geo.kill_and_restart_probing(&["--user", "root:rootpw", "get", "readiness-probe"]);
        let got = rt.block_on(root.get("k", None)).unwrap_or_else(|e| panic!("{method}: after a restart: {e}"));
        assert_eq!(got.kvs()[0].value(), b"v", "{method}");
        rt.block_on(async {
            let mut other = etcd_client::Client::connect(endpoint.clone(), opts()).await.unwrap();
            other.role_add("changes-the-revision").await.unwrap();
            let err = root.get("k", None).await.unwrap_err().to_string();
            assert!(err.contains("etcdserver: revision of auth store is old"), "{method}: {err}");
            let mut fresh = etcd_client::Client::connect(endpoint.clone(), opts()).await.unwrap();
            fresh.get("k", None).await.unwrap();
        });
    }
}

/// A simple token lives `--auth-token-ttl` after its last use, not after it was made: used
/// every half TTL it outlives its TTL several times over, then left alone it ends.
#[test]
fn a_simple_token_lives_its_ttl_after_each_use() {
    let geo = GeoNode::start_with(&["--bcrypt-cost", "4", "--auth-token-ttl", "2"]);
    rt().block_on(async {
        let mut c = client(&geo.endpoint()).await;
        c.user_add("root", "rootpw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.auth_enable().await.unwrap();
        let opts = Some(etcd_client::ConnectOptions::new().with_user("root", "rootpw"));
        let mut root = etcd_client::Client::connect([format!("http://{}", geo.endpoint())], opts).await.unwrap();
        for _ in 0..6 {
            root.get("k", None).await.expect("used within its TTL");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let err = root.get("k", None).await.unwrap_err().to_string();
        assert!(err.contains("etcdserver: invalid auth token"), "{err}");
    });
}

/// A witness left behind while the log was purged catches up by snapshot, and keeps the auth
/// store the snapshot carries: anonymous membership changes through it are still refused
/// (before, it received no data at all, and ran with authentication off).
#[test]
fn a_witness_that_catches_up_by_snapshot_still_checks_callers() {
    let mut c = crate::common::Cluster::start_roles_with(
        &["voter", "voter", "witness"],
        &["--bcrypt-cost", "4", "--snapshot-count", "200"],
    );
    let root = ["--user", "root:rootpw"];
    for step in [&["user", "add", "root:rootpw"][..], &["user", "grant-role", "root", "root"], &["auth", "enable"]] {
        let out = etcdctl(&c.endpoint(0), step, None);
        assert!(out.status.success(), "{step:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    c.kill(2);
    // Snapshots every 200 entries; the log behind one is purged once 1,000 more are kept, so
    // after 2,000 puts only a snapshot brings the witness level.
    let endpoint = format!("http://{}", c.endpoint(0));
    rt().block_on(async {
        let opts = Some(etcd_client::ConnectOptions::new().with_user("root", "rootpw"));
        let mut kv = etcd_client::Client::connect([endpoint], opts).await.unwrap();
        for i in 0..2_000 {
            kv.put(format!("data/{i:05}"), "x", None).await.unwrap();
        }
    });
    c.respawn(2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !c.log(2).contains("installing a snapshot") {
        assert!(std::time::Instant::now() < deadline, "the witness caught up without a snapshot:\n{}", c.log(2));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // With authentication off here, removing a member that does not exist would say so.
    let witness = c.endpoint(2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = etcdctl(&witness, &["member", "remove", "1234"], None);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if err.contains("etcdserver: user name is empty") {
            break;
        }
        assert!(!err.contains("member not found"), "the witness let an anonymous caller change the membership: {err}");
        assert!(std::time::Instant::now() < deadline, "the witness does not answer: {err}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let args: Vec<&str> = root.iter().copied().chain(["member", "list"]).collect();
    let out = etcdctl(&witness, &args, None);
    assert!(out.status.success(), "root through the witness: {}", String::from_utf8_lossy(&out.stderr));
}
