"""modelmerge.kubeclient: clients on their own configuration (the kubernetes client's global default is never
touched), contexts, the raw JSON and merge-patch calls, and the pods of a Job (newest first)."""

from __future__ import annotations

import json

import pytest
import yaml

from modelmerge import kubeclient


def _kubeconfig(path, *, current: str = "one") -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": current,
        "clusters": [{"name": "a", "cluster": {"server": "https://a.example:6443", "insecure-skip-tls-verify": True}},
                     {"name": "b", "cluster": {"server": "https://b.example:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "alice", "user": {"token": "token-a"}}, {"name": "bob", "user": {"token": "token-b"}}],
        "contexts": [{"name": "one", "context": {"cluster": "a", "user": "alice", "namespace": "team-a"}},
                     {"name": "two", "context": {"cluster": "b", "user": "bob"}}],
    }
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_api_client_uses_its_own_configuration(tmp_path):
    from kubernetes import client

    before = client.Configuration.get_default_copy()
    path = _kubeconfig(tmp_path / "config")
    first = kubeclient.api_client(kubeconfig=path, pool_size=7, retries=2)
    second = kubeclient.api_client(kubeconfig=path, context="two")
    assert first.configuration.host == "https://a.example:6443"
    assert first.configuration.get_api_key_with_prefix("BearerToken") == "Bearer token-a"
    assert first.configuration.connection_pool_maxsize == 7 and first.configuration.retries == 2
    assert second.configuration.host == "https://b.example:6443"
    assert second.configuration.get_api_key_with_prefix("BearerToken") == "Bearer token-b"
    after = client.Configuration.get_default_copy()
    assert (after.host, after.api_key) == (before.host, before.api_key)


def test_kubeconfig_from_environment_when_not_in_a_pod(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", _kubeconfig(tmp_path / "config", current="two"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert kubeclient.configuration().host == "https://b.example:6443"
    with pytest.raises(Exception, match="Service host/port is not set"):
        kubeclient.configuration(in_cluster=True)


def test_in_cluster_takes_no_kubeconfig(tmp_path):
    with pytest.raises(ValueError, match="in_cluster=True takes no kubeconfig or context"):
        kubeclient.api_client(kubeconfig=str(tmp_path / "config"), in_cluster=True)


def test_current_namespace_of_a_context(tmp_path):
    path = _kubeconfig(tmp_path / "config")
    assert kubeclient.current_namespace(kubeconfig=path) == "team-a"
    assert kubeclient.current_namespace(kubeconfig=path, context="two") is None
    assert kubeclient.current_namespace(kubeconfig=str(tmp_path / "missing")) is None


class _Response:
    def __init__(self, body: dict | None):
        self.data = json.dumps(body).encode() if body is not None else b""


def test_raw_and_merge_patch_pass_the_call_options():
    calls = []

    def patch(*args, **kwargs):
        calls.append((args, kwargs))
        return _Response({"status": {"phase": "Running"}})

    assert kubeclient.merge_patch(patch, "ns", "name", {"status": {"phase": "Running"}}) == {
        "status": {"phase": "Running"}}
    assert calls == [(("ns", "name", {"status": {"phase": "Running"}}),
                      {"_preload_content": False, "_content_type": "application/merge-patch+json"})]
    assert kubeclient.raw(lambda **_: _Response(None)) == {}


def test_pods_of_job_newest_first():
    class Core:
        selector = None

        def list_namespaced_pod(self, namespace, label_selector, _preload_content):
            self.selector = (namespace, label_selector)
            return _Response({"items": [
                {"metadata": {"name": "m-b", "creationTimestamp": "2026-01-01T00:00:05Z"}},
                {"metadata": {"name": "m-c", "creationTimestamp": "2026-01-01T00:00:09Z"}},
                {"metadata": {"name": "m-a", "creationTimestamp": "2026-01-01T00:00:01Z"}},
            ]})

    core = Core()
    assert [p["metadata"]["name"] for p in kubeclient.pods_of_job(core, "ns", "m")] == ["m-c", "m-b", "m-a"]
    assert core.selector == ("ns", "batch.kubernetes.io/job-name=m")
