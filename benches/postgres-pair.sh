#!/usr/bin/env bash
# keytally's workload on PostgreSQL beside the hand-written reference, in one
# run on one throwaway cluster with the reference's settings: PostgreSQL's
# default durability (fsync, synchronous_commit, full_page_writes on), a Unix
# socket in a temporary folder, trust authentication, UTF8 with the C locale.
# The reference runs first in database `postgres`, keytally second in a
# database of its own; each prints one JSON line.
#
# Usage: benches/postgres-pair.sh [KEYS] [EVENTS] [REFERENCE_DIR]
#   REFERENCE_DIR defaults to ../shared/bench/rawpg (copied to /tmp to build).
set -euo pipefail
KEYS=${1:-100000} EVENTS=${2:-1000000}
root=$(cd "$(dirname "$0")/.." && pwd)
reference=${3:-$root/../shared/bench/rawpg}
copy=/tmp/keytally-rawpg-src
rm -rf "$copy" && cp -r "$reference" "$copy"
export CARGO_TARGET_DIR_REFERENCE=/tmp/rawpg-target
nice -n 19 env CARGO_TARGET_DIR=$CARGO_TARGET_DIR_REFERENCE \
    cargo build --release --quiet --manifest-path "$copy/Cargo.toml" >&2
(cd "$root" && cargo bench --no-run --quiet --bench workload >&2)

# shellcheck source=benches/postgres-cluster.sh
source "$root/benches/postgres-cluster.sh"
"$CARGO_TARGET_DIR_REFERENCE/release/rawpg-anchor" "host=$dir user=postgres dbname=postgres" "$KEYS" "$EVENTS"
cd "$root"
# keytally twice: resolves confirmed by a read (strict, the default), then
# by the key-change listener (notified), each in a database of its own.
for mode in strict notified; do
    as_pg "$PG/psql" -h "$dir" -U postgres -q -c "CREATE DATABASE keytally_$mode" postgres
    flag=$([ "$mode" = notified ] && echo --notified || true)
    cargo bench --quiet --bench workload -- --db "postgres://postgres@/keytally_$mode?host=$dir" \
        --keys "$KEYS" --events "$EVENTS" $flag
done
