"""REST API latency and throughput with 1,000 jobs recorded, for both backends, on loopback, idle and with merges
running; raw rows and provenance in bench/results/api.json (bench/report.py makes the README table).

For each backend: record 1,000 jobs (local: rows in the SQLite job table; kubernetes: ModelMerge objects in the
envtest control plane, a third of them with a Succeeded/Failed status), start `modelmerge serve` as a subprocess,
then drive `GET /api/jobs/{id}` (random ids) and `GET /api/jobs?limit=50` with 32 concurrent keep-alive clients
from a separate load-generator process (so its own CPU use is not the server's), --runs times per endpoint and
load, and report the median and spread of the runs' p50/p99 latency and throughput. Loads:

  idle     nothing else runs.
  merging  merges run meanwhile: on the local backend submitted through the API itself (the server spawns the
           merges and records their progress in its job table), on the kubernetes backend as merge processes on the
           same machine (the API's work there is the API server's, the merges only compete for the CPU).

Targets (issue 4): p99 < 50 ms local, < 150 ms kubernetes.

    .venv/bin/python bench/bench_api.py                      # both backends (make bench-api)
    .venv/bin/python bench/bench_api.py --smoke              # a quick check, written to .bench/results/

The kubernetes part needs the envtest binaries (`make envtest`); it is skipped with a note when they are missing.
Every loop is bounded by a request count; the servers, merges and the control plane are stopped at the end."""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.provenance import median_spread, provenance, results_path, write_results  # noqa: E402
from modelmerge.contract import API_GROUP, API_VERSION, PLURAL  # noqa: E402
from tests.helpers.rest_api import PAYLOAD, free_port, wait_for  # noqa: E402

TARGET_P99_MS = {"local": 50.0, "kubernetes": 150.0}
STATUSES = ["completed"] * 7 + ["failed"] * 2 + ["cancelled"]  # finished jobs: no merge runs meanwhile


# ---- load generation (in its own process) --------------------------------------------------------------


ENDPOINTS = {"GET /api/jobs/{id}": "job", "GET /api/jobs?limit=50": "list"}


