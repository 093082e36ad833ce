"""mergekit YAML configs as they are (modelmerge/mergekit_config.py, issue 11): `modelmerge merge --config`, POST
/api/merge's mergekit_config and a ModelMerge's spec.config.

Against mergekit 0.1.5 (the oracle, tests/helpers/mergekit.py) on tiny random Llama- and Qwen2-shaped models with
4 layers, so that layer gradients interpolate between their points: mergekit's own gradient-slerp example, and
linear configs with per-model gradients, filter conditions, slice parameters and global parameters, on both kernel
sets. Every element identical (the issue's bar is >= 99.99% and 1 ulp). Then the request a config becomes, the
errors that name the key, and the REST API with the real engine. passthrough and slices: test_mergekit_passthrough.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
import yaml
from pydantic import ValidationError

from modelmerge.contract import MergeRequest, ModelMergeSpec, format_validation_error
from modelmerge.mergekit_config import MergekitConfig, evaluate_setting
from modelmerge_api.app import create_app
from modelmerge_api.local import LocalBackend
from modelmerge_engine.kernels import KERNEL_SET_NAMES, KERNELS_ENV
from tests import test_api_kube
from tests.helpers.mergekit import assert_agrees_with_mergekit, memoized_merges
from tests.helpers.models import make_family, read_state_dict
from tests.helpers.rest_api import serve_in_thread, wait_status

SIZE = {"vocab": 256, "hidden": 64, "intermediate": 160, "layers": 4}
# test_api_kube's control plane: the REST API on the kubernetes backend, the operator, the kubelet, the model hub
kube_cluster = test_api_kube.cluster
module_namespace = test_api_kube.module_namespace

# mergekit's examples/gradient-slerp.yml (github.com/arcee-ai/mergekit at commit
# bc62b546e2bbb0cf92b4a895def48c45cc1c1e44), as it is; the tests put tiny models in place of the two 13B ones
# and their 40 layers.
GRADIENT_SLERP = """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""


# mergekit's examples/ties.yml (github.com/arcee-ai/mergekit at commit a9e23f0d35e861d47b99720f4771090e81839eb3), as
# it is: a density gradient, a weight gradient, a conditional weight, normalize and int8_mask (no effect on results).
TIES_EXAMPLE = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("families")
    return {
        "llama-bf16": make_family(root / "llama", n=3, arch="llama", dtype=torch.bfloat16, **SIZE),
        "qwen2-fp32-tied": make_family(root / "qwen2", n=3, arch="qwen2", dtype=torch.float32, tie=True, **SIZE),
    }


@pytest.fixture(scope="module")
def mergekit(tmp_path_factory):
    return memoized_merges(tmp_path_factory.mktemp("mergekit"))


def ours(config: dict, out: Path, **fields) -> dict[str, torch.Tensor]:
    from modelmerge_engine.run import run_merge

    request = MergeRequest.model_validate({"config": config, "output_dir": str(out), **fields})
    assert run_merge(request, progress="none") == 0
    return read_state_dict(out)


# ---- against mergekit ------------------------------------------------------------------------------------


def gradient_slerp(base: Path, other: Path, layers: int) -> str:
    return (GRADIENT_SLERP.replace("psmathur/orca_mini_v3_13b", str(base))
            .replace("garage-bAInd/Platypus2-13B", str(other)).replace("[0, 40]", f"[0, {layers}]"))


def test_mergekits_gradient_slerp_example_gives_mergekits_bytes(families, mergekit, tmp_path):
    """`modelmerge merge --config` on the example as mergekit ships it (only the model names and layer count
    changed): mergekit's output within the issue's bar; and the gradient is really there: t = 0 keeps the base's
    attention and the other's MLP in the first layer, t = 1 the reverse in the last."""
    base, (other, *_) = families["llama-bf16"]
    text = gradient_slerp(base, other, SIZE["layers"])
    (tmp_path / "merge.yml").write_text(text)
    done = subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--config", str(tmp_path / "merge.yml"),
                           "--output-dir", str(tmp_path / "ours"), "--progress", "none"],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["method"] == "slerp"
    merged = read_state_dict(tmp_path / "ours")
    assert_agrees_with_mergekit(merged, mergekit(yaml.safe_load(text)))
    to_f16 = {name: t.to(torch.float16) for name, t in read_state_dict(base).items()}
    theirs = {name: t.to(torch.float16) for name, t in read_state_dict(other).items()}
    last = SIZE["layers"] - 1
    for layer, attention_from, mlp_from in ((0, to_f16, theirs), (last, theirs, to_f16)):
        for name, source in ((f"model.layers.{layer}.self_attn.q_proj.weight", attention_from),
                             (f"model.layers.{layer}.mlp.up_proj.weight", mlp_from)):
            assert torch.equal(merged[name], source[name]), name
    report = json.loads((tmp_path / "ours" / "merge_report.json").read_text())
    assert report["mergekit_config"]["parameters"]["t"][0] == {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}


