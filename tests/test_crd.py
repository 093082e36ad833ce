"""The ModelMerge CRD: generated from the contract, committed, and enforced by a real API server."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest
import yaml

from modelmerge import crd, sweep_crd
from modelmerge.contract import API_GROUP, API_VERSION, PLURAL, MergeMethod, MergeProgress, MergeRequest, ModelMergeSpec
from modelmerge.kubeclient import merge_patch, raw

ROOT = Path(__file__).resolve().parents[1]


def _schema() -> dict:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


# ---------------------------------------------------------------------------------------------------------
# Unit: generation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, render", [(crd.CRD_FILE, crd.render), (crd.PEERING_FILE, crd.render_peering),
                                          (sweep_crd.SWEEP_CRD_FILE, sweep_crd.render_sweep)])
def test_committed_crds_are_what_make_crds_generates(name, render):
    committed = ROOT / "crds" / name
    assert committed.exists(), "run `make crds` and commit crds/"
    assert committed.read_text(encoding="utf-8") == render(), (
        f"crds/{name} is stale: run `make crds` (modelmerge crds --output crds/) and commit the result"
    )


def test_write_crds_writes_deterministic_yaml(tmp_path):
    first = crd.write_crds(tmp_path / "a")
    second = crd.write_crds(tmp_path / "b")
    assert [p.name for p in first] == [crd.CRD_FILE, crd.PEERING_FILE, "modelmerge.io_modelmergesweeps.yaml"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert yaml.safe_load(first[0].read_text())["metadata"]["name"] == "modelmerges.modelmerge.io"
    assert [d["spec"]["names"]["kind"] for d in yaml.safe_load_all(first[1].read_text())] == [
        "ClusterKopfPeering", "KopfPeering"]


def test_crd_identity_and_columns():
    doc = crd.crd()
    spec = doc["spec"]
    assert (spec["group"], spec["scope"]) == ("modelmerge.io", "Namespaced")
    assert spec["names"]["kind"] == "ModelMerge" and spec["names"]["shortNames"] == ["mm"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    shown = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert shown == ["Method", "Phase", "Reason", "Progress", "CE", "Age", "Output"]  # `kubectl get mm`, no -o wide
    assert columns["Method"] == ".spec.merge_method"
    assert columns["Phase"] == ".status.phase"
    assert columns["Reason"] == ".status.reason"
    assert columns["Progress"] == ".status.progress.text"
    assert columns["CE"] == ".status.evaluation.overall.ce"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert columns["Output"] == ".status.outputPath"


def test_schema_is_structural():
    for path, node in _walk(_schema()):
        assert "$ref" not in node and "title" not in node and "const" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, path
        if "properties" in node or "items" in node:
            assert node.get("type") in ("object", "array"), path
        assert node.get("additionalProperties") is not False, path


def test_schema_carries_the_contracts_enums_bounds_defaults_and_descriptions():
    props = _schema()["properties"]["spec"]["properties"]
    assert set(props) == set(ModelMergeSpec.model_fields)
    assert props["merge_method"]["enum"][:6] == ["average_merging", "task_arithmetic", "ties_merging",
                                                "ties_merging_dare", "mask_merging", "linear"]
    assert props["merge_method"]["enum"] == [method.value for method in MergeMethod]
    rate = props["param_value_mask_rate"]
    assert (rate["minimum"], rate["maximum"], rate["exclusiveMaximum"]) == (0.0, 1.0, True)
    assert props["weight_mask_rates"]["items"]["maximum"] == 1.0
    assert props["weight_mask_rates"]["items"]["exclusiveMaximum"] is True
    assert props["models_to_merge"]["maxItems"] == 32
    assert props["seed"]["format"] == "int64" and "maximum" not in props["seed"]
    for name, field in MergeRequest.model_fields.items():
        assert props[name]["description"], name
        if field.default is not None and field.default_factory is None and not field.is_required():
            default = field.default.value if hasattr(field.default, "value") else field.default
            assert props[name]["default"] == default, name
    assert "comma-separated" not in props["models_to_merge"]["description"]
    assert props["resources"]["default"] == {}
    assert props["resources"]["properties"]["gpuResourceName"]["default"] == "nvidia.com/gpu"
    assert props["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    # base_model, models_to_merge and merge_method: required by a CEL rule unless spec.config (a mergekit config)
    assert _schema()["properties"]["spec"]["required"] == ["output"]
    assert props["config"]["x-kubernetes-preserve-unknown-fields"] is True


def test_every_field_but_cancel_is_immutable():
    spec = _schema()["properties"]["spec"]
    for name, prop in spec["properties"].items():
        rules = [r["rule"] for r in prop["x-kubernetes-validations"]]
        assert ("self || !oldSelf" if name == "cancel" else "self == oldSelf") in rules, name
    presence = spec["x-kubernetes-validations"][1]["rule"]
    assert "has(self.image) == has(oldSelf.image)" in presence
    # required fields cannot go (output), base_model and its kin can be left to spec.config (but not added later)
    assert "cancel" not in presence and "has(self.output)" not in presence and "has(self.base_model)" in presence


# ---------------------------------------------------------------------------------------------------------
# Integration: the real API server enforces it
# ---------------------------------------------------------------------------------------------------------


def _valid(**spec) -> dict:
    base = {"base_model": "org/base", "models_to_merge": ["org/a", "org/b"], "merge_method": "task_arithmetic",
            "output": {"pvc": "models"}}
    base.update(spec)
    return {k: v for k, v in base.items() if v is not None}


INVALID = [
    pytest.param(_valid(merge_method="model_soup"), ["spec.merge_method", "Unsupported value", "model_soup"],
                 id="unknown-method"),
    pytest.param(_valid(param_value_mask_rate=1.5), ["spec.param_value_mask_rate", "less than"],
                 id="rate-above-range"),
    pytest.param(_valid(merge_method="mask_merging", weight_mask_rates=[0.1, -0.2]),
                 ["spec.weight_mask_rates[1]", "greater than or equal to 0"], id="negative-mask-rate"),
    pytest.param(_valid(merge_method="mask_merging", weight_mask_rates=[0.5]),
                 ["spec.weight_mask_rates", "one rate per model"], id="too-few-mask-rates"),
    pytest.param(_valid(merge_method="mask_merging"), ["spec.weight_mask_rates", "one rate per model"],
                 id="missing-mask-rates"),
    pytest.param(_valid(base_model=None), ["spec", "base_model, models_to_merge, merge_method are required unless "
                                           "config"], id="missing-base-model"),
    pytest.param(_valid(output=None), ["spec.output", "Required value"], id="missing-output"),
    pytest.param(_valid(models_to_merge=[]), ["spec.models_to_merge", "at least 1"], id="no-models"),
    pytest.param(_valid(output_dir="/etc/passwd"), ["spec.output_dir", "relative path"], id="absolute-output"),
    pytest.param(_valid(output={"pvc": "models", "subPath": "a/../../b"}),
                 ["spec.output.subPath", "relative path"], id="subpath-escape"),
    pytest.param(_valid(resources={"memory": "lots"}), ["spec.resources.memory", "should match"],
                 id="bad-quantity"),
    pytest.param(_valid(dtype="int8"), ["spec.dtype", "Unsupported value"], id="bad-dtype"),
]


@pytest.fixture(scope="module")
def crd_installed(k8s_api):
    return crd.install(k8s_api)


@pytest.fixture
def custom(k8s_api, crd_installed):
    from kubernetes import client

    return client.CustomObjectsApi(k8s_api)


def _body(spec: dict, name: str | None = None) -> dict:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMerge",
            "metadata": {"name": name or f"mm-{uuid.uuid4().hex[:8]}"}, "spec": spec}


def _create(custom, namespace: str, body: dict) -> dict:
    return raw(custom.create_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, body)


def _rejection(custom, namespace: str, body: dict) -> str:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as info:
        _create(custom, namespace, body)
    assert info.value.status == 422, info.value.body
    return json.loads(info.value.body)["message"]


@pytest.mark.integration
@pytest.mark.parametrize("spec, expected", INVALID)
def test_api_server_rejects_invalid_specs_readably(custom, namespace, spec, expected):
    message = _rejection(custom, namespace, _body(spec))
    for fragment in expected:
        assert fragment in message, message


@pytest.mark.integration
def test_api_server_accepts_valid_specs_and_fills_defaults(custom, namespace):
    full = _valid(
        merge_method="mask_merging", weight_mask_rates=[0.1, 0.9], output_dir="merged/one",
        output={"pvc": "models", "subPath": "team-a"}, modelCache={"pvc": "hf-cache", "readOnly": True},
        hfTokenSecret={"name": "hf"}, resources={"cpu": 4, "memory": "16Gi", "shmSize": "2Gi"},
        nodeSelector={"gpu": "a100"}, tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        imagePullSecrets=[{"name": "regcred"}], priorityClassName="high", queueName="gpu-queue",
        activeDeadlineSeconds=3600, ttlSecondsAfterFinished=600, image="registry.local/merge:1",
        exclude_param_names_regex=["^lm_head"], use_gpu=True,
    )
    stored = _create(custom, namespace, _body(full))["spec"]
    assert stored["affinity"] == full["affinity"]
    assert stored["resources"]["gpu"] == 1 and stored["hfTokenSecret"]["key"] == "token"
    minimal = _create(custom, namespace, _body(_valid()))["spec"]
    assert minimal["scaling_coefficient"] == 1 and minimal["dtype"] == "bfloat16" and minimal["cancel"] is False
    assert minimal["resources"] == {"gpu": 1, "gpuResourceName": "nvidia.com/gpu"}
    # What the API server stores is what the contract accepts: the operator validates it again.
    ModelMergeSpec.model_validate(stored)
    ModelMergeSpec.model_validate(minimal)


@pytest.mark.integration
def test_spec_is_immutable_except_cancel(custom, namespace):
    from kubernetes.client.exceptions import ApiException

    created = _create(custom, namespace, _body(_valid()))
    name = created["metadata"]["name"]

    def patch(spec_patch: dict) -> dict:
        return merge_patch(custom.patch_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name,
                           {"spec": spec_patch})

    for change, fragment in [({"scaling_coefficient": 0.5}, "spec.scaling_coefficient"),
                             ({"models_to_merge": ["org/c"]}, "spec.models_to_merge"),
                             ({"output": {"pvc": "elsewhere"}}, "spec.output"),
                             ({"image": "other:1"}, "cannot be added to or removed"),
                             ({"merge_method": "ties_merging"}, "spec.merge_method")]:
        with pytest.raises(ApiException) as info:
            patch(change)
        assert info.value.status == 422
        message = json.loads(info.value.body)["message"]
        assert fragment in message and "only spec.cancel may change" in message, message

    assert patch({"cancel": True})["spec"]["cancel"] is True
    with pytest.raises(ApiException) as info:
        patch({"cancel": False})
    assert "cancel cannot be undone" in json.loads(info.value.body)["message"]


@pytest.mark.integration
def test_status_is_a_subresource(custom, namespace):
    from kubernetes.client.exceptions import ApiException

    created = _create(custom, namespace, _body(_valid()))
    name = created["metadata"]["name"]
    body = copy.deepcopy(created)
    body["status"] = {"phase": "Succeeded"}
    replaced = raw(custom.replace_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name, body)
    assert "status" not in replaced  # the main resource ignores status
    progress = MergeProgress(percent=80.7, step="merge", stepIndex=3, steps=3, stepPercent=42.0).model_dump()

    def patch_status(status: dict) -> dict:
        return merge_patch(custom.patch_namespaced_custom_object_status, API_GROUP, API_VERSION, namespace, PLURAL,
                           name, {"status": status})

    patched = patch_status({"phase": "Running", "unknown": 1, "progress": progress})
    assert patched["status"]["phase"] == "Running" and "unknown" not in patched["status"]
    assert patched["status"]["progress"] == progress
    for bad, field in [({"phase": "Exploded"}, "status.phase"), ({"progress": "merge 42%"}, "status.progress"),
                       ({"progress": {**progress, "percent": 140}}, "status.progress.percent")]:
        with pytest.raises(ApiException) as info:
            patch_status(bad)
        assert field in json.loads(info.value.body)["message"], info.value.body
