"""`modelmerge operator`: runs the kopf operator, namespaced (`--namespace`, repeatable) or cluster-wide."""

from __future__ import annotations

import argparse

from modelmerge_operator.config import add_arguments as _add_arguments
from modelmerge_operator.config import config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser)


def run_operator(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    import kopf

    from modelmerge_operator import handlers  # noqa: F401 - registers the handlers

    kopf.configure(verbose=args.verbose)
    namespaces = [] if args.all_namespaces else list(dict.fromkeys(args.namespaces or []))
    peering: dict[str, object] = {"standalone": True} if args.standalone else {}
    if args.peering and not args.standalone:
        peering = {"peering_name": args.peering, "priority": args.priority}
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(config=config, workers=args.workers, kubeconfig=args.kubeconfig),
        **peering,
    )
    return 0
