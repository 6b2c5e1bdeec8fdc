//! HTTPS on 9453: rustls with the ring provider, TLS 1.3 and TLS 1.2 only
//! (rustls implements nothing older, and both are named here so that a
//! future default cannot widen them). The node's certificate and key are
//! `etc/safekit/tls/<node>.crt` and `<node>.key` (PEM), made by `safekit
//! certs init` or given by the operator; without them HTTPS is off.

use std::{path::Path, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// The acceptor for node `me`, `Ok(None)` when it has no certificate.
#[expect(
    deprecated,
    reason = "ring's provider lacks post-quantum key exchange; the aws-lc provider would need cmake and a second crypto library, ring is already the replication channel's"
)]
pub(in crate::daemon) fn acceptor(
    etc: &Path,
    me: &str,
) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let (cert, key) = crate::certs::node_files(etc, me);
    if !cert.exists() && !key.exists() {
        return Ok(None);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("{}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("certificate and key of node {me}: {e}"))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// Proxy mode's client: TLS to the other nodes' HTTPS port, their
/// certificates verified against the cluster CA (`tls/ca.crt`). `None`
/// when this node serves no HTTPS or has no CA file: proxy mode then
/// uses HTTP.
#[expect(
    deprecated,
    reason = "ring's provider, as for the server side (see acceptor)"
)]
pub(in crate::daemon) fn connector(etc: &Path, me: &str) -> Option<tokio_rustls::TlsConnector> {
    let (cert, _) = crate::certs::node_files(etc, me);
    let ca = etc.join(crate::certs::TLS_DIR).join("ca.crt");
    if !cert.exists() || !ca.exists() {
        return None;
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca).ok()?.flatten() {
        if let Err(e) = roots.add(c) {
            tracing::warn!(file = %ca.display(), error = %e, "cluster CA certificate refused");
        }
    }
    if roots.is_empty() {
        return None;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
