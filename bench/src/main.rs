//! Side-by-side benchmarks: the same load, from the same Rust client (`etcd-client`), against a
//! single-member etcd (Debian's etcd-server, fsync on) and a single geolock node, started on
//! this machine in one run. Machines here are noisy, so the figures that matter are the ratios.
//!
//! `cargo build --workspace && cargo run -p geolock-bench -- kv`

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use etcd_client::{Client, ConnectOptions, GetOptions};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    what: What,
    /// Seconds each workload runs against each server.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The lockctl binary (default: the workspace's debug build).
    #[arg(long)]
    lockctl: Option<PathBuf>,
}

#[derive(Subcommand)]
enum What {
    /// Put (256-byte values) at 1 and 16 clients, linearizable Range at 1 and 16 clients.
    Kv,
}

/// A server process, SIGKILLed on drop.
struct Server {
    name: &'static str,
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn(name: &'static str, program: &std::path::Path, prefix: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (cp, pp) = (free_port(), free_port());
    let client = format!("http://127.0.0.1:{cp}");
    let peer = format!("http://127.0.0.1:{pp}");
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = Command::new(program)
        .args(prefix)
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .arg(format!("--initial-cluster=bench={peer}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    Server { name, child, endpoint: format!("127.0.0.1:{cp}"), _dir: dir }
}

async fn connect(endpoint: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(10));
        if let Ok(mut c) = Client::connect([endpoint], Some(opts)).await {
            if c.get("bench-ready", None).await.is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "{endpoint} not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Throughput and latency of one workload.
struct Figures {
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Clone, Copy)]
enum Op {
    Put,
    Get,
}

async fn run(endpoint: &str, op: Op, clients: usize, seconds: u64) -> Figures {
    let value = Arc::new(vec![b'v'; 256]);
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(connect(endpoint).await);
    }
    conns[0].put("bench/read", value.to_vec(), None).await.unwrap();
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let value = value.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < until {
                    let t = Instant::now();
                    match op {
                        Op::Put => {
                            c.put(format!("bench/{i}/{}", n % 1000), value.to_vec(), None).await.unwrap();
                        }
                        Op::Get => {
                            c.get("bench/read", Some(GetOptions::new())).await.unwrap();
                        }
                    }
                    lat.push(t.elapsed());
                    n += 1;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    Figures { ops_per_s: all.len() as f64 / elapsed, p50_ms: pct(0.50), p99_ms: pct(0.99) }
}

fn main() {
    let cli = Cli::parse();
    let lockctl = cli
        .lockctl
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lockctl"));
    assert!(lockctl.exists(), "{} not found: run `cargo build --workspace` first", lockctl.display());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match cli.what {
        What::Kv => {
            let etcd = spawn("etcd", std::path::Path::new("etcd"), &[]);
            let geo = spawn("geolock", &lockctl, &["start"]);
            let workloads = [
                ("put 256 B, 1 client", Op::Put, 1),
                ("put 256 B, 16 clients", Op::Put, 16),
                ("linearizable range, 1 client", Op::Get, 1),
                ("linearizable range, 16 clients", Op::Get, 16),
            ];
            println!("{:<32} {:>10} {:>10} {:>9} {:>9} | ratio geolock/etcd", "workload", "server", "ops/s", "p50 ms", "p99 ms");
            for (label, op, clients) in workloads {
                let mut figs = Vec::new();
                for s in [&etcd, &geo] {
                    let f = rt.block_on(run(&s.endpoint, op, clients, cli.seconds));
                    println!("{label:<32} {:>10} {:>10.0} {:>9.2} {:>9.2}", s.name, f.ops_per_s, f.p50_ms, f.p99_ms);
                    figs.push(f);
                }
                let (e, g) = (&figs[0], &figs[1]);
                println!(
                    "{label:<32} {:>10} {:>10.2} {:>9.2} {:>9.2} | throughput x{:.2}, p50 x{:.2}, p99 x{:.2}",
                    "ratio",
                    g.ops_per_s / e.ops_per_s,
                    g.p50_ms / e.p50_ms,
                    g.p99_ms / e.p99_ms,
                    g.ops_per_s / e.ops_per_s,
                    g.p50_ms / e.p50_ms,
                    g.p99_ms / e.p99_ms
                );
            }
        }
    }
}
