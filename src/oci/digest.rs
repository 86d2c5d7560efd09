//! [`Digest`], the content address of every blob and manifest, and
//! [`DigestHasher`], which computes one while bytes stream past.
//!
//! Only `sha256:<64 lowercase hex>` is accepted. regmirror verifies every byte
//! it stores against its digest, so a digest it cannot compute (sha512,
//! blake3, …) is refused at the parser rather than stored unverified.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;
use sha2::Sha256;

use super::{snippet, ParseError};

const ALGORITHM: &str = "sha256";
const PREFIX: &str = "sha256:";
const HEX_LEN: usize = 64;

/// A validated `sha256:<hex>` digest.
///
/// The full string is kept so that `as_str`, `Display` and `hex` are free:
/// digests are formatted into every path, key and header.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`, for content already in memory (manifests).
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        let mut hasher = DigestHasher::new();
        hasher.update(bytes);
        hasher.finish()
    }

    /// The whole digest, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 lowercase hex characters after the colon.
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    /// Always `"sha256"`; kept as a method so callers do not hard-code it.
    pub fn algorithm(&self) -> &'static str {
        ALGORITHM
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| ParseError::Digest(format!("{}: {reason}", snippet(s)));
        let Some((algorithm, encoded)) = s.split_once(':') else {
            return Err(invalid("expected <algorithm>:<hex>"));
        };
        if algorithm != ALGORITHM {
            return Err(invalid("only sha256 is supported"));
        }
        if encoded.len() != HEX_LEN {
            return Err(invalid("sha256 needs 64 hex characters"));
        }
        // Uppercase is refused rather than folded: the digest string names
        // files and index keys, so it must have exactly one spelling.
        if !encoded
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(invalid("hex must be lowercase 0-9a-f"));
        }
        Ok(Digest(s.to_owned()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = Digest;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sha256:<hex> digest string")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Digest, E> {
                v.parse().map_err(E::custom)
            }
        }

        // A visitor rather than `String::deserialize` so that borrowed input
        // (sled values, manifest bodies) is validated without a copy.
        deserializer.deserialize_str(Visitor)
    }
}

/// Computes a [`Digest`] incrementally, chunk by chunk, as a download streams
/// to disk. `sha2` picks SHA-NI or other CPU extensions at run time.
#[derive(Clone, Default)]
pub struct DigestHasher {
    inner: Sha256,
}

impl DigestHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
    }

    pub fn finish(self) -> Digest {
        let hash = self.inner.finalize();
        let mut hex = [0u8; HEX_LEN];
        hex::encode_to_slice(hash, &mut hex).expect("32 bytes encode to 64 hex characters");
        let mut s = String::with_capacity(PREFIX.len() + HEX_LEN);
        s.push_str(PREFIX);
        s.push_str(std::str::from_utf8(&hex).expect("hex is ASCII"));
        Digest(s)
    }
}

impl fmt::Debug for DigestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestHasher").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parse() {
        let hex64 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let cases: Vec<(String, bool)> = vec![
            (EMPTY.into(), true),
            (format!("sha256:{}", "0".repeat(64)), true),
            (format!("sha256:{}", hex64.to_uppercase()), false),
            (format!("SHA256:{hex64}"), false),
            (format!("sha256:{}", &hex64[..63]), false),
            (format!("sha256:{hex64}0"), false),
            (format!("sha512:{}", "a".repeat(128)), false),
            (format!("blake3:{hex64}"), false),
            (hex64.into(), false),
            ("".into(), false),
            ("sha256:".into(), false),
            (":".into(), false),
            (format!("sha256:{}é", &hex64[..62]), false),
            (format!("sha256:{}", "g".repeat(64)), false),
            (format!(" {EMPTY}"), false),
            (format!("{EMPTY} "), false),
            (format!("{EMPTY}\n"), false),
        ];
        for (input, valid) in cases {
            let parsed = input.parse::<Digest>();
            assert_eq!(parsed.is_ok(), valid, "input {input:?}: {parsed:?}");
            match parsed {
                Ok(d) => assert_eq!(d.as_str(), input),
                Err(e) => assert!(matches!(e, ParseError::Digest(_))),
            }
        }
    }

    #[test]
    fn error_message_is_bounded() {
        let huge = format!("sha256:{}", "z".repeat(100_000));
        let message = huge.parse::<Digest>().unwrap_err().to_string();
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn accessors() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.as_str(), EMPTY);
    }

    #[test]
    fn hashing() {
        let cases: &[(&[&[u8]], &str)] = &[
            (&[], EMPTY),
            (&[b""], EMPTY),
            (
                &[b"abc"],
                "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                &[b"a", b"", b"bc"],
                "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
        ];
        for (chunks, expected) in cases {
            let mut hasher = DigestHasher::new();
            for chunk in *chunks {
                hasher.update(chunk);
            }
            assert_eq!(hasher.finish().as_str(), *expected);
            assert_eq!(Digest::sha256_of(&chunks.concat()).as_str(), *expected);
        }
    }

    #[test]
    fn serde_round_trip_validates() {
        let d: Digest = EMPTY.parse().unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);

        let invalid = ["\"sha256:abc\"", "\"\"", "42", "null", "[\"sha256:x\"]"];
        for json in invalid {
            assert!(serde_json::from_str::<Digest>(json).is_err(), "{json}");
        }
    }
}
