#!/usr/bin/env bash
# Measures what a memtable flush does to request latency (issue 15, "find the tail's causes"):
# a three-node cluster serves an open-loop workload while every node writes its memtable out as
# a table, and the seconds around the flushes are compared with the calm seconds of the same run.
#
#   n1..n3   cairnd on 127.0.0.91-93:7401 (HTTP :8401), ring_size 256, n_val 3, R = W = 2,
#            sync always, storage.write_buffer_bytes WRITE_BUFFER (a memtable is flushed at half)
#
# One after the other, on one cluster:
#   load     cairn-load load --records RECORDS
#   fill     cairn-load run --workload write-only in steps until the fullest memtable is within
#            MARGIN of the flush point (cairn_storage_memtable_bytes, polled between steps)
#   measure  cairn-load run --workload WORKLOAD --rate RATE for DURATION (one progress line a
#            second), while every node's cairn_storage_immutable_memtable_bytes (non-zero from
#            the memtable's freeze until its table is installed) and cairn_storage_flushes are
#            polled every 0.25 s (a flush shorter than a poll shows in the count); a flush
#            second is one a flush overlapped, or the one after it
# Then one table: p99 of reads and updates in the flush seconds and in the calm seconds, their
# ratio (the peer: the same cluster a few seconds earlier or later), and the worst second.
# Everything started is stopped by pid on exit, pass or fail.
#
#   Benchmarks/storage/flush-latency.sh          install what is missing, build (release), run
#
# Environment (defaults in brackets):
#   RECORDS [50000]        records loaded first       VALUE_SIZE [100]   bytes per value
#   WRITE_BUFFER [64MiB]   storage.write_buffer_bytes of every node
#   MARGIN [4MiB]          how far below the flush point the measured run starts
#   RATE [1000]  DURATION [40s]  WORKLOAD [a]         the measured open-loop run
#   STORAGE_EXTRA          extra "key = value" lines for every node's configuration, ';'-separated
#   SEED [42]  KEEP=1 (keep reports and logs)
#   CAIRN_BIN_DIR / BIN_DIR  directory holding cairnd, cairn and cairn-load: no build
#   SKIP_BUILD=1           do not build; use `swift build -c release --show-bin-path`
#
# Figures drift between machines and between runs: only ratios within one run mean anything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="/opt/swift/usr/bin:$PATH"

RECORDS="${RECORDS:-50000}"
VALUE_SIZE="${VALUE_SIZE:-100}"
WRITE_BUFFER="${WRITE_BUFFER:-64MiB}"
MARGIN="${MARGIN:-4MiB}"
RATE="${RATE:-1000}"
DURATION="${DURATION:-40s}"
WORKLOAD="${WORKLOAD:-a}"
STORAGE_EXTRA="${STORAGE_EXTRA:-}"
SEED="${SEED:-42}"
KEEP="${KEEP:-0}"
BIN_DIR="${CAIRN_BIN_DIR:-${BIN_DIR:-}}"

HOSTS=(127.0.0.91 127.0.0.92 127.0.0.93)
PORT=7401
HTTP_PORT=8401

log() { printf '%s\n' "$*" >&2; }
die() { log "flush-latency.sh: $*"; exit 1; }

KEEP_ON_FAILURE=1
# shellcheck source=../lib/processes.sh
source "$ROOT/Benchmarks/lib/processes.sh"
# shellcheck source=../lib/binaries.sh
source "$ROOT/Benchmarks/lib/binaries.sh"
# shellcheck source=../lib/load.sh
source "$ROOT/Benchmarks/lib/load.sh"

# bytes SIZE: "64MiB", "512KiB" or a plain number of bytes.
bytes() {
    case "$1" in
    *GiB) echo $((${1%GiB} << 30)) ;; *MiB) echo $((${1%MiB} << 20)) ;; *KiB) echo $((${1%KiB} << 10)) ;; *) echo "$1" ;;
    esac
}

# metric I NAME: node I's value of the unlabelled metric NAME (0 when absent).
metric() {
    curl -fsS --max-time 2 "http://${HOSTS[$(($1 - 1))]}:$HTTP_PORT/metrics" 2>/dev/null |
        awk -v m="$2" '$1 == m { v = $2 } END { printf "%d", v + 0 }'
}

# flushes: cairn_storage_flushes summed over n1..n3.
flushes() { echo $(($(metric 1 cairn_storage_flushes) + $(metric 2 cairn_storage_flushes) + $(metric 3 cairn_storage_flushes))); }

# fullest_memtable: the largest cairn_storage_memtable_bytes of n1..n3.
fullest_memtable() {
    local i v max=0
    for i in 1 2 3; do
        v="$(metric "$i" cairn_storage_memtable_bytes)"
        ((v > max)) && max=$v
    done
    echo "$max"
}

