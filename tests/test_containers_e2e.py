"""The containerised path on real containers: the three images built (`hack/images.sh`, CPU merge image), the
operator and the REST API running as containers from their images (host network, the control plane's admin
kubeconfig), and the test kubelet running the merge pods with its podman runtime (tests/kube/kubelet/podman.py).

Needs podman and the envtest control plane; skipped without podman unless REQUIRE_CONTAINERS=1 (CI), where its
absence fails. The tiny models are made on the host and baked into a fixture image FROM the CPU merge image
(`/models`, as examples/modelmerge-tiny.yaml expects); nothing else is added to the merge image. The merge image is
built with a narrow numba precompile (PRECOMPILE, one method and dtype: release images compile every one), whose
seed the pod-like containers below load instead of compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from modelmerge.contract import API_GROUP, API_VERSION, PLURAL
from tests.helpers.waiting import wait_for
from tests.kube.controlplane import free_port
from tests.kube.kubelet.podman import PodmanRuntime, podman_available, ulimit_options

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "modelmerge-tiny.yaml"
REGISTRY = "localhost/modelmerge-e2e"
RUN_AS = "10001"
MERGE_TIMEOUT = 600.0
# The merge image's precompile (its build arg PRECOMPILE, through hack/images.sh's MERGE_PRECOMPILE): small, so
# the build stays short; the tests below merge within it.
PRECOMPILE = ["--methods", "task_arithmetic", "--dtypes", "bfloat16", "--max-models", "2"]
SEED = "/opt/numba-cache"


def podman(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """operator, api and merge (the merge-cpu target): built, or found by content hash in the cache."""
    if not podman_available():
        if os.environ.get("REQUIRE_CONTAINERS") == "1":
            pytest.fail("REQUIRE_CONTAINERS=1 but podman is not installed or cannot run containers", pytrace=False)
        pytest.skip("podman is not installed (REQUIRE_CONTAINERS=1 makes this a failure)")
    env = {**os.environ, "CONTAINER_ENGINE": "podman", "MERGE_TARGET": "merge-cpu", "IMAGE_REGISTRY": REGISTRY,
           "IMAGE_TAG": "test", "MERGE_PRECOMPILE": " ".join(PRECOMPILE)}
    built = subprocess.run(["bash", str(ROOT / "hack" / "images.sh")], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr[-4000:]
    operator, api, merge = built.stdout.split()[-3:]
    return {"operator": operator, "api": api, "merge": merge}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from tests.helpers.models import make_family

    root = tmp_path_factory.mktemp("models")
    make_family(root, n=2)
    return root


@pytest.fixture(scope="module")
def merge_image_with_models(images, models) -> str:
    """The merge image plus the tiny models at /models (a layer of plain files: same user, entrypoint, venv)."""
    for path in models.rglob("*"):  # readable by the image's user (safetensors files are written 0600)
        path.chmod(0o755 if path.is_dir() else 0o644)
    (models / "Containerfile").write_text(f"FROM {images['merge']}\nCOPY base /models/base\nCOPY ft0 /models/ft0\n"
                                          "COPY ft1 /models/ft1\n")
    tag = f"{REGISTRY}/merge-tiny:test"
    podman("build", "--quiet", "-f", str(models / "Containerfile"), "-t", tag, str(models))
    return tag


@pytest.fixture
def runtime() -> PodmanRuntime:
    runtime = PodmanRuntime()
    yield runtime
    runtime.remove_all()


@pytest.fixture
def podman_kubelet(control_plane, namespace, tmp_path, runtime):
    from tests.kube.kubelet import FakeKubelet

    api = control_plane.api_client()
    harness = FakeKubelet(api, namespace=namespace, root=tmp_path / "kubelet", runtime=runtime)
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()
        api.close()


@pytest.fixture
def kubeconfig(control_plane, tmp_path) -> list[str]:
    """podman options that give a container the admin kubeconfig at /etc/modelmerge/kubeconfig (and the CA file
    at the path the kubeconfig names), readable by the image's non-root user."""
    path = control_plane.write_kubeconfig(tmp_path / "container-kubeconfig" / "kubeconfig")
    path.chmod(0o644)
    path.parent.chmod(0o755)
    return ["--env", "KUBECONFIG=/etc/modelmerge/kubeconfig", "--mount",
            f"type=bind,source={path},destination=/etc/modelmerge/kubeconfig,ro=true",
            "--mount", f"type=bind,source={control_plane.ca_file},destination={control_plane.ca_file},ro=true"]


