#!/usr/bin/env bash
# Installs Cairn as systemd services on this machine, or removes what it installed.
#
#   Deploy/install.sh [install] [options]     build (release), install binaries, units, configs
#   Deploy/install.sh uninstall [options]     stop, disable and remove exactly what install wrote
#
# Options (same for both actions):
#   --prefix DIR     binaries go to DIR/bin                       (default /usr/local)
#   --confdir DIR    node configs NAME.conf                        (default /etc/cairn)
#   --unitdir DIR    systemd units; under /run means --runtime      (default /etc/systemd/system)
#   --nodes N        instances node1..nodeN on this machine, 1-9   (default 3)
#   --host ADDR      their listen address; node i uses ports 740i and 840i (default 127.0.0.1)
#   --cluster NAME   cluster.name                                  (default cairn)
#   --secret-file F  install F as CONFDIR/cluster.secret, the cluster's shared secret, instead of
#                    generating one (32 random bytes, hex); every machine of a cluster needs the same
#   --bin-dir DIR    install cairnd and cairn from DIR instead of building
#   --no-systemctl   do not run systemctl (daemon-reload, enable, disable)
#   --purge          uninstall: also delete the nodes' data under /var/lib/cairn
#
# Existing configs and secrets are never overwritten. The list of installed files is kept in
# CONFDIR/.installed-files; uninstall removes exactly those.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ACTION=install
PREFIX=/usr/local
CONFDIR=/etc/cairn
UNITDIR=/etc/systemd/system
NODES=3
HOST=127.0.0.1
CLUSTER=cairn
FROM=""
SECRET_FROM=""
SYSTEMCTL=1
PURGE=0

die() { echo "install.sh: $*" >&2; exit 1; }

if [[ $# -gt 0 && $1 != --* ]]; then ACTION=$1; shift; fi
while [[ $# -gt 0 ]]; do
    case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --confdir) CONFDIR=$2; shift 2 ;;
    --unitdir) UNITDIR=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --cluster) CLUSTER=$2; shift 2 ;;
    --bin-dir) FROM=$2; shift 2 ;;
    --secret-file) SECRET_FROM=$2; shift 2 ;;
    --no-systemctl) SYSTEMCTL=0; shift ;;
    --purge) PURGE=1; shift ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ $NODES =~ ^[1-9]$ ]] || die "--nodes must be 1-9"
