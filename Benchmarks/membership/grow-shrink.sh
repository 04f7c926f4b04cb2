#!/usr/bin/env bash
# Measures a membership change with data in the cluster (issue 12, "Measure and report"): the time
# to grow 3 -> 4 nodes and to shrink 4 -> 3, the handoff rate, and the p99 of a concurrent
# workload during each transfer against the same workload with no change under way.
#
#   n1..n3   cairnd on 127.0.0.71-73:7401 (HTTP :8401), cluster.members, ring_size 64, n_val 3,
#            one shared cluster.secret_file
#   n4       cairnd on 127.0.0.74:7401, started with cluster.seeds only
#
# One after the other, on one cluster:
#   load      cairn-load load: DATA_BYTES of VALUE_SIZE values (records = DATA_BYTES / VALUE_SIZE)
#   baseline  cairn-load run --workload a --rate RATE for BASELINE, no membership change
#   grow      the same workload runs while n4 starts, `cairn cluster join`, commit; the phase ends
#             when n1 and n4 report 0 pending transfers and n4 valid; the workload is then stopped
#             (SIGINT: it writes its report)
#   shrink    the same again with `cairn cluster leave n4`, commit; ends when n4's cairnd has exited
#             (status 0) and n1 reports 0 pending transfers and n1..n3 valid
# Then one table: seconds (commit -> settled), bytes handed off (the `handoff finished` lines of
# the senders' logs during the phase), MB/s (10^6 B/s), p99 read/update of the workload, and its
# ratio to the baseline; notes give the error kinds and the requests n1..n3 counted other than ok
# (cairn_requests_total). Everything started is stopped by pid on exit, pass or fail.
#
#   Benchmarks/membership/grow-shrink.sh              install what is missing, build (release), run
#   Benchmarks/membership/grow-shrink.sh report DIR   print the table again from DIR (KEEP=1 run)
#
# Environment (defaults in brackets):
#   DATA_BYTES [1GiB]     data loaded before the changes (bytes, or N KiB/MiB/GiB)
#   VALUE_SIZE [8192]     bytes per value
#   RATE [200]            the workload's open-loop rate, operations per second
#   WORKLOAD [a]          cairn-load workload (a = 50 % read, 50 % update)
#   BASELINE [30s]        duration of the baseline run
#   RUN_CONCURRENCY [32]  bound on the workload's requests in flight
#   LOAD_CONCURRENCY [16] workers of the load phase
#   HANDOFF_RATE          handoff.bytes_per_second of every node (default: cairnd's, 32MiB)
#   SEED [42]
#   LOAD_TIMEOUT [3600]   seconds the load may take
#   PHASE_TIMEOUT [1200]  seconds a grow or shrink may take (commit -> settled)
#   KEEP=1                keep the JSON reports and logs (the data dir is removed either way)
#   CAIRN_BIN_DIR         directory holding cairnd, cairn and cairn-load: no build (BIN_DIR too)
#   SKIP_BUILD=1          do not build; use `swift build -c release --show-bin-path`
#
# Figures drift between machines and between runs: only ratios within one run mean anything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="/opt/swift/usr/bin:$PATH"

DATA_BYTES="${DATA_BYTES:-1GiB}"
VALUE_SIZE="${VALUE_SIZE:-8192}"
RATE="${RATE:-200}"
WORKLOAD="${WORKLOAD:-a}"
BASELINE="${BASELINE:-30s}"
RUN_CONCURRENCY="${RUN_CONCURRENCY:-32}"
LOAD_CONCURRENCY="${LOAD_CONCURRENCY:-16}"
HANDOFF_RATE="${HANDOFF_RATE:-}"
SEED="${SEED:-42}"
LOAD_TIMEOUT="${LOAD_TIMEOUT:-3600}"
PHASE_TIMEOUT="${PHASE_TIMEOUT:-1200}"
KEEP="${KEEP:-0}"
BIN_DIR="${CAIRN_BIN_DIR:-${BIN_DIR:-}}"

HOSTS=(127.0.0.71 127.0.0.72 127.0.0.73 127.0.0.74)   # n1..n4
PORT=7401
HTTP_PORT=8401
WARMUP=2        # seconds the workload runs before the change is committed

