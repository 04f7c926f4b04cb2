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

case "$cmd" in
start)
    mkdir -p "$dir"
    # The sandbox outlives this script: it must not hold any inherited descriptor (a caller
    # reading our stdout to EOF would wait for the sandbox to end).
    for fd in /proc/$$/fd/*; do
        n=${fd##*/}
        if ((n > 2)); then eval "exec $n>&-" 2>/dev/null || true; fi
    done
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
        exec /lib/systemd/systemd --system --unit=cairn-sandbox.target' >"$dir/systemd.log" 2>&1 </dev/null &
    echo $! >"$dir/unshare.pid"
    for _ in $(seq 1 100); do
        pid=$(pgrep -P "$(cat "$dir/unshare.pid")" || true)
        [[ -n $pid ]] && break
        sleep 0.1
    done
    [[ -n ${pid:-} ]] || { echo "sandbox: systemd did not start" >&2; exit 1; }
    echo "$pid" >"$dir/pid"
    for _ in $(seq 1 1200); do
        state=$(inside systemctl is-system-running 2>/dev/null || true)
        case "$state" in running | degraded) exit 0 ;; esac
        sleep 0.1
    done
    echo "sandbox: systemd did not finish booting (state: ${state:-unknown})" >&2
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