def run_container(image: str, options: list[str], args: list[str], *, env: dict[str, str] | None = None) -> str:
    """A detached container on the host network with the machine's rlimits and the chart's restricted security
    context (non-root image user, read-only root, no capabilities, no privilege escalation); its name. `env`:
    values passed by name (`--env NAME` in options), never on the command line."""
    name = f"modelmerge-e2e-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", "--cap-drop", "all",
           "--security-opt", "no-new-privileges", *ulimit_options(), *options, image, *args, env=env)
    return name


@pytest.fixture
def containers():
    names: list[str] = []
    yield names
    for name in names:
        logs = podman("logs", name, check=False)
        sys.stderr.write(f"--- {name} ---\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}\n")
        podman("rm", "--force", name, check=False)


RELEASE = "modelmerge"
API_TOKEN = "e2e-" + uuid.uuid4().hex


@pytest.fixture
def installed(control_plane, namespace, images, merge_image_with_models, tmp_path) -> dict[str, dict]:
    """`helm install` of the chart with the built images; returns the installed Deployments' containers."""
    from kubernetes import client

    from tests.helpers.helm_chart import CHART, helm

    def repository_and_tag(ref: str) -> tuple[str, str]:
        repository, _, tag = ref.rpartition(":")
        return repository, tag

    values = []
    for component, ref in (("operator", images["operator"]), ("api", images["api"]),
                           ("merge", merge_image_with_models)):
        repository, tag = repository_and_tag(ref)
        values += ["--set", f"images.{component}.repository={repository},images.{component}.tag={tag},"
                            f"images.{component}.pullPolicy=Never"]
    helm("install", RELEASE, str(CHART), "--namespace", namespace, "--kubeconfig",
         str(control_plane.kubeconfig_path), *values,
         "--set", "merge.resources.cpu=1,merge.resources.memory=2Gi,merge.resources.shmSize=256Mi",
         "--set", "storage.output.size=1Gi", "--set", f"api.auth.token={API_TOKEN}", home=tmp_path / "helm")
    apps = client.AppsV1Api(control_plane.api_client())
    return {component: apps.read_namespaced_deployment(f"{RELEASE}-{component}", namespace).to_dict()
            ["spec"]["template"]["spec"]["containers"][0] for component in ("operator", "api")}


def deployment_args(container: dict, **overrides: str) -> list[str]:
    """The Deployment's args, with `--name=value` overrides (ports: the containers share the host network)."""
    args = []
    for arg in container["args"]:
        name = arg.split("=", 1)[0].removeprefix("--")
        args.append(f"--{name}={overrides.pop(name)}" if name in overrides else arg)
    assert not overrides, f"not in the Deployment's args: {overrides}"
    return args


@pytest.fixture
def operator_container(installed, images, kubeconfig, containers) -> str:
    container = installed["operator"]
    assert container["image"] == images["operator"] and container["command"] == ["modelmerge", "operator"]
    args = deployment_args(container, liveness=f"http://127.0.0.1:{free_port()}/healthz")
    name = run_container(images["operator"], [*kubeconfig, "--env", "POD_ID=operator",
                                              "--mount", "type=tmpfs,destination=/tmp"], args)
    containers.append(name)
    return name


def custom_objects(control_plane):
    from kubernetes import client

    return client.CustomObjectsApi(control_plane.api_client())


def phase_of(custom, namespace: str, name: str) -> str | None:
    body = custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
    return (body.get("status") or {}).get("phase")


def wait_finished(custom, namespace: str, names: list[str], context) -> dict[str, str]:
    def finished():
        phases = {name: phase_of(custom, namespace, name) for name in names}
        return phases if all(p in ("Succeeded", "Failed") for p in phases.values()) else None

    return wait_for(finished, timeout=MERGE_TIMEOUT, what=f"ModelMerges {names} to finish", context=context)


def merge_pods(core, namespace: str, name: str) -> list:
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={name}-merge").items


def host_merge(spec: dict, models: Path, output: Path) -> None:
    """`modelmerge merge` on the host with the same request (model paths mapped to the host's copies)."""
    fields = {k: v for k, v in spec.items() if k not in ("output", "resources", "image", "modelCache")}
    fields["base_model"] = fields["base_model"].replace("/models", str(models))
    fields["models_to_merge"] = [m.replace("/models", str(models)) for m in fields["models_to_merge"]]
    spec_file = output.parent / f"{output.name}.json"
    spec_file.write_text(json.dumps(fields))
    result = subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "none", "--spec",
                             str(spec_file), "--output-dir", str(output)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def weights(folder: Path) -> dict[str, bytes]:
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("model.safetensors.index.json"),
                    *folder.glob("config.json")])
    assert files, f"no weights in {folder}"
    return {f.name: f.read_bytes() for f in files}


