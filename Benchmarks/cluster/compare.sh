#!/usr/bin/env bash
# Measures Cairn against its peers in one run on this machine, with the same generator
# (cairn-load) and the same workload for every system:
#
#   redis           Redis, one node, no persistence            redis://127.0.0.1:6399
#   redis-aof       Redis, one node, appendfsync always         redis://127.0.0.1:6399
#   cairn-1         Cairn, one node (n_val = 1, sync always)   cairn://127.0.0.61:7401
#   cairn-1-nosync  Cairn, one node (n_val = 1, sync none)     cairn://127.0.0.61:7401
#   etcd-3          etcd 3.4, three nodes (Raft)               etcd://127.0.0.1:23791,23792,23793
#   cairn-3         Cairn, three nodes (n_val = 3, R = W = 2, sync always)
#                                                              cairn://127.0.0.62-64:7401
#
# For each system, one after the other: start it (loopback only, data in a fresh temp dir),
# wait until it is ready, `cairn-load load`, `cairn-load run --workload a`, `--workload c`,
# stop it. Then one table from the JSON reports, and the ops/s ratios against the peers:
# cairn-1 / redis-aof (both durable), cairn-1-nosync / redis (neither), cairn-3 / etcd-3.
# Columns beside throughput and latency:
#   cpu µs/op    server CPU per operation: utime+stime of every server process of the system
#                (/proc/PID/stat, before and after the cairn-load run) / operations cairn-load
#                completed (errors included), all nodes summed
#   switches/op  context switches per operation, every thread of every server process summed
#                (voluntary + involuntary, /proc/PID/task/*/status, sampled each second so a
#                thread that exits during the run keeps what it counted until its last second):
#                each is a thread that went to sleep or was preempted, so it counts the thread
#                crossings a request makes
#   steal %      share of the machine's CPU time the hypervisor gave to other guests during the
#                run (/proc/stat): on a shared VM, a run with a high figure ran on less machine
# Before the systems, the disk's log-sync latency is probed in the same directory as their data
# (disk-sync.txt, printed with the tables; Benchmarks/storage/log-sync.py probe): a 300-byte record
# written into a file zeroed ahead and `fdatasync`ed, as Cairn's log does, 1,000 times by one
# writer and then by three at once (the
# three-node systems share this disk, and each node syncs its own log). Every durable system here
# waits for these syncs, so the figures say how much of a run's latency is the disk's.
# With LATENCY=1, each system then also runs workload a in an open loop (`--rate`, OPEN_CONCURRENCY
# sessions, DURATION) at RATE ops/s and at half the ops/s its closed-loop workload a reached
# (its peak on this machine), and a second table gives read and update latency and the servers'
# and the generator's CPU per operation at each rate, with the latency goals checked for cairn-3.
# Everything started is stopped by pid on exit, pass or fail.
#
#   Benchmarks/cluster/compare.sh                 install what is missing, build (release), run
#   Benchmarks/cluster/compare.sh report DIR      print the table again from the JSON files in DIR
#
# Environment (defaults in brackets):
#   RECORDS [100000]  VALUE_SIZE [100] (BYTES or MIN-MAX)  CONCURRENCY [64]  DURATION [20s]
#   OPERATIONS        if set, each run does this many operations instead of running DURATION
#   SEED [42]         same seed for every system
#   REDIS_PORT [6399] Redis port on 127.0.0.1 (when 6399 is taken)
#   SYSTEMS ["redis redis-aof cairn-1 cairn-1-nosync etcd-3 cairn-3"]  a subset to run, in this order
#   KEEP=1            keep the JSON reports and logs (the data dirs are removed either way)
#   LATENCY=1         also the open-loop runs above; RATE [1000] their fixed rate
#   EXTRA_RATES       more fixed rates for the open loop, e.g. "2000 4000": rows of the latency
#                     table without goals, to see how CPU per operation and latency move with load
#   WARMUP [2s]       the open-loop runs first run this long uncounted (cairn-load --warmup, as
#                     wrk2's calibration period): every system's and the generator's first moments
#                     (connections, caches, page faults) are not charged to the rate; 0: none
#   OPEN_CONCURRENCY [256]  requests the open-loop runs may have in flight: enough that the
#                     generator's window is not what holds back requests a stalled server owes
#   RUN_TIMEOUT [900] seconds after which one cairn-load invocation is stopped and counted failed
#   SHARE [cores/3, at least 1]  threads each server of a three-node system gets, sized to its
#                     share of the machine as an operator co-locating three nodes would: Cairn's
#                     node.event_loops and storage.request_threads, etcd's GOMAXPROCS; 0: both at
#                     their defaults (one per core)
#   SHARE_STORE [0 when SHARE is 1, else SHARE]  storage.request_threads of each three-node Cairn
#                     node when SHARE > 0: 0 runs its vnodes on its one event loop (no store
#                     thread; Benchmarks/README.md, "Vnodes on the event loop"), a number gives it
#                     that many store threads
#   SHARE1 [cores - 1, at least 1]  threads the one-node Cairn systems get: the machine less the
#                     generator's one event loop (cairn-load --threads 1), by the same rule as
#                     SHARE (Redis is single-threaded whatever this says); 0: their defaults
#   SHARE1_STORE [0 when SHARE1 is 1, else SHARE1]  storage.request_threads of the one-node Cairn
#                     systems when SHARE1 > 0, by SHARE_STORE's rule: 0 runs the vnodes on the
#                     node's one event loop
#   CAIRN_CONF        extra lines ("key = value", newline-separated) for every Cairn node's
#                     configuration (Docs/configuration.md), e.g. to measure a setting
#   BIN_DIR           directory holding cairnd and cairn-load: no build (default: build them)
#   SKIP_BUILD=1      do not build; use `swift build -c release --show-bin-path`
#
# Figures drift between machines and between runs: only ratios within one run mean anything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="/opt/swift/usr/bin:$PATH"

