"""The Helm chart without a cluster: `helm lint`, values.schema.json enforced by helm, and `helm template` renders
for each notable values combination (scope → Role vs ClusterRole, storage, auth, merge defaults, pod security).
The chart applied to a real API server and run under its own ServiceAccounts is tests/test_rbac.py."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from modelmerge import crd, sweep_crd
from modelmerge.contract import ModelMergeSpec
from tests.helpers.helm_chart import (
    CHART,
    KUBE_VERSION,
    ROOT,
    container,
    find,
    helm,
    one,
    render,
    triples,
)

NS = "modelmerge"
RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}}

# The values combinations every render/lint test goes through.
COMBINATIONS: dict[str, dict] = {
    "defaults": {},
    "namespace-list": {"watch": {"namespaces": ["team-a", "team-b"]}},
    "namespace-list-without-api": {"watch": {"namespaces": ["team-a"]}, "api": {"enabled": False}},
    "cluster-wide": {"watch": {"clusterWide": True}},
    "cluster-wide-token-review": {"watch": {"clusterWide": True}, "api": {"auth": {"tokenReview": True}}},
    "existing-claims-and-cache": {"storage": {
        "output": {"create": False, "existingClaim": "models", "subPath": "merges"},
        "modelCache": {"enabled": True, "create": False, "existingClaim": "hf", "readOnly": True, "subPath": "hub"}}},
    "created-cache-and-storage-class": {"storage": {
        "output": {"storageClassName": "fast", "size": "1Ti", "accessMode": "ReadWriteMany",
                   "keepOnUninstall": False},
        "modelCache": {"enabled": True, "storageClassName": "-"}}},
    "auth-existing-secret": {"api": {"auth": {"existingSecret": "api-token", "existingSecretKey": "value"}}},
    "auth-disabled": {"api": {"auth": {"enabled": False}, "corsOrigins": ["https://a.example", "https://b.example"]}},
    "merge-defaults": {"merge": {
        "serviceAccountName": "merger", "env": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": 8},
        "gpuResourceName": "amd.com/gpu", "resources": {"cpu": 16, "memory": "64Gi", "gpu": 2, "shmSize": "16Gi"},
        "hfTokenSecret": "hf-token", "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "queueName": "team-queue", "backoffLimit": 3, "ttlSecondsAfterFinished": None,
        "extraSpecDefaults": {"priorityClassName": "high", "activeDeadlineSeconds": 3600}}},
    "images-and-scheduling": {
        "images": {"operator": {"repository": "reg.local/op", "tag": "1.2.3", "pullPolicy": "Always"},
                   "api": {"repository": "reg.local/api", "tag": "1.2.3", "pullPolicy": "Always"},
                   "merge": {"repository": "reg.local/merge", "tag": "1.2.3-cuda", "pullPolicy": "Never"}},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"nodeSelector": {"role": "system"}, "tolerations": [{"key": "x", "operator": "Exists"}],
                     "replicas": 0, "env": {"MODELMERGE_WORKERS": "4"}, "podAnnotations": {"a": "b"}},
        "api": {"replicas": 3, "nodeSelector": {"role": "system"}, "service": {"type": "LoadBalancer", "port": 8080}}},
    "name-overrides": {"fullnameOverride": "mm"},
    "evaluation": {"evaluation": {"image": {"repository": "reg.local/eval", "tag": "2.0-cuda"},
                                  "resources": {"cpu": None, "memory": "64Gi"}}},
}


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> dict[str, list[dict]]:
    """Each combination rendered once for the whole module."""
    folder = tmp_path_factory.mktemp("renders")
    return {name: render(folder / name, values, namespace=NS) for name, values in COMBINATIONS.items()}


def _deployment(objects: list[dict], component: str) -> dict:
    return one([o for o in find(objects, "Deployment")
                if o["metadata"]["labels"]["app.kubernetes.io/component"] == component], "Deployment")


def _flag(args: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]


def _spec_defaults(objects: list[dict]) -> dict:
    (value,) = _flag(container(_deployment(objects, "api"))["args"], "spec-defaults")
    return json.loads(value)


# ---------------------------------------------------------------------------------------------------------
# Lint, schema, metadata
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_helm_lint_strict(name, tmp_path):
    values = ["-f", str(tmp_path / "v.yaml")] if COMBINATIONS[name] else []
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(COMBINATIONS[name]))
    result = helm("lint", "--strict", "--kube-version", KUBE_VERSION, "--namespace", NS, str(CHART), *values,
                  home=tmp_path)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values, message", [
    ({"watch": {"namespaces": ["team-*"]}}, "/watch/namespaces/0"),
    ({"watch": {"clusterWide": "yes"}}, "/watch/clusterWide"),
    ({"operator": {"replicas": 2}}, "/operator/replicas"),
    ({"storage": {"output": {"accessMode": "ReadWriteSometimes"}}}, "/storage/output/accessMode"),
    ({"storage": {"output": {"size": "lots"}}}, "/storage/output/size"),
    ({"storage": {"output": {"subPath": "/abs"}}}, "/storage/output/subPath"),
    ({"merge": {"resources": {"memory": "8 gigs"}}}, "/merge/resources/memory"),
    ({"merge": {"gpuResourceName": "nvidia.com/gpu!"}}, "/merge/gpuResourceName"),
    ({"merge": {"env": {"BAD NAME": "1"}}}, "invalid propertyName 'BAD NAME'"),
    ({"images": {"merge": {"pullPolicy": "Sometimes"}}}, "/images/merge/pullPolicy"),
    ({"api": {"logLevel": "chatty"}}, "/api/logLevel"),
    ({"api": {"corsOrigins": "https://a.example"}}, "/api/corsOrigins"),
    ({"apii": {"enabled": False}}, "apii"),
    ({"evaluation": {"resources": {"memory": "lots"}}}, "/evaluation/resources/memory"),
    ({"evaluation": {"resources": {"memory": None}}}, "missing property 'memory'"),  # helm: null removes a key
    ({"evaluation": {"image": {"repository": ""}}}, "/evaluation/image/repository"),
    ({"evaluation": {"gpu": 1}}, "gpu"),
])
def test_values_schema_rejects_bad_values(values, message, tmp_path):
    result = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, "-f",
                  str(_write(tmp_path / "v.yaml", values)), home=tmp_path, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def test_existing_claim_is_required_when_not_creating(tmp_path):
    result = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, "-f",
                  str(_write(tmp_path / "v.yaml", {"storage": {"output": {"create": False}}})), home=tmp_path,
                  check=False)
    assert result.returncode != 0 and "storage.output.existingClaim is required" in result.stderr


def _write(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_chart_versions_match_the_package_and_the_operator_default_image():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    from modelmerge_operator.config import DEFAULT_IMAGE

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert DEFAULT_IMAGE == f"{values['images']['merge']['repository']}:{version}"


@pytest.mark.parametrize("name, render_crd", [(crd.CRD_FILE, crd.render), (crd.PEERING_FILE, crd.render_peering),
                                              (sweep_crd.SWEEP_CRD_FILE, sweep_crd.render_sweep)])
def test_chart_crds_are_the_generated_ones(name, render_crd):
    path = CHART / "crds" / name
    assert path.read_text(encoding="utf-8") == render_crd(), (
        f"charts/modelmerge/crds/{name} is stale: run `make chart-crds` (modelmerge crds --output "
        "charts/modelmerge/crds/) and commit the result")
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted([crd.CRD_FILE, crd.PEERING_FILE,
                                                                         sweep_crd.SWEEP_CRD_FILE])


def test_every_value_is_documented():
    """values.yaml line by line: each value has a comment above it, or sits inside a value documented as a whole
    (a `# --` comment above a mapping, e.g. resources)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented as a whole) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        block = []  # the comment lines right above the key
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.insert(0, lines[j].strip())
            j -= 1
        commented = bool(block)
        whole = commented and block[0].startswith("# --") and not rest
        inherited = any(doc for _, doc in stack)
        is_leaf = bool(rest) and not rest.startswith("#")
        if is_leaf and not commented and not inherited:
            undocumented.append(f"line {i + 1}: {key}")
        stack.append((indent, whole or inherited))
    assert not undocumented, undocumented


