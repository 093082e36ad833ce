#!/usr/bin/env bash
# Builds a local Python base image for the three Dockerfiles on machines that cannot pull
# docker.io/library/python (no registry): Debian bookworm with Debian's python3 (3.11), python3-venv and
# ca-certificates, made with mmdebstrap and imported into the container engine's image store
# (hack/container-engine.sh picks docker or podman). `make images` uses it only when the registry base cannot be
# pulled; with a registry nothing here runs.
#
# Cached by content hash outside the repository: the hash covers this script (suite, packages, options) and the
# mirror; the root filesystem tarball is kept in
#
#     ${XDG_CACHE_HOME:-$HOME/.cache}/modelmerge-images/python-base-<hash>.tar
#
# and the image is tagged localhost/modelmerge/python-base:<hash>. A second run finds the image (instant), or
# imports the kept tarball (seconds) when the engine's store was emptied. The last line on stdout is the image
# reference, for `--build-arg PYTHON_IMAGE=...`. Needs root (or mmdebstrap's unshare mode) and a Debian mirror.
set -euo pipefail

SUITE=bookworm
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

log() { echo "base-image: $*" >&2; }

main() {
    local here engine hash cache image tarball
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    engine="$(bash "$here/container-engine.sh")"
    hash="$( (cat "${BASH_SOURCE[0]}"; echo "$MIRROR $SECURITY_MIRROR") | sha256sum | cut -c1-16)"
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/modelmerge-images"
    image="localhost/modelmerge/python-base:$hash"
    tarball="$cache/python-base-$hash.tar"

    if "$engine" image inspect "$image" >/dev/null 2>&1; then
        log "up to date: $image"
        echo "$image"
        return 0
    fi
    if [[ ! -s "$tarball" ]]; then
        command -v mmdebstrap >/dev/null || { log "mmdebstrap is not installed (apt-get install mmdebstrap)"; return 1; }
        mkdir -p "$cache"
        local partial
        partial="$(mktemp "$cache/.python-base-XXXXXX.tar")"
        trap 'rm -f "$partial"' EXIT
        log "building a $SUITE root filesystem with $PACKAGES (1-2 minutes)"
        # minbase: Essential packages plus apt; documentation, man pages and locales other than C are left out.
        mmdebstrap --quiet --variant=minbase --include="$PACKAGES" --format=tar \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
            --dpkgopt='path-exclude=/usr/share/info/*' \
            --aptopt='Acquire::Languages "none"' \
            --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
            "$SUITE" "$partial" \
            "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
            "deb $SECURITY_MIRROR $SUITE-security main"
        mv "$partial" "$tarball"
        trap - EXIT
    fi
    log "importing $tarball as $image"
    "$engine" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$image" >/dev/null
    echo "$image"
}

main "$@"
