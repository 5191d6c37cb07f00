#!/usr/bin/env bash
# What keytally costs a gateway: examples/gateway under wrk, with keytally
# (every request resolves its key and records an event) and with
# `--baseline` (authentication and recording replaced by a constant), in
# alternating runs on a fresh database each. Prints one line per run and the
# median ratios keytally/baseline of requests/s and p99 latency.
#
# Usage: benches/gateway-load.sh [PAIRS] [SECONDS] [CONNECTIONS] [KEYS] [RATE]
#   defaults: 5 pairs of 10 s runs, 32 connections, 1,000 keys (requests
#   spread over all of them), as fast as the gateway answers. With RATE
#   (requests/s), each connection waits CONNECTIONS*1000/RATE ms between its
#   requests, so both gateways see the same offered load and the latencies
#   compare at that load rather than at each one's saturation.
#   Needs wrk (apt-get install wrk).
set -euo pipefail
PAIRS=${1:-5} SECONDS_PER_RUN=${2:-10} CONNECTIONS=${3:-32} KEYS=${4:-1000} RATE=${5:-0}
DELAY_MS=0
[ "$RATE" -gt 0 ] && DELAY_MS=$((CONNECTIONS * 1000 / RATE))
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --example gateway -p keytally
cargo build --release --quiet -p keytally-cli
gateway=$root/target/release/examples/gateway
keytally=$root/target/release/keytally
work=$(mktemp -d /tmp/keytally-load.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# The keys' secrets, one per line; wrk's script picks one per request.
seed() {
    local db=$1
    "$keytally" --db "$db" migrate >/dev/null
    for _ in $(seq 1 "$KEYS"); do
        "$keytally" --db "$db" --json keys create --label load
    done | python3 -c 'import json,sys; [print(json.loads(l)["secret"]) for l in sys.stdin]' >"$work/secrets"
}

cat >"$work/post.lua" <<'LUA'
local secrets = {}
for line in io.lines(os.getenv("SECRETS")) do secrets[#secrets + 1] = line end
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one sentence."}]}'
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")
if delay_ms > 0 then
  delay = function() return delay_ms end
end
request = function()
  n = n + 1
  wrk.headers["Authorization"] = "Bearer " .. secrets[(n % #secrets) + 1]
  return wrk.format()
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %.1f %d %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(99), summary.errors.status, summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout))
end
LUA

# One run: a fresh copy of the seeded database, the gateway, wrk, SIGTERM.
run() {
    local mode=$1 db=$work/run.db
    rm -f "$db" "$db"-wal "$db"-shm
    cp "$work/seed.db" "$db"
    local flag=""
    [ "$mode" = baseline ] && flag=--baseline
    "$gateway" --db "$db" --listen 127.0.0.1:0 $flag >"$work/out" 2>"$work/err" &
    local pid=$!
    for _ in $(seq 1 200); do grep -q listening "$work/out" && break; sleep 0.05; done
    local address
    address=$(sed -n 's/^listening on //p' "$work/out")
    local result
    result=$(DELAY_MS=$DELAY_MS SECRETS=$work/secrets wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" -s "$work/post.lua" \
        "http://$address/v1/chat/completions" | sed -n 's/^RESULT //p')
    kill -TERM "$pid"
    wait "$pid"
    local events=""
    [ "$mode" = keytally ] && events=$(grep -o '[0-9]* events recorded' "$work/err")
    echo "$mode $result $events"
}

seed "$work/seed.db"
: >"$work/results"
for pair in $(seq 1 "$PAIRS"); do
    for mode in keytally baseline; do
        line=$(run "$mode")
        echo "pair $pair: $line (requests/s, p99 µs, non-2xx, socket errors)"
        echo "$pair $line" >>"$work/results"
    done
done
python3 - "$work/results" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    f = line.split()
    runs.setdefault(int(f[0]), {})[f[1]] = (float(f[2]), float(f[3]))
ratios = [(r["keytally"][0] / r["baseline"][0], r["keytally"][1] / r["baseline"][1]) for r in runs.values()]
for pair, (rps, p99) in zip(runs, ratios):
    print(f"pair {pair}: throughput ratio {rps:.3f}, p99 ratio {p99:.3f}")
print(f"median throughput ratio {statistics.median(r for r, _ in ratios):.3f} "
      f"(range {min(r for r, _ in ratios):.3f}-{max(r for r, _ in ratios):.3f}), "
      f"median p99 ratio {statistics.median(p for _, p in ratios):.3f} "
      f"(range {min(p for _, p in ratios):.3f}-{max(p for _, p in ratios):.3f})")
PY
