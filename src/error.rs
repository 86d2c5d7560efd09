//! The one place errors become HTTP responses: [`ErrorCode`], the OCI
//! distribution error codes with their statuses, and [`ApiError`], which
//! renders the OCI error envelope.
//!
//! Lower layers keep their own error enums and are mapped here by `From`
//! impls. What reaches a client is only a code, a message chosen for clients
//! and an optional detail; internal error text goes to the log instead, so a
//! 5xx body never leaks paths, hosts or credentials.

use std::borrow::Cow;
use std::fmt;

use axum::body::Body;
use axum::http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{Response, StatusCode};
use axum::response::IntoResponse;
use serde::Serialize;

use crate::oci::ParseError;

/// An OCI distribution error code.
///
/// The spec's fourteen codes, distribution's `UNAVAILABLE` and `UNKNOWN`, and
/// three regmirror needs as a proxy. Clients mostly act on the status, so a
/// few variants share a code string and differ only in status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// 503: regmirror itself cannot serve right now.
    Unavailable,
    /// 500: a failure with no better code; the body says nothing more.
    Unknown,
    /// 416: a `Range` the blob cannot satisfy. Distribution registers
    /// `RANGE_INVALID` for upload chunks; we reuse it for reads.
    RangeInvalid,
    /// 502: the upstream could not be reached or answered nonsense. The code
    /// is `UNAVAILABLE` because the spec has nothing closer.
    BadGateway,
    /// 504: the upstream did not answer in time; code `UNAVAILABLE` as above.
    GatewayTimeout,
    /// 400: a listing's `n` is not a number (distribution's code).
    PaginationNumberInvalid,
    /// 404: a `/v2/` path that names no API operation; code `UNSUPPORTED`.
    UnknownEndpoint,
    /// 414: a request target longer than the server reads (written by the server module in
    /// place of hyper's bodiless refusal); code `UNSUPPORTED`.
    UriTooLong,
}

