# Process helpers shared by the benchmark scripts (sourced, not run). The caller defines
# `log`, `die` and KEEP (1: keep the reports and logs in $WORK). Sourcing installs the EXIT trap
# that stops every process `start` recorded in RUNNING and removes $WORK (its data always; the
# rest unless KEEP=1, or the run failed and KEEP_ON_FAILURE=1).

declare -A RUNNING=()   # pid -> name
WORK=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#RUNNING[@]})); then
        log "stopping what is still running..."
        stop_pids "${!RUNNING[@]}"
    fi
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if [[ "$KEEP" == "1" || ("${KEEP_ON_FAILURE:-0}" == "1" && "$rc" != 0) ]]; then
            rm -rf "$WORK/data"
            log "kept the reports and logs in $WORK ($([[ "$KEEP" == 1 ]] && echo KEEP=1 || echo "the run failed"))"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# alive PID: the process exists and is not a zombie.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" != Z ]]
}

# stop_pids PID...: SIGTERM all, wait up to 20 s for all, SIGKILL the rest, reap.
stop_pids() {
    local pid waited=0 live
    (($#)) || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    while ((waited < 100)); do
        live=0
        for pid in "$@"; do alive "$pid" && live=1; done
        ((live)) || break
        sleep 0.2
        waited=$((waited + 1))
    done
    for pid in "$@"; do
        if alive "$pid"; then
            log "  ${RUNNING[$pid]:-pid $pid} did not stop in 20 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for pid in "$@"; do
        wait "$pid" 2>/dev/null || true
        log "  stopped ${RUNNING[$pid]:-process} (pid $pid)"
        unset "RUNNING[$pid]"
    done
}

# start NAME LOGFILE CMD...: run CMD in the background, record its pid in STARTED_PID.
start() {
    local name=$1 logfile=$2
    shift 2
    "$@" >"$logfile" 2>&1 </dev/null &
    STARTED_PID=$!
    RUNNING[$STARTED_PID]=$name
    log "  started $name (pid $STARTED_PID), log $logfile"
}

# listening HOST PORT: something accepts TCP connections there.
# shellcheck disable=SC2016  # $0/$1 expand in the inner bash
listening() { timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null; }

require_free() {
    local hp
    for hp in "$@"; do
        ! listening "${hp%:*}" "${hp##*:}" || die "$hp is already in use; stop whatever listens there first"
    done
}

# wait_ready NAME PID LOGFILE TRIES CMD...: retry CMD every 0.2 s while PID lives, at most TRIES.
wait_ready() {
    local name=$1 pid=$2 logfile=$3 tries=$4 n=0
    shift 4
    until "$@" >/dev/null 2>&1; do
        n=$((n + 1))
        if ! alive "$pid"; then
            log "$name exited before it was ready; last log lines:"; tail -n 20 "$logfile" >&2; exit 1
        fi
        if ((n >= tries)); then
            log "$name not ready after $((tries / 5)) s; last log lines:"; tail -n 20 "$logfile" >&2; exit 1
        fi
        sleep 0.2
    done
    log "  $name ready"
}
