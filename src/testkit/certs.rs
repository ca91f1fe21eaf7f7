//! Development certificates: a cluster CA and node certificates signed by it (`lockctl certs
//! init|issue`), for local clusters and tests. Production operators bring their own; the
//! transport only needs PEM files.
//!
//! A node certificate names the member (a DNS subject alternative name equal to the member
//! name) and its hosts, and serves both as server and as client certificate.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certs: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certs: {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "geolock cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn write(path: PathBuf, text: &str) -> Result<(), CertError> {
    std::fs::write(&path, text).map_err(|source| CertError::Io { path, source })
}

fn read(path: PathBuf) -> Result<String, CertError> {
    std::fs::read_to_string(&path).map_err(|source| CertError::Io { path, source })
}

/// Create `dir/ca.crt` and `dir/ca.key`.
pub fn init_ca(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_path_buf(), source })?;
    let key = KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    write(dir.join("ca.crt"), &cert.pem())?;
    write(dir.join("ca.key"), &key.serialize_pem())
}

/// Create `dir/<name>.crt` and `dir/<name>.key`, signed by the CA in `dir`, naming `name` and
/// `hosts` (DNS names or IP addresses).
pub fn issue(dir: &Path, name: &str, hosts: &[String]) -> Result<(PathBuf, PathBuf), CertError> {
    let ca_key = KeyPair::from_pem(&read(dir.join("ca.key"))?)?;
    // The issuer is described by the same parameters the CA certificate was made from.
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut names = vec![name.to_string()];
    names.extend(hosts.iter().cloned());
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let (crt, keyf) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    write(crt.clone(), &cert.pem())?;
    write(keyf.clone(), &key.serialize_pem())?;
    Ok((crt, keyf))
}

/// Create `dir/<stem>.crt` and `dir/<stem>.key`: a client certificate signed by the CA in
/// `dir` with common name `cn`, or none (etcd then sees no user), and no other name.
pub fn issue_client(dir: &Path, stem: &str, cn: Option<&str>) -> Result<(PathBuf, PathBuf), CertError> {
    let issuer = Issuer::new(ca_params(), KeyPair::from_pem(&read(dir.join("ca.key"))?)?);
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    if let Some(cn) = cn {
        p.distinguished_name.push(DnType::CommonName, cn);
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let (crt, keyf) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
    write(crt.clone(), &cert.pem())?;
    write(keyf.clone(), &key.serialize_pem())?;
    Ok((crt, keyf))
}

/// Write `dir/revoked.crl`: a revocation list signed by the CA in `dir` naming the
/// certificates `dir/<stem>.crt` of `stems`. Returns its path.
pub fn revoke(dir: &Path, stems: &[&str]) -> Result<PathBuf, CertError> {
    let issuer = Issuer::new(ca_params(), KeyPair::from_pem(&read(dir.join("ca.key"))?)?);
    let mut revoked_certs = Vec::new();
    for stem in stems {
        let path = dir.join(format!("{stem}.crt"));
        let pem = read(path.clone())?;
        let unreadable = |why: String| CertError::Io { path: path.clone(), source: std::io::Error::other(why) };
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| unreadable(e.to_string()))?;
        let cert = pem.parse_x509().map_err(|e| unreadable(e.to_string()))?;
        revoked_certs.push(rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(cert.raw_serial()),
            revocation_time: rcgen::date_time_ymd(2026, 1, 1),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let crl = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2026, 1, 1),
        next_update: rcgen::date_time_ymd(2036, 1, 1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    let path = dir.join("revoked.crl");
    write(path.clone(), &crl.pem()?)?;
    Ok(path)
}

/// The `lockctl start` flags that give member `name` its peer identity from `dir`, laid out as
/// `lockctl certs init|issue` writes it.
pub fn peer_tls_flags(dir: &Path, name: &str) -> [std::ffi::OsString; 6] {
    [
        "--peer-trusted-ca-file".into(),
        dir.join("ca.crt").into(),
        "--peer-cert-file".into(),
        dir.join(format!("{name}.crt")).into(),
        "--peer-key-file".into(),
        dir.join(format!("{name}.key")).into(),
    ]
}
