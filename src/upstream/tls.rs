//! TLS and proxy settings of one upstream's HTTP client: extra CA certificates, a client
//! certificate, Docker's `certs.d` layout, and the proxy.
//!
//! Files are read once, when the client is built; a missing or unreadable file is an error
//! naming the upstream and the key. Nothing here sends a request; the one network use is a
//! bare handshake to diagnose a server that wants a client certificate.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Certificate, ClientBuilder, Identity, Proxy};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::credentials::expand_env;
use crate::config::UpstreamConfig;

/// The special `proxy` value that turns off proxies for an upstream, environment included.
pub const DIRECT: &str = "direct";

/// Adds the upstream's CA certificates, client identity and proxy to `builder`; answers
/// whether a client certificate is configured.
pub fn configure(
    mut builder: ClientBuilder,
    name: &str,
    config: &UpstreamConfig,
) -> Result<(ClientBuilder, bool), String> {
    let key = |field: &str| format!("upstreams.{name}.{field}");
    let mut roots = Vec::new();
    let mut identity: Option<(PathBuf, PathBuf)> = None;
    if let Some(dir) = &config.certs_dir {
        let layout = certs_dir(dir).map_err(|e| format!("{}: {e}", key("certs_dir")))?;
        for ca in layout.cas {
            roots.extend(read_certs(&ca).map_err(|e| format!("{}: {e}", key("certs_dir")))?);
        }
        identity = layout.identity;
    }
    if let Some(ca) = &config.ca {
        roots.extend(read_certs(ca).map_err(|e| format!("{}: {e}", key("ca")))?);
    }
    if let (Some(cert), Some(key_file)) = (&config.client_cert, &config.client_key) {
        identity = Some((cert.clone(), key_file.clone()));
    }
    if !roots.is_empty() {
        let certs = roots
            .iter()
            .map(|der| Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", key("ca")))?;
        // Like Docker, a registry CA is trusted in addition to the system roots.
        builder = builder.tls_certs_merge(certs);
    }
    let has_identity = identity.is_some();
    if let Some((cert, key_file)) = identity {
        let pem =
            identity_pem(&cert, &key_file).map_err(|e| format!("{}: {e}", key("client_cert")))?;
        let identity = Identity::from_pem(&pem).map_err(|e| {
            format!(
                "{}: {} and {}: {e}",
                key("client_cert"),
                cert.display(),
                key_file.display()
            )
        })?;
        builder = builder.identity(identity);
    }
    match config.proxy.as_deref() {
        // Without a setting reqwest reads HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY.
        None => {}
        Some(DIRECT) => builder = builder.no_proxy(),
        Some(url) => {
            // A proxy URL may carry a password from the environment; it is never logged. An
            // explicit proxy carries everything this upstream's client sends (registry, token
            // realm, blob redirects): NO_PROXY is for the environment's proxies.
            let url = expand_env(url).map_err(|e| format!("{}: {e}", key("proxy")))?;
            let proxy =
                Proxy::all(&url).map_err(|_| format!("{}: not a proxy URL", key("proxy")))?;
            builder = builder.proxy(proxy);
        }
    }
    Ok((builder, has_identity))
}

/// Whether the server at `url` asks for a client certificate during the TLS handshake.
///
/// A server that requires one and gets none closes the connection, and which error the HTTP
/// client reports depends on timing (the TLS alert, or only a closed connection); this probe
/// tells the operator what is missing. It sends no request and nothing secret, so it does not
/// verify the server's certificate. Best effort: `false` when anything fails.
pub async fn asks_for_client_certificate(url: &reqwest::Url, timeout: Duration) -> bool {
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return false;
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let Ok(server_name) = ServerName::try_from(host.clone()) else {
        return false;
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let asked = Arc::new(AskedForCertificate::default());
    let Ok(builder) =
        ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()
    else {
        return false;
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_client_cert_resolver(asked.clone());
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .ok()?;
        connector.connect(server_name, tcp).await.ok()
    };
    let _ = tokio::time::timeout(timeout, handshake).await;
    asked.0.load(Ordering::Relaxed)
}

/// Records whether the server sent a certificate request; presents nothing.
#[derive(Debug, Default)]
struct AskedForCertificate(AtomicBool);

impl ResolvesClientCert for AskedForCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.store(true, Ordering::Relaxed);
        None
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The probe only looks at the handshake, so any server certificate will do.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a Docker `certs.d/<host>/` directory holds: `*.crt` CA bundles and `*.cert`/`*.key`
/// client pairs.
#[derive(Debug, Default, PartialEq, Eq)]
struct CertsDir {
    cas: Vec<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
}

fn certs_dir(dir: &Path) -> Result<CertsDir, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut layout = CertsDir::default();
    for file in &files {
        match file.extension().and_then(|e| e.to_str()) {
            Some("crt") => layout.cas.push(file.clone()),
            Some("cert") => {
                let key = file.with_extension("key");
                if !key.exists() {
                    return Err(format!(
                        "{} has no matching {}",
                        file.display(),
                        key.display()
                    ));
                }
                // Docker offers every pair; a client presents one, so the first one wins.
                if layout.identity.is_none() {
                    layout.identity = Some((file.clone(), key));
                }
            }
            Some("key") => {
                let cert = file.with_extension("cert");
                if !cert.exists() {
                    return Err(format!(
                        "{} has no matching {}",
                        file.display(),
                        cert.display()
                    ));
                }
            }
            _ => {}
        }
    }
    if layout.cas.is_empty() && layout.identity.is_none() {
        return Err(format!(
            "{}: no *.crt, *.cert or *.key files (the Docker certs.d layout)",
            dir.display()
        ));
    }
    Ok(layout)
}

fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&bytes)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The key and certificate chain as one PEM document, each checked for what it must hold.
fn identity_pem(cert: &Path, key: &Path) -> Result<Vec<u8>, String> {
    read_certs(cert)?;
    let key_bytes = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
    PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|_| format!("{}: no PEM private key", key.display()))?;
    let mut pem = key_bytes;
    pem.push(b'\n');
    pem.extend(std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?);
    Ok(pem)
}

