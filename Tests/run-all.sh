#!/usr/bin/env bash
# Runs Cairn's whole test suite on a fresh machine: installs the Debian packages the tests
# need, builds every product and test target (debug), then runs every test.
# Extra arguments go to `swift test` (e.g. --filter CairnRingTests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="/opt/swift/usr/bin:$PATH"

# shellcheck source=../Deploy/lib/packages.sh
source "$ROOT/Deploy/lib/packages.sh"
# libsystemd for the CSystemd module; curl for the scripts; redis-server for the RESP target's test;
# ip and nft for cairn-torture's network namespaces and partitions.
ensure_packages pkg-config pkg-config pkg:libsystemd libsystemd-dev curl curl redis-server redis-server \
    ip iproute2 nft nftables
command -v swift >/dev/null || { echo "swift not found (expected at /opt/swift/usr/bin)" >&2; exit 1; }

# Executables too: the process tests run the real cairnd and cairn binaries.
swift build --build-tests
if (($#)); then
    swift test --skip-build "$@"
else
    # cairn-torture's runs start their own clusters and load both cores for a minute or more:
    # they run after the rest, with the machine to themselves, so no other test's timing depends on them.
    swift test --skip-build --skip TortureRunTests --skip CairnSimTests
    swift test --skip-build --filter TortureRunTests
    # The simulations drive their own threads flat out: they too run with the machine to themselves.
    swift test --skip-build --filter CairnSimTests
fi
