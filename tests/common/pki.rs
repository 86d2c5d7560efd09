//! Test certificates made with the `openssl` command: a CA, server certificates for
//! 127.0.0.1 and client certificates it signs, and bare self-signed signing keys (for JWTs).
//! Everything lives in the caller's directory and is valid for two days.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::require_tool;

/// A CA and the directory its files go to.
pub struct Ca {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate with its key.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new(require_tool("openssl"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

impl Ca {
    /// A new CA named `name` in `dir` (`<name>.crt`, `<name>.key`).
    pub fn new(dir: &Path, name: &str) -> Ca {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let mut args = vec!["req", "-x509"];
        args.extend(EC);
        args.extend([
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
            "-days",
            "2",
            "-subj",
        ]);
        let subject = format!("/CN={name}");
        args.push(&subject);
        args.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&args, dir);
        Ca {
            dir: dir.to_owned(),
            cert,
            key,
        }
    }

    /// A server certificate for 127.0.0.1 and localhost, `<name>.crt`/`<name>.key`.
    pub fn server(&self, name: &str) -> Issued {
        self.issue(
            name,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            "crt",
        )
    }

    /// A replica's peer-channel certificate, used both ways: server and client authentication,
    /// for 127.0.0.1 and localhost, `<name>.crt`/`<name>.key`.
    pub fn peer(&self, name: &str) -> Issued {
        self.issue(
            name,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
            "crt",
        )
    }

    /// A client certificate, `<name>.cert`/`<name>.key` (Docker's certs.d naming).
    pub fn client(&self, name: &str) -> Issued {
        self.issue(name, "extendedKeyUsage=clientAuth\n", "cert")
    }

    fn issue(&self, name: &str, extensions: &str, cert_ext: &str) -> Issued {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.{cert_ext}"));
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(&ext, extensions).unwrap();
        let mut args = vec!["req"];
        args.extend(EC);
        let subject = format!("/CN={name}");
        args.extend([
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
            "-subj",
            &subject,
        ]);
        openssl(&args, &self.dir);
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                self.cert.to_str().unwrap(),
                "-CAkey",
                self.key.to_str().unwrap(),
                "-CAcreateserial",
                "-out",
                cert.to_str().unwrap(),
                "-days",
                "2",
                "-extfile",
                ext.to_str().unwrap(),
            ],
            &self.dir,
        );
        Issued { cert, key }
    }
}

/// A self-signed P-256 signing certificate (PEM) with its key as PKCS#8 DER (for ring) and
/// the certificate as DER (for a JWT's `x5c`).
pub struct SigningKey {
    pub cert_pem: PathBuf,
    pub key_pkcs8_der: Vec<u8>,
    pub cert_der: Vec<u8>,
}

pub fn signing_key(dir: &Path, name: &str) -> SigningKey {
    let ca = Ca::new(dir, name);
    let der = dir.join(format!("{name}.key.der"));
    openssl(
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            ca.key.to_str().unwrap(),
            "-outform",
            "DER",
            "-out",
            der.to_str().unwrap(),
        ],
        dir,
    );
    let cert_der = dir.join(format!("{name}.crt.der"));
    openssl(
        &[
            "x509",
            "-in",
            ca.cert.to_str().unwrap(),
            "-outform",
            "DER",
            "-out",
            cert_der.to_str().unwrap(),
        ],
        dir,
    );
    SigningKey {
        cert_pem: ca.cert,
        key_pkcs8_der: std::fs::read(der).unwrap(),
        cert_der: std::fs::read(cert_der).unwrap(),
    }
}
