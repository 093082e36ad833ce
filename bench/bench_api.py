"""REST API latency and throughput with 1,000 jobs recorded, for both backends, on loopback.

For each backend: record 1,000 jobs (local: rows in the SQLite job table; kubernetes: ModelMerge objects in the
envtest control plane, a third of them with a Succeeded/Failed status), start `modelmerge serve` as a subprocess,
then drive `GET /api/jobs/{id}` (random ids) and `GET /api/jobs?limit=50` with 32 concurrent keep-alive clients and
report p50/p99 latency and throughput. Targets (issue 4): p99 < 50 ms local, < 150 ms kubernetes.

    .venv/bin/python bench/bench_api.py                      # both backends
    .venv/bin/python bench/bench_api.py --backend local --requests 2000

The kubernetes part needs the envtest binaries (`make envtest`); it is skipped with a note when they are missing.
Every loop is bounded by a request count; the servers and the control plane are stopped at the end."""

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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelmerge.contract import API_GROUP, API_VERSION, PLURAL  # noqa: E402
from tests.helpers.rest_api import PAYLOAD, free_port, wait_for  # noqa: E402

TARGET_P99_MS = {"local": 50.0, "kubernetes": 150.0}
STATUSES = ["completed"] * 7 + ["failed"] * 2 + ["cancelled"]  # finished jobs: no merge runs meanwhile


# ---- load generation ----------------------------------------------------------------------------------


def drive(port: int, paths: Callable[[random.Random], str], requests: int, clients: int) -> dict[str, float]:
    """`requests` GETs spread over `clients` threads, each with its own keep-alive connection."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = max(1, requests // clients)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in range(per_client):
            start = time.perf_counter()
            connection.request("GET", paths(rng))
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


@contextmanager
def serve(args: list[str], log: Path) -> Iterator[int]:
    port = free_port()
    command = [sys.executable, "-m", "modelmerge.cli", "serve", "--port", str(port), "--log-level", "warning",
               *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
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


def measure(backend: str, port: int, ids: list[str], requests: int, clients: int) -> list[dict]:
    drive(port, lambda rng: f"/api/jobs/{rng.choice(ids)}", 200, 8)  # warm-up
    rows = []
    for name, paths in (("GET /api/jobs/{id}", lambda rng: f"/api/jobs/{rng.choice(ids)}"),
                        ("GET /api/jobs?limit=50", lambda rng: "/api/jobs?limit=50")):
        result = drive(port, paths, requests, clients)
        rows.append({"backend": backend, "endpoint": name, **result})
    return rows


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


def bench_local(workdir: Path, jobs: int, requests: int, clients: int) -> list[dict]:
    data = workdir / "local"
    data.mkdir()
    ids = record_local_jobs(data, jobs)
    with serve(["--data-dir", str(data)], workdir / "local-server.log") as port:
        return measure("local", port, ids, requests, clients)


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


def bench_kubernetes(workdir: Path, jobs: int, requests: int, clients: int) -> list[dict]:
    from kubernetes import client

    from tests.kube.controlplane import ControlPlane, find_assets
    from tests.test_api_kube import install_crd

    assets = find_assets()
    if assets is None:
        print("kubernetes: skipped (no envtest binaries; run `make envtest`)")
        return []
    plane = ControlPlane(assets)
    plane.start()
    try:
        api = plane.api_client()
        install_crd(api)
        namespace = "bench-api"
        client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}}, _preload_content=False)
        started = time.perf_counter()
        ids = record_kube_objects(api, namespace, jobs)
        print(f"kubernetes: recorded {len(ids)} ModelMerges in {time.perf_counter() - started:.1f}s")
        args = ["--backend", "kubernetes", "--kubeconfig", str(plane.kubeconfig_path), "--namespace", namespace,
                "--output-pvc", "merge-output", "--output-root", str(workdir / "pvc")]
        with serve(args, workdir / "kube-server.log") as port:
            return measure("kubernetes", port, ids, requests, clients)
    finally:
        plane.stop()


# ---- report -------------------------------------------------------------------------------------------


def report(rows: list[dict], jobs: int, clients: int) -> None:
    print(f"\n{jobs} jobs recorded, {clients} concurrent clients, loopback")
    print(f"{'backend':<11} {'endpoint':<24} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} "
          f"{'req/s':>8} {'p99/target':>10}")
    for row in rows:
        ratio = row["p99_ms"] / TARGET_P99_MS[row["backend"]]
        print(f"{row['backend']:<11} {row['endpoint']:<24} {row['requests']:>8} {row['p50_ms']:>8.1f} "
              f"{row['p99_ms']:>8.1f} {row['mean_ms']:>8.1f} {row['throughput_rps']:>8.0f} {ratio:>10.2f}")
    print("p99/target < 1 meets the issue's target (local 50 ms, kubernetes 150 ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["local", "kubernetes", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=3200, help="requests per endpoint and backend")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        workdir = Path(tmp)
        if args.backend in ("local", "both"):
            rows += bench_local(workdir, args.jobs, args.requests, args.clients)
        if args.backend in ("kubernetes", "both"):
            rows += bench_kubernetes(workdir, args.jobs, args.requests, args.clients)
    report(rows, args.jobs, args.clients)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