RECORDS="${RECORDS:-100000}"
VALUE_SIZE="${VALUE_SIZE:-100}"
CONCURRENCY="${CONCURRENCY:-64}"
DURATION="${DURATION:-20s}"
OPERATIONS="${OPERATIONS:-}"
SEED="${SEED:-42}"
SYSTEMS="${SYSTEMS:-redis redis-aof cairn-1 cairn-1-nosync etcd-3 cairn-3}"
KEEP="${KEEP:-0}"
LATENCY="${LATENCY:-0}"
OPEN_CONCURRENCY="${OPEN_CONCURRENCY:-256}"
WARMUP="${WARMUP:-2s}"
[[ "$WARMUP" =~ ^0+(ms|s|m)?$ ]] && WARMUP=0
RATE="${RATE:-1000}"
EXTRA_RATES="${EXTRA_RATES:-}"
for r in $EXTRA_RATES; do [[ "$r" =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: EXTRA_RATES must be whole numbers of ops/s" >&2; exit 1; }; done
RUN_TIMEOUT="${RUN_TIMEOUT:-900}"
CORES="$(nproc)"
SHARE="${SHARE:-$((CORES / 3 > 0 ? CORES / 3 : 1))}"
[[ "$SHARE" =~ ^[0-9]+$ ]] || { echo "compare.sh: SHARE must be a whole number" >&2; exit 1; }
SHARE_STORE="${SHARE_STORE:-$((SHARE == 1 ? 0 : SHARE))}"
[[ "$SHARE_STORE" =~ ^[0-9]+$ ]] || { echo "compare.sh: SHARE_STORE must be a whole number" >&2; exit 1; }
SHARE1="${SHARE1:-$((CORES > 1 ? CORES - 1 : 1))}"
[[ "$SHARE1" =~ ^[0-9]+$ ]] || { echo "compare.sh: SHARE1 must be a whole number" >&2; exit 1; }
SHARE1_STORE="${SHARE1_STORE:-$((SHARE1 == 1 ? 0 : SHARE1))}"
[[ "$SHARE1_STORE" =~ ^[0-9]+$ ]] || { echo "compare.sh: SHARE1_STORE must be a whole number" >&2; exit 1; }

REDIS_PORT="${REDIS_PORT:-6399}"
CAIRN1_HOST=127.0.0.61
CAIRN3_HOSTS=(127.0.0.62 127.0.0.63 127.0.0.64)
CAIRN_PORT=7401
CAIRN_HTTP_PORT=8401
ETCD_CLIENT_PORTS=(23791 23792 23793)
ETCD_PEER_PORTS=(23801 23802 23803)

log() { printf '%s\n' "$*" >&2; }
join_by() { local IFS="$1"; shift; echo "$*"; }
die() { log "compare.sh: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Report: one table from the JSON files in a directory (also `compare.sh report DIR`).
# Files: <system>-<phase>.json (cairn-load --json) and <system>-<phase>.rc (its exit status).
report() {
    python3 - "$1" <<'PY'
import json, os, sys

d = sys.argv[1]
systems = [("redis", "Redis, 1 node, no persistence"), ("redis-aof", "Redis, 1 node, appendfsync always"),
           ("cairn-1", "Cairn, 1 node, N=1, sync always"), ("cairn-1-nosync", "Cairn, 1 node, N=1, sync none"),
           ("etcd-3", "etcd 3.4, 3 nodes (Raft)"), ("cairn-3", "Cairn, 3 nodes, N=3, R=W=2, sync always")]
phases = ["load", "a", "c"]
# Latency columns: the read operation (workloads a and c), the insert operation (load).
lat_op = {"load": "insert", "a": "read", "c": "read"}

def load(sysname, phase):
    """(report dict or None, note)"""
    base = os.path.join(d, f"{sysname}-{phase}")
    rc = None
    if os.path.exists(base + ".rc"):
        try:
            rc = int(open(base + ".rc").read().strip())
        except ValueError:
            rc = None
    if not os.path.exists(base + ".json"):
        if rc is None:
            return None, None                     # not run
        return None, f"no report (exit {rc})"
    try:
        with open(base + ".json") as f:
            r = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"unreadable report ({e.__class__.__name__})"
    return r, (f"exit {rc}" if rc not in (None, 0) else None)

def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

def op_stats(r, want):
    ops = r.get("operations") or {}
    if not isinstance(ops, dict) or not ops:
        return None, None
    if want in ops:
        return want, ops[want]
    # Fallback: the operation with the most samples.
    name = max(ops, key=lambda k: num((ops[k] or {}).get("count")) or 0)
    return name, ops[name]

def fmt_int(v):
    v = num(v)
    return "-" if v is None else f"{v:,.0f}"

def errors_of(r):
    e = r.get("errors") or {}
    if not isinstance(e, dict):
        return 0, {}
    kinds = {k: int(num(v) or 0) for k, v in e.items() if num(v)}
    return sum(kinds.values()), kinds

rows, notes, tput = [], [], {}
header = ("system", "workload", "ops/s", "cpu µs/op", "switches/op", "steal %", "p50 µs", "p99 µs", "p99.9 µs", "errors")

def cpu_per_op(sysname, ph, r, kind="cpu"):
    """Server CPU µs per operation from SYSTEM-PHASE.cpu ("ticks ticks_per_second"), or None;
    the generator's from SYSTEM-PHASE.gencpu with kind="gencpu"."""
    try:
        ticks, hz = (int(x) for x in open(os.path.join(d, f"{sysname}-{ph}.{kind}")).read().split())
    except (OSError, ValueError):
        return None
    totals = r.get("totals") or {}
    # The CPU of the whole run, the warm-up's requests included.
    total = (num(totals.get("operations")) or 0) + (num(totals.get("warmup_operations")) or 0)
    if not total or hz <= 0:
        return None
    return ticks / hz * 1e6 / total

def switches_per_op(sysname, ph, r):
    """Context switches per operation from SYSTEM-PHASE.switches, or None."""
    try:
        n = int(open(os.path.join(d, f"{sysname}-{ph}.switches")).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    totals = r.get("totals") or {}
    total = (num(totals.get("operations")) or 0) + (num(totals.get("warmup_operations")) or 0)
    return n / total if total else None

def steal_pct(sysname, ph):
    """Share of the machine's CPU time the hypervisor took during the run (SYSTEM-PHASE.steal), or None."""
    try:
        stolen, total = (int(x) for x in open(os.path.join(d, f"{sysname}-{ph}.steal")).read().split())
    except (OSError, ValueError):
        return None
    return 100 * stolen / total if total > 0 else None

def fmt_1(v):
    return "-" if v is None else f"{v:,.1f}"

for sysname, _ in systems:
    for ph in phases:
        r, note = load(sysname, ph)
        if r is None and note is None:
            continue
        if r is None:
            rows.append((sysname, ph, "FAILED", "-", "-", "-", "-", "-", "-", "-"))
            notes.append(f"{sysname} {ph}: {note}")
            continue
        t = num(r.get("throughput_ops_per_s"))
        tput[(sysname, ph)] = t
        name, st = op_stats(r, lat_op[ph])
        st = st or {}
        nerr, kinds = errors_of(r)
        wl = ph if name in (None, lat_op[ph]) else f"{ph} ({name})"
        rows.append((sysname, wl, fmt_int(t), fmt_int(cpu_per_op(sysname, ph, r)), fmt_1(switches_per_op(sysname, ph, r)),
                     fmt_1(steal_pct(sysname, ph)),
                     fmt_int(st.get("p50_us")), fmt_int(st.get("p99_us")),
                     fmt_int(st.get("p999_us")), f"{nerr:,}" + (" !" if note else "")))
        if kinds:
            notes.append(f"{sysname} {ph}: errors " + ", ".join(f"{k}={v:,}" for k, v in sorted(kinds.items())))
        if note:
            notes.append(f"{sysname} {ph}: {note}")

if not rows:
    print(f"no reports in {d}")
    sys.exit(1)

def table(header, rows):
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(str(c).ljust(w[i]) if i < 2 else str(c).rjust(w[i]))
        return "  ".join(out).rstrip()
    print(line(header))
    print("  ".join("-" * x for x in w))
    for r in rows:
        print(line(r))

print("ops/s over the whole run; p50/p99/p99.9 are of the READ operation for workloads a and c,")
print("of the INSERT operation for load; errors = all error kinds counted by cairn-load;")
print("cpu µs/op = server processes' utime+stime over the run / operations (all nodes summed);")
print("switches/op = context switches of every server thread over the run / operations (thread crossings);")
print("steal % = the machine's CPU time the hypervisor took during the run (/proc/stat; a shared VM runs slower then).")
print()
probe = os.path.join(d, "disk-sync.txt")
if os.path.exists(probe):
    with open(probe) as f:
        print(f.read().rstrip())
    print()
table(header, rows)

# Updates matter in workload a (50% read, 50% update): show their latency too.
upd = []
for sysname, _ in systems:
    r, _n = load(sysname, "a")
    if r is None:
        continue
    st = (r.get("operations") or {}).get("update")
    if isinstance(st, dict):
        upd.append((sysname, "a (update)", fmt_int(st.get("count")), fmt_int(st.get("p50_us")),
                    fmt_int(st.get("p99_us")), fmt_int(st.get("p999_us"))))
if upd:
    print()
    table(("system", "workload", "count", "p50 µs", "p99 µs", "p99.9 µs"), upd)

print()
print("systems: " + "; ".join(f"{s} = {label}" for s, label in systems))
for n in notes:
    print("note: " + n)
if any(r[-1].endswith("!") or r[2] == "FAILED" for r in rows):
    print("! or FAILED: cairn-load exited non-zero or left no readable report; see its output above")

# Open-loop runs (LATENCY=1): latency at a fixed rate, at any EXTRA_RATES (a-rate-R files), and at
# half the closed-loop peak.
extra_rates = sorted({int(f[len(s) + len("-a-rate-"):-len(".json")]) for s, _ in systems for f in os.listdir(d)
                      if f.startswith(s + "-a-rate-") and f.endswith(".json") and f[len(s) + len("-a-rate-"):-len(".json")].isdigit()})
open_phases = [("a-rate", "fixed rate")] + [(f"a-rate-{r}", f"{r:,} ops/s") for r in extra_rates] + [("a-half", "half of peak")]
lat, goals = [], []
def ms(v):
    v = num(v)
    return "-" if v is None else f"{v / 1000:,.2f}"
for sysname, _ in systems:
    for ph, what in open_phases:
        r, note = load(sysname, ph)
        if r is None:
            if note:
                lat.append((sysname, what, "FAILED") + ("-",) * 7)
            continue
        asked = num((r.get("config") or {}).get("rate"))
        ops = r.get("operations") or {}
        rd, up = ops.get("read") or {}, ops.get("update") or {}
        nerr, _k = errors_of(r)
        cpu = cpu_per_op(sysname, ph, r)
        gen = cpu_per_op(sysname, ph, r, "gencpu")
        lat.append((sysname, what, fmt_int(asked), fmt_int(r.get("throughput_ops_per_s")), "-" if cpu is None else f"{cpu:,.0f}",
                    "-" if gen is None else f"{gen:,.0f}", fmt_1(steal_pct(sysname, ph)),
                    " / ".join(ms(rd.get(k)) for k in ("p50_us", "p99_us", "p999_us")),
                    " / ".join(ms(up.get(k)) for k in ("p50_us", "p99_us", "p999_us")), f"{nerr:,}" + (" !" if note else "")))
        if sysname == "cairn-3":
            worst99 = max(num(rd.get("p99_us")) or 0, num(up.get("p99_us")) or 0) / 1000
            worst999 = max(num(rd.get("p999_us")) or 0, num(up.get("p999_us")) or 0) / 1000
            if ph.startswith("a-rate-"):
                pass
            elif ph == "a-rate":
                ok = worst99 <= 5 and worst999 <= 20 and nerr == 0
                goals.append(f"cairn-3 at {fmt_int(asked)} ops/s: worst p99 {worst99:.2f} ms (goal <= 5), "
                             f"worst p99.9 {worst999:.2f} ms (goal <= 20): {'PASS' if ok else 'FAIL'}")
            else:
                ok = worst99 <= 10 and nerr == 0
                goals.append(f"cairn-3 at half of peak ({fmt_int(asked)} ops/s): worst p99 {worst99:.2f} ms (goal <= 10): "
                             f"{'PASS' if ok else 'FAIL'}")
if lat:
    print()
    print("open loop, workload a (latency from each request's intended start; ms):")
    table(("system", "rate", "asked ops/s", "done ops/s", "cpu µs/op", "gen µs/op", "steal %", "read p50 / p99 / p99.9",
           "update p50 / p99 / p99.9", "errors"),
          lat)
    for g in goals:
        print("  " + g)

def ratio(a, b):
    ta, tb = tput.get(a), tput.get(b)
    if not ta or not tb:
        return "n/a"
    return f"{ta / tb:.2f}x"

print()
print("ops/s ratios (this run only):")
for label, c, p in (("Cairn 1 node / Redis AOF always    ", "cairn-1", "redis-aof"),
                    ("Cairn 1 node no sync / Redis      ", "cairn-1-nosync", "redis"),
                    ("Cairn 3 nodes / etcd 3            ", "cairn-3", "etcd-3")):
    print("  " + label + "  ".join(f"{ph}: {ratio((c, ph), (p, ph)):>7}" for ph in phases))
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
# shellcheck source=../lib/processes.sh
source "$ROOT/Benchmarks/lib/processes.sh"

# ---------------------------------------------------------------------------------------------
# shellcheck source=../lib/binaries.sh
source "$ROOT/Benchmarks/lib/binaries.sh"

install_compare_deps() {
    install_packages redis-server redis-server redis-cli redis-tools etcd etcd-server etcdctl etcd-client \
        curl curl python3 python3 jq jq
}

# build_compare: cairn-load, and cairnd when a Cairn system is measured.
build_compare() {
    if [[ " $SYSTEMS " == *" cairn-"* ]]; then release_binaries cairn-load cairnd; else release_binaries cairn-load; fi
}

machine() {
    local model mem
    model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    mem="$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "== Cairn vs peers, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) CPUs, ${model:-unknown CPU}, $mem RAM, Linux $(uname -r)"
    echo "cairn:   $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
    echo "redis:   $(redis-server --version | awk '{ print $3 }' | sed 's/^v=//')   etcd: $(etcd --version | awk '/^etcd Version/ { print $3 }')"
    local how="--duration $DURATION"
    [[ -n "$OPERATIONS" ]] && how="--operations $OPERATIONS"
    echo "settings: --records $RECORDS --value-size $VALUE_SIZE --concurrency $CONCURRENCY $how --seed $SEED"
    if [[ "$LATENCY" == "1" ]]; then echo "open loop: --concurrency $OPEN_CONCURRENCY --duration $DURATION$([[ "$WARMUP" == "0" ]] || echo " after --warmup $WARMUP"), --rate $RATE${EXTRA_RATES:+ (and $EXTRA_RATES)} and half of each peak"; fi
    echo "three-node systems: $( ((SHARE > 0)) && echo "$SHARE thread(s) each (node.event_loops; GOMAXPROCS), Cairn storage.request_threads = $SHARE_STORE" || echo "default threads (one per core each)")"
    echo "one-node Cairn:     $( ((SHARE1 > 0)) && echo "$SHARE1 thread(s) (node.event_loops), storage.request_threads = $SHARE1_STORE" || echo "default threads (one per core)")"
    if [[ -n "${CAIRN_CONF:-}" ]]; then echo "cairn configuration added: $(printf '%s' "$CAIRN_CONF" | tr '\n' ';')"; fi
    echo "systems: $SYSTEMS"
    echo
}

# disk_sync_probe DIR OUT: the log-sync latency of the disk holding DIR (see the header) to OUT.
disk_sync_probe() { DIR="$1" OPS=1000 python3 "$ROOT/Benchmarks/storage/log-sync.py" probe 3 >"$2"; }

# ---------------------------------------------------------------------------------------------
# The systems. start_<system> starts it and waits until ready; sets TARGET, RUN_EXTRA, SYS_PIDS.

# start_redis [aof]: no persistence, or an append-only file synced before every reply.
start_redis() {
    require_free "127.0.0.1:$REDIS_PORT"
    local dir="$WORK/data/redis${1:+-$1}" persist=(--appendonly no)
    [[ "${1:-}" == aof ]] && persist=(--appendonly yes --appendfsync always)
    mkdir -p "$dir"
    start "redis${1:+-$1}" "$WORK/logs/redis${1:+-$1}.log" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save '' "${persist[@]}" --daemonize no --dir "$dir" --protected-mode yes
    SYS_PIDS=("$STARTED_PID")
    wait_ready redis "$STARTED_PID" "$WORK/logs/redis.log" 100 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping
    TARGET="redis://127.0.0.1:$REDIS_PORT"
    RUN_EXTRA=()
}

# cairn_config NAME HOST N_VAL MEMBERS [SYNC] [THREADS]: writes $WORK/conf/NAME-SYNC.conf (data,
# logs and configuration per sync mode, so cairn-1 and cairn-1-nosync never share a directory);
# THREADS > 0 sets node.event_loops to it and storage.request_threads to STORE (default THREADS).
cairn_config() {
    local name=$1 host=$2 nval=$3 members=$4 sync=${5:-always} threads=${6:-0} store=${7:-${6:-0}}
    local dir="$WORK/data/$name-$sync"
    mkdir -p "$dir" "$WORK/conf"
    cat >"$WORK/conf/$name-$sync.conf" <<CONF
# Generated by Benchmarks/cluster/compare.sh; see Docs/configuration.md.
node.name = $name
node.listen = $host:$CAIRN_PORT
node.http = $host:$CAIRN_HTTP_PORT
node.data_dir = $dir
cluster.name = bench-$nval
cluster.ring_size = 256
cluster.n_val = $nval
cluster.members = $members
request.timeout = 2s
storage.sync = $sync
CONF
    if ((threads > 0)); then
        printf 'node.event_loops = %s\nstorage.request_threads = %s\n' "$threads" "$store" >>"$WORK/conf/$name-$sync.conf"
    fi
    if [[ -n "${CAIRN_CONF:-}" ]]; then printf '%s\n' "$CAIRN_CONF" >>"$WORK/conf/$name-$sync.conf"; fi
    "$BIN/cairnd" --config "$WORK/conf/$name-$sync.conf" --check-config >&2
}

cairn_healthy() { curl -fsS --max-time 1 "http://$1:$CAIRN_HTTP_PORT/health"; }

# start_cairn_1 [SYNC]
start_cairn_1() {
    local h=$CAIRN1_HOST
    require_free "$h:$CAIRN_PORT" "$h:$CAIRN_HTTP_PORT"
    local sync=${1:-always}
    cairn_config c1 "$h" 1 "c1@$h:$CAIRN_PORT" "$sync" "$SHARE1" "$SHARE1_STORE"
    start "cairnd-c1-$sync" "$WORK/logs/cairnd-c1-$sync.log" "$BIN/cairnd" --config "$WORK/conf/c1-$sync.conf"
    SYS_PIDS=("$STARTED_PID")
    wait_ready "cairnd-c1-$sync" "$STARTED_PID" "$WORK/logs/cairnd-c1-$sync.log" 150 cairn_healthy "$h"
    TARGET="cairn://$h:$CAIRN_PORT"
    RUN_EXTRA=(--r 1 --w 1)
}

start_cairn_3() {
    local i h members=() targets=()
    for i in 0 1 2; do
        h=${CAIRN3_HOSTS[$i]}
        require_free "$h:$CAIRN_PORT" "$h:$CAIRN_HTTP_PORT"
        members+=("n$((i + 1))@$h:$CAIRN_PORT")
        targets+=("$h:$CAIRN_PORT")
    done
    local member_list target_list
    member_list="$(join_by , "${members[@]}")"
    target_list="$(join_by , "${targets[@]}")"
    SYS_PIDS=()
    for i in 0 1 2; do
        cairn_config "n$((i + 1))" "${CAIRN3_HOSTS[$i]}" 3 "$member_list" always "$SHARE" "$SHARE_STORE"
    done
    for i in 0 1 2; do
        start "cairnd-n$((i + 1))" "$WORK/logs/cairnd-n$((i + 1)).log" \
            "$BIN/cairnd" --config "$WORK/conf/n$((i + 1))-always.conf"
        SYS_PIDS+=("$STARTED_PID")
    done
    for i in 0 1 2; do
        wait_ready "cairnd-n$((i + 1))" "${SYS_PIDS[$i]}" "$WORK/logs/cairnd-n$((i + 1)).log" 150 \
            cairn_healthy "${CAIRN3_HOSTS[$i]}"
    done
    TARGET="cairn://$target_list"
    RUN_EXTRA=(--r 2 --w 2)
}

etcd_endpoints() {
    local p out=()
    for p in "${ETCD_CLIENT_PORTS[@]}"; do out+=("127.0.0.1:$p"); done
    join_by , "${out[@]}"
}

# etcd_healthy ENDPOINT: the member answers and the cluster commits a proposal (has a leader).
etcd_healthy() {
    ETCDCTL_API=3 etcdctl --endpoints "$1" --dial-timeout 1s --command-timeout 3s endpoint health
}

start_etcd_3() {
    local i cluster=() p
    for i in 0 1 2; do
        require_free "127.0.0.1:${ETCD_CLIENT_PORTS[$i]}" "127.0.0.1:${ETCD_PEER_PORTS[$i]}"
        cluster+=("e$((i + 1))=http://127.0.0.1:${ETCD_PEER_PORTS[$i]}")
    done
    local initial
    initial="$(join_by , "${cluster[@]}")"
    # etcd 3.4 refuses to start on arm64 unless told to.
    [[ "$(uname -m)" == "aarch64" ]] && export ETCD_UNSUPPORTED_ARCH=arm64
    SYS_PIDS=()
    for i in 0 1 2; do
        local name="e$((i + 1))" client="http://127.0.0.1:${ETCD_CLIENT_PORTS[$i]}"
        local peer="http://127.0.0.1:${ETCD_PEER_PORTS[$i]}"
        mkdir -p "$WORK/data/$name"
        local procs=()
        ((SHARE > 0)) && procs=(env "GOMAXPROCS=$SHARE")
        start "etcd-$name" "$WORK/logs/etcd-$name.log" "${procs[@]}" etcd --name "$name" \
            --data-dir "$WORK/data/$name" \
            --listen-client-urls "$client" --advertise-client-urls "$client" \
            --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
            --initial-cluster "$initial" --initial-cluster-state new \
            --initial-cluster-token cairn-bench \
            --logger zap --log-outputs stderr --log-level warn
        SYS_PIDS+=("$STARTED_PID")
    done
    for i in 0 1 2; do
        wait_ready "etcd-e$((i + 1))" "${SYS_PIDS[$i]}" "$WORK/logs/etcd-e$((i + 1)).log" 150 \
            etcd_healthy "127.0.0.1:${ETCD_CLIENT_PORTS[$i]}"
    done
    TARGET="etcd://$(etcd_endpoints)"
    RUN_EXTRA=()
}

# ---------------------------------------------------------------------------------------------
FAILED=0

# cpu_ticks PID...: utime+stime of the processes, in clock ticks (fields 14 and 15 of
# /proc/PID/stat, counted after the command name, which may hold spaces).
cpu_ticks() {
    local pid total=0 rest
    for pid in "$@"; do
        rest="$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null)" || continue
        # After "pid (comm) ", field 3 of the file is the first word: utime is word 12, stime 13.
        total=$((total + $(awk '{ print $12 + $13 }' <<<"$rest")))
    done
    echo "$total"
}

# switch_snapshot PID...: "tid switches" (voluntary + involuntary) for every thread of the processes.
switch_snapshot() {
    local pid
    for pid in "$@"; do
        awk 'FNR == 1 { n = split(FILENAME, part, "/"); tid = part[n - 1] }
             /^(voluntary|nonvoluntary)_ctxt_switches:/ { s[tid] += $2 }
             END { for (t in s) print t, s[t] }' /proc/"$pid"/task/*/status 2>/dev/null || true
    done
}

# switch_sampler FILE PID...: appends a snapshot to FILE every second until killed. A thread's
# counts vanish with it (runtimes retire idle pool threads), so the phase's switches are summed
# per thread from its last snapshot: a thread that exits loses at most its last second.
switch_sampler() {
    local file=$1
    shift
    while :; do
        switch_snapshot "$@" >>"$file"
        sleep 1
    done
}

# switches_between START SAMPLES: switches per thread from START (0 for threads born later) to
# the thread's last line in SAMPLES, summed.
switches_between() {
    awk 'FNR == NR { start[$1] = $2; next } { last[$1] = $2 }
         END { for (t in last) { d = last[t] - start[t]; if (d > 0) n += d }; print n + 0 }' "$1" "$2"
}

# cairn_load SYSTEM PHASE ARGS...: run the generator, JSON to $WORK/json/SYSTEM-PHASE.json, the
# server CPU it cost (ticks and ticks per second) to SYSTEM-PHASE.cpu and the servers' context
# switches to SYSTEM-PHASE.switches.
# steal_ticks: the machine's CPU time stolen by the hypervisor and its total CPU time ("steal
# total", in ticks, all CPUs; /proc/stat's first line). steal_since "STEAL TOTAL": the differences.
steal_ticks() { awk '/^cpu / { print $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat; }
steal_since() {
    local now
    now="$(steal_ticks)"
    awk -v a="$1" -v b="$now" 'BEGIN { split(a, x, " "); split(b, y, " "); print y[1] - x[1], y[2] - x[2] }'
}

cairn_load() {
    local sys=$1 phase=$2 rc=0 pid before gen_before
    shift 2
    local json="$WORK/json/$sys-$phase.json"
    before="$(cpu_ticks "${SYS_PIDS[@]}")"
    # The generator's CPU: what this shell's waited-for children used (cutime + cstime) across the
    # run. `me` is taken here: inside $(...) BASHPID would be the substitution's own subshell.
    local me=$BASHPID steal_before
    gen_before="$(awk '{ print $16 + $17 }' "/proc/$me/stat")"
    steal_before="$(steal_ticks)"
    local switches_start="$WORK/json/$sys-$phase.switches-start" switches_samples="$WORK/json/$sys-$phase.switches-samples" sampler
    switch_snapshot "${SYS_PIDS[@]}" >"$switches_start"
    : >"$switches_samples"
    switch_sampler "$switches_samples" "${SYS_PIDS[@]}" &
    sampler=$!
    RUNNING[$sampler]="switch sampler ($sys $phase)"
    echo "-- $sys $phase: cairn-load $* --json $json"
    # RUN_TIMEOUT bounds a generator that hangs; SIGTERM to `timeout` reaches cairn-load too.
    timeout --kill-after=10 "$RUN_TIMEOUT" "$BIN/cairn-load" "$@" --json "$json" </dev/null &
    pid=$!
    RUNNING[$pid]="cairn-load ($sys $phase)"
    wait "$pid" || rc=$?
    unset "RUNNING[$pid]"
    echo "$(($(awk '{ print $16 + $17 }' "/proc/$me/stat") - gen_before)) $(getconf CLK_TCK)" >"$WORK/json/$sys-$phase.gencpu"
    steal_since "$steal_before" >"$WORK/json/$sys-$phase.steal"
    echo "$(($(cpu_ticks "${SYS_PIDS[@]}") - before)) $(getconf CLK_TCK)" >"$WORK/json/$sys-$phase.cpu"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    unset "RUNNING[$sampler]"
    switch_snapshot "${SYS_PIDS[@]}" >>"$switches_samples"
    switches_between "$switches_start" "$switches_samples" >"$WORK/json/$sys-$phase.switches"
    echo "$rc" >"$WORK/json/$sys-$phase.rc"
    if ((rc == 124)); then
        echo "-- $sys $phase: cairn-load did not finish within RUN_TIMEOUT=$RUN_TIMEOUT; stopped"
        FAILED=1
    elif ((rc != 0)); then
        echo "-- $sys $phase: cairn-load exited with status $rc"
        FAILED=1
    fi
    return 0
}

measure() {
    local sys=$1 base common how open
    base=(--records "$RECORDS" --value-size "$VALUE_SIZE" --seed "$SEED")
    common=("${base[@]}" --concurrency "$CONCURRENCY")
    open=("${base[@]}" --concurrency "$OPEN_CONCURRENCY")
    [[ "$WARMUP" == "0" ]] || open+=(--warmup "$WARMUP")
    if [[ -n "$OPERATIONS" ]]; then how=(--operations "$OPERATIONS"); else how=(--duration "$DURATION"); fi
    echo "== $sys"
    case "$sys" in
    redis) start_redis ;;
    redis-aof) start_redis aof ;;
    cairn-1) start_cairn_1 ;;
    cairn-1-nosync) start_cairn_1 none ;;
    cairn-3) start_cairn_3 ;;
    etcd-3) start_etcd_3 ;;
    *) die "unknown system '$sys' (known: redis redis-aof cairn-1 cairn-1-nosync etcd-3 cairn-3)" ;;
    esac
    cairn_load "$sys" load load --target "$TARGET" "${common[@]}"
    local w
    for w in a c; do
        cairn_load "$sys" "$w" run --target "$TARGET" --workload "$w" "${common[@]}" "${how[@]}" \
            ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"}
    done
    if [[ "$LATENCY" == "1" ]]; then
        local peak half
        peak="$(jq -r '.throughput_ops_per_s // 0' "$WORK/json/$sys-a.json" 2>/dev/null || echo 0)"
        half="$(awk -v p="$peak" 'BEGIN { printf "%d", p / 2 }')"
        cairn_load "$sys" a-rate run --target "$TARGET" --workload a "${open[@]}" --duration "$DURATION" --rate "$RATE" \
            ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"}
        local extra
        for extra in $EXTRA_RATES; do
            cairn_load "$sys" "a-rate-$extra" run --target "$TARGET" --workload a "${open[@]}" --duration "$DURATION" --rate "$extra" \
                ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"}
        done
        if ((half > 0)); then
            cairn_load "$sys" a-half run --target "$TARGET" --workload a "${open[@]}" --duration "$DURATION" --rate "$half" \
                ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"}
        else
            echo "-- $sys a-half: no peak measured (workload a failed); skipped"
        fi
    fi
    # Stop it before the next system, so every system has the machine to itself: its disk too.
    # What it left dirty in the page cache (a system without sync leaves hundreds of MB) is
    # written out now, not by the kernel's flusher 30 s later, during the next system's run,
    # where it queues ahead of that system's log syncs.
    stop_pids "${SYS_PIDS[@]}"
    sync
    echo
}

main() {
    [[ "$DURATION" =~ ^[0-9]+$ ]] && DURATION="${DURATION}s"
    local s
    for s in $SYSTEMS; do
        case "$s" in redis | redis-aof | cairn-1 | cairn-1-nosync | etcd-3 | cairn-3) ;; *) die "unknown system '$s' in SYSTEMS" ;; esac
    done
    install_compare_deps
    build_compare
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/cairn-compare.XXXXXX")"
    mkdir -p "$WORK/json" "$WORK/logs" "$WORK/data"
    machine
    disk_sync_probe "$WORK/data" "$WORK/json/disk-sync.txt" || echo "disk sync probe failed" >"$WORK/json/disk-sync.txt"
    cat "$WORK/json/disk-sync.txt"
    echo
    for s in $SYSTEMS; do measure "$s"; done
    echo "== results"
    report "$WORK/json"
    if [[ "$KEEP" == "1" ]]; then echo; echo "reports: $WORK/json   logs: $WORK/logs"; fi
    ((FAILED == 0)) || { echo; echo "some cairn-load runs failed (see above)"; exit 1; }
}

main
