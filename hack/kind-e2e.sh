#!/usr/bin/env bash
# End-to-end test on a kind cluster (`make kind-e2e`): needs Docker, kind, kubectl and helm (helm from PATH, else
# the one `make envtest` builds). It
#
#   1. creates a kind cluster (or reuses one named $KIND_CLUSTER),
#   2. builds the operator and API images and a CPU-only merge image, plus a fixture image FROM the merge image
#      with tiny models baked in at /models (tests/helpers/models.py's make_family, with transformers added to that
#      image only), and loads them into kind,
#   3. `helm install`s charts/modelmerge with those images (pullPolicy Never) and waits for the Deployments,
#   4. applies examples/modelmerge-tiny.yaml (one merge per method) and waits until every one is Succeeded,
#   5. submits one more merge through the REST API, and fetches outputs through the API (file list + tar archive),
#   6. `helm uninstall`s and checks that the CRD, the ModelMerges and the output claim are still there,
#   7. deletes the cluster (KEEP_CLUSTER=1 keeps it, and keeps the release installed).
#
# The envtest tests (tests/test_rbac.py) exercise the same chart, install, example manifests, merges and API
# downloads without Docker; what only this script covers is the images themselves and a real kubelet/scheduler.
#
# Settings (environment): KIND_CLUSTER (modelmerge-e2e), NAMESPACE (modelmerge), IMAGE_REGISTRY
# (localhost/modelmerge), IMAGE_TAG (e2e), KEEP_CLUSTER (0), TIMEOUT (600 s per wait), TORCH_INDEX_URL (CPU wheels).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CLUSTER="${KIND_CLUSTER:-modelmerge-e2e}"
NAMESPACE="${NAMESPACE:-modelmerge}"
RELEASE=modelmerge # examples/ name the claim "modelmerge-output", the chart's claim for this release name
REGISTRY="${IMAGE_REGISTRY:-localhost/modelmerge}"
TAG="${IMAGE_TAG:-e2e}"
KEEP="${KEEP_CLUSTER:-0}"
TIMEOUT="${TIMEOUT:-600}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
API_TOKEN="e2e-$(date +%s)-$RANDOM"
LOCAL_PORT="${LOCAL_PORT:-18080}"
WORK="$(mktemp -d)"
PORT_FORWARD_PID=""
CREATED_CLUSTER=0