def test_examples_merge_in_the_merge_image_as_non_root_with_a_read_only_root(
        control_plane, namespace, podman_kubelet, operator_container, models, merge_image_with_models, tmp_path):
    from kubernetes import client

    core = client.CoreV1Api(control_plane.api_client())
    custom = custom_objects(control_plane)
    documents = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    for document in documents:
        custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, document)
    names = [d["metadata"]["name"] for d in documents]
    phases = wait_finished(custom, namespace, names, context=lambda: podman("logs", operator_container,
                                                                            check=False).stderr[-3000:])
    assert phases == dict.fromkeys(names, "Succeeded"), {
        n: custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, n).get("status")
        for n in names}
    merge_image_id = podman("image", "inspect", "--format", "{{.Id}}", merge_image_with_models).stdout.strip()
    for document in documents:
        name = document["metadata"]["name"]
        (pod,) = merge_pods(core, namespace, name)
        assert pod.status.phase == "Succeeded"
        container_id = pod.status.container_statuses[0].container_id
        assert container_id.startswith("podman://")
        inspected = json.loads(podman("inspect", container_id.removeprefix("podman://")).stdout)[0]
        assert inspected["Image"] == merge_image_id, "the merge pod ran from another image"
        assert inspected["Config"]["User"] == f"{RUN_AS}:{RUN_AS}"
        assert inspected["HostConfig"]["ReadonlyRootfs"] is True
        assert inspected["State"]["ExitCode"] == 0
        reference = tmp_path / "host" / name
        reference.parent.mkdir(exist_ok=True)
        host_merge(document["spec"], models, reference)
        assert weights(podman_kubelet.pvc_path("modelmerge-output") / name) == weights(reference), name


def test_api_container_merges_and_downloads(
        control_plane, podman_kubelet, installed, operator_container, images, kubeconfig, containers, tmp_path):
    container = installed["api"]
    assert container["image"] == images["api"] and container["command"] == ["modelmerge", "serve"]
    output = podman_kubelet.pvc_path("modelmerge-output")
    port = free_port()
    name = run_container(images["api"], [
        *kubeconfig, "--env", "MODELMERGE_API_TOKEN", "--mount", "type=tmpfs,destination=/tmp",
        "--mount", f"type=bind,source={output},destination=/output,ro=true"],
        deployment_args(container, host="127.0.0.1", port=str(port)), env={"MODELMERGE_API_TOKEN": API_TOKEN})
    containers.append(name)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {API_TOKEN}"}

    def healthy():
        try:
            return requests.get(f"{base}/api/health").status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(healthy, timeout=120, what="the API container to answer",
             context=lambda: podman("logs", name, check=False).stderr[-3000:])
    response = requests.post(f"{base}/api/merge", headers=auth, json={
        "base_model": "/models/base", "models_to_merge": ["/models/ft0", "/models/ft1"],
        "merge_method": "task_arithmetic", "scaling_coefficient": 0.5, "dtype": "float32"})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]

    def finished():
        job = requests.get(f"{base}/api/jobs/{job_id}", headers=auth).json()
        return job if job["status"] in ("completed", "failed") else None

    job = wait_for(finished, timeout=MERGE_TIMEOUT, what="the API's merge")
    assert job["status"] == "completed", job
    listing = requests.get(f"{base}/api/download/{job_id}", headers=auth).json()
    names = {f["path"] for f in listing["files"]}
    assert "model.safetensors" in names and "merge_report.json" in names, listing
    archive = tmp_path / "merged.tar"
    archive.write_bytes(requests.get(f"{base}/api/download/{job_id}/archive", headers=auth).content)
    with tarfile.open(archive) as tar:
        members = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert members["model.safetensors"] == (output / job_id / "model.safetensors").read_bytes()


def pod(name: str, image: str, command: list[str], *, security: dict | None = None) -> dict:
    container = {"name": "main", "image": image, "imagePullPolicy": "Never", "command": command,
                 "securityContext": security or {}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container]}}


RESTRICTED = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "readOnlyRootFilesystem": True,
              "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}}


