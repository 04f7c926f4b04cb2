# The benchmark scripts' packages and release binaries (sourced, not run). The caller defines
# ROOT, `log`, `die` and optionally BIN_DIR (use the binaries there, no build) and SKIP_BUILD=1.

# install_packages [COMMAND PACKAGE]...: these command/package pairs (`ensure_packages`), and
# what the release build needs unless BIN_DIR is set.
install_packages() {
    # shellcheck source=../../Deploy/lib/packages.sh
    source "$ROOT/Deploy/lib/packages.sh"
    local build=()
    [[ -z "${BIN_DIR:-}" ]] && build=(pkg-config pkg-config pkg:libsystemd libsystemd-dev)
    ensure_packages "$@" "${build[@]}"
}

# release_binaries PRODUCT...: sets BIN to the directory holding the products (release), building
# them unless BIN_DIR is given or SKIP_BUILD=1; dies if one is missing there.
release_binaries() {
    if [[ -n "${BIN_DIR:-}" ]]; then
        BIN="$BIN_DIR"
    else
        command -v swift >/dev/null || die "swift not found (expected at /opt/swift/usr/bin)"
        if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
            log "building $* (release)..."
            local p
            for p in "$@"; do
                (cd "$ROOT" && swift build -c release --product "$p" >&2)
            done
        fi
        BIN="$(cd "$ROOT" && swift build -c release --show-bin-path)"
    fi
    local b
    for b in "$@"; do [[ -x "$BIN/$b" ]] || die "no $b in $BIN"; done
}

# The cluster scripts' set: curl, jq, python3; cairnd, cairn and cairn-load.
install_deps() { install_packages curl curl jq jq python3 python3; }
build() { release_binaries cairnd cairn cairn-load; }
