//! `regmirror healthcheck`: one GET of `/healthz` on the local listener, for a container
//! `HEALTHCHECK` (a scratch image has no curl).
//!
//! The URL comes from the configuration the server runs with (`listen`, `tls`), so a
//! deployment on another port or with HTTPS is probed where it really listens. Deliberately
//! tiny and blocking (std sockets, rustls without a runtime): it probes one local listener
//! and must not depend on anything the server itself could be stuck on. It knows nothing of
//! the registry API.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::config::Config;

/// What to probe and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `http://` or `https://` URL of the health endpoint.
    pub url: String,
    /// For a listener that requires client certificates (`tls.client_ca`): the probe's own
    /// PEM certificate and key.
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

impl Probe {
    /// `/healthz` where `config` listens: a wildcard address is probed on loopback, HTTPS when
    /// the configuration has `tls`.
    pub fn from_config(config: &Config) -> Probe {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let ip = match config.listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let addr = SocketAddr::new(ip, config.listen.port());
        Probe {
            url: format!("{scheme}://{addr}/healthz"),
            client_identity: None,
        }
    }
}

/// One HTTP/1.0 GET; answers the status line if the status is 2xx, else why not.
///
/// Over HTTPS the server's certificate is not verified: the probe talks to its own
/// listener on a local address its certificate does not name, and sends nothing secret.
pub fn check(probe: &Probe, timeout: Duration) -> Result<String, String> {
    let (tls, rest) = if let Some(rest) = probe.url.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = probe.url.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err("only http:// and https:// URLs are supported".to_owned());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|err| format!("resolving {authority}: {err}"))?
        .next()
        .ok_or_else(|| format!("{authority} has no address"))?;
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: regmirror-healthcheck\r\n\r\n"
    );
    let head = if tls {
        let config = client_config(probe.client_identity.as_ref())?;
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host} is not a server name: {e}"))?;
        let connection = rustls::ClientConnection::new(Arc::new(config), name)
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(rustls::StreamOwned::new(connection, stream), &request)
    } else {
        exchange(stream, &request)
    }?;
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or("").trim().to_owned();
    match status_line.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') && code.len() == 3 => Ok(status_line),
        _ if status_line.is_empty() => Err("no HTTP answer".to_owned()),
        _ => Err(status_line),
    }
}

/// Writes the request and reads up to the end of the status line (at most 4 KiB).
fn exchange(mut stream: impl Read + Write, request: &str) -> Result<Vec<u8>, String> {
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            // A server closing without close_notify after the status line is still an answer.
            Err(_) if head.contains(&b'\n') => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(head)
}

fn client_config(identity: Option<&(PathBuf, PathBuf)>) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LocalListener(provider)));
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
    }
}

/// Accepts the local listener's certificate unverified (see [`check`]).
#[derive(Debug)]
struct LocalListener(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for LocalListener {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_from_listen_and_tls() {
        let tls = "tls: { cert: /c.pem, key: /k.pem }\n";
        let upstreams = "default_upstream: d\nupstreams: { d: { url: 'http://127.0.0.1:1' } }\n";
        let cases = [
            ("listen: 0.0.0.0:5000\n", "http://127.0.0.1:5000/healthz"),
            ("listen: 10.1.2.3:8443\n", "http://10.1.2.3:8443/healthz"),
            ("listen: '[::]:5001'\n", "http://[::1]:5001/healthz"),
            ("", "http://127.0.0.1:5000/healthz"),
        ];
        for (listen, want) in cases {
            let config = Config::parse(&format!("{listen}{upstreams}"), "t").unwrap();
            assert_eq!(Probe::from_config(&config).url, want, "{listen}");
            let config = Config::parse(&format!("{listen}{upstreams}{tls}"), "t").unwrap();
            let want = want.replace("http://", "https://");
            assert_eq!(Probe::from_config(&config).url, want, "{listen} with tls");
        }
    }
}