log() { printf '%s\n' "$*" >&2; }
die() { log "grow-shrink.sh: $*"; exit 1; }
now() { date +%s.%N; }
addr() { echo "${HOSTS[$(($1 - 1))]}:$PORT"; }

# ---------------------------------------------------------------------------------------------
# Report: one table from the files in a directory (also `grow-shrink.sh report DIR`).
# Files: <phase>.json (cairn-load --json), <phase>.rc (its exit status), phases.tsv
# (phase, seconds, bytes moved, transfers finished, note).
report() {
    python3 - "$1" <<'PY'
import json, os, sys

d = sys.argv[1]

def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

def load(name):
    p = os.path.join(d, name + ".json")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def rc(name):
    try:
        return int(open(os.path.join(d, name + ".rc")).read().strip())
    except (OSError, ValueError):
        return None

meta = {}
try:
    for line in open(os.path.join(d, "phases.tsv")):
        f = line.rstrip("\n").split("\t")
        if len(f) >= 5:
            meta[f[0]] = {"seconds": float(f[1]) if f[1] else None, "bytes": int(f[2]) if f[2] else None,
                          "transfers": int(f[3]) if f[3] else None, "note": f[4]}
except OSError:
    pass

def p99_ms(r, op):
    st = ((r or {}).get("operations") or {}).get(op) or {}
    v = num(st.get("p99_us"))
    return None if v is None else v / 1000.0

def errs(r):
    e = (r or {}).get("errors") or {}
    return sum(int(num(v) or 0) for v in e.values()) if isinstance(e, dict) else 0

base = load("baseline")
rows, notes, ratios = [], [], {}
header = ("phase", "seconds", "bytes moved", "MB/s", "p99 read ms", "p99 update ms", "p99 ratio vs baseline", "ops", "errors")

ld = load("load")
if ld:
    secs = num((ld.get("totals") or {}).get("seconds"))
    m = meta.get("load", {})
    b = m.get("bytes")
    rows.append(("load", f"{secs:.1f}" if secs else "-", f"{b:,}" if b else "-",
                 f"{b / secs / 1e6:.1f}" if b and secs else "-", "-", "-", "-",
                 f"{int(num((ld.get('totals') or {}).get('operations')) or 0):,}", f"{errs(ld):,}"))
    if rc("load") not in (None, 0):
        notes.append(f"load: cairn-load exited {rc('load')}")

def fmt(v, f="{:.1f}"):
    return "-" if v is None else f.format(v)

for ph in ("baseline", "grow", "shrink"):
    r = load(ph)
    m = meta.get(ph, {})
    if r is None and not m:
        continue
    pr, pu = p99_ms(r, "read"), p99_ms(r, "update")
    ratio = "-"
    if ph != "baseline" and r is not None:
        br, bu = p99_ms(base, "read"), p99_ms(base, "update")
        rr = pr / br if pr is not None and br else None
        ru = pu / bu if pu is not None and bu else None
        worst = max([x for x in (rr, ru) if x is not None], default=None)
        ratios[ph] = worst
        ratio = f"read {fmt(rr, '{:.2f}x')}, update {fmt(ru, '{:.2f}x')}"
    secs = m.get("seconds")
    if ph == "baseline" and r is not None:
        secs = num((r.get("totals") or {}).get("seconds"))
    b = m.get("bytes")
    mbs = b / secs / 1e6 if b is not None and secs else None
    ops = int(num(((r or {}).get("totals") or {}).get("operations")) or 0)
    rows.append((ph, fmt(secs), "-" if b is None else f"{b:,}", fmt(mbs), fmt(pr, "{:.2f}"), fmt(pu, "{:.2f}"),
                 ratio, f"{ops:,}", f"{errs(r):,}"))
    if r is None:
        notes.append(f"{ph}: no workload report (cairn-load exit {rc(ph)})")
    elif rc(ph) not in (None, 0):
        notes.append(f"{ph}: cairn-load exited {rc(ph)}")
    e = (r or {}).get("errors") or {}
    if isinstance(e, dict) and any(num(v) for v in e.values()):
        notes.append(f"{ph}: errors " + ", ".join(f"{k}={int(v):,}" for k, v in sorted(e.items()) if num(v)))
    for k, ms in sorted(((r or {}).get("error_samples") or {}).items()):
        notes.extend(f"{ph}: {k} error: {msg}" for msg in ms)
    if m.get("transfers") is not None and ph != "baseline":
        notes.append(f"{ph}: {m['transfers']} transfers finished")
    if m.get("note"):
        notes.append(f"{ph}: {m['note']}")

if not rows:
    print(f"no reports in {d}")
    sys.exit(1)

w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
def line(cells):
    return "  ".join(str(c).ljust(w[i]) if i in (0, 6) else str(c).rjust(w[i]) for i, c in enumerate(cells)).rstrip()
print("seconds: load = the load phase; baseline = its run; grow/shrink = commit -> settled (the workload")
print("ran from a few seconds before the commit until then). bytes moved = handoff bytes in the senders' logs;")
print("MB/s = 10^6 bytes/s; p99s are of the open-loop workload (coordinated-omission corrected).")
print()
print(line(header))
print("  ".join("-" * x for x in w))
for r in rows:
    print(line(r))
print()
for n in notes:
    print("note: " + n)
verdict = []
for ph in ("grow", "shrink"):
    v = ratios.get(ph)
    if v is None:
        verdict.append(f"{ph} n/a")
    else:
        verdict.append(f"{ph} {v:.2f}x ({'within' if v <= 1.5 else 'ABOVE'} 1.5x)")
print("p99 during the transfer / baseline, worse of read and update (goal <= 1.5x): " + "; ".join(verdict))
PY
}

