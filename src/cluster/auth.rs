//! The peer channel's authentication, both ways, without TLS.
//!
//! Every request carries `x-regmirror-peer: <unix seconds>.<nonce>.<hex HMAC-SHA256(secret,
//! method \n path?query \n seconds \n nonce \n receiver)>`, where the receiver is the instance
//! id of the replica it is meant for (learnt from that replica's health answer; empty for the
//! health probe itself, which is answered to anyone holding the secret). So a captured header
//! opens nothing else, is refused by every other replica, expires after ±[`MAX_SKEW`] seconds,
//! and is refused the second time even within them ([`Replays`] remembers the nonces seen).
//!
//! Every answer carries `x-regmirror-peer-seal: <hex HMAC-SHA256(secret, "answer" \n nonce \n
//! status \n the headers that carry meaning)>`: the status, the content type, the digest a tag
//! points to, the cache outcome, when the upstream confirmed the tag, whether an error is the
//! upstream's final answer, its Retry-After, the range. A host on the path can therefore neither
//! point a tag elsewhere nor fake an owner's 404 or 429; bodies need no seal, since blobs and
//! manifests are verified against their digests.
//!
//! HMAC comes from `ring` rather than the `hmac` crate: ring is already compiled in (it is
//! rustls' crypto provider), so this adds no crate, and its `hmac::verify` compares in constant
//! time, which the verifier needs. This module knows nothing of members or HTTP clients.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use ring::hmac;
use ring::rand::SecureRandom;

/// The header carrying a request's signature.
pub const HEADER: HeaderName = HeaderName::from_static("x-regmirror-peer");
/// The header carrying an answer's seal.
pub const SEAL: HeaderName = HeaderName::from_static("x-regmirror-peer-seal");

/// The answer headers a seal covers, in this order (a missing one counts as empty).
pub const SEALED_HEADERS: [&str; 10] = [
    "content-type",
    "content-range",
    "docker-content-digest",
    "x-regmirror-cache",
    "x-regmirror-confirmed",
    "x-regmirror-final",
    "x-regmirror-instance",
    "x-regmirror-size",
    "retry-after",
    "www-authenticate",
];

/// Seconds a signature stays valid either side of the verifier's clock: enough for replicas
/// whose clocks NTP keeps within a second or two, short enough that a leaked header soon
/// stops working.
pub const MAX_SKEW: u64 = 60;

/// HMAC-SHA256 is 32 bytes, 64 hex digits.
const MAC_HEX_LEN: usize = 64;
/// A nonce is 16 random bytes, 32 hex digits.
const NONCE_LEN: usize = 16;
/// u64::MAX has 20 digits; a longer number is malformed, not merely far away.
const MAX_SECONDS_DIGITS: usize = 20;
/// Nonces remembered at most (about 10 MiB): a replica needs a thousand peer requests a second
/// for two minutes to fill it, and beyond it requests are refused (the peer then fetches on its
/// own) rather than replays accepted.
const MAX_NONCES: usize = 1 << 18;

/// A request's nonce: what its answer's seal is bound to.
pub type Nonce = [u8; NONCE_LEN];

/// Signs and verifies with the shared secret.
pub struct Signer {
    key: hmac::Key,
    random: ring::rand::SystemRandom,
}

