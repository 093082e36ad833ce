"""The REST API with the local backend, through a real uvicorn server and `requests`.

End-to-end tests run the real engine on tiny models resolved from a pre-filled HF cache under the predecessor's
repo ids; tests about the job machinery (cancel, secrets, download guards) use a small fake engine so they are
fast and deterministic."""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import re
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
import requests

from modelmerge.contract import MergeRequest, methods_catalogue, parse_progress
from modelmerge_api.app import EXAMPLE_REQUEST, AppSettings, create_app
from modelmerge_api.local import LocalBackend
from tests.helpers.job_progress import STALE_REPORT, THREE_STEPS, watch_progress
from tests.helpers.rest_api import (
    PAYLOAD,
    ServerProcess,
    check_merged_model,
    extract_archive,
    job,
    make_hub,
    serve_in_thread,
    server_env,
    submit,
    wait_for,
    wait_status,
)

SECRET = "hf_SECRETtokenValue0123456789"

# Stands in for `modelmerge merge`: same flags, same summary contract. base_model picks the behaviour.
FAKE_ENGINE = r'''
import argparse, json, os, sys, time
''' + THREE_STEPS + r'''
parser = argparse.ArgumentParser()
parser.add_argument("command")
parser.add_argument("--spec"); parser.add_argument("--output-dir"); parser.add_argument("--summary-file")
parser.add_argument("--progress")
args = parser.parse_args()
spec = json.load(open(args.spec))
print("argv:", " ".join(sys.argv), flush=True)
print("HF_TOKEN=" + os.environ.get("HF_TOKEN", "<unset>"), flush=True)
def progress(step, index, steps, overall, of_step):  # the engine's progress line, as documented
    print(f"[{step} {index}/{steps}] {overall:5.1f}% overall, {of_step:.1f}% of step {of_step:.0f}/100 tensors",
          file=sys.stderr, flush=True)
def summary(status, error=None):
    line = json.dumps({"status": status, "output_dir": args.output_dir, "error": error})
    open(args.summary_file, "w").write(line); print(line, flush=True)
if spec["base_model"] == "slow/model":
    progress("merge", 1, 1, 50.0, 50.0)
    time.sleep(120)
if spec["base_model"] == "steps/model":
    report_three_steps(0.4)
if spec["base_model"] == "fail/model":
    summary("failed", "base_model: cannot load fail/model"); sys.exit(1)
os.makedirs(os.path.join(args.output_dir, "sub"))
open(os.path.join(args.output_dir, "config.json"), "w").write('{"fake": true}')
open(os.path.join(args.output_dir, "sub", "ok.txt"), "w").write("ok")
os.symlink("/etc/hostname", os.path.join(args.output_dir, "evil"))
open(os.path.join(args.output_dir, "argv.txt"), "w").write(" ".join(sys.argv))
summary("succeeded")
'''


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return make_hub(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def hf_env(hub):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(hub[0]))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield hub


@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory) -> list[str]:
    path = tmp_path_factory.mktemp("engine") / "fake_engine.py"
    path.write_text(FAKE_ENGINE)
    return [sys.executable, str(path)]