if [[ "${1:-}" == "report" ]]; then
    [[ -n "${2:-}" && -d "$2" ]] || die "usage: $0 report DIR"
    report "$2"
    exit $?
fi
[[ $# -eq 0 ]] || die "usage: $0 [report DIR]   (settings come from the environment; see the header)"

# ---------------------------------------------------------------------------------------------
# Processes: every pid started is recorded; the EXIT trap stops what is still running.
KEEP_ON_FAILURE=1   # a failed run keeps its logs
# shellcheck source=../lib/processes.sh
source "$ROOT/Benchmarks/lib/processes.sh"

# to_bytes SIZE: 1073741824, 1GiB, 256MiB, 64KiB -> bytes.
to_bytes() {
    local s=${1// /}
    case "$s" in
    *GiB) echo $((${s%GiB} << 30)) ;;
    *MiB) echo $((${s%MiB} << 20)) ;;
    *KiB) echo $((${s%KiB} << 10)) ;;
    *B) echo $((${s%B})) ;;
    *) echo $((s)) ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# shellcheck source=../lib/binaries.sh
source "$ROOT/Benchmarks/lib/binaries.sh"

machine() {
    local model mem
    model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    mem="$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "== Cairn membership change with data, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) CPUs, ${model:-unknown CPU}, $mem RAM, Linux $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "cairn:   $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
    echo "data:    $DATA_BYTES_N bytes = $RECORDS records x $VALUE_SIZE B (n_val 3: about $((DATA_BYTES_N * 3 >> 20)) MiB stored)"
    echo "cluster: ring_size 64, n_val 3, handoff.bytes_per_second ${HANDOFF_RATE:-32MiB (default)}"
    echo "workload: cairn-load run --workload $WORKLOAD --rate $RATE --concurrency $RUN_CONCURRENCY (baseline $BASELINE)"
    echo
}

# ---------------------------------------------------------------------------------------------
# The cluster.

# node_config I 'cluster.members = ...' | 'cluster.seeds = ...'
node_config() {
    local i=$1 join=$2 h=${HOSTS[$(($1 - 1))]} dir="$WORK/data/n$1"
    mkdir -p "$dir"
    {
        cat <<CONF
# Generated by Benchmarks/membership/grow-shrink.sh; see Docs/configuration.md.
node.name = n$i
node.listen = $h:$PORT
node.http = $h:$HTTP_PORT
node.data_dir = $dir
cluster.name = bench-membership
cluster.ring_size = 64
cluster.n_val = 3
$join
cluster.secret_file = $WORK/cluster.secret
request.timeout = 2s
CONF
        [[ -z "$HANDOFF_RATE" ]] || echo "handoff.bytes_per_second = $HANDOFF_RATE"
    } >"$WORK/conf/n$i.conf"
    "$BIN/cairnd" --config "$WORK/conf/n$i.conf" --check-config >&2
}

