"""What the Helm chart tests share: the helm binary that `make envtest` builds, `helm lint`,
`helm template` into Python objects, and RBAC rule sets as comparable (group, resource, verb) triples."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.controlplane import find_helm
from tests.kube.fixtures import envtest_required

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "modelmerge"
# `helm template` has no cluster to ask; this helm build's built-in default (v1.20) is below the chart's
# kubeVersion, so renders state a current one.
KUBE_VERSION = "1.31.0"
RELEASE = "modelmerge"


def helm_binary() -> Path:
    helm = find_helm()
    if helm is None:
        msg = "helm was not found in the envtest cache or on PATH: run `make envtest`"
        if envtest_required():
            pytest.fail(f"REQUIRE_ENVTEST=1 but {msg}", pytrace=False)
        pytest.skip(msg)
    return helm


def helm(*args: str, home: Path | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs helm with its config/cache/data folders under `home` (never the user's), returns the result."""
    env = dict(os.environ)
    if home is not None:
        env.update(
            HELM_CONFIG_HOME=str(home / "config"),
            HELM_CACHE_HOME=str(home / "cache"),
            HELM_DATA_HOME=str(home / "data"),
        )
    result = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
    return result


def values_file(folder: Path, values: dict[str, Any] | None) -> list[str]:
    if not values:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"values-{len(list(folder.glob('values-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def render(
    tmp_path: Path,
    values: dict[str, Any] | None = None,
    namespace: str = "modelmerge",
    release: str = RELEASE,
    include_crds: bool = False,
    check: bool = True,
) -> list[dict[str, Any]]:
    """`helm template` of the chart as a list of objects (empty documents dropped)."""
    args = [
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
        *values_file(tmp_path, values),
    ]
    if include_crds:
        args.append("--include-crds")
    result = helm(*args, home=tmp_path / "helm-home", check=check)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(
    objects: Iterable[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(
    objects: Iterable[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
) -> dict[str, Any]:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}, got {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


Triple = tuple[str, str, str]


def triples(rules: Iterable[dict[str, Any]]) -> set[Triple]:
    """RBAC rules as a set of (apiGroup, resource, verb); resourceNames/nonResourceURLs are not expected here."""
    out: set[Triple] = set()
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    out.add((group, resource, verb))
    return out
