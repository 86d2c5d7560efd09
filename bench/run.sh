#!/usr/bin/env bash
# Benchmarks regmirror against distribution (proxy mode) and nginx (sendfile) in one run on
# loopback, and prints one table. Options go to the harness, e.g.
#   bash bench/run.sh                      # the full run (~8 minutes on 2 cores)
#   bash bench/run.sh --quick              # a smoke run: 32 MiB layer, 1 repetition, 1 s figures
#   bash bench/run.sh --wan 20,1000        # through a relay adding 20 ms RTT, 1 Gbit/s cap
#   bash bench/run.sh --reps 3 --secs 5    # more repetitions, longer load figures
# The table is also written to target/bench/compare-<UTC time>.md.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in skopeo docker-registry nginx; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "bench/run.sh: missing ${missing[*]}; installing skopeo docker-registry nginx-light" >&2
    apt-get install -y skopeo docker-registry nginx-light >&2
fi

load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" 'BEGIN { exit !(l > 0.5) }'; then
    echo "bench/run.sh: warning: load average is $load; other work on this machine skews the figures" >&2
fi

# `cargo bench` builds the regmirror binary with the bench profile (= release) and passes
# --bench to the harness.
mkdir -p target/bench
out="target/bench/compare-$(date -u +%Y%m%dT%H%M%SZ).md"
exec cargo bench --bench compare -- --out "$out" "$@"
