"""Compile the engine's CPU kernels ahead of the first merge, so that no merge pays numba's compile.

    python -m modelmerge_engine.precompile            # fill the cache (`make install` and the image build run it)
    python -m modelmerge_engine.precompile --verify   # fresh process: exit 1 if any kernel had to compile

numba compiles a kernel the first time it meets an argument signature and keeps the machine code on disk. This
runs tiny synthetic merges through the public entrypoint (`modelmerge_engine.run.run_merge`) for every method,
every mask flag combination, every compute dtype (with checkpoints stored in it and in another dtype) and 1 to
`--max-models` fine-tunes (the kernels take the inputs as a tuple, so the count is part of the signature), so
every signature a merge of safetensors checkpoints uses is in the cache. It names no engine internals: whatever
the merges compile is what gets cached.

Each method and dtype compiles in a process of its own (`--in-process` runs them all here). numba (0.68) labels
the IR of every function it inlines (register_jitable(inline="always"), which every kernel's loop is) above a
process-wide counter that grows geometrically with the kernels a process compiles (measured: 19 digits after
task_arithmetic's bfloat16 kernels for 1-2 fine-tunes, 52 after five methods'): after some thousands of kernels a
label outgrows LLVM's 1024-character limit on block names and every later compile fails ("unable to create block
named 'B1056388...'": all methods with 8 fine-tunes in one process hit it). A merge compiles a few kernels; a
process per method and dtype keeps each far below that.

Where numba keeps the cache (first that is writable): `NUMBA_CACHE_DIR`, the package's `__pycache__`, then
`~/.cache/numba` (under HOME). The key includes the source file's hash, numba's version and the CPU (name and
features), so a cache built on another CPU model is not used unless `NUMBA_CPU_NAME`/`NUMBA_CPU_FEATURES` fix the
target on both sides.

A read-only cache (an image built with `NUMBA_CACHE_DIR=/opt/numba-cache`, then mounted read-only) is never used
by numba directly: it checks that a cache directory is writable and moves on. `SeededCacheLocator` bridges that:
with `NUMBA_CACHE_LOCATOR_CLASSES=modelmerge_engine.precompile.SeededCacheLocator` and
`MODELMERGE_NUMBA_CACHE_SEED=/opt/numba-cache`, numba picks its usual writable location and, the first time a
process looks there, the matching files are copied in from the seed (a few MB, milliseconds).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from modelmerge.contract import METHODS as CATALOGUE
from modelmerge.contract import MaskApplyMethod

SEED_ENV = "MODELMERGE_NUMBA_CACHE_SEED"
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Shapes of a miniature decoder: 2-D weights, 1-D norms, an embedding; 256+ elements per tensor, so that rates
# of 0.5 select something and rate 0 selects nothing (the keep-everything branch).
TENSORS = {"model.embed_tokens.weight": (32, 16), "model.layers.0.self_attn.q_proj.weight": (16, 16),
           "model.layers.0.mlp.up_proj.weight": (32, 16), "model.layers.0.input_layernorm.weight": (256,),
           "model.norm.weight": (256,)}


# --- the synthetic merges ----------------------------------------------------------------------------------


def _encode(values: np.ndarray, dtype: str) -> np.ndarray:
    values = values.astype(np.float32)
    if dtype == "bfloat16":  # round to nearest even, as torch does
        bits = values.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return values.astype(np.float16) if dtype == "float16" else values


def write_checkpoint(path: Path, dtype: str, seed: int, shapes: dict[str, tuple[int, ...]] = TENSORS) -> Path:
    """A random safetensors checkpoint (values ~ N(0, 0.02)) laid out as the safetensors library writes it: the
    header padded to a multiple of 8, then the tensors in order. Written tensor by tensor."""
    rng = np.random.default_rng(seed)
    width = np.dtype(np.float32 if dtype == "float32" else np.uint16).itemsize
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * width
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "model.safetensors", "wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for shape in shapes.values():
            out.write(_encode(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02), dtype).tobytes())
    (path / "config.json").write_text(json.dumps({"model_type": "synthetic", "torch_dtype": dtype}))
    return path


# Every method of the contract's catalogue (a new method is precompiled without touching this file), and the
# methods mask_merging can apply to its masked copies.
METHODS = tuple(CATALOGUE)
DIRECT = tuple(method.value for method in MaskApplyMethod)


def required_examples(method: str) -> dict:
    """A value for each parameter `method` requires (the contract field's first example)."""
    from modelmerge.contract import MergeRequest

    return {name: MergeRequest.model_fields[name].examples[0] for name in CATALOGUE[method].required}


def requests(max_models: int, methods: list[str]) -> Iterator[dict]:
    """The request fields of every merge to run: each method with 1..max_models fine-tunes; mask_merging with
    every mask flag combination (one fine-tune: the mask loop runs per model) and every apply method with
    1..max_models fine-tunes (the apply step sees the masked copies, not the mapped checkpoints)."""
    for count in range(1, max_models + 1):
        for method in methods:
            fewest, most = CATALOGUE[method].models
            if not fewest <= count <= (most or count):
                continue
            if method == "passthrough":  # copied as it is, and scaled (a kernel of its own)
                yield {"merge_method": method, "count": count, "model_parameters": [{"scale": 0.5}] * count}
            if method != "mask_merging":
                yield {"merge_method": method, "count": count, **required_examples(method)}
                if count == 1 and "rescale" in CATALOGUE[method].parameters:  # sparsified (selections, masks, norms)
                    yield {"merge_method": method, "count": 1, "model_parameters": [{"density": 0.5}], "rescale": True}
                continue
            flags = itertools.product(("random", "magnitude"), ("delta_weight", "finetuned_weight"), (True, False),
                                      (0.0, 0.5))
            for apply, (strategy, weight_format, rescale, rate) in itertools.product(DIRECT, flags):
                if count > 1 and (strategy, weight_format, rescale, rate) != ("random", "delta_weight", True, 0.5):
                    continue
                yield {"merge_method": method, "count": count, "mask_apply_method": apply,
                       "mask_strategy": strategy, "weight_format": weight_format, "use_weight_rescale": rescale,
                       "weight_mask_rates": [rate] * count}


def precompile(*, max_models: int, dtypes: list[str], methods: list[str], log) -> int:
    """Runs the synthetic merges; returns how many ran. Raises RuntimeError naming the first that failed.
    Checkpoints stored in the compute dtype run every request; checkpoints stored in each other dtype run one
    merge, for the conversion kernels (converted ranges have the same array types as mapped ones)."""
    from modelmerge.contract import MergeRequest
    from modelmerge_engine.run import run_merge

    merges = 0
    with tempfile.TemporaryDirectory(prefix="modelmerge-precompile-") as tmp:
        root = Path(tmp)
        checkpoints = {stored: [write_checkpoint(root / stored / str(i), stored, i) for i in range(max_models + 1)]
                       for stored in DTYPES}
        for dtype in dtypes:
            started = time.monotonic()
            runs = [(dtype, fields) for fields in requests(max_models, methods)]
            # any method but mask_merging (whose rates depend on the count) reads converted checkpoints
            converting = next((m for m in methods if m != "mask_merging"), "average_merging")
            conversion = {"merge_method": converting, "count": CATALOGUE[converting].models[0],
                          **required_examples(converting)}
            runs += [(stored, dict(conversion)) for stored in DTYPES if stored != dtype]
            for stored, fields in runs:
                base, *finetunes = checkpoints[stored]
                count = fields.pop("count")
                request = MergeRequest.model_validate({
                    **fields, "base_model": str(base), "models_to_merge": [str(p) for p in finetunes[:count]],
                    "dtype": dtype, "output_dir": str(root / "out")})
                with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the summary lines
                    code = run_merge(request, overwrite=True, progress="none")
                if code != 0:
                    raise RuntimeError(f"merge failed (exit {code}): {request.model_dump_json(exclude_defaults=True)}")
                merges += 1
            log(f"precompile: {dtype}, {len(runs)} merges, 1-{max_models} fine-tunes, {', '.join(methods)} "
                f"({time.monotonic() - started:.1f}s)")
    return merges


# --- what compiled in this process -------------------------------------------------------------------------


def engine_dispatchers() -> list:
    """Every live numba dispatcher whose Python function is the engine's, wherever the engine keeps it (module
    globals, registries, kernels specialised on first use)."""
    import gc

    from numba.core.dispatcher import Dispatcher

    return [obj for obj in gc.get_objects() if isinstance(obj, Dispatcher)
            and (obj.py_func.__module__ or "").partition(".")[0] == "modelmerge_engine"]


def cached_kernels() -> list:
    """The engine's dispatchers with an on-disk cache (cache=True): the kernels a merge calls. Helpers compiled
    only inside them (inlined, overload implementations) have none and are left out."""
    return [d for d in engine_dispatchers() if d.stats.cache_path is not None]


def compiled_here() -> tuple[list[str], int]:
    """(kernels compiled in this process rather than loaded from the cache, number of cache hits)."""
    compiled, hits = [], 0
    for dispatcher in cached_kernels():
        loaded = dispatcher.stats.cache_hits
        hits += sum(loaded.values())
        for signature in dispatcher.overloads:
            if not loaded.get(signature):
                compiled.append(f"{dispatcher.py_func.__qualname__}{signature}")
    return compiled, hits


# --- a read-only cache built at image build time -----------------------------------------------------------


class SeededCacheLocator:
    """numba's own choice of cache directory, filled from `MODELMERGE_NUMBA_CACHE_SEED` before first use.

    Listed in NUMBA_CACHE_LOCATOR_CLASSES, numba asks it for every cached function; it asks numba's default
    locators in their usual order and, once per process and directory, copies the seed's files for that source
    directory into the chosen one (never overwriting: what is already there is at least as fresh)."""

    _seeded: set[str] = set()

    @classmethod
    def from_function(cls, py_func, py_file):
        from numba.core import caching

        impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # public since numba 0.62
        for locator_class in impl._locator_classes:  # numba's default order
            locator = locator_class.from_function(py_func, py_file)
            if locator is not None:
                seed = os.environ.get(SEED_ENV)
                if seed:
                    seed_cache(Path(seed) / locator.get_suitable_cache_subpath(py_file),
                               Path(locator.get_cache_path()))
                return locator
        return None


def seed_cache(source: Path, target: Path) -> int:
    """Copies the files of `source` missing from `target` (each written to a temporary name, then renamed, so a
    concurrent process never reads half a file; data files before the indexes that name them); once per process
    and target. Returns how many it copied."""
    key = f"{source}->{target}"
    if key in SeededCacheLocator._seeded:
        return 0
    SeededCacheLocator._seeded.add(key)
    copied = 0
    try:
        names = sorted(p.name for p in source.iterdir() if p.is_file())
    except OSError:
        return 0  # no seed for this source directory
    for name in sorted(names, key=lambda n: n.endswith(".nbi")):  # data files before the indexes naming them
        destination = target / name
        if destination.exists():
            continue
        partial = target / f".{name}.{os.getpid()}.partial"
        try:
            shutil.copyfile(source / name, partial)
            os.replace(partial, destination)
        except OSError:  # a full disk: the seed only saves compiling, so numba compiles what is missing
            partial.unlink(missing_ok=True)
            break
        copied += 1
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelmerge_engine.precompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-models", type=int, default=8,
                        help="compile for 1..N fine-tunes (a merge of more compiles once, then it is cached)")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help="compute dtypes to compile for (comma-separated; default: all)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="methods to compile for (comma-separated; default: all)")
    parser.add_argument("--verify", action="store_true",
                        help="run the same merges and exit 1, naming them, if any kernel was not in the cache")
    parser.add_argument("--in-process", action="store_true",
                        help="compile every given method and dtype in this process (default: a child process "
                             "for each method and dtype)")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown or not dtypes:
        parser.error(f"--dtypes: unknown dtype(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(DTYPES)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(METHODS)}")
    if args.max_models < 1:
        parser.error(f"--max-models must be at least 1, got {args.max_models}")
    if not args.in_process and len(methods) * len(dtypes) > 1:
        return _per_method(args, dtypes=dtypes, methods=methods)
    log = (lambda text: print(text, file=sys.stderr))  # noqa: E731
    started = time.monotonic()
    try:
        merges = precompile(max_models=args.max_models, dtypes=dtypes, methods=methods, log=log)
    except RuntimeError as exc:
        print(f"precompile: {exc}", file=sys.stderr)
        return 1
    compiled, hits = compiled_here()
    print(json.dumps({"merges": merges, "compiled": len(compiled), "cache_hits": hits,
                      "seconds": round(time.monotonic() - started, 1)}))
    if args.verify and compiled:
        print("precompile --verify: compiled instead of loaded from the cache:\n  " + "\n  ".join(compiled),
              file=sys.stderr)
        return 1
    return 0


def _per_method(args, *, dtypes: list[str], methods: list[str]) -> int:
    """Runs this module once per method and dtype in a child process (their logs pass through) and sums their
    reports; exits as the first failing child did, else 1 if any compiled under --verify."""
    import subprocess

    started = time.monotonic()
    total = {"merges": 0, "compiled": 0, "cache_hits": 0}
    for method, dtype in itertools.product(methods, dtypes):
        command = [sys.executable, "-m", "modelmerge_engine.precompile", "--in-process", "--methods", method,
                   "--dtypes", dtype, "--max-models", str(args.max_models),
                   *(["--verify"] if args.verify else [])]
        child = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        lines = child.stdout.strip().splitlines()
        report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
        if report is None or child.returncode not in (0, 1) or (child.returncode == 1 and not args.verify):
            print(f"precompile: {method} in {dtype}: the child process failed (exit {child.returncode})",
                  file=sys.stderr)
            return child.returncode or 1
        for key in total:
            total[key] += report[key]
    print(json.dumps({**total, "seconds": round(time.monotonic() - started, 1)}))
    return 1 if args.verify and total["compiled"] else 0


if __name__ == "__main__":
    sys.exit(main())