healthy() { curl -fsS --max-time 1 "http://${HOSTS[$(($1 - 1))]}:$HTTP_PORT/health" >/dev/null; }

declare -A NODE_PID=()   # node index -> pid

start_node() {
    local i=$1
    start "cairnd-n$i" "$WORK/logs/n$i.log" "$BIN/cairnd" --config "$WORK/conf/n$i.conf"
    NODE_PID[$i]=$STARTED_PID
}

cairn() { "$BIN/cairn" --node "$(addr "$1")" --timeout 5000 "${@:2}"; }

# status I: node i's `cluster status --json`, or nothing.
status() { "$BIN/cairn" --node "$(addr "$1")" --timeout 2000 cluster status --json 2>/dev/null || true; }

# settled STATUS_JSON NAME...: exactly these members, all valid, no transfer pending.
settled() {
    local json=$1
    shift
    [[ -n "$json" ]] || return 1
    jq -e --arg want "$*" '.pending_transfers == 0
        and ([.members[].name] | sort | join(" ")) == $want
        and all(.members[]; .status == "valid")' <<<"$json" >/dev/null 2>&1
}

pending() { jq -r '.pending_transfers // "?"' <<<"${1:-null}" 2>/dev/null || echo "?"; }

# elapsed T0 T1: T1 - T0 in seconds, 3 decimals.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

start_cluster() {
    local i members=() list
    for i in 1 2 3 4; do require_free "$(addr "$i")" "${HOSTS[$((i - 1))]}:$HTTP_PORT"; done
    # The shared secret, as Deploy/local-cluster.sh makes it: 32 random bytes as hex, 0600.
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/cluster.secret")
    for i in 1 2 3; do members+=("n$i@$(addr "$i")"); done
    list="$(IFS=,; echo "${members[*]}")"
    for i in 1 2 3; do node_config "$i" "cluster.members = $list"; done
    for i in 1 2 3; do start_node "$i"; done
    for i in 1 2 3; do wait_ready "cairnd-n$i" "${NODE_PID[$i]}" "$WORK/logs/n$i.log" 150 healthy "$i"; done
    # Every member alive in n1's view before any data goes in.
    local n=0 s
    until s="$(status 1)" && settled "$s" n1 n2 n3 &&
        jq -e 'all(.members[]; .liveness == "alive")' <<<"$s" >/dev/null 2>&1; do
        n=$((n + 1))
        ((n < 60)) || die "n1..n3 not all valid and alive after 30 s: $(status 1)"
        sleep 0.5
    done
    log "  n1..n3 form the cluster"
    members_line
}

# ---------------------------------------------------------------------------------------------
# The workload.

FAILED=0
TARGET=""
RUN_ARGS=()

# load_data: cairn-load load, bounded by LOAD_TIMEOUT.
load_data() {
    local rc=0 pid
    echo "-- load: cairn-load load --records $RECORDS --value-size $VALUE_SIZE --concurrency $LOAD_CONCURRENCY"
    timeout --kill-after=10 "$LOAD_TIMEOUT" "$BIN/cairn-load" load --target "$TARGET" --records "$RECORDS" \
        --value-size "$VALUE_SIZE" --concurrency "$LOAD_CONCURRENCY" --seed "$SEED" --json "$WORK/json/load.json" \
        >"$WORK/logs/load.out" 2>"$WORK/logs/load.err" </dev/null &
    pid=$!
    RUNNING[$pid]="cairn-load (load)"
    wait "$pid" || rc=$?
    unset "RUNNING[$pid]"
    echo "$rc" >"$WORK/json/load.rc"
    printf 'load\t\t%s\t\t\n' "$((RECORDS * VALUE_SIZE))" >>"$WORK/json/phases.tsv"
    ((rc != 124)) || die "the load did not finish within LOAD_TIMEOUT=$LOAD_TIMEOUT s (log $WORK/logs/load.err)"
    ((rc == 0)) || die "cairn-load load exited with status $rc: $(tail -n 5 "$WORK/logs/load.err")"
    echo "-- load: $(jq -r '"\(.totals.seconds | floor) s, \(.throughput_ops_per_s | floor) records/s, \(.totals.errors) errors"' "$WORK/json/load.json")"
}