/// A hint for TLS failures whose library text does not say what to do about them.
pub fn explain(text: &str) -> Option<&'static str> {
    // Servers answer a missing client certificate with `certificate_required` (TLS 1.3) or
    // `bad_certificate` (Go, and TLS 1.2), and a rejected one with `bad_certificate` too.
    let client_certificate = [
        "CertificateRequired",
        "BadCertificate",
        "certificate required",
    ];
    if client_certificate.iter().any(|t| text.contains(t)) {
        Some("the upstream requires a client certificate, or refused ours: set client_cert and client_key, or certs_dir")
    } else if text.contains("UnknownIssuer") {
        Some("the upstream's certificate is not signed by a trusted CA: set ca or certs_dir")
    } else if text.contains("NotValidForName") {
        Some("the upstream's certificate does not name the host in its url")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_dir_layout() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(certs_dir(d).unwrap_err().contains("no *.crt"));
        std::fs::write(d.join("ca.crt"), "x").unwrap();
        std::fs::write(d.join("client.cert"), "x").unwrap();
        assert!(certs_dir(d).unwrap_err().contains("no matching"));
        std::fs::write(d.join("client.key"), "x").unwrap();
        std::fs::write(d.join("README"), "x").unwrap();
        assert_eq!(
            certs_dir(d).unwrap(),
            CertsDir {
                cas: vec![d.join("ca.crt")],
                identity: Some((d.join("client.cert"), d.join("client.key"))),
            }
        );
        std::fs::write(d.join("orphan.key"), "x").unwrap();
        assert!(certs_dir(d).unwrap_err().contains("orphan.key"));
    }

    #[test]
    fn unreadable_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.crt");
        std::fs::write(&file, "not pem").unwrap();
        assert!(read_certs(&file)
            .unwrap_err()
            .contains("no PEM certificate"));
        assert!(read_certs(&dir.path().join("missing"))
            .unwrap_err()
            .contains("missing"));
    }
}
