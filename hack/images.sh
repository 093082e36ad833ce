#!/usr/bin/env bash
# Builds the three images (`make images`) with docker or podman (hack/container-engine.sh), from the repository
# root as build context:
#
#     $IMAGE_REGISTRY/operator:$IMAGE_TAG    operator/Dockerfile
#     $IMAGE_REGISTRY/api:$IMAGE_TAG         api/Dockerfile
#     $IMAGE_REGISTRY/merge:$IMAGE_TAG       merge_image/Dockerfile --target merge (CUDA torch), or with
#     $IMAGE_REGISTRY/merge:$IMAGE_TAG-cpu   MERGE_TARGET=merge-cpu (no torch, CPU kernels only)
#
# Base: $PYTHON_IMAGE (the registry's python:3.11 slim bookworm) when it is in the image store or can be pulled;
# otherwise the local base of hack/base-image.sh (mmdebstrap), passed as --build-arg PYTHON_IMAGE.
# pip inside the build gets $PIP_CERT (a CA bundle, e.g. for a TLS-intercepting proxy) as the build secret
# `pip_cert` when it is set; it never reaches an image layer. MERGE_BUILD_ARGS adds arguments to the merge build
# (e.g. --build-arg TORCH_INDEX_URL=...; split on spaces).
# MERGE_PRECOMPILE: the merge image's numba precompile (its build arg PRECOMPILE: the arguments of
# `python -m modelmerge_engine.precompile`, spaces allowed, or `skip`). Unset or empty: the Dockerfile's default,
# every method in every dtype with 1-8 fine-tunes, as release images ship; a long build step on few cores.
#
# Cache: each image is keyed by a content hash of its Dockerfile, every file of the build context (the
# .dockerignore whitelist), the base image's ID, the target and the build arguments. A key already built is
# tagged from the engine's store at once, or loaded from ${XDG_CACHE_HOME:-$HOME/.cache}/modelmerge-images/
# (an archive saved after each build, the folder CI keeps between runs) when the store was emptied.
# The last lines on stdout are the three image references.
set -euo pipefail

log() { echo "images: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REGISTRY="${IMAGE_REGISTRY:-ghcr.io/modelmerge}"
TAG="${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")}"
MERGE_TARGET="${MERGE_TARGET:-merge}"
PYTHON_IMAGE="${PYTHON_IMAGE:-docker.io/library/python:3.11.11-slim-bookworm}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/modelmerge-images"

# The files `docker build` sends: the `!path` lines of .dockerignore, without bytecode.
context_hash() {
    local paths
    mapfile -t paths < <(sed -n 's/^!//p' "$ROOT/.dockerignore")
    (cd "$ROOT" && find "${paths[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
        | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-64
}

base_image() {
    if "$ENGINE" image inspect "$PYTHON_IMAGE" >/dev/null 2>&1 || "$ENGINE" pull -q "$PYTHON_IMAGE" >&2; then
        echo "$PYTHON_IMAGE"
    else
        log "cannot pull $PYTHON_IMAGE: using the local base of hack/base-image.sh"
        bash "$ROOT/hack/base-image.sh" | tail -n1
    fi
}

# build NAME REF DOCKERFILE TARGET [BUILD ARGS...]
build() {
    local name="$1" ref="$2" dockerfile="$3" target="$4"
    shift 4
    local key cached archive
    key="$( (echo "$CONTEXT $BASE_ID $target $*"; cat "$ROOT/$dockerfile") | sha256sum | cut -c1-16)"
    cached="localhost/modelmerge-cache/$name:$key"
    archive="$CACHE/$name-$key.tar"
    if ! "$ENGINE" image inspect "$cached" >/dev/null 2>&1 && [[ -s "$archive" ]]; then
        log "$name: loading $archive"
        "$ENGINE" load -q -i "$archive" >&2
    fi
    if "$ENGINE" image inspect "$cached" >/dev/null 2>&1; then
        log "$name: up to date ($key)"
    else
        local secret=() network=()
        [[ -n "${PIP_CERT:-}" && -s "${PIP_CERT:-}" ]] && secret=(--secret "id=pip_cert,src=$PIP_CERT")
        # podman's default build network (CNI/netavark) may not reach the registry from a sandbox; docker's does.
        [[ "$ENGINE" == podman ]] && network=(--network host)
        log "$name: building $dockerfile --target $target ($key)"
        "$ENGINE" build -f "$ROOT/$dockerfile" --target "$target" --build-arg "PYTHON_IMAGE=$BASE" \
            "${secret[@]}" "${network[@]}" "$@" -t "$cached" "$ROOT" >&2
        mkdir -p "$CACHE"
        rm -f "$CACHE/$name"-*.tar
        "$ENGINE" save -o "$archive.partial" "$cached" >&2 && mv "$archive.partial" "$archive"
    fi
    "$ENGINE" tag "$cached" "$ref"
}

main() {
    case "$MERGE_TARGET" in
        merge) local merge_ref="$REGISTRY/merge:$TAG" ;;
        merge-cpu) local merge_ref="$REGISTRY/merge:$TAG-cpu" ;;
        *) log "MERGE_TARGET must be merge (CUDA torch) or merge-cpu (no torch), got '$MERGE_TARGET'"; return 2 ;;
    esac
    ENGINE="$(bash "$ROOT/hack/container-engine.sh")"
    BASE="$(base_image)"
    BASE_ID="$("$ENGINE" image inspect --format '{{.Id}}' "$BASE")"
    CONTEXT="$(context_hash)"
    local merge_args=()
    read -r -a merge_args <<<"${MERGE_BUILD_ARGS:-}"
    [[ -n "${MERGE_PRECOMPILE:-}" ]] && merge_args+=(--build-arg "PRECOMPILE=$MERGE_PRECOMPILE")
    log "engine $ENGINE, base $BASE"
    build operator "$REGISTRY/operator:$TAG" operator/Dockerfile operator
    build api "$REGISTRY/api:$TAG" api/Dockerfile api
    build "$MERGE_TARGET" "$merge_ref" merge_image/Dockerfile "$MERGE_TARGET" "${merge_args[@]}"
    printf '%s\n' "$REGISTRY/operator:$TAG" "$REGISTRY/api:$TAG" "$merge_ref"
}

main "$@"