# workload_start PHASE DURATION: the workload in the background; WORKLOAD_PID.
workload_start() {
    local phase=$1 duration=$2
    start "cairn-load ($phase)" "$WORK/logs/$phase.out" "$BIN/cairn-load" run --target "$TARGET" \
        "${RUN_ARGS[@]}" --duration "$duration" --json "$WORK/json/$phase.json"
    WORKLOAD_PID=$STARTED_PID
}

# workload_finish PHASE [stop]: SIGINT it (it ends early and writes its report) if asked, wait for it
# (bounded), record its status.
workload_finish() {
    local phase=$1 how=${2:-} pid=$WORKLOAD_PID n=0 rc=0
    if [[ "$how" == stop ]] && alive "$pid"; then kill -INT "$pid" 2>/dev/null || true; fi
    while alive "$pid"; do
        n=$((n + 1))
        if ((n == 150)); then log "  cairn-load ($phase) still running 30 s after SIGINT: SIGTERM"; kill -TERM "$pid" 2>/dev/null || true; fi
        if ((n == 250)); then log "  cairn-load ($phase) still running: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
        sleep 0.2
    done
    wait "$pid" || rc=$?
    unset "RUNNING[$pid]"
    echo "$rc" >"$WORK/json/$phase.rc"
    if ((rc != 0)); then
        echo "-- $phase: cairn-load exited with status $rc (log $WORK/logs/$phase.out)"
        FAILED=1
    fi
    [[ -s "$WORK/json/$phase.json" ]] || { echo "-- $phase: cairn-load wrote no report"; FAILED=1; }
}

baseline() {
    echo "-- baseline: cairn-load run ${RUN_ARGS[*]} --duration $BASELINE (no membership change)"
    outcomes 1 2 3 >"$WORK/json/baseline.outcomes0"
    workload_start baseline "$BASELINE"
    local limit=$((${BASELINE%s} + 120)) n=0
    while alive "$WORKLOAD_PID"; do
        n=$((n + 1))
        ((n < limit)) || { log "  the baseline run did not end within $limit s: stopping it"; break; }
        sleep 1
    done
    workload_finish baseline stop
    outcomes 1 2 3 >"$WORK/json/baseline.outcomes1"
    printf 'baseline\t\t\t\trequests n1..n3 counted not ok: %s\n' \
        "$(outcomes_note "$WORK/json/baseline.outcomes0" "$WORK/json/baseline.outcomes1")" >>"$WORK/json/phases.tsv"
}

# Log offsets of every node's log at the start of a phase, and the handoff bytes since then.
declare -A LOG_OFFSET=()
mark_logs() {
    local i
    for i in 1 2 3 4; do LOG_OFFSET[$i]=$(stat -c %s "$WORK/logs/n$i.log" 2>/dev/null || echo 0); done
}
# handoff_since: "bytes transfers" of the `handoff finished` lines logged since mark_logs.
handoff_since() {
    local i
    for i in 1 2 3 4; do
        [[ -f "$WORK/logs/n$i.log" ]] || continue
        tail -c +"$((LOG_OFFSET[$i] + 1))" "$WORK/logs/n$i.log"
    done | awk '/handoff finished/ {
            if (match($0, /bytes=[0-9]+/)) { b += substr($0, RSTART + 6, RLENGTH - 6) } n++ }
        END { printf "%d %d\n", b, n }'
}
# metric_bytes I...: sum of cairn_handoff_bytes_total of the nodes (those that answer).
metric_bytes() {
    local i sum=0 v
    for i in "$@"; do
        v="$(curl -fsS --max-time 2 "http://${HOSTS[$((i - 1))]}:$HTTP_PORT/metrics" 2>/dev/null |
            awk '$1 == "cairn_handoff_bytes_total" { printf "%d", $2 }')" || v=0
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}

# outcomes I...: the nodes' cairn_requests_total series other than ok and not_found, summed by
# series (op and outcome), one "series value" a line.
outcomes() {
    local i
    for i in "$@"; do
        curl -fsS --max-time 2 "http://${HOSTS[$((i - 1))]}:$HTTP_PORT/metrics" 2>/dev/null || true
    done | awk '/^cairn_requests_total\{/ && !/outcome="(ok|not_found)"/ { v[$1] += $2 }
        END { for (k in v) printf "%s %d\n", k, v[k] }'
}
# outcomes_note BEFORE AFTER: "put error=3, get not_reached=1" (what the nodes counted in between).
outcomes_note() {
    awk 'NR == FNR { b[$1] = $2; next } { d = $2 - b[$1]; if (d > 0) {
            op = $1; sub(/.*op="/, "", op); sub(/".*/, "", op)
            oc = $1; sub(/.*outcome="/, "", oc); sub(/".*/, "", oc)
            out = out (out == "" ? "" : ", ") op " " oc "=" d } }
        END { print (out == "" ? "none" : out) }' "$1" "$2"
}

