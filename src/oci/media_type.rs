//! Manifest media types: the names, the `Accept` header sent upstream, and
//! reading a manifest body just far enough to learn its type and the digests
//! it references.
//!
//! This is not a manifest validator. regmirror stores manifests byte for byte
//! as the upstream served them (their digest depends on it); it only needs the
//! media type to answer `Content-Type`, and the references to know what an
//! index or image points at.

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use super::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The empty descriptor's type (`{}`), used as the config of artifacts.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The four manifest types regmirror serves. Docker schema 1 is absent on
/// purpose: it has been deprecated since 2015 and its digest is computed over
/// a canonical form, not the bytes served.
pub const MANIFEST_TYPES: [&str; 4] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
];

/// The `Accept` header for upstream manifest requests: [`MANIFEST_TYPES`]
/// joined. Without it, Docker Hub answers with a schema 1 manifest or
/// down-converts an index to a single platform.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// The media type without parameters or surrounding whitespace:
/// `application/json; charset=utf-8` → `application/json`.
pub fn essence(mt: &str) -> &str {
    mt.split(';').next().unwrap_or_default().trim()
}

/// Whether `mt` can be sent as a `Content-Type` header: 1 to 255 visible ASCII characters and
/// spaces (RFC 6838 names and parameters need nothing else), no control character, no
/// leading or trailing space, and a `type/subtype` shape. Media types come from upstreams
/// (headers and manifest bodies), so this is checked before one becomes a header.
pub fn is_valid_header_value(mt: &str) -> bool {
    let bytes = mt.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 255
        && bytes.iter().all(|b| (0x20..0x7f).contains(b))
        && mt.trim() == mt
        && essence(mt).split_once('/').is_some_and(|(kind, sub)| {
            !kind.is_empty() && !sub.is_empty() && !sub.contains('/') && !kind.contains(' ')
        })
}

/// Whether `mt` names a multi-platform index (OCI index or Docker manifest
/// list). Parameters and ASCII case are ignored, as media types are
/// case-insensitive.
pub fn is_index(mt: &str) -> bool {
    let mt = essence(mt);
    [OCI_INDEX, DOCKER_MANIFEST_LIST]
        .iter()
        .any(|t| t.eq_ignore_ascii_case(mt))
}

/// Whether `mt` is one of [`MANIFEST_TYPES`], ignoring parameters and case.
pub fn is_manifest_type(mt: &str) -> bool {
    let mt = essence(mt);
    MANIFEST_TYPES.iter().any(|t| t.eq_ignore_ascii_case(mt))
}

/// The fields that decide a manifest's type; everything else is skipped
/// without being built into a tree.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<IgnoredAny>,
    config: Option<IgnoredAny>,
    layers: Option<IgnoredAny>,
}

/// The media type a manifest body declares in its top-level `mediaType`.
///
/// `mediaType` is optional in OCI manifests, so when it is absent the type is
/// inferred from the shape, as distribution does: `manifests` makes an OCI
/// index, `config` with `layers` an OCI image manifest. A body with both
/// shapes is ambiguous and gives `None`, as does anything that is not a JSON
/// object.
pub fn sniff(body: &[u8]) -> Option<String> {
    let probe: Probe = serde_json::from_slice(body).ok()?;
    match probe.media_type {
        Some(mt) if !mt.is_empty() => Some(mt),
        _ => {
            let index = probe.manifests.is_some();
            let image = probe.config.is_some() && probe.layers.is_some();
            match (index, image) {
                (true, false) => Some(OCI_INDEX.to_owned()),
                (false, true) => Some(OCI_MANIFEST.to_owned()),
                _ => None,
            }
        }
    }
}

/// The descriptors a manifest or index body names as its content, as
/// `(digest, mediaType)`, in document order: `config`, `layers[]`,
/// `manifests[]`. Duplicates are kept. A descriptor whose digest is missing
/// or invalid (including non-sha256) is skipped, as is a body that is not
/// JSON.
///
/// `subject` and any other descriptor are left out on purpose: registries
/// accept any digest as a `subject` without checking that the repository
/// holds it, so it proves nothing about what a repository may serve.
pub fn referenced_digests(body: &[u8]) -> Vec<(Digest, Option<String>)> {
    // A `Value` tree, not typed structs, so one malformed descriptor is
    // skipped instead of failing the whole body.
    let Ok(Value::Object(root)) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let single = |key: &str| root.get(key).into_iter();
    let list = |key: &str| {
        root.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    };
    single("config")
        .chain(list("layers"))
        .chain(list("manifests"))
        .filter_map(descriptor)
        .collect()
}

