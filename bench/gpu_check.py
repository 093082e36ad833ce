"""GPU path check (run on a CUDA machine): every method with `use_gpu` against the CPU path, byte for byte.

The CPU path (the compiled kernels) is what the test suite holds bit-identical to merging-eval and to mergekit, so
a GPU output equal to it, element for element, is equal to theirs. Two parts, results written as they come:

1. `tiny`: every merging-eval method (random and magnitude masks) and every mergekit config of the `mergekit`
   benchmark suite, on tiny families: Llama-shaped bfloat16 with 3 fine-tunes and every tensor split into
   1000-element ranges, and Qwen2-shaped float32 with tied embeddings and 3 fine-tunes. Merged in this process.
2. `large`: the Qwen2.5-0.5B-shaped benchmark models (bench_engine.make_models, 2 fine-tunes), each method merged
   by a fresh `modelmerge merge` process on CPU and on GPU (inputs in the page cache, numba's cache filled by a
   first CPU run): both wall times and the comparison. Methods are started until `--budget-s` has passed.

`--device cpu` runs the same comparison with the torch kernel set on CPU as the candidate (a check of this script
where no GPU is: the tests already compare that kernel set).

    python bench/gpu_check.py --out results.json [--parts tiny,large] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "merge_image"), str(ROOT / "bench")]

import torch  # noqa: E402
from bench_engine import MERGEKIT_METHODS, METHODS, TWO_MODEL, make_models  # noqa: E402
from provenance import provenance  # noqa: E402

from modelmerge.contract import MergeRequest  # noqa: E402
from modelmerge_engine.engine import RANGE_ELEMENTS_ENV  # noqa: E402
from modelmerge_engine.kernels import KERNELS_ENV  # noqa: E402
from modelmerge_engine.run import run_merge  # noqa: E402
from tests.helpers.models import make_family, read_state_dict  # noqa: E402
from tests.helpers.oracle import compare  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "merge_image"),
                                                    os.environ.get("PYTHONPATH", "")])}
MERGING_EVAL = {**METHODS, "mask_merging+magnitude": {"mask_strategy": "magnitude", "mask_apply_method":
                                                      "ties_merging", "param_value_mask_rate": 0.5}}
TINY = {  # family -> (make_family arguments, range elements)
    "llama-bf16-3-ranges1000": ({"arch": "llama", "dtype": torch.bfloat16, "vocab": 512, "hidden": 128,
                                 "intermediate": 320, "layers": 3}, "1000"),
    "qwen2-fp32-3-tied": ({"arch": "qwen2", "dtype": torch.float32, "vocab": 512, "hidden": 128,
                           "intermediate": 320, "layers": 3, "tie": True}, ""),
}


MERGEKIT = "mergekit:"  # a mergekit suite config's name here (both have a task_arithmetic)
EVERY_METHOD = [*MERGING_EVAL, *(MERGEKIT + name for name in MERGEKIT_METHODS)]


def request_fields(method: str, base: Path, fts: list[Path]) -> dict:
    """A merge request's fields (no output_dir) for a merging-eval method or a mergekit suite config."""
    if method.startswith(MERGEKIT):
        name = method.removeprefix(MERGEKIT)
        return {"config": MERGEKIT_METHODS[name](base, fts[:TWO_MODEL.get(name, len(fts))])}
    name = method.split("+")[0]
    params = dict(MERGING_EVAL[method])
    if name == "mask_merging":
        params["weight_mask_rates"] = [0.5] * len(fts)
    return {"base_model": str(base), "models_to_merge": [str(f) for f in fts], "merge_method": name, **params}


def kernel_set(*, candidate: bool, device: str) -> str:
    """The reference is the compiled CPU kernels (HEADER["reference"] says torch on CPU where numba failed here)."""
    return "torch" if candidate and device == "cpu" else HEADER.get("reference", "compiled")


def choose_reference(fields: dict, out: Path) -> None:
    """The compiled kernels, unless this machine's numba cannot build them: then torch on CPU, which the tests hold
    bit-identical to them, as the reference."""
    try:
        merge_here(fields, out, candidate=False, device="cuda")
        HEADER["reference"] = "compiled"
    except Exception as exc:
        HEADER["reference"] = "torch"
        HEADER["compiled_failed"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"compiled kernels failed here, torch on CPU is the reference: {exc}", file=sys.stderr, flush=True)


def merge_here(fields: dict, out: Path, *, candidate: bool, device: str) -> float:
    """One merge in this process: the CPU path's compiled kernels, or the candidate (CUDA, or torch on CPU)."""
    os.environ[KERNELS_ENV] = kernel_set(candidate=candidate, device=device)
    request = MergeRequest(**fields, output_dir=str(out), use_gpu=candidate and device == "cuda")
    started = time.monotonic()
    code = run_merge(request, overwrite=True, progress="none")
    if code:
        raise RuntimeError(f"merge failed ({code}); see stderr")
    return time.monotonic() - started