def drive(port: int, kind: str, ids: list[str], requests: int, clients: int) -> dict[str, float]:
    """`requests` GETs spread over `clients` threads, each with its own keep-alive connection."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = max(1, requests // clients)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in range(per_client):
            path = f"/api/jobs/{rng.choice(ids)}" if kind == "job" else "/api/jobs?limit=50"
            start = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            mine.append(time.perf_counter() - start)
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        connection.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "mean_ms": 1000 * statistics.fmean(latencies), "throughput_rps": len(latencies) / elapsed}


def drive_in_process(port: int, kind: str, ids_file: Path, requests: int, clients: int) -> dict[str, float]:
    """The load generator as a separate process (this file with --drive), so its CPU is not the server's."""
    spec = {"port": port, "kind": kind, "ids_file": str(ids_file), "requests": requests, "clients": clients}
    result = subprocess.run([sys.executable, __file__, "--drive", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout)


@contextmanager
def serve(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    port = free_port()
    command = [sys.executable, "-m", "modelmerge.cli", "serve", "--port", str(port), "--log-level", "warning",
               *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: _healthy(port, proc, log), 60, "the API server")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _healthy(port: int, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError("modelmerge serve exited:\n" + log.read_text()[-2000:])
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", "/api/health")
        return connection.getresponse().status == 200
    except OSError:
        return False


def measure(backend: str, load: str, port: int, ids: list[str], args, workdir: Path) -> list[dict]:
    ids_file = workdir / f"ids-{backend}.json"
    ids_file.write_text(json.dumps(ids))
    drive_in_process(port, "job", ids_file, 200, 8)  # warm-up
    rows = []
    for run in range(args.runs):
        for endpoint in random.Random(run).sample(list(ENDPOINTS), len(ENDPOINTS)):
            result = drive_in_process(port, ENDPOINTS[endpoint], ids_file, args.requests, args.clients)
            rows.append({"backend": backend, "load": load, "endpoint": endpoint, "run": run, **result})
            print(f"{backend:10} {load:8} {endpoint:24} run {run}: p50 {result['p50_ms']:.1f} ms, "
                  f"p99 {result['p99_ms']:.1f} ms", file=sys.stderr, flush=True)
    return rows


# ---- merges running meanwhile -----------------------------------------------------------------------------


def _submit(port: int, payload: dict) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/api/merge", body=json.dumps(payload), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    body = json.loads(response.read())
    if response.status != 202:
        raise RuntimeError(f"POST /api/merge: HTTP {response.status}: {body}")
    return body["job_id"]


def _running(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/api/jobs?status=running&limit=1")
    return json.loads(connection.getresponse().read())["total"]


@contextmanager
def merges_through_the_api(port: int, count: int) -> Iterator[None]:
    """Queues `count` merges of the tiny models in the server's HF cache and waits until one runs."""
    for _ in range(count):
        _submit(port, PAYLOAD)
    wait_for(lambda: _running(port) > 0, 120, "a merge to run")
    yield


@contextmanager
def merge_processes(models: tuple[Path, list[Path]], workdir: Path) -> Iterator[None]:
    """Merge processes one after another on this machine until the block ends."""
    stop = threading.Event()
    base, finetunes = models

    def loop() -> None:
        index = 0
        while not stop.is_set():
            index += 1
            subprocess.run([sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "none", "--base-model",
                            str(base), "--models-to-merge", ",".join(map(str, finetunes)), "--merge-method",
                            "ties_merging", "--output-dir", str(workdir / "merged"), "--overwrite"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---- the local backend --------------------------------------------------------------------------------


def record_local_jobs(data_dir: Path, count: int) -> list[str]:
    from modelmerge.contract import MergeRequest
    from modelmerge_api.jobs import Job, request_params, utcnow
    from modelmerge_api.store import JobStore

    store = JobStore(data_dir / "jobs.db")
    params = request_params(MergeRequest.model_validate(PAYLOAD), "x")
    rng = random.Random(0)
    ids = []
    for _ in range(count):
        job_id = str(uuid.uuid4())
        status = rng.choice(STATUSES)
        job = Job(job_id=job_id, status="pending", created_at=utcnow(),
                  output_path=str(data_dir / "output" / job_id), params={**params, "output_dir": job_id},
                  output_rel=job_id)
        store.insert(job, has_token=False)
        store.finish(job_id, status, "bench" if status == "failed" else None, was=("pending",))
        ids.append(job_id)
    store.close()
    return ids


def bench_local(workdir: Path, args) -> list[dict]:
    from tests.helpers.rest_api import make_hub, server_env

    data = workdir / "local"
    data.mkdir()
    ids = record_local_jobs(data, args.jobs)
    hf_home, _, _ = make_hub(workdir / "hub")
    rows = []
    with serve(["--data-dir", str(data), "--workers", "1"], workdir / "local-server.log", server_env(hf_home)) \
            as port:
        for load in args.loads:
            if load == "idle":
                rows += measure("local", load, port, ids, args, workdir)
            else:
                with merges_through_the_api(port, args.merges):
                    rows += measure("local", load, port, ids, args, workdir)
                    if _running(port) == 0:
                        print("local: the queued merges ran out before the measurement ended (raise --merges)",
                              file=sys.stderr)
    return rows


# ---- the kubernetes backend ---------------------------------------------------------------------------


def record_kube_objects(api, namespace: str, count: int) -> list[str]:
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    rng = random.Random(0)

    def create(index: int) -> str:
        name = str(uuid.uuid4())
        body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ModelMerge", "metadata": {"name": name},
                "spec": {**PAYLOAD, "output": {"pvc": "merge-output"}, "output_dir": name}}
        custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, body,
                                               _preload_content=False)
        if index % 3 == 0:
            phase = rng.choice(["Succeeded", "Failed"])
            status = {"phase": phase, "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:00Z",
                      "outputPath": f"pvc://merge-output/{name}", "message": "bench" if phase == "Failed" else None}
            custom.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, namespace, PLURAL, name,
                                                         {"status": status}, _preload_content=False)
        return name

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(create, range(count)))


def bench_kubernetes(workdir: Path, args) -> list[dict]:
    from kubernetes import client

    from modelmerge import crd
    from tests.helpers.models import make_family
    from tests.kube.controlplane import ControlPlane, find_assets

    assets = find_assets()
    if assets is None:
        print("kubernetes: skipped (no envtest binaries; run `make envtest`)", file=sys.stderr)
        return []
    plane = ControlPlane(assets)
    plane.start()
    try:
        api = plane.api_client()
        crd.install(api)
        namespace = "bench-api"
        client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}}, _preload_content=False)
        started = time.perf_counter()
        ids = record_kube_objects(api, namespace, args.jobs)
        print(f"kubernetes: recorded {len(ids)} ModelMerges in {time.perf_counter() - started:.1f}s",
              file=sys.stderr)
        serve_args = ["--backend", "kubernetes", "--kubeconfig", str(plane.kubeconfig_path), "--namespace",
                      namespace, "--output-pvc", "merge-output", "--output-root", str(workdir / "pvc")]
        rows = []
        with serve(serve_args, workdir / "kube-server.log") as port:
            for load in args.loads:
                if load == "idle":
                    rows += measure("kubernetes", load, port, ids, args, workdir)
                else:
                    with merge_processes(make_family(workdir / "kube-models", n=2), workdir):
                        rows += measure("kubernetes", load, port, ids, args, workdir)
        return rows
    finally:
        plane.stop()


