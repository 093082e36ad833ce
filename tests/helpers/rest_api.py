"""What the REST API tests share: a tiny pre-filled HF cache under the predecessor's repo
ids, a uvicorn server on a free port (in a thread, or `modelmerge serve` as a subprocess), polling."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tests.helpers.waiting import wait_for
from tests.kube.controlplane import free_port

BASE_REPO = "Qwen/Qwen2.5-0.5B"
FINETUNE_REPOS = ("InfiX-ai/Qwen-base-0.5B-code", "InfiX-ai/Qwen-base-0.5B-algebra")
# The predecessor README's request, minus `use_gpu: true` (these machines have no GPU).
PAYLOAD: dict[str, Any] = {
    "base_model": BASE_REPO,
    "models_to_merge": list(FINETUNE_REPOS),
    "merge_method": "task_arithmetic",
    "scaling_coefficient": 0.3,
    "use_gpu": False,
    "param_value_mask_rate": 0.8,
    "exclude_param_names_regex": [],
}
FINAL = ("completed", "failed", "cancelled")


def make_hub(root: Path, hf_home: Path | None = None) -> tuple[Path, Path, list[Path]]:
    """Tiny Qwen2-shaped base + 2 fine-tunes, laid out as an HF cache under the predecessor's repo ids.

    Returns (hf_home, base_dir, finetune_dirs)."""
    from tests.helpers.models import fill_hf_cache, make_family

    base, finetunes = make_family(root / "models", n=2)
    hf_home = hf_home or root / "hf"
    fill_hf_cache(hf_home, BASE_REPO, base)
    for repo, folder in zip(FINETUNE_REPOS, finetunes, strict=True):
        fill_hf_cache(hf_home, repo, folder)
    return hf_home, base, finetunes


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the API server to start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


class ServerProcess:
    """`modelmerge serve` as a subprocess (so a test can kill it outright and start another)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "modelmerge.cli", "serve", "--port", str(self.port), *args]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._up, 60, f"modelmerge serve on {self.url} (log: {log_path})")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"modelmerge serve exited: {self.log_path.read_text()[-3000:]}")
        try:
            return requests.get(self.url + "/api/health", timeout=1).ok
        except requests.ConnectionError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


def server_env(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", **extra}
    env.pop("MODELMERGE_API_TOKEN", None)
    return env


def job(base: str, job_id: str, **kwargs: Any) -> dict[str, Any]:
    response = requests.get(f"{base}/api/jobs/{job_id}", timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def wait_status(
    base: str, job_id: str, statuses: tuple[str, ...] = FINAL, timeout: float = 180, **kwargs: Any
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        current = job(base, job_id, **kwargs)
        return current if current["status"] in statuses else None

    return wait_for(reached, timeout, f"job {job_id} to reach {statuses}", interval=0.1)


def submit(base: str, payload: dict[str, Any], **kwargs: Any) -> str:
    response = requests.post(f"{base}/api/merge", json=payload, timeout=30, **kwargs)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "pending" and body["check_status"] == f"/api/jobs/{body['job_id']}"
    return body["job_id"]


def extract_archive(content: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:") as tar:
        tar.extractall(dest, filter="data")
    (top,) = [p for p in dest.iterdir() if p.is_dir()]
    return top


def check_merged_model(folder: Path, base: Path, finetunes: list[Path], scaling: float) -> None:
    """The merged model loads with transformers, gives finite logits, and is base + scaling × Σ task vectors."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers.models import read_state_dict

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()
    merged, base_sd = read_state_dict(folder), read_state_dict(base)
    tunes = [read_state_dict(f) for f in finetunes]
    name = "model.layers.0.mlp.up_proj.weight"
    expected = base_sd[name].float() + scaling * sum(t[name].float() - base_sd[name].float() for t in tunes)
    torch.testing.assert_close(merged[name].float(), expected.to(merged[name].dtype).float(), rtol=0.02, atol=1e-3)
