"""The engine's method registry (modelmerge_engine.methods) and the contract's catalogue (what /api/methods,
`modelmerge methods`, the CRD and the CLI show) agree; an unknown method is an error naming it; the request
shape of per-model parameters (model_parameters) is validated naming the field, in the contract, the REST API
and the CRD's schema."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests
from pydantic import ValidationError

from modelmerge.contract import (
    COMMON_PARAMETERS,
    METHODS,
    MaskApplyMethod,
    MergeMethod,
    MergeRequest,
    format_validation_error,
    methods_catalogue,
)
from modelmerge.crd import spec_schema
from modelmerge_api.app import create_app
from modelmerge_api.local import LocalBackend
from modelmerge_engine.engine import per_tensor_statistics
from modelmerge_engine.errors import MergeError
from modelmerge_engine.methods import REGISTRY, method_class, register
from modelmerge_engine.methods.base import Method
from tests.helpers.rest_api import PAYLOAD, serve_in_thread

LINEAR = {**PAYLOAD, "merge_method": "linear"}


def test_every_catalogued_method_has_an_engine_module_and_nothing_else_does():
    assert set(REGISTRY) == set(METHODS) == {m.value for m in MergeMethod}
    assert {m.value for m in MaskApplyMethod} <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_engine_reads_the_parameters_the_catalogue_lists(name):
    implementation = method_class(name)
    assert implementation.name == name
    assert (*implementation.parameters, *COMMON_PARAMETERS) == METHODS[name].parameters
    assert set(METHODS[name].parameters) <= set(MergeRequest.model_fields)
    assert implementation.combine_cpu is not Method.combine_cpu or name == "mask_merging"
    assert implementation.combine_torch is not Method.combine_torch or name == "mask_merging"


def test_an_unknown_method_is_an_error_naming_it():
    with pytest.raises(MergeError, match=r"merge_method: the engine has no implementation of 'frankenmerge' "
                                         r"\(it has average_merging, .*linear, "):
        method_class("frankenmerge")
    request = MergeRequest.model_construct(**{**MergeRequest(**LINEAR).model_dump(), "merge_method": "not_a_method"})
    with pytest.raises(MergeError, match="'not_a_method'"):
        per_tensor_statistics(request)


def test_a_method_registered_twice_is_refused():
    class Again(Method):
        name = "linear"
        parameters = ()

    with pytest.raises(ValueError, match="'linear' is registered twice"):
        register(Again)
    assert REGISTRY["linear"] is not Again


def test_the_cli_and_the_catalogue_show_the_same_methods():
    shown = subprocess.run([sys.executable, "-m", "modelmerge.cli", "methods"], capture_output=True, text=True,
                           check=True).stdout
    catalogue = json.loads(shown)["methods"]
    assert catalogue == json.loads(json.dumps(methods_catalogue()))
    linear = next(m for m in catalogue if m["name"] == "linear")
    assert linear["origin"] == "mergekit"
    weight = linear["parameters"]["model_parameters"]["items"]["properties"]["weight"]
    assert weight["default"] == 1.0 and weight["type"] == "number"
    assert linear["parameters"]["normalize"]["default"] is True


def test_the_crd_takes_model_parameters_as_a_list_of_objects_and_checks_their_count():
    spec = spec_schema()
    entry = spec["properties"]["model_parameters"]["items"]
    assert entry["type"] == "object" and "weight" in entry["properties"]
    assert entry["properties"]["weight"]["default"] == 1.0
    rules = {rule["rule"]: rule for rule in spec["x-kubernetes-validations"]}
    rule = rules["!has(self.model_parameters) || !has(self.models_to_merge) || "
                 "size(self.model_parameters) == size(self.models_to_merge)"]
    assert rule["fieldPath"] == ".model_parameters"


def _error(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        MergeRequest.model_validate({**LINEAR, **fields})
    return format_validation_error(caught.value)


@pytest.mark.parametrize(("fields", "message"), [
    ({"model_parameters": [{"weight": 0.5}]},
     "model_parameters: model_parameters needs one entry per model: got 1 entries for 2 models_to_merge"),
    ({"model_parameters": [{"weight": 1.0}, {"weight": -1.0}]},
     "model_parameters: model_parameters weights sum to 0, and linear with normalize divides by their sum"),
    ({"model_parameters": [{"weight": 1.0}, {"wieght": 2.0}]}, "model_parameters[1].wieght: unknown field"),
    ({"model_parameters": [{"weight": 1.0}, {"weight": "heavy"}]}, "model_parameters[1].weight: "),
    ({"model_parameters": [{"weight": 1.0}, {"weight": float("inf")}]}, "model_parameters[1].weight: "),
    ({"model_parameters": [{"weight": 1.0}, {"weight": 1000}]}, "model_parameters[1].weight: "),
    ({"model_parameters": "[{"}, "model_parameters: expected a JSON array of objects"),
])
def test_bad_model_parameters_are_refused_naming_the_field(fields, message):
    assert message in _error(**fields)


def test_model_parameters_from_json_text_and_the_weights_they_give():
    assert MergeRequest.model_validate(LINEAR).weights() == [1.0, 1.0]
    request = MergeRequest.model_validate({**LINEAR, "model_parameters": '[{"weight": 0.3}, {}]'})
    assert request.weights() == [0.3, 1.0]
    assert request.merge_params()["model_parameters"] == [{"weight": 0.3}, {"weight": 1.0}]
    assert MergeRequest.model_validate({**LINEAR, "normalize": False, "model_parameters": [
        {"weight": 1.0}, {"weight": -1.0}]}).weights() == [1.0, -1.0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    backend = LocalBackend(tmp_path_factory.mktemp("data"),
                           engine_command=[sys.executable, "-c", "raise SystemExit(3)"])
    with serve_in_thread(create_app(backend)) as url:
        yield url, backend


def test_the_rest_api_lists_the_catalogue_and_refuses_bad_model_parameters(server):
    url, backend = server
    assert requests.get(url + "/api/methods", timeout=10).json()["methods"] == json.loads(
        json.dumps(methods_catalogue()))
    response = requests.post(url + "/api/merge", timeout=10,
                             json={**LINEAR, "model_parameters": [{"weight": 0.5}, {"weight": "x"}]})
    assert response.status_code == 400, response.text
    assert any(d["field"] == "model_parameters[1].weight" for d in response.json()["details"]), response.json()
    assert requests.get(url + "/api/jobs", timeout=10).json()["total"] == 0
    assert list(backend.output_root.iterdir()) == []
