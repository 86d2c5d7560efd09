//! Generates valid container images and pushes them with the OCI push API.
//!
//! Each layer is a gzip'd tar holding one file of pseudo-random (incompressible) bytes;
//! the config names the diff IDs (sha256 of each uncompressed tar), so docker, containerd
//! and skopeo accept the image. Compression is `none` (stored deflate blocks) so that a
//! 64 MiB layer is quick to build; its digest is still that of a real gzip stream.
//! Pushing is monolithic: `POST /v2/<repo>/blobs/uploads/` then `PUT <location>&digest=`,
//! then `PUT /v2/<repo>/manifests/<ref>`, which distribution 2.8 accepts.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;

use super::{http, sha256_digest};

/// Which family of media types an image or index uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaTypes {
    /// Docker image manifest v2 schema 2 and manifest list.
    Docker,
    /// OCI image manifest and index.
    Oci,
}

impl MediaTypes {
    pub fn manifest(self) -> &'static str {
        match self {
            MediaTypes::Docker => "application/vnd.docker.distribution.manifest.v2+json",
            MediaTypes::Oci => "application/vnd.oci.image.manifest.v1+json",
        }
    }
    pub fn index(self) -> &'static str {
        match self {
            MediaTypes::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
            MediaTypes::Oci => "application/vnd.oci.image.index.v1+json",
        }
    }
    pub fn config(self) -> &'static str {
        match self {
            MediaTypes::Docker => "application/vnd.docker.container.image.v1+json",
            MediaTypes::Oci => "application/vnd.oci.image.config.v1+json",
        }
    }
    pub fn layer(self) -> &'static str {
        match self {
            MediaTypes::Docker => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            MediaTypes::Oci => "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }
}

/// The `Accept` header a pulling client sends: every manifest and index type.
pub const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Platform {
    pub architecture: &'static str,
    pub variant: Option<&'static str>,
}

impl Platform {
    pub const AMD64: Platform = Platform {
        architecture: "amd64",
        variant: None,
    };
    pub const ARM64: Platform = Platform {
        architecture: "arm64",
        variant: Some("v8"),
    };

    fn descriptor_platform(self) -> DescriptorPlatform {
        DescriptorPlatform {
            architecture: self.architecture,
            os: "linux",
            variant: self.variant,
        }
    }
}

// Manifests are serialised from structs so their keys keep Docker's order (schemaVersion
// first) and Docker's three-space indent: not the sorted, compact form a mirror that
// re-serialises JSON would produce, so byte-identity checks catch one.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DescriptorPlatform {
    architecture: &'static str,
    os: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    size: u64,
    digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<DescriptorPlatform>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestJson {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexJson {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

fn docker_style_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"   ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    value.serialize(&mut ser).unwrap();
    out
}

/// What image to generate.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// Size in bytes of the one file in each layer, in layer order.
    pub layers: Vec<usize>,
    pub media_types: MediaTypes,
    pub platform: Platform,
    /// Seeds the content; `None` takes a fresh one so images never share blobs by accident.
    pub seed: Option<u64>,
}

impl ImageSpec {
    pub fn new(layers: &[usize]) -> Self {
        ImageSpec {
            layers: layers.to_vec(),
            media_types: MediaTypes::Docker,
            platform: Platform::AMD64,
            seed: None,
        }
    }
    pub fn media_types(mut self, m: MediaTypes) -> Self {
        self.media_types = m;
        self
    }
    pub fn platform(mut self, p: Platform) -> Self {
        self.platform = p;
        self
    }
    pub fn seed(mut self, s: u64) -> Self {
        self.seed = Some(s);
        self
    }
}

/// One generated layer.
#[derive(Clone)]
pub struct GeneratedLayer {
    /// Digest of the gzip'd tar (the blob).
    pub digest: String,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
    /// Cheap to clone, so one generated image can be pushed to many registries.
    pub blob: Bytes,
}

/// An image ready to push.
#[derive(Clone)]
pub struct GeneratedImage {
    pub media_types: MediaTypes,
    pub platform: Platform,
    pub config: Bytes,
    pub config_digest: String,
    pub layers: Vec<GeneratedLayer>,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
}

/// What a push left in the registry (blob bytes are not kept; compare digests).
#[derive(Clone, Debug)]
pub struct PushedImage {
    pub repo: String,
    /// The tag, or the digest when pushed by digest as part of an index.
    pub reference: String,
    pub media_type: String,
    pub platform: Platform,
    pub manifest_digest: String,
    pub manifest_bytes: Vec<u8>,
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    pub layer_digests: Vec<String>,
    /// Compressed sizes, as in the manifest.
    pub layer_sizes: Vec<u64>,
    pub diff_ids: Vec<String>,
}

impl PushedImage {
    /// Config and layer digests: every blob a pull fetches.
    pub fn blob_digests(&self) -> Vec<String> {
        let mut v = vec![self.config_digest.clone()];
        v.extend(self.layer_digests.iter().cloned());
        v
    }

