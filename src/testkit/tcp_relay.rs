//! A userspace TCP relay for the harness's client-side traffic between regions (a failover
//! controller's probes and fences, the region write lease's grants, DNS updates), as
//! [`crate::relay::Relay`] is for peer traffic: every chunk is forwarded after the one-way
//! latency between the two regions, both ways. While `cut` says so (either region is cut off),
//! new connections are refused and open ones closed, which is how a partition looks to TCP.
//! Namespaces are not routed to one another (the harness leaves the host's `ip_forward` alone),
//! so traffic from one region to another goes through a relay on the root end of the sender's
//! region.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use geolock_core::limits::{RELAY_TCP_CHUNK_BYTES_MAX, RELAY_TCP_CONNECTIONS_MAX, RELAY_TCP_QUEUE_CHUNKS_MAX};

/// Whether the path is cut now.
pub type Cut = Arc<dyn Fn() -> bool + Send + Sync>;

/// How long the relay tries to reach its target for a new connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an open connection looks whether its path was cut.
const CUT_CHECK_EVERY: Duration = Duration::from_millis(50);

/// A running TCP relay; it stops, with every connection it carries, when dropped.
pub struct TcpRelay {
    /// Where senders reach the relay.
    pub listen: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpRelay {
    /// Relay connections arriving at `listen` to `target`, delaying each chunk by `one_way`.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        one_way: Duration,
        cut: Cut,
    ) -> std::io::Result<TcpRelay> {
        let listener = TcpListener::bind(listen).await?;
        let listen = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, target, one_way, cut));
        Ok(TcpRelay { listen, task })
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, one_way: Duration, cut: Cut) {
    let open = Arc::new(tokio::sync::Semaphore::new(RELAY_TCP_CONNECTIONS_MAX));
    // Dropped (so aborting every connection) when this task is aborted.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = open.clone().try_acquire_owned() else { continue };
        if cut() {
            continue;
        }
        let cut = cut.clone();
        conns.spawn(async move {
            let _permit = permit;
            let Ok(Ok(server)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let both = async { tokio::join!(pump(cr, sw, one_way), pump(sr, cw, one_way)) };
            let until_cut = async {
                while !cut() {
                    tokio::time::sleep(CUT_CHECK_EVERY).await;
                }
            };
            tokio::select! {
                _ = both => {}
                _ = until_cut => {}
            }
        });
    }
}

/// Copy `from` to `to`, each chunk `one_way` after it was read (chunks queue, so the delay
/// does not add up over a stream); the write side is shut once `from` ends.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, one_way: Duration) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(RELAY_TCP_QUEUE_CHUNKS_MAX);
    let read = async move {
        let mut buf = vec![0u8; RELAY_TCP_CHUNK_BYTES_MAX];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx.send((Instant::now() + one_way, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An echo server behind a relay that delays 40 ms each way: a reply comes back after at
    /// least the round trip, whole and in order; once the path is cut, the open connection is
    /// closed and a new one gets nothing through.
    #[tokio::test]
    async fn chunks_are_delayed_both_ways_and_a_cut_closes_the_path() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let cut_now = Arc::new(AtomicBool::new(false));
        let flag = cut_now.clone();
        let cut: Cut = Arc::new(move || flag.load(Ordering::SeqCst));
        let relay =
            TcpRelay::start("127.0.0.1:0".parse().unwrap(), echo_addr, Duration::from_millis(40), cut).await.unwrap();

        let mut c = TcpStream::connect(relay.listen).await.unwrap();
        let sent = std::time::Instant::now();
        let message: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let (mut r, mut w) = c.split();
        let mut back = vec![0u8; message.len()];
        let (wrote, read) = tokio::join!(w.write_all(&message), r.read_exact(&mut back));
        wrote.unwrap();
        read.unwrap();
        assert_eq!(back, message);
        let rtt = sent.elapsed();
        assert!(rtt >= Duration::from_millis(80), "round trip {rtt:?} under twice the one-way delay");

        cut_now.store(true, Ordering::SeqCst);
        let mut one = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(2), c.read(&mut one)).await.expect("closed by the cut");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        let mut again = TcpStream::connect(relay.listen).await.unwrap();
        let _ = again.write_all(b"x").await;
        let got = tokio::time::timeout(Duration::from_millis(500), again.read(&mut one)).await;
        assert!(matches!(got, Ok(Ok(0)) | Ok(Err(_))), "a cut path carried data: {got:?}");
    }
}
