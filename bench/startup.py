#!/usr/bin/env python3
"""Start-up time of regmirror over a large store, with its index present and deleted.

Creates N small stored blobs (default 100,000, 1 KiB each, named by their sha256), then starts
`target/release/regmirror serve` on the store and measures:
  - time until `GET /v2/` answers (the store is open and the server listens);
  - time until the store is fully verified: `regmirror_scrub_passes_total` reaches 1 (the
    start-up verification of files without an index entry is the first pass).
Runs: "index deleted" (every file is hashed in the background before it is served), then
"index present" (the index the first run rebuilt), each `--reps` times. Prints a table and the
ratios. Build first: flock /tmp/cargo.lock cargo build --release

    python3 bench/startup.py [--blobs 100000] [--size 1024] [--reps 3] [--max-rate 0]

Not part of the test suite: it is a measurement, and it takes minutes.
"""
import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "regmirror")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(root, blobs, size):
    base = os.path.join(root, "blobs", "sha256")
    rnd = os.urandom(size)
    for i in range(blobs):
        body = i.to_bytes(8, "little") + rnd[8:]
        hexd = hashlib.sha256(body).hexdigest()
        shard = os.path.join(base, hexd[:2])
        os.makedirs(shard, exist_ok=True)
        with open(os.path.join(shard, hexd), "wb") as f:
            f.write(body)


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


def passes(port):
    _, text = get(f"http://127.0.0.1:{port}/metrics")
    for line in text.splitlines():
        if line.startswith("regmirror_scrub_passes_total "):
            return float(line.split()[1])
    return 0.0


def run_once(root, config, port, log):
    started = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen([BINARY, "serve", "--config", config], stdout=out, stderr=out)
    try:
        ready = verified = None
        while time.monotonic() - started < 3600:
            if proc.poll() is not None:
                sys.exit(f"regmirror exited {proc.returncode}; see {log}")
            try:
                if ready is None:
                    get(f"http://127.0.0.1:{port}/v2/")
                    ready = time.monotonic() - started
                if passes(port) >= 1:
                    verified = time.monotonic() - started
                    break
            except OSError:
                pass
            time.sleep(0.005)
        return ready, verified
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-rate", default="0", help="storage.scrub.max_rate")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="regmirror-startup-")
    root = os.path.join(work, "data")
    t = time.monotonic()
    make_store(root, args.blobs, args.size)
    print(f"store: {args.blobs} blobs of {args.size} B written in {time.monotonic() - t:.1f} s")
    port = free_port()
    config = os.path.join(work, "config.yml")
    with open(config, "w") as f:
        f.write(
            f"listen: 127.0.0.1:{port}\n"
            f"storage: {{ root: {root}, scrub: {{ interval: 0, max_rate: {args.max_rate} }} }}\n"
            "default_upstream: docker.io\n"
            "upstreams:\n  docker.io: { url: \"http://127.0.0.1:9\" }\n"
            "log: { level: info, format: text }\n"
        )
    log = os.path.join(work, "regmirror.log")
    results = {"index deleted": [], "index present": []}
    for _ in range(args.reps):
        shutil.rmtree(os.path.join(root, "index"), ignore_errors=True)
        results["index deleted"].append(run_once(root, config, port, log))
        results["index present"].append(run_once(root, config, port, log))
    print(f"\n| case | /v2/ answers (s, median) | fully verified (s, median) |")
    print("|---|---|---|")
    med = {}
    for case, runs in results.items():
        ready = statistics.median(r for r, _ in runs)
        verified = statistics.median(v for _, v in runs)
        med[case] = (ready, verified)
        print(f"| {case} | {ready:.3f} | {verified:.3f} |")
    d, p = med["index deleted"], med["index present"]
    print(f"\nratios deleted/present: /v2/ {d[0] / p[0]:.2f}x, fully verified {d[1] / p[1]:.2f}x")
    print(f"log: {log}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
