"""Operator benchmark: 500 ModelMerge objects created at once against the envtest control plane.

Starts etcd + kube-apiserver + kube-controller-manager (tests/kube/controlplane.py), installs the CRD, runs the
kubelet harness (tests/kube/kubelet/) with a no-op merge command and `modelmerge operator` as a subprocess, then
creates N ModelMerges from a thread pool and watches Jobs and ModelMerges; --runs times (default 5), each on a fresh
control plane, with the median and spread, raw rows and provenance in bench/results/operator.json. Reports, from the
first create:

* jobs_s:      all N Jobs exist (the operator's work; target: 500 within 60 s on the 2-core machine),
* running_s:   all N statuses have reached Running (or already Succeeded: a no-op merge is over in a moment),
* succeeded_s: all N statuses are Succeeded (includes the job controller and the harness running N pods).

To show where the time goes it also reports when all pods exist (kube-controller-manager's job controller, which
is rate-limited by its own client QPS), when all pods ran (the harness), and the operator's status lag: per merge,
from the Job first reporting a ready or finished pod to the ModelMerge reaching Running (p50/p95/max).

The peer measured in the same run is the API server itself: the same client creating N ConfigMap + Job pairs
directly (suspended, so no pods), i.e. the floor for "N Jobs exist" on this control plane; the ratio says what the
operator costs on top of it.

    .venv/bin/python bench/bench_operator.py [--count 500] [--workers 16] [--command true] [--skip-peer]
                                             [--kcm-qps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubernetes import client, watch  # noqa: E402

from bench.provenance import median_spread, provenance, results_path, write_results  # noqa: E402
from modelmerge import crd  # noqa: E402
from modelmerge.contract import API_GROUP, API_VERSION, PLURAL  # noqa: E402
from tests.kube.controlplane import ControlPlane, find_assets  # noqa: E402
from tests.kube.kubelet import FakeKubelet  # noqa: E402

TARGET_JOBS_S = 60.0


class TunedControlPlane(ControlPlane):
    """The test control plane with kube-controller-manager's client rate limit and job workers raised (its
    defaults, 20 QPS and 5 job syncs, pace pod creation and Job status updates, not the operator)."""

    def __init__(self, assets, qps: int):
        super().__init__(assets)
        self.qps = qps

    def _spawn(self, name: str, args: list[str]) -> None:
        if name == "kube-controller-manager":
            args = [*args, f"--kube-api-qps={self.qps}", f"--kube-api-burst={self.qps * 2}",
                    "--concurrent-job-syncs=50"]
        super()._spawn(name, args)


class _RawWatch(watch.Watch):
    def get_return_type(self, func):  # leave objects as dicts
        return None


class Tracker:
    """Watches one namespace's Jobs and ModelMerges and records when each milestone is first reached."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.api, self.ns = api, namespace
        self.jobs: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.succeeded: dict[str, float] = {}
        self.pods: dict[str, float] = {}
        self.pods_ran: dict[str, float] = {}
        self.job_started: dict[str, float] = {}
        self._stop = threading.Event()
        self._watches: list[_RawWatch] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        batch, custom = client.BatchV1Api(self.api), client.CustomObjectsApi(self.api)
        threading.Thread(target=self._loop, args=(batch.list_namespaced_job, (self.ns,), self._job),
                         daemon=True).start()
        threading.Thread(target=self._loop, args=(client.CoreV1Api(self.api).list_namespaced_pod, (self.ns,),
                                                  self._pod), daemon=True).start()
        threading.Thread(target=self._loop, args=(custom.list_namespaced_custom_object,
                                                  (API_GROUP, API_VERSION, self.ns, PLURAL), self._mm),
                         daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        for w in self._watches:
            w.stop()

    def _loop(self, func, args, record) -> None:
        version = ""
        while not self._stop.is_set():
            w = _RawWatch()
            self._watches.append(w)
            try:
                for event in w.stream(func, *args, resource_version=version, timeout_seconds=60):
                    obj = event["raw_object"]
                    version = obj["metadata"].get("resourceVersion", version)
                    record(obj)
            except Exception:  # noqa: BLE001 - a bench watch just reconnects (410 → relist)
                version = ""
                time.sleep(0.2)

    def _job(self, job: dict) -> None:
        status, now = job.get("status") or {}, time.monotonic()
        name = job["metadata"]["name"].removesuffix("-merge")
        with self.lock:
            self.jobs.setdefault(name, now)
            if status.get("ready") or status.get("succeeded"):
                self.job_started.setdefault(name, now)

    def _pod(self, pod: dict) -> None:
        name, now = pod["metadata"]["name"], time.monotonic()
        with self.lock:
            self.pods.setdefault(name, now)
            if (pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed"):
                self.pods_ran.setdefault(name, now)

    def lag(self) -> dict[str, float]:
        """Seconds from the Job reporting a ready/finished pod to the ModelMerge reaching Running."""
        with self.lock:
            lags = sorted(self.running[n] - t for n, t in self.job_started.items() if n in self.running)
        if not lags:
            return {}
        pick = lambda q: round(lags[min(len(lags) - 1, int(q * len(lags)))], 2)  # noqa: E731
        return {"p50": pick(0.5), "p95": pick(0.95), "max": round(lags[-1], 2)}

    def _mm(self, mm: dict) -> None:
        phase = (mm.get("status") or {}).get("phase")
        name, now = mm["metadata"]["name"], time.monotonic()
        with self.lock:
            if phase in ("Running", "Succeeded"):
                self.running.setdefault(name, now)
            if phase == "Succeeded":
                self.succeeded.setdefault(name, now)

    def wait(self, which: dict[str, float], count: int, deadline: float) -> float | None:
        while time.monotonic() < deadline:
            with self.lock:
                if len(which) >= count:
                    return max(which.values())
            time.sleep(0.05)
        return None


def _spec(i: int) -> dict:
    return {"base_model": "org/base", "models_to_merge": ["org/a", "org/b"], "merge_method": "task_arithmetic",
            "output": {"pvc": "bench-out"}, "output_dir": f"m{i}"}


def create_namespace(api: client.ApiClient, name: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}}, _preload_content=False)
    deadline = time.monotonic() + 60
    while True:  # pods are admitted only once the namespace's default ServiceAccount exists
        try:
            core.read_namespaced_service_account("default", name, _preload_content=False)
            return
        except client.exceptions.ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def run_operator_case(cp: ControlPlane, api: client.ApiClient, args, workdir: Path) -> dict:
    ns = "bench-operator"
    create_namespace(api, ns)
    kubelet = FakeKubelet(api, namespace=ns, root=workdir / "kubelet",
                          capacity={"pods": str(args.count * 2), "cpu": "1000", "memory": "4Ti"})
    kubelet.start()
    log = open(workdir / "operator.log", "wb")  # noqa: SIM115 - the child keeps it
    operator = subprocess.Popen(
        [sys.executable, "-m", "modelmerge.cli", "operator", "-n", ns, "--standalone", "--liveness", "",
         "--kubeconfig", str(cp.kubeconfig_path), "--merge-command", args.command, "--progress-interval", "0",
         "--workers", str(args.workers)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    tracker = Tracker(api, ns)
    tracker.start()
    time.sleep(args.settle)  # let the operator start and list (an empty namespace) before the burst
    custom = client.CustomObjectsApi(api)

    def create(i: int) -> None:
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMerge",
                "metadata": {"name": f"bench-{i:04d}"}, "spec": _spec(i)}
        custom.create_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, body, _preload_content=False)

    procs = {"operator": operator.pid, **{name: p.pid for name, p in cp._procs}, "bench+harness": os.getpid()}
    cpu_before = {name: cpu_seconds(pid) for name, pid in procs.items()}
    t0 = time.monotonic()
    with ThreadPoolExecutor(args.client_threads) as pool:
        list(pool.map(create, range(args.count)))
    created = time.monotonic()
    deadline = t0 + args.timeout
    jobs = tracker.wait(tracker.jobs, args.count, deadline)
    pods = tracker.wait(tracker.pods, args.count, deadline)
    pods_ran = tracker.wait(tracker.pods_ran, args.count, deadline)
    running = tracker.wait(tracker.running, args.count, deadline)
    succeeded = tracker.wait(tracker.succeeded, args.count, deadline)
    cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 1) for name, pid in procs.items()}
    tracker.stop()
    operator.terminate()
    operator.wait(timeout=30)
    log.close()
    kubelet.stop(delete_pods=False)

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 2)

    return {"created_s": since(created), "jobs_s": since(jobs), "pods_s": since(pods),
            "pods_ran_s": since(pods_ran), "running_s": since(running), "succeeded_s": since(succeeded),
            "status_lag_s": tracker.lag(), "cpu_s": cpu, "jobs_seen": len(tracker.jobs),
            "running_seen": len(tracker.running), "succeeded_seen": len(tracker.succeeded)}


