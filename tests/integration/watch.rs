//! `etcdctl watch` against geolock and etcd, with events written by another client.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{client, rt, Etcd, GeoNode};

/// Start `etcdctl watch`, write through the `etcd-client` crate, and return what the watch
/// printed once it printed `expect_lines` lines.
fn watch_output(endpoint: &str, args: &[&str], expect_lines: usize) -> String {
    let rt = rt();
    rt.block_on(async {
        let mut c = client(endpoint).await;
        c.put("cfg/a", "1", None).await.unwrap(); // rev 2
        c.put("cfg/b", "1", None).await.unwrap(); // rev 3
        c.put("other", "x", None).await.unwrap(); // rev 4
    });
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("watch.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut watcher = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("watch")
        .args(args)
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kill = scopeguard(move || {
        let _ = watcher.kill();
        let _ = watcher.wait();
    });
    std::thread::sleep(Duration::from_millis(500));
    rt.block_on(async {
        let mut c = client(endpoint).await;
        c.put("cfg/a", "2", None).await.unwrap(); // rev 5
        c.delete("cfg/b", None).await.unwrap(); // rev 6
        c.put("other", "y", None).await.unwrap(); // rev 7
        c.put("cfg/c", "3", None).await.unwrap(); // rev 8
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&out_path).unwrap();
        if text.lines().count() >= expect_lines {
            std::thread::sleep(Duration::from_millis(300)); // nothing more may follow
            drop(kill);
            return std::fs::read_to_string(&out_path).unwrap();
        }
        assert!(Instant::now() < deadline, "watch printed only:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct G<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for G<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    G(Some(f))
}

#[test]
fn etcdctl_watch_prefix_rev_prev_kv_sees_every_event_once_in_order() {
    let args = ["--prefix", "cfg/", "--rev", "3", "--prev-kv"];
    // rev 3 put cfg/b; rev 5 put cfg/a (prev 1); rev 6 delete cfg/b (prev); rev 8 put cfg/c.
    // Each event prints: type, key, value; with --prev-kv also the previous key and value.
    let etcd = Etcd::start();
    let want = watch_output(&etcd.endpoint(), &args, 16);
    let geo = GeoNode::start();
    let got = watch_output(&geo.endpoint(), &args, 16);
    assert_eq!(got, want);
    assert!(got.starts_with("PUT\ncfg/b\n1\nPUT\ncfg/a\n1\ncfg/a\n2\nDELETE\n"), "{got}");
}
