# The generator scripts' packages and build (sourced, not run). The caller defines ROOT, `log`,
# `die` and optionally BIN_DIR (use the cairn-load there, no build) and SKIP_BUILD=1.

# install_generator_deps [COMMAND PACKAGE]...: Redis, python3, what the release build needs (unless
# BIN_DIR is set), and the extra command/package pairs.
install_generator_deps() {
    # shellcheck source=../../Deploy/lib/packages.sh
    source "$ROOT/Deploy/lib/packages.sh"
    local build=()
    [[ -z "${BIN_DIR:-}" ]] && build=(pkg-config pkg-config pkg:libsystemd libsystemd-dev)
    ensure_packages redis-server redis-server python3 python3 "$@" "${build[@]}"
}

# build_generator: sets BIN to the directory holding cairn-load (release), building it unless
# BIN_DIR is given or SKIP_BUILD=1.
build_generator() {
    if [[ -n "${BIN_DIR:-}" ]]; then
        BIN="$BIN_DIR"
    else
        command -v swift >/dev/null || die "swift not found (expected at /opt/swift/usr/bin)"
        if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
            log "building cairn-load (release)..."
            (cd "$ROOT" && swift build -c release --product cairn-load >&2)
        fi
        BIN="$(cd "$ROOT" && swift build -c release --show-bin-path)"
    fi
    [[ -x "$BIN/cairn-load" ]] || die "no cairn-load in $BIN"
}
