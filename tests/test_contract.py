"""The formats the contract defines for more than one component: where a ModelMerge's output lands, how a run of
the engine ended, and the structured progress in the ModelMerge status."""

from __future__ import annotations

import json

import pytest

from modelmerge.contract import (
    MergeProgress,
    MergeRequest,
    ModelMergeSpec,
    ModelMergeStatus,
    OutputLocation,
    engine_outcome,
    output_location,
)


def _spec(**fields) -> ModelMergeSpec:
    return ModelMergeSpec.model_validate({"base_model": "org/base", "models_to_merge": ["org/a"],
                                          "merge_method": "task_arithmetic", "output": {"pvc": "models"}, **fields})


def test_output_location_defaults_to_the_name_at_the_claim_root():
    where = output_location(_spec(), "llama-merge")
    assert where == OutputLocation(claim="models", sub_path=None, relative="llama-merge")
    assert where.uri == "pvc://models/llama-merge"
    assert where.claim_path == "llama-merge"
    assert where.in_mount("/output") == "/output/llama-merge"


def test_output_location_with_sub_path_and_output_dir():
    where = output_location(_spec(output={"pvc": "models", "subPath": "team/"}, output_dir="runs/7/"), "x")
    assert (where.claim, where.sub_path, where.relative) == ("models", "team", "runs/7")
    assert where.uri == "pvc://models/team/runs/7"
    assert where.claim_path == "team/runs/7"  # for a mount of the claim's root (the REST API's output root)
    assert where.in_mount("/output/") == "/output/runs/7"  # for a mount of the sub path (the merge pod)


def _summary(**fields) -> str:
    return json.dumps({"status": "failed", **fields})


@pytest.mark.parametrize("exit_code, summary, succeeded, error", [
    (0, json.dumps({"status": "succeeded", "tensors": 3}), True, None),
    (0, None, True, None),
    (None, json.dumps({"status": "succeeded"}), True, None),
    (1, "[merge 1/1]  10.0% overall, 10.0% of step\n" + _summary(error="shape mismatch for tensor w"), False,
     "shape mismatch for tensor w"),
    (2, _summary(error="weight_mask_rates: field required"), False, "weight_mask_rates: field required"),
    (0, _summary(error="disk full"), False, "disk full"),
    (1, None, False, "the merge failed with exit code 1 without reporting an error; see the merge's log"),
    (2, "", False, "the engine rejected the request (exit code 2) without saying why; see the merge's log"),
    (137, None, False, "the merge was killed by SIGKILL (exit code 137)"),
    (-15, b"not json\n", False, "the merge was killed by SIGTERM"),
    (143, _summary(error="interrupted by SIGTERM"), False, "interrupted by SIGTERM"),
    (0, _summary(), False, "the merge exited with code 0 but its summary says it failed, without an error"),
    (None, None, False, "the merge ended without an exit code or a summary"),
    (3, "{broken", False, "the merge failed with exit code 3 without reporting an error; see the merge's log"),
])
def test_engine_outcome(exit_code, summary, succeeded, error):
    outcome = engine_outcome(exit_code=exit_code, summary=summary)
    assert (outcome.succeeded, outcome.error) == (succeeded, error)


def test_engine_outcome_keeps_the_summary():
    outcome = engine_outcome(exit_code=0, summary=b'{"status": "succeeded", "tensors": 24, "seconds": 1.5}\n')
    assert outcome.summary is not None and (outcome.summary.tensors, outcome.summary.seconds) == (24, 1.5)
    assert engine_outcome(exit_code=1, summary="Traceback ...").summary is None


def test_status_progress_is_structured():
    progress = MergeProgress(percent=80.7, step="merge", stepIndex=3, steps=3, stepPercent=42.0)
    status = ModelMergeStatus.model_validate({"phase": "Running", "progress": progress.model_dump()})
    assert status.progress == progress and status.progress.text == "merge 3/3 81%"


# Regexes whose commas are inside {}, [] or () or escaped: a comma-separated string (the predecessor's CLI and API
# form) splits only at the other commas, and a list (the canonical form, the CRD's) is never split.
COMMA_REGEXES = [r"model\.layers\.[0-9]{1,3}\.mlp\..*", r"(q,k|v)_proj", r"[,;]x", r"a\,b", r".*embed_tokens.*"]


def test_regexes_with_commas_survive_every_path_to_the_engine():
    joined = ",".join(COMMA_REGEXES)
    request = MergeRequest(base_model="org/base", models_to_merge="org/a,org/b", merge_method="task_arithmetic",
                           exclude_param_names_regex=joined)
    assert request.exclude_param_names_regex == COMMA_REGEXES
    assert request.models_to_merge == ["org/a", "org/b"]
    assert _spec(exclude_param_names_regex=joined).exclude_param_names_regex == COMMA_REGEXES
    # The REST API's request -> the ModelMerge spec the kube backend creates (JSON) -> the engine's request.
    spec = ModelMergeSpec.model_validate(json.loads(json.dumps(
        {"output": {"pvc": "models"}, **request.model_dump(mode="json", exclude_none=True)})))
    assert spec.merge_request().exclude_param_names_regex == COMMA_REGEXES
    # A list is taken as it is, whatever commas its items hold.
    assert _spec(exclude_param_names_regex=["a{1,3},b"]).merge_request().exclude_param_names_regex == ["a{1,3},b"]
