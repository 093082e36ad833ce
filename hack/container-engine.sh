#!/usr/bin/env bash
# Prints the container engine `make images`, hack/base-image.sh and the container tests use: $CONTAINER_ENGINE when
# set, else docker when its daemon answers, else podman when installed. Fails with a message when there is neither.
set -euo pipefail
if [[ -n "${CONTAINER_ENGINE:-}" ]]; then
    command -v "$CONTAINER_ENGINE" >/dev/null || { echo "CONTAINER_ENGINE=$CONTAINER_ENGINE is not installed" >&2; exit 1; }
    echo "$CONTAINER_ENGINE"
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo docker
elif command -v podman >/dev/null; then
    echo podman
else
    echo "no container engine: install podman, or docker with a running daemon (or set CONTAINER_ENGINE)" >&2
    exit 1
fi
