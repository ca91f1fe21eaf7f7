//! Members in three emulated regions, each behind the project's WAN relay: a commit waits for
//! the nearest majority's round trip, not for the farthest member.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use geolock_testkit::relay::{DelayFor, Relay};

use crate::common::{client, free_port, lockctl_ok, rt, Cluster};

/// One-way latency between regions 0 (us-east), 1 (us-west) and 2 (europe), in ms: the spec's
/// 60 ms us-east↔us-west and 100 ms us-east↔europe round trips.
fn one_way_ms(a: usize, b: usize) -> u64 {
    match (a.min(b), a.max(b)) {
        (0, 1) => 30,
        (0, 2) => 50,
        (1, 2) => 60,
        _ => 0,
    }
}

#[test]
fn a_commit_waits_for_the_nearest_majority_round_trip() {
    let rt = rt();
    // (client, peer port a member listens on, peer port of the relay in front of it)
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (free_port(), free_port(), free_port())).collect();
    let region_of: Arc<HashMap<u16, usize>> = Arc::new(ports.iter().enumerate().map(|(i, p)| (p.1, i)).collect());
    let _relays: Vec<Relay> = rt.block_on(async {
        let mut relays = Vec::new();
        for (j, p) in ports.iter().enumerate() {
            let region_of = region_of.clone();
            let delay_for: DelayFor =
                Arc::new(move |from| region_of.get(&from.port()).map(|i| Duration::from_millis(one_way_ms(*i, j))));
            let front = format!("127.0.0.1:{}", p.2).parse().unwrap();
            let member = format!("127.0.0.1:{}", p.1).parse().unwrap();
            relays.push(Relay::start(front, member, delay_for).await.unwrap());
        }
        relays
    });
    // As etcd's tuning guide says, the heartbeat interval must exceed the longest round trip
    // between members (120 ms here): a heartbeat is given one interval to be answered, and a
    // leader in europe whose heartbeats all time out can never confirm a read index.
    let c = Cluster::start_on(ports, &["--heartbeat-interval", "200", "--election-timeout", "2000"]);
    // Lead from us-east, whose nearest peer is 60 ms away and whose farthest is 100 ms away.
    let leader = c.leader();
    if leader != 0 {
        lockctl_ok(&["member", "transfer-leadership", "n1", "--endpoints", &c.endpoint(leader)]);
    }
    assert_eq!(c.leader(), 0);
    let mut latencies_ms: Vec<f64> = rt.block_on(async {
        let mut cl = client(&c.endpoint(0)).await;
        let mut out = Vec::new();
        for i in 0..30 {
            let t = Instant::now();
            cl.put(format!("wan/{i}"), "v", None).await.unwrap();
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        out
    });
    latencies_ms.sort_by(f64::total_cmp);
    let p50 = latencies_ms[latencies_ms.len() / 2];
    eprintln!(
        "put p50 {p50:.1} ms across the emulated WAN (nearest majority round trip 60 ms); all: {latencies_ms:.0?}"
    );
    assert!(p50 >= 60.0, "p50 {p50:.1} ms is under the 60 ms round trip: the relay did not delay");
    assert!(p50 < 95.0, "p50 {p50:.1} ms: the commit waited for the 100 ms round trip to europe");
}
