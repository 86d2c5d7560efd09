//! The OCI vocabulary as types: digests, repository names, tags, references
//! and manifest media types.
//!
//! Everything here is parsed from untrusted strings, so an invalid value
//! cannot exist past `FromStr`. This module knows nothing of HTTP, storage or
//! upstreams; `error.rs` turns a [`ParseError`] into an OCI error response.

pub mod digest;
pub mod media_type;
pub mod name;

pub use digest::{Digest, DigestHasher};
pub use name::{Reference, RepoName, Tag};

/// Why a client-supplied string is not a valid OCI value.
///
/// The message is shown to clients, so it quotes at most 100
/// bytes of the input: a megabyte-long path must not become a megabyte-long
/// error body or log line.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ParseError {
    #[error("invalid digest: {0}")]
    Digest(String),
    #[error("invalid repository name: {0}")]
    Name(String),
    #[error("invalid tag: {0}")]
    Tag(String),
}

/// How many bytes of a rejected input an error message quotes.
const SNIPPET_LEN: usize = 100;

/// The input quoted and escaped for an error message, cut on a character
/// boundary to at most [`SNIPPET_LEN`] bytes. Debug formatting escapes quotes
/// and control characters, so the message stays one printable line.
pub(crate) fn snippet(input: &str) -> String {
    if input.len() <= SNIPPET_LEN {
        return format!("{input:?}");
    }
    let mut end = SNIPPET_LEN;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}…", &input[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippet_quotes_and_truncates() {
        let long = "a".repeat(1000);
        let long_expected = format!("{:?}…", "a".repeat(100));
        // 'é' is two bytes; 99 'a's put it across the 100-byte cut.
        let straddle = format!("{}é{}", "a".repeat(99), "b".repeat(50));
        let straddle_expected = format!("{:?}…", "a".repeat(99));
        let cases: &[(&str, &str)] = &[
            ("", "\"\""),
            ("abc", "\"abc\""),
            ("a\"b\nc", "\"a\\\"b\\nc\""),
            (&long, &long_expected),
            (&straddle, &straddle_expected),
        ];
        for (input, expected) in cases {
            assert_eq!(snippet(input), *expected, "input {input:?}");
        }
    }

    #[test]
    fn parse_error_messages() {
        let cases = [
            (ParseError::Digest("x".into()), "invalid digest: x"),
            (ParseError::Name("x".into()), "invalid repository name: x"),
            (ParseError::Tag("x".into()), "invalid tag: x"),
        ];
        for (error, expected) in cases {
            assert_eq!(error.to_string(), expected);
        }
    }
}