MANIFEST="$CONFDIR/.installed-files"
RUNTIME=()
[[ $UNITDIR == /run/* ]] && RUNTIME=(--runtime)
INSTANCES=()
for ((i = 1; i <= NODES; i++)); do INSTANCES+=("cairnd@node$i.service"); done

record() { echo "$1" >>"$MANIFEST"; }

ensure_dir() { # create DIR and any missing parents, recording each one created ("d DIR")
    local d=$1 missing=()
    while [[ ! -d $d ]]; do missing=("$d" "${missing[@]}"); d=$(dirname "$d"); done
    for d in "${missing[@]}"; do mkdir "$d" && record "d $d"; done
}

put() { # put MODE SRC DEST: install a file and record it
    ensure_dir "$(dirname "$3")"
    install -m "$1" "$2" "$3"
    record "f $3"
}

render() { # render TEMPLATE DEST NAME
    local i=${3#node} members="" j
    for ((j = 1; j <= NODES; j++)); do members+="${members:+, }node$j@$HOST:740$j"; done
    sed -e "s|@BINDIR@|$PREFIX/bin|g" -e "s|@CONFDIR@|$CONFDIR|g" -e "s|@NAME@|$3|g" \
        -e "s|@LISTEN@|$HOST:740$i|g" -e "s|@HTTP@|$HOST:840$i|g" -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@MEMBERS@|$members|g" "$1" >"$2"
}

build() {
    export PATH="/opt/swift/usr/bin:$PATH"
    # shellcheck source=lib/packages.sh
    source "$ROOT/Deploy/lib/packages.sh"
    ensure_packages pkg-config pkg-config pkg:libsystemd libsystemd-dev
    # A static Swift runtime: the installed binaries do not depend on the toolchain's location.
    (cd "$ROOT" && swift build -c release --static-swift-stdlib --product cairnd >&2 &&
        swift build -c release --static-swift-stdlib --product cairn >&2)
    FROM="$(cd "$ROOT" && swift build -c release --static-swift-stdlib --show-bin-path)"
}

do_install() {
    [[ -n $FROM ]] || build
    [[ -x $FROM/cairnd && -x $FROM/cairn ]] || die "no cairnd/cairn in $FROM"
    if [[ ! -d $CONFDIR ]]; then # the manifest lives in CONFDIR: create it before recording
        local missing=() d=$CONFDIR
        while [[ ! -d $d ]]; do missing=("$d" "${missing[@]}"); d=$(dirname "$d"); done
        mkdir -p "$CONFDIR"
        for d in "${missing[@]}"; do record "d $d"; done
    fi
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    put 0755 "$FROM/cairnd" "$PREFIX/bin/cairnd"
    put 0755 "$FROM/cairn" "$PREFIX/bin/cairn"
    # The cluster secret every node config names (cluster.secret_file): root's, mode 0600; the
    # unit copies it for the node at each start.
    if [[ -e $CONFDIR/cluster.secret ]]; then
        echo "kept existing $CONFDIR/cluster.secret" >&2
    elif [[ -n $SECRET_FROM ]]; then
        put 0600 "$SECRET_FROM" "$CONFDIR/cluster.secret"
    else
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp/cluster.secret")
        put 0600 "$tmp/cluster.secret" "$CONFDIR/cluster.secret"
    fi
    render "$ROOT/Deploy/systemd/cairnd@.service.in" "$tmp/cairnd@.service" ""
    put 0644 "$tmp/cairnd@.service" "$UNITDIR/cairnd@.service"
    put 0644 "$ROOT/Deploy/systemd/cairn.target" "$UNITDIR/cairn.target"
    for ((i = 1; i <= NODES; i++)); do
        if [[ -e $CONFDIR/node$i.conf ]]; then
            echo "kept existing $CONFDIR/node$i.conf" >&2
        else
            render "$ROOT/Deploy/config/node.conf.in" "$tmp/node$i.conf" "node$i"
            put 0644 "$tmp/node$i.conf" "$CONFDIR/node$i.conf"
        fi
    done
    if ((SYSTEMCTL)); then
        systemctl daemon-reload
        systemctl enable "${RUNTIME[@]}" cairn.target "${INSTANCES[@]}" >&2
    fi
    cat <<MSG
Installed cairnd and cairn in $PREFIX/bin, units in $UNITDIR, configs in $CONFDIR.
  systemctl start cairn.target                 # start node1..node$NODES
  systemctl status 'cairnd@node1'              # STATUS line: serving; peers up k of n
  journalctl -u 'cairnd@node1' -f              # the node's log
  $PREFIX/bin/cairn --node $HOST:7401 members
Remove it all with: Deploy/install.sh uninstall (add --purge to delete data)
MSG
}

do_uninstall() {
    if ((SYSTEMCTL)); then
        systemctl disable --now "${RUNTIME[@]}" "${INSTANCES[@]}" cairn.target >&2 2>/dev/null || true
    fi
    if [[ -f $MANIFEST ]]; then
        local entries kind path
        entries="$(tac "$MANIFEST")"
        rm -f -- "$MANIFEST"
        # Newest first: files, then the directories install created (removed only if empty).
        while read -r kind path; do
            case "$kind" in
            f) rm -f -- "$path" ;;
            d) rmdir -- "$path" 2>/dev/null || true ;;
            esac
        done <<<"$entries"
    fi
    ((SYSTEMCTL)) && systemctl daemon-reload
    if ((PURGE)); then rm -rf /var/lib/cairn /var/lib/private/cairn; fi
    echo "Removed what install.sh installed$( ((PURGE)) && echo ", and the nodes' data")." >&2
}

case "$ACTION" in
install) do_install ;;
uninstall) do_uninstall ;;
*) die "unknown action $ACTION (install or uninstall)" ;;
esac
