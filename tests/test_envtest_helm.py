"""The helm that `make envtest` builds behaves like a release build: its default Kubernetes version (what
`helm template` assumes without --kube-version) is stamped from the client-go it is built with, not helm's
source default v1.20, so the chart (kubeVersion >= 1.27) renders without --kube-version."""

from __future__ import annotations

import re

from tests.helpers.helm_chart import CHART, helm


def test_default_kube_version_is_the_client_go_one(tmp_path):
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "version.yaml").write_text(
        "kind: ConfigMap\napiVersion: v1\nmetadata: {name: v}\n"
        "data: {version: {{ .Capabilities.KubeVersion.Version }}}\n")
    rendered = helm("template", str(chart), home=tmp_path).stdout
    (version,) = re.findall(r"version: (v[0-9.]+)", rendered)
    go_mod = (CHART.parents[1] / "hack" / "envtest" / "go.mod").read_text()
    (client_go_minor,) = set(re.findall(r"k8s\.io/client-go v0\.(\d+)\.", go_mod))
    assert version == f"v1.{client_go_minor}.0"


def test_chart_renders_without_kube_version(tmp_path):
    rendered = helm("template", "modelmerge", str(CHART), home=tmp_path).stdout
    assert "kind: Deployment" in rendered
