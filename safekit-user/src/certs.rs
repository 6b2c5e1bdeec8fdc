//! `safekit certs init`: a cluster CA and one certificate per node (rcgen,
//! ECDSA P-256), for HTTPS on 9453. Files in `etc/safekit/tls/`: `ca.crt`,
//! `ca.key`, and `<node>.crt` / `<node>.key` for every node of
//! `cluster.toml`, keys mode 0600. Each node's certificate names the node
//! and its addresses (and `localhost`), valid 10 years. Copy the directory
//! to every node; clients trust `ca.crt`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::config::ClusterConfig;

/// Directory of the TLS files in the config dir.
pub const TLS_DIR: &str = "tls";

/// Errors of `certs init`.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Generating a key or certificate.
    #[error("generating {what}: {source}")]
    Generate {
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: rcgen::Error,
    },
    /// Files exist already.
    #[error("{0} exists already: remove the tls directory first (or use --force)")]
    Exists(PathBuf),
    /// Writing.
    #[error("writing {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Certificate and key files of node `node`.
#[must_use]
pub fn node_files(etc: &Path, node: &str) -> (PathBuf, PathBuf) {
    let dir = etc.join(TLS_DIR);
    (
        dir.join(format!("{node}.crt")),
        dir.join(format!("{node}.key")),
    )
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), CertError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Makes the CA and every node's certificate under `etc/tls`; returns the
/// files written.
pub fn init(etc: &Path, cluster: &ClusterConfig, force: bool) -> Result<Vec<PathBuf>, CertError> {
    let dir = etc.join(TLS_DIR);
    let ca_crt = dir.join("ca.crt");
    if ca_crt.exists() && !force {
        return Err(CertError::Exists(ca_crt));
    }
    std::fs::create_dir_all(&dir).map_err(|source| CertError::Io {
        path: dir.clone(),
        source,
    })?;
    let gen_err = |what: &str| {
        let what = what.to_owned();
        move |source| CertError::Generate { what, source }
    };
    let ca_key = KeyPair::generate().map_err(gen_err("the CA key"))?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("safekit cluster {} CA", cluster.name),
    );
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = rcgen::date_time_ymd(2024, 1, 1);
    ca.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let authority = ca.self_signed(&ca_key).map_err(gen_err("the CA"))?;
    let mut written = Vec::new();
    write(&ca_crt, &authority.pem(), 0o644)?;
    written.push(ca_crt);
    let ca_key_file = dir.join("ca.key");
    write(&ca_key_file, &ca_key.serialize_pem(), 0o600)?;
    written.push(ca_key_file);
    let issuer = Issuer::new(ca, ca_key);
    for node in &cluster.nodes {
        let what = format!("node {}'s certificate", node.name);
        let key = KeyPair::generate().map_err(gen_err(&what))?;
        let mut names = vec![node.name.clone(), "localhost".to_owned()];
        names.extend(node.addrs.values().map(ToString::to_string));
        let mut p = CertificateParams::new(names).map_err(gen_err(&what))?;
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node.name.clone());
        p.distinguished_name = dn;
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let cert = p.signed_by(&key, &issuer).map_err(gen_err(&what))?;
        let (crt_file, key_file) = node_files(etc, &node.name);
        write(&crt_file, &cert.pem(), 0o644)?;
        write(&key_file, &key.serialize_pem(), 0o600)?;
        written.push(crt_file);
        written.push(key_file);
    }
    Ok(written)
}