impl Signer {
    pub fn new(secret: &[u8]) -> Signer {
        Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            random: ring::rand::SystemRandom::new(),
        }
    }

    /// A fresh nonce (`None` only if the system has no randomness).
    pub fn nonce(&self) -> Option<Nonce> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        Some(nonce)
    }

    /// The header value for a request to `receiver` made at `seconds` (Unix time).
    pub fn sign_at(
        &self,
        method: &str,
        path_and_query: &str,
        seconds: u64,
        nonce: &Nonce,
        receiver: &str,
    ) -> HeaderValue {
        let tag = hmac::sign(
            &self.key,
            &message(method, path_and_query, seconds, nonce, receiver),
        );
        let value = format!(
            "{seconds}.{}.{}",
            hex::encode(nonce),
            hex::encode(tag.as_ref())
        );
        HeaderValue::from_str(&value).expect("digits, dots and hex are a valid header value")
    }

    /// The signature's time and nonce if `headers` carry exactly one signature header, well
    /// formed, made with our secret for this method, path and receiver, within ±[`MAX_SKEW`]
    /// of `now`. Anything else is `None`. Replays are for [`Replays`] to refuse.
    pub fn verify_at(
        &self,
        headers: &HeaderMap,
        method: &str,
        path_and_query: &str,
        receiver: &str,
        now: u64,
    ) -> Option<(u64, Nonce)> {
        let mut values = headers.get_all(&HEADER).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        let mut fields = value.as_bytes().split(|b| *b == b'.');
        let (Some(seconds), Some(nonce), Some(mac), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return None;
        };
        let digits_only = !seconds.is_empty()
            && seconds.len() <= MAX_SECONDS_DIGITS
            && seconds.iter().all(u8::is_ascii_digit);
        if !digits_only || mac.len() != MAC_HEX_LEN || nonce.len() != 2 * NONCE_LEN {
            return None;
        }
        // Digits only, so this is valid UTF-8; `parse` fails (rather than wraps) on overflow.
        let seconds = std::str::from_utf8(seconds).ok()?.parse::<u64>().ok()?;
        if seconds.abs_diff(now) > MAX_SKEW {
            return None;
        }
        let nonce: Nonce = hex::decode(nonce).ok()?.try_into().ok()?;
        let tag = hex::decode(mac).ok()?;
        let message = message(method, path_and_query, seconds, &nonce, receiver);
        hmac::verify(&self.key, &message, &tag).ok()?;
        Some((seconds, nonce))
    }

    /// The seal of an answer with `status` and `headers` to the request that sent `nonce`.
    pub fn seal(&self, nonce: &Nonce, status: StatusCode, headers: &HeaderMap) -> HeaderValue {
        let tag = hmac::sign(&self.key, &answer(nonce, status, headers));
        HeaderValue::from_str(&hex::encode(tag.as_ref())).expect("hex is a valid header value")
    }

    /// Whether an answer carries exactly one seal, made with our secret for the request that
    /// sent `nonce`, over this status and these headers.
    pub fn check_seal(&self, nonce: &Nonce, status: StatusCode, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&SEAL).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        if value.len() != MAC_HEX_LEN {
            return false;
        }
        let Ok(tag) = hex::decode(value.as_bytes()) else {
            return false;
        };
        hmac::verify(&self.key, &answer(nonce, status, headers), &tag).is_ok()
    }
}

/// The nonces of the requests accepted within the last [`MAX_SKEW`] window or so: a signature
/// is good for one request.
#[derive(Default)]
pub struct Replays {
    seen: Mutex<HashMap<Nonce, u64>>,
}

impl Replays {
    /// Whether this is the first time `nonce` (signed at `seconds`) is seen; records it.
    pub fn first_use(&self, nonce: Nonce, seconds: u64, now: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains_key(&nonce) {
            return false;
        }
        if seen.len() >= MAX_NONCES {
            // A signature older than the window is refused by its time anyway.
            seen.retain(|_, at| at.abs_diff(now) <= MAX_SKEW);
            if seen.len() >= MAX_NONCES {
                return false;
            }
        }
        seen.insert(nonce, seconds);
        true
    }
}

/// What a request's signature covers. Newlines cannot occur in a method, a request target, hex
/// or an instance id, so the fields cannot be shifted into one another.
fn message(
    method: &str,
    path_and_query: &str,
    seconds: u64,
    nonce: &Nonce,
    receiver: &str,
) -> Vec<u8> {
    format!(
        "{method}\n{path_and_query}\n{seconds}\n{}\n{receiver}",
        hex::encode(nonce)
    )
    .into_bytes()
}

