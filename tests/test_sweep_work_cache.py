"""A sweep's trials share the engine's work cache: the operator annotates each trial ModelMerge with the folder of
the output volume they share and turns the annotation into the Job's --work-cache; the local backend runs its
trials with <sweep output folder>/.work-cache. With the real engine (tiny chat models, real data), the first
trial computes ties_merging_dare's thresholds and the baselines' evaluations and the later ones reuse them, on the
local backend and on the test control plane."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from modelmerge.contract import API_GROUP, API_VERSION, ModelMergeSpec
from modelmerge.sweep import ModelMergeSweepSpec, sweep_trials, work_cache_folder
from modelmerge_operator import manifests, sweep_manifests
from modelmerge_operator.config import OperatorConfig
from tests.helpers.eval_data import make_chat_finetune, make_chat_model, make_records, write_records

THRESHOLDS = "ties_merging_dare thresholds and majority sign"


def sweep_body(spec: dict, name: str = "grid") -> dict:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMergeSweep",
            "metadata": {"name": name, "namespace": "ns", "uid": "uid-1"}, "spec": spec}


def sweep_spec(**template) -> dict:
    return {"template": {"base_model": "org/base", "models_to_merge": ["org/a", "org/b"],
                         "merge_method": "ties_merging_dare", "output": {"pvc": "out"},
                         "evaluation": {"data": ["eval/a.json"]}, **template},
            "space": {"scaling_coefficient": {"values": [0.3, 0.6]}}}


def job_args(child: dict) -> list[str]:
    spec = ModelMergeSpec.model_validate(child["spec"])
    created = {**child, "metadata": {**child["metadata"], "uid": "child-uid"}}  # as the API server returns it
    return manifests.job(created, spec, OperatorConfig())["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize(("output_dir", "folder"), [("runs/grid-1", "runs/grid-1/.work-cache"),
                                                    (None, ".work-cache/grid")])
def test_trials_carry_the_shared_folder_and_their_jobs_the_flag(output_dir, folder):
    raw = sweep_spec(**({"output_dir": output_dir} if output_dir else {}))
    spec = ModelMergeSweepSpec.model_validate(raw)
    assert work_cache_folder(spec, "grid") == folder
    children = [sweep_manifests.child(sweep_body(raw), spec, trial) for trial in sweep_trials(spec)]
    assert len(children) == 2
    for child in children:
        assert child["metadata"]["annotations"] == {manifests.ANNOTATION_WORK_CACHE: folder}
        args = job_args(child)
        assert args[args.index("--work-cache") + 1] == f"{manifests.OUTPUT_MOUNT}/{folder}"
        assert args[args.index("--output-dir") + 1].startswith(f"{manifests.OUTPUT_MOUNT}/")


@pytest.mark.parametrize("folder", ["../elsewhere", "runs/../../etc", "", "/", "./."])
def test_an_annotation_that_leaves_the_volume_gives_no_cache(folder):
    raw = sweep_spec()
    spec = ModelMergeSweepSpec.model_validate(raw)
    child = sweep_manifests.child(sweep_body(raw), spec, sweep_trials(spec)[0])
    child["metadata"]["annotations"][manifests.ANNOTATION_WORK_CACHE] = folder
    assert "--work-cache" not in job_args(child)


def test_only_a_sweeps_trial_gets_the_cache():
    raw = sweep_spec()
    spec = ModelMergeSweepSpec.model_validate(raw)
    child = sweep_manifests.child(sweep_body(raw), spec, sweep_trials(spec)[0])
    child["metadata"]["ownerReferences"] = []  # a user's own ModelMerge with the annotation copied onto it
    assert "--work-cache" not in job_args(child)
    assert "--work-cache" in job_args({**child, "metadata": {**child["metadata"], "ownerReferences": [
        sweep_manifests.owner_reference(sweep_body(raw))]}})


# ---- the real engine ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-work-cache")
    base = make_chat_model(root / "base", hidden=32, intermediate=64)
    return base, [make_chat_finetune(base, root / f"ft{i}", seed=70 + i, scale=0.05) for i in range(2)]


def template(family, data: list[str], **fields) -> dict:
    base, finetunes = family
    return {"base_model": str(base), "models_to_merge": [str(f) for f in finetunes],
            "merge_method": "ties_merging_dare", "param_value_mask_rate": 0.3,
            "evaluation": {"data": data, "baselines": True, "max_length": 64}, **fields}


def check_reuse(reports: list[dict], cache: Path, family) -> None:
    """The first trial did the work and stored it in `cache`; every later one reused all of it."""
    base, finetunes = family
    everything = {THRESHOLDS, f"the evaluation of base_model {base}",
                  *(f"the evaluation of models_to_merge[{i}] {f}" for i, f in enumerate(finetunes))}
    assert [r["work_cache"]["reused"] for r in reports[:1]] == [[]]
    assert all(set(r["work_cache"]["reused"]) == everything for r in reports[1:])
    assert {r["work_cache"]["directory"] for r in reports} == {str(cache)}
    baselines = [[(b["model"], b["report"]["overall"]) for b in r["evaluation"]["baselines"]] for r in reports]
    assert all(b == baselines[0] for b in baselines) and len(baselines[0]) == 3
    assert len({r["statistics"]["majority_sign"] for r in reports}) == 1
    assert len(list(cache.glob("*.json"))) == 4  # the statistics and three baselines


def test_local_sweep_trials_reuse_the_first_trials_work(family, tmp_path):
    from modelmerge_api.app import create_app
    from modelmerge_api.local import LocalBackend
    from tests.helpers.rest_api import serve_in_thread
    from tests.test_sweep_api import Served

    write_records(tmp_path / "data" / "output" / "eval" / "code.json", make_records(6, seed=3))
    backend = LocalBackend(tmp_path / "data", workers=2)
    with serve_in_thread(create_app(backend)) as url:
        served = Served(url, backend)
        sweep_id = served.start({"template": template(family, ["eval/code.json"]), "parallelism": 1,
                                 "space": {"scaling_coefficient": {"values": [0.3, 0.6, 0.9]}}})
        final = served.wait(sweep_id, timeout=600)
    assert final["status"] == "completed", final
    folder = backend.output_root / sweep_id
    trials = sorted(final["trials"], key=lambda t: t["index"])
    reports = [json.loads((folder / t["name"] / "merge_report.json").read_text()) for t in trials]
    check_reuse(reports, folder / ".work-cache", family)
    log = (tmp_path / "data" / "logs" / f"{trials[1]['job_id']}.log").read_text()
    assert f"work cache: reused {THRESHOLDS} from {folder / '.work-cache'}" in log


@pytest.mark.integration
def test_kubernetes_sweep_trials_reuse_the_first_trials_work(family, k8s_api, namespace, kubeconfig_path, tmp_path,
                                                             kubelet):
    """The operator (real engine in the merge pods, run by the test kubelet as local processes) runs a sweep of
    three trials one at a time: the second and third trial's log and report say the thresholds were reused."""
    from modelmerge import crd, sweep_crd
    from tests.test_sweep_kube import OUTPUT_PVC, Sweeps

    crd.install(k8s_api)
    crd.install(k8s_api, manifest=sweep_crd.sweep_crd())
    world = Sweeps(k8s_api, namespace, kubeconfig_path, tmp_path, kubelet)
    world.merge_command = f"{sys.executable} -m modelmerge.cli"
    volume = Path(kubelet.pvc_path(OUTPUT_PVC))
    write_records(volume / "eval" / "code.json", make_records(6, seed=3))
    try:
        world.start_operator()
        name = world.create({"template": template(family, ["eval/code.json"], output={"pvc": OUTPUT_PVC},
                                                  output_dir="grid", resources={"cpu": "1", "memory": "2Gi"}),
                             "parallelism": 1, "space": {"scaling_coefficient": {"values": [0.3, 0.6, 0.9]}}},
                            name=f"wc-{uuid.uuid4().hex[:5]}")
        status = world.wait_phase(name, ("Succeeded", "Failed"), timeout=600)
        assert status["phase"] == "Succeeded", status
        trials = sorted(world.children(name).values(),
                        key=lambda c: int(c["metadata"]["labels"][sweep_manifests.LABEL_TRIAL]))
        logs = [pod_log(world, child["status"]["jobName"]) for child in trials]
    finally:
        world.stop()
    assert [c["metadata"]["annotations"][manifests.ANNOTATION_WORK_CACHE] for c in trials] == ["grid/.work-cache"] * 3
    reports = [json.loads((volume / "grid" / c["metadata"]["name"] / "merge_report.json").read_text())
               for c in trials]
    cache = volume / "grid" / ".work-cache"  # the process kubelet gives the engine the claim's folder as /output
    check_reuse(reports, cache, family)
    assert f"work cache: reused {THRESHOLDS}" not in logs[0]
    assert all(f"work cache: reused {THRESHOLDS} from {cache}" in log for log in logs[1:])


def pod_log(world, job_name: str) -> str:
    (pod,) = world.core.list_namespaced_pod(world.ns, label_selector=f"job-name={job_name}").items
    return world.core.read_namespaced_pod_log(pod.metadata.name, world.ns)
