//! The client side of `cluster.tls`: the rustls configuration the peer client uses, which
//! presents this replica's certificate and trusts only the cluster's CA (no system roots: a
//! certificate from a public CA must not pass for a replica).
//!
//! Read once, when the [`Cluster`](super::Cluster) is built; the listener's side, which
//! follows rotated files, lives in `server::tls`. This module knows nothing of HTTP.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::ClusterTlsConfig;

/// The peer client's TLS configuration; every error names its `cluster.tls` key.
pub fn client_config(config: &ClusterTlsConfig) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&config.ca).map_err(|e| format!("cluster.tls.ca: {e}"))? {
        roots
            .add(cert)
            .map_err(|e| format!("cluster.tls.ca: {}: {e}", config.ca.display()))?;
    }
    let certs = read_certs(&config.cert).map_err(|e| format!("cluster.tls.cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| {
        format!(
            "cluster.tls.key: {}: no PEM private key ({e})",
            config.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cluster.tls: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| {
            format!(
                "cluster.tls.cert and cluster.tls.key: {} and {}: {e}",
                config.cert.display(),
                config.key.display()
            )
        })?;
    // HTTP/1.1 as over plain TCP: one connection per concurrent stream, so a slow blob
    // stream never holds back another under a shared HTTP/2 window.
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(client)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}