log() { echo "kind-e2e: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

need() {
    command -v "$1" >/dev/null || die "$1 is required ($2)"
}

find_helm() {
    if command -v helm >/dev/null; then
        command -v helm
        return
    fi
    local candidate cached=""
    for candidate in "${XDG_DATA_HOME:-$HOME/.local/share}"/modelmerge-envtest/*/helm; do
        [[ -x "$candidate" ]] && cached="$candidate"
    done
    [[ -n "$cached" ]] || die "helm is required (install it, or run \`make envtest\`)"
    echo "$cached"
}

diagnostics() {
    log "diagnostics:"
    kubectl -n "$NAMESPACE" get mm,jobs,pods,pvc -o wide >&2 || true
    kubectl -n "$NAMESPACE" get events --sort-by=.lastTimestamp >&2 | tail -n 40 || true
    kubectl -n "$NAMESPACE" logs "deploy/$RELEASE-operator" --tail=80 >&2 || true
    kubectl -n "$NAMESPACE" logs "deploy/$RELEASE-api" --tail=80 >&2 || true
    for mm in $(kubectl -n "$NAMESPACE" get mm -o name 2>/dev/null); do
        kubectl -n "$NAMESPACE" describe "$mm" >&2 || true
    done
}

cleanup() {
    local rc=$?
    [[ $rc -ne 0 ]] && diagnostics
    [[ -n "$PORT_FORWARD_PID" ]] && kill "$PORT_FORWARD_PID" 2>/dev/null || true
    if [[ "$KEEP" != "1" && "$CREATED_CLUSTER" == "1" ]]; then
        log "deleting kind cluster $CLUSTER"
        kind delete cluster --name "$CLUSTER" >&2 || true
    fi
    rm -rf "$WORK"
    if [[ $rc -eq 0 ]]; then log "PASSED"; else log "exit code $rc"; fi
    exit $rc
}

api() { # api METHOD PATH [curl args...]: a REST call through the port-forward, with the bearer token
    local method="$1" path="$2"
    shift 2
    curl -fsS -X "$method" -H "Authorization: Bearer $API_TOKEN" "http://127.0.0.1:$LOCAL_PORT$path" "$@"
}

json() { python3 -c "import json, sys; data = json.load(sys.stdin); print($1)"; }

wait_all_succeeded() { # the ModelMerges named in $@ reach Succeeded; any Failed/Cancelled fails at once
    local deadline=$((SECONDS + TIMEOUT)) name phase pending
    while true; do
        pending=0
        for name in "$@"; do
            phase="$(kubectl -n "$NAMESPACE" get mm "$name" -o jsonpath='{.status.phase}')"
            case "$phase" in
                Succeeded) ;;
                Failed | Cancelled) die "ModelMerge $name is $phase: $(kubectl -n "$NAMESPACE" get mm "$name" -o jsonpath='{.status.message}')" ;;
                *) pending=1 ;;
            esac
        done
        [[ $pending -eq 0 ]] && return 0
        ((SECONDS < deadline)) || die "ModelMerges not Succeeded after ${TIMEOUT}s"
        sleep 3
    done
}

main() {
    need docker "a Docker engine: https://docs.docker.com/engine/install/"
    need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
    need kubectl "https://kubernetes.io/docs/tasks/tools/"
    need curl "to call the REST API"
    need python3 "to read JSON answers"
    docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info failed)"
    local helm
    helm="$(find_helm)"
    trap cleanup EXIT

    # 1. The cluster.
    if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        log "reusing kind cluster $CLUSTER"
    else
        log "creating kind cluster $CLUSTER"
        kind create cluster --name "$CLUSTER" --wait 180s
        CREATED_CLUSTER=1
    fi
    kubectl config use-context "kind-$CLUSTER" >/dev/null

    # 2. Images: the production Dockerfiles; the merge image with CPU torch wheels (small, no GPU in kind) and
    # without precompiled kernels (the full set takes tens of minutes to build; the pods compile on first use).
    log "building images (tag $TAG)"
    docker build -f merge_image/Dockerfile --target merge --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
        --build-arg PRECOMPILE=skip \
        -t "$REGISTRY/merge:$TAG" .
    docker build -f operator/Dockerfile -t "$REGISTRY/operator:$TAG" .
    docker build -f api/Dockerfile -t "$REGISTRY/api:$TAG" .
    # The fixture: the merge image plus a tiny base model and two fine-tunes at /models (made at build time).
    docker build -t "$REGISTRY/merge-tiny:$TAG" -f - . <<EOF
FROM $REGISTRY/merge:$TAG
USER 0
COPY tests/helpers/models.py /opt/fixture/tiny_models.py
# transformers only makes the fixture models (random weights from a config); the merge itself does not use it.
RUN pip install --no-cache-dir transformers tokenizers
RUN HF_HUB_OFFLINE=1 HOME=/tmp python -c "import sys; from pathlib import Path; sys.path.insert(0, '/opt/fixture'); \
from tiny_models import make_family; make_family(Path('/models'), n=2)" && chmod -R a+rX /models && rm -rf /tmp/*
USER 10001:10001
EOF
    kind load docker-image --name "$CLUSTER" "$REGISTRY/merge-tiny:$TAG" "$REGISTRY/operator:$TAG" \
        "$REGISTRY/api:$TAG"

    # 3. The chart, as a user installs it (plus test-sized merge defaults and the fixture as merge image).
    log "helm install $RELEASE into $NAMESPACE"
    "$helm" upgrade --install "$RELEASE" charts/modelmerge --namespace "$NAMESPACE" --create-namespace \
        --set "images.operator.repository=$REGISTRY/operator,images.operator.tag=$TAG,images.operator.pullPolicy=Never" \
        --set "images.api.repository=$REGISTRY/api,images.api.tag=$TAG,images.api.pullPolicy=Never" \
        --set "images.merge.repository=$REGISTRY/merge-tiny,images.merge.tag=$TAG,images.merge.pullPolicy=Never" \
        --set "merge.resources.cpu=1,merge.resources.memory=2Gi,merge.resources.shmSize=256Mi" \
        --set-string "merge.env.HF_HUB_OFFLINE=1" \
        --set "storage.output.size=2Gi" \
        --set "api.auth.token=$API_TOKEN" \
        --wait --timeout "${TIMEOUT}s"
    kubectl get crd modelmerges.modelmerge.io >/dev/null
    kubectl -n "$NAMESPACE" rollout status "deploy/$RELEASE-operator" --timeout "${TIMEOUT}s"
    kubectl -n "$NAMESPACE" rollout status "deploy/$RELEASE-api" --timeout "${TIMEOUT}s"

    # 4. The example manifests, with kubectl.
    log "applying examples/modelmerge-tiny.yaml"
    kubectl -n "$NAMESPACE" apply -f examples/modelmerge-tiny.yaml
    local names
    mapfile -t names < <(kubectl -n "$NAMESPACE" get -f examples/modelmerge-tiny.yaml -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
    [[ ${#names[@]} -eq 5 ]] || die "expected 5 ModelMerges in examples/modelmerge-tiny.yaml, got ${#names[@]}"
    wait_all_succeeded "${names[@]}"
    kubectl -n "$NAMESPACE" get mm -o wide
    kubectl -n "$NAMESPACE" describe mm tiny-task-arithmetic | tail -n 20

    # 5. The REST API: status of the kubectl merges, one merge submitted through it, outputs fetched.
    kubectl -n "$NAMESPACE" port-forward "svc/$RELEASE" "$LOCAL_PORT:80" >"$WORK/port-forward.log" 2>&1 &
    PORT_FORWARD_PID=$!
    local deadline=$((SECONDS + 60))
    until curl -fsS "http://127.0.0.1:$LOCAL_PORT/api/health" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "the API is not reachable through port-forward: $(cat "$WORK/port-forward.log")"
        sleep 1
    done
    [[ "$(api GET /api/health | json 'data["merging_available"]')" == "True" ]] || die "the API cannot merge"
    [[ "$(api GET /api/jobs/tiny-mask | json 'data["status"]')" == "completed" ]] || die "tiny-mask is not completed"
    local job
    job="$(api POST /api/merge -H 'Content-Type: application/json' -d '{"base_model": "/models/base",
        "models_to_merge": ["/models/ft0", "/models/ft1"], "merge_method": "ties_merging", "dtype": "float32"}' \
        | json 'data["job_id"]')"
    log "submitted $job through the API"
    wait_all_succeeded "$job"
    for name in tiny-task-arithmetic "$job"; do
        api GET "/api/download/$name" >"$WORK/$name.json"
        json '"\n".join(f["path"] for f in data["files"])' <"$WORK/$name.json" | grep -qx config.json \
            || die "the output of $name has no config.json"
        api GET "/api/download/$name/archive" -o "$WORK/$name.tar"
        tar -tf "$WORK/$name.tar" | grep -q '\.safetensors$' || die "the archive of $name has no safetensors"
        log "fetched $name through the API ($(wc -c <"$WORK/$name.tar") bytes)"
    done
    curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$LOCAL_PORT/api/jobs" | grep -qx 401 \
        || die "the API answered without a token"
    kill "$PORT_FORWARD_PID" 2>/dev/null || true
    PORT_FORWARD_PID=""

    # 6. Uninstall keeps the CRD, the ModelMerges and the merged models.
    if [[ "$KEEP" == "1" ]]; then
        log "KEEP_CLUSTER=1: leaving the release installed"
        return 0
    fi
    "$helm" uninstall "$RELEASE" --namespace "$NAMESPACE" --wait --timeout "${TIMEOUT}s"
    kubectl get crd modelmerges.modelmerge.io >/dev/null || die "the CRD went with the release"
    kubectl -n "$NAMESPACE" get mm tiny-mask >/dev/null || die "the ModelMerges went with the release"
    kubectl -n "$NAMESPACE" get pvc "$RELEASE-output" >/dev/null || die "the output claim went with the release"
}

main "$@"
