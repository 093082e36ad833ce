"""The ModelMergeSweep controller: runs a sweep's trials as child ModelMerges and keeps its status.

Level-triggered: every event of a sweep, of one of its children or of its cleanup Job calls `kick`, which reconciles
the sweep from what exists: a fresh read of the sweep, and its children as the operator's watch of ModelMerges
holds them (kopf's index `sweep_children`, filled from the first listing before any handler runs and updated before
each child event's handlers), plus the children this controller created that the watch has not shown yet. So a
reconcile lists nothing, a restarted operator carries on where the last one stopped, creating no duplicate (trial
names are deterministic and creation is create-or-get) and losing no trial (sweep_status), and the count of
unfinished children read before creating is never short. Reconciles of one sweep never overlap: kicks that arrive
during one are folded into one more run after it, so a burst of child events costs one or two reconciles.

keep=best: once every trial finished, a Job (the operator's merge image, as the merge pods' user, on the
template's output claim) deletes the output folders of the succeeded trials other than the best; when it
completed, their ModelMerges are deleted too (their rows stay in status.trials) and condition OutputsCleaned is
True. Failed and cancelled trials leave no output (the engine removes its staging directory). If the Job fails,
the sweep still succeeds, with OutputsCleaned False and the Job's message, and a Warning event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from modelmerge.contract import API_GROUP, API_VERSION, PLURAL
from modelmerge.kubeclient import merge_patch, raw
from modelmerge.sweep import SWEEP_PLURAL, ModelMergeSweepSpec, format_sweep_error, sweep_trials, trial_name
from modelmerge_operator import sweep_manifests, sweep_status
from modelmerge_operator.config import OperatorConfig
from modelmerge_operator.kube import Kube
from modelmerge_operator.reconcile import now
from modelmerge_operator.status import failure_detail, last_terminated, status_changed, true_conditions

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0  # after an error, or while a child of the same name from a deleted sweep is being collected
# How long a child this controller created counts as existing before the watch shows it: far longer than a watch
# event takes, and bounded so that a child deleted before the watch ever showed it cannot hold a slot for good.
UNSEEN_CHILD_SECONDS = 60.0
# The sweep_children index: (namespace, sweep name) -> the sweep's children as child_view() keeps them.
ChildIndex = Mapping[tuple[str, str], Iterable[dict[str, Any]]]


def child_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the controller reads of a child ModelMerge (sweep_status.Child and the ownership checks), small enough
    to keep for every child in memory."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return {"metadata": {key: meta.get(key) for key in ("name", "uid", "labels", "ownerReferences")},
            "spec": {"cancel": (body.get("spec") or {}).get("cancel")},
            "status": {key: status.get(key) for key in ("phase", "message", "evaluation", "outputPath")}}


def snapshot(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """A list of an index store that kopf's event loop may update while a handler thread reads it."""
    for _ in range(100):
        try:
            return list(items)
        except RuntimeError:  # changed size during iteration: read again
            continue
    return list(items)


def replacing(old: Any, new: Any) -> Any:
    """A merge patch that turns `old` into `new`: keys of `old` missing from `new` are set to None (removed)."""
    if not isinstance(new, dict) or not isinstance(old, dict):
        return new
    out = {key: replacing(old.get(key), value) for key, value in new.items()}
    out.update({key: None for key in old if key not in new})
    return out


