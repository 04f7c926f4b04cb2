#!/usr/bin/env bash
# Checks that cairn-load's open-loop latencies can be trusted: against the same Redis, in the same
# run, it compares `cairn-load run --rate R` with an independent client that paces by busy-waiting
# (Benchmarks/generator/precise_client.py: plain sockets, one thread, no shared code). Both send
# workload a (50 % GET, 50 % SET of 100-byte values over 100,000 loaded keys) and measure each
# request from its intended start. Redis answers in tens of microseconds, so what one client sees
# beyond the other is that client's own lateness.
#
# For each rate in RATES, ROUNDS rounds, each running the reference client then cairn-load for
# DURATION (alternating, so drift on the machine hits both). Per tool and operation it takes the
# median over the rounds of p50, p99 and p99.9, and checks the goal:
#
#   cairn-load's figure <= 2 x the reference's + 0.5 ms        (p50, p99 and p99.9; read, update)
#
# Prints every round, the medians and PASS or FAIL per rate. A measurement, not a test: exits 0
# either way (non-zero only when something could not run).
#
#   Benchmarks/generator/latency-accuracy.sh
#   RATES="500 5000" ROUNDS=3 DURATION=10 Benchmarks/generator/latency-accuracy.sh
#
# Environment: RATES ["500 5000"], ROUNDS [3], DURATION [10] (seconds per client per round),
# CONCURRENCY [16] (connections of each client), REDIS_PORT [6399], KEEP=1 (keep the reports),
# BIN_DIR (directory holding cairn-load: no build), SKIP_BUILD=1 (use the existing release build).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="/opt/swift/usr/bin:$PATH"

RATES="${RATES:-500 5000}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
CONCURRENCY="${CONCURRENCY:-16}"
PORT="${REDIS_PORT:-6399}"
KEEP="${KEEP:-0}"
RECORDS=100000

log() { printf '%s\n' "$*" >&2; }
die() { log "latency-accuracy.sh: $*"; exit 1; }

# shellcheck source=../lib/processes.sh
source "$ROOT/Benchmarks/lib/processes.sh"

# shellcheck source=../lib/binaries.sh
source "$ROOT/Benchmarks/lib/binaries.sh"

# bounded CMD...: run CMD in the background (so the traps fire at once), at most 5 minutes.
bounded() {
    local rc=0 pid
    timeout --kill-after=10 300 "$@" </dev/null &
    pid=$!
    RUNNING[$pid]="$1"
    wait "$pid" || rc=$?
    unset "RUNNING[$pid]"
    ((rc == 0)) || die "$1 exited with status $rc"
}

main() {
    [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
    [[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || die "DURATION is whole seconds"
    install_packages redis-server redis-server python3 python3 redis-cli redis-tools
    release_binaries cairn-load
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/cairn-gen-acc.XXXXXX")"
    mkdir -p "$WORK/data" "$WORK/json"

    echo "== cairn-load latency accuracy against Redis, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) CPUs, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), Linux $(uname -r)"
    echo "cairn:   $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')   redis: $(redis-server --version | awk '{ print $3 }' | sed 's/^v=//')   python: $(python3 --version | awk '{ print $2 }')"
    echo "rates: $RATES   rounds: $ROUNDS x ${DURATION}s per client   connections: $CONCURRENCY"
    echo
    require_free "127.0.0.1:$PORT"
    start redis "$WORK/redis.log" redis-server --bind 127.0.0.1 --port "$PORT" --save '' --appendonly no \
        --daemonize no --dir "$WORK/data"
    wait_ready redis "$STARTED_PID" "$WORK/redis.log" 100 redis-cli -h 127.0.0.1 -p "$PORT" ping
    local target="redis://127.0.0.1:$PORT"
    bounded "$BIN/cairn-load" load --target "$target" --records "$RECORDS" --value-size 100 --concurrency 50 >/dev/null

    local rate round
    for rate in $RATES; do
        for ((round = 1; round <= ROUNDS; round++)); do
            log "-- rate $rate, round $round: reference client, then cairn-load"
            bounded python3 "$ROOT/Benchmarks/generator/precise_client.py" --port "$PORT" --rate "$rate" \
                --duration "$DURATION" --records "$RECORDS" --connections "$CONCURRENCY" --seed "$round" \
                >"$WORK/json/ref-$rate-$round.json"
            bounded "$BIN/cairn-load" run --target "$target" --workload a --records "$RECORDS" --value-size 100 \
                --concurrency "$CONCURRENCY" --rate "$rate" --duration "${DURATION}s" --seed "$round" \
                --json "$WORK/json/load-$rate-$round.json" >/dev/null 2>&1
        done
    done

    python3 - "$WORK/json" "$RATES" "$ROUNDS" <<'PY'
import json, os, statistics, sys
d, rates, rounds = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
ops, figs = ("read", "update"), ("p50_us", "p99_us", "p999_us")

def figures(path):
    with open(path) as f:
        r = json.load(f)
    return {op: {k: (r["operations"].get(op) or {}).get(k, 0) for k in figs} for op in ops}

def row(cells, w):
    return "  ".join(str(c).ljust(w[i]) if i < 3 else str(c).rjust(w[i]) for i, c in enumerate(cells))

header = ("rate", "client", "round", "read p50", "p99", "p99.9", "update p50", "p99", "p99.9")
lines, verdicts = [], []
for rate in rates:
    per = {"reference": [], "cairn-load": []}
    for n in range(1, rounds + 1):
        per["reference"].append(figures(os.path.join(d, f"ref-{rate}-{n}.json")))
        per["cairn-load"].append(figures(os.path.join(d, f"load-{rate}-{n}.json")))
    med = {}
    for client, runs in per.items():
        for n, f in enumerate(runs, 1):
            lines.append((rate, client, n, *[f"{f[op][k]:,}" for op in ops for k in figs]))
        med[client] = {op: {k: statistics.median(r[op][k] for r in runs) for k in figs} for op in ops}
        lines.append((rate, client, "median", *[f"{med[client][op][k]:,.0f}" for op in ops for k in figs]))
    misses = []
    for op in ops:
        for k in figs:
            ref, got = med["reference"][op][k], med["cairn-load"][op][k]
            bound = 2 * ref + 500
            if got > bound:
                misses.append(f"{op} {k[:-3]} {got:,.0f} µs > 2 x {ref:,.0f} + 500")
    verdicts.append((rate, misses))

w = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
print("latencies in µs from each request's intended start (open loop); median over the rounds")
print()
print(row(header, w))
print("  ".join("-" * x for x in w))
for l in lines:
    print(row(l, w))
print()
print("goal: cairn-load <= 2 x reference + 0.5 ms for p50, p99 and p99.9 of reads and updates")
for rate, misses in verdicts:
    print(f"  {rate:>6} ops/s: " + ("PASS" if not misses else "FAIL (" + "; ".join(misses) + ")"))
print("one run on this machine: a noisy neighbour moves both clients' tails; compare within a run only")
PY
    if [[ "$KEEP" == "1" ]]; then echo; echo "reports: $WORK/json"; fi
}

main
