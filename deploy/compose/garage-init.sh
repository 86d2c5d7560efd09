#!/usr/bin/env bash
# Prepares the Garage cluster of deploy/compose/cluster.yaml; safe to run again.
#
#   bash deploy/compose/garage-init.sh
#
# 1. Generates the secrets compose mounts (deploy/compose/secrets/cluster/, mode 0700, never
#    in git), unless they exist: Garage's RPC secret, the S3 secret access key and the
#    regmirror peer channel's secret. No credential ships in the repository.
# 2. Starts garage1..3 and waits for them.
# 3. Connects the nodes (again after `down`/`up`: their addresses may have changed).
# 4. First run only: assigns the three nodes a role (zone dc1, capacity GARAGE_CAPACITY,
#    default 10G each) and applies layout version 1.
# 5. Creates the bucket `regmirror`, imports the key `regmirror` (the ID of
#    config.cluster.yml, the generated secret) and lets it read, write and own the bucket.
#
# Then: docker compose -f deploy/compose/cluster.yaml up -d --build
#
# COMPOSE overrides the compose command (default: `docker compose`, else `docker-compose`).
# COMPOSE_FILE, compose's own variable, names the files when the cluster has an override
# (COMPOSE_FILE=deploy/compose/cluster.yaml:cluster.override.yaml); give `up` the same files.
# Garage started from other files than `up` is given would be recreated by `up`, with new
# addresses the nodes do not know: a disconnected cluster until this script runs again.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
file="$here/cluster.yaml"
secrets="$here/secrets/cluster"
bucket=regmirror
key_name=regmirror
# Must match storage.s3.access_key_id in config.cluster.yml: "GK" and 12 bytes in hex (the
# bytes spell "regmirror001"). A key ID names the key; the secret below is the credential.
key_id=GK7265676d6972726f72303031
capacity="${GARAGE_CAPACITY:-10G}"

if [ -n "${COMPOSE:-}" ]; then
    read -r -a compose <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    compose=(docker-compose)
fi
if [ -z "${COMPOSE_FILE:-}" ]; then
    compose+=(-f "$file")
fi

# 32 random bytes in hex, without a trailing newline.
random_hex() {
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
}

# secret NAME MODE: creates secrets/cluster/NAME once.
secret() {
    local path="$secrets/$1"
    if [ ! -s "$path" ]; then
        (umask 077 && random_hex >"$path")
        echo "generated $path"
    fi
    chmod "$2" "$path"
}

garage() {
    local node="$1"
    shift
    "${compose[@]}" exec -T "$node" /garage "$@"
}

mkdir -p "$secrets"
chmod 0700 "$secrets"
# Garage refuses a secret file that others can read; Garage runs as root in its container.
secret garage-rpc-secret 0600
# Read by uid 65532 in the regmirror containers; the 0700 directory guards them on the host.
secret s3-secret-access-key 0444
secret cluster-secret 0444

"${compose[@]}" up -d garage1 garage2 garage3

declare -A ids
for node in garage1 garage2 garage3; do
    for _ in $(seq 60); do
        if id="$(garage "$node" node id -q 2>/dev/null)"; then
            ids[$node]="${id%%@*}"
            break
        fi
        sleep 1
    done
    if [ -z "${ids[$node]:-}" ]; then
        echo "$node does not answer; see: ${compose[*]} logs $node" >&2
        exit 1
    fi
done

garage garage1 node connect "${ids[garage2]}@garage2:3901"
garage garage1 node connect "${ids[garage3]}@garage3:3901"

status="$(garage garage1 status)"
unassigned="$(grep -c 'NO ROLE ASSIGNED' <<<"$status" || true)"
if [ "$unassigned" = 3 ]; then
    garage garage1 layout assign -z dc1 -c "$capacity" "${ids[garage1]}" "${ids[garage2]}" "${ids[garage3]}"
    garage garage1 layout apply --version 1
elif [ "$unassigned" != 0 ]; then
    echo "some Garage nodes have a role and some do not; fix the layout by hand:" >&2
    echo "$status" >&2
    exit 1
fi

if ! garage garage1 bucket info "$bucket" >/dev/null 2>&1; then
    garage garage1 bucket create "$bucket"
fi
if ! garage garage1 key info "$key_name" >/dev/null 2>&1; then
    garage garage1 key import --yes -n "$key_name" "$key_id" "$(cat "$secrets/s3-secret-access-key")"
fi
garage garage1 bucket allow --read --write --owner "$bucket" --key "$key_name"

garage garage1 status
echo "Garage is ready. Next: ${compose[*]} up -d --build"
