"""The operator's pure sweep logic (sweep_status, sweep_manifests): what to create, cancel and clean up from the
children that exist and the status written before, early stopping, the sweep's phase, and the manifests."""

from __future__ import annotations

import re

from modelmerge.contract import API_GROUP
from modelmerge.sweep import MAX_NAME, ModelMergeSweepSpec, stopped_early, sweep_trials, trial_name
from modelmerge_operator import manifests, sweep_manifests
from modelmerge_operator.config import OperatorConfig
from modelmerge_operator.sweep import replacing
from modelmerge_operator.sweep_status import Child, outcome, plan, statuses

SWEEP = "s"
TEMPLATE = {"base_model": "org/base", "models_to_merge": ["org/a"], "merge_method": "task_arithmetic",
            "output": {"pvc": "out", "subPath": "team"}, "evaluation": {"data": ["eval/a.json"]}}


def spec(values=(0.1, 0.2, 0.3, 0.4, 0.5), **fields) -> ModelMergeSweepSpec:
    return ModelMergeSweepSpec.model_validate({"template": TEMPLATE, "parallelism": 2,
                                               "space": {"scaling_coefficient": {"values": list(values)}}, **fields})


def evaluation(ce: float) -> dict:
    return {"state": "Succeeded", "overall": {"ce": ce, "tokens": 4}, "files": [{"name": "a", "ce": ce}]}


def child(index: int, phase: str | None, ce: float | None = None, *, cancel: bool = False) -> Child:
    return Child(index=index, name=trial_name(SWEEP, index), phase=phase, cancel=cancel,
                 message="boom" if phase == "Failed" else None,
                 evaluation=evaluation(ce) if ce is not None else None,
                 output_path=f"pvc://out/team/{trial_name(SWEEP, index)}")


def run(sweep: ModelMergeSweepSpec, children: list[Child], old: dict | None = None):
    return plan(sweep, SWEEP, sweep_trials(sweep), {c.index: c for c in children}, old or {})


def phases(result) -> list[str]:
    return [row["phase"] for row in result.status["trials"]]


def test_first_reconcile_creates_parallelism_trials_in_index_order():
    result = run(spec(), [])
    assert [t.index for t in result.create] == [0, 1]
    assert phases(result) == ["Pending", "Pending", "Waiting", "Waiting", "Waiting"]
    assert result.status["counts"]["active"] == 2 and not result.done
    assert outcome(spec(), result, cleaning=False)[:2] == ("Running", "Running")


def test_unfinished_children_hold_their_slots_until_they_finish():
    # A child with no phase yet (just created) is unfinished like a running one.
    assert run(spec(), [child(0, None), child(1, "Running")]).create == []
    result = run(spec(), [child(0, "Succeeded", 1.0), child(1, "Running")])
    assert [t.index for t in result.create] == [2]
    result = run(spec(), [child(0, "Failed"), child(1, "Cancelled"), child(3, "Running")])
    assert [t.index for t in result.create] == [2]  # index order, one slot free


def test_a_finished_trial_whose_child_is_gone_keeps_its_row_and_is_not_recreated():
    old = run(spec(), [child(0, "Succeeded", 1.5), child(1, "Succeeded", 1.0)]).status
    result = run(spec(), [child(1, "Succeeded", 1.0)], old)  # trial 0's ModelMerge deleted (keep=best, by hand)
    assert [t.index for t in result.create] == [2, 3]
    assert result.status["trials"][0] == old["trials"][0]
    # A trial that never finished and lost its child is created again: no trial is lost.
    old = run(spec(), [child(0, "Running")]).status
    assert [t.index for t in run(spec(), [], old).create] == [0, 1]


def test_best_is_the_lowest_objective_and_unscored_trials_never_win():
    result = run(spec(), [child(0, "Succeeded", 1.2), child(1, "Succeeded", 0.9), child(2, "Succeeded"),
                          child(3, "Failed"), child(4, "Succeeded", 0.9)])
    best = result.status["best"]
    assert (best["index"], best["ce"], best["outputPath"]) == (1, 0.9, "pvc://out/team/s-1")  # tie: lower index
    rows = result.status["trials"]
    assert rows[2]["ce"] is None and rows[2]["message"] == "no evaluation"
    assert rows[3]["message"] == "boom"
    assert result.done and outcome(spec(), result, cleaning=False)[:2] == ("Succeeded", "Completed")
    assert outcome(spec(), result, cleaning=True)[:2] == ("Running", "CleaningUp")


def test_the_sweep_fails_only_when_no_trial_succeeded_or_none_scored():
    failed = run(spec((0.1, 0.2)), [child(0, "Failed"), child(1, "Failed")])
    assert outcome(spec((0.1, 0.2)), failed, cleaning=False)[:2] == ("Failed", "AllTrialsFailed")
    unscored = run(spec((0.1, 0.2)), [child(0, "Failed"), child(1, "Succeeded")])
    assert outcome(spec((0.1, 0.2)), unscored, cleaning=False)[:2] == ("Failed", "NoTrialScored")


def test_cancel_cancels_unfinished_children_and_skips_the_rest():
    sweep = spec(cancel=True)
    result = run(sweep, [child(0, "Succeeded", 1.0), child(1, "Running"), child(2, None, cancel=True)])
    assert result.create == [] and result.cancel == [trial_name(SWEEP, 1)]  # 2 was asked already
    assert phases(result) == ["Succeeded", "Running", "Pending", "Skipped", "Skipped"]
    assert outcome(sweep, result, cleaning=False)[:2] == ("Running", "Cancelling")
    result = run(sweep, [child(0, "Succeeded", 1.0), child(1, "Cancelled"), child(2, "Cancelled")])
    assert outcome(sweep, result, cleaning=False)[:2] == ("Cancelled", "Cancelled")


