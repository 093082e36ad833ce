#!/usr/bin/env bash
# Provides the binaries the integration tests need: kube-apiserver, kube-controller-manager, etcd and helm.
#
# They are built with `go build` from the Go modules pinned in hack/envtest/go.mod (k8s.io/kubernetes plus its
# staging modules, go.etcd.io/etcd/server/v3, helm.sh/helm/v3) into a per-user cache outside the repository:
#
#     ${XDG_DATA_HOME:-$HOME/.local/share}/modelmerge-envtest/<k8s-version>/
#
# A build happens only when that folder lacks a binary or was built from another go.mod/go.sum or other flags
# (a stamp file records their hash). When KUBEBUILDER_ASSETS names a folder that already holds all four
# binaries, that folder is used and nothing is built. Progress goes to stderr; the last line on stdout is the
# asset folder, so
#
#     export KUBEBUILDER_ASSETS="$(bash hack/envtest.sh | tail -n1)"
#
# works. Needs only Go (the version in hack/envtest/go.mod or newer) and the Go module proxy. The first build
# takes a while (tens of minutes on two cores); later runs return at once.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODDIR="$HERE/envtest"
BINARIES=(kube-apiserver kube-controller-manager etcd helm)

log() { echo "envtest: $*" >&2; }

has_all() {
    local dir="$1" b
    for b in "${BINARIES[@]}"; do
        [[ -x "$dir/$b" ]] || return 1
    done
}

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    if has_all "$KUBEBUILDER_ASSETS"; then
        log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
        echo "$KUBEBUILDER_ASSETS"
        exit 0
    fi
    log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks some of ${BINARIES[*]}; using the cache instead"
fi

command -v go >/dev/null || { log "go is not installed"; exit 1; }

# The pinned versions, read from go.mod so that it is the one place to change them.
modver() { awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2; exit}' "$MODDIR/go.mod"; }
K8S_VERSION="$(modver k8s.io/kubernetes)"
ETCD_VERSION="$(modver go.etcd.io/etcd/server/v3)"
HELM_VERSION="$(modver helm.sh/helm/v3)"
[[ -n "$K8S_VERSION" && -n "$ETCD_VERSION" && -n "$HELM_VERSION" ]] || {
    log "cannot read the pinned versions from $MODDIR/go.mod"
    exit 1
}

CACHE_ROOT="${XDG_DATA_HOME:-$HOME/.local/share}/modelmerge-envtest"
DEST="$CACHE_ROOT/${K8S_VERSION#v}"

# -X stamps the versions the release builds report (the API server's /version, `helm version`): without them
# the API server says v0.0.0-master, which fails kubeVersion checks of charts and clients.
K8S_MINOR="$(cut -d. -f2 <<<"$K8S_VERSION")"
CB=k8s.io/component-base/version
LDFLAGS="-s -w -X $CB.gitVersion=$K8S_VERSION -X $CB.gitMajor=1 -X $CB.gitMinor=$K8S_MINOR"
LDFLAGS+=" -X $CB.gitTreeState=clean -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
# The cache is valid for exactly these modules and flags.
STAMP="$( (cat "$MODDIR/go.mod" "$MODDIR/go.sum"; echo "$LDFLAGS") | sha256sum | cut -c1-16)"

if has_all "$DEST" && [[ "$(cat "$DEST/.stamp" 2>/dev/null)" == "$STAMP" ]]; then
    log "up to date: kubernetes $K8S_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION"
    echo "$DEST"
    exit 0
fi

log "building kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager), etcd $ETCD_VERSION," \
    "helm $HELM_VERSION into $DEST"
mkdir -p "$CACHE_ROOT"
WORK="$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Static, stripped binaries without VCS stamping; go.sum is authoritative (-mod=readonly). One `go build`
# invocation compiles all four so the packages they share (client-go, apimachinery, grpc, ...) build once.
export CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false"
start=$SECONDS
(
    cd "$MODDIR"
    go build -trimpath -ldflags "$LDFLAGS" -o "$WORK/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        go.etcd.io/etcd/server/v3 \
        helm.sh/helm/v3/cmd/helm
)
# `go build -o DIR` names a package path ending in a major-version suffix after the element before it.
mv "$WORK/server" "$WORK/etcd"
has_all "$WORK" || { log "the build did not produce all of ${BINARIES[*]}"; exit 1; }
chmod 755 "$WORK"
echo "$STAMP" >"$WORK/.stamp"
printf 'kubernetes %s\netcd %s\nhelm %s\n' "$K8S_VERSION" "$ETCD_VERSION" "$HELM_VERSION" >"$WORK/VERSIONS"

rm -rf "$DEST"
mv "$WORK" "$DEST"
trap - EXIT
log "built in $((SECONDS - start))s"
echo "$DEST"
