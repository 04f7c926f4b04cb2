#!/usr/bin/env bash
# Measures the load generator itself: how close cairn-load gets to redis-benchmark against the
# same Redis, in the same run. Redis is fast enough that the client is the bottleneck, so the
# ratio says how much of a core cairn-load wastes per request (on a 2-core machine the client
# and the server share the cores).
#
#   redis-benchmark -p 6399 -c 50 -d 100 -t get,set -n 300000 -q     GET and SET requests/s
#   cairn-load load + run --workload a (50% read, 50% update), 100000 records, 100-byte values,
#     50 connections, 15 s                                           ops/s
#
# Prints the table, the ratio cairn-load / mean(GET, SET) and PASS (>= 0.9) or FAIL. It is a
# measurement, not a test: it exits 0 either way (non-zero only when something could not run).
#
#   Benchmarks/generator/redis-efficiency.sh
#
# Environment: BIN_DIR (directory holding cairn-load: no build), SKIP_BUILD=1 (do not build; use
# `swift build -c release --show-bin-path`), KEEP=1 (keep the JSON report and logs),
# DURATION [15s], REQUESTS [300000] (redis-benchmark -n), REDIS_PORT [6399].
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="/opt/swift/usr/bin:$PATH"

PORT="${REDIS_PORT:-6399}"
DURATION="${DURATION:-15s}"
REQUESTS="${REQUESTS:-300000}"
KEEP="${KEEP:-0}"
THRESHOLD=0.9

log() { printf '%s\n' "$*" >&2; }
die() { log "redis-efficiency.sh: $*"; exit 1; }

REDIS_PID=""
GEN_PID=""
WORK=""

cleanup() {
    local rc=$? pid waited
    trap - EXIT INT TERM
    for pid in $GEN_PID $REDIS_PID; do
        kill -TERM "$pid" 2>/dev/null || continue
        waited=0
        while kill -0 "$pid" 2>/dev/null && ((waited < 100)); do sleep 0.2; waited=$((waited + 1)); done
        if kill -0 "$pid" 2>/dev/null; then log "pid $pid did not stop in 20 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
        wait "$pid" 2>/dev/null || true
        [[ "$pid" == "$REDIS_PID" ]] && log "stopped redis-server (pid $pid)"
    done
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if [[ "$KEEP" == "1" ]]; then rm -rf "$WORK/data"; log "kept $WORK (KEEP=1)"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=../lib/binaries.sh
source "$ROOT/Benchmarks/lib/binaries.sh"

# shellcheck disable=SC2016  # $0/$1 expand in the inner bash
listening() { timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null; }

start_redis() {
    ! listening 127.0.0.1 "$PORT" || die "127.0.0.1:$PORT is already in use; stop whatever listens there first"
    mkdir -p "$WORK/data"
    redis-server --bind 127.0.0.1 --port "$PORT" --save '' --appendonly no --daemonize no \
        --dir "$WORK/data" >"$WORK/redis.log" 2>&1 </dev/null &
    REDIS_PID=$!
    log "started redis-server on 127.0.0.1:$PORT (pid $REDIS_PID)"
    local n=0
    until redis-cli -h 127.0.0.1 -p "$PORT" ping >/dev/null 2>&1; do
        n=$((n + 1))
        kill -0 "$REDIS_PID" 2>/dev/null || { tail -n 20 "$WORK/redis.log" >&2; die "redis-server exited"; }
        ((n < 100)) || { tail -n 20 "$WORK/redis.log" >&2; die "redis-server not ready after 20 s"; }
        sleep 0.2
    done
}

# gen ARGS...: run cairn-load in the background (so the traps fire at once), bounded by 15 min.
gen() {
    local rc=0
    echo "-- cairn-load $*"
    timeout --kill-after=10 900 "$BIN/cairn-load" "$@" </dev/null &
    GEN_PID=$!
    wait "$GEN_PID" || rc=$?
    GEN_PID=""
    ((rc == 0)) || die "cairn-load exited with status $rc"
}

main() {
    [[ "$DURATION" =~ ^[0-9]+$ ]] && DURATION="${DURATION}s"
    install_packages redis-server redis-server python3 python3 redis-benchmark redis-tools
    release_binaries cairn-load
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/cairn-gen-eff.XXXXXX")"

    echo "== cairn-load efficiency against Redis, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) CPUs, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM"
    echo "redis: $(redis-server --version | awk '{ print $3 }' | sed 's/^v=//')"
    echo
    start_redis

    echo "-- redis-benchmark -h 127.0.0.1 -p $PORT -c 50 -d 100 -t get,set -n $REQUESTS -q"
    # -q still draws progress with carriage returns; keep the final lines only.
    redis-benchmark -h 127.0.0.1 -p "$PORT" -c 50 -d 100 -t get,set -n "$REQUESTS" -q </dev/null |
        tr '\r' '\n' | grep -E '^(SET|GET): [0-9.]+ requests per second' | tee "$WORK/redis-benchmark.txt" || true
    local get set
    get="$(awk '/^GET:/ { print $2 }' "$WORK/redis-benchmark.txt")"
    set="$(awk '/^SET:/ { print $2 }' "$WORK/redis-benchmark.txt")"
    [[ -n "$get" && -n "$set" ]] || die "could not read GET and SET requests/s from redis-benchmark"

    redis-cli -h 127.0.0.1 -p "$PORT" flushall >/dev/null
    local target="redis://127.0.0.1:$PORT"
    gen load --target "$target" --records 100000 --value-size 100 --concurrency 50
    gen run --target "$target" --workload a --records 100000 --value-size 100 --concurrency 50 \
        --duration "$DURATION" --json "$WORK/cairn-load-a.json"

    echo
    python3 - "$WORK/cairn-load-a.json" "$get" "$set" "$THRESHOLD" <<'PY'
import json, sys
path, get, set_, threshold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
with open(path) as f:
    r = json.load(f)
ops = r["throughput_ops_per_s"]
errors = sum(v for v in (r.get("errors") or {}).values() if isinstance(v, (int, float)))
rows = [("redis-benchmark GET (-c 50 -d 100)", get), ("redis-benchmark SET (-c 50 -d 100)", set_),
        ("cairn-load run --workload a (-c 50)", ops)]
w = max(len(t) for t, _ in rows)
print(f"{'tool':<{w}}  {'ops/s':>10}")
print(f"{'-' * w}  {'-' * 10}")
for t, v in rows:
    print(f"{t:<{w}}  {v:>10,.0f}")
mean = (get + set_) / 2
ratio = ops / mean if mean else 0.0
print()
print(f"cairn-load / mean(redis-benchmark GET, SET) = {ops:,.0f} / {mean:,.0f} = {ratio:.2f}")
if errors:
    print(f"cairn-load counted {errors:,} errors: {r.get('errors')}")
print(f"{'PASS' if ratio >= threshold else 'FAIL'} (threshold {threshold}; one run on this machine, figures drift between runs)")
PY
}

main