# wait_phase NAME CHECK: call CHECK every second until it succeeds; fail after PHASE_TIMEOUT.
# Progress every 10 s. The workload is stopped (with its report) either way.
wait_phase() {
    local name=$1 check=$2 start=$SECONDS next=$((SECONDS + 10)) s
    until $check; do
        if ((SECONDS - start >= PHASE_TIMEOUT)); then
            workload_finish "$name" stop
            s="$(status 1)"
            log "$name: not settled after PHASE_TIMEOUT=$PHASE_TIMEOUT s: n1 reports $(pending "$s") pending transfers"
            cairn 1 transfers >&2 || true
            printf '%s\t\t\t\tdid not settle within %s s\n' "$name" "$PHASE_TIMEOUT" >>"$WORK/json/phases.tsv"
            KEEP=1
            die "$name did not complete; logs kept in $WORK/logs"
        fi
        if ((SECONDS >= next)); then
            s="$(status 1)"
            log "  $name: $((SECONDS - start)) s, n1 reports $(pending "$s") pending transfers"
            next=$((SECONDS + 10))
        fi
        sleep 1
    done
}

grown() { settled "$(status 1)" n1 n2 n3 n4 && settled "$(status 4)" n1 n2 n3 n4; }

# n4 has exited and nothing is pending; n1 may still list it as exiting until its failure detector
# holds it dead (that wait is not part of the handoff).
shrunk() {
    if alive "${NODE_PID[4]}"; then return 1; fi
    local s
    s="$(status 1)"
    [[ -n "$s" ]] && jq -e '.pending_transfers == 0
        and ([.members[] | select(.name != "n4") | .name] | sort) == ["n1", "n2", "n3"]
        and all(.members[] | select(.name != "n4"); .status == "valid")' <<<"$s" >/dev/null 2>&1
}

grow() {
    echo "-- grow 3 -> 4: n4 starts with cluster.seeds, joins, n1 commits; the workload runs throughout"
    node_config 4 "cluster.seeds = $(addr 1),$(addr 2),$(addr 3)"
    outcomes 1 2 3 >"$WORK/json/grow.outcomes0"
    workload_start grow "$((PHASE_TIMEOUT + 120))s"
    sleep "$WARMUP"
    start_node 4
    wait_ready cairnd-n4 "${NODE_PID[4]}" "$WORK/logs/n4.log" 150 \
        "$BIN/cairn" --node "$(addr 4)" --timeout 1000 cluster status --json
    cairn 4 cluster join "$(addr 1)" >&2 || die "cairn cluster join failed"
    local n=0
    until [[ "$(status 1 | jq -r '.staged | join(",")' 2>/dev/null)" == "join n4" ]]; do
        n=$((n + 1))
        ((n < 60)) || die "n1 does not list 'join n4' as staged after 30 s: $(status 1)"
        sleep 0.5
    done
    mark_logs
    local m0 t0 t1 commit
    m0="$(metric_bytes 1 2 3)"
    t0="$(now)"
    commit="$(cairn 1 cluster commit --json)" || die "cairn cluster commit failed"
    echo "   committed: ring version $(jq -r .ring_version <<<"$commit"), $(jq -r .pending_transfers <<<"$commit") transfers"
    wait_phase grow grown
    t1="$(now)"
    workload_finish grow stop
    local moved m1
    moved="$(handoff_since)"
    m1="$(metric_bytes 1 2 3)"
    outcomes 1 2 3 >"$WORK/json/grow.outcomes1"
    printf 'grow\t%s\t%s\t%s\tcairn_handoff_bytes_total on n1..n3 grew by %s; requests n1..n3 counted not ok: %s\n' \
        "$(elapsed "$t0" "$t1")" "${moved% *}" "${moved#* }" "$((m1 - m0))" \
        "$(outcomes_note "$WORK/json/grow.outcomes0" "$WORK/json/grow.outcomes1")" >>"$WORK/json/phases.tsv"
    echo "   settled: $(elapsed "$t0" "$t1") s, ${moved% *} bytes in ${moved#* } transfers"
    members_line
}

