"""The ModelMergeSweep contract: expansion into trials (grid order, seeded random draws), trial names and specs,
validation messages naming the field, the objective, and the generated CRD, which a real API server enforces with
the same verdicts as the contract."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import uuid
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from modelmerge import crd, sweep_crd
from modelmerge.contract import API_GROUP, API_VERSION, METHODS, MergeEvaluation
from modelmerge.kubeclient import merge_patch
from modelmerge.sweep import (
    MAX_NAME,
    MAX_TRIALS,
    MESSAGE_LIMIT,
    SWEEP_PLURAL,
    ModelMergeSweepSpec,
    ModelMergeSweepStatus,
    SweepObjective,
    SweepTrialStatus,
    best_trial,
    describe_sweep_error,
    ended_sweep,
    objective_value,
    stopped_early,
    sweep_trials,
    sweepable_parameters,
    trial_counts,
    trial_name,
    trial_spec,
)

ROOT = Path(__file__).resolve().parents[1]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
TEMPLATE = {"base_model": "org/base", "models_to_merge": ["org/a", "org/b"], "output": {"pvc": "out"},
            "evaluation": {"data": ["eval/algebra.json", "eval/code.jsonl"]}}


def sweep(**fields) -> dict:
    spec = {"template": {**TEMPLATE, "merge_method": "task_arithmetic"},
            "space": {"scaling_coefficient": {"values": [0.5, 1.0]}}}
    spec.update(fields)
    return spec


def template(**fields) -> dict:
    return {**TEMPLATE, **fields}


def parse(spec: dict) -> ModelMergeSweepSpec:
    return ModelMergeSweepSpec.model_validate(spec)


# ---------------------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------------------


def test_grid_of_several_methods_varies_only_each_methods_own_parameters_in_canonical_order():
    spec = parse(sweep(template=template(), space={
        # written in another order than the canonical one: the expansion does not depend on it
        "param_value_mask_rate": {"values": [0.2, 0.8]},
        "scaling_coefficient": {"start": 0.5, "stop": 1.0, "step": 0.25},
        "merge_method": {"values": ["ties_merging", "average_merging", "task_arithmetic"]},
    }))
    expected = (
        [{"merge_method": "ties_merging", "scaling_coefficient": s, "param_value_mask_rate": r}
         for s, r in itertools.product([0.5, 0.75, 1.0], [0.2, 0.8])]
        + [{"merge_method": "average_merging"}]
        + [{"merge_method": "task_arithmetic", "scaling_coefficient": s} for s in [0.5, 0.75, 1.0]]
    )
    trials = sweep_trials(spec)
    assert [t.parameters for t in trials] == expected
    assert [t.index for t in trials] == list(range(len(expected)))
    assert sweep_trials(parse(json.loads(json.dumps(spec.model_dump(mode="json", exclude_none=True))))) == trials


def test_range_includes_stop_without_float_drift():
    spec = parse(sweep(space={"scaling_coefficient": {"start": 0.1, "stop": 1.0, "step": 0.1}}))
    assert [t.parameters["scaling_coefficient"] for t in sweep_trials(spec)] == [
        0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    spec = parse(sweep(space={"scaling_coefficient": {"start": 0.0, "stop": 1.0, "step": 0.3}}))
    assert [t.parameters["scaling_coefficient"] for t in sweep_trials(spec)] == [0.0, 0.3, 0.6, 0.9]


def test_random_draws_are_seeded_per_trial_and_within_bounds():
    space = {"weight_mask_rates": {"min": 0.01, "max": 0.9, "log": True}, "seed": {"min": 0, "max": 1000},
             "mask_strategy": {"values": ["random", "magnitude"]},
             "scaling_coefficient": {"start": 0.5, "stop": 1.0, "step": 0.5}}
    base = sweep(template=template(merge_method="mask_merging"), space=space, strategy="random", trials=40, seed=7)
    trials = sweep_trials(parse(base))
    assert len(trials) == 40 and trials == sweep_trials(parse(base))
    assert sweep_trials(parse({**base, "trials": 10})) == trials[:10]  # trial i depends on (seed, i) only
    assert sweep_trials(parse({**base, "seed": 8})) != trials
    for trial in trials:
        params = trial.parameters
        assert set(params) == {"merge_method", "weight_mask_rates", "seed", "mask_strategy", "scaling_coefficient"}
        assert 0.01 <= params["weight_mask_rates"] <= 0.9
        assert isinstance(params["seed"], int) and 0 <= params["seed"] <= 1000
        assert params["mask_strategy"] in ("random", "magnitude") and params["scaling_coefficient"] in (0.5, 1.0)
    rates = [t.parameters["weight_mask_rates"] for t in trials]
    logs = [math.log(r) for r in rates]  # log-uniform: about half of the draws below the geometric middle
    assert 10 <= sum(v < (math.log(0.01) + math.log(0.9)) / 2 for v in logs) <= 30
    assert {t.parameters["mask_strategy"] for t in trials} == {"random", "magnitude"}


def test_random_over_several_methods_draws_each_methods_parameters_only():
    spec = parse(sweep(template=template(), strategy="random", trials=30, space={
        "merge_method": {"values": ["average_merging", "task_arithmetic"]},
        "scaling_coefficient": {"min": 0.1, "max": 2}}))
    trials = sweep_trials(spec)
    assert {t.parameters["merge_method"] for t in trials} == {"average_merging", "task_arithmetic"}
    for trial in trials:
        if trial.parameters["merge_method"] == "average_merging":
            assert trial.parameters == {"merge_method": "average_merging"}
        else:
            assert 0.1 <= trial.parameters["scaling_coefficient"] <= 2


def test_trial_spec_is_the_template_with_the_trials_values_and_its_own_output_folder():
    spec = parse(sweep(template=template(merge_method="mask_merging", output_dir="runs/s", dtype="float32",
                                         weight_mask_rates=[0.5, 0.5]),
                       space={"weight_mask_rates": {"start": 0.1, "stop": 0.3, "step": 0.1},
                              "mask_apply_method": {"values": ["ties_merging"]}}))
    trials = sweep_trials(spec)
    child = trial_spec(spec, trials[1], "s-1")
    assert child.weight_mask_rates == [0.2, 0.2]  # a number from a range: that rate for every model
    assert (child.output_dir, child.dtype, child.mask_apply_method, child.cancel) == (
        "runs/s/s-1", "float32", "ties_merging", False)
    assert child.evaluation.data == ["eval/algebra.json", "eval/code.jsonl"]
    assert trial_spec(parse(sweep()), sweep_trials(parse(sweep()))[0], "t-0").output_dir == "t-0"


def test_trial_names_are_dns_safe_unique_and_at_most_63_characters():
    assert trial_name("grid", 7) == "grid-7"
    long_a, long_b = "a" * 60 + "x", "a" * 60 + "y"
    names = {trial_name(n, i) for n in (long_a, long_b, "b" * 253) for i in (0, 9, 999)}
    assert len(names) == 9
    for name in names:
        assert len(name) <= MAX_NAME and DNS_LABEL.match(name), name
    assert trial_name(long_a, 12) == trial_name(long_a, 12) and trial_name(long_a, 12).endswith("-12")
    assert trial_name("a" * 61, 5) == "a" * 61 + "-5"  # exactly 63: kept as it is


def test_sweepable_fields_are_the_method_registrys_parameters():
    fields = sweepable_parameters()
    assert fields[0] == "merge_method"
    assert set(fields[1:]) == {p for spec in METHODS.values() for p in spec.parameters} - {"use_gpu",
                                                                                           "max_shard_size"}


# ---------------------------------------------------------------------------------------------------------
# Validation: every bad sweep refused naming the field
# ---------------------------------------------------------------------------------------------------------

INVALID = [
    # (id, spec, field, part of the message); each is refused by the contract and (where `api` is True) by the
    # API server's schema and CEL rules too
    ("empty space", sweep(space={}), "space", "at least one", True),
    ("unknown field", sweep(space={"foo": {"values": [1]}}), "space.foo", "unknown field", False),
    ("parameter no method takes", sweep(template=template(merge_method="average_merging")),
     "space.scaling_coefficient", "no chosen merge_method takes", True),
    ("value out of bounds", sweep(space={"scaling_coefficient": {"values": [1, 500]}}),
     "space.scaling_coefficient.values[1]", "less than or equal to 100", True),
    ("min/max in a grid", sweep(space={"scaling_coefficient": {"min": 0, "max": 1}}), "space.scaling_coefficient",
     "strategy random", True),
    ("grid too large", sweep(template=template(merge_method="ties_merging"),
                             space={"scaling_coefficient": {"start": 0, "stop": 10, "step": 0.1},
                                    "param_value_mask_rate": {"start": 0, "stop": 0.9, "step": 0.1}}),
     "space", f"more than {MAX_TRIALS}", True),
    ("range too long", sweep(space={"scaling_coefficient": {"start": 0, "stop": 100, "step": 0.01}}),
     "space.scaling_coefficient", f"more than {MAX_TRIALS}", True),
    ("two forms", sweep(space={"scaling_coefficient": {"values": [1], "start": 0, "stop": 1, "step": 1}}),
     "space.scaling_coefficient", "exactly one of", True),
    ("stop below start", sweep(space={"scaling_coefficient": {"start": 1, "stop": 0, "step": 0.5}}),
     "space.scaling_coefficient", "below", True),
    ("log with min 0", sweep(space={"scaling_coefficient": {"min": 0, "max": 1, "log": True}}, strategy="random",
                             trials=3), "space.scaling_coefficient", "min > 0", True),
    ("parallelism 0", sweep(parallelism=0), "parallelism", "greater than or equal to 1", True),
    ("random without trials", sweep(strategy="random"), "trials", "number of trials", True),
    ("trials in a grid", sweep(trials=3), "trials", "strategy random", True),
    ("no method", sweep(template=template()), "template.merge_method", "space.merge_method", True),
    ("unknown method", sweep(template=template(), space={"merge_method": {"values": ["nope"]}}),
     "space.merge_method.values[0]", "'average_merging'", True),
    ("no evaluation", sweep(template={k: v for k, v in template(merge_method="linear").items()
                                      if k != "evaluation"}, space={"normalize": {"values": [True, False]}}),
     "template.evaluation", "field required", True),
    ("template cancel", sweep(template=template(merge_method="task_arithmetic", cancel=True)),
     "template.cancel", "sweep's cancel", False),
    ("absolute output_dir", sweep(template=template(merge_method="task_arithmetic", output_dir="/abs")),
     "template.output_dir", "relative", True),
    ("mergekit config template", sweep(template={"output": {"pvc": "out"}, "evaluation": TEMPLATE["evaluation"],
                                                 "config": {"merge_method": "linear", "models": [
                                                     {"model": "org/a", "parameters": {"weight": 1.0}}]}},
                                       space={"normalize": {"values": [True, False]}}),
     "template.config", "mergekit config", False),  # the API server names template.base_model, which it requires
    ("objective file not evaluated", sweep(objective={"dataFile": "poetry"}), "objective.dataFile",
     "none of template.evaluation.data's files", False),
    ("a trial that is not a valid merge", sweep(template=template(merge_method="mask_merging"),
                                                space={"seed": {"values": [1, 2]}}),
     "space", "trial 0 (merge_method=mask_merging, seed=1) is not a valid merge: weight_mask_rates", False),
]


@pytest.mark.parametrize("spec, field, message", [case[1:4] for case in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_sweeps_are_refused_naming_the_field(spec, field, message):
    with pytest.raises(ValidationError) as info:
        parse(spec)
    details = describe_sweep_error(info.value)
    assert any(d["field"] == field and message in d["message"] for d in details), details


def test_objective_is_the_overall_or_one_files_cross_entropy():
    evaluation = MergeEvaluation.model_validate({
        "state": "Succeeded", "overall": {"ce": 1.5, "tokens": 10},
        "files": [{"name": "algebra", "ce": 1.25, "tokens": 4}, {"name": "code", "ce": None}]})
    assert objective_value(SweepObjective(), evaluation) == (1.5, "")
    assert objective_value(SweepObjective(dataFile="algebra"), evaluation) == (1.25, "")
    assert objective_value(SweepObjective(dataFile="code"), evaluation)[0] is None
    assert "no data file named 'poetry'" in objective_value(SweepObjective(dataFile="poetry"), evaluation)[1]
    failed = MergeEvaluation(state="Failed", message="CUDA out of memory")
    assert objective_value(SweepObjective(), failed) == (None, "evaluation failed: CUDA out of memory")
    assert objective_value(SweepObjective(), None) == (None, "no evaluation")


def test_a_bare_list_is_a_list_of_values():
    bare = parse(sweep(template=template(), space={"merge_method": ["task_arithmetic", "ties_merging"],
                                                   "scaling_coefficient": [0.5, 1.0]}))
    spelled = parse(sweep(template=template(), space={"merge_method": {"values": ["task_arithmetic", "ties_merging"]},
                                                      "scaling_coefficient": {"values": [0.5, 1.0]}}))
    assert bare == spelled and sweep_trials(bare) == sweep_trials(spelled)
    assert bare.model_dump(mode="json")["space"]["scaling_coefficient"]["values"] == [0.5, 1.0]
    for space, field, message in [({"scaling_coefficient": []}, "space.scaling_coefficient.values", "at least 1"),
                                  ({"scaling_coefficient": [0.5, 500]}, "space.scaling_coefficient.values[1]",
                                   "less than or equal to 100"),
                                  ({"scaling_coefficient": 0.5}, "space.scaling_coefficient",
                                   "valid dictionary")]:
        with pytest.raises(ValidationError) as info:
            parse(sweep(space=space))
        details = describe_sweep_error(info.value)
        assert any(d["field"] == field and message in d["message"] for d in details), details


# ---------------------------------------------------------------------------------------------------------
# The rules that decide a sweep (the operator's and the local backend's)
# ---------------------------------------------------------------------------------------------------------


def rows(*phases_and_ces) -> list[SweepTrialStatus]:
    return [SweepTrialStatus(index=index, name=f"s-{index}", phase=phase, ce=ce,
                             message="boom" if phase == "Failed" else None)
            for index, (phase, ce) in enumerate(phases_and_ces)]


def test_best_is_the_lowest_succeeded_score_and_the_lower_index_on_a_tie():
    trials = rows(("Succeeded", 1.2), ("Failed", 0.1), ("Succeeded", 0.9), ("Succeeded", None), ("Succeeded", 0.9))
    assert best_trial(trials).index == 2
    assert best_trial(rows(("Failed", None), ("Succeeded", None), ("Cancelled", 0.5))) is None
    counts = trial_counts(rows(("Succeeded", 1.0), ("Running", None), ("Pending", None), ("Waiting", None),
                               ("Skipped", None), ("Cancelled", None), ("Failed", None)), total=9)
    assert counts.model_dump() == {"total": 9, "created": 5, "active": 2, "succeeded": 1, "failed": 1,
                                   "cancelled": 1, "skipped": 1}


def test_early_stopping_counts_ended_trials_in_index_order_once_one_has_a_score():
    spec = parse(sweep(earlyStopping={"patience": 2}))
    assert stopped_early(spec, rows(("Succeeded", 1.0), ("Succeeded", 1.1), ("Failed", None)))
    assert stopped_early(spec, reversed(rows(("Succeeded", 1.0), ("Succeeded", 1.1), ("Cancelled", None))))
    assert not stopped_early(spec, rows(("Succeeded", 1.0), ("Succeeded", 0.5), ("Succeeded", 0.7)))
    assert not stopped_early(spec, rows(("Succeeded", 1.0), ("Running", None), ("Succeeded", 2.0),
                                        ("Succeeded", 2.0)))
    assert not stopped_early(spec, rows(("Failed", None), ("Failed", None), ("Failed", None)))
    assert not stopped_early(parse(sweep()), rows(("Succeeded", 1.0), ("Failed", None), ("Failed", None)))


def test_an_ended_sweep_is_cancelled_failed_or_succeeded_naming_its_best_trial():
    spec = parse(sweep(earlyStopping={"patience": 1}))
    assert ended_sweep(spec, rows(("Succeeded", 1.0), ("Failed", None)), early=False) == (
        "Succeeded", "Completed", "best: trial 0 (s-0) with cross-entropy 1; 1 succeeded, 1 failed, 0 cancelled, "
        "0 skipped of 2")
    assert ended_sweep(spec, rows(("Succeeded", 1.0), ("Failed", None), ("Skipped", None)), early=True) == (
        "Succeeded", "EarlyStopped", "stopped early after 1 trials in a row did not improve; best: trial 0 (s-0) "
        "with cross-entropy 1; 1 succeeded, 1 failed, 0 cancelled, 1 skipped of 3")
    assert ended_sweep(spec, rows(("Failed", None), ("Failed", None)), early=False) == (
        "Failed", "AllTrialsFailed", "every trial failed (0 succeeded, 2 failed, 0 cancelled, 0 skipped of 2): "
        "trial 0: boom; trial 1: boom")
    assert ended_sweep(spec, rows(("Succeeded", None), ("Failed", None)), early=False)[:2] == (
        "Failed", "NoTrialScored")
    cancelled = parse(sweep(cancel=True))
    assert ended_sweep(cancelled, rows(("Succeeded", 1.0), ("Cancelled", None), ("Skipped", None)), early=False,
                       total=3) == ("Cancelled", "Cancelled", "cancelled by request: 1 succeeded, 0 failed, "
                                    "1 cancelled, 1 skipped of 3")
    clipped = ended_sweep(spec, rows(*[("Failed", None)] * 100), early=False)[2]
    assert len(clipped) == MESSAGE_LIMIT and clipped.endswith("...")


def test_status_round_trips():
    status = ModelMergeSweepStatus.model_validate({
        "phase": "Running", "progress": "1/2", "counts": {"total": 2, "created": 2, "active": 1, "succeeded": 1},
        "best": {"index": 0, "name": "s-0", "parameters": {"scaling_coefficient": 0.5}, "ce": 1.0},
        "trials": [{"index": 0, "name": "s-0", "phase": "Succeeded", "ce": 1.0},
                   {"index": 1, "name": "s-1", "phase": "Running"}]})
    assert status.model_dump(mode="json")["best"]["parameters"] == {"scaling_coefficient": 0.5}


# ---------------------------------------------------------------------------------------------------------
# The CRD
# ---------------------------------------------------------------------------------------------------------


def test_committed_sweep_crd_is_what_make_crds_generates():
    committed = ROOT / "crds" / sweep_crd.SWEEP_CRD_FILE
    assert committed.read_text(encoding="utf-8") == sweep_crd.render_sweep(), (
        f"crds/{sweep_crd.SWEEP_CRD_FILE} is stale: run `make crds` and commit the result")
    doc = yaml.safe_load(committed.read_text())
    names = doc["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("ModelMergeSweep", SWEEP_PLURAL, ["mms"])
    columns = {c["name"]: c["jsonPath"] for c in doc["spec"]["versions"][0]["additionalPrinterColumns"]
               if not c.get("priority")}
    assert columns == {"Done": ".status.progress", "Best CE": ".status.best.ce", "Best Trial": ".status.best.name",
                       "Phase": ".status.phase", "Reason": ".status.reason", "Age": ".metadata.creationTimestamp"}


@pytest.fixture(scope="module")
def sweep_api(k8s_api):
    from kubernetes import client

    crd.install(k8s_api)
    crd.install(k8s_api, manifest=sweep_crd.sweep_crd())
    return client.CustomObjectsApi(k8s_api)


def _create(api, namespace: str, spec: dict, name: str | None = None) -> str:
    name = name or f"s-{uuid.uuid4().hex[:6]}"
    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMergeSweep", "metadata": {"name": name},
            "spec": spec}
    api.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, SWEEP_PLURAL, body,
                                        _preload_content=False)
    return name


@pytest.mark.integration
def test_the_api_server_refuses_what_the_contract_refuses_naming_the_field(sweep_api, namespace):
    from kubernetes.client.exceptions import ApiException

    for case_id, spec, field, _message, by_api in INVALID:
        if not by_api:
            continue
        with pytest.raises(ApiException) as info:
            _create(sweep_api, namespace, copy.deepcopy(spec))
        assert info.value.status == 422, case_id
        text = json.loads(info.value.body)["message"]
        assert f"spec.{field.split('.values[')[0]}" in text, (case_id, text)
    # A bare list, which the contract takes as {values: [...]}, is not a ModelMergeSweep's (a structural schema).
    with pytest.raises(ApiException) as info:
        _create(sweep_api, namespace, sweep(space={"scaling_coefficient": [0.5, 1.0]}))
    assert info.value.status == 422 and "spec.space.scaling_coefficient" in json.loads(info.value.body)["message"]
    listed = sweep_api.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, SWEEP_PLURAL)
    assert listed["items"] == []


@pytest.mark.integration
def test_the_api_server_accepts_valid_sweeps_and_keeps_the_spec_immutable_except_cancel(sweep_api, namespace):
    from kubernetes.client.exceptions import ApiException

    valid = [
        sweep(),
        sweep(template=template(), space={"merge_method": {"values": ["task_arithmetic", "ties_merging"]},
                                          "scaling_coefficient": {"start": 0.1, "stop": 1.0, "step": 0.1},
                                          "param_value_mask_rate": {"values": [0.2, 0.5]}},
              parallelism=3, keep="best"),
        sweep(template=template(merge_method="mask_merging", weight_mask_rates=[0.1, 0.1]),
              space={"weight_mask_rates": {"min": 0.1, "max": 0.9, "log": True}, "seed": {"values": [1, 2]},
                     "mask_apply_method": {"values": ["ties_merging"]}},
              strategy="random", trials=50, seed=3, earlyStopping={"patience": 3}, objective={"dataFile": "algebra"}),
    ]
    for spec in valid:
        parse(spec)  # the contract agrees
        name = _create(sweep_api, namespace, spec)
    with pytest.raises(ApiException) as info:
        merge_patch(sweep_api.patch_namespaced_custom_object, API_GROUP, API_VERSION, namespace, SWEEP_PLURAL, name,
                    {"spec": {"parallelism": 9}})
    assert "parallelism is immutable" in json.loads(info.value.body)["message"]
    merge_patch(sweep_api.patch_namespaced_custom_object, API_GROUP, API_VERSION, namespace, SWEEP_PLURAL, name,
                {"spec": {"cancel": True}})
    with pytest.raises(ApiException) as info:
        merge_patch(sweep_api.patch_namespaced_custom_object, API_GROUP, API_VERSION, namespace, SWEEP_PLURAL, name,
                    {"spec": {"cancel": False}})
    assert "cancel cannot be undone" in json.loads(info.value.body)["message"]
