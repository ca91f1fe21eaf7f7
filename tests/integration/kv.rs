//! KV through Debian's etcdctl, side by side with a real etcd: the same commands, the same output.

use crate::common::{etcdctl, Etcd, GeoNode};

/// What must match between etcd and geolock: exit status, stdout, and the `Error:` lines of
/// stderr (the rest of stderr is client retry logging with timestamps). Header fields that
/// name the member, cluster or term differ by design and are masked.
fn observe(endpoint: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = etcdctl(endpoint, args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("Error:")).collect();
    let text = format!(
        "$ etcdctl {}\nstatus: {}\n{}{}",
        args.join(" "),
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout),
        errors.join("\n")
    );
    mask_header(&text)
}

/// Mask `"cluster_id":N`, `"member_id":N`, `"raft_term":N` in JSON output.
pub fn mask_header(text: &str) -> String {
    let mut out = text.to_string();
    for field in ["cluster_id", "member_id", "raft_term"] {
        let pat = format!("\"{field}\":");
        let mut masked = String::new();
        let mut rest = out.as_str();
        while let Some(i) = rest.find(&pat) {
            masked.push_str(&rest[..i + pat.len()]);
            rest = &rest[i + pat.len()..];
            let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
            masked.push('N');
            rest = &rest[digits..];
        }
        masked.push_str(rest);
        out = masked;
    }
    out
}

const TXN_INPUT: &str =
    "mod(\"foo/a\") > \"0\"\nvalue(\"foo/b\") = \"2\"\n\nput txn/ok yes\nget foo/a\n\nput txn/failed yes\n\n";

fn script() -> Vec<(Vec<&'static str>, Option<&'static str>)> {
    let c = |a: &[&'static str]| (a.to_vec(), None);
    vec![
        c(&["put", "foo", "bar"]),
        c(&["put", "foo/a", "1"]),
        c(&["put", "foo/b", "2"]),
        c(&["put", "foo/c", "3"]),
        c(&["put", "zoo", "z"]),
        c(&["put", "foo/a", "11", "--prev-kv"]),
        c(&["get", "foo", "--prefix"]),
        c(&["get", "foo", "--prefix", "--keys-only"]),
        c(&["get", "foo", "--prefix", "--count-only", "-w", "json"]),
        c(&["get", "foo", "--prefix", "--limit", "2"]),
        c(&["get", "foo", "--prefix", "--limit", "2", "-w", "json"]),
        c(&["get", "foo", "--prefix", "--sort-by", "MODIFY", "--order", "DESCEND"]),
        c(&["get", "foo", "--prefix", "--sort-by", "VALUE"]),
        c(&["get", "foo", "--prefix", "--sort-by", "VERSION", "--order", "ASCEND"]),
        c(&["get", "foo/a", "--rev", "3"]),
        c(&["get", "foo/a", "-w", "json"]),
        c(&["get", "foo", "--from-key"]),
        c(&["get", "a", "z"]),
        c(&["get", "foo", "--rev", "99"]),
        (vec!["txn", "-i"], Some(TXN_INPUT)),
        (vec!["txn", "-i", "-w", "json"], Some(TXN_INPUT)),
        c(&["get", "txn", "--prefix"]),
        c(&["del", "foo/", "--prefix", "--prev-kv"]),
        c(&["del", "nothing"]),
        c(&["get", "", "--prefix"]),
        c(&["put", "foo", "again"]),
        c(&["compaction", "5"]),
        c(&["get", "foo/a", "--rev", "3"]),
        c(&["get", "foo", "--rev", "5"]),
        c(&["compaction", "4"]),
        c(&["get", "foo", "-w", "json"]),
    ]
}

#[test]
fn etcdctl_kv_commands_answer_as_etcd_does() {
    let etcd = Etcd::start();
    let geo = GeoNode::start();
    for (args, stdin) in script() {
        let want = observe(&etcd.endpoint(), &args, stdin);
        let got = observe(&geo.endpoint(), &args, stdin);
        assert_eq!(got, want, "geolock (left) and etcd (right) differ");
    }
}