class Served:
    def __init__(self, url: str, backend: LocalBackend) -> None:
        self.url, self.backend = url, backend

    def jobs(self, **params) -> dict:
        response = requests.get(self.url + "/api/jobs", params=params, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def make_server(tmp_path):
    """Starts a local-backend server; each call gets its own data dir unless one is given."""
    with_stack = []

    def start(engine: list[str] | None = None, workers: int = 1, data_dir: Path | None = None,
              settings: AppSettings | None = None) -> Served:
        backend = LocalBackend(data_dir or tmp_path / f"data{len(with_stack)}", workers=workers,
                               engine_command=engine)
        context = serve_in_thread(create_app(backend, settings))
        with_stack.append(context)
        return Served(context.__enter__(), backend)

    yield start
    for context in reversed(with_stack):
        context.__exit__(None, None, None)


@pytest.fixture
def fake_server(make_server, fake_engine) -> Served:
    return make_server(engine=fake_engine)


# ---- the predecessor's endpoints ---------------------------------------------------------------------


def test_health_methods_example(fake_server):
    health = requests.get(fake_server.url + "/api/health", timeout=10).json()
    assert health["status"] == "healthy" and health["backend"] == "local"
    assert health["merging_available"] is True and health["version"]
    assert health["timestamp"].endswith("Z")
    methods = requests.get(fake_server.url + "/api/methods", timeout=10).json()["methods"]
    assert methods == methods_catalogue()
    merging_eval = {"average_merging", "task_arithmetic", "ties_merging", "ties_merging_dare", "mask_merging"}
    mergekit = {"linear", "mergekit_task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher",
                "nearswap", "model_stock", "sce", "passthrough"}
    assert {m["name"] for m in methods} == merging_eval | mergekit
    assert {m["name"] for m in methods if m["origin"] == "mergekit"} == mergekit
    for method in methods:
        for info in method["parameters"].values():
            assert {"type", "default", "description"} <= set(info)
    example = requests.get(fake_server.url + "/api/example", timeout=10).json()
    assert example == EXAMPLE_REQUEST
    MergeRequest.model_validate(example)


def test_openapi_docs(fake_server):
    docs = requests.get(fake_server.url + "/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = requests.get(fake_server.url + "/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    assert set(MergeRequest.model_fields) <= set(schemas["MergeRequest"]["properties"])
    assert schemas["MergeRequest"]["properties"]["hf_token"]["writeOnly"] is True
    refs = {ref.rsplit("/", 1)[-1] for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(spec))}
    assert refs <= set(schemas)
    assert {"/api/health", "/api/merge", "/api/jobs/{job_id}/logs", "/api/download/{job_id}/archive"} \
        <= set(spec["paths"])


def test_merge_end_to_end_with_the_real_engine(make_server, hf_env, tmp_path):
    hf_home, base, finetunes = hf_env
    server = make_server()
    job_id = submit(server.url, {**PAYLOAD, "output_dir": "./merged_output"})
    with requests.get(f"{server.url}/api/jobs/{job_id}/logs", params={"follow": "true"}, stream=True,
                      timeout=300) as streamed:
        log_text = b"".join(streamed.iter_content(None)).decode()
    final = job(server.url, job_id)
    assert final["status"] == "completed", final
    assert "%" in log_text and '"status": "succeeded"' in log_text
    assert final["output_path"] == str(server.backend.output_root / "merged_output")
    assert final["started_at"] and final["completed_at"] and final["error_message"] is None
    assert final["params"]["models_to_merge"] == PAYLOAD["models_to_merge"]
    assert final["params"]["scaling_coefficient"] == 0.3 and final["params"]["output_dir"] == "merged_output"

    info = requests.get(f"{server.url}/api/download/{job_id}", timeout=30).json()
    assert info["job_id"] == job_id and info["output_path"] == final["output_path"]
    listed = {f["path"]: f for f in info["files"]}
    assert "config.json" in listed and any(name.endswith(".safetensors") for name in listed)
    config = requests.get(f"{server.url}/api/download/{job_id}/files/config.json", timeout=30)
    assert config.status_code == 200
    assert hashlib.sha256(config.content).hexdigest() == listed["config.json"]["sha256"]
    assert len(config.content) == listed["config.json"]["size"]

    archive = requests.get(f"{server.url}/api/download/{job_id}/archive", timeout=60)
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/x-tar"
    folder = extract_archive(archive.content, tmp_path / "extracted")
    assert folder.name == "merged_output"
    check_merged_model(folder, base, finetunes, scaling=0.3)

    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert 'modelmerge_jobs{status="completed"} 1.0' in metrics
    assert "modelmerge_merge_duration_seconds_count 1.0" in metrics
    assert 'modelmerge_api_requests_total{method="POST",route="/api/merge",status="202"} 1.0' in metrics


def test_progress_of_a_real_ties_merging_dare_merge(make_server, hf_env):
    """The real engine reports three steps (thresholds, signs, merge) with one overall percent; what the job
    view shows while the merge runs is what the engine reported, and never goes down."""
    server = make_server()
    job_id = submit(server.url, {**PAYLOAD, "merge_method": "ties_merging_dare"})
    samples = watch_progress(server.url, job_id)
    logs = requests.get(f"{server.url}/api/jobs/{job_id}/logs", timeout=10).text
    assert job(server.url, job_id)["status"] == "completed", logs
    reported = [(p.percent, f"{p.step} {p.stepIndex}/{p.steps}")
                for p in map(parse_progress, logs.splitlines()) if p is not None]
    steps = [step for step, _ in itertools.groupby(step for _, step in reported)]
    assert steps == ["thresholds 1/3", "signs 2/3", "merge 3/3"], logs
    assert [percent for percent, _ in reported] == sorted(percent for percent, _ in reported)
    assert reported[-1][0] == 100.0
    assert set(samples) <= set(reported), (samples, reported)  # the small merge may end between two samples
    assert [percent for percent, _ in samples] == sorted(percent for percent, _ in samples)


def test_engine_failure_is_reported(make_server, hf_env):
    server = make_server()
    job_id = submit(server.url, {**PAYLOAD, "base_model": "Qwen/not-in-the-cache"})
    final = wait_status(server.url, job_id)
    assert final["status"] == "failed"
    assert "base_model" in final["error_message"] and "not-in-the-cache" in final["error_message"]
    assert not (server.backend.output_root / job_id).exists()
    download = requests.get(f"{server.url}/api/download/{job_id}", timeout=10)
    assert download.status_code == 400 and "not completed" in download.json()["error"]


def test_restart_mid_merge(hf_env, tmp_path):
    """kill -9 the server while a merge runs: the merge dies with it; on restart that job is failed
    ('interrupted'), the queued job still runs, and the completed job stays listed."""
    env = server_env(hf_env[0])
    args = ["--data-dir", str(tmp_path / "data")]
    first = ServerProcess(args, env, tmp_path / "server1.log")
    try:
        done = submit(first.url, PAYLOAD)
        assert wait_status(first.url, done)["status"] == "completed"
        interrupted = submit(first.url, {**PAYLOAD, "output_dir": "second"})
        queued = submit(first.url, {**PAYLOAD, "output_dir": "third"})
        wait_status(first.url, interrupted, ("running",))
        db = sqlite3.connect(tmp_path / "data" / "jobs.db")
        pid = wait_for(lambda: db.execute("SELECT pid FROM jobs WHERE id = ?", (interrupted,)).fetchone()[0],
                       30, "the merge's pid")
        db.close()
    finally:
        first.kill(signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or b"zombie" in _proc_state(pid), 30,
             "the orphaned merge to die with its server")
    second = ServerProcess(args, env, tmp_path / "server2.log")
    try:
        failed = job(second.url, interrupted)
        assert failed["status"] == "failed" and failed["error_message"].startswith("interrupted")
        assert not (tmp_path / "data" / "output" / "second").exists()
        assert wait_status(second.url, queued)["status"] == "completed"
        assert job(second.url, done)["status"] == "completed"
        listed = requests.get(second.url + "/api/jobs", timeout=10).json()["jobs"]
        assert [j["job_id"] for j in listed] == [queued, interrupted, done]
    finally:
        second.kill(signal.SIGTERM)


def _proc_state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return b"zombie"


# ---- cancel, logs, listing ---------------------------------------------------------------------------


def test_cancel_running_and_pending(fake_server):
    running = submit(fake_server.url, {**PAYLOAD, "base_model": "slow/model"})
    wait_status(fake_server.url, running, ("running",))
    wait_for(lambda: job(fake_server.url, running)["progress"] == 50.0, 20, "the merge's progress line")
    assert job(fake_server.url, running)["progress_step"] == "merge 1/1"
    proc = fake_server.backend._procs[running]
    pending = submit(fake_server.url, PAYLOAD)
    assert job(fake_server.url, pending)["status"] == "pending"

    for job_id in (pending, running):
        response = requests.delete(f"{fake_server.url}/api/jobs/{job_id}", timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
    wait_for(lambda: proc.poll() is not None, 20, "the cancelled merge to stop")
    assert job(fake_server.url, running)["status"] == "cancelled"
    assert job(fake_server.url, pending)["status"] == "cancelled"
    again = requests.delete(f"{fake_server.url}/api/jobs/{running}", timeout=10)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]
    assert not (fake_server.backend.output_root / pending).exists()
    logs = requests.get(f"{fake_server.url}/api/jobs/{running}/logs", timeout=10)
    assert logs.status_code == 200 and "[merge 1/1]  50.0% overall, 50.0% of step" in logs.text


def test_progress_is_reported_while_running_and_never_goes_down(fake_server):
    job_id = submit(fake_server.url, {**PAYLOAD, "base_model": "steps/model"})
    samples = watch_progress(fake_server.url, job_id)
    assert job(fake_server.url, job_id)["status"] == "completed"
    percents = [percent for percent, _ in samples]
    assert percents == sorted(percents), samples
    assert {step for _, step in samples} == {"thresholds 1/3", "signs 2/3", "merge 3/3"}, samples
    assert percents[-1] >= 60.0 and len(set(percents)) >= 4, samples
    done = job(fake_server.url, job_id)  # completed: 100% at its last step, as the Kubernetes backend shows it
    assert (done["progress"], done["progress_step"]) == (100.0, "merge 3/3"), done
    logs = requests.get(f"{fake_server.url}/api/jobs/{job_id}/logs", timeout=10).text
    assert STALE_REPORT in logs  # the stale report was there, and was not shown


def test_comma_separated_regexes_keep_their_commas(fake_server):
    """The predecessor's comma-separated string splits only at commas outside {}, [] and (): the job's params
    and the request the engine is given hold the regexes whole."""
    regexes = [r"model\.layers\.[0-9]{1,3}\.mlp\..*", r"(q,k|v)_proj", r".*embed_tokens.*"]
    job_id = submit(fake_server.url, {**PAYLOAD, "exclude_param_names_regex": ",".join(regexes)})
    assert wait_status(fake_server.url, job_id)["params"]["exclude_param_names_regex"] == regexes
    spec = json.loads((fake_server.backend.data_dir / "work" / job_id / "spec.json").read_text())
    assert spec["exclude_param_names_regex"] == regexes


def test_list_filter_and_pagination(fake_server):
    ids = [submit(fake_server.url, PAYLOAD) for _ in range(3)]
    failing = submit(fake_server.url, {**PAYLOAD, "base_model": "fail/model"})
    final = wait_status(fake_server.url, failing)
    assert final["status"] == "failed" and final["error_message"] == "base_model: cannot load fail/model"
    for job_id in ids:
        assert wait_status(fake_server.url, job_id)["status"] == "completed"
    everything = fake_server.jobs()
    assert [j["job_id"] for j in everything["jobs"]] == [failing, *reversed(ids)]
    assert everything["total"] == 4 and everything["next_offset"] is None
    page = fake_server.jobs(limit=2, offset=1)
    assert [j["job_id"] for j in page["jobs"]] == [ids[2], ids[1]] and page["next_offset"] == 3
    assert [j["job_id"] for j in fake_server.jobs(status="failed")["jobs"]] == [failing]
    assert fake_server.jobs(status="running")["jobs"] == []


def test_output_dir_conflicts(fake_server):
    slow = submit(fake_server.url, {**PAYLOAD, "base_model": "slow/model", "output_dir": "shared"})
    busy = requests.post(fake_server.url + "/api/merge", json={**PAYLOAD, "output_dir": "shared"}, timeout=10)
    assert busy.status_code == 409 and "output_dir" in busy.json()["error"]
    requests.delete(f"{fake_server.url}/api/jobs/{slow}", timeout=10)
    done = submit(fake_server.url, {**PAYLOAD, "output_dir": "made/here"})
    assert wait_status(fake_server.url, done)["status"] == "completed"
    exists = requests.post(fake_server.url + "/api/merge", json={**PAYLOAD, "output_dir": "made/here"},
                           timeout=10)
    assert exists.status_code == 409 and "already exists" in exists.json()["error"]


# ---- secrets -----------------------------------------------------------------------------------------


def test_hf_token_reaches_only_the_merge_environment(fake_server, caplog):
    response = requests.post(fake_server.url + "/api/merge", json={**PAYLOAD, "hf_token": SECRET}, timeout=10)
    assert response.status_code == 202 and SECRET not in response.text
    job_id = response.json()["job_id"]
    header_job = submit(fake_server.url, PAYLOAD, headers={"X-HF-Token": SECRET})
    for each in (job_id, header_job):
        assert wait_status(fake_server.url, each)["status"] == "completed"
        logs = requests.get(f"{fake_server.url}/api/jobs/{each}/logs", timeout=10).text
        assert "HF_TOKEN=***" in logs  # the merge got it in its env; the log has it redacted
        assert SECRET not in (fake_server.backend.output_root / each / "argv.txt").read_text()
    seen = [requests.get(fake_server.url + path, timeout=10).text
            for path in ("/api/jobs", f"/api/jobs/{job_id}", f"/api/download/{job_id}", "/metrics")]
    stored = [p.read_bytes() for p in fake_server.backend.data_dir.rglob("*") if p.is_file()]
    assert not any(SECRET in text for text in seen)
    assert not any(SECRET.encode() in data for data in stored)
    assert SECRET not in caplog.text
    plain = submit(fake_server.url, PAYLOAD)
    wait_status(fake_server.url, plain)
    assert "HF_TOKEN=<unset>" in requests.get(f"{fake_server.url}/api/jobs/{plain}/logs", timeout=10).text


# ---- downloads: no path escapes ----------------------------------------------------------------------


def test_download_paths_cannot_escape(fake_server):
    job_id = submit(fake_server.url, PAYLOAD)
    assert wait_status(fake_server.url, job_id)["status"] == "completed"
    base = f"{fake_server.url}/api/download/{job_id}"
    listed = {f["path"] for f in requests.get(base, timeout=10).json()["files"]}
    assert listed == {"argv.txt", "config.json", "sub/ok.txt"}  # the link to /etc/hostname is not listed
    assert requests.get(base + "/files/sub/ok.txt", timeout=10).text == "ok"
    for path in ("..%2F..%2Fjobs.db", "sub/..%2F..%2F..%2Fjobs.db", "%2Fetc%2Fhostname", "%2E%2E",
                 "sub%5C..%5Cx"):
        response = requests.get(f"{base}/files/{path}", timeout=10)
        assert response.status_code == 400, (path, response.text)
        assert "invalid file path" in response.json()["error"]
    raw = http.client.HTTPConnection(fake_server.url.removeprefix("http://"), timeout=10)
    raw.request("GET", f"/api/download/{job_id}/files/sub/../../../jobs.db")  # dot segments sent as they are
    assert raw.getresponse().status == 400
    raw.close()
    escaping = requests.get(base + "/files/evil", timeout=10)
    assert escaping.status_code == 403 and "escapes" in escaping.json()["error"]
    assert requests.get(base + "/files/nope.txt", timeout=10).status_code == 404
    names = extract_names(requests.get(base + "/archive", timeout=10).content)
    assert names == {f"{job_id}/argv.txt", f"{job_id}/config.json", f"{job_id}/sub/ok.txt"}


def extract_names(content: bytes) -> set[str]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(content), mode="r:") as tar:
        return {member.name for member in tar.getmembers() if member.isfile()}