def test_early_stopping_counts_finished_trials_in_index_order():
    sweep = spec(earlyStopping={"patience": 2})
    rows = lambda *cs: statuses(run(sweep, list(cs)).status["trials"])  # noqa: E731
    # 1 and 2 do not improve on 0 (a failed trial does not improve): stop.
    assert stopped_early(sweep, rows(child(0, "Succeeded", 1.0), child(1, "Succeeded", 1.1), child(2, "Failed")))
    # An improvement resets the count.
    assert not stopped_early(sweep, rows(child(0, "Succeeded", 1.0), child(1, "Succeeded", 0.5),
                                         child(2, "Succeeded", 0.7)))
    # Trial 1 still running: what finished after it does not count yet.
    assert not stopped_early(sweep, rows(child(0, "Succeeded", 1.0), child(1, "Running"), child(2, "Succeeded", 2),
                                         child(3, "Succeeded", 2)))
    # No best yet: failures before the first score do not stop the sweep.
    assert not stopped_early(sweep, rows(child(0, "Failed"), child(1, "Failed"), child(2, "Failed")))
    result = run(sweep, [child(0, "Succeeded", 1.0), child(1, "Succeeded", 1.1), child(2, "Succeeded", 1.2),
                         child(3, "Running")])
    assert result.stopped_early and result.create == []
    assert phases(result) == ["Succeeded", "Succeeded", "Succeeded", "Running", "Skipped"]
    assert outcome(sweep, result, cleaning=False)[:2] == ("Running", "Running")  # trial 3 finishes first
    result = run(sweep, [child(0, "Succeeded", 1.0), child(1, "Succeeded", 1.1), child(2, "Succeeded", 1.2),
                         child(3, "Succeeded", 0.1)])
    assert outcome(sweep, result, cleaning=False)[:2] == ("Succeeded", "EarlyStopped")
    assert result.status["best"]["index"] == 3  # a trial that was running when it stopped still counts


def test_status_patch_removes_what_the_new_status_no_longer_has():
    old = {"best": {"index": 1, "parameters": {"merge_method": "ties_merging", "param_value_mask_rate": 0.2}},
           "message": "x", "trials": [{"index": 0, "ce": 1.0}]}
    new = {"best": {"index": 2, "parameters": {"merge_method": "task_arithmetic"}}, "trials": [{"index": 0}]}
    assert replacing(old, new) == {
        "best": {"index": 2, "parameters": {"merge_method": "task_arithmetic", "param_value_mask_rate": None}},
        "trials": [{"index": 0}], "message": None}


def _body(name: str = SWEEP) -> dict:
    return {"apiVersion": f"{API_GROUP}/v1alpha1", "kind": "ModelMergeSweep",
            "metadata": {"name": name, "namespace": "ns", "uid": "u-1"}}


def test_child_manifest_is_owned_labelled_and_holds_the_trials_spec():
    sweep = spec()
    manifest = sweep_manifests.child(_body(), sweep, sweep_trials(sweep)[3])
    meta = manifest["metadata"]
    assert meta["name"] == "s-3" and meta["labels"][sweep_manifests.LABEL_TRIAL] == "3"
    assert meta["labels"][sweep_manifests.LABEL_SWEEP] == SWEEP
    assert meta["ownerReferences"] == [{"apiVersion": f"{API_GROUP}/v1alpha1", "kind": "ModelMergeSweep",
                                        "name": SWEEP, "uid": "u-1", "controller": True, "blockOwnerDeletion": True}]
    assert sweep_manifests.sweep_owner(manifest)["uid"] == "u-1"
    assert manifest["spec"]["scaling_coefficient"] == 0.4 and manifest["spec"]["output_dir"] == "s-3"
    assert manifest["spec"]["evaluation"] == {"data": ["eval/a.json"]} and "cancel" not in manifest["spec"]


def test_cleanup_job_deletes_the_given_folders_on_the_output_claim_as_the_merge_user():
    sweep = spec()
    long_name = "x" * 70
    job = sweep_manifests.cleanup_job(_body(long_name), sweep, ["s-0", "s-2"],
                                      OperatorConfig(image="registry.local/merge:1", service_account="merger"))
    assert len(job["metadata"]["name"]) <= MAX_NAME and re.fullmatch(r"[a-z0-9-]+", job["metadata"]["name"])
    assert job["metadata"]["name"].endswith("-cleanup") and job["spec"]["backoffLimit"] == 2
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["rm", "-rf", "--", "/output/s-0", "/output/s-2"]
    assert container["image"] == "registry.local/merge:1"
    assert container["volumeMounts"] == [{"name": "output", "mountPath": "/output", "subPath": "team"}]
    assert pod["volumes"] == [{"name": "output", "persistentVolumeClaim": {"claimName": "out"}}]
    assert pod["securityContext"] == manifests.POD_SECURITY_CONTEXT and pod["serviceAccountName"] == "merger"
    assert container["securityContext"] == manifests.CONTAINER_SECURITY_CONTEXT
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert sweep_manifests.sweep_owner(job)["name"] == long_name
    assert job["metadata"]["labels"][sweep_manifests.LABEL_SWEEP] == manifests.name_label(long_name)
    assert sweep_manifests.output_folder(sweep, sweep_trials(sweep)[1], SWEEP) == "s-1"