def test_mergekits_ties_example_gives_mergekits_bytes(families, mergekit, tmp_path):
    """Per-model density and weight gradients and a conditional weight reach the generalized task arithmetic
    family through Method.value: every element as mergekit's."""
    base, finetunes = families["llama-bf16"]
    text = TIES_EXAMPLE
    for name, path in zip(("psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B", "WizardLM/WizardMath-13B-V1.0",
                           "TheBloke/Llama-2-13B-fp16"), (*finetunes, base), strict=True):
        text = text.replace(name, str(path))
    config = yaml.safe_load(text)
    request = MergeRequest.model_validate({"config": config})
    assert request.merge_method == "ties" and request.base_model == str(base)
    assert request.models_to_merge == [str(p) for p in finetunes]
    assert_agrees_with_mergekit(ours(config, tmp_path / "ours"), mergekit(config))


def linear_gradients(finetunes: list[Path], dtype: str, *, normalize: bool) -> dict:
    """Per-model gradients and conditions, a global condition as another model's fallback, normalize global."""
    models = [{"model": str(finetunes[0]), "parameters": {"weight": [0.2, 1.5, -0.4, 0.9]}},
              {"model": str(finetunes[1]), "parameters": {"weight": [{"filter": "self_attn", "value": [1, 0.25]},
                                                                     {"filter": "norm", "value": 0.7}]}}]
    models += [{"model": str(path)} for path in finetunes[2:]]
    return {"merge_method": "linear", "dtype": dtype, "models": models,
            "parameters": {"normalize": normalize, "weight": [{"filter": "mlp", "value": [0.3, 2.0, 0.6]},
                                                              {"value": 0.45}]}}


@pytest.mark.parametrize("kernels", KERNEL_SET_NAMES)
@pytest.mark.parametrize(("family", "dtype", "normalize"), [("llama-bf16", "bfloat16", True),
                                                           ("qwen2-fp32-tied", "float32", False),
                                                           ("qwen2-fp32-tied", "float16", True)])
def test_linear_gradients_and_conditions_match_mergekit(families, mergekit, tmp_path, monkeypatch, family, dtype,
                                                        normalize, kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    _, finetunes = families[family]
    config = linear_gradients(finetunes, dtype, normalize=normalize)
    assert_agrees_with_mergekit(ours(config, tmp_path / "ours"), mergekit(config))


def test_slice_parameters_take_precedence_over_global_ones_as_in_mergekit(families, mergekit, tmp_path):
    """slices syntax with the same models in two slices: each slice's gradient runs over its own layers, a
    source's parameters beat the slice's, the slice's beat the global ones."""
    base, finetunes = families["llama-bf16"]
    first, second = (str(p) for p in finetunes[:2])
    config = {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"weight": 0.5, "normalize": True},
              "slices": [
                  {"sources": [{"model": first, "layer_range": [0, 3], "parameters": {"weight": [0.1, 1.0]}},
                               {"model": second, "layer_range": [0, 3]}]},
                  {"sources": [{"model": first, "layer_range": [3, 4]},
                               {"model": second, "layer_range": [3, 4], "parameters": {"weight": 3.0}}],
                   "parameters": {"weight": [{"filter": "self_attn", "value": 0.2}]}}]}
    assert_agrees_with_mergekit(ours(config, tmp_path / "ours"), mergekit(config))


def test_a_config_with_one_value_per_model_is_the_flat_request_byte_for_byte(families, tmp_path):
    base, finetunes = families["llama-bf16"]
    finetunes = finetunes[:2]
    config = {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": False},
              "models": [{"model": str(p), "parameters": {"weight": w}}
                         for p, w in zip(finetunes, [0.3, 0.9], strict=True)]}
    request = MergeRequest.model_validate({"config": config, "output_dir": str(tmp_path / "a")})
    assert (request.base_model, request.models_to_merge, request.merge_method) == (str(finetunes[0]),
                                                                                  [str(p) for p in finetunes], "linear")
    assert request.normalize is False and request.weights() == [0.3, 0.9]
    ours(config, tmp_path / "a")
    from modelmerge_engine.run import run_merge

    flat = MergeRequest(base_model=str(finetunes[0]), models_to_merge=[str(p) for p in finetunes],
                        merge_method="linear", normalize=False, model_parameters=[{"weight": 0.3}, {"weight": 0.9}],
                        output_dir=str(tmp_path / "b"))
    assert run_merge(flat, progress="none") == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


