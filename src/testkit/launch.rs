//! The one way this repository starts a member process, `lockctl start` or a real `etcd`, with
//! the flags the two share (etcd's names): for `lockctl dev`, the multi-region harness, the
//! tests and the benches.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// One member's start flags, named as etcd names them. Addresses are `host:port`; the flags
/// carry them as `http://` URLs, as etcd's do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberFlags {
    pub name: String,
    pub data_dir: PathBuf,
    /// Where clients reach it: listened on and advertised.
    pub client: String,
    /// Where it listens for peers.
    pub peer: String,
    /// Where other members reach it, when not at `peer` (a relay stands in between).
    pub advertised_peer: Option<String>,
    /// `name=http://host:port,...`; this member alone when empty.
    pub initial_cluster: String,
    /// `existing` for a member that joins a running cluster; etcd's default (`new`) when `None`.
    pub initial_cluster_state: Option<String>,
    /// Clients connect with TLS: the client URLs are `https://` (the TLS files are flags of
    /// their own).
    pub client_tls: bool,
}

impl MemberFlags {
    /// A member of a cluster of its own on loopback, with its data in `data_dir`.
    pub fn single(name: &str, data_dir: PathBuf, client_port: u16, peer_port: u16) -> MemberFlags {
        MemberFlags {
            name: name.to_string(),
            data_dir,
            client: format!("127.0.0.1:{client_port}"),
            peer: format!("127.0.0.1:{peer_port}"),
            ..MemberFlags::default()
        }
    }

    /// The flags for `etcd` (and, after `start`, for `lockctl`).
    pub fn args(&self) -> Vec<OsString> {
        let client = format!("{}://{}", if self.client_tls { "https" } else { "http" }, self.client);
        let peer = format!("http://{}", self.peer);
        let advertised = self.advertised_peer.as_ref().map_or(peer.clone(), |a| format!("http://{a}"));
        let initial = if self.initial_cluster.is_empty() {
            format!("{}={advertised}", self.name)
        } else {
            self.initial_cluster.clone()
        };
        let mut a: Vec<OsString> =
            vec!["--name".into(), self.name.clone().into(), "--data-dir".into(), self.data_dir.clone().into()];
        for s in ["--listen-client-urls", &client, "--advertise-client-urls", &client] {
            a.push(s.into());
        }
        for s in ["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &advertised] {
            a.push(s.into());
        }
        a.push(format!("--initial-cluster={initial}").into());
        if let Some(state) = &self.initial_cluster_state {
            a.push(format!("--initial-cluster-state={state}").into());
        }
        a
    }

    /// The arguments of `lockctl`: `start`, these flags, and with `certs` (a directory of
    /// [`crate::certs`]) the member's peer TLS files.
    pub fn lockctl_start(&self, certs: Option<&Path>) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["start".into()];
        a.extend(self.args());
        if let Some(dir) = certs {
            a.extend(crate::certs::peer_tls_flags(dir, &self.name));
        }
        a
    }
}

/// A port on 127.0.0.1 free for both TCP (client URLs, etcd's peer URLs) and UDP (geolock's peer
/// URLs: QUIC) right now. Asking for a TCP port alone handed out ports that a UDP socket of a
/// test running alongside (a relay's flow) already held.
pub fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
        if let Ok(port) = port {
            if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: Vec<OsString>) -> Vec<String> {
        a.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn a_single_member_names_itself_as_the_initial_cluster() {
        let f = MemberFlags::single("n1", PathBuf::from("/d"), 2379, 2380);
        assert_eq!(
            strings(f.args()),
            [
                "--name",
                "n1",
                "--data-dir",
                "/d",
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster=n1=http://127.0.0.1:2380",
            ]
        );
    }

    #[test]
    fn a_member_behind_a_relay_advertises_the_relay_and_joins_a_running_cluster() {
        let f = MemberFlags {
            advertised_peer: Some("10.0.0.1:3380".into()),
            initial_cluster: "a=http://10.0.0.2:3380,n1=http://10.0.0.1:3380".into(),
            initial_cluster_state: Some("existing".into()),
            ..MemberFlags::single("n1", PathBuf::from("/d"), 2379, 2380)
        };
        let a = strings(f.lockctl_start(Some(Path::new("/c"))));
        assert_eq!(a[0], "start");
        assert!(a.windows(2).any(|w| w == ["--listen-peer-urls", "http://127.0.0.1:2380"]));
        assert!(a.windows(2).any(|w| w == ["--initial-advertise-peer-urls", "http://10.0.0.1:3380"]));
        assert!(a.contains(&"--initial-cluster=a=http://10.0.0.2:3380,n1=http://10.0.0.1:3380".to_string()));
        assert!(a.contains(&"--initial-cluster-state=existing".to_string()));
        assert!(a.windows(2).any(|w| w == ["--peer-cert-file", "/c/n1.crt"]));
    }
}
