"""`modelmerge serve`: flags (each with an environment variable default), backend construction, uvicorn.

The bearer token is read from MODELMERGE_API_TOKEN only (a flag would show it in `ps`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
from pathlib import Path

from modelmerge_api.app import AppSettings, create_app
from modelmerge_api.jobs import Backend

DEFAULT_PORT = 5000


def default_data_dir() -> Path:
    """$MODELMERGE_DATA_DIR, else $XDG_DATA_HOME/modelmerge, else ~/.local/share/modelmerge."""
    if os.environ.get("MODELMERGE_DATA_DIR"):
        return Path(os.environ["MODELMERGE_DATA_DIR"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(xdg) / "modelmerge"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default=_env("MODELMERGE_HOST", "127.0.0.1"),
        help="interface to listen on (env MODELMERGE_HOST; default 127.0.0.1, the chart uses 0.0.0.0)")
    add("--port", type=int, default=int(_env("MODELMERGE_PORT", str(DEFAULT_PORT))),
        help="TCP port (env MODELMERGE_PORT; default 5000)")
    add("--backend", choices=["local", "kubernetes"], default=_env("MODELMERGE_BACKEND", "local"),
        help="local: SQLite + merge subprocesses on this machine (default); kubernetes: ModelMerge resources "
        "(env MODELMERGE_BACKEND)")
    add("--data-dir", type=Path, default=None,
        help="local backend: job table, logs and default output root (env MODELMERGE_DATA_DIR; default "
        "$XDG_DATA_HOME/modelmerge or ~/.local/share/modelmerge)")
    add("--output-root", type=Path, default=_env("MODELMERGE_OUTPUT_ROOT"),
        help="where outputs live; every output_dir is relative to it (env MODELMERGE_OUTPUT_ROOT; local "
        "default <data-dir>/output; kubernetes: the output PVC's mount path in the API pod)")
    add("--workers", type=int, default=int(_env("MODELMERGE_WORKERS", "1")),
        help="local backend: merges run at once (env MODELMERGE_WORKERS; default 1)")
    add("--engine-command", default=_env("MODELMERGE_ENGINE_COMMAND"),
        help="local backend: the command that starts the engine, before its 'merge' argument (env "
        "MODELMERGE_ENGINE_COMMAND; default: this Python's `-m modelmerge.cli`)")
    add("--cors-origins", default=_env("MODELMERGE_CORS_ORIGINS", "*"),
        help="comma-separated allowed browser origins, '*' for any, 'none' to disable CORS "
        "(env MODELMERGE_CORS_ORIGINS; default *)")
    add("--max-body-bytes", type=int, default=int(_env("MODELMERGE_MAX_BODY_BYTES", str(256 * 1024))),
        help="largest accepted request body (env MODELMERGE_MAX_BODY_BYTES; default 262144)")
    add("--namespace", default=_env("MODELMERGE_NAMESPACE"),
        help="kubernetes backend: namespace of the ModelMerge resources (env MODELMERGE_NAMESPACE; default "
        "the pod's own namespace, else the kubeconfig context's, else 'default')")
    add("--kubeconfig", default=_env("KUBECONFIG"),
        help="kubernetes backend: kubeconfig file (default in-cluster config, else ~/.kube/config)")
    add("--output-pvc", default=_env("MODELMERGE_OUTPUT_PVC"),
        help="kubernetes backend: PersistentVolumeClaim the merges write to, mounted at --output-root in the "
        "API pod (env MODELMERGE_OUTPUT_PVC)")
    add("--output-subpath", default=_env("MODELMERGE_OUTPUT_SUBPATH"),
        help="kubernetes backend: folder inside the output claim (env MODELMERGE_OUTPUT_SUBPATH)")
    add("--spec-defaults", default=_env("MODELMERGE_SPEC_DEFAULTS"),
        help="kubernetes backend: JSON object of ModelMerge spec fields added to every merge, e.g. "
        "resources, modelCache, image, nodeSelector, tolerations, queueName (env MODELMERGE_SPEC_DEFAULTS)")
    add("--token-review", action=argparse.BooleanOptionalAction,
        default=_env("MODELMERGE_TOKEN_REVIEW", "") in ("1", "true", "yes"),
        help="kubernetes backend: also accept bearer tokens the cluster authenticates (TokenReview), e.g. "
        "service-account tokens (env MODELMERGE_TOKEN_REVIEW=1)")
    add("--log-level", default=_env("MODELMERGE_LOG_LEVEL", "info"),
        choices=["critical", "error", "warning", "info", "debug"], help="(env MODELMERGE_LOG_LEVEL)")


def build_backend(args: argparse.Namespace) -> Backend:
    if args.backend == "kubernetes":
        from modelmerge_api.kube import KubernetesBackend

        return KubernetesBackend.from_config(kubeconfig=args.kubeconfig, namespace=args.namespace,
                                             output_root=args.output_root, spec_defaults=spec_defaults(args))
    from modelmerge_api.local import LocalBackend

    return LocalBackend(args.data_dir or default_data_dir(), output_root=args.output_root,
                        workers=args.workers,
                        engine_command=shlex.split(args.engine_command) if args.engine_command else None)


def spec_defaults(args: argparse.Namespace) -> dict[str, object]:
    try:
        defaults = json.loads(args.spec_defaults or "{}")
    except ValueError as exc:
        raise SystemExit(f"--spec-defaults: not valid JSON: {exc}") from None
    if not isinstance(defaults, dict):
        raise SystemExit("--spec-defaults: expected a JSON object of ModelMerge spec fields")
    if args.output_pvc:
        defaults["output"] = {"pvc": args.output_pvc, **({"subPath": args.output_subpath}
                                                          if args.output_subpath else {})}
    return defaults


def app_settings(args: argparse.Namespace, backend: Backend) -> AppSettings:
    origins = [o.strip() for o in (args.cors_origins or "").split(",") if o.strip() and o.strip() != "none"]
    review = getattr(backend, "review_token", None) if args.token_review else None
    if args.token_review and review is None:
        raise SystemExit("--token-review needs the kubernetes backend")
    return AppSettings(api_token=os.environ.get("MODELMERGE_API_TOKEN") or None, token_review=review,
                       cors_origins=origins, max_body_bytes=args.max_body_bytes)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = build_backend(args)
    app = create_app(backend, app_settings(args, backend))
    # Bounded graceful shutdown: a client following a log must not keep the server (and its merges) alive.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0