# ---- mergekit's parameter resolution ---------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "tensor", "t", "expected"), [
    ([0, 0.5, 0.3, 0.7, 1], "x", 0.0, 0.0),
    ([0, 0.5, 0.3, 0.7, 1], "x", 1.0, 1.0),
    ([0, 0.5, 0.3, 0.7, 1], "x", 1 / 3, (1 - 1 / 3) * 0.5 + 1 / 3 * 0.3),  # scaled 4/3: between points 1 and 2
    ([1, 0], "x", 0.25, 0.75),
    ([{"filter": "mlp", "value": 2.0}, {"value": 3.0}], "model.layers.0.mlp.up_proj.weight", 0.0, 2.0),
    ([{"filter": "mlp", "value": 2.0}, {"value": 3.0}], "model.layers.0.self_attn.q_proj.weight", 0.0, 3.0),
    ([{"filter": "mlp", "value": 2.0}], "model.norm.weight", 0.5, None),  # no condition holds: the next scope
    ([{"filter": "*", "value": [1, 3]}], "anything", 0.5, 2.0),
    ([], "x", 0.0, None),
])
def test_settings_evaluate_as_mergekit_evaluates_them(setting, tensor, t, expected):
    parsed = MergekitConfig.model_validate({"merge_method": "linear", "models": [{"model": "a"}],
                                            "parameters": {"weight": setting or 1.0}}).parameters["weight"]
    value = evaluate_setting(tensor, parsed if setting else [], t, validate=float)
    assert value == pytest.approx(expected) if expected is not None else value is None


def test_a_gradient_of_booleans_picks_its_entries():
    assert evaluate_setting("x", [True, False, True], 0.6, validate=bool) is False
    assert evaluate_setting("x", [True, False, True], 1.0, validate=bool) is True


# ---- the request a config becomes, and its errors ---------------------------------------------------------


def test_the_request_round_trips_through_json_as_the_operator_and_the_api_pass_it(families):
    config = linear_gradients(families["llama-bf16"][1], "bfloat16", normalize=True)
    request = MergeRequest.model_validate({"mergekit_config": config})
    assert request.config.models[0].parameters["weight"] == [0.2, 1.5, -0.4, 0.9]
    for dumped in (request.model_dump(mode="json"), request.model_dump(mode="json", exclude_none=True)):
        assert MergeRequest.model_validate(json.loads(json.dumps(dumped))) == request
    spec = ModelMergeSpec.model_validate({"config": config, "output": {"pvc": "out"}})
    assert spec.merge_request() == request


def _config_error(config: dict, **fields) -> str:
    with pytest.raises(ValidationError) as caught:
        MergeRequest.model_validate({"config": config, **fields})
    return format_validation_error(caught.value)


LINEAR = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}