def test_a_pod_writing_to_its_read_only_root_fails_with_a_clear_status(
        control_plane, namespace, podman_kubelet, images):
    from kubernetes import client

    core = client.CoreV1Api(control_plane.api_client())
    command = ["python", "-c", "import os; print(os.getuid(), os.getgid()); open('/written-by-the-pod', 'w')"]
    core.create_namespaced_pod(namespace, pod("writes-root", images["merge"], command, security=RESTRICTED))

    def finished():
        status = core.read_namespaced_pod("writes-root", namespace).status
        return status if status.phase in ("Succeeded", "Failed") else None

    status = wait_for(finished, timeout=120, what="the pod to end")
    assert status.phase == "Failed"
    terminated = status.container_statuses[0].state.terminated
    assert terminated.exit_code == 1 and terminated.reason == "Error"
    log = podman_kubelet.logs(namespace, "writes-root")
    assert log.startswith("10001 10001") and "Read-only file system: '/written-by-the-pod'" in log, log


def test_a_non_root_pod_whose_image_runs_as_root_is_refused(control_plane, namespace, podman_kubelet, images):
    """runAsNonRoot without runAsUser against an image whose USER is root: the kubelet refuses to create it."""
    from kubernetes import client

    core = client.CoreV1Api(control_plane.api_client())
    root_image = f"{REGISTRY}/root-user:test"
    build_dir = Path(podman_kubelet.root) / "root-image"
    build_dir.mkdir(parents=True)
    (build_dir / "Containerfile").write_text(f"FROM {images['merge']}\nUSER 0\n")
    podman("build", "--quiet", "-t", root_image, str(build_dir))
    security = {k: v for k, v in RESTRICTED.items() if k not in ("runAsUser", "runAsGroup")}
    core.create_namespaced_pod(namespace, pod("root-image", root_image, ["python", "-c", "pass"], security=security))

    def waiting_reason():
        statuses = core.read_namespaced_pod("root-image", namespace).status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses else None
        return waiting if waiting and waiting.reason == "CreateContainerConfigError" else None

    waiting = wait_for(waiting_reason, timeout=120, what="CreateContainerConfigError")
    assert "container has runAsNonRoot and image will run as root" in waiting.message
    assert core.read_namespaced_pod("root-image", namespace).status.phase == "Pending"


def run_like_a_merge_pod(image: str, *args: str) -> subprocess.CompletedProcess:
    """`python args...` in a container as a merge Job runs it: the image's non-root user, read-only root, no
    capabilities, HOME and TMPDIR on an empty writable volume (the Job's /scratch emptyDir), no network."""
    return podman("run", "--rm", "--network", "none", "--read-only", "--cap-drop", "all", "--security-opt",
                  "no-new-privileges", *ulimit_options(), "--mount", "type=tmpfs,destination=/scratch",
                  "--env", "HOME=/scratch", "--env", "TMPDIR=/scratch", "--entrypoint", "python", image, *args,
                  check=False)


def test_the_merge_image_ships_its_precompiled_kernels_to_a_fresh_read_only_pod(images):
    """`precompile --verify` in a fresh container: every kernel of the build's precompile is loaded from the
    image's read-only seed (copied into numba's cache under HOME), none compiled."""
    result = run_like_a_merge_pod(images["merge"], "-m", "modelmerge_engine.precompile", *PRECOMPILE, "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["compiled"] == 0 and report["cache_hits"] > 0, report


# In the container: a merge as the operator runs it (a spec file, `modelmerge merge`), then numba's cache under HOME
# against the seed: which files the merge added or changed (a compile writes a new data file and rewrites the index).
MERGE_THEN_COMPARE = """
import filecmp, json, os, pathlib, subprocess, sys
spec = pathlib.Path(os.environ["TMPDIR"], "spec.json")
spec.write_text(json.dumps({"base_model": "/models/base", "models_to_merge": ["/models/ft0", "/models/ft1"],
                            "merge_method": "task_arithmetic", "scaling_coefficient": 0.5, "dtype": "bfloat16"}))
merged = subprocess.run(["modelmerge", "merge", "--progress", "none", "--spec", str(spec), "--output-dir",
                         os.path.join(os.environ["TMPDIR"], "out")], stdout=sys.stderr)
seed, cache = pathlib.Path(os.environ["MODELMERGE_NUMBA_CACHE_SEED"]), pathlib.Path.home() / ".cache" / "numba"
files = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
print(json.dumps({"exit": merged.returncode, "files": files,
                  "not_seeded": [f for f in files if not (seed / f).is_file()
                                 or not filecmp.cmp(seed / f, cache / f, shallow=False)]}))
"""


def test_a_merge_in_a_fresh_pod_loads_the_seeded_kernels_and_compiles_none(merge_image_with_models):
    result = run_like_a_merge_pod(merge_image_with_models, "-c", MERGE_THEN_COMPARE)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["exit"] == 0, result.stderr[-3000:]
    assert report["files"] and report["not_seeded"] == [], report
