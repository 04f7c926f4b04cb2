# The cluster scripts' packages and binaries (sourced, not run). The caller defines ROOT, `log`,
# `die` and BIN_DIR (empty: build; otherwise use the binaries there).

# install_deps: curl, jq, python3, and what the release build needs when it builds.
install_deps() {
    # shellcheck source=../../Deploy/lib/packages.sh
    source "$ROOT/Deploy/lib/packages.sh"
    local build=()
    [[ -z "$BIN_DIR" ]] && build=(pkg-config pkg-config pkg:libsystemd libsystemd-dev)
    ensure_packages curl curl jq jq python3 python3 "${build[@]}"
}

# build: sets BIN to the directory holding cairnd, cairn and cairn-load (release), building them
# unless BIN_DIR is given or SKIP_BUILD=1.
build() {
    if [[ -n "$BIN_DIR" ]]; then
        BIN="$BIN_DIR"
    else
        command -v swift >/dev/null || die "swift not found (expected at /opt/swift/usr/bin)"
        if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
            log "building cairnd, cairn and cairn-load (release)..."
            local p
            for p in cairnd cairn cairn-load; do
                (cd "$ROOT" && swift build -c release --product "$p" >&2)
            done
        fi
        BIN="$(cd "$ROOT" && swift build -c release --show-bin-path)"
    fi
    local b
    for b in cairnd cairn cairn-load; do [[ -x "$BIN/$b" ]] || die "no $b in $BIN"; done
}
