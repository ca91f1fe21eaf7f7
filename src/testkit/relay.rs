//! A userspace UDP relay that stands in front of a member's peer (QUIC) port and delays every
//! datagram by the one-way latency between the sender's region and the member's, in both
//! directions: this kernel has no `netem`, and the multi-region harness needs WAN latency.
//! The delay is chosen per sender address, so one relay serves peers from every region; a
//! sender with no delay (`None`) is cut off, which is how a partition looks from here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use geolock_core::limits::{RELAY_DATAGRAM_BYTES_MAX, RELAY_FLOWS_MAX, RELAY_QUEUE_DATAGRAMS_MAX};

/// The one-way delay for datagrams from (and back to) a sender, or `None` to drop them.
pub type DelayFor = Arc<dyn Fn(SocketAddr) -> Option<Duration> + Send + Sync>;

/// A running relay; it stops when dropped.
pub struct Relay {
    /// Where senders reach the relay.
    pub listen: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Relay datagrams arriving at `listen` to `upstream`, and the replies back.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, delay_for: DelayFor) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind(listen).await?);
        let listen = front.local_addr()?;
        let task = tokio::spawn(run(front, upstream, delay_for));
        Ok(Relay { listen, task })
    }
}

/// Datagrams waiting out their delay, in arrival order; the delay of a direction is constant,
/// so arrival order is also delivery order and nothing is reordered.
struct Delayed {
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
}

impl Delayed {
    /// Send each datagram on `socket` to `to` once its time has come.
    fn new(socket: Arc<UdpSocket>, to: SocketAddr) -> (Delayed, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(RELAY_QUEUE_DATAGRAMS_MAX);
        let task = tokio::spawn(async move {
            while let Some((at, bytes)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                let _ = socket.send_to(&bytes, to).await;
            }
        });
        (Delayed { tx }, task)
    }

    /// Queue a datagram; a full queue drops it, as a congested link would.
    fn push(&self, at: Instant, bytes: Vec<u8>) {
        let _ = self.tx.try_send((at, bytes));
    }
}

/// One sender's path: its own socket towards the upstream, so replies can be told apart.
struct Flow {
    to_upstream: Delayed,
    tasks: [tokio::task::JoinHandle<()>; 3],
}

impl Drop for Flow {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn run(front: Arc<UdpSocket>, upstream: SocketAddr, delay_for: DelayFor) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; RELAY_DATAGRAM_BYTES_MAX];
    loop {
        let Ok((len, from)) = front.recv_from(&mut buf).await else { continue };
        let Some(delay) = delay_for(from) else { continue };
        if !flows.contains_key(&from) {
            if flows.len() >= RELAY_FLOWS_MAX {
                flows.clear();
            }
            let Ok(flow) = open_flow(front.clone(), from, upstream, delay, delay_for.clone()).await else { continue };
            flows.insert(from, flow);
        }
        if let Some(flow) = flows.get(&from) {
            flow.to_upstream.push(Instant::now() + delay, buf[..len].to_vec());
        }
    }
}

async fn open_flow(
    front: Arc<UdpSocket>,
    from: SocketAddr,
    upstream: SocketAddr,
    delay: Duration,
    delay_for: DelayFor,
) -> std::io::Result<Flow> {
    // From the relay's own address: the upstream may live in another network namespace, where
    // only the relay's side of the link routes back here.
    let local = SocketAddr::new(front.local_addr()?.ip(), 0);
    let socket = Arc::new(UdpSocket::bind(local).await?);
    let (to_upstream, send_up) = Delayed::new(socket.clone(), upstream);
    let (to_sender, send_back) = Delayed::new(front, from);
    let receive_replies = tokio::spawn(async move {
        let mut buf = vec![0u8; RELAY_DATAGRAM_BYTES_MAX];
        while let Ok((len, src)) = socket.recv_from(&mut buf).await {
            // A cut (partitioned) sender gets nothing back either.
            if src == upstream && delay_for(from).is_some() {
                to_sender.push(Instant::now() + delay, buf[..len].to_vec());
            }
        }
    });
    Ok(Flow { to_upstream, tasks: [send_up, send_back, receive_replies] })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind a relay that delays 40 ms each way: every reply comes back after
    /// at least the round trip, in order; a sender without a delay gets nothing through.
    #[tokio::test]
    async fn datagrams_are_delayed_both_ways_in_order_and_cut_senders_get_nothing() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let allowed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cut = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cut_addr = cut.local_addr().unwrap();
        let delay_for: DelayFor =
            Arc::new(move |from| if from == cut_addr { None } else { Some(Duration::from_millis(40)) });
        let relay = Relay::start("127.0.0.1:0".parse().unwrap(), echo_addr, delay_for).await.unwrap();

        let sent = std::time::Instant::now();
        for i in 0..20u8 {
            allowed.send_to(&[i], relay.listen).await.unwrap();
        }
        let mut buf = [0u8; 64];
        for i in 0..20u8 {
            let (n, from) = allowed.recv_from(&mut buf).await.unwrap();
            assert_eq!((&buf[..n], from), (&[i][..], relay.listen));
        }
        let rtt = sent.elapsed();
        assert!(rtt >= Duration::from_millis(80), "round trip {rtt:?} under twice the one-way delay");

        cut.send_to(&[1], relay.listen).await.unwrap();
        let got = tokio::time::timeout(Duration::from_millis(300), cut.recv_from(&mut buf)).await;
        assert!(got.is_err(), "a cut-off sender got a reply");
    }
}
