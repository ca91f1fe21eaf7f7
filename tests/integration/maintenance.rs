//! Endpoint status and health, member list.

use crate::common::{client, etcdctl, etcdctl_ok, rt, Etcd, GeoNode};

/// `etcdctl member list` with the member ID and the ports masked.
fn member_list_masked(endpoint: &str, peer_port: u16) -> String {
    let out = etcdctl_ok(endpoint, &["member", "list"]);
    let id = out.split(", ").next().unwrap_or_default().to_string();
    let client_port = endpoint.rsplit(':').next().unwrap();
    out.replace(&id, "ID").replace(&format!(":{peer_port}"), ":PEER").replace(&format!(":{client_port}"), ":CLIENT")
}

#[test]
fn member_list_reads_as_etcds() {
    let etcd = Etcd::start();
    let geo = GeoNode::start();
    assert_eq!(member_list_masked(&geo.endpoint(), geo.peer_port), member_list_masked(&etcd.endpoint(), etcd.peer_port));
}

#[test]
fn endpoint_status_health_and_member_list() {
    let geo = GeoNode::start();
    let ep = geo.endpoint();
    etcdctl_ok(&ep, &["put", "k", "v"]);

    // etcdctl 3.4 prints health to stderr.
    let out = etcdctl(&ep, &["endpoint", "health"], None);
    assert!(out.status.success());
    let health = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(health.starts_with(&format!("{ep} is healthy: successfully committed proposal")), "{health}");

    let status = etcdctl_ok(&ep, &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let s = &v[0]["Status"];
    let member = s["header"]["member_id"].as_u64().unwrap();
    assert_eq!(s["leader"].as_u64().unwrap(), member, "a single member leads: {status}");
    assert_eq!(s["header"]["revision"].as_i64().unwrap(), 2, "{status}");
    assert!(s["raftTerm"].as_u64().unwrap() >= 1, "{status}");
    assert!(s["raftIndex"].as_u64().unwrap() >= 2, "{status}");
    assert!(s["dbSize"].as_i64().unwrap() > 0, "{status}");

    let members = etcdctl_ok(&ep, &["member", "list"]);
    let fields: Vec<&str> = members.trim().split(", ").collect();
    assert_eq!(fields.len(), 6, "{members}");
    assert_eq!(u64::from_str_radix(fields[0], 16).unwrap(), member);
    assert_eq!(&fields[1..], &["started", "n1", &format!("http://127.0.0.1:{}", geo.peer_port), &format!("http://{ep}"), "false"]);

    rt().block_on(async {
        let mut c = client(&ep).await;
        let st = c.status().await.unwrap();
        assert_eq!(st.leader(), member);
        assert_eq!(st.raft_applied_index(), st.raft_index());
        let ml = c.member_list().await.unwrap();
        assert_eq!(ml.members().len(), 1);
        assert_eq!(ml.members()[0].name(), "n1");
    });
}
