#!/usr/bin/env bash
# What budgets cost the workload: the benchmark with every model priced
# (`--prices`) and the same with a budget on every key as well (`--budgets`),
# alternating, RUNS pairs, each run on a fresh database. On PostgreSQL each
# run gets a database of its own on one throwaway cluster
# (benches/postgres-cluster.sh). The order alternates (odd pairs run
# `--prices` first, even pairs `--budgets`), and every run starts after a
# checkpoint with the run before's database dropped, so that neither kind
# inherits the other's background writes. Prints each run's JSON line, then
# per pair the ratio budgets / prices of each figure, then the median
# ratios.
#
# Usage: benches/budgets-pair.sh [sqlite|postgres] [KEYS] [EVENTS] [RUNS]
# More arguments for every run go in BENCH_ARGS, e.g.
# BENCH_ARGS="--mixed-seconds 15" for a longer mixed phase.
set -euo pipefail
BACKEND=${1:-sqlite} KEYS=${2:-100000} EVENTS=${3:-1000000} RUNS=${4:-3}
BENCH_ARGS=${BENCH_ARGS:-}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo bench --no-run --quiet --bench workload >&2
bench=$(ls -t target/release/deps/workload-* | grep -v '\.d$' | head -n 1)
db_args=()
if [ "$BACKEND" = postgres ]; then
    # shellcheck source=benches/postgres-cluster.sh
    source "$root/benches/postgres-cluster.sh"
fi
out=$(mktemp)
previous=
for run in $(seq 1 "$RUNS"); do
    flags=(--prices --budgets)
    [ $((run % 2)) = 0 ] && flags=(--budgets --prices)
    for flag in "${flags[@]}"; do
        if [ "$BACKEND" = postgres ]; then
            psql=(as_pg "$PG/psql" -h "$dir" -U postgres -q)
            [ -n "$previous" ] && "${psql[@]}" -c "DROP DATABASE $previous" postgres
            "${psql[@]}" -c CHECKPOINT postgres
            previous="keytally_${run}_${flag#--}"
            "${psql[@]}" -c "CREATE DATABASE $previous" postgres
            db_args=(--db "postgres://postgres@/$previous?host=$dir")
        fi
        # shellcheck disable=SC2086 # BENCH_ARGS is split into arguments
        "$bench" --keys "$KEYS" --events "$EVENTS" "${db_args[@]}" $BENCH_ARGS "$flag" 2>/dev/null |
            tee -a "$out"
        echo "${flag#--}" >>"$out.kinds"
    done
done
python3 - "$out" "$out.kinds" <<'PY'
import json, statistics, sys
kinds = [line.strip() for line in open(sys.argv[2])]
runs = [json.loads(line) for line in open(sys.argv[1])]
pairs = [dict(zip(kinds[i:i + 2], runs[i:i + 2])) for i in range(0, len(runs), 2)]
figures = ["resolve_per_s", "resolve_p99_us", "record_single_per_s", "record_batch_per_s",
           "usage_key_window_per_s", "mixed_resolve_per_s", "mixed_record_per_s", "bytes_per_event"]
ratios = {figure: [] for figure in figures}
for pair in pairs:
    for figure in figures:
        ratios[figure].append(pair["budgets"][figure] / pair["prices"][figure])
    print("pair:", " ".join(f"{f}={ratios[f][-1]:.2f}" for f in figures))
print("median:", " ".join(f"{f}={statistics.median(r):.2f}" for f, r in ratios.items()))
PY
rm -f "$out" "$out.kinds"