# ---------------------------------------------------------------------------------------------------------
# Renders
# ---------------------------------------------------------------------------------------------------------


def test_default_render_is_namespaced_with_least_privilege_roles(renders):
    objects = renders["defaults"]
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(["ServiceAccount", "Secret", "PersistentVolumeClaim", "ClusterRole", "ClusterRoleBinding",
                            "Role", "RoleBinding", "Service", "Deployment"])
    assert all(o["metadata"].get("namespace") in (NS, None) for o in objects)
    # The operator: a Role in the release namespace; the only ClusterRole is read-only discovery.
    role = one(objects, "Role", "modelmerge-operator", NS)
    from modelmerge_operator import rbac

    kopf_peering = {t for t in triples(rbac.NAMESPACE_RULES + rbac.CLUSTER_RULES) if t[0] == "kopf.dev"}
    assert triples(role["rules"]) == triples(rbac.NAMESPACE_RULES) - kopf_peering
    (discovery,) = find(objects, "ClusterRole")
    assert discovery["metadata"]["name"] == f"{NS}-modelmerge-operator-discovery"
    assert triples(discovery["rules"]) == {("apiextensions.k8s.io", "customresourcedefinitions", v)
                                           for v in ("list", "watch")} | {("", "namespaces", "list"),
                                                                           ("", "namespaces", "watch")}
    assert triples(discovery["rules"]) <= triples(rbac.CLUSTER_RULES)
    assert not any(r[1] == "secrets" for r in triples(role["rules"]) | triples(discovery["rules"]))
    # The API: its own Role; Secrets only created/patched/deleted (never read), no status writes.
    api_role = one(objects, "Role", "modelmerge-api", NS)
    assert triples(api_role["rules"]) == {
        ("modelmerge.io", plural, v) for plural in ("modelmerges", "modelmergesweeps")
        for v in ("get", "list", "watch", "create", "patch")} | {
        ("", "secrets", v) for v in ("create", "patch", "delete")} | {("", "pods", "list"), ("", "pods/log", "get")}
    for binding in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NS
        role_name = binding["roleRef"]["name"]
        assert subject["name"] == ("modelmerge-api" if role_name.endswith("-api") else "modelmerge-operator")
    args = container(_deployment(objects, "operator"))["args"]
    assert "--standalone" in args and _flag(args, "namespace") == [NS] and "--all-namespaces" not in args


