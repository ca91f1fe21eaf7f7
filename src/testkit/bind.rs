//! A real BIND9 (`named` from Debian's bind9) on loopback, primary for one zone that takes RFC 2136
//! updates signed with TSIG: the DNS server of the failover controller's tests and of the
//! active-passive harness. Started in the foreground (`-g`), so the PID kept here is named's own;
//! stopped with SIGKILL when dropped.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use geolock_client::dns::TsigKey;

/// How long named gets to load its zone and listen. Measured: 0.2 s.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Why named did not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("writing named's files in {dir}: {source}")]
    Write { dir: PathBuf, source: std::io::Error },
    #[error("cannot run named (Debian's bind9; tests/deps.sh installs it): {0}")]
    Spawn(std::io::Error),
    #[error("named exited at start ({status}); its log:\n{log}")]
    Exited { status: std::process::ExitStatus, log: String },
    #[error("named did not load the zone; its log:\n{log}")]
    ZoneNotLoaded { log: String },
    #[error("named did not listen on {addr} within {READY_TIMEOUT:?}; its log:\n{log}")]
    NotReady { addr: SocketAddr, log: String },
}

/// A running named.
pub struct Bind {
    child: Child,
    /// Where it answers, over UDP and TCP.
    pub addr: SocketAddr,
    /// The zone it is primary for, absolute (`geolock.test.`).
    pub zone: String,
    /// Granted every update in the zone.
    pub key: TsigKey,
    /// Known to named but granted only the name `bystander.<zone>`: the key a refused policy
    /// shows.
    pub bystander_key: TsigKey,
    log: PathBuf,
}

impl Bind {
    /// named serving `zone` (absolute) on a free loopback port, its files in `dir`; `records`
    /// are zone-file lines added after the SOA and NS records.
    pub fn start(dir: &Path, zone: &str, records: &[String]) -> Result<Bind, BindError> {
        Bind::start_on(dir, std::net::Ipv4Addr::LOCALHOST, zone, records)
    }

    /// [`Bind::start`] listening on `ip` (an address of this namespace).
    pub fn start_on(dir: &Path, ip: std::net::Ipv4Addr, zone: &str, records: &[String]) -> Result<Bind, BindError> {
        // named changes to its directory first: a relative path would then name another place.
        let dir = &std::fs::canonicalize(dir).map_err(|source| BindError::Write { dir: dir.to_path_buf(), source })?;
        let write = |name: &str, text: &str| {
            std::fs::write(dir.join(name), text).map_err(|source| BindError::Write { dir: dir.to_path_buf(), source })
        };
        let key = random_key("geolock-failover");
        let bystander_key = random_key("bystander");
        let port = crate::launch::free_port();
        let addr: SocketAddr = (ip, port).into();
        let d = dir.display();
        let mut conf = format!(
            "options {{ directory \"{d}\"; listen-on port {port} {{ {ip}; }}; listen-on-v6 {{ none; }};\n\
             pid-file \"{d}/named.pid\"; session-keyfile \"{d}/session.key\"; recursion no;\n\
             dnssec-validation no; notify no; }};\n\
             controls {{ }};\n"
        );
        for k in [&key, &bystander_key] {
            let secret = data_encoding::BASE64.encode(&k.secret);
            let _ = writeln!(conf, "key \"{}\" {{ algorithm hmac-sha256; secret \"{secret}\"; }};", k.name);
        }
        let _ = writeln!(
            conf,
            "zone \"{zone}\" {{ type primary; file \"{d}/zone.db\"; update-policy {{\n  \
             grant {} subdomain {zone} ANY;\n  grant {} name bystander.{zone} ANY;\n}}; }};",
            key.name, bystander_key.name
        );
        write("named.conf", &conf)?;
        let mut db = format!(
            "$TTL 30\n@ IN SOA ns.{zone} hostmaster.{zone} 1 60 60 600 30\n@ IN NS ns.{zone}\nns IN A 127.0.0.1\n"
        );
        for r in records {
            let _ = writeln!(db, "{r}");
        }
        write("zone.db", &db)?;
        let log = dir.join("named.log");
        let out = std::fs::File::create(&log).map_err(|source| BindError::Write { dir: dir.to_path_buf(), source })?;
        let err = out.try_clone().map_err(|source| BindError::Write { dir: dir.to_path_buf(), source })?;
        let program = if Path::new("/usr/sbin/named").exists() { "/usr/sbin/named" } else { "named" };
        let child = Command::new(program)
            .arg("-g")
            .arg("-c")
            .arg(dir.join("named.conf"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(BindError::Spawn)?;
        let mut bind = Bind { child, addr, zone: zone.to_string(), key, bystander_key, log };
        bind.wait_ready()?;
        Ok(bind)
    }

    fn wait_ready(&mut self) -> Result<(), BindError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BindError::Exited { status, log: self.log() });
            }
            // named loads zones in the background: "running" can come before the zone's
            // verdict, so wait for the verdict itself ("loaded serial", or "not loaded due to
            // errors", after which named runs without the zone).
            let log = self.log();
            if log.contains("not loaded due to errors") {
                return Err(BindError::ZoneNotLoaded { log });
            }
            let loaded = format!("zone {}/IN: loaded serial", self.zone.trim_end_matches('.'));
            if log.contains(&loaded)
                && log.contains(" running")
                && TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BindError::NotReady { addr: self.addr, log: self.log() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What named has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A key with a fresh 32-byte secret (hmac-sha256's block is 64 bytes; RFC 8945 §6 asks for at
/// least the hash's 32).
fn random_key(name: &str) -> TsigKey {
    TsigKey { name: name.to_string(), secret: (0..32).map(|_| rand::random::<u8>()).collect() }
}
