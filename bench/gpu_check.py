"""GPU path check (run on a CUDA machine): `--use-gpu` against the CPU path and against merging-eval.

1. Tiny families (bf16 and fp32 inputs): every deterministic method with --use-gpu vs merging-eval on CPU,
   with the same tolerance as the CPU oracle tests.
2. The Qwen2.5-0.5B-shaped benchmark model: each method on CPU and on GPU, the share of bit-identical
   elements between the two outputs, and both wall times.

    python bench/gpu_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "merge_image"), str(ROOT / "bench")]

import torch  # noqa: E402
from bench_engine import METHODS, make_models  # noqa: E402

from tests.helpers.models import make_family, read_state_dict  # noqa: E402
from tests.helpers.oracle import compare, oracle_merge  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "merge_image"),
                                                    os.environ.get("PYTHONPATH", "")])}
TINY_PARAMS = {**{m: p for m, p in METHODS.items() if m != "mask_merging"},
               "mask_merging": {"mask_strategy": "magnitude", "mask_apply_method": "ties_merging",
                                "param_value_mask_rate": 0.5}}


def engine(base, fts, out, method, params, gpu: bool) -> float:
    params = dict(params)
    if method == "mask_merging":
        params["weight_mask_rates"] = ",".join(["0.5"] * len(fts))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
    command = [sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "none", "--base-model", str(base),
               "--models-to-merge", ",".join(map(str, fts)), "--merge-method", method, "--output-dir", str(out),
               "--overwrite", *flags, *(["--use-gpu"] if gpu else [])]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=ENV)
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return time.monotonic() - started


def tiny_oracle(tmp: Path) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        base, fts = make_family(tmp / str(dtype), n=4, dtype=dtype, arch="llama", vocab=512, hidden=128,
                                intermediate=320, layers=2)
        for method, params in TINY_PARAMS.items():
            extra = {"weight_mask_rates": [0.5] * 4} if method == "mask_merging" else {}
            theirs = oracle_merge(base, fts, tmp / "oracle", merge_method=method, **params, **extra)
            engine(base, fts, tmp / "gpu", method, params, gpu=True)
            result = compare(read_state_dict(tmp / "gpu"), theirs)
            rows.append({"check": "gpu-vs-merging-eval", "inputs": str(dtype), "method": method, **result})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(tmp / "oracle")
    return rows


def large(tmp: Path) -> list[dict]:
    base, fts = make_models(2)
    rows = []
    for method, params in METHODS.items():
        cpu = engine(base, fts, tmp / "cpu", method, params, gpu=False)
        gpu = engine(base, fts, tmp / "gpu", method, params, gpu=True)
        result = compare(read_state_dict(tmp / "gpu"), read_state_dict(tmp / "cpu"))
        rows.append({"check": "gpu-vs-cpu-0.5B", "method": method, "cpu_seconds": round(cpu, 2),
                     "gpu_seconds": round(gpu, 2), **result})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()} "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = tiny_oracle(Path(tmp)) + large(Path(tmp))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
