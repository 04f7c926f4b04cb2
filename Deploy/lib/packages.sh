# shellcheck shell=bash
# Sourced by the project's scripts: installs the Debian packages whose check fails.
#
#   ensure_packages CHECK PACKAGE [CHECK PACKAGE ...]
#
# CHECK is a command name (present on PATH?) or pkg:NAME (pkg-config --exists NAME). Uses sudo
# when not root; runs `apt-get update` once, and only when something is missing.
ensure_packages() {
    local missing=() check package
    while (($# >= 2)); do
        check=$1
        package=$2
        shift 2
        case "$check" in
        pkg:*) pkg-config --exists "${check#pkg:}" 2>/dev/null || missing+=("$package") ;;
        *) command -v "$check" >/dev/null || missing+=("$package") ;;
        esac
    done
    ((${#missing[@]})) || return 0
    echo "installing: ${missing[*]}" >&2
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