# node_state I: "frozen/flushes" of node I: bytes of the memtable being flushed (0: none) and
# the flushes so far.
node_state() {
    curl -fsS --max-time 2 "http://${HOSTS[$(($1 - 1))]}:$HTTP_PORT/metrics" 2>/dev/null |
        awk '$1 == "cairn_storage_immutable_memtable_bytes" { f = $2 } $1 == "cairn_storage_flushes" { n = $2 }
             END { printf "%d/%d", f + 0, n + 0 }'
}

# flush_poller FILE T0: appends "seconds-since-T0 state(n1) state(n2) state(n3)" every 0.25 s.
flush_poller() {
    local file=$1 t0=$2
    while :; do
        echo "$(elapsed "$t0" "$(now)") $(node_state 1) $(node_state 2) $(node_state 3)" >>"$file"
        sleep 0.25
    done
}

main() {
    install_deps
    build
    WORK="$(mktemp -d /tmp/cairn-bench-flush.XXXXXX)"
    mkdir -p "$WORK/conf" "$WORK/logs" "$WORK/json" "$WORK/data"
    local i members=() buffer margin
    buffer="$(bytes "$WRITE_BUFFER")"
    margin="$(bytes "$MARGIN")"
    for i in 1 2 3; do require_free "$(addr "$i")" "${HOSTS[$((i - 1))]}:$HTTP_PORT"; done
    for i in 1 2 3; do members+=("n$i@$(addr "$i")"); done
    for i in 1 2 3; do
        mkdir -p "$WORK/data/n$i"
        {
            echo "# Generated by Benchmarks/storage/flush-latency.sh; see Docs/configuration.md."
            echo "node.name = n$i"
            echo "node.listen = $(addr "$i")"
            echo "node.http = ${HOSTS[$((i - 1))]}:$HTTP_PORT"
            echo "node.data_dir = $WORK/data/n$i"
            echo "cluster.name = bench-flush"
            echo "cluster.ring_size = 256"
            echo "cluster.n_val = 3"
            echo "cluster.members = $(IFS=,; echo "${members[*]}")"
            echo "request.timeout = 2s"
            echo "storage.sync = always"
            echo "storage.write_buffer_bytes = $buffer"
            [[ -z "$STORAGE_EXTRA" ]] || tr ';' '\n' <<<"$STORAGE_EXTRA"
        } >"$WORK/conf/n$i.conf"
        "$BIN/cairnd" --config "$WORK/conf/n$i.conf" --check-config >&2
    done
    declare -A pids=()
    for i in 1 2 3; do
        start "cairnd-n$i" "$WORK/logs/n$i.log" "$BIN/cairnd" --config "$WORK/conf/n$i.conf"
        pids[$i]=$STARTED_PID
    done
    healthy() { curl -fsS --max-time 1 "http://${HOSTS[$(($1 - 1))]}:$HTTP_PORT/health" >/dev/null; }
    for i in 1 2 3; do wait_ready "cairnd-n$i" "${pids[$i]}" "$WORK/logs/n$i.log" 150 healthy "$i"; done
    TARGET="cairn://$(addr 1),$(addr 2),$(addr 3)"
    echo "== Cairn: request latency across a memtable flush, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) CPUs, $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM; cairn $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "workload: cairn-load run --workload $WORKLOAD --rate $RATE for $DURATION, $RECORDS records of $VALUE_SIZE B; memtables flushed at $((buffer / 2 >> 20)) MiB${STORAGE_EXTRA:+; $STORAGE_EXTRA}"
    echo

    run_load load "$TARGET" "$RECORDS"
    # Fill in steps sized from the growth of the last one, so the last step stops within MARGIN.
    local goal=$((buffer / 2 - margin)) full step=20000 before after flushes0 n=0
    flushes0="$(flushes)"
    full="$(fullest_memtable)"
    while ((full < goal)); do
        n=$((n + 1))
        ((n < 200)) || die "the memtables did not fill: $full of $goal bytes after $n steps"
        before=$full
        "$BIN/cairn-load" run --target "$TARGET" --records "$RECORDS" --workload write-only --operations "$step" --concurrency 32 \
            --value-size "$VALUE_SIZE" --seed "$((SEED + n))" --r 2 --w 2 --json "$WORK/json/fill-$n.json" \
            >"$WORK/logs/fill-$n.out" 2>&1 </dev/null || die "fill step $n failed: $(tail -n 5 "$WORK/logs/fill-$n.out")"
        after="$(fullest_memtable)"
        [[ "$(flushes)" == "$flushes0" ]] || die "a memtable was flushed while filling; raise MARGIN"
        full=$after
        # Bytes per operation on the fullest node; the next step aims at the goal's halfway point.
        local per=$(((after - before) / step + 1))
        step=$(((goal - full) / per / 2 + 1000))
        ((step <= 200000)) || step=200000
    done
    log "  memtables filled to $full bytes (flush at $((buffer / 2)))"

    local t0 poller
    : >"$WORK/json/flushes.txt"
    t0="$(now)"
    flush_poller "$WORK/json/flushes.txt" "$t0" &
    poller=$!
    RUNNING[$poller]="flush poller"
    "$BIN/cairn-load" run --target "$TARGET" --records "$RECORDS" --workload "$WORKLOAD" --rate "$RATE" --concurrency 64 \
        --value-size "$VALUE_SIZE" --seed "$SEED" --duration "$DURATION" --r 2 --w 2 --json "$WORK/json/measure.json" \
        >"$WORK/logs/measure.out" 2>&1 </dev/null || die "the measured run failed: $(tail -n 5 "$WORK/logs/measure.out")"
    kill "$poller" 2>/dev/null || true
    wait "$poller" 2>/dev/null || true
    unset "RUNNING[$poller]"

    python3 - "$WORK/logs/measure.out" "$WORK/json/flushes.txt" "$WORK/json/measure.json" <<'PY'
import json, re, sys
progress, flushes, report = sys.argv[1:4]
seconds = {}
for line in open(progress):
    m = re.match(r"\[\s*(\d+)s\]\s+(\d+) ops/s(.*)", line)
    if not m:
        continue
    s = int(m.group(1))
    ops = {op: (int(p50), int(p99)) for op, p50, p99 in re.findall(r"(\w+) p50 (\d+)µs p99 (\d+)µs", m.group(3))}
    seconds[s] = (int(m.group(2)), ops)
# Flushes: (node, first poll that saw a frozen memtable — or, for one no poll saw, the poll
# before its count rose —, the poll at which its count rose). Progress second s covers
# (s-1, s]; a flush overlaps every second from its start to its end.
flushes_seen, started, count, last_t = [], {}, {}, 0.0
for line in open(flushes):
    parts = line.split()
    if len(parts) != 4:
        continue
    t = float(parts[0])
    for node, v in enumerate(parts[1:], 1):
        frozen, n = (int(x) for x in v.split("/"))
        if node in count and n > count[node]:
            flushes_seen.append((node, started.pop(node, last_t), t))
        count[node] = n
        if frozen > 0 and node not in started:
            started[node] = t
    last_t = t
flushes_seen += [(node, t, None) for node, t in started.items()]
flush_seconds = set()
for _, a, b in flushes_seen:
    end = b if b is not None else max(seconds, default=0)
    flush_seconds.update(range(int(a) + 1, int(end) + 3))
describe = lambda n, a, b: f"n{n} {a:.2f}-{b:.2f} s" if b is not None else f"n{n} from {a:.2f} s"
def worst(sel, op):
    v = [seconds[s][1][op][1] for s in sel if op in seconds[s][1]]
    return max(v) / 1000.0 if v else None
def median(sel, op):
    v = sorted(seconds[s][1][op][1] for s in sel if op in seconds[s][1])
    return v[len(v) // 2] / 1000.0 if v else None
flushed = sorted(s for s in seconds if s in flush_seconds)
calm = sorted(s for s in seconds if s not in flush_seconds)
f = lambda v: "-" if v is None else f"{v:.2f}"
print("second  ops/s  read p99 ms  update p99 ms  flush")
for s in sorted(seconds):
    ops = seconds[s][1]
    mark = ", ".join(describe(n, a, b) for n, a, b in flushes_seen if int(a) + 1 == s)
    print(f"{s:6d} {seconds[s][0]:6d} {f(ops.get('read', (0, None))[1] and ops['read'][1] / 1000):>12} "
          f"{f(ops.get('update', (0, None))[1] and ops['update'][1] / 1000):>14}  {mark}")
print()
rows = []
for op in ("read", "update"):
    c, w, m = median(calm, op), worst(flushed, op), worst(calm, op)
    rows.append((op, f(c), f(m), f(w), "-" if not (c and w) else f"{w / c:.1f}x"))
hdr = ("op", "calm p99 ms (median s)", "calm p99 ms (worst s)", "flush p99 ms (worst s)", "worst flush s / median calm s")
w = [max(len(x) for x in col) for col in zip(hdr, *rows)]
print("  ".join(h.rjust(w[i]) if i else h.ljust(w[i]) for i, h in enumerate(hdr)))
for r in rows:
    print("  ".join(x.rjust(w[i]) if i else x.ljust(w[i]) for i, x in enumerate(r)))
print()
print(f"flushes during the run: {len(flushes_seen)} ({', '.join(describe(*x) for x in flushes_seen) or 'none: raise DURATION or lower MARGIN'})")
try:
    r = json.load(open(report))
    for op in ("read", "update"):
        o = r["operations"].get(op)
        if o:
            print(f"whole run {op}: p50 {o['p50_us'] / 1000:.2f} ms, p99 {o['p99_us'] / 1000:.2f} ms, p99.9 {o['p999_us'] / 1000:.2f} ms, max {o['max_us'] / 1000:.2f} ms")
    if any((r.get("errors") or {}).values()):
        print("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(r["errors"].items()) if v))
except (OSError, ValueError, KeyError):
    print("no report from the measured run")
PY
}

main "$@"