def test_namespace_list_gets_a_role_in_each_and_the_release_namespace_for_the_api(renders):
    objects = renders["namespace-list"]
    assert {r["metadata"]["namespace"] for r in find(objects, "Role", "modelmerge-operator")} == {
        NS, "team-a", "team-b"}
    assert {r["metadata"]["namespace"] for r in find(objects, "RoleBinding", "modelmerge-operator")} == {
        NS, "team-a", "team-b"}
    assert _flag(container(_deployment(objects, "operator"))["args"], "namespace") == [NS, "team-a", "team-b"]
    without_api = renders["namespace-list-without-api"]
    assert {r["metadata"]["namespace"] for r in find(without_api, "Role")} == {"team-a"}
    assert not [o for o in without_api if o["metadata"]["labels"].get("app.kubernetes.io/component") == "api"]
    assert _flag(container(_deployment(without_api, "operator"))["args"], "namespace") == ["team-a"]


def test_cluster_wide_uses_a_cluster_role_and_no_roles_for_the_operator(renders):
    objects = renders["cluster-wide"]
    assert [r["metadata"]["name"] for r in find(objects, "Role")] == ["modelmerge-api"]
    cluster_roles = {r["metadata"]["name"]: r for r in find(objects, "ClusterRole")}
    assert set(cluster_roles) == {f"{NS}-modelmerge-operator", f"{NS}-modelmerge-operator-discovery"}
    from modelmerge_operator import rbac

    assert triples(cluster_roles[f"{NS}-modelmerge-operator"]["rules"]) == {
        t for t in triples(rbac.NAMESPACE_RULES) if t[0] != "kopf.dev"}
    # kopf lists namespaces only in namespaced mode.
    assert triples(cluster_roles[f"{NS}-modelmerge-operator-discovery"]["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
    binding = one(objects, "ClusterRoleBinding", f"{NS}-modelmerge-operator")
    assert binding["roleRef"]["kind"] == "ClusterRole" and binding["subjects"][0]["name"] == "modelmerge-operator"
    args = container(_deployment(objects, "operator"))["args"]
    assert "--all-namespaces" in args and not _flag(args, "namespace")


def test_token_review_adds_only_a_cluster_role_for_tokenreviews(renders):
    objects = renders["cluster-wide-token-review"]
    role = one(objects, "ClusterRole", f"{NS}-modelmerge-api-tokenreview")
    assert triples(role["rules"]) == {("authentication.k8s.io", "tokenreviews", "create")}
    assert one(objects, "ClusterRoleBinding", f"{NS}-modelmerge-api-tokenreview")["subjects"][0]["name"] == \
        "modelmerge-api"
    assert "--token-review" in container(_deployment(objects, "api"))["args"]
    assert "--token-review" not in container(_deployment(renders["defaults"], "api"))["args"]


def test_pod_security_of_operator_and_api(renders):
    for name, objects in renders.items():
        for deployment in find(objects, "Deployment"):
            pod = deployment["spec"]["template"]["spec"]
            assert RESTRICTED_POD.items() <= pod["securityContext"].items(), (name, pod["securityContext"])
            c = container(deployment)
            assert RESTRICTED_CONTAINER.items() <= c["securityContext"].items(), (name, c["securityContext"])
            assert all(v.get("emptyDir") is not None or v.get("persistentVolumeClaim") for v in pod["volumes"])
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
            assert pod["serviceAccountName"].startswith(deployment["metadata"]["name"].rsplit("-", 1)[0])


def test_merge_pods_get_the_same_pod_security_from_the_operator(renders):
    """The chart does not template merge pods: the operator's Job builder sets their security context."""
    from modelmerge_operator import manifests
    from modelmerge_operator.config import OperatorConfig

    body = {"metadata": {"name": "m", "namespace": NS, "uid": "u"},
            "spec": {"base_model": "a", "models_to_merge": ["b"], "merge_method": "average_merging",
                     "output": {"pvc": "out"}}}
    pod = manifests.job(body, ModelMergeSpec.model_validate(body["spec"]), OperatorConfig())["spec"]["template"]["spec"]
    chart_pod = _deployment(renders["defaults"], "operator")["spec"]["template"]["spec"]["securityContext"]
    assert pod["securityContext"] == chart_pod
    (c,) = pod["containers"]
    assert RESTRICTED_CONTAINER.items() <= c["securityContext"].items()


def test_probes_and_strategy(renders):
    objects = renders["defaults"]
    operator = _deployment(objects, "operator")
    assert operator["spec"]["strategy"] == {"type": "Recreate"} and operator["spec"]["replicas"] == 1
    c = container(operator)
    assert c["command"] == ["modelmerge", "operator"]
    assert _flag(c["args"], "liveness") == ["http://0.0.0.0:8080/healthz"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 8080}
    api = container(_deployment(objects, "api"))
    assert api["command"] == ["modelmerge", "serve"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert api[probe]["httpGet"] == {"path": "/api/health", "port": "http"}
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "api"


def test_api_serves_the_release_namespace_with_the_output_claim_read_only(renders):
    objects = renders["defaults"]
    deployment = _deployment(objects, "api")
    c = container(deployment)
    assert _flag(c["args"], "backend") == ["kubernetes"] and _flag(c["args"], "namespace") == [NS]
    assert _flag(c["args"], "output-pvc") == ["modelmerge-output"] and _flag(c["args"], "output-root") == ["/output"]
    assert _flag(c["args"], "cors-origins") == ["none"]
    assert {"name": "output", "mountPath": "/output", "readOnly": True} in c["volumeMounts"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "modelmerge-output", "readOnly": True}
    pvc = one(objects, "PersistentVolumeClaim", "modelmerge-output", NS)
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "100Gi"}}}
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    env = {e["name"]: e for e in c["env"]}
    assert env["MODELMERGE_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "modelmerge-api-token",
                                                                        "key": "token"}
    secret = one(objects, "Secret", "modelmerge-api-token", NS)
    assert len(secret["data"]["token"]) > 40
    assert _spec_defaults(objects) == {"backoffLimit": 1, "ttlSecondsAfterFinished": 86400, "resources": {
        "cpu": "2", "memory": "2Gi", "gpu": 1, "gpuResourceName": "nvidia.com/gpu", "shmSize": "1Gi"}}


