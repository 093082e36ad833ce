"""kopf wiring of ModelMergeSweeps (imported by handlers.py): every event of a sweep, of a child ModelMerge or of a
sweep's cleanup Job kicks the sweep's controller (modelmerge_operator/sweep.py), which reconciles from what exists;
the sweep_children index keeps the children as the watch shows them, so a reconcile lists nothing.
No kopf progress storage or finalizer on sweeps: deleting one deletes its children through owner references."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import kopf

from modelmerge.contract import API_GROUP, API_VERSION, PLURAL
from modelmerge.sweep import SWEEP_PLURAL
from modelmerge_operator.reconcile import Reconciler
from modelmerge_operator.sweep import SweepController, child_view
from modelmerge_operator.sweep_manifests import LABEL_SWEEP, sweep_owner

_LOCK = threading.Lock()
# kopf hands each object's handlers a shallow copy of the operator's memo, so a controller stored in one would be
# one object's alone: the one controller (and its per-sweep serialisation) is kept per ModelMerge reconciler, which
# startup put in the operator's memo and every copy shares.
_CONTROLLERS: weakref.WeakKeyDictionary[Reconciler, SweepController] = weakref.WeakKeyDictionary()


def controller(memo: kopf.Memo, sweep_children: kopf.Index) -> SweepController | None:
    """The one SweepController of this operator, made from the ModelMerge reconciler's client and settings once
    startup made those, reading children from the sweep_children index (a live view kopf keeps current)."""
    reconciler = memo.get("reconciler")
    if reconciler is None:
        return None
    with _LOCK:
        if reconciler not in _CONTROLLERS:
            _CONTROLLERS[reconciler] = SweepController(reconciler.kube, reconciler.config, sweep_children)
        return _CONTROLLERS[reconciler]


@kopf.index(API_GROUP, API_VERSION, PLURAL, labels={LABEL_SWEEP: kopf.PRESENT})
def sweep_children(namespace: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """(namespace, sweep name) -> each child ModelMerge of the sweep, as the controller reads it (child_view)."""
    owner = sweep_owner(dict(body))
    return {(namespace, owner["name"]): child_view(body)} if owner is not None else {}


@kopf.on.event(API_GROUP, API_VERSION, SWEEP_PLURAL)
def sweep_event(type: str | None, body: kopf.Body, memo: kopf.Memo, sweep_children: kopf.Index, **_: Any) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    if type == "DELETED" or meta.get("deletionTimestamp"):
        return
    if type == "MODIFIED" and status.get("observedGeneration") == meta.get("generation"):
        return  # a status write (ours): the spec did not change
    sweeps = controller(memo, sweep_children)
    if sweeps is not None:
        sweeps.kick(meta["namespace"], meta["name"])


def _kick_owner(body: kopf.Body, memo: kopf.Memo, sweep_children: kopf.Index) -> None:
    owner = sweep_owner(dict(body))
    sweeps = controller(memo, sweep_children)
    if owner is not None and sweeps is not None:
        sweeps.kick(body["metadata"]["namespace"], owner["name"])


@kopf.on.event(API_GROUP, API_VERSION, PLURAL, labels={LABEL_SWEEP: kopf.PRESENT})
def trial_event(body: kopf.Body, memo: kopf.Memo, sweep_children: kopf.Index, **_: Any) -> None:
    _kick_owner(body, memo, sweep_children)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_SWEEP: kopf.PRESENT})
def cleanup_job_event(body: kopf.Body, memo: kopf.Memo, sweep_children: kopf.Index, **_: Any) -> None:
    _kick_owner(body, memo, sweep_children)
