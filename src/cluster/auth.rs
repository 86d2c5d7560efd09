//! The peer channel's authentication: every request carries
//! `x-regmirror-peer: <unix seconds>.<hex HMAC-SHA256(secret, method \n path?query \n seconds)>`.
//!
//! The signature binds the method, the exact path and query and the time, so a captured
//! header opens nothing else and expires: it is accepted within ±[`MAX_SKEW`] seconds of the
//! verifier's clock. Within that window a replay fetches the same content by digest again,
//! which a peer may do anyway; the channel carries nothing secret and changes nothing.
//!
//! HMAC comes from `ring` rather than the `hmac` crate: ring is already compiled in (it is
//! rustls' crypto provider), so this adds no crate, and its `hmac::verify` compares in constant
//! time, which the verifier needs. This module knows nothing of members or HTTP clients.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use ring::hmac;

/// The header carrying the signature.
pub const HEADER: HeaderName = HeaderName::from_static("x-regmirror-peer");

/// Seconds a signature stays valid either side of the verifier's clock: enough for replicas
/// whose clocks NTP keeps within a second or two, short enough that a leaked header soon
/// stops working.
pub const MAX_SKEW: u64 = 60;

/// HMAC-SHA256 is 32 bytes, 64 hex digits.
const MAC_HEX_LEN: usize = 64;
/// u64::MAX has 20 digits; a longer number is malformed, not merely far away.
const MAX_SECONDS_DIGITS: usize = 20;

/// Signs and verifies with the shared secret.
pub struct Signer {
    key: hmac::Key,
}

impl Signer {
    pub fn new(secret: &[u8]) -> Signer {
        Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The header value for a request made at `seconds` (Unix time).
    pub fn sign_at(&self, method: &str, path_and_query: &str, seconds: u64) -> HeaderValue {
        let tag = hmac::sign(&self.key, &message(method, path_and_query, seconds));
        let value = format!("{seconds}.{}", hex::encode(tag.as_ref()));
        HeaderValue::from_str(&value).expect("digits, a dot and hex are a valid header value")
    }

    /// Whether `headers` carry exactly one signature header, well formed, made with our secret
    /// for this method and path, within ±[`MAX_SKEW`] of `now`. Anything else is `false`.
    pub fn verify_at(
        &self,
        headers: &HeaderMap,
        method: &str,
        path_and_query: &str,
        now: u64,
    ) -> bool {
        let mut values = headers.get_all(&HEADER).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        let Some((seconds, mac)) = value.as_bytes().split_once_dot() else {
            return false;
        };
        let digits_only = !seconds.is_empty()
            && seconds.len() <= MAX_SECONDS_DIGITS
            && seconds.iter().all(u8::is_ascii_digit);
        if !digits_only || mac.len() != MAC_HEX_LEN {
            return false;
        }
        // Digits only, so this is valid UTF-8; `parse` fails (rather than wraps) on overflow.
        let Some(seconds) = std::str::from_utf8(seconds)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return false;
        };
        if seconds.abs_diff(now) > MAX_SKEW {
            return false;
        }
        let Ok(tag) = hex::decode(mac) else {
            return false;
        };
        hmac::verify(&self.key, &message(method, path_and_query, seconds), &tag).is_ok()
    }
}

/// What is signed. Newlines cannot occur in a method or a request target, so the fields
/// cannot be shifted into one another.
fn message(method: &str, path_and_query: &str, seconds: u64) -> Vec<u8> {
    format!("{method}\n{path_and_query}\n{seconds}").into_bytes()
}

/// `split_once(b'.')` for byte slices.
trait SplitOnceDot {
    fn split_once_dot(&self) -> Option<(&[u8], &[u8])>;
}

impl SplitOnceDot for [u8] {
    fn split_once_dot(&self) -> Option<(&[u8], &[u8])> {
        let at = self.iter().position(|b| *b == b'.')?;
        Some((&self[..at], &self[at + 1..]))
    }
}