def test_existing_claims_and_the_model_cache(renders):
    objects = renders["existing-claims-and-cache"]
    assert not find(objects, "PersistentVolumeClaim")
    c = container(_deployment(objects, "api"))
    assert _flag(c["args"], "output-pvc") == ["models"] and _flag(c["args"], "output-subpath") == ["merges"]
    assert _spec_defaults(objects)["modelCache"] == {"pvc": "hf", "readOnly": True, "subPath": "hub"}
    created = renders["created-cache-and-storage-class"]
    claims = {p["metadata"]["name"]: p for p in find(created, "PersistentVolumeClaim")}
    assert claims["modelmerge-output"]["spec"]["storageClassName"] == "fast"
    assert claims["modelmerge-output"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "annotations" not in claims["modelmerge-output"]["metadata"]
    assert claims["modelmerge-model-cache"]["spec"]["storageClassName"] == ""
    assert _spec_defaults(created)["modelCache"] == {"pvc": "modelmerge-model-cache", "readOnly": False}


def test_api_auth_variants(renders):
    existing = renders["auth-existing-secret"]
    assert not find(existing, "Secret")
    env = {e["name"]: e for e in container(_deployment(existing, "api"))["env"]}
    assert env["MODELMERGE_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "api-token", "key": "value"}
    disabled = renders["auth-disabled"]
    assert not find(disabled, "Secret")
    c = container(_deployment(disabled, "api"))
    assert not any(e["name"] == "MODELMERGE_API_TOKEN" for e in c.get("env") or [])
    assert _flag(c["args"], "cors-origins") == ["https://a.example,https://b.example"]


def test_static_token_value(tmp_path):
    objects = render(tmp_path, {"api": {"auth": {"token": "s3cret"}}})
    import base64

    assert base64.b64decode(one(objects, "Secret")["data"]["token"]).decode() == "s3cret"


def test_merge_defaults_reach_the_operator_flags_and_the_api_spec_defaults(renders):
    objects = renders["merge-defaults"]
    args = container(_deployment(objects, "operator"))["args"]
    assert _flag(args, "job-service-account") == ["merger"]
    assert sorted(_flag(args, "job-env")) == ["HF_HUB_OFFLINE=1", "OMP_NUM_THREADS=8"]
    defaults = _spec_defaults(objects)
    assert defaults == {
        "backoffLimit": 3, "hfTokenSecret": {"name": "hf-token", "key": "token"}, "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}], "queueName": "team-queue",
        "resources": {"cpu": 16, "memory": "64Gi", "gpu": 2, "gpuResourceName": "amd.com/gpu", "shmSize": "16Gi"},
        "priorityClassName": "high", "activeDeadlineSeconds": 3600}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_spec_defaults_are_valid_modelmerge_specs(renders, name):
    """What the API adds to every merge is accepted by the contract (the API also checks it when it starts)."""
    objects = renders[name]
    if not find(objects, "Deployment", "modelmerge-api") and not find(objects, "Deployment", "mm-api"):
        return
    c = container(_deployment(objects, "api"))
    spec = {**_spec_defaults(objects), "base_model": "a", "models_to_merge": ["b"], "merge_method": "task_arithmetic",
            "output": {"pvc": _flag(c["args"], "output-pvc")[0]}}
    ModelMergeSpec.model_validate(spec)


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_rendered_commands_parse_with_the_real_cli(renders, name):
    """Every flag the chart passes exists, with a value the CLI accepts (what `modelmerge` would do at start)."""
    from modelmerge.cli import build_parser

    for deployment in find(renders[name], "Deployment"):
        c = container(deployment)
        assert c["command"][0] == "modelmerge"
        args = build_parser().parse_args([*c["command"][1:], *c["args"]])
        if args.command == "operator":
            from modelmerge_operator.config import config_from_args

            config_from_args(args)  # --job-env NAME=VALUE pairs
        else:
            from modelmerge_api.server import spec_defaults

            assert spec_defaults(args)["output"]["pvc"] == _flag(c["args"], "output-pvc")[0]


def test_images_tags_pull_secrets_and_scheduling(renders):
    objects = renders["images-and-scheduling"]
    operator, api = _deployment(objects, "operator"), _deployment(objects, "api")
    assert container(operator)["image"] == "reg.local/op:1.2.3"
    assert container(operator)["imagePullPolicy"] == "Always"
    assert container(api)["image"] == "reg.local/api:1.2.3"
    args = container(operator)["args"]
    assert _flag(args, "image") == ["reg.local/merge:1.2.3-cuda"] and _flag(args, "image-pull-policy") == ["Never"]
    assert operator["spec"]["replicas"] == 0 and api["spec"]["replicas"] == 3
    pod = operator["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["nodeSelector"] == {"role": "system"}
    assert pod["tolerations"] == [{"key": "x", "operator": "Exists"}]
    assert operator["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}
    assert {"name": "MODELMERGE_WORKERS", "value": "4"} in container(operator)["env"]
    assert one(objects, "Service")["spec"]["type"] == "LoadBalancer"
    defaults = renders["defaults"]
    assert container(_deployment(defaults, "operator"))["image"] == "ghcr.io/modelmerge/operator:0.1.0"
    assert _flag(container(_deployment(defaults, "operator"))["args"], "image") == ["ghcr.io/modelmerge/merge:0.1.0"]


def test_names_follow_overrides_and_cluster_objects_carry_the_namespace(renders, tmp_path):
    objects = renders["name-overrides"]
    assert {d["metadata"]["name"] for d in find(objects, "Deployment")} == {"mm-operator", "mm-api"}
    assert {r["metadata"]["name"] for r in find(objects, "ClusterRole")} == {f"{NS}-mm-operator-discovery"}
    other = render(tmp_path, {"watch": {"clusterWide": True}}, namespace="elsewhere", release="team-merges")
    assert {r["metadata"]["name"] for r in find(other, "ClusterRole")} == {
        "elsewhere-team-merges-modelmerge-operator", "elsewhere-team-merges-modelmerge-operator-discovery"}


def test_include_crds_renders_the_modelmerge_crd(tmp_path):
    objects = render(tmp_path, include_crds=True)
    names = {o["metadata"]["name"] for o in find(objects, "CustomResourceDefinition")}
    assert names == {"modelmerges.modelmerge.io", "modelmergesweeps.modelmerge.io", "kopfpeerings.kopf.dev",
                     "clusterkopfpeerings.kopf.dev"}


# ---------------------------------------------------------------------------------------------------------
# examples/
# ---------------------------------------------------------------------------------------------------------

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _example_merges(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "ModelMerge"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_modelmerges_are_valid_and_use_the_charts_claims(path):
    merges = _example_merges(path)
    assert merges, f"{path.name} has no ModelMerge"
    for doc in merges:
        assert doc["apiVersion"] == "modelmerge.io/v1alpha1"
        spec = ModelMergeSpec.model_validate(doc["spec"])
        assert spec.output.pvc == "modelmerge-output"  # the chart's output claim for a release named modelmerge
        if spec.modelCache is not None:
            assert spec.modelCache.pvc == "modelmerge-model-cache"


def test_examples_cover_every_method_cpu_gpu_with_cache_and_a_kueue_queue():
    from modelmerge.contract import METHODS

    def specs(name: str) -> list[ModelMergeSpec]:
        return [ModelMergeSpec.model_validate(d["spec"]) for d in _example_merges(ROOT / "examples" / name)]

    tiny = specs("modelmerge-tiny.yaml")
    assert sorted(s.merge_method for s in tiny) == sorted(METHODS) and not any(s.use_gpu for s in tiny)
    (gpu,) = specs("modelmerge-7b-gpu.yaml")
    assert gpu.use_gpu and gpu.resources.gpu == 1 and gpu.modelCache is not None and gpu.hfTokenSecret is not None
    (queued,) = specs("modelmerge-kueue.yaml")
    assert queued.queueName == "merges"
    kinds = [d["kind"] for d in yaml.safe_load_all((ROOT / "examples/modelmerge-kueue.yaml").read_text()) if d]
    assert kinds == ["ResourceFlavor", "ClusterQueue", "LocalQueue", "ModelMerge"]


def test_kind_e2e_install_values_pass_the_schema_and_use_the_fixture_image(tmp_path):
    """The `--set` flags of hack/kind-e2e.sh's `helm install`, rendered: the script cannot run here (no Docker)."""
    script = (ROOT / "hack" / "kind-e2e.sh").read_text()
    substitutions = {"$REGISTRY": "localhost/modelmerge", "$TAG": "e2e", "$API_TOKEN": "e2e-token"}
    flags: list[str] = []
    for option, value in re.findall(r'(--set(?:-string)?) "([^"]+)"', script):
        for name, replacement in substitutions.items():
            value = value.replace(name, replacement)
        assert "$" not in value, value
        flags += [option, value]
    assert len(flags) >= 14
    result = helm("template", "modelmerge", str(CHART), "--namespace", NS, "--kube-version", KUBE_VERSION, *flags,
                  home=tmp_path)
    objects = [d for d in yaml.safe_load_all(result.stdout) if d]
    operator = container(_deployment(objects, "operator"))
    assert operator["image"] == "localhost/modelmerge/operator:e2e" and operator["imagePullPolicy"] == "Never"
    assert _flag(operator["args"], "image") == ["localhost/modelmerge/merge-tiny:e2e"]
    assert _flag(operator["args"], "job-env") == ["HF_HUB_OFFLINE=1"]
    assert _spec_defaults(objects)["resources"]["memory"] == "2Gi"
    # The examples' claim is the chart's for the release name the script installs.
    assert 'RELEASE=modelmerge' in script and one(objects, "PersistentVolumeClaim")["metadata"]["name"] == \
        "modelmerge-output"
    for path in ("examples/modelmerge-tiny.yaml", "merge_image/Dockerfile", "operator/Dockerfile", "api/Dockerfile",
                 "tests/helpers/models.py"):
        assert path in script and (ROOT / path).exists(), path


# ---------------------------------------------------------------------------------------------------------
# Evaluated merges: their image and default CPU/memory
# ---------------------------------------------------------------------------------------------------------


def _evaluated_pod(objects: list[dict], spec_defaults: dict) -> dict:
    """The merge container the operator (with the rendered flags) makes for an evaluated merge with these spec
    defaults."""
    from modelmerge.cli import build_parser
    from modelmerge_operator import manifests
    from modelmerge_operator.config import config_from_args

    c = container(_deployment(objects, "operator"))
    config = config_from_args(build_parser().parse_args([*c["command"][1:], *c["args"]]))
    spec = ModelMergeSpec.model_validate({
        **spec_defaults, "base_model": "a", "models_to_merge": ["b"], "merge_method": "task_arithmetic",
        "output": {"pvc": "out"}, "evaluation": {"data": ["eval/algebra.json"]}})
    body = {"metadata": {"name": "m", "namespace": NS, "uid": "u"}}
    return manifests.job(body, spec, config)["spec"]["template"]["spec"]["containers"][0]


def test_evaluation_image_and_resources_reach_the_operator(renders):
    args = container(_deployment(renders["defaults"], "operator"))["args"]
    assert _flag(args, "evaluation-image") == ["ghcr.io/modelmerge/merge:0.1.0"]
    assert _flag(args, "evaluation-cpu") == ["4"] and _flag(args, "evaluation-memory") == ["16Gi"]
    args = container(_deployment(renders["evaluation"], "operator"))["args"]
    assert _flag(args, "evaluation-image") == ["reg.local/eval:2.0-cuda"]
    assert _flag(args, "evaluation-cpu") == [] and _flag(args, "evaluation-memory") == ["64Gi"]
    # A ModelMerge applied with kubectl that states no resources.
    merge = _evaluated_pod(renders["evaluation"], {})
    assert merge["image"] == "reg.local/eval:2.0-cuda"
    assert merge["resources"] == {"requests": {"memory": "64Gi"}, "limits": {"memory": "64Gi"}}
    assert merge["workingDir"] == "/output"  # relative data files are on the output volume


def test_api_created_evaluated_merges_get_the_evaluation_resources_not_the_merge_ones(renders):
    """The API leaves CPU and memory of an evaluated merge to the operator (merge.resources stream, evaluation
    loads the model); GPUs and /dev/shm stay the chart's merge defaults."""
    from modelmerge_api.kube import evaluation_spec_defaults

    for name, cpu, memory in (("defaults", "4", "16Gi"), ("merge-defaults", "4", "16Gi")):
        defaults = _spec_defaults(renders[name])
        merge = _evaluated_pod(renders[name], evaluation_spec_defaults(defaults))
        assert merge["image"] == "ghcr.io/modelmerge/merge:0.1.0"
        amounts = {"cpu": cpu, "memory": memory}
        assert merge["resources"] == {"requests": amounts, "limits": amounts}, name
        plain = _evaluated_pod(renders[name], defaults)  # without the API's rule the merge's 2Gi would apply
        assert plain["resources"]["limits"]["memory"] == str(defaults["resources"]["memory"])
    evaluated = evaluation_spec_defaults(_spec_defaults(renders["merge-defaults"]))
    assert evaluated["resources"] == {"gpu": 2, "gpuResourceName": "amd.com/gpu", "shmSize": "16Gi"}
