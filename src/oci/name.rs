//! Repository names, tags and references, parsed against the OCI distribution
//! grammar before anything touches disk or goes upstream.
//!
//! The parsers are written by hand, byte by byte: the grammar is small, and a
//! hand-written parser can say which rule failed. Routing (which upstream a
//! name belongs to, `host/` path prefixes) is not decided here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{snippet, Digest, ParseError};

/// Clients such as Docker cap a full name at 255 characters, so longer names
/// cannot come from a well-behaved client.
const NAME_MAX_LEN: usize = 255;
const TAG_MAX_LEN: usize = 128;

/// A repository name such as `library/ubuntu` or `org/team/app`:
/// `/`-separated components of `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`,
/// at most 255 characters.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `/`-separated components, in order.
    pub fn segments(&self) -> impl DoubleEndedIterator<Item = &str> + '_ {
        self.0.split('/')
    }

    /// The name Docker Hub knows: official images live under `library/`, so
    /// `ubuntu` becomes `library/ubuntu`; names with a `/` are unchanged.
    ///
    /// The result may exceed the 255-character input limit by the 8 bytes of
    /// `library/`; it still satisfies the grammar, and Docker Hub will refuse
    /// it on its own.
    pub fn with_library_prefix(&self) -> RepoName {
        if self.0.contains('/') {
            self.clone()
        } else {
            RepoName(format!("library/{}", self.0))
        }
    }
}

impl FromStr for RepoName {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| ParseError::Name(format!("{}: {reason}", snippet(s)));
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if s.len() > NAME_MAX_LEN {
            return Err(invalid("longer than 255 characters"));
        }
        for component in s.split('/') {
            check_component(component).map_err(|reason| invalid(&reason))?;
        }
        Ok(RepoName(s.to_owned()))
    }
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// Checks one path component: alphanumeric runs joined by single separators,
/// where a separator is `.`, `_`, `__` or any number of `-`.
fn check_component(component: &str) -> Result<(), String> {
    let bytes = component.as_bytes();
    if bytes.is_empty() {
        return Err("empty path component (leading, trailing or double slash)".into());
    }
    let mut i = 0;
    loop {
        let run_start = i;
        while i < bytes.len() && is_lower_alnum(bytes[i]) {
            i += 1;
        }
        if i == run_start {
            return Err(if i == 0 {
                "a path component must start with a lowercase letter or digit".into()
            } else {
                "a separator must be followed by a lowercase letter or digit".into()
            });
        }
        if i == bytes.len() {
            return Ok(());
        }
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            b'A'..=b'Z' => return Err("uppercase letters are not allowed".into()),
            _ => {
                // Only ASCII has been consumed, so `i` is a char boundary.
                let c = component[i..].chars().next().unwrap_or_default();
                return Err(format!("character {c:?} is not allowed"));
            }
        }
        if i == bytes.len() {
            return Err("a path component must end with a lowercase letter or digit".into());
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| ParseError::Tag(format!("{}: {reason}", snippet(s)));
        let bytes = s.as_bytes();
        let Some(&first) = bytes.first() else {
            return Err(invalid("empty"));
        };
        if bytes.len() > TAG_MAX_LEN {
            return Err(invalid("longer than 128 characters"));
        }
        if !(first.is_ascii_alphanumeric() || first == b'_') {
            return Err(invalid("must start with a letter, digit or underscore"));
        }
        if !bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid(
                "only letters, digits, '.', '_' and '-' are allowed",
            ));
        }
        Ok(Tag(s.to_owned()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What follows `/manifests/` in a URL: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    pub fn as_digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(digest) => Some(digest),
            Reference::Tag(_) => None,
        }
    }

    pub fn as_tag(&self) -> Option<&Tag> {
        match self {
            Reference::Tag(tag) => Some(tag),
            Reference::Digest(_) => None,
        }
    }
}

impl FromStr for Reference {
    type Err = ParseError;

    /// A tag can never contain `:`, so a colon means the client meant a
    /// digest, and a bad one is reported as a bad digest.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse().map(Reference::Digest)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(tag) => tag.fmt(f),
            Reference::Digest(digest) => digest.fmt(f),
        }
    }
}

/// Serialized as the plain string; deserializing re-validates, so a corrupt
/// or hand-edited index cannot smuggle an invalid value in.
macro_rules! serde_as_validated_str {
    ($type:ty, $expecting:literal) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;

                impl serde::de::Visitor<'_> for Visitor {
                    type Value = $type;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }

                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$type, E> {
                        v.parse().map_err(E::custom)
                    }
                }

                deserializer.deserialize_str(Visitor)
            }
        }
    };
}