impl ErrorCode {
    /// Every variant, for tests and for pre-registering metric labels.
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::BlobUnknown,
        ErrorCode::BlobUploadInvalid,
        ErrorCode::BlobUploadUnknown,
        ErrorCode::DigestInvalid,
        ErrorCode::ManifestBlobUnknown,
        ErrorCode::ManifestInvalid,
        ErrorCode::ManifestUnknown,
        ErrorCode::NameInvalid,
        ErrorCode::NameUnknown,
        ErrorCode::SizeInvalid,
        ErrorCode::Unauthorized,
        ErrorCode::Denied,
        ErrorCode::Unsupported,
        ErrorCode::TooManyRequests,
        ErrorCode::Unavailable,
        ErrorCode::Unknown,
        ErrorCode::RangeInvalid,
        ErrorCode::BadGateway,
        ErrorCode::GatewayTimeout,
        ErrorCode::PaginationNumberInvalid,
        ErrorCode::UnknownEndpoint,
        ErrorCode::UriTooLong,
    ];

    /// The code string of the error envelope.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported | ErrorCode::UnknownEndpoint | ErrorCode::UriTooLong => {
                "UNSUPPORTED"
            }
            ErrorCode::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unavailable | ErrorCode::BadGateway | ErrorCode::GatewayTimeout => {
                "UNAVAILABLE"
            }
            ErrorCode::Unknown => "UNKNOWN",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
        }
    }

    /// The HTTP status, as distribution assigns it.
    pub fn status(&self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => StatusCode::NOT_FOUND,
            // Distribution answers 404 here too: the upload can no longer be
            // found in a usable state.
            ErrorCode::BlobUploadInvalid => StatusCode::NOT_FOUND,
            ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorCode::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::PaginationNumberInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::UnknownEndpoint => StatusCode::NOT_FOUND,
            ErrorCode::UriTooLong => StatusCode::URI_TOO_LONG,
        }
    }

    /// The spec's message for the code, used when no better one is given.
    pub fn default_message(&self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "blob unknown to registry",
            ErrorCode::BlobUploadInvalid => "blob upload invalid",
            ErrorCode::BlobUploadUnknown => "blob upload unknown to registry",
            ErrorCode::DigestInvalid => "provided digest did not match uploaded content",
            ErrorCode::ManifestBlobUnknown => {
                "manifest references a manifest or blob unknown to registry"
            }
            ErrorCode::ManifestInvalid => "manifest invalid",
            ErrorCode::ManifestUnknown => "manifest unknown to registry",
            ErrorCode::NameInvalid => "invalid repository name",
            ErrorCode::NameUnknown => "repository name not known to registry",
            ErrorCode::SizeInvalid => "provided length did not match content length",
            ErrorCode::Unauthorized => "authentication required",
            ErrorCode::Denied => "requested access to the resource is denied",
            ErrorCode::Unsupported => "the operation is unsupported",
            ErrorCode::TooManyRequests => "too many requests",
            ErrorCode::Unavailable => "service unavailable",
            ErrorCode::Unknown => "unknown error",
            ErrorCode::RangeInvalid => "requested range not satisfiable",
            ErrorCode::BadGateway => "upstream registry unavailable",
            ErrorCode::GatewayTimeout => "upstream registry timed out",
            ErrorCode::PaginationNumberInvalid => "invalid number of results requested",
            ErrorCode::UnknownEndpoint => "no such registry API endpoint",
            ErrorCode::UriTooLong => "request target too long",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error on its way to a client, in the OCI error envelope.
///
/// Everything in it is shown to the client: build the message and detail
/// from facts the client already has (its digest, its name), never from an
/// internal error's text.
#[derive(Debug, Clone)]
pub struct ApiError {
    code: ErrorCode,
    message: Cow<'static, str>,
    detail: Option<serde_json::Value>,
    retry_after: Option<u64>,
    www_authenticate: Option<String>,
}

impl ApiError {
    /// An error with the code's default message and no headers.
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            message: Cow::Borrowed(code.default_message()),
            detail: None,
            retry_after: None,
            www_authenticate: None,
        }
    }

    /// Replaces the default message. Shown to clients.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Cow::Owned(message.into());
        self
    }

    /// Attaches the envelope's free-form `detail`. Shown to clients.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Adds `Retry-After: <seconds>`, e.g. passed on from a 429 upstream.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Adds a `WWW-Authenticate` challenge, for `UNAUTHORIZED`.
    pub fn with_challenge(mut self, challenge: String) -> Self {
        self.www_authenticate = Some(challenge);
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn detail(&self) -> Option<&serde_json::Value> {
        self.detail.as_ref()
    }

    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<ErrorCode> for ApiError {
    fn from(code: ErrorCode) -> Self {
        ApiError::new(code)
    }
}

impl From<ParseError> for ApiError {
    fn from(error: ParseError) -> Self {
        let code = match error {
            ParseError::Digest(_) => ErrorCode::DigestInvalid,
            ParseError::Name(_) => ErrorCode::NameInvalid,
            // The spec has no TAG_INVALID (distribution's means "tag in the
            // manifest body does not match the URL"); of the spec's codes,
            // MANIFEST_INVALID with 400 is the one that says "your manifest
            // reference is malformed" rather than "not found".
            ParseError::Tag(_) => ErrorCode::ManifestInvalid,
        };
        // The parse message quotes only a bounded, escaped prefix of the
        // input, so it is safe to show.
        ApiError::new(code).with_message(error.to_string())
    }
}

/// Cache and upstream failures as clients see them. Upstream problems keep their meaning
/// (a 429 stays a 429 with its `Retry-After`); local failures become a bare 500 whose cause
/// goes to the log, never into the body.
impl From<crate::cache::Error> for ApiError {
    fn from(error: crate::cache::Error) -> Self {
        use crate::cache::Error as C;
        use crate::upstream::Error as U;
        match error {
            C::ManifestUnknown => ApiError::new(ErrorCode::ManifestUnknown),
            C::BlobUnknown => ApiError::new(ErrorCode::BlobUnknown),
            C::NameUnknown => ApiError::new(ErrorCode::NameUnknown),
            C::DigestMismatch { expected } => ApiError::new(ErrorCode::BadGateway).with_message(
                format!("upstream content does not match {expected}; nothing was cached"),
            ),
            C::Upstream(upstream) => match upstream {
                U::NotFound => ApiError::new(ErrorCode::NameUnknown),
                // 403, not 401: the client cannot fix this by authenticating to the mirror, and
                // a 401 without a challenge of ours would send `docker login` astray.
                U::Unauthorized => ApiError::new(ErrorCode::Denied).with_message(
                    "the upstream registry refused the mirror's credentials (or wants some)",
                ),
                U::Denied => ApiError::new(ErrorCode::Denied)
                    .with_message("the upstream registry denied access"),
                U::TooManyRequests { retry_after } => {
                    let error = ApiError::new(ErrorCode::TooManyRequests)
                        .with_message("the upstream registry is rate-limiting the mirror");
                    match retry_after {
                        Some(seconds) => error.with_retry_after(seconds),
                        None => error,
                    }
                }
                U::Timeout => ApiError::new(ErrorCode::GatewayTimeout)
                    .with_message("the upstream registry did not answer in time"),
                U::Status(status) => ApiError::new(ErrorCode::BadGateway)
                    .with_message(format!("the upstream registry answered {status}")),
                U::Transport(cause) => {
                    tracing::warn!(%cause, "upstream unreachable");
                    ApiError::new(ErrorCode::BadGateway)
                        .with_message("the upstream registry is unreachable")
                }
                U::Invalid(reason) => ApiError::new(ErrorCode::BadGateway).with_message(format!(
                    "the upstream registry sent an invalid response: {reason}"
                )),
            },
            C::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                ApiError::new(ErrorCode::Unknown)
            }
        }
    }
}