@pytest.mark.parametrize(("config", "fields", "message"), [
    ({**LINEAR, "models": [{"model": "a", "parameters": {"weight": "heavy"}}]}, {},
     "config: models[0].parameters.weight: Input should be a valid number"),
    ({**LINEAR, "models": [{"model": "a", "parameters": {"wieght": 1}}]}, {},
     "config: models[0].parameters.wieght: no merge method has a parameter 'wieght'"),
    ({**LINEAR, "models": [{"model": "a", "parameters": {"normalize": False}}]}, {},
     "config: models[0].parameters.normalize: normalize applies to the whole merge"),
    ({**LINEAR, "parameters": {"weight": [{"filter": "mlp", "value": [0.5, 1000]}]}}, {},
     "config: parameters.weight[0].value[1]: Input should be less than or equal to 100"),
    ({**LINEAR, "parameters": {"weight": [0.5, {"filter": "mlp", "value": 1}]}}, {},
     "config.parameters: weight: a list is either values (a gradient) or conditions"),
    ({**LINEAR, "parameters": {"weight": [{"pattern": "mlp", "value": 1}]}}, {},  # mergekit's old key, ignored there
     "config.parameters: weight[0]: a condition is {filter, value}; unknown key 'pattern'"),
    ({**LINEAR, "parameters": {"weight": None}}, {}, "config.parameters: weight: a value, a list of values"),
    ({**LINEAR, "merge_method": "ties_merging"}, {}, "config: merge_method: 'ties_merging' is not one of mergekit's"),
    ({**LINEAR, "merge_method": "slerp"}, {}, "config: base_model: required for merge_method slerp"),
    ({**LINEAR, "models": [{"model": "a"}, {"model": "a"}]}, {}, "config: models: a is listed twice"),
    ({**LINEAR, "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, {},
     "config: exactly one of models and slices must be given"),
    ({**LINEAR, "modules": {"text_decoder": {}}}, {}, "config: modules: multi-module configs are not supported"),
    ({**LINEAR, "tokenizer": {"source": "union"}}, {}, "config: tokenizer: tokenizer configs"),
    ({**LINEAR, "models": [{"model": "a+lora/adapter"}]}, {}, "LoRA references (model+lora) are not supported"),
    ({**LINEAR, "dtype": "float8"}, {}, "config.dtype: 'float8': one of bfloat16, float16, float32"),
    ({**LINEAR, "dtype": "bfloat16", "out_dtype": "float32"}, {}, "config: out_dtype: float32 differs from dtype"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}]}, {},
     "layer_range"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                         {"model": "b", "layer_range": [0, 3]}]}]}, {},
     "every source of a slice must hold the same number of layers"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                         {"model": "b", "layer_range": [0, 2]}]},
                                           {"sources": [{"model": "b", "layer_range": [2, 4]}]}]}, {},
     "config: slices[1].sources: merge_method linear needs the same models in the same order in every slice"),
    ({"merge_method": "slerp", "base_model": "c", "parameters": {"t": 0.5},
      "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]}, {},
     "config: slices[0].sources: base_model c must be one of the slice's sources"),
    (LINEAR, {"merge_method": "task_arithmetic"}, "merge_method: the config sets it to 'linear'"),
    (LINEAR, {"models_to_merge": ["x"]}, "models_to_merge: the config sets it to ['a', 'b']"),
    (LINEAR, {"mergekit_config": LINEAR}, "mergekit_config: give the config once"),
])
def test_bad_configs_are_refused_naming_the_key(config, fields, message):
    assert message in _config_error(config, **fields)


def test_yaml_text_is_for_the_cli_and_the_api_to_parse():
    assert "config: expected the parsed mergekit config (an object)" in _config_error("merge_method: linear")


def test_cli_refuses_a_missing_or_malformed_config_file_naming_it(tmp_path):
    (tmp_path / "bad.yml").write_text("merge_method: linear\nmodels: [\n")
    (tmp_path / "list.yml").write_text("- merge_method: linear\n")
    for name, message in [("missing.yml", "cannot read it"), ("bad.yml", "not valid YAML at line 3"),
                          ("list.yml", "a mergekit config is a YAML mapping")]:
        done = subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--config", str(tmp_path / name),
                               "--output-dir", str(tmp_path / "out")], capture_output=True, text=True)
        assert done.returncode == 2
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["error"].startswith(f"--config {tmp_path / name}: {message}"), summary
    assert not (tmp_path / "out").exists()


# ---- the REST API, with the real engine --------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    backend = LocalBackend(tmp_path / "data")
    with serve_in_thread(create_app(backend)) as url:
        yield url, backend


def test_rest_api_merges_a_mergekit_config_given_as_yaml_text(families, server, tmp_path):
    url, backend = server
    base, finetunes = families["llama-bf16"]
    text = gradient_slerp(base, finetunes[0], SIZE["layers"])
    response = requests.post(url + "/api/merge", json={"mergekit_config": text, "output_dir": "gradient"}, timeout=30)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    final = wait_status(url, job_id, timeout=300)
    assert final["status"] == "completed", final
    assert final["params"]["merge_method"] == "slerp" and final["params"]["base_model"] == str(base)
    assert final["params"]["config"]["parameters"]["t"][2]["value"] == 0.5
    expected = ours(yaml.safe_load(text), tmp_path / "expected")
    merged = read_state_dict(backend.output_root / "gradient")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"mergekit_config": "merge_method: linear\nmodels: [\n"}, "mergekit_config", "not valid YAML at line 3"),
    ({"mergekit_config": "merge_method: linear\nmodels:\n  - model: a\n    parameters: {wieght: 1}\n"},
     "mergekit_config", "models[0].parameters.wieght: no merge method has a parameter 'wieght'"),
    ({"mergekit_config": {"merge_method": "linear", "models": [{"model": "a"}]}, "merge_method": "slerp"},
     "merge_method", "the config sets it to 'linear'"),
])
def test_rest_api_refuses_bad_configs_naming_the_key_and_starts_nothing(server, body, field, message):
    url, backend = server
    response = requests.post(url + "/api/merge", json=body, timeout=30)
    assert response.status_code == 400, response.text
    detail = response.json()
    assert message in json.dumps(detail) and field in [d["field"] for d in detail.get("details", [])], detail
    assert requests.get(url + "/api/jobs", timeout=10).json()["total"] == 0


