# cairn-load phases shared by the cluster benchmark scripts (sourced, not run). The caller
# defines BIN, WORK (with json/ and logs/), VALUE_SIZE and SEED, and for `workload` TARGET,
# RECORDS, WORKLOAD and RATE, and for `addr` HOSTS and PORT; processes.sh is sourced first
# (`start`, `alive`, RUNNING).

# now: seconds since the epoch (nanoseconds); elapsed A B: B - A to a tenth of a second.
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# addr I: node I's client address (1-based, from HOSTS and PORT).
addr() { echo "${HOSTS[$(($1 - 1))]}:$PORT"; }

# run_load NAME TARGET RECORDS EXTRA...: cairn-load load in the foreground (LOAD_CONCURRENCY
# workers, default 16); dies with the report's tail when it fails.
run_load() {
    local name=$1 target=$2 records=$3 rc=0
    shift 3
    "$BIN/cairn-load" load --target "$target" --records "$records" --value-size "$VALUE_SIZE" --concurrency "${LOAD_CONCURRENCY:-16}" \
        --seed "$SEED" --json "$WORK/json/$name.json" "$@" >"$WORK/logs/$name.out" 2>&1 </dev/null || rc=$?
    ((rc == 0)) || die "cairn-load load ($name) exited $rc: $(tail -n 5 "$WORK/logs/$name.out")"
}

# workload NAME DURATION: the open-loop workload in the background; sets WORKLOAD_PID.
workload() {
    start "cairn-load ($1)" "$WORK/logs/$1.out" "$BIN/cairn-load" run --target "$TARGET" --records "$RECORDS" \
        --workload "$WORKLOAD" --rate "$RATE" --concurrency 32 --value-size "$VALUE_SIZE" --seed "$SEED" \
        --duration "$2" --json "$WORK/json/$1.json"
    WORKLOAD_PID=$STARTED_PID
}

# finish_workload [stop]: waits for the workload (stop: interrupts it first, so it reports what it
# did); SIGKILL after 60 s.
finish_workload() {
    local pid=$WORKLOAD_PID n=0
    if [[ "${1:-}" == stop ]] && alive "$pid"; then kill -INT "$pid" 2>/dev/null || true; fi
    while alive "$pid"; do
        n=$((n + 1))
        ((n < 300)) || { kill -KILL "$pid" 2>/dev/null || true; }
        sleep 0.2
    done
    wait "$pid" 2>/dev/null || true
    unset "RUNNING[$pid]"
}
