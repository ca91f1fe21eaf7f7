//! Endpoint status and health, member list.

use crate::common::{client, etcdctl, etcdctl_ok, rt, run_with_deadline, Etcd, GeoNode};

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
    assert_eq!(
        member_list_masked(&geo.endpoint(), geo.peer_port),
        member_list_masked(&etcd.endpoint(), etcd.peer_port)
    );
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
    assert_eq!(
        &fields[1..],
        &["started", "n1", &format!("http://127.0.0.1:{}", geo.peer_port), &format!("http://{ep}"), "false"]
    );

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

/// Every shape of `--endpoints` an operator writes (bare, with the scheme, several URLs, the
/// advertised URLs `--cluster` dials) with every etcdctl command that opens a connection per
/// endpoint, against geolock and a real etcd 3.4 in the same run. With a scheme, etcdctl 3.4
/// sends the URL itself as the HTTP/2 `:authority` on those connections, which h2 refused
/// until our patch (third_party/h2/GEOLOCK.md). Output is compared with the values that
/// differ by nature (IDs, ports, versions, sizes, hashes, timings) masked.
#[test]
fn etcdctl_with_every_endpoint_form_gets_what_etcd_gives() {
    let geo = GeoNode::start();
    let etcd = Etcd::start();
    let id = |ep: &str| etcdctl_ok(ep, &["member", "list"]).split(", ").next().unwrap_or_default().to_string();
    let servers =
        [(geo.endpoint(), geo.peer_port, id(&geo.endpoint())), (etcd.endpoint(), etcd.peer_port, id(&etcd.endpoint()))];
    let commands: Vec<Vec<&str>> = vec![
        vec!["endpoint", "status"],
        vec!["endpoint", "status", "--cluster"],
        vec!["endpoint", "health"],
        vec!["endpoint", "health", "--cluster"],
        vec!["endpoint", "hashkv"],
        vec!["endpoint", "hashkv", "--cluster"],
        vec!["defrag"],
        vec!["alarm", "list"],
        vec!["member", "list"],
        vec!["move-leader", "ID"],
        vec!["move-leader", "1234"],
        vec!["put", "k", "v"],
        vec!["get", "k"],
    ];
    for form in ["{}", "http://{}", "http://{},http://{}", "{},http://{}"] {
        for args in &commands {
            // Lines of "endpoint, value, value, ...": the endpoint and the number of fields
            // are compared, not the values.
            let values_vary = args[0] == "endpoint" && (args[1] == "status" || args[1] == "hashkv");
            let run = |(ep, peer, id): &(String, u16, String)| {
                let endpoints = form.replace("{}", ep);
                let args: Vec<&str> = args.iter().map(|a| if *a == "ID" { id.as_str() } else { a }).collect();
                let out = etcdctl(&endpoints, &args, None);
                let port = ep.rsplit(':').next().unwrap();
                // Sorted: etcdctl asks several endpoints at once and prints as they answer.
                let mask = |text: &[u8]| -> Vec<String> {
                    let mut lines: Vec<String> = String::from_utf8_lossy(text)
                        .lines()
                        // etcdctl's client logs retries as JSON with times and a client ID.
                        .filter(|l| !l.starts_with("{\"level\""))
                        .map(|l| {
                            let l = l
                                .replace(id.as_str(), "ID")
                                .replace(&format!(":{peer}"), ":PEER")
                                .replace(&format!(":{port}"), ":CLIENT");
                            let l = match l.split_once("took = ") {
                                Some((head, _)) => format!("{head}took = T"),
                                None => l,
                            };
                            if values_vary {
                                let fields: Vec<&str> = l.split(", ").collect();
                                format!("{} and {} fields", fields[0], fields.len())
                            } else {
                                l
                            }
                        })
                        .collect();
                    lines.sort();
                    lines
                };
                format!(
                    "status {:?}, stdout {:?}, stderr {:?}",
                    out.status.code(),
                    mask(&out.stdout),
                    mask(&out.stderr)
                )
            };
            let [g, e] = [run(&servers[0]), run(&servers[1])];
            assert_eq!(g, e, "etcdctl --endpoints={form} {args:?}: geolock (left) and etcd (right) differ");
        }
    }
}

/// `etcdctl check perf` runs its minute of writes to a verdict against geolock, as against
/// etcd (both at once: the verdict itself depends on this machine's load, so it is printed,
/// not compared).
#[test]
fn etcdctl_check_perf_runs_to_a_verdict() {
    let geo = GeoNode::start();
    let etcd = Etcd::start();
    let runs: Vec<_> = [format!("http://{}", geo.endpoint()), etcd.endpoint()]
        .into_iter()
        .map(|ep| {
            std::thread::spawn(move || {
                let mut cmd = std::process::Command::new("etcdctl");
                cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={ep}")).args(["check", "perf", "--load=s"]);
                (run_with_deadline(cmd, None, std::time::Duration::from_secs(120)), ep)
            })
        })
        .collect();
    for run in runs {
        let (out, ep) = run.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        // The verdict follows the progress bar on the same line at times: look for it anywhere.
        let verdict: Vec<&str> = stdout
            .match_indices("PASS")
            .chain(stdout.match_indices("FAIL"))
            .map(|(at, _)| &stdout[at..])
            .map(|v| v.lines().next().unwrap_or_default())
            .collect();
        println!("check perf against {ep}: {verdict:?}");
        assert!(stdout.contains("Throughput is"), "{ep}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("rpc error"),
            "{ep}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