    /// Digest and size of the largest layer.
    pub fn largest_layer(&self) -> (String, u64) {
        let i = (0..self.layer_sizes.len())
            .max_by_key(|&i| self.layer_sizes[i])
            .expect("image has layers");
        (self.layer_digests[i].clone(), self.layer_sizes[i])
    }
}

#[derive(Clone, Debug)]
pub struct PushedIndex {
    pub repo: String,
    pub tag: String,
    pub media_type: String,
    pub digest: String,
    pub bytes: Vec<u8>,
    /// One image per platform, in index order.
    pub images: Vec<PushedImage>,
}

impl PushedIndex {
    pub fn image_for(&self, architecture: &str) -> &PushedImage {
        self.images
            .iter()
            .find(|i| i.platform.architecture == architecture)
            .unwrap_or_else(|| panic!("index has no {architecture} image"))
    }
}

fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t ^ (COUNTER.fetch_add(1, Ordering::Relaxed) << 48) ^ (std::process::id() as u64) << 32
}

/// splitmix64: fast, and its output does not compress.
struct RandomBytes {
    state: u64,
    left: usize,
}

impl Read for RandomBytes {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.left);
        for chunk in buf[..n].chunks_mut(8) {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        self.left -= n;
        Ok(n)
    }
}

fn generate_layer(index: usize, size: usize, seed: u64) -> GeneratedLayer {
    let mut tar = tar::Builder::new(Vec::with_capacity(size + 4096));
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(1_700_000_000);
    tar.append_data(&mut dir, "regmirror-test/", std::io::empty())
        .unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o644);
    file.set_size(size as u64);
    file.set_mtime(1_700_000_000);
    let data = RandomBytes {
        state: seed ^ (index as u64).wrapping_mul(0xA24B_AED4_963E_E407),
        left: size,
    };
    tar.append_data(&mut file, format!("regmirror-test/layer-{index}.bin"), data)
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let diff_id = sha256_digest(&tar);
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(tar.len() + tar.len() / 1000 + 64),
        flate2::Compression::none(),
    );
    gz.write_all(&tar).unwrap();
    let blob = Bytes::from(gz.finish().unwrap());
    GeneratedLayer {
        digest: sha256_digest(&blob),
        diff_id,
        blob,
    }
}

/// Builds an image in memory (CPU-bound; call it off the async threads for big layers).
pub fn generate_image(spec: &ImageSpec) -> GeneratedImage {
    let seed = spec.seed.unwrap_or_else(fresh_seed);
    let m = spec.media_types;
    let layers: Vec<GeneratedLayer> = spec
        .layers
        .iter()
        .enumerate()
        .map(|(i, &size)| generate_layer(i, size, seed))
        .collect();
    let created = "2024-01-01T00:00:00Z";
    let mut config = json!({
        "architecture": spec.platform.architecture,
        "os": "linux",
        "created": created,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
            "Labels": { "org.regmirror.test.seed": seed.to_string() }
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()
        },
        "history": (0..layers.len()).map(|i| json!({
            "created": created,
            "created_by": format!("regmirror test layer {i}")
        })).collect::<Vec<_>>()
    });
    if let Some(v) = spec.platform.variant {
        config["variant"] = json!(v);
    }
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = sha256_digest(&config);
    let manifest = docker_style_json(&ManifestJson {
        schema_version: 2,
        media_type: m.manifest(),
        config: Descriptor {
            media_type: m.config().to_owned(),
            size: config.len() as u64,
            digest: config_digest.clone(),
            platform: None,
        },
        layers: layers
            .iter()
            .map(|l| Descriptor {
                media_type: m.layer().to_owned(),
                size: l.blob.len() as u64,
                digest: l.digest.clone(),
                platform: None,
            })
            .collect(),
    });
    let manifest_digest = sha256_digest(&manifest);
    GeneratedImage {
        media_types: m,
        platform: spec.platform,
        config: Bytes::from(config),
        config_digest,
        layers,
        manifest,
        manifest_digest,
    }
}

/// Pushes to one registry, optionally with basic auth.
#[derive(Clone)]
pub struct Pusher {
    client: reqwest::Client,
    base: String,
    basic_auth: Option<(String, String)>,
}

