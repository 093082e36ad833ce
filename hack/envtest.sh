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
# downloads about 750 MB of modules, fills about 3.7 GB of Go build cache and took 12 minutes on two busy cores
# (about 10 CPU minutes); later runs return at once.
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

# A version pinned in go.mod, so that go.mod is the one place to change them.
modver() { awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2; exit}' "$MODDIR/go.mod"; }

# build_helm DEST LDFLAGS STAMP: rebuilds DEST/helm alone (the control plane in DEST is current).
build_helm() {
    local dest="$1" flags="$2" stamp="$3" work start=$SECONDS
    log "building helm alone into $dest"
    work="$(mktemp -d "$dest/.helm-XXXXXX")"
    if ! (cd "$MODDIR" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
            go build -trimpath -ldflags "$flags" -o "$work/helm" helm.sh/helm/v3/cmd/helm); then
        rm -rf "$work"
        return 1
    fi
    mv "$work/helm" "$dest/helm"
    rm -rf "$work"
    echo "$stamp" >"$dest/.stamp-helm"
    log "built helm in $((SECONDS - start))s"
}

# Everything runs inside main, so bash has read the whole file before it starts (safe to edit meanwhile).
main() {
    if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
        if has_all "$KUBEBUILDER_ASSETS"; then
            log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
            echo "$KUBEBUILDER_ASSETS"
            return 0
        fi
        log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks some of ${BINARIES[*]}; using the cache instead"
    fi

    command -v go >/dev/null || { log "go is not installed"; return 1; }

    local k8s etcd helm
    k8s="$(modver k8s.io/kubernetes)"
    etcd="$(modver go.etcd.io/etcd/server/v3)"
    helm="$(modver helm.sh/helm/v3)"
    if [[ -z "$k8s" || -z "$etcd" || -z "$helm" ]]; then
        log "cannot read the pinned versions from $MODDIR/go.mod"
        return 1
    fi

    local cache_root="${XDG_DATA_HOME:-$HOME/.local/share}/modelmerge-envtest"
    local dest="$cache_root/${k8s#v}"

    # -X stamps the versions release builds report (the API server's /version, `helm version`): without them
    # the API server says v0.0.0-master, which fails the kubeVersion checks of charts and clients.
    local cb=k8s.io/component-base/version minor
    minor="$(cut -d. -f2 <<<"$k8s")"
    local ldflags="-s -w -X $cb.gitVersion=$k8s -X $cb.gitMajor=1 -X $cb.gitMinor=$minor"
    ldflags+=" -X $cb.gitTreeState=clean -X helm.sh/helm/v3/internal/version.version=$helm"
    # helm's default Kubernetes version (`helm template` without --kube-version, .Capabilities.KubeVersion) is
    # stamped from the client-go it is built with, as helm's own Makefile does; unstamped it says v1.20.0, below
    # the chart's kubeVersion. The other binaries ignore these symbols.
    local client_go helm_ldflags pkg
    client_go="$(modver k8s.io/client-go)"
    client_go="${client_go#v0.}"
    for pkg in pkg/chartutil pkg/lint/rules; do
        helm_ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=${client_go%%.*}"
    done

    # The cache is valid for exactly these modules and flags; helm has a stamp of its own, so that a change of
    # its flags rebuilds helm alone (seconds) instead of the control plane (minutes).
    local stamp helm_stamp
    stamp="$( (cat "$MODDIR/go.mod" "$MODDIR/go.sum"; echo "$ldflags") | sha256sum | cut -c1-16)"
    helm_stamp="$( (cat "$MODDIR/go.mod" "$MODDIR/go.sum"; echo "$ldflags$helm_ldflags") | sha256sum | cut -c1-16)"
    if has_all "$dest" && [[ "$(cat "$dest/.stamp" 2>/dev/null)" == "$stamp" ]]; then
        if [[ "$(cat "$dest/.stamp-helm" 2>/dev/null)" != "$helm_stamp" ]]; then
            build_helm "$dest" "$ldflags$helm_ldflags" "$helm_stamp" || return 1
        fi
        log "up to date: kubernetes $k8s, etcd $etcd, helm $helm"
        echo "$dest"
        return 0
    fi

    log "building kubernetes $k8s (kube-apiserver, kube-controller-manager), etcd $etcd, helm $helm" \
        "into $dest"
    mkdir -p "$cache_root"
    WORK="$(mktemp -d "$cache_root/.build-XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT

    # Static, stripped binaries without VCS stamping; go.sum is authoritative (-mod=readonly). One `go build`
    # invocation compiles all four so the packages they share (client-go, apimachinery, grpc, ...) build once.
    local start=$SECONDS
    (
        cd "$MODDIR"
        export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
        go build -trimpath -ldflags "$ldflags$helm_ldflags" -o "$WORK/" \
            k8s.io/kubernetes/cmd/kube-apiserver \
            k8s.io/kubernetes/cmd/kube-controller-manager \
            go.etcd.io/etcd/server/v3 \
            helm.sh/helm/v3/cmd/helm
    )
    # `go build -o DIR` names a package whose path ends in a major-version suffix after the element before it.
    mv "$WORK/server" "$WORK/etcd"
    has_all "$WORK" || { log "the build did not produce all of ${BINARIES[*]}"; return 1; }
    chmod 755 "$WORK"
    echo "$stamp" >"$WORK/.stamp"
    echo "$helm_stamp" >"$WORK/.stamp-helm"
    printf 'kubernetes %s\netcd %s\nhelm %s\n' "$k8s" "$etcd" "$helm" >"$WORK/VERSIONS"

    rm -rf "$dest"
    mv "$WORK" "$dest"
    trap - EXIT
    log "built in $((SECONDS - start))s"
    echo "$dest"
}

main "$@"