/// The OCI error envelope: `{"errors":[{"code":…,"message":…,"detail":…}]}`.
#[derive(Serialize)]
struct Envelope<'a> {
    errors: [EnvelopeError<'a>; 1],
}

#[derive(Serialize)]
struct EnvelopeError<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let envelope = Envelope {
            errors: [EnvelopeError {
                code: self.code.as_str(),
                message: &self.message,
                detail: self.detail.as_ref(),
            }],
        };
        // Serializing strings and a `Value` cannot fail; the fallback only
        // keeps the envelope shape if that ever changes.
        let body = serde_json::to_vec(&envelope).unwrap_or_else(|_| {
            format!(r#"{{"errors":[{{"code":"{}","message":""}}]}}"#, self.code).into_bytes()
        });

        let mut response = Response::new(Body::from(body));
        *response.status_mut() = self.code.status();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers.insert(
            HeaderName::from_static("docker-distribution-api-version"),
            HeaderValue::from_static("registry/2.0"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(challenge) = self.www_authenticate {
            match HeaderValue::try_from(challenge) {
                Ok(value) => {
                    headers.insert(WWW_AUTHENTICATE, value);
                }
                // Challenges are built by us from config, so this is a bug,
                // not client input; the 401 still goes out.
                Err(error) => tracing::error!(%error, "invalid WWW-Authenticate challenge dropped"),
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn codes_statuses_and_messages() {
        let cases = [
            (ErrorCode::BlobUnknown, "BLOB_UNKNOWN", 404),
            (ErrorCode::BlobUploadInvalid, "BLOB_UPLOAD_INVALID", 404),
            (ErrorCode::BlobUploadUnknown, "BLOB_UPLOAD_UNKNOWN", 404),
            (ErrorCode::DigestInvalid, "DIGEST_INVALID", 400),
            (ErrorCode::ManifestBlobUnknown, "MANIFEST_BLOB_UNKNOWN", 400),
            (ErrorCode::ManifestInvalid, "MANIFEST_INVALID", 400),
            (ErrorCode::ManifestUnknown, "MANIFEST_UNKNOWN", 404),
            (ErrorCode::NameInvalid, "NAME_INVALID", 400),
            (ErrorCode::NameUnknown, "NAME_UNKNOWN", 404),
            (ErrorCode::SizeInvalid, "SIZE_INVALID", 400),
            (ErrorCode::Unauthorized, "UNAUTHORIZED", 401),
            (ErrorCode::Denied, "DENIED", 403),
            (ErrorCode::Unsupported, "UNSUPPORTED", 405),
            (ErrorCode::TooManyRequests, "TOOMANYREQUESTS", 429),
            (ErrorCode::Unavailable, "UNAVAILABLE", 503),
            (ErrorCode::Unknown, "UNKNOWN", 500),
            (ErrorCode::RangeInvalid, "RANGE_INVALID", 416),
            (ErrorCode::BadGateway, "UNAVAILABLE", 502),
            (ErrorCode::GatewayTimeout, "UNAVAILABLE", 504),
            (
                ErrorCode::PaginationNumberInvalid,
                "PAGINATION_NUMBER_INVALID",
                400,
            ),
            (ErrorCode::UnknownEndpoint, "UNSUPPORTED", 404),
            (ErrorCode::UriTooLong, "UNSUPPORTED", 414),
        ];
        assert_eq!(cases.len(), ErrorCode::ALL.len());
        for ((code, as_str, status), listed) in cases.into_iter().zip(ErrorCode::ALL) {
            assert_eq!(code, listed, "ALL is out of order");
            assert_eq!(code.as_str(), as_str);
            assert_eq!(code.to_string(), as_str);
            assert_eq!(code.status().as_u16(), status, "{code:?}");
            assert!(!code.default_message().is_empty());
        }
    }

    #[test]
    fn parse_errors_map_to_codes() {
        let cases = [
            (
                "sha256:x".parse::<crate::oci::Digest>().unwrap_err(),
                ErrorCode::DigestInvalid,
            ),
            (
                "A".parse::<crate::oci::RepoName>().unwrap_err(),
                ErrorCode::NameInvalid,
            ),
            (
                ".x".parse::<crate::oci::Tag>().unwrap_err(),
                ErrorCode::ManifestInvalid,
            ),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let api = ApiError::from(error);
            assert_eq!(api.code(), code);
            assert_eq!(api.status(), StatusCode::BAD_REQUEST);
            assert_eq!(api.message(), message);
        }
    }

    fn render(error: ApiError) -> (StatusCode, axum::http::HeaderMap, Value) {
        let response = error.into_response();
        let (parts, body) = response.into_parts();
        let bytes = futures_util::FutureExt::now_or_never(axum::body::to_bytes(body, usize::MAX))
            .expect("an in-memory body is ready at once")
            .unwrap();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    #[test]
    fn responses() {
        let cases = [
            (
                ApiError::new(ErrorCode::BlobUnknown),
                404,
                json!({"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}),
                None,
                None,
            ),
            (
                ApiError::new(ErrorCode::ManifestUnknown)
                    .with_message("manifest unknown")
                    .with_detail(json!({"tag": "latest"})),
                404,
                json!({"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"tag":"latest"}}]}),
                None,
                None,
            ),
            (
                ApiError::new(ErrorCode::TooManyRequests).with_retry_after(30),
                429,
                json!({"errors":[{"code":"TOOMANYREQUESTS","message":"too many requests"}]}),
                Some("30"),
                None,
            ),
            (
                ApiError::new(ErrorCode::Unauthorized).with_challenge(
                    r#"Bearer realm="https://auth.example/token",service="r""#.into(),
                ),
                401,
                json!({"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}),
                None,
                Some(r#"Bearer realm="https://auth.example/token",service="r""#),
            ),
            (
                ApiError::new(ErrorCode::BadGateway),
                502,
                json!({"errors":[{"code":"UNAVAILABLE","message":"upstream registry unavailable"}]}),
                None,
                None,
            ),
            (
                // A message with quotes and newlines stays valid JSON.
                ApiError::new(ErrorCode::NameInvalid).with_message("a \"b\"\n\u{0}"),
                400,
                json!({"errors":[{"code":"NAME_INVALID","message":"a \"b\"\n\u{0}"}]}),
                None,
                None,
            ),
            (
                // An unsendable challenge is dropped, not a panic.
                ApiError::new(ErrorCode::Unauthorized).with_challenge("Bearer\nx".into()),
                401,
                json!({"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}),
                None,
                None,
            ),
        ];
        for (error, status, body, retry_after, challenge) in cases {
            let display = error.to_string();
            let (got_status, headers, got_body) = render(error);
            assert_eq!(got_status.as_u16(), status, "{display}");
            assert_eq!(got_body, body, "{display}");
            assert_eq!(headers[CONTENT_TYPE], "application/json; charset=utf-8");
            assert_eq!(headers["docker-distribution-api-version"], "registry/2.0");
            let header = |name| headers.get(name).map(|v: &HeaderValue| v.to_str().unwrap());
            assert_eq!(header(RETRY_AFTER), retry_after, "{display}");
            assert_eq!(header(WWW_AUTHENTICATE), challenge, "{display}");
        }
    }

    #[test]
    fn display() {
        let error = ApiError::new(ErrorCode::DigestInvalid).with_message("bad");
        assert_eq!(error.to_string(), "DIGEST_INVALID: bad");
        assert_eq!(
            ApiError::from(ErrorCode::Unknown).to_string(),
            "UNKNOWN: unknown error"
        );
    }
}
