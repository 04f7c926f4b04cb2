#!/usr/bin/env bash
# CairnStorage against RocksDB, same machine, same run, same parameters: RocksDB's db_bench
# (Debian package rocksdb-tools) and our cairn-db-bench (release build), one workload at a time.
#
#   Benchmarks/storage/compare-rocksdb.sh                     # 1,000,000 ops, 16 B keys, 100 B values
#   NUM=200000 THREADS=2 Benchmarks/storage/compare-rocksdb.sh
#
# Workloads: fillseq, fillrandom (fresh databases), overwrite (on fillrandom's), readrandom and
# readseq (--use_existing_db=1 on that database), fillsync (fresh; SYNC_NUM synced writes,
# default NUM/100: RocksDB 7's db_bench writes all N entries in fillsync, an fsync each). Both engines get the same memory: WRITE_BUFFER for all memtables together
# (RocksDB: two memtables of half each) and CACHE for the block cache; Bloom filters of 10 bits per
# key; no compression. Peak RSS is /usr/bin/time's maximum resident set size of each process.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export PATH="/opt/swift/usr/bin:$PATH"
# shellcheck source=../../Deploy/lib/packages.sh
source "$ROOT/Deploy/lib/packages.sh"
ensure_packages db_bench rocksdb-tools /usr/bin/time time

NUM=${NUM:-1000000}
KEY_SIZE=${KEY_SIZE:-16}
VALUE_SIZE=${VALUE_SIZE:-100}
THREADS=${THREADS:-1}
SYNC_NUM=${SYNC_NUM:-$((NUM / 100))}
CACHE=${CACHE:-67108864}
WRITE_BUFFER=${WRITE_BUFFER:-67108864}
WORK=$(mktemp -d /tmp/cairn-storage-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

swift build -c release --product cairn-db-bench >&2
CAIRN="$ROOT/.build/release/cairn-db-bench"

common=(--num="$NUM" --key_size="$KEY_SIZE" --value_size="$VALUE_SIZE" --threads="$THREADS" --histogram=1
    --cache_size="$CACHE" --bloom_bits=10 --compression_type=none)
rocks=(db_bench "${common[@]}" --write_buffer_size=$((WRITE_BUFFER / 2)) --max_write_buffer_number=2 --db="$WORK/rocksdb")
# --sync_on_writer_thread=1: the writer runs its own fdatasync, as db_bench's does (the node keeps
# syncs off Swift's cooperative pool instead).
cairn=("$CAIRN" "${common[@]}" --write_buffer_size="$WRITE_BUFFER" --sync_on_writer_thread=1 --db="$WORK/cairn")

# run ENGINE BENCHMARK EXTRA...: one process, its output and peak RSS kept under $WORK.
run() {
    local engine=$1 bench=$2
    shift 2
    local -n cmd=$engine
    echo "  $engine $bench" >&2
    /usr/bin/time -f "%M" -o "$WORK/$engine.$bench.rss" "${cmd[@]}" --benchmarks="$bench" "$@" >"$WORK/$engine.$bench.out" 2>&1 ||
        { echo "$engine $bench failed:" >&2; tail -5 "$WORK/$engine.$bench.out" >&2; exit 1; }
}

for engine in rocks cairn; do
    run "$engine" fillseq --use_existing_db=0
    run "$engine" fillsync --use_existing_db=0 --num="$SYNC_NUM"
    run "$engine" fillrandom --use_existing_db=0
    run "$engine" overwrite --use_existing_db=1
    run "$engine" readrandom --use_existing_db=1
    run "$engine" readseq --use_existing_db=1
done

# field ENGINE BENCH WHAT: ops/sec, p50, p99, rss (MiB) or found.
field() {
    local out="$WORK/$1.$2.out"
    case $3 in
    ops) awk -v b="$2" '$1 == b { for (i = 1; i <= NF; i++) if ($i == "ops/sec") print $(i - 1) }' "$out" | head -1 ;;
    p50) awk '/^Percentiles:/ { print $3; exit }' "$out" ;;
    p99) awk '/^Percentiles:/ { print $7; exit }' "$out" ;;
    rss) awk '{ printf "%.0f", $1 / 1024 }' "$WORK/$1.$2.rss" ;;
    found) grep -o '([0-9]* of [0-9]* found)' "$out" | head -1 || true ;;
    esac
}

echo
echo "CairnStorage vs RocksDB $(db_bench --version 2>/dev/null | awk '{print $NF}' || true): num=$NUM key=$KEY_SIZE value=$VALUE_SIZE threads=$THREADS cache=$((CACHE >> 20))MiB write_buffer=$((WRITE_BUFFER >> 20))MiB"
echo "$(nproc) CPU ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(df -T "$WORK" | awk 'NR == 2 { print $2 }') at $WORK"
printf "\n| %-10s | %12s | %12s | %6s | %11s | %11s | %11s | %11s | %9s | %9s |\n" workload "RocksDB op/s" "Cairn op/s" ratio \
    "Rocks p50µs" "Cairn p50µs" "Rocks p99µs" "Cairn p99µs" "Rocks RSS" "Cairn RSS"
echo "|------------|--------------|--------------|--------|-------------|-------------|-------------|-------------|-----------|-----------|"
for bench in fillseq fillrandom overwrite readrandom readseq fillsync; do
    r=$(field rocks $bench ops)
    c=$(field cairn $bench ops)
    ratio=$(awk -v c="$c" -v r="$r" 'BEGIN { if (r > 0) printf "%.2f", c / r; else print "-" }')
    printf "| %-10s | %12s | %12s | %6s | %11s | %11s | %11s | %11s | %7sMiB | %7sMiB |\n" $bench "$r" "$c" "$ratio" \
        "$(field rocks $bench p50)" "$(field cairn $bench p50)" "$(field rocks $bench p99)" "$(field cairn $bench p99)" \
        "$(field rocks $bench rss)" "$(field cairn $bench rss)"
done
echo
echo "readrandom found: RocksDB $(field rocks readrandom found), Cairn $(field cairn readrandom found)"
echo "ratio = Cairn ops/s ÷ RocksDB ops/s (> 1: Cairn faster). Cairn's configured memory: write buffer + block cache = $(((WRITE_BUFFER + CACHE) / 1048576)) MiB (the process itself and allocator overhead come on top: ~30 MiB at start)."