# ---- a ModelMerge with spec.config, and the REST API, on the test control plane (the real engine) ----------


def _kube_config(refs: list[str]) -> dict:
    """A linear config over the hub's repo ids (2-layer Qwen2): per-model gradient, global condition."""
    return {"merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": refs[0], "parameters": {"weight": [0.2, 1.1]}},
                       {"model": refs[1], "parameters": {"weight": [{"filter": "mlp", "value": 0.6}]}}],
            "parameters": {"weight": 0.35, "normalize": True}}


def _expected_from_local_paths(hub, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The same merge run here on the hub's folders (repo ids resolve to the same files in the cluster)."""
    _, base, finetunes = hub
    config = _kube_config([str(p) for p in finetunes])
    return ours(config, tmp_path / "expected")


@pytest.mark.integration
def test_a_modelmerge_with_spec_config_merges_on_the_control_plane(kube_cluster, tmp_path):
    cluster = kube_cluster
    from kubernetes import client

    from modelmerge.contract import API_GROUP, API_VERSION, PLURAL
    from modelmerge.kubeclient import raw
    from tests.helpers.rest_api import FINETUNE_REPOS
    from tests.helpers.waiting import wait_for
    from tests.test_api_kube import CACHE_PVC, OUTPUT_PVC

    custom = client.CustomObjectsApi(cluster.api)
    name = "mergekit-config"
    spec = {"config": _kube_config(list(FINETUNE_REPOS)), "output": {"pvc": OUTPUT_PVC},
            "modelCache": {"pvc": CACHE_PVC, "readOnly": True}}
    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMerge", "metadata": {"name": name}, "spec": spec}
    raw(custom.create_namespaced_custom_object, API_GROUP, API_VERSION, cluster.namespace, PLURAL, body)

    def merge() -> dict:
        return raw(custom.get_namespaced_custom_object, API_GROUP, API_VERSION, cluster.namespace, PLURAL, name)

    wait_for(lambda: (merge().get("status") or {}).get("phase") in ("Succeeded", "Failed"), 240,
             f"ModelMerge {name} to finish", context=lambda: json.dumps(merge().get("status")))
    status = merge()["status"]
    assert status["phase"] == "Succeeded", status
    assert "base_model" not in merge()["spec"]  # the config alone says what to merge
    output = Path(cluster.kubelet.pvc_path(OUTPUT_PVC)) / name
    merged, expected = read_state_dict(output), _expected_from_local_paths(cluster.hub, tmp_path)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
    report = json.loads((output / "merge_report.json").read_text())
    assert report["method"] == "linear" and report["mergekit_config"]["models"][0]["model"] == FINETUNE_REPOS[0]

    bad = {**body, "metadata": {"name": "mergekit-config-bad"},
           "spec": {**spec, "config": {**spec["config"], "parameters": {"wieght": 1}}}}
    raw(custom.create_namespaced_custom_object, API_GROUP, API_VERSION, cluster.namespace, PLURAL, bad)

    def refused() -> dict | None:
        status = raw(custom.get_namespaced_custom_object, API_GROUP, API_VERSION, cluster.namespace, PLURAL,
                     "mergekit-config-bad").get("status") or {}
        return status if status.get("phase") == "Failed" else None

    status = wait_for(refused, 60, "the operator to refuse the bad config")
    assert status["reason"] == "InvalidSpec" and "config: parameters.wieght: no merge method has a parameter" \
        in status["message"], status


@pytest.mark.integration
def test_the_rest_api_on_kubernetes_takes_a_yaml_config(kube_cluster, tmp_path):
    cluster = kube_cluster
    from tests.helpers.rest_api import FINETUNE_REPOS, submit
    from tests.test_api_kube import AUTH

    text = yaml.safe_dump(_kube_config(list(FINETUNE_REPOS)))
    job_id = submit(cluster.url, {"mergekit_config": text}, headers=AUTH)
    final = wait_status(cluster.url, job_id, timeout=240, headers=AUTH)
    assert final["status"] == "completed", final
    assert final["params"]["merge_method"] == "linear" and final["params"]["config"]["models"][0]["model"] == \
        FINETUNE_REPOS[0]
    (resource,) = [o for o in cluster.custom_objects() if o["metadata"]["name"] == job_id]
    assert resource["spec"]["config"]["parameters"]["weight"] == 0.35
    merged = read_state_dict(Path(cluster.kubelet.pvc_path("merge-output")) / job_id)
    expected = _expected_from_local_paths(cluster.hub, tmp_path)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
