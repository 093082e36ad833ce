"""Bad input to the REST API: each case is a 4xx with a message naming the field, and nothing is created."""

from __future__ import annotations

import sys

import pytest
import requests

from modelmerge_api.app import create_app
from modelmerge_api.local import LocalBackend
from tests.helpers.rest_api import PAYLOAD, serve_in_thread

MASK = {**PAYLOAD, "merge_method": "mask_merging", "weight_mask_rates": [0.5, 0.5]}
BAD_REQUESTS = [
    ({}, ["base_model", "models_to_merge", "merge_method"]),
    ({k: v for k, v in PAYLOAD.items() if k != "base_model"}, ["base_model"]),
    ({k: v for k, v in PAYLOAD.items() if k != "models_to_merge"}, ["models_to_merge"]),
    ({k: v for k, v in PAYLOAD.items() if k != "merge_method"}, ["merge_method"]),
    ({**PAYLOAD, "models_to_merge": 5}, ["models_to_merge"]),
    ({**PAYLOAD, "models_to_merge": []}, ["models_to_merge"]),
    ({**PAYLOAD, "base_model": 7}, ["base_model"]),
    ({**PAYLOAD, "scaling_coefficient": "lots"}, ["scaling_coefficient"]),
    ({**PAYLOAD, "use_gpu": "maybe"}, ["use_gpu"]),
    ({**PAYLOAD, "seed": -1}, ["seed"]),
    ({**PAYLOAD, "merge_method": "frankenmerge"}, ["merge_method"]),
    ({**PAYLOAD, "param_value_mask_rate": 1.5}, ["param_value_mask_rate"]),
    ({**MASK, "weight_mask_rates": [0.5, 1.0]}, ["weight_mask_rates[1]"]),
    ({**MASK, "weight_mask_rates": [0.5, -0.1]}, ["weight_mask_rates[1]"]),
    ({**MASK, "weight_mask_rates": [0.5]}, ["weight_mask_rates"]),
    ({**MASK, "weight_mask_rates": None}, ["weight_mask_rates"]),
    ({**PAYLOAD, "exclude_param_names_regex": ["lm_head", "(["]}, ["exclude_param_names_regex"]),
    ({**PAYLOAD, "models_to_merge": [f"org/m{i}" for i in range(33)]}, ["models_to_merge"]),
    ({**PAYLOAD, "dtype": "int8"}, ["dtype"]),
    ({**PAYLOAD, "surprise": 1}, ["surprise"]),
    ({**PAYLOAD, "output_dir": "../escape"}, ["output_dir"]),
    ({**PAYLOAD, "output_dir": "a/../../escape"}, ["output_dir"]),
    ({**PAYLOAD, "output_dir": "/etc/merged"}, ["output_dir"]),
    ({**PAYLOAD, "output_dir": "..\\escape"}, ["output_dir"]),
    ({**PAYLOAD, "output_dir": "C:/merged"}, ["output_dir"]),
    ({**PAYLOAD, "output_dir": ".hidden"}, ["output_dir"]),
    ({**PAYLOAD, "output_dir": "a b"}, ["output_dir"]),
    ({**PAYLOAD, "hf_token": 12345}, ["hf_token"]),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    backend = LocalBackend(data, engine_command=[sys.executable, "-c", "raise SystemExit(3)"])
    with serve_in_thread(create_app(backend)) as url:
        yield url, backend


def assert_nothing_created(server) -> None:
    url, backend = server
    assert requests.get(url + "/api/jobs", timeout=10).json()["total"] == 0
    assert list(backend.output_root.iterdir()) == []


@pytest.mark.parametrize(("payload", "fields"), BAD_REQUESTS,
                         ids=[f"{i}-{'+'.join(f)}" for i, (_, f) in enumerate(BAD_REQUESTS)])
def test_bad_merge_request(server, payload, fields):
    response = requests.post(server[0] + "/api/merge", json=payload, timeout=10)
    assert response.status_code == 400, response.text
    body = response.json()
    for field in fields:
        assert field in body["error"], body
        assert any(d["field"] == field for d in body["details"]), body
    assert_nothing_created(server)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe"])
def test_body_must_be_a_json_object(server, body):
    response = requests.post(server[0] + "/api/merge", data=body, timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]
    assert_nothing_created(server)


def test_oversized_body(server):
    payload = {**PAYLOAD, "exclude_param_names_regex": ["x" * 500] * 600}
    response = requests.post(server[0] + "/api/merge", json=payload, timeout=10)
    assert response.status_code == 413 and "too large" in response.json()["error"]
    chunked = requests.post(server[0] + "/api/merge", data=iter([b"{" + b" " * 200_000] * 2), timeout=10)
    assert chunked.status_code == 413
    assert_nothing_created(server)


@pytest.mark.parametrize("path", ["/api/jobs/{id}", "/api/jobs/{id}/logs", "/api/download/{id}",
                                  "/api/download/{id}/archive", "/api/download/{id}/files/config.json"])
def test_unknown_job_id(server, path):
    response = requests.get(server[0] + path.format(id="no-such-job"), timeout=10)
    assert response.status_code == 404 and response.json() == {"error": "job 'no-such-job' not found"}


def test_cancel_unknown_job(server):
    response = requests.delete(server[0] + "/api/jobs/no-such-job", timeout=10)
    assert response.status_code == 404 and "not found" in response.json()["error"]


def test_unknown_endpoint_and_method(server):
    for path in ("/api/nothing", "/nothing", "/api/jobs/x/y/z"):
        response = requests.get(server[0] + path, timeout=10)
        assert response.status_code == 404 and response.json() == {"error": "Endpoint not found"}
    response = requests.put(server[0] + "/api/merge", json=PAYLOAD, timeout=10)
    assert response.status_code == 405 and response.json() == {"error": "Method not allowed"}
    assert_nothing_created(server)


@pytest.mark.parametrize(("params", "field"), [({"limit": 0}, "limit"), ({"limit": "ten"}, "limit"),
                                               ({"limit": 5000}, "limit"), ({"offset": -1}, "offset"),
                                               ({"status": "sleeping"}, "status")])
def test_bad_list_parameters(server, params, field):
    response = requests.get(server[0] + "/api/jobs", params=params, timeout=10)
    assert response.status_code == 400 and field in response.json()["error"]
    assert response.json()["details"][0]["field"] == field
