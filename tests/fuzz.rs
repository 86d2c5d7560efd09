//! Property test over request paths, methods, queries and headers: whatever a client sends,
//! regmirror answers with success or a well-formed OCI error, never a panic or a hang.

mod fake;

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use proptest::prelude::*;
use tower::ServiceExt;

struct World {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
    digest: String,
    _fake: fake::Fake,
    _mirror: fake::Mirror,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let (fake, mirror, digest) = runtime.block_on(async {
            let fake = fake::Fake::start().await;
            let image = fake.put_image("library/img", "1", &[1000], 42);
            let mirror = fake::mirror(&fake, "").await;
            (fake, mirror, image.layers[0].0.to_string())
        });
        let app = regmirror::app(mirror.state.clone());
        World {
            runtime,
            app,
            digest,
            _fake: fake,
            _mirror: mirror,
        }
    })
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("img".to_owned()),
        Just("library".to_owned()),
        Just("manifests".to_owned()),
        Just("blobs".to_owned()),
        Just("uploads".to_owned()),
        Just("tags".to_owned()),
        Just("list".to_owned()),
        Just("referrers".to_owned()),
        Just("1".to_owned()),
        Just("DIGEST".to_owned()),
        Just("sha256:".to_owned()),
        Just("..".to_owned()),
        Just("".to_owned()),
        Just("docker.io".to_owned()),
        "[a-zA-Z0-9._:%~-]{0,12}",
        "\\PC{0,6}",
    ]
}

fn request() -> impl Strategy<Value = (String, String, Option<String>, Option<String>)> {
    let method = prop_oneof![
        Just("GET"),
        Just("HEAD"),
        Just("PUT"),
        Just("POST"),
        Just("DELETE"),
        Just("PATCH"),
        Just("OPTIONS")
    ];
    let query = prop_oneof![
        Just(String::new()),
        Just("?ns=docker.io".to_owned()),
        Just("?ns=evil.example".to_owned()),
        Just("?n=2&last=a".to_owned()),
        Just("?n=-1".to_owned()),
        "\\?[a-z=&%0-9]{0,12}",
    ];
    let range = proptest::option::of(prop_oneof![
        Just("bytes=0-10".to_owned()),
        Just("bytes=-5".to_owned()),
        Just("bytes=999999-".to_owned()),
        Just("bytes=5-1".to_owned()),
        "[ -~]{0,16}",
    ]);
    let accept = proptest::option::of("[ -~]{0,40}");
    (
        method,
        proptest::collection::vec(segment(), 0..8),
        query,
        range,
        accept,
    )
        .prop_map(|(method, segments, query, range, accept)| {
            let path = format!("/v2/{}{}", segments.join("/"), query);
            (method.to_owned(), path, range, accept)
        })
}

const CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
    "UNAVAILABLE",
    "UNKNOWN",
    "RANGE_INVALID",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn every_answer_is_success_or_an_oci_error((method, path, range, accept) in request()) {
        let world = world();
        let path = path.replace("DIGEST", &world.digest);
        // Paths that are not valid URIs are refused by the HTTP layer before us.
        let Ok(uri) = path.parse::<axum::http::Uri>() else { return Ok(()); };
        let mut builder = Request::builder().method(method.as_str()).uri(uri);
        if let Some(range) = &range {
            if let Ok(value) = axum::http::HeaderValue::from_str(range) {
                builder = builder.header("range", value);
            }
        }
        if let Some(accept) = &accept {
            if let Ok(value) = axum::http::HeaderValue::from_str(accept) {
                builder = builder.header("accept", value);
            }
        }
        let request = builder.body(Body::empty()).unwrap();
        let (status, body) = world.runtime.block_on(async {
            let response = tokio::time::timeout(Duration::from_secs(10), world.app.clone().oneshot(request))
                .await
                .expect("no request hangs")
                .unwrap();
            let status = response.status();
            let body = tokio::time::timeout(Duration::from_secs(10), axum::body::to_bytes(response.into_body(), 16 << 20))
                .await
                .expect("no body hangs")
                .expect("bodies complete");
            (status, body)
        });
        if status.is_success() {
            return Ok(());
        }
        prop_assert!(status.is_client_error() || status.is_server_error(), "{method} {path}: {status}");
        if method == "HEAD" || status == 404 && body.is_empty() {
            // HEAD has no body; axum's own 404 for paths outside /v2 never reaches us here.
            return Ok(());
        }
        let json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| TestCaseError::fail(format!("{method} {path}: {status} with a non-JSON body: {e}")))?;
        let code = json["errors"][0]["code"].as_str().unwrap_or("");
        prop_assert!(CODES.contains(&code), "{method} {path}: unknown code {code:?} in {json}");
    }
}
