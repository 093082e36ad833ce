"""Operator settings: command-line flags of `modelmerge operator`, each with an environment variable default
(so a Deployment can set them either way)."""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass

from pydantic import ValidationError

from modelmerge import __version__
from modelmerge.contract import MergeResources

# The `merge` target of merge_image/Dockerfile: torch (CUDA wheels) besides the CPU engine; the `merge-cpu` target
# (tag suffix -cpu) has no torch, so it cannot evaluate.
DEFAULT_IMAGE = f"ghcr.io/modelmerge/merge:{__version__}"
# Memory of an evaluated merge whose ModelMerge states none. Evaluation loads the merged model (and with baselines
# each input, one at a time) as a transformers model: float32 on CPU is 4 bytes per parameter, plus the logits of one
# batch (batch_size x tokens x vocabulary x 4 bytes); 16Gi fits a 1.5B model on CPU or a 7B one staged in bfloat16
# for the GPU. Larger models state spec.resources.memory.
DEFAULT_EVALUATION_MEMORY = "16Gi"
ENV_PREFIX = "MODELMERGE_"


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator needs besides the ModelMerge itself to build a Job."""

    image: str = DEFAULT_IMAGE
    merge_command: tuple[str, ...] = ("modelmerge",)
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    job_env: tuple[tuple[str, str], ...] = ()
    resync_interval: float = 15.0
    # A ModelMerge with spec.evaluation runs in this image (torch and transformers) unless it sets spec.image, with
    # these CPU and memory amounts unless spec.resources states its own.
    evaluation_image: str = DEFAULT_IMAGE
    evaluation_cpu: str | None = None
    evaluation_memory: str = DEFAULT_EVALUATION_MEMORY


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in (_env(name) or "").split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `modelmerge operator` (called by modelmerge.cli when the parser is built)."""
    jobs = parser.add_argument_group("merge Jobs")
    jobs.add_argument("--image", default=_env("IMAGE", DEFAULT_IMAGE),
                      help="merge image of the Jobs unless a ModelMerge sets spec.image [MODELMERGE_IMAGE]")
    jobs.add_argument("--merge-command", default=_env("MERGE_COMMAND", "modelmerge"),
                      help="command prefix that runs the engine in the image; `merge --spec ...` is appended "
                      "[MODELMERGE_MERGE_COMMAND]")
    jobs.add_argument("--image-pull-policy", default=_env("IMAGE_PULL_POLICY", "IfNotPresent"),
                      choices=["Always", "IfNotPresent", "Never"], help="[MODELMERGE_IMAGE_PULL_POLICY]")
    jobs.add_argument("--job-service-account", default=_env("JOB_SERVICE_ACCOUNT"),
                      help="ServiceAccount of the merge pods (none: the namespace's default, with no API "
                      "token mounted) [MODELMERGE_JOB_SERVICE_ACCOUNT]")
    jobs.add_argument("--job-env", action="append", default=_env_list("JOB_ENV"), metavar="NAME=VALUE",
                      help="extra environment variable of every merge container, repeatable, e.g. "
                      "HF_HUB_OFFLINE=1 [MODELMERGE_JOB_ENV, comma-separated]")
    jobs.add_argument("--evaluation-image", default=_env("EVALUATION_IMAGE", DEFAULT_IMAGE),
                      help="image of the Jobs of ModelMerges with spec.evaluation unless they set spec.image: it "
                      "needs torch and transformers (the merge image's `merge` target; `merge-cpu` has neither) "
                      "[MODELMERGE_EVALUATION_IMAGE]")
    jobs.add_argument("--evaluation-cpu", default=_env("EVALUATION_CPU"),
                      help="CPU request and limit of an evaluated merge whose spec.resources sets none (default: "
                      "none) [MODELMERGE_EVALUATION_CPU]")
    jobs.add_argument("--evaluation-memory", default=_env("EVALUATION_MEMORY", DEFAULT_EVALUATION_MEMORY),
                      help="memory request and limit of an evaluated merge whose spec.resources sets none: the "
                      f"model is loaded for evaluation (default {DEFAULT_EVALUATION_MEMORY}) "
                      "[MODELMERGE_EVALUATION_MEMORY]")
    jobs.add_argument("--resync-interval", "--progress-interval", dest="resync_interval", type=float,
                      default=float(_env("RESYNC_INTERVAL", _env("PROGRESS_INTERVAL", "15"))),
                      help="seconds between reads of each active merge's Job, pods and log tail: status.progress "
                      "and pods that cannot start (image, scheduling, missing claim) come from there; 0 turns "
                      "it off [MODELMERGE_RESYNC_INTERVAL; --progress-interval and MODELMERGE_PROGRESS_INTERVAL "
                      "are older names]")

    scope = parser.add_argument_group("scope and runtime")
    scope.add_argument("--namespace", "-n", dest="namespaces", action="append",
                       default=_env_list("NAMESPACES"),
                       help="watch this namespace (repeatable, globs allowed); none: all namespaces "
                       "[MODELMERGE_NAMESPACES, comma-separated]")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch the whole cluster (the default when no --namespace is given)")
    scope.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                       help="kubeconfig file (default: in-cluster credentials, else $KUBECONFIG / ~/.kube/config)")
    scope.add_argument("--peering", default=_env("PEERING"),
                       help="kopf peering name for leader election between replicas (needs the kopf.dev "
                       "peering CRDs, as the chart installs); none: auto-detect [MODELMERGE_PEERING]")
    scope.add_argument("--standalone", action="store_true",
                       help="no peering at all (a single replica)")
    scope.add_argument("--priority", type=int, default=int(_env("PRIORITY", "0")),
                       help="peering priority of this replica [MODELMERGE_PRIORITY]")
    scope.add_argument("--liveness", default=_env("LIVENESS", "http://0.0.0.0:8080/healthz"),
                       help="liveness endpoint URL; empty turns it off [MODELMERGE_LIVENESS]")
    scope.add_argument("--workers", type=int, default=int(_env("WORKERS", "16")),
                       help="threads for API calls [MODELMERGE_WORKERS]")
    scope.add_argument("--verbose", action="store_true", help="debug logging")


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    pairs = []
    for item in args.job_env or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--job-env {item!r}: expected NAME=VALUE")
        pairs.append((name, value))
    for flag, field, value in (("--evaluation-cpu", "cpu", args.evaluation_cpu),
                               ("--evaluation-memory", "memory", args.evaluation_memory)):
        try:
            MergeResources.model_validate({field: value or None})
        except ValidationError:
            raise ValueError(f"{flag} {value!r}: not a Kubernetes quantity (e.g. 4, 3500m, 16Gi)") from None
    return OperatorConfig(
        image=args.image,
        merge_command=tuple(shlex.split(args.merge_command)),
        image_pull_policy=args.image_pull_policy,
        service_account=args.job_service_account or None,
        job_env=tuple(pairs),
        resync_interval=args.resync_interval,
        evaluation_image=args.evaluation_image,
        evaluation_cpu=args.evaluation_cpu or None,
        evaluation_memory=args.evaluation_memory,
    )
