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

pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
PG=$(pgbin)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
dir=$(mktemp -d /tmp/ktpg.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres: "$dir"
trap 'as_pg "$PG/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
as_pg "$PG/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
as_pg "$PG/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-c listen_addresses='' -c unix_socket_directories='$dir'" start >/dev/null
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