# ---- summary ------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["backend"], row["load"], row["endpoint"]), []).append(row)
    cells = []
    for (backend, load, endpoint), group in groups.items():
        cell = {"backend": backend, "load": load, "endpoint": endpoint, "runs": len(group),
                "target_p99_ms": TARGET_P99_MS[backend]}
        for name in ("p50_ms", "p99_ms", "throughput_rps"):
            cell[name] = median_spread([r[name] for r in group])
        cell["p99_target_met"] = cell["p99_ms"]["median"] < TARGET_P99_MS[backend]
        cells.append(cell)
    return cells


def report(cells: list[dict], args) -> None:
    print(f"\n{args.jobs} jobs recorded, {args.clients} concurrent clients in a separate process, loopback, "
          f"{args.runs} runs; median (min-max)")
    print(f"{'backend':<11} {'load':<8} {'endpoint':<24} {'p50 ms':>18} {'p99 ms':>18} {'req/s':>16} "
          f"{'p99/target':>10}")
    def spread(cell: dict, name: str, digits: int = 1) -> str:
        m = cell[name]
        return f"{m['median']:.{digits}f} ({m['min']:.{digits}f}-{m['max']:.{digits}f})"

    for c in cells:
        print(f"{c['backend']:<11} {c['load']:<8} {c['endpoint']:<24} {spread(c, 'p50_ms'):>18} "
              f"{spread(c, 'p99_ms'):>18} {spread(c, 'throughput_rps', 0):>16} "
              f"{c['p99_ms']['median'] / c['target_p99_ms']:>10.2f}")
    print("p99/target < 1 meets the issue's target (local 50 ms, kubernetes 150 ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["local", "kubernetes", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=3200, help="requests per endpoint, load and run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--loads", default="idle,merging")
    parser.add_argument("--merges", type=int, default=400,
                        help="merges queued through the API for the local backend's merging load")
    parser.add_argument("--smoke", action="store_true", help="1 run, 400 requests, 200 jobs; written to .bench/")
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/api.json for a run with "
                                                 "the recorded settings, .bench/results/api-smoke.json otherwise)")
    parser.add_argument("--drive", help=argparse.SUPPRESS)  # the load-generator process
    args = parser.parse_args()
    if args.drive:
        spec = json.loads(args.drive)
        ids = json.loads(Path(spec["ids_file"]).read_text())
        print(json.dumps(drive(spec["port"], spec["kind"], ids, spec["requests"], spec["clients"])))
        return 0
    if args.smoke:
        args.runs, args.requests, args.jobs, args.merges = 1, 400, 200, 40
    args.loads = [load for load in args.loads.split(",") if load]
    if not args.loads or set(args.loads) - {"idle", "merging"}:
        parser.error(f"--loads: choose from idle, merging (got {','.join(args.loads) or 'nothing'})")
    recorded = not args.smoke and args.runs >= 5 and args.backend == "both" and args.requests >= 3200
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        workdir = Path(tmp)
        if args.backend in ("local", "both"):
            rows += bench_local(workdir, args)
        if args.backend in ("kubernetes", "both"):
            rows += bench_kubernetes(workdir, args)
    cells = summarize(rows)
    report(cells, args)
    result = {"benchmark": "api", "provenance": provenance(["fastapi", "uvicorn", "kubernetes"]),
              "settings": {"command": " ".join(sys.argv), "jobs": args.jobs, "requests": args.requests,
                           "clients": args.clients, "runs": args.runs, "loads": args.loads, "merges": args.merges,
                           "targets_p99_ms": TARGET_P99_MS},
              "rows": rows, "summary": cells}
    out = args.out or results_path("api", recorded=recorded)
    write_results(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