def run_direct_case(api: client.ApiClient, args) -> dict:
    """The peer: the same client makes N ConfigMap + Job pairs itself (suspended Jobs: no pods)."""
    from modelmerge.contract import ModelMergeSpec
    from modelmerge_operator import manifests
    from modelmerge_operator.config import OperatorConfig

    ns = "bench-direct"
    create_namespace(api, ns)
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    config = OperatorConfig(merge_command=(args.command,))

    def create(i: int) -> None:
        body = {"metadata": {"name": f"bench-{i:04d}", "namespace": ns, "uid": f"00000000-0000-0000-0000-{i:012d}"}}
        spec = ModelMergeSpec.model_validate(_spec(i))
        cm, job = manifests.config_map(body, spec), manifests.job(body, spec, config)
        for obj in (cm, job):
            obj["metadata"].pop("ownerReferences")
        job["spec"]["suspend"] = True
        core.create_namespaced_config_map(ns, cm, _preload_content=False)
        batch.create_namespaced_job(ns, job, _preload_content=False)

    t0 = time.monotonic()
    with ThreadPoolExecutor(args.client_threads) as pool:
        list(pool.map(create, range(args.count)))
    return {"jobs_s": round(time.monotonic() - t0, 2)}


def run_once(args) -> dict:
    """One run on a fresh control plane: the operator case, then the direct peer."""
    assets = find_assets()
    plane = TunedControlPlane(assets, args.kcm_qps) if args.kcm_qps else ControlPlane(assets)
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp, plane as cp:
        api = cp.api_client()
        api.configuration.connection_pool_maxsize = args.client_threads + 8
        crd.install(api)
        row = run_operator_case(cp, api, args, Path(tmp))
        if not args.skip_peer:
            row["direct_jobs_s"] = run_direct_case(api, args)["jobs_s"]
    return row


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for name in ("jobs_s", "direct_jobs_s", "pods_s", "pods_ran_s", "running_s", "succeeded_s"):
        values = [r[name] for r in rows if r.get(name) is not None]
        if values:
            summary[name] = {**median_spread(values), "missing": len(rows) - len(values)}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5, help="runs, each on a fresh control plane")
    parser.add_argument("--workers", type=int, default=16, help="operator API threads (--workers)")
    parser.add_argument("--client-threads", type=int, default=16, help="threads creating the ModelMerges")
    parser.add_argument("--command", default="true", help="the no-op the harness runs as the merge command")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--kcm-qps", type=int, default=0,
                        help="raise kube-controller-manager's --kube-api-qps (0: the test fixture's defaults)")
    parser.add_argument("--smoke", action="store_true", help="1 run of 50 ModelMerges; written to .bench/")
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/operator.json for a run "
                                                 "with the recorded settings, .bench/results/operator-smoke.json "
                                                 "otherwise)")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.count = 1, 50
    if find_assets() is None:
        print("no envtest binaries: run `make envtest`", file=sys.stderr)
        return 2
    rows = []
    for run in range(args.runs):
        row = {"run": run, **run_once(args)}
        rows.append(row)
        print(f"run {run}: {args.count} ModelMerges: all Jobs exist after {row['jobs_s']}s (target "
              f"{TARGET_JOBS_S:g}s), all Running after {row['running_s']}s, all Succeeded after "
              f"{row['succeeded_s']}s; direct Jobs {row.get('direct_jobs_s')}s", file=sys.stderr, flush=True)
    summary = summarize(rows)
    jobs = summary.get("jobs_s", {}).get("median")
    summary["target_met"] = bool(jobs is not None and jobs <= TARGET_JOBS_S and not summary["jobs_s"]["missing"])
    if jobs and "direct_jobs_s" in summary:
        summary["operator_vs_direct_jobs"] = round(jobs / summary["direct_jobs_s"]["median"], 2)
    recorded = not args.smoke and args.runs >= 5 and args.count == 500
    result = {"benchmark": "operator", "provenance": provenance(["kopf", "kubernetes"]),
              "settings": {"command": " ".join(sys.argv), "count": args.count, "runs": args.runs,
                           "workers": args.workers, "client_threads": args.client_threads,
                           "kcm_qps": args.kcm_qps or "default", "target_jobs_s": TARGET_JOBS_S},
              "rows": rows, "summary": summary}
    out = args.out or results_path("operator", recorded=recorded)
    print(json.dumps(summary, indent=1))
    write_results(result, out)
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