# members_line: each member's partitions in n1's view (owned as primary, replicated).
members_line() {
    echo "   members: $(status 1 | jq -r '[.members[] | "\(.name) \(.status) owns \(.owned) replicates \(.replicated)"] | join("; ")' 2>/dev/null || echo '?')"
}

shrink() {
    echo "-- shrink 4 -> 3: n1 stages n4's leave and commits; the workload runs throughout"
    outcomes 1 2 3 >"$WORK/json/shrink.outcomes0"
    workload_start shrink "$((PHASE_TIMEOUT + 120))s"
    sleep "$WARMUP"
    cairn 1 cluster leave n4 >&2 || die "cairn cluster leave n4 failed"
    mark_logs
    local t0 t1 commit rc=0
    t0="$(now)"
    commit="$(cairn 1 cluster commit --json)" || die "cairn cluster commit failed"
    echo "   committed: ring version $(jq -r .ring_version <<<"$commit"), $(jq -r .pending_transfers <<<"$commit") transfers"
    wait_phase shrink shrunk
    t1="$(now)"
    workload_finish shrink stop
    wait "${NODE_PID[4]}" || rc=$?
    unset "RUNNING[${NODE_PID[4]}]"
    local moved note="n4's cairnd exited with status $rc"
    moved="$(handoff_since)"
    if ((rc != 0)); then FAILED=1; note="$note (expected 0; log $WORK/logs/n4.log)"; fi
    outcomes 1 2 3 >"$WORK/json/shrink.outcomes1"
    note="$note; requests n1..n3 counted not ok: $(outcomes_note "$WORK/json/shrink.outcomes0" "$WORK/json/shrink.outcomes1")"
    printf 'shrink\t%s\t%s\t%s\t%s\n' "$(elapsed "$t0" "$t1")" "${moved% *}" "${moved#* }" "$note" >>"$WORK/json/phases.tsv"
    echo "   settled: $(elapsed "$t0" "$t1") s, ${moved% *} bytes in ${moved#* } transfers; $note"
    members_line
}

main() {
    [[ "$BASELINE" =~ ^[0-9]+$ ]] && BASELINE="${BASELINE}s"
    [[ "$BASELINE" =~ ^[0-9]+s$ ]] || die "BASELINE must be seconds, e.g. 30s"
    DATA_BYTES_N="$(to_bytes "$DATA_BYTES")" || die "DATA_BYTES '$DATA_BYTES' is not a size"
    RECORDS=$((DATA_BYTES_N / VALUE_SIZE))
    ((RECORDS >= 1)) || die "DATA_BYTES $DATA_BYTES is smaller than one VALUE_SIZE value"
    install_deps
    build
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/cairn-grow-shrink.XXXXXX")"
    mkdir -p "$WORK/json" "$WORK/logs" "$WORK/data" "$WORK/conf"
    # Three replicas, a fourth node's copy, and room for the engine's compactions.
    local need=$((DATA_BYTES_N * 5 >> 20)) avail
    avail=$(($(df -Pk "$WORK" | awk 'NR == 2 { print $4 }') >> 10))
    ((avail >= need)) || die "$WORK has $avail MiB free; this run needs about $need MiB (5 x DATA_BYTES)"
    machine
    TARGET="cairn://$(addr 1),$(addr 2),$(addr 3)"
    RUN_ARGS=(--workload "$WORKLOAD" --rate "$RATE" --concurrency "$RUN_CONCURRENCY" --records "$RECORDS"
        --value-size "$VALUE_SIZE" --seed "$SEED")
    echo "-- starting n1..n3 on $(addr 1)..$(addr 3), data in $WORK/data"
    start_cluster
    load_data
    baseline
    grow
    shrink
    echo
    echo "== results"
    report "$WORK/json"
    if [[ "$KEEP" == "1" ]]; then echo; echo "reports: $WORK/json   logs: $WORK/logs"; fi
    ((FAILED == 0)) || { echo; echo "something failed (see above); logs kept in $WORK/logs"; exit 1; }
}

main