serde_as_validated_str!(RepoName, "an OCI repository name");
serde_as_validated_str!(Tag, "an OCI tag");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        let max = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        let too_long = format!("{}/{}", "a".repeat(128), "b".repeat(127));
        let cases: Vec<(&str, bool)> = vec![
            ("library/ubuntu", true),
            ("ubuntu", true),
            ("a", true),
            ("0", true),
            ("a/b/c", true),
            ("a__b", true),
            ("a_b", true),
            ("a.b", true),
            ("a-b", true),
            ("a---b", true),
            ("a-b_c.d__e", true),
            ("ghcr.io/org/img", true),
            ("a1/2b/c3", true),
            (&max, true),
            (&too_long, false),
            ("a___b", false),
            ("a._b", false),
            ("a.-b", false),
            ("a..b", false),
            ("..", false),
            (".", false),
            ("-a", false),
            ("_a", false),
            ("a-", false),
            ("a.", false),
            ("a_", false),
            ("A", false),
            ("library/Ubuntu", false),
            ("a/", false),
            ("/a", false),
            ("a//b", false),
            ("/", false),
            ("", false),
            ("a:b", false),
            ("localhost:5000/a", false),
            ("a b", false),
            ("a@b", false),
            ("ubüntu", false),
            ("a/../b", false),
            ("a\0b", false),
        ];
        for (input, valid) in cases {
            let parsed = input.parse::<RepoName>();
            assert_eq!(parsed.is_ok(), valid, "input {input:?}: {parsed:?}");
            match parsed {
                Ok(name) => assert_eq!(name.as_str(), input),
                Err(e) => assert!(matches!(e, ParseError::Name(_))),
            }
        }
        assert_eq!(max.len(), 255);
        assert_eq!(too_long.len(), 256);
    }

    #[test]
    fn repo_name_error_reasons() {
        let cases = [
            ("", "empty"),
            ("a//b", "empty path component"),
            ("-a", "must start with"),
            ("a._b", "separator must be followed"),
            ("a-", "must end with"),
            ("Abc", "must start with"),
            ("aBc", "uppercase"),
            ("a:b", "':'"),
            ("aé", "'é'"),
        ];
        for (input, reason) in cases {
            let message = input.parse::<RepoName>().unwrap_err().to_string();
            assert!(
                message.starts_with("invalid repository name: "),
                "{message}"
            );
            assert!(message.contains(reason), "{input:?}: {message}");
        }
        let huge = "a/".repeat(50_000);
        assert!(huge.parse::<RepoName>().unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn segments() {
        let cases: &[(&str, &[&str])] = &[
            ("ubuntu", &["ubuntu"]),
            ("library/ubuntu", &["library", "ubuntu"]),
            ("a/b/c", &["a", "b", "c"]),
        ];
        for (input, expected) in cases {
            let name: RepoName = input.parse().unwrap();
            assert_eq!(name.segments().collect::<Vec<_>>(), *expected);
        }
    }

    #[test]
    fn library_prefix() {
        let cases = [
            ("ubuntu", "library/ubuntu"),
            ("library/ubuntu", "library/ubuntu"),
            ("org/app", "org/app"),
            ("a/b/c", "a/b/c"),
        ];
        for (input, expected) in cases {
            let name: RepoName = input.parse().unwrap();
            assert_eq!(name.with_library_prefix().as_str(), expected);
        }
    }

    #[test]
    fn tags() {
        let max = "a".repeat(128);
        let too_long = "a".repeat(129);
        let cases: Vec<(&str, bool)> = vec![
            ("latest", true),
            ("v1.2.3", true),
            ("1.0-RC_1", true),
            ("_x", true),
            ("X", true),
            ("0", true),
            ("a..b--c__", true),
            (&max, true),
            (&too_long, false),
            (".x", false),
            ("-x", false),
            ("", false),
            ("a:b", false),
            ("a/b", false),
            ("a b", false),
            ("a+b", false),
            ("tâg", false),
        ];
        for (input, valid) in cases {
            let parsed = input.parse::<Tag>();
            assert_eq!(parsed.is_ok(), valid, "input {input:?}: {parsed:?}");
            match parsed {
                Ok(tag) => assert_eq!(tag.to_string(), input),
                Err(e) => assert!(matches!(e, ParseError::Tag(_))),
            }
        }
    }

    #[test]
    fn references() {
        let digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        enum Expect {
            Tag,
            Digest,
            TagError,
            DigestError,
        }
        let cases = [
            ("latest", Expect::Tag),
            ("v1.0", Expect::Tag),
            (digest, Expect::Digest),
            ("sha256", Expect::Tag),
            ("sha256:abc", Expect::DigestError),
            ("sha512:abc", Expect::DigestError),
            ("a:b", Expect::DigestError),
            (".x", Expect::TagError),
            ("", Expect::TagError),
        ];
        for (input, expect) in cases {
            let parsed = input.parse::<Reference>();
            match (expect, &parsed) {
                (Expect::Tag, Ok(r @ Reference::Tag(_))) => {
                    assert!(r.as_digest().is_none());
                    assert_eq!(r.as_tag().unwrap().as_str(), input);
                    assert_eq!(r.to_string(), input);
                }
                (Expect::Digest, Ok(r @ Reference::Digest(_))) => {
                    assert_eq!(r.as_digest().unwrap().as_str(), input);
                    assert!(r.as_tag().is_none());
                    assert_eq!(r.to_string(), input);
                }
                (Expect::TagError, Err(ParseError::Tag(_))) => {}
                (Expect::DigestError, Err(ParseError::Digest(_))) => {}
                _ => panic!("input {input:?}: unexpected {parsed:?}"),
            }
        }
    }

    #[test]
    fn serde_validates() {
        let name: RepoName = serde_json::from_str("\"library/ubuntu\"").unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"library/ubuntu\"");
        let tag: Tag = serde_json::from_str("\"latest\"").unwrap();
        assert_eq!(serde_json::to_string(&tag).unwrap(), "\"latest\"");

        for json in ["\"Library\"", "\"a//b\"", "\"\"", "1"] {
            assert!(serde_json::from_str::<RepoName>(json).is_err(), "{json}");
        }
        for json in ["\".x\"", "\"\"", "null"] {
            assert!(serde_json::from_str::<Tag>(json).is_err(), "{json}");
        }
    }
}