impl Pusher {
    pub fn new(registry_url: &str) -> Self {
        Pusher {
            client: http(),
            base: registry_url.trim_end_matches('/').to_owned(),
            basic_auth: None,
        }
    }

    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.basic_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, url);
        match &self.basic_auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    /// Uploads one blob unless the registry already has it in `repo`.
    pub async fn push_blob(&self, repo: &str, digest: &str, bytes: Bytes) {
        let head = self
            .req(
                reqwest::Method::HEAD,
                &format!("{}/v2/{repo}/blobs/{digest}", self.base),
            )
            .send()
            .await
            .expect("HEAD blob");
        if head.status() == reqwest::StatusCode::OK {
            return;
        }
        let start = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .header("Content-Length", "0")
            .send()
            .await
            .expect("POST blob upload");
        assert_eq!(
            start.status(),
            reqwest::StatusCode::ACCEPTED,
            "starting upload to {repo}: {:?}",
            start.text().await
        );
        let location = start
            .headers()
            .get("Location")
            .expect("upload Location header")
            .to_str()
            .unwrap()
            .to_owned();
        let location = if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else {
            format!("{}{location}", self.base)
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={}", digest.replace(':', "%3A"));
        let len = bytes.len();
        let put = self
            .req(reqwest::Method::PUT, &url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", len.to_string())
            .body(bytes)
            .send()
            .await
            .expect("PUT blob");
        let status = put.status();
        assert_eq!(
            status,
            reqwest::StatusCode::CREATED,
            "finishing upload of {digest} ({len} bytes) to {repo}: {:?}",
            put.text().await
        );
    }

    /// Puts a manifest or index under a tag or digest and checks the digest the registry
    /// computed.
    pub async fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
        let r = self
            .req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("Content-Type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("PUT manifest");
        let status = r.status();
        let digest = r
            .headers()
            .get("Docker-Content-Digest")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            status,
            reqwest::StatusCode::CREATED,
            "pushing manifest {repo}:{reference}: {:?}",
            r.text().await
        );
        if let Some(d) = digest {
            assert_eq!(d, sha256_digest(bytes), "registry computed another digest");
        }
    }

    /// Pushes a generated image's blobs and manifest under `reference`.
    pub async fn push_generated(
        &self,
        repo: &str,
        reference: &str,
        img: &GeneratedImage,
    ) -> PushedImage {
        let pushed = PushedImage {
            repo: repo.to_owned(),
            reference: reference.to_owned(),
            media_type: img.media_types.manifest().to_owned(),
            platform: img.platform,
            manifest_digest: img.manifest_digest.clone(),
            manifest_bytes: img.manifest.clone(),
            config_digest: img.config_digest.clone(),
            config_bytes: img.config.to_vec(),
            layer_digests: img.layers.iter().map(|l| l.digest.clone()).collect(),
            layer_sizes: img.layers.iter().map(|l| l.blob.len() as u64).collect(),
            diff_ids: img.layers.iter().map(|l| l.diff_id.clone()).collect(),
        };
        self.push_blob(repo, &img.config_digest, img.config.clone())
            .await;
        for l in &img.layers {
            self.push_blob(repo, &l.digest, l.blob.clone()).await;
        }
        self.push_manifest(repo, reference, &pushed.media_type, &img.manifest)
            .await;
        pushed
    }

    pub async fn push_image(&self, repo: &str, tag: &str, spec: &ImageSpec) -> PushedImage {
        let spec = spec.clone();
        let img = tokio::task::spawn_blocking(move || generate_image(&spec))
            .await
            .unwrap();
        self.push_generated(repo, tag, &img).await
    }

    /// Pushes one small image per platform (by digest), then an index naming them.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        platforms: &[Platform],
        media_types: MediaTypes,
    ) -> PushedIndex {
        let mut images = Vec::new();
        for (i, &p) in platforms.iter().enumerate() {
            let spec = ImageSpec::new(&[2048 + i * 1000, 300_000 + i * 1000])
                .media_types(media_types)
                .platform(p);
            let img = tokio::task::spawn_blocking(move || generate_image(&spec))
                .await
                .unwrap();
            let digest = img.manifest_digest.clone();
            images.push(self.push_generated(repo, &digest, &img).await);
        }
        let bytes = docker_style_json(&IndexJson {
            schema_version: 2,
            media_type: media_types.index(),
            manifests: images
                .iter()
                .map(|i| Descriptor {
                    media_type: i.media_type.clone(),
                    size: i.manifest_bytes.len() as u64,
                    digest: i.manifest_digest.clone(),
                    platform: Some(i.platform.descriptor_platform()),
                })
                .collect(),
        });
        self.push_manifest(repo, tag, media_types.index(), &bytes)
            .await;
        PushedIndex {
            repo: repo.to_owned(),
            tag: tag.to_owned(),
            media_type: media_types.index().to_owned(),
            digest: sha256_digest(&bytes),
            bytes,
            images,
        }
    }
}

/// Pushes a Docker schema 2 image with one layer per entry of `layer_sizes`.
pub async fn push_image(
    registry_url: &str,
    repo: &str,
    tag: &str,
    layer_sizes: &[usize],
) -> PushedImage {
    Pusher::new(registry_url)
        .push_image(repo, tag, &ImageSpec::new(layer_sizes))
        .await
}

/// Pushes an image described by `spec` (media types, platform, seed).
pub async fn push_image_with(
    registry_url: &str,
    repo: &str,
    tag: &str,
    spec: &ImageSpec,
) -> PushedImage {
    Pusher::new(registry_url).push_image(repo, tag, spec).await
}

/// Pushes a multi-platform index (OCI index or Docker manifest list).
pub async fn push_index(
    registry_url: &str,
    repo: &str,
    tag: &str,
    platforms: &[Platform],
    media_types: MediaTypes,
) -> PushedIndex {
    Pusher::new(registry_url)
        .push_index(repo, tag, platforms, media_types)
        .await
}