/// What an answer's seal covers. Header values are bytes without newlines (HTTP forbids them).
fn answer(nonce: &Nonce, status: StatusCode, headers: &HeaderMap) -> Vec<u8> {
    let mut message = format!("answer\n{}\n{}", hex::encode(nonce), status.as_u16()).into_bytes();
    for name in SEALED_HEADERS {
        message.push(b'\n');
        let mut values = headers.get_all(name).iter();
        if let Some(first) = values.next() {
            message.extend_from_slice(first.as_bytes());
        }
        // Two values of one header are not what any of ours sends: sealed as a mark that no
        // single value can produce.
        if values.next().is_some() {
            message.extend_from_slice(b"\0multiple");
        }
    }
    message
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
    const NONCE: Nonce = [7; NONCE_LEN];
    const ME: &str = "0123456789abcdef0123456789abcdef";

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn signed(signer: &Signer, method: &str, path: &str, at: u64, receiver: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, signer.sign_at(method, path, at, &NONCE, receiver));
        headers
    }

    #[test]
    fn a_signature_verifies_only_for_its_secret_method_path_time_and_receiver() {
        let signer = Signer::new(SECRET);
        let good = signed(&signer, "GET", PATH, NOW, ME);
        assert_eq!(
            signer.verify_at(&good, "GET", PATH, ME, NOW),
            Some((NOW, NONCE))
        );
        assert!(signer
            .verify_at(&good, "GET", PATH, ME, NOW + MAX_SKEW)
            .is_some());
        assert!(signer
            .verify_at(&good, "GET", PATH, ME, NOW - MAX_SKEW)
            .is_some());
        let cases: [(&str, HeaderMap, &str, &str, &str, u64); 8] = [
            (
                "wrong secret",
                signed(&Signer::new(b"another secret, 16+"), "GET", PATH, NOW, ME),
                "GET",
                PATH,
                ME,
                NOW,
            ),
            (
                "other path",
                good.clone(),
                "GET",
                "/_regmirror/peer/blobs/sha256:cd",
                ME,
                NOW,
            ),
            (
                "other query",
                good.clone(),
                "GET",
                "/_regmirror/peer/blobs/sha256:ab?upstream=evil.io&repository=library/x",
                ME,
                NOW,
            ),
            ("other method", good.clone(), "HEAD", PATH, ME, NOW),
            (
                "another replica",
                good.clone(),
                "GET",
                PATH,
                "fedcba98765432100123456789abcdef",
                NOW,
            ),
            ("stale", good.clone(), "GET", PATH, ME, NOW + MAX_SKEW + 1),
            (
                "from the future",
                good.clone(),
                "GET",
                PATH,
                ME,
                NOW - MAX_SKEW - 1,
            ),
            ("no header", HeaderMap::new(), "GET", PATH, ME, NOW),
        ];
        for (what, headers, method, path, receiver, now) in cases {
            assert!(
                signer
                    .verify_at(&headers, method, path, receiver, now)
                    .is_none(),
                "{what}"
            );
        }
    }

    #[test]
    fn a_nonce_is_good_once() {
        let replays = Replays::default();
        assert!(replays.first_use(NONCE, NOW, NOW));
        assert!(!replays.first_use(NONCE, NOW, NOW), "replayed");
        assert!(replays.first_use([8; NONCE_LEN], NOW, NOW));
        let signer = Signer::new(SECRET);
        assert_ne!(signer.nonce(), signer.nonce());
    }

    #[test]
    fn a_seal_covers_status_and_meaningful_headers_for_one_request() {
        let signer = Signer::new(SECRET);
        let mut answer = HeaderMap::new();
        answer.insert(
            "docker-content-digest",
            HeaderValue::from_static("sha256:aa"),
        );
        answer.insert("content-type", HeaderValue::from_static("application/json"));
        let seal = signer.seal(&NONCE, StatusCode::OK, &answer);
        answer.insert(SEAL, seal);
        assert!(signer.check_seal(&NONCE, StatusCode::OK, &answer));
        // Headers outside the seal (hyper's date, length) may be anything.
        answer.insert("date", HeaderValue::from_static("now"));
        assert!(signer.check_seal(&NONCE, StatusCode::OK, &answer));
        assert!(
            !signer.check_seal(&[8; NONCE_LEN], StatusCode::OK, &answer),
            "another request"
        );
        assert!(
            !signer.check_seal(&NONCE, StatusCode::NOT_FOUND, &answer),
            "another status"
        );
        assert!(!Signer::new(b"another secret, 16+").check_seal(&NONCE, StatusCode::OK, &answer));
        for (name, value) in [
            ("docker-content-digest", "sha256:bb"),
            ("x-regmirror-final", "1"),
            ("retry-after", "1"),
            ("x-regmirror-confirmed", "0"),
        ] {
            let mut forged = answer.clone();
            forged.insert(name, HeaderValue::from_static(value));
            assert!(
                !signer.check_seal(&NONCE, StatusCode::OK, &forged),
                "{name}"
            );
        }
        let mut twice = answer.clone();
        twice.append(
            "docker-content-digest",
            HeaderValue::from_static("sha256:aa"),
        );
        assert!(!signer.check_seal(&NONCE, StatusCode::OK, &twice));
        let mut unsealed = answer.clone();
        unsealed.remove(SEAL);
        assert!(!signer.check_seal(&NONCE, StatusCode::OK, &unsealed));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let signer = Signer::new(SECRET);
        let nonce = hex::encode(NONCE);
        let mac =
            hex::encode(hmac::sign(&signer.key, &message("GET", PATH, NOW, &NONCE, ME)).as_ref());
        let good = format!("{NOW}.{nonce}.{mac}");
        assert!(signer
            .verify_at(&headers(&good), "GET", PATH, ME, NOW)
            .is_some());
        // 20 digits, as many as u64::MAX has, but larger: parsing must fail, not wrap.
        let overflow = "99999999999999999999";
        let max = u64::MAX.to_string();
        for value in [
            String::new(),
            "garbage".to_owned(),
            format!("{NOW}"),
            format!("{NOW}.{mac}"),
            format!("{NOW}.{nonce}."),
            format!(".{nonce}.{mac}"),
            format!("{NOW}..{mac}"),
            format!("{NOW}.{}.{mac}", &nonce[..30]),
            format!("{NOW}.{}.{mac}", nonce.replace('0', "z")),
            format!("{NOW}.{nonce}.{}", &mac[..62]),
            format!("{NOW}.{nonce}.{mac}00"),
            format!(
                "{NOW}.{nonce}.{}",
                mac.replace(|c: char| c.is_ascii_digit(), "z")
            ),
            format!("+{NOW}.{nonce}.{mac}"),
            format!("-{NOW}.{nonce}.{mac}"),
            format!(" {NOW}.{nonce}.{mac}"),
            format!("{good}.{mac}"),
            format!("{overflow}.{nonce}.{mac}"),
            format!("{max}.{nonce}.{mac}"),
            format!("{}.{nonce}.{mac}", "0".repeat(30)),
        ] {
            assert!(
                signer
                    .verify_at(&headers(&value), "GET", PATH, ME, NOW)
                    .is_none(),
                "{value:?}"
            );
        }
        // The window arithmetic at the ends of the range neither wraps nor panics.
        let at_max = signed(&signer, "GET", PATH, u64::MAX, ME);
        assert!(signer
            .verify_at(&at_max, "GET", PATH, ME, u64::MAX)
            .is_some());
        assert!(signer.verify_at(&at_max, "GET", PATH, ME, 0).is_none());
        let at_zero = signed(&signer, "GET", PATH, 0, ME);
        assert!(signer
            .verify_at(&at_zero, "GET", PATH, ME, u64::MAX)
            .is_none());
        // Two signature headers are ambiguous: refused even if one is good.
        let mut two = headers(&good);
        two.append(HEADER, HeaderValue::from_static("1.00.00"));
        assert!(signer.verify_at(&two, "GET", PATH, ME, NOW).is_none());
        // Non-UTF-8 bytes.
        let mut bytes = HeaderMap::new();
        bytes.insert(HEADER, HeaderValue::from_bytes(b"1\xff.00.00").unwrap());
        assert!(signer.verify_at(&bytes, "GET", PATH, ME, NOW).is_none());
    }
}