fn descriptor(value: &Value) -> Option<(Digest, Option<String>)> {
    let digest = value.get("digest")?.as_str()?.parse().ok()?;
    let media_type = value
        .get("mediaType")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Some((digest, media_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    #[test]
    fn accept_lists_every_manifest_type() {
        let listed: Vec<&str> = MANIFEST_ACCEPT.split(',').map(str::trim).collect();
        assert_eq!(listed, MANIFEST_TYPES);
    }

    #[test]
    fn classification() {
        // (media type, is_index, is_manifest_type)
        let cases = [
            (OCI_INDEX, true, true),
            (DOCKER_MANIFEST_LIST, true, true),
            (OCI_MANIFEST, false, true),
            (DOCKER_MANIFEST_V2, false, true),
            (
                "application/vnd.oci.image.index.v1+json; charset=utf-8",
                true,
                true,
            ),
            (" Application/VND.OCI.image.manifest.v1+json ", false, true),
            (
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
                false,
                false,
            ),
            (OCI_CONFIG, false, false),
            (OCI_EMPTY, false, false),
            ("application/json", false, false),
            ("", false, false),
        ];
        for (mt, index, manifest) in cases {
            assert_eq!(is_index(mt), index, "{mt:?}");
            assert_eq!(is_manifest_type(mt), manifest, "{mt:?}");
        }
    }

    #[test]
    fn sniffing() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                r#"{"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
                Some(OCI_INDEX),
            ),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{},"layers":[]}"#,
                Some(DOCKER_MANIFEST_V2),
            ),
            // Declared type wins over shape.
            (
                r#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","config":{},"layers":[]}"#,
                Some(DOCKER_MANIFEST_LIST),
            ),
            (
                r#"{"mediaType":"application/x-custom"}"#,
                Some("application/x-custom"),
            ),
            (r#"{"schemaVersion":2,"manifests":[]}"#, Some(OCI_INDEX)),
            (
                r#"{"schemaVersion":2,"config":{},"layers":[]}"#,
                Some(OCI_MANIFEST),
            ),
            (r#"{"mediaType":"","manifests":[]}"#, Some(OCI_INDEX)),
            (r#"{"schemaVersion":2,"config":{}}"#, None),
            (r#"{"manifests":[],"config":{},"layers":[]}"#, None),
            (r#"{"manifests":null}"#, None),
            (r#"{"schemaVersion":1,"fsLayers":[]}"#, None),
            (r#"{"mediaType":5}"#, None),
            ("[]", None),
            ("\"x\"", None),
            ("", None),
            ("{", None),
            ("not json", None),
        ];
        for (body, expected) in cases {
            assert_eq!(sniff(body.as_bytes()).as_deref(), *expected, "{body}");
        }
    }

    #[test]
    fn references() {
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
                "config":{{"mediaType":"{OCI_CONFIG}","digest":"{D1}","size":2}},
                "layers":[
                    {{"mediaType":"{OCI_LAYER_TAR_GZIP}","digest":"{D2}","size":3}},
                    {{"digest":"sha512:abcd","size":3}},
                    {{"mediaType":"{OCI_LAYER_TAR_GZIP}","size":3}},
                    "not a descriptor",
                    {{"digest":"{D2}"}}
                ],
                "subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{D3}","size":4}}}}"#
        );
        let index = format!(
            r#"{{"manifests":[
                    {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","platform":{{"os":"linux"}}}},
                    {{"mediaType":"{DOCKER_MANIFEST_V2}","digest":"{D2}"}}
                ]}}"#
        );
        let d = |s: &str| s.parse::<Digest>().unwrap();
        let m = |s: &str| Some(s.to_owned());
        type Expected = Vec<(Digest, Option<String>)>;
        let cases: Vec<(&str, Expected)> = vec![
            (
                &image,
                vec![
                    (d(D1), m(OCI_CONFIG)),
                    (d(D2), m(OCI_LAYER_TAR_GZIP)),
                    (d(D2), None),
                ],
            ),
            (
                &index,
                vec![(d(D1), m(OCI_MANIFEST)), (d(D2), m(DOCKER_MANIFEST_V2))],
            ),
            (r#"{"layers":{"digest":"x"},"config":null}"#, vec![]),
            ("{}", vec![]),
            ("[]", vec![]),
            ("garbage", vec![]),
        ];
        for (body, expected) in cases {
            assert_eq!(referenced_digests(body.as_bytes()), expected, "{body}");
        }
    }

    #[test]
    fn header_valid_media_types() {
        for ok in [
            OCI_MANIFEST,
            "application/json; charset=utf-8",
            "text/plain",
        ] {
            assert!(is_valid_header_value(ok), "{ok}");
        }
        for bad in [
            "",
            "application/vnd.oci.image.manifest.v1+json\u{1}",
            "application/vnd.oci\nimage",
            "application/x\rinjected: yes",
            "no-slash",
            "/x",
            "x/",
            " application/json",
            "application/json\t",
            "appl\u{e9}/json",
        ] {
            assert!(!is_valid_header_value(bad), "{bad:?}");
        }
        assert!(!is_valid_header_value(&format!("a/{}", "b".repeat(300))));
    }
}
