#!/usr/bin/env bash
# The project's test command (`bash tests/run.sh`, also what CI runs).
#
# The end-to-end tests drive real programs: distribution (docker-registry), skopeo,
# containerd + ctr, dockerd + docker, umoci, htpasswd, prometheus, jq. Missing ones are
# installed from Debian when running as root; if any is still missing this fails loudly
# instead of letting the tests skip. Then every test target runs in release mode.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

required_tools=(skopeo docker-registry containerd ctr dockerd docker umoci htpasswd prometheus jq runc)
packages=(skopeo docker-registry containerd docker.io umoci apache2-utils prometheus jq)

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

# Dropped so that no test traffic to 127.0.0.1 is sent to a proxy.
unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy ALL_PROXY all_proxy

# --no-fail-fast: one failing target must not hide the results of the others.
exec cargo test --release --all-targets --no-fail-fast "$@"
