#!/usr/bin/env bash
# Runs Cairn's whole test suite on a fresh machine: installs the Debian packages the tests
# need, builds every product and test target (debug), then runs every test.
# Extra arguments go to `swift test` (e.g. --filter CairnRingTests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="/opt/swift/usr/bin:$PATH"

need=()
command -v pkg-config >/dev/null || need+=(pkg-config)
pkg-config --exists libsystemd 2>/dev/null || need+=(libsystemd-dev)
command -v curl >/dev/null || need+=(curl)
command -v redis-server >/dev/null || need+=(redis-server)   # the RESP target's test talks to a real Redis
if ((${#need[@]})); then
    echo "installing: ${need[*]}" >&2
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "swift not found (expected at /opt/swift/usr/bin)" >&2; exit 1; }

# Executables too: the process tests run the real cairnd and cairn binaries.
swift build --build-tests
swift test --skip-build "$@"
