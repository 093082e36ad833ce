"""Sweep benchmark (issue 10, "Performance and scale"), two parts:

* control: a ModelMergeSweep of --trials trials (default 200) on the envtest control plane (etcd + kube-apiserver
  + kube-controller-manager, tests/kube/controlplane.py), `modelmerge operator` as a subprocess, the tests' kubelet
  harness running each merge pod as a local process with a stand-in engine (no merge: it writes the summary with an
  evaluation whose cross-entropy is a function of the trial's scaling_coefficient). A watch of the child
  ModelMerges records the most unfinished at once (never above parallelism), and a watch of the sweep when its
  status first shows each trial finished: the status lag is that time minus when the child itself was seen
  finished (median, p99, max), and the sweep's total time to Succeeded.
* local: a real 9-point grid (ties_merging_dare over scaling_coefficient, evaluation with baselines) on tiny chat
  models made on the fly, through the REST API's local backend (one worker, parallelism 1), with the work cache
  (what sweeps do) and without it (the trials' --work-cache removed by a shim), against the same 9 points run by
  hand: 9 `modelmerge merge` + 9 `modelmerge eval` of the merged models + 3 `modelmerge eval` of the base and
  fine-tunes. Wall time in total and per trial.

--runs times each (default 5; --local-runs for the local part; the control part on one control plane, a fresh
namespace per run), median and spread; raw rows, the machine's load average before and after each run, and
provenance in bench/results/sweep.json (.bench/results/sweep-smoke.json for --smoke); `make bench-report` puts
the table in the README. Run it under `nice -n 19` on a shared machine.

    .venv/bin/python bench/bench_sweep.py [--parts control local] [--runs 5] [--trials 200] [--parallelism 10]
                                          [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import median_spread, provenance, results_path, write_results  # noqa: E402

GRID = [round(0.1 * i, 1) for i in range(1, 10)]  # the local part's 9 scaling coefficients
TERMINAL = ("Succeeded", "Failed", "Cancelled")
# The control part's merge command: the operator's --spec/--output-dir/--summary-file contract, no merge, a summary
# with an evaluation (cross-entropy lowest at scaling_coefficient 1.0).
STAND_IN_ENGINE = r'''
import json, math, os, sys
def arg(flag):
    return sys.argv[sys.argv.index(flag) + 1]
spec = json.load(open(arg("--spec")))
ce = 1.0 + (spec["scaling_coefficient"] - 1.0) ** 2
os.makedirs(arg("--output-dir"), exist_ok=True)
files = [{"name": "data", "ce": ce, "ppl": math.exp(ce), "tokens": 10, "records": 1}]
summary = {"status": "succeeded", "output_dir": arg("--output-dir"), "tensors": 1, "seconds": 0.0, "evaluation": {
    "state": "Succeeded", "device": "cpu", "dtype": "float32", "files": files,
    "overall": {"ce": ce, "ppl": math.exp(ce), "tokens": 10, "records": 1, "meanCe": ce}}}
open(arg("--summary-file"), "w").write(json.dumps(summary))
print(json.dumps(summary), flush=True)
'''
# The local part's engine without the work cache: the backend's command with --work-cache DIR taken out.
WITHOUT_WORK_CACHE = r'''
import sys
from modelmerge.cli import main
argv = sys.argv[1:]
if "--work-cache" in argv:
    at = argv.index("--work-cache")
    del argv[at:at + 2]
sys.exit(main(argv))
'''


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median": round(pick(0.5), 3), "p99": round(pick(0.99), 3), "max": round(ordered[-1], 3),
            "count": len(ordered)}


# ---- control: many trials on the test control plane -----------------------------------------------------------


class SweepWatch:
    """Watches one namespace's ModelMerges and ModelMergeSweeps from now on: when each child was first seen
    finished, the most children unfinished at once, when the sweep's status first showed each trial finished and
    when the sweep reached a final phase."""

    def __init__(self, api, namespace: str):
        from kubernetes import client

        from bench.bench_operator import _RawWatch
        from modelmerge.contract import API_GROUP, API_VERSION, PLURAL
        from modelmerge.sweep import SWEEP_PLURAL

        self.custom, self.ns, self.watch_class = client.CustomObjectsApi(api), namespace, _RawWatch
        self.child_done: dict[str, float] = {}
        self.status_done: dict[str, float] = {}
        self.unfinished: set[str] = set()
        self.most_unfinished = 0
        self.final: tuple[str, float] | None = None
        self.stopping = False
        self.errors: list[str] = []  # watches that broke before stop(): the counts would be incomplete
        self.lock = threading.Lock()
        self._watches = []
        for plural, record in ((PLURAL, self._child), (SWEEP_PLURAL, self._sweep)):
            listing = self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, plural)
            threading.Thread(target=self._follow, args=(plural, listing["metadata"]["resourceVersion"], record),
                             daemon=True).start()

    def _follow(self, plural: str, version: str, record) -> None:
        from modelmerge.contract import API_GROUP, API_VERSION

        stream = self.watch_class()
        self._watches.append(stream)
        try:
            for event in stream.stream(self.custom.list_namespaced_custom_object, API_GROUP, API_VERSION, self.ns,
                                       plural, resource_version=version, timeout_seconds=3600):
                record(event["type"], event["raw_object"], time.monotonic())
        except Exception as exc:  # noqa: BLE001 - stop() closes the stream; a break before that is recorded
            if not self.stopping:
                self.errors.append(f"{plural}: {exc!r}")

    def _child(self, kind: str, obj: dict, now: float) -> None:
        name, phase = obj["metadata"]["name"], (obj.get("status") or {}).get("phase")
        with self.lock:
            if kind == "DELETED" or phase in TERMINAL:
                self.unfinished.discard(name)
                if phase in TERMINAL:
                    self.child_done.setdefault(name, now)
            else:
                self.unfinished.add(name)
            self.most_unfinished = max(self.most_unfinished, len(self.unfinished))

    def _sweep(self, kind: str, obj: dict, now: float) -> None:
        status = obj.get("status") or {}
        with self.lock:
            for trial in status.get("trials") or []:
                if trial.get("phase") in TERMINAL:
                    self.status_done.setdefault(trial["name"], now)
            if status.get("phase") in TERMINAL and self.final is None:
                self.final = (status["phase"], now)

    def stop(self) -> None:
        self.stopping = True
        for stream in self._watches:
            stream.stop()


def run_control(api, kubeconfig: Path, workdir: Path, args, run: int) -> dict:
    from kubernetes import client

    from bench.bench_operator import create_namespace
    from modelmerge.contract import API_GROUP, API_VERSION
    from modelmerge.sweep import SWEEP_PLURAL
    from tests.kube.kubelet import FakeKubelet

    ns = f"bench-sweep-{run}"
    create_namespace(api, ns)
    engine = workdir / "stand_in_engine.py"
    engine.write_text(STAND_IN_ENGINE)
    kubelet = FakeKubelet(api, namespace=ns, root=workdir / f"kubelet-{run}",
                          capacity={"pods": str(args.trials * 2), "cpu": "1000", "memory": "4Ti"})
    kubelet.start()
    log = open(workdir / f"operator-{run}.log", "wb")  # noqa: SIM115 - the child keeps it
    operator = subprocess.Popen(
        [sys.executable, "-m", "modelmerge.cli", "operator", "-n", ns, "--standalone", "--liveness", "",
         "--kubeconfig", str(kubeconfig), "--merge-command", f"python {engine}", "--progress-interval", "0"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    watch = SweepWatch(api, ns)
    time.sleep(args.settle)  # the operator lists the empty namespace before the sweep arrives
    step = 0.01
    spec = {"template": {"base_model": "org/base", "models_to_merge": ["org/a", "org/b"],
                         "merge_method": "task_arithmetic", "output": {"pvc": "bench-out"},
                         "resources": {"cpu": "10m", "memory": "16Mi"}, "evaluation": {"data": ["eval/data.json"]}},
            "space": {"scaling_coefficient": {"start": step, "stop": round(step * args.trials, 6), "step": step}},
            "parallelism": args.parallelism, "keep": "all"}
    body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMergeSweep", "metadata": {"name": "bench"},
            "spec": spec}
    started = time.monotonic()
    client.CustomObjectsApi(api).create_namespaced_custom_object(API_GROUP, API_VERSION, ns, SWEEP_PLURAL, body,
                                                                 _preload_content=False)
    deadline = started + args.timeout
    while watch.final is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the last status updates
    watch.stop()
    operator.terminate()
    operator.wait(timeout=30)
    log.close()
    kubelet.stop(delete_pods=False)
    with watch.lock:
        lags = [watch.status_done[name] - done for name, done in watch.child_done.items()
                if name in watch.status_done]
        row = {"run": run, "trials": args.trials, "parallelism": args.parallelism,
               "final_phase": watch.final[0] if watch.final else None,
               "sweep_s": round(watch.final[1] - started, 2) if watch.final else None,
               "children_finished": len(watch.child_done), "trials_finished_in_status": len(watch.status_done),
               "most_unfinished": watch.most_unfinished,
               "parallelism_kept": watch.most_unfinished <= args.parallelism,
               "status_lag_s": quantiles(lags) if lags else None, "watch_errors": watch.errors}
    return row


def control_part(args) -> list[dict]:
    from modelmerge import crd, sweep_crd
    from tests.kube.controlplane import ControlPlane, find_assets

    if find_assets() is None:
        raise SystemExit("no envtest binaries: run `make envtest`")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp, ControlPlane(find_assets()) as cp:
        api = cp.api_client()
        crd.install(api)
        crd.install(api, manifest=sweep_crd.sweep_crd())
        for run in range(args.runs):
            before = load_average()
            row = run_control(api, cp.kubeconfig_path, Path(tmp), args, run)
            row["load_average"] = {"before": before, "after": load_average()}
            rows.append(row)
            print(f"control run {run}: {row['final_phase']} after {row['sweep_s']}s, most unfinished "
                  f"{row['most_unfinished']} (parallelism {args.parallelism}), status lag {row['status_lag_s']}",
                  file=sys.stderr, flush=True)
    return rows


# ---- local: a real 9-point grid through the local backend, against separate CLI runs ---------------------------


def make_inputs(root: Path, args) -> tuple[Path, list[Path], Path]:
    from tests.helpers.eval_data import make_chat_finetune, make_chat_model, make_records, write_records

    size = {"hidden": args.hidden, "intermediate": args.hidden * 2, "layers": args.layers}
    base = make_chat_model(root / "models" / "base", **size)
    finetunes = [make_chat_finetune(base, root / "models" / f"ft{i}", seed=10 + i, scale=0.05) for i in range(2)]
    data = write_records(root / "data" / "output" / "eval" / "code.json", make_records(args.records, seed=3))
    return base, finetunes, data


def template(base: Path, finetunes: list[Path], data: list[str], args) -> dict:
    return {"base_model": str(base), "models_to_merge": [str(f) for f in finetunes],
            "merge_method": "ties_merging_dare", "param_value_mask_rate": 0.3, "dtype": "float32",
            "evaluation": {"data": data, "baselines": True, "max_length": args.max_length}}


def sweep_case(root: Path, base, finetunes, *, cached: bool, args) -> float:
    from modelmerge_api.app import create_app
    from modelmerge_api.local import LocalBackend
    from tests.helpers.rest_api import serve_in_thread
    from tests.test_sweep_api import Served

    data_dir = root / ("sweep-cached" if cached else "sweep-uncached")
    (data_dir / "output" / "eval").mkdir(parents=True)
    shutil.copy(root / "data" / "output" / "eval" / "code.json", data_dir / "output" / "eval" / "code.json")
    engine = None
    if not cached:
        shim = root / "without_work_cache.py"
        shim.write_text(WITHOUT_WORK_CACHE)
        engine = [sys.executable, str(shim)]
    backend = LocalBackend(data_dir, workers=1, engine_command=engine)
    with serve_in_thread(create_app(backend)) as url:
        served = Served(url, backend)
        started = time.monotonic()
        sweep_id = served.start({"template": template(base, finetunes, ["eval/code.json"], args), "parallelism": 1,
                                 "space": {"scaling_coefficient": {"values": GRID}}})
        final = served.wait(sweep_id, timeout=3600)
        seconds = time.monotonic() - started
    if final["status"] != "completed":
        raise RuntimeError(f"the sweep did not complete: {final}")
    reports = [json.loads((backend.output_root / sweep_id / t["name"] / "merge_report.json").read_text())
               for t in final["trials"]]
    reused = sum(bool(r.get("work_cache", {}).get("reused")) for r in reports)
    if cached != (reused == len(GRID) - 1):
        raise RuntimeError(f"{reused} trial(s) reused work (cached: {cached})")
    return seconds


def run_cli(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:5])} exited {result.returncode}: {result.stderr[-2000:]}")


def separate_case(root: Path, base, finetunes, data: Path, args) -> float:
    """The 9 points by hand: merge, evaluate the merged model; the base and fine-tunes evaluated once each."""
    out = root / "separate"
    cli = [sys.executable, "-m", "modelmerge.cli"]
    evaluate = ["--data", str(data), "--max-length", str(args.max_length), "--progress", "none"]
    started = time.monotonic()
    for model in [base, *finetunes]:
        run_cli([*cli, "eval", "--model", str(model), *evaluate])
    for coefficient in GRID:
        merged = out / f"sc{coefficient}"
        run_cli([*cli, "merge", "--base-model", str(base), "--models-to-merge", ",".join(map(str, finetunes)),
                 "--merge-method", "ties_merging_dare", "--dtype", "float32", "--scaling-coefficient", str(coefficient),
                 "--param-value-mask-rate", "0.3", "--output-dir", str(merged), "--progress", "none"])
        run_cli([*cli, "eval", "--model", str(merged), *evaluate])
    return time.monotonic() - started


def local_part(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-local-") as tmp:
        root = Path(tmp)
        base, finetunes, data = make_inputs(root, args)
        cases = {"sweep, work cache": lambda r: sweep_case(r, base, finetunes, cached=True, args=args),
                 "sweep, no work cache": lambda r: sweep_case(r, base, finetunes, cached=False, args=args),
                 "separate merge + eval": lambda r: separate_case(r, base, finetunes, data, args)}
        for run in range(args.local_runs or args.runs):
            for case, measure in cases.items():
                work = root / f"run{run}-{len(rows)}"
                work.mkdir()
                (work / "data" / "output" / "eval").mkdir(parents=True)
                shutil.copy(data, work / "data" / "output" / "eval" / "code.json")
                before = load_average()
                seconds = measure(work)
                shutil.rmtree(work)
                rows.append({"run": run, "case": case, "seconds": round(seconds, 2),
                             "per_trial_s": round(seconds / len(GRID), 2),
                             "load_average": {"before": before, "after": load_average()}})
                print(f"local run {run}: {case}: {seconds:.1f}s ({seconds / len(GRID):.2f}s per trial)",
                      file=sys.stderr, flush=True)
    return rows


def summarize(control: list[dict], local: list[dict]) -> dict:
    summary: dict = {}
    if control:
        finished = [r for r in control if r["sweep_s"] is not None]
        summary["control"] = {
            "runs": len(control), "succeeded": sum(r["final_phase"] == "Succeeded" for r in control),
            "parallelism_kept": all(r["parallelism_kept"] for r in control),
            "most_unfinished": max(r["most_unfinished"] for r in control),
            **({"sweep_s": median_spread([r["sweep_s"] for r in finished])} if finished else {}),
            **{f"status_lag_{q}_s": median_spread([r["status_lag_s"][q] for r in control if r["status_lag_s"]])
               for q in ("median", "p99", "max") if any(r["status_lag_s"] for r in control)}}
    if local:
        cases = {}
        for row in local:
            cases.setdefault(row["case"], []).append(row["seconds"])
        summary["local"] = [{"case": case, "seconds": median_spread(values),
                             "per_trial_s": median_spread([v / len(GRID) for v in values])}
                            for case, values in cases.items()]
        separate = statistics_median(cases.get("separate merge + eval"))
        for cell in summary["local"]:
            if separate:
                cell["vs_separate"] = round(separate / cell["seconds"]["median"], 2)
    return summary


def statistics_median(values: list[float] | None) -> float | None:
    return median_spread(values)["median"] if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["control", "local"], default=["control", "local"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--local-runs", type=int, default=0, help="runs of the local part (default: --runs)")
    parser.add_argument("--trials", type=int, default=200, help="control: trials of the sweep")
    parser.add_argument("--parallelism", type=int, default=10, help="control: the sweep's parallelism")
    parser.add_argument("--timeout", type=float, default=1800, help="control: seconds one sweep may take")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--hidden", type=int, default=256, help="local: the chat models' hidden size")
    parser.add_argument("--layers", type=int, default=4, help="local: the chat models' layers")
    parser.add_argument("--records", type=int, default=32, help="local: evaluation records")
    parser.add_argument("--max-length", type=int, default=128, help="local: evaluation max_length")
    parser.add_argument("--smoke", action="store_true", help="1 run, 20 trials, tiny models; to .bench/")
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/sweep.json for a run of the "
                                                 "recorded settings, .bench/results/sweep-smoke.json otherwise)")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.trials, args.parallelism, args.hidden, args.layers, args.records = 1, 20, 4, 32, 2, 6
    started = load_average()
    control = control_part(args) if "control" in args.parts else []
    local = local_part(args) if "local" in args.parts else []
    summary = summarize(control, local)
    recorded = not args.smoke and args.trials == 200 and set(args.parts) == {"control", "local"}
    result = {"benchmark": "sweep", "provenance": provenance(["kopf", "kubernetes", "torch", "transformers"]),
              "settings": {"command": " ".join(sys.argv), "runs": args.runs,
                           "local_runs": args.local_runs or args.runs, "parts": args.parts,
                           "trials": args.trials, "parallelism": args.parallelism, "grid": GRID,
                           "models": {"hidden": args.hidden, "layers": args.layers, "finetunes": 2},
                           "records": args.records, "max_length": args.max_length, "nice": os.nice(0),
                           "load_average": {"start": started, "end": load_average()}},
              "control_rows": control, "local_rows": local, "summary": summary}
    print(json.dumps(summary, indent=1))
    write_results(result, args.out or results_path("sweep", recorded=recorded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
