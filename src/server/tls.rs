//! The mirror's own TLS: a rustls server configuration built from `tls.cert`, `tls.key` and the
//! optional `tls.client_ca` (or, for the peer channel, `cluster.tls.cert`, `key` and `ca`),
//! rebuilt when those files change so a rotated certificate (by cert-manager or certbot) is
//! served without a restart.
//!
//! A reload that fails (a half-written file, a key that does not match the certificate) keeps
//! the configuration in use and says why in the log. This module knows nothing of HTTP.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{ClusterTlsConfig, TlsConfig};

/// How often the peer channel's files are checked for changes (`tls.reload_interval`'s
/// default; `cluster.tls` has no setting of its own).
const PEER_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The files of one TLS listener, and the configuration keys that name them in messages.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    /// When set, clients must present a certificate that chains to it.
    client_ca: Option<PathBuf>,
    interval: Duration,
    /// `tls` or `cluster.tls`.
    section: &'static str,
    /// The key of `client_ca` within `section`.
    ca_key: &'static str,
}

impl Files {
    fn name(&self, key: &str) -> String {
        format!("{}.{key}", self.section)
    }
}

/// The server configuration in force, and how to notice that its files changed.
pub struct Reloader {
    config: Files,
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
    /// The public listener's (`tls`). Loads the files once; failure is a start-up error.
    pub fn new(config: &TlsConfig) -> Result<Reloader, String> {
        Reloader::with_files(Files {
            cert: config.cert.clone(),
            key: config.key.clone(),
            client_ca: config.client_ca.clone(),
            interval: config.reload_interval.0,
            section: "tls",
            ca_key: "client_ca",
        })
    }

    /// The peer channel's (`cluster.tls`): a client certificate that chains to `ca` is
    /// required. Loads the files once; failure is a start-up error.
    pub fn peers(config: &ClusterTlsConfig) -> Result<Reloader, String> {
        Reloader::with_files(Files {
            cert: config.cert.clone(),
            key: config.key.clone(),
            client_ca: Some(config.ca.clone()),
            interval: PEER_RELOAD_INTERVAL,
            section: "cluster.tls",
            ca_key: "ca",
        })
    }

    fn with_files(config: Files) -> Result<Reloader, String> {
        let stamps = stamps(&config);
        let server = load(&config)?;
        Ok(Reloader {
            config,
            current: RwLock::new(Arc::new(server)),
            stamps: Mutex::new(stamps),
        })
    }

    /// How often the files are checked for changes.
    pub fn interval(&self) -> Duration {
        self.config.interval
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
                tracing::info!(section = self.config.section, cert = %self.config.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(error) => {
                // The stamps stay old, so the next check tries again (the other file of a
                // pair may still be on its way).
                tracing::warn!(section = self.config.section, %error, "TLS files changed but cannot be loaded; keeping the current certificate");
                false
            }
        }
    }
}

fn stamps(config: &Files) -> Vec<Option<Stamp>> {
    let mut files: Vec<&PathBuf> = vec![&config.cert, &config.key];
    files.extend(config.client_ca.as_ref());
    files.into_iter().map(|p| stamp(p)).collect()
}

/// Builds the rustls configuration from the files: HTTP/2 and HTTP/1.1 by ALPN, client
/// certificates required when a client CA is set.
fn load(config: &Files) -> Result<ServerConfig, String> {
    let certs = read_certs(&config.cert).map_err(|e| format!("{}: {e}", config.name("cert")))?;
    let key_bytes = std::fs::read(&config.key)
        .map_err(|e| format!("{}: {}: {e}", config.name("key"), config.key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| {
        format!(
            "{}: {}: no PEM private key",
            config.name("key"),
            config.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{}: {e}", config.section))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let key = config.name(config.ca_key);
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path).map_err(|e| format!("{key}: {e}"))? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{key}: {}: {e}", path.display()))?;
            }
            // Anonymous clients are refused at the handshake (the builder's default).
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{key}: {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "{} and {}: {} and {}: {e}",
            config.name("cert"),
            config.name("key"),
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