def test_output_dir_through_an_escaping_symlink_is_rejected(fake_server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, fake_server.backend.output_root / "link")
    response = requests.post(fake_server.url + "/api/merge", json={**PAYLOAD, "output_dir": "link/x"}, timeout=10)
    assert response.status_code == 403 and "escapes" in response.json()["error"]
    assert fake_server.jobs()["total"] == 0 and not list(outside.iterdir())


# ---- auth, CORS, the CLI -----------------------------------------------------------------------------


def test_bearer_token_and_cors(make_server, fake_engine):
    server = make_server(engine=fake_engine, settings=AppSettings(api_token="s3cret",
                                                                  cors_origins=["https://ui.example"]))
    assert requests.get(server.url + "/api/health", timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        denied = requests.get(server.url + "/api/jobs", headers=headers, timeout=10)
        assert denied.status_code == 401 and "bearer token" in denied.json()["error"]
    assert requests.post(server.url + "/api/merge", json=PAYLOAD, timeout=10).status_code == 401
    allowed = requests.get(server.url + "/api/jobs", headers={"Authorization": "Bearer s3cret",
                                                              "Origin": "https://ui.example"}, timeout=10)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
    preflight = requests.options(server.url + "/api/merge", timeout=10, headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
    other = requests.get(server.url + "/api/health", headers={"Origin": "https://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers


def test_serve_flags_and_data_dir_default(monkeypatch, tmp_path):
    from modelmerge.cli import build_parser
    from modelmerge_api.server import build_backend, default_data_dir

    monkeypatch.delenv("MODELMERGE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "modelmerge"
    monkeypatch.setenv("MODELMERGE_DATA_DIR", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"
    args = build_parser().parse_args(["serve", "--workers", "2"])
    assert (args.host, args.port, args.backend) == ("127.0.0.1", 5000, "local")
    backend = build_backend(args)
    assert backend.data_dir == tmp_path / "mine" and backend.workers == 2
    assert backend.output_root == tmp_path / "mine" / "output"


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path):
    first = LocalBackend(tmp_path / "data")
    first.start()
    try:
        with pytest.raises(RuntimeError, match="already uses the data dir"):
            LocalBackend(tmp_path / "data").start()
    finally:
        first.stop()


def test_graceful_stop_marks_running_job_interrupted(fake_engine, tmp_path):
    backend = LocalBackend(tmp_path / "data", engine_command=fake_engine)
    with serve_in_thread(create_app(backend)) as url:
        job_id = submit(url, {**PAYLOAD, "base_model": "slow/model"})
        wait_for(lambda: job_id in backend._procs, 20, "the merge process")
    with serve_in_thread(create_app(LocalBackend(tmp_path / "data", engine_command=fake_engine))) as url:
        final = job(url, job_id)
    assert final["status"] == "failed" and final["error_message"].startswith("interrupted")


def test_job_json_has_the_predecessor_fields():
    from modelmerge_api.jobs import Job

    fields = set(Job(job_id="x", status="pending", created_at="t").to_json())  # output_rel stays internal
    assert fields == {"job_id", "status", "created_at", "started_at", "completed_at", "error_message",
                      "output_path", "params", "progress", "progress_step", "evaluation", "sweep_id"}
