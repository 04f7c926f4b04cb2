#!/usr/bin/env bash
# A private systemd (PID 1 of new PID and mount namespaces) for tests that need a real service
# manager. Nothing it writes reaches the host's file system where it matters: /run, /tmp,
# /var/tmp, /var/lib and the journal are tmpfs inside its mount namespace (a checkout under one
# of them is bound back in, so tests can still reach it). It boots only
# cairn-sandbox.target (journald), not the machine's own units; network-online.target is masked
# so nothing waits for a network that is already up (it shares the host's network namespace).
#
#   Tests/systemd-sandbox.sh start DIR        boot it; DIR gets its pid and log
#   Tests/systemd-sandbox.sh run DIR CMD...   run CMD inside (systemctl, journalctl, ...)
#   Tests/systemd-sandbox.sh stop DIR         power it off (SIGKILL after 30 s)
set -euo pipefail

cmd=${1:?usage: start|run|stop DIR}
dir=${2:?usage: start|run|stop DIR}
shift 2

inside() { nsenter -t "$(cat "$dir/pid")" -p -m -u "$@"; }

# Boots one sandbox; succeeds once its systemd reports running (or degraded) within 40 s.
boot() {
    rm -f "$dir/pid"
    # A checkout under one of the directories the sandbox covers with a tmpfs (a clone in /tmp)
    # is bound back over the tmpfs, so the tests' installer and binaries stay reachable inside.
    CAIRN_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) \
    setsid unshare --pid --fork --mount-proc --mount --uts --cgroup --propagation private bash -c '
        set -e
        hidden=
        for d in /run /tmp /var/tmp /var/lib; do case "$CAIRN_REPO/" in "$d"/*) hidden=1 ;; esac; done
        if [ -n "$hidden" ]; then mount --bind "$CAIRN_REPO" /mnt; fi
        for d in /run /tmp /var/tmp /var/lib; do mount -t tmpfs -o mode=0755 tmpfs "$d"; done
        chmod 1777 /tmp /var/tmp
        if [ -n "$hidden" ]; then mkdir -p "$CAIRN_REPO"; mount --bind /mnt "$CAIRN_REPO"; umount /mnt; fi
        if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
        mkdir -p /run/systemd/system
        printf "%s\n" "[Unit]" "Description=Cairn test sandbox" "DefaultDependencies=no" \
            "Wants=systemd-journald.socket systemd-journald.service" "After=systemd-journald.socket" \
            > /run/systemd/system/cairn-sandbox.target
        ln -s /dev/null /run/systemd/system/network-online.target
        exec /lib/systemd/systemd --system --unit=cairn-sandbox.target' >"$dir/systemd-$1.log" 2>&1 </dev/null &
    echo $! >"$dir/unshare.pid"
    local pid=
    for _ in $(seq 1 100); do
        pid=$(pgrep -P "$(cat "$dir/unshare.pid")" || true)
        [[ -n $pid ]] && break
        sleep 0.1
    done
    [[ -n $pid ]] || { echo "sandbox: systemd did not start (try $1)" >&2; return 1; }
    echo "$pid" >"$dir/pid"
    for _ in $(seq 1 400); do
        state=$(inside systemctl is-system-running 2>/dev/null || true)
        case "$state" in running | degraded) return 0 ;; esac
        sleep 0.1
    done
    return 1
}

# What a boot that did not finish was doing, for the test's failure message.
diagnose() {
    echo "sandbox: systemd did not finish booting (try $1, state: ${state:-none})"
    echo "--- systemctl is-system-running:"
    inside timeout 10 systemctl is-system-running 2>&1 || true
    if [[ -f $dir/pid ]]; then
        local pid
        pid=$(cat "$dir/pid")
        echo "--- PID 1 ($pid): $(grep -E '^State' "/proc/$pid/status" 2>/dev/null) wchan=$(cat "/proc/$pid/wchan" 2>/dev/null)"
        cat "/proc/$pid/stack" 2>/dev/null | head -20 || true
        echo "--- processes inside:"
        inside ps -eo pid,stat,wchan:24,args 2>&1 | head -20 || true
    fi
    echo "--- systemd's output:"
    tail -20 "$dir/systemd-$1.log" 2>/dev/null || true
    echo "--- kernel log (systemd lines):"
    dmesg 2>/dev/null | grep -i systemd | tail -8 || true
}

# Kills a sandbox that did not boot (SIGKILL to its PID 1 ends its PID namespace).
kill_sandbox() {
    if [[ -f $dir/pid ]]; then kill -KILL "$(cat "$dir/pid")" 2>/dev/null || true; fi
    kill -KILL "$(cat "$dir/unshare.pid" 2>/dev/null)" 2>/dev/null || true
    sleep 0.5
    rm -f "$dir/pid"
}

case "$cmd" in
start)
    mkdir -p "$dir"
    # The sandbox outlives this script: it must not hold any inherited descriptor (a caller
    # reading our stdout to EOF would wait for the sandbox to end).
    for fd in /proc/$$/fd/*; do
        n=${fd##*/}
        if ((n > 2)); then eval "exec $n>&-" 2>/dev/null || true; fi
    done
    # A boot that has not reached `running` in 40 s (it takes well under a second here, a few
    # under load) is reported with what PID 1 was doing, killed, and tried again: three tries.
    for attempt in 1 2 3; do
        boot "$attempt" && exit 0
        diagnose "$attempt" >&2
        kill_sandbox
    done
    echo "sandbox: systemd did not finish booting in three tries" >&2
    exit 1
    ;;
run)
    inside "$@"
    ;;
stop)
    [[ -f $dir/pid ]] || exit 0
    pid=$(cat "$dir/pid")
    inside systemctl poweroff >/dev/null 2>&1 || true
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        kill -KILL "$(cat "$dir/unshare.pid")" 2>/dev/null || true
    fi
    rm -f "$dir/pid"
    ;;
*)
    echo "usage: $0 start|run|stop DIR" >&2
    exit 2
    ;;
esac
