//! The mirror's own TLS: a rustls server configuration built from `tls.cert`, `tls.key` and the
//! optional `tls.client_ca`, rebuilt when those files change so a rotated certificate (by
//! cert-manager or certbot) is served without a restart.
//!
//! A reload that fails (a half-written file, a key that does not match the certificate) keeps
//! the configuration in use and says why in the log. This module knows nothing of HTTP.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// The server configuration in force, and how to notice that its files changed.
pub struct Reloader {
    config: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<Vec<Option<Stamp>>>,
}

/// What tells us a file changed: its modification time, size and inode (a symlink swap, as
/// Kubernetes does for mounted secrets, changes the inode).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

impl Reloader {
    /// Loads the files once; failure is a start-up error.
    pub fn new(config: &TlsConfig) -> Result<Reloader, String> {
        let stamps = stamps(config);
        let server = load(config)?;
        Ok(Reloader {
            config: config.clone(),
            current: RwLock::new(Arc::new(server)),
            stamps: Mutex::new(stamps),
        })
    }

    /// How often the files are checked for changes.
    pub fn interval(&self) -> std::time::Duration {
        self.config.reload_interval.0
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reloads if a file changed; answers whether a new configuration is in force.
    pub fn check(&self) -> bool {
        let now = stamps(&self.config);
        if *self
            .stamps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == now
        {
            return false;
        }
        match load(&self.config) {
            Ok(server) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(server);
                *self
                    .stamps
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
                tracing::info!(cert = %self.config.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(error) => {
                // The stamps stay old, so the next check tries again (the other file of a
                // pair may still be on its way).
                tracing::warn!(%error, "TLS files changed but cannot be loaded; keeping the current certificate");
                false
            }
        }
    }
}

fn stamps(config: &TlsConfig) -> Vec<Option<Stamp>> {
    let mut files: Vec<&PathBuf> = vec![&config.cert, &config.key];
    files.extend(config.client_ca.as_ref());
    files.into_iter().map(|p| stamp(p)).collect()
}

/// Builds the rustls configuration from the files: HTTP/2 and HTTP/1.1 by ALPN, client
/// certificates required when `client_ca` is set.
pub fn load(config: &TlsConfig) -> Result<ServerConfig, String> {
    let certs = read_certs(&config.cert).map_err(|e| format!("tls.cert: {e}"))?;
    let key_bytes = std::fs::read(&config.key)
        .map_err(|e| format!("tls.key: {}: {e}", config.key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|_| format!("tls.key: {}: no PEM private key", config.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path).map_err(|e| format!("tls.client_ca: {e}"))? {
                roots
                    .add(cert)
                    .map_err(|e| format!("tls.client_ca: {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tls.client_ca: {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "tls.cert and tls.key: {} and {}: {e}",
            config.cert.display(),
            config.key.display()
        )
    })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
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
