"""pytest fixtures for tests against the envtest control plane (loaded by ``pytest_plugins`` in
tests/conftest.py).

* ``control_plane`` (session): a running :class:`~tests.kube.controlplane.ControlPlane`. Without the binaries
  (``make envtest``) the tests that use it are skipped, or fail when ``REQUIRE_ENVTEST=1`` (as in CI).
* ``kubeconfig_path`` (session): the admin kubeconfig file (``pathlib.Path``).
* ``k8s_api`` (session): a ``kubernetes.client.ApiClient`` authenticated as cluster admin.
* ``namespace`` (function): the name of a fresh namespace (its ``default`` ServiceAccount already exists),
  deleted after the test; :func:`create_namespace` / :func:`delete_namespace` make and remove others.
* ``kubelet`` (function): a started :class:`~tests.kube.kubelet.harness.FakeKubelet` that runs the pods of
  ``namespace``, with its files under the test's ``tmp_path / "kubelet"``; stopped after the test.
  :func:`running_kubelet` starts one with other settings (a label selector, another runtime).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers.waiting import wait_for
from tests.kube.controlplane import ControlPlane, find_assets

if TYPE_CHECKING:
    from tests.kube.kubelet import ContainerRuntime, FakeKubelet


def envtest_required() -> bool:
    return os.environ.get("REQUIRE_ENVTEST", "") not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    assets = find_assets()
    if assets is None:
        msg = (
            "the envtest control plane binaries (etcd, kube-apiserver, kube-controller-manager) were not "
            "found in $KUBEBUILDER_ASSETS or the envtest cache: run `make envtest`"
        )
        if envtest_required():
            pytest.fail(f"REQUIRE_ENVTEST=1 but {msg}", pytrace=False)
        pytest.skip(msg)
    cp = ControlPlane(assets)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubeconfig_path(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig_path


@pytest.fixture(scope="session")
def k8s_api(control_plane: ControlPlane):
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


def create_namespace(api, name: str, *, labels: dict[str, str] | None = None) -> str:
    """Creates namespace ``name`` and waits for its ``default`` ServiceAccount (the serviceaccount controller makes
    it; pods are refused until it exists)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": labels or {}}}, _preload_content=False)

    def has_default_service_account() -> bool:
        try:
            core.read_namespaced_service_account("default", name, _preload_content=False)
            return True
        except ApiException as e:
            if e.status != 404:
                raise
            return False

    wait_for(has_default_service_account, 30, f"the default ServiceAccount of namespace {name}", interval=0.1)
    return name


def delete_namespace(api, name: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.CoreV1Api(api).delete_namespace(name, propagation_policy="Background", _preload_content=False)
    except ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture
def namespace(k8s_api, request) -> Iterator[str]:
    base = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-")
    name = create_namespace(k8s_api, f"{base or 'test'}-{uuid.uuid4().hex[:6]}", labels={"envtest": "true"})
    try:
        yield name
    finally:
        delete_namespace(k8s_api, name)


@contextmanager
def running_kubelet(
    control_plane: ControlPlane,
    root: Path,
    *,
    namespace: str | None = None,
    label_selector: str | None = None,
    runtime: ContainerRuntime | None = None,
) -> Iterator[FakeKubelet]:
    """A started test kubelet for the pods of ``namespace`` (all namespaces when None) that match
    ``label_selector``, on ``runtime`` (local processes when None), with its files under ``root``; stopped after."""
    from tests.kube.kubelet import FakeKubelet

    api = control_plane.api_client()  # its own connection pool: the watch holds one connection for long
    kubelet = FakeKubelet(api, namespace=namespace, label_selector=label_selector, root=root, runtime=runtime)
    try:
        kubelet.start()
        yield kubelet
    finally:
        kubelet.stop()
        api.close()


@pytest.fixture
def kubelet(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Iterator[FakeKubelet]:
    with running_kubelet(control_plane, tmp_path / "kubelet", namespace=namespace) as harness:
        yield harness