/// The current Unix time in seconds (0 if the clock is before 1970, which fails every check).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef-shared";
    const PATH: &str = "/_regmirror/peer/blobs/sha256:ab?upstream=docker.io&repository=library/x";
    const NOW: u64 = 1_780_000_000;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn signed(signer: &Signer, method: &str, path: &str, at: u64) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, signer.sign_at(method, path, at));
        headers
    }

    #[test]
    fn a_signature_verifies_only_for_its_secret_method_path_and_time() {
        let signer = Signer::new(SECRET);
        let good = signed(&signer, "GET", PATH, NOW);
        assert!(signer.verify_at(&good, "GET", PATH, NOW));
        assert!(signer.verify_at(&good, "GET", PATH, NOW + MAX_SKEW));
        assert!(signer.verify_at(&good, "GET", PATH, NOW - MAX_SKEW));
        let cases: [(&str, HeaderMap, &str, &str, u64); 7] = [
            (
                "wrong secret",
                signed(&Signer::new(b"another secret, 16+"), "GET", PATH, NOW),
                "GET",
                PATH,
                NOW,
            ),
            (
                "other path",
                good.clone(),
                "GET",
                "/_regmirror/peer/blobs/sha256:cd",
                NOW,
            ),
            (
                "other query",
                good.clone(),
                "GET",
                "/_regmirror/peer/blobs/sha256:ab?upstream=evil.io&repository=library/x",
                NOW,
            ),
            ("other method", good.clone(), "HEAD", PATH, NOW),
            ("stale", good.clone(), "GET", PATH, NOW + MAX_SKEW + 1),
            (
                "from the future",
                good.clone(),
                "GET",
                PATH,
                NOW - MAX_SKEW - 1,
            ),
            ("no header", HeaderMap::new(), "GET", PATH, NOW),
        ];
        for (what, headers, method, path, now) in cases {
            assert!(!signer.verify_at(&headers, method, path, now), "{what}");
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let signer = Signer::new(SECRET);
        let mac = hex::encode(hmac::sign(&signer.key, &message("GET", PATH, NOW)).as_ref());
        assert!(signer.verify_at(&headers(&format!("{NOW}.{mac}")), "GET", PATH, NOW));
        // 20 digits, as many as u64::MAX has, but larger: parsing must fail, not wrap.
        let overflow = "99999999999999999999";
        let max = u64::MAX.to_string();
        for value in [
            String::new(),
            "garbage".to_owned(),
            format!("{NOW}"),
            format!("{NOW}."),
            format!(".{mac}"),
            format!("{NOW}.{}", &mac[..62]),
            format!("{NOW}.{mac}00"),
            format!("{NOW}.{}", mac.replace(|c: char| c.is_ascii_digit(), "z")),
            format!("+{NOW}.{mac}"),
            format!("-{NOW}.{mac}"),
            format!(" {NOW}.{mac}"),
            format!("{NOW}.{mac}.{mac}"),
            format!("{overflow}.{mac}"),
            format!("{max}.{mac}"),
            format!("{}.{mac}", "0".repeat(30)),
        ] {
            assert!(
                !signer.verify_at(&headers(&value), "GET", PATH, NOW),
                "{value:?}"
            );
        }
        // The window arithmetic at the ends of the range neither wraps nor panics.
        let at_max = signed(&signer, "GET", PATH, u64::MAX);
        assert!(signer.verify_at(&at_max, "GET", PATH, u64::MAX));
        assert!(!signer.verify_at(&at_max, "GET", PATH, 0));
        let at_zero = signed(&signer, "GET", PATH, 0);
        assert!(!signer.verify_at(&at_zero, "GET", PATH, u64::MAX));
        // Two signature headers are ambiguous: refused even if one is good.
        let mut two = headers(&format!("{NOW}.{mac}"));
        two.append(HEADER, HeaderValue::from_static("1.00"));
        assert!(!signer.verify_at(&two, "GET", PATH, NOW));
        // Non-UTF-8 bytes.
        let mut bytes = HeaderMap::new();
        bytes.insert(HEADER, HeaderValue::from_bytes(b"1\xff.00").unwrap());
        assert!(!signer.verify_at(&bytes, "GET", PATH, NOW));
    }
}