class SweepController:
    def __init__(self, kube: Kube, config: OperatorConfig, index: ChildIndex):
        self.kube = kube
        self.config = config
        self.index = index
        self._lock = threading.Lock()
        self._running: set[tuple[str, str]] = set()
        self._again: set[tuple[str, str]] = set()
        # (namespace, sweep) -> child name -> (its view, when created): created here, not yet shown by the watch
        self._unseen: dict[tuple[str, str], dict[str, tuple[dict[str, Any], float]]] = {}

    # -- scheduling: one reconcile of a sweep at a time, kicks during it folded into one more --------------------
    def kick(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._lock:
            if key in self._running:
                self._again.add(key)
                return
            self._running.add(key)
        try:
            while True:
                try:
                    self.reconcile(namespace, name)
                except Exception as exc:  # noqa: BLE001 - retried: the next reconcile starts from what exists
                    log.warning("reconcile of ModelMergeSweep %s/%s: %s; retrying in %ss", namespace, name, exc,
                                RETRY_SECONDS)
                    self.kick_later(namespace, name)
                with self._lock:
                    if key not in self._again:
                        self._running.discard(key)
                        return
                    self._again.discard(key)
        except BaseException:
            with self._lock:
                self._running.discard(key)
            raise

    def kick_later(self, namespace: str, name: str, delay: float = RETRY_SECONDS) -> None:
        timer = threading.Timer(delay, self.kick, args=(namespace, name))
        timer.daemon = True
        timer.start()

    # -- reads and writes ----------------------------------------------------------------------------------------
    def read_sweep(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return raw(self.kube.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, namespace,
                       SWEEP_PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def children(self, sweep: dict[str, Any]) -> dict[int, sweep_status.Child]:
        """The sweep's child ModelMerges by trial index (owned by this sweep: not a deleted namesake's): those the
        watch holds, and those created here that it does not show yet."""
        meta = sweep["metadata"]
        key = (meta["namespace"], meta["name"])
        items = snapshot(self.index.get(key, ()))
        seen = {item["metadata"]["uid"] for item in items}
        with self._lock:
            unseen = self._unseen.get(key, {})
            for name, (view, created) in list(unseen.items()):
                if view["metadata"]["uid"] in seen or time.monotonic() - created > UNSEEN_CHILD_SECONDS:
                    del unseen[name]
            items += [view for view, _ in unseen.values()]
            if not unseen:
                self._unseen.pop(key, None)
        out = {}
        for item in items:
            owner = sweep_manifests.sweep_owner(item) or {}
            label = (item["metadata"].get("labels") or {}).get(sweep_manifests.LABEL_TRIAL, "")
            if owner.get("uid") != meta["uid"] or not label.isdigit():
                continue
            index = int(label)
            if item["metadata"]["name"] == trial_name(meta["name"], index):
                out[index] = sweep_status.Child.of(item, index)
        return out

    def create_child(self, sweep: dict[str, Any], manifest: dict[str, Any]) -> bool:
        """Creates the trial's ModelMerge (or finds it created); False when a namesake owned by something else is
        in the way (a deleted sweep's child the garbage collector has not removed yet)."""
        namespace = sweep["metadata"]["namespace"]
        try:
            created = raw(self.kube.custom.create_namespaced_custom_object, API_GROUP, API_VERSION, namespace,
                          PLURAL, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
        else:
            with self._lock:
                self._unseen.setdefault((namespace, sweep["metadata"]["name"]), {})[created["metadata"]["name"]] = (
                    child_view(created), time.monotonic())
            return True
        existing = raw(self.kube.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL,
                       manifest["metadata"]["name"])
        return (sweep_manifests.sweep_owner(existing) or {}).get("uid") == sweep["metadata"]["uid"]

    def cancel_child(self, namespace: str, name: str) -> None:
        try:
            merge_patch(self.kube.custom.patch_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL,
                        name, {"spec": {"cancel": True}})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_child(self, namespace: str, name: str) -> None:
        try:
            self.kube.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name,
                                                             body={"propagationPolicy": "Background"},
                                                             _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def write(self, sweep: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
        """Persists `new` when it changes anything, and announces a new phase and a new best trial."""
        if not status_changed(old, new):
            return
        meta = sweep["metadata"]
        merge_patch(self.kube.custom.patch_namespaced_custom_object_status, API_GROUP, API_VERSION,
                    meta["namespace"], SWEEP_PLURAL, meta["name"], {"status": replacing(old, new)})
        best, old_best = new.get("best"), old.get("best") or {}
        if best and (best["index"], best["ce"]) != (old_best.get("index"), old_best.get("ce")):
            previous = f" (was {old_best['ce']:.6g}, trial {old_best['index']})" if old_best.get("ce") is not None \
                else ""
            params = ", ".join(f"{k}={v}" for k, v in best["parameters"].items())
            self.kube.post_event(sweep, "Normal", "NewBest", f"trial {best['index']} ({best['name']}): "
                                 f"cross-entropy {best['ce']:.6g}{previous}; {params}")
        if new["phase"] != old.get("phase"):
            failed = new["phase"] == "Failed"
            self.kube.post_event(sweep, "Warning" if failed else "Normal", new["reason"],
                                 f"{new['phase']}: {new['message']}")

    # -- the reconcile -------------------------------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> None:
        sweep = self.read_sweep(namespace, name)
        if sweep is None or sweep["metadata"].get("deletionTimestamp"):
            return
        old = dict(sweep.get("status") or {})
        try:
            spec = ModelMergeSweepSpec.model_validate(sweep.get("spec") or {})
        except ValidationError as exc:
            self.refuse(sweep, old, "invalid spec: " + format_sweep_error(exc))
            return
        trials = sweep_trials(spec)
        children = self.children(sweep)
        result = sweep_status.plan(spec, name, trials, children, old)
        for trial in result.create:
            if not self.create_child(sweep, sweep_manifests.child(sweep, spec, trial)):
                result.status["trials"][trial.index]["phase"] = "Waiting"
                self.kick_later(namespace, name)
        for child in result.cancel:
            self.cancel_child(namespace, child)
        cleaning, cleaned = False, None
        if spec.keep == "best" and result.done and result.status["best"] and not spec.cancel:
            cleaning, cleaned = self.clean_up(sweep, spec, result, old, children)
        phase, reason, message = sweep_status.outcome(spec, result, cleaning=cleaning)
        if old.get("phase") in ("Succeeded", "Failed"):  # a finished sweep stays so (a late cancel changes nothing)
            phase, reason, message = old["phase"], old["reason"], old["message"]
        terminal = phase in sweep_status.SWEEP_TERMINAL
        status = {
            **result.status,
            "trials": [{k: v for k, v in row.items() if v is not None} for row in result.status["trials"]],
            "phase": phase, "reason": reason, "message": message,
            "startTime": old.get("startTime") or now(),
            "completionTime": (old.get("completionTime") or now()) if terminal else None,
            "observedGeneration": sweep["metadata"].get("generation"),
        }
        status["conditions"] = sweep_status.conditions(old, phase, reason, message, accepted=True,
                                                       stopped_early=result.stopped_early, cleaned=cleaned, now=now())
        self.write(sweep, old, status)

    def refuse(self, sweep: dict[str, Any], old: dict[str, Any], message: str) -> None:
        status = {"phase": "Failed", "reason": "InvalidSpec", "message": message,
                  "completionTime": old.get("completionTime") or now(),
                  "observedGeneration": sweep["metadata"].get("generation")}
        status["conditions"] = sweep_status.conditions(old, "Failed", "InvalidSpec", message, accepted=False,
                                                       stopped_early=False, cleaned=None, now=now())
        self.write(sweep, old, status)

    def clean_up(self, sweep: dict[str, Any], spec: ModelMergeSweepSpec, result: sweep_status.Plan,
                 old: dict[str, Any], children: dict[int, sweep_status.Child]) -> tuple[bool, tuple[bool, str] | None]:
        """keep=best once every trial finished: (still cleaning, the OutputsCleaned condition's (status, message))."""
        done = next((c for c in old.get("conditions") or [] if c.get("type") == "OutputsCleaned"), None)
        if done is not None:
            return False, (done.get("status") == "True", done.get("message") or "")
        best = result.status["best"]["index"]
        others = [row for row in result.status["trials"] if row["phase"] == "Succeeded" and row["index"] != best]
        if not others:
            return False, (True, "no other trial left an output")
        meta = sweep["metadata"]
        job_name = sweep_manifests.cleanup_job_name(meta["name"])
        job = self.kube.read_job(meta["namespace"], job_name)
        if job is None or (sweep_manifests.sweep_owner(job) or {}).get("uid") != meta["uid"]:
            if job is None:
                by_index = {trial.index: trial for trial in sweep_trials(spec)}
                folders = [sweep_manifests.output_folder(spec, by_index[row["index"]], meta["name"]) for row in others]
                self.kube.create_or_get("Job", sweep_manifests.cleanup_job(sweep, spec, folders, self.config))
            else:
                self.kick_later(meta["namespace"], meta["name"])  # a deleted namesake's Job is being collected
            return True, None
        finished = true_conditions(job)
        if "Complete" in finished:
            for row in others:
                if row["index"] in children:
                    self.delete_child(meta["namespace"], children[row["index"]].name)
            names = ", ".join(row["name"] for row in others)
            return False, (True, f"deleted the outputs and ModelMerges of {len(others)} trials: {names}")
        if "Failed" in finished:
            pods = self.kube.job_pods(meta["namespace"], job_name)
            _, detail = failure_detail(last_terminated(pods, "Failed"))
            message = (f"Job {job_name} failed ({finished['Failed'].get('reason') or 'Failed'}"
                       f"{': ' + detail if detail else ''}); the other trials' outputs may remain")
            self.kube.post_event(sweep, "Warning", "CleanupFailed", message)
            return False, (False, message)
        return True, None