def record(rows: list[dict], row: dict, out: Path | None) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)
    if out:
        out.write_text(json.dumps({"rows": rows, **HEADER}, indent=2))


def tiny(tmp: Path, device: str, methods: list[str], rows: list[dict], out: Path | None) -> None:
    for family, (spec, range_elements) in TINY.items():
        base, fts = make_family(tmp / family, n=3, **spec)
        os.environ[RANGE_ELEMENTS_ENV] = range_elements
        if "reference" not in HEADER:
            choose_reference(request_fields("task_arithmetic", base, fts), tmp / "cpu")
        for method in methods:
            fields = request_fields(method, base, fts)
            row = {"check": f"{device}-vs-cpu-tiny", "family": family, "method": method}
            try:
                merge_here(fields, tmp / "cpu", candidate=False, device=device)
                row["candidate_seconds"] = round(merge_here(fields, tmp / "candidate", candidate=True,
                                                            device=device), 3)
                row.update(compare(read_state_dict(tmp / "candidate"), read_state_dict(tmp / "cpu")))
            except Exception as exc:  # one method's failure is a result; the others still run
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            record(rows, row, out)
    os.environ.pop(RANGE_ELEMENTS_ENV, None)


def merge_process(fields: dict, out: Path, *, candidate: bool, device: str, numba_cache: Path) -> float:
    """One merge by a fresh `modelmerge merge` process, as a merge pod runs it."""
    spec = out.parent / "spec.json"
    spec.write_text(json.dumps({**fields, "output_dir": str(out)}))
    env = {**ENV, "NUMBA_CACHE_DIR": str(numba_cache),
           KERNELS_ENV: kernel_set(candidate=candidate, device=device)}
    command = [sys.executable, "-m", "modelmerge.cli", "merge", "--progress", "none", "--spec", str(spec),
               "--overwrite", *(["--use-gpu"] if candidate and device == "cuda" else [])]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stdout[-1500:] + done.stderr[-1500:])
    return time.monotonic() - started


def large(tmp: Path, device: str, methods: list[str], rows: list[dict], out: Path | None, budget_s: float,
          started: float) -> None:
    base, fts = make_models("qwen2.5-0.5b", 2)
    numba_cache = tmp / "numba-cache"
    for method in methods:
        if time.monotonic() - started > budget_s:
            record(rows, {"check": f"{device}-vs-cpu-0.5B", "method": method, "skipped": "budget spent"}, out)
            continue
        fields = request_fields(method, base, fts)
        row = {"check": f"{device}-vs-cpu-0.5B", "method": method}
        try:
            row["cpu_first_seconds"] = round(merge_process(fields, tmp / "cpu", candidate=False, device=device,
                                                           numba_cache=numba_cache), 2)  # compiles, fills the cache
            row["cpu_seconds"] = round(merge_process(fields, tmp / "cpu", candidate=False, device=device,
                                                     numba_cache=numba_cache), 2)
            row["candidate_seconds"] = round(merge_process(fields, tmp / "candidate", candidate=True, device=device,
                                                           numba_cache=numba_cache), 2)
            row.update(compare(read_state_dict(tmp / "candidate"), read_state_dict(tmp / "cpu")))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record(rows, row, out)


HEADER: dict = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--parts", default="tiny,large")
    parser.add_argument("--methods", help="comma-separated (default: every merging-eval method and mergekit config, "
                        "named mergekit:<method>)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no further large-model method after this many seconds of the whole run")
    args = parser.parse_args()
    started = time.monotonic()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    HEADER.update(provenance(["torch", "numba", "numpy", "safetensors", "transformers", "pydantic"]),
                  device=args.device, gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    HEADER["commit"] = HEADER["commit"] or os.environ.get("BENCH_COMMIT", "")  # a copy of the tree without .git
    print(json.dumps(HEADER), flush=True)
    rows: list[dict] = []
    methods = args.methods.split(",") if args.methods else EVERY_METHOD
    unknown = sorted(set(methods) - set(EVERY_METHOD))
    if unknown:
        parser.error(f"--methods: unknown {unknown}")
    with tempfile.TemporaryDirectory() as tmp:
        parts = args.parts.split(",")
        if "tiny" in parts:
            tiny(Path(tmp), args.device, methods, rows, args.out)
        if "large" in parts:
            large(Path(tmp), args.device, methods, rows, args.out, args.budget_s, started)
    failed = [r for r in rows if "error" in r or r.get("equal_fraction", 1.0) != 1.0]
    print(json.dumps({"rows": len(rows), "not_identical_or_failed": len(failed)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
