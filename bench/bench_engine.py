"""Engine benchmark: this engine, merging-eval and mergekit in the same run, on the same inputs, under the same
conditions, repeated and shuffled; raw rows and provenance in bench/results/engine.json (bench/report.py turns it
into the README's tables).

Inputs: a Qwen2.5-0.5B-shaped random model (hidden 896, 24 layers, vocab 151936, bf16, 0.99 GB) and 8 fine-tunes
under .bench/models/ (made once, reused). Every (tool, method, fine-tune count, state) is run --runs times, all
trials in one shuffled order (seed recorded), so drift and noise from other load spread over every tool alike.

States (page cache in the same state for every tool):
  warm          the inputs read once just before the run (in the page cache); ours with its kernels precompiled.
  cold          page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches: inputs, Python and libraries all come
                from disk); ours as a fresh merge pod runs it: an empty writable numba cache seeded from the
                precompiled one (SeededCacheLocator), i.e. what the merge image ships.
  cold-compile  ours only: page cache dropped and an empty numba cache (what a pod paid before precompilation).

Per run: wall time; peak RssAnon and peak total RSS (VmRSS) of the tool's processes, sampled every 20 ms; and the
peak its memory cgroup was charged (max_usage_in_bytes: anonymous memory + page cache, what a pod's memory limit
counts). Each run has its own cgroup v1 memory cgroup, capped at --safety-limit so that a peer can never push the
machine into a global OOM. The memory-limit table runs each tool under --limits (default 256 MiB, 1 GiB, 4 GiB):
succeeded or killed, and wall time. Before and after the trials bench/disk.py probes the disk the inputs live on
(`disk` in the results): a cold run can be no faster than reading its inputs and writing its output at those rates.

    .venv/bin/python bench/bench_engine.py                       # the recorded run (make bench-engine)
    .venv/bin/python bench/bench_engine.py --smoke               # a quick check: small shape, 1 run, .bench/

Needs root (drop_caches, memory cgroups). mergekit is `--mergekit`, else the virtualenv the mergekit oracle tests
use (tests/helpers/mergekit.py: ~/.cache/modelmerge-mergekit/, made on first use), else `mergekit-yaml` on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
CHECKPOINTS = Path(os.environ.get("MODELMERGE_BENCH_CHECKPOINTS", Path.home() / ".cache" / "modelmerge-bench"))
sys.path.insert(0, str(ROOT))

from bench.disk import describe, probe  # noqa: E402
from bench.provenance import median_spread, memory_total_bytes, package_version, provenance, results_path, write_results  # noqa: E402
from tests.helpers.memory_cgroup import MemoryCgroup, unavailable_reason  # noqa: E402
from tests.helpers.mergekit import mergekit_venv  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2},
    "small": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2},
}
METHODS = {
    "average_merging": {},
    "task_arithmetic": {"scaling_coefficient": 0.3},
    "ties_merging": {"scaling_coefficient": 1.0, "param_value_mask_rate": 0.8},
    "ties_merging_dare": {"scaling_coefficient": 1.0, "param_value_mask_rate": 0.8},
    "mask_merging": {"mask_strategy": "random", "mask_apply_method": "average_merging"},
}
# mergekit's equivalents (the same family of arithmetic; timing peers, not oracles)
MERGEKIT = {"average_merging": "linear", "task_arithmetic": "task_arithmetic", "ties_merging": "ties",
            "ties_merging_dare": "ties", "mask_merging": "dare_linear"}
TOOLS = ("ours", "merging-eval", "mergekit")
STATES = ("warm", "cold", "cold-compile")


def _each(fts: list[Path], **parameters) -> list[dict]:
    return [{"model": str(ft), "parameters": dict(parameters)} for ft in fts]


# mergekit's methods as its users write them, for the `mergekit` suite: both tools are given the same YAML. Each
# builds the config from the base and the fine-tunes it reads; TWO_MODEL methods read a fixed number of fine-tunes.
def _gta(method: str, **parameters):
    return lambda base, fts: {"merge_method": method, "base_model": str(base), "models": _each(fts, **parameters)}


MERGEKIT_METHODS = {
    "linear": lambda base, fts: {"merge_method": "linear", "models": _each(fts, weight=1.0),
                                 "parameters": {"normalize": True}},
    "slerp": lambda base, fts: {"merge_method": "slerp", "base_model": str(base),
                                "models": [{"model": str(base)}, {"model": str(fts[0])}], "parameters": {"t": 0.5}},
    "nuslerp": lambda base, fts: {"merge_method": "nuslerp", "base_model": str(base),
                                  "models": _each(fts[:2], weight=0.5)},
    "multislerp": lambda base, fts: {"merge_method": "multislerp", "base_model": str(base),
                                     "models": _each(fts, weight=1.0)},
    "karcher": lambda base, fts: {"merge_method": "karcher", "models": [{"model": str(ft)} for ft in fts]},
    "task_arithmetic": _gta("task_arithmetic", weight=0.3),
    "ties": _gta("ties", weight=1.0, density=0.2),
    "dare_ties": _gta("dare_ties", weight=1.0, density=0.2),
    "dare_linear": _gta("dare_linear", weight=1.0, density=0.5),
    "breadcrumbs": _gta("breadcrumbs", weight=1.0, density=0.8, gamma=0.01),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", weight=1.0, density=0.8, gamma=0.01),
    "della": _gta("della", weight=1.0, density=0.5, epsilon=0.1),
    "della_linear": _gta("della_linear", weight=1.0, density=0.5, epsilon=0.1),
    "model_stock": lambda base, fts: {"merge_method": "model_stock", "base_model": str(base),
                                      "models": [{"model": str(ft)} for ft in fts]},
    "sce": lambda base, fts: {**_gta("sce", weight=1.0)(base, fts), "parameters": {"select_topk": 0.5}},
    "nearswap": lambda base, fts: {"merge_method": "nearswap", "base_model": str(base),
                                   "models": [{"model": str(base)}, {"model": str(fts[0])}],
                                   "parameters": {"t": 0.001}},
    "passthrough": lambda base, fts: _frankenmerge(base, fts[0]),
}


def _frankenmerge(first: Path, second: Path) -> dict:
    """Depth up-scaling: the first two thirds of `first`'s layers, then the last two thirds of `second`'s."""
    layers = json.loads((first / "config.json").read_text())["num_hidden_layers"]
    return {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(first), "layer_range": [0, 2 * layers // 3]}]},
        {"sources": [{"model": str(second), "layer_range": [layers // 3, layers]}]}]}
TWO_MODEL = {"slerp": 1, "nuslerp": 2, "nearswap": 1, "passthrough": 1}  # the fine-tunes these read


@dataclass(frozen=True)
class Suite:
    """One comparison: its methods, tools and states, its results file and its speed-up targets (cold)."""
    results: str
    methods: tuple[str, ...]
    tools: tuple[str, ...]
    states: tuple[str, ...]
    limits: str
    limit_methods: tuple[str, ...]

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(t for t in self.tools if t != "ours")


SUITES = {
    # merging-eval's five methods against merging-eval and mergekit's nearest equivalents (issue 12)
    "merging-eval": Suite("engine", tuple(METHODS), TOOLS, STATES, "256MiB,1GiB,4GiB",
                          ("task_arithmetic", "ties_merging_dare")),
    # mergekit's methods, both tools given the same mergekit YAML (issue 11)
    "mergekit": Suite("methods", tuple(MERGEKIT_METHODS), ("ours", "mergekit"), ("warm", "cold"), "256MiB,700MiB",
                      tuple(MERGEKIT_METHODS)),
}
MIB = 1 << 20


# --- inputs ----------------------------------------------------------------------------------------------


def make_models(shape: str, finetunes: int) -> tuple[Path, list[Path]]:
    """The base and `finetunes` fine-tunes (base + N(0, 0.002) noise) of the given shape, made once."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.helpers.models import save_tokenizer

    folder = BENCH / "models" / shape
    base = folder / "base"
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=32768, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, architectures=["Qwen2ForCausalLM"])
    config.torch_dtype = "bfloat16"
    if not (base / "model.safetensors").exists():
        print(f"making base model in {base} ...", file=sys.stderr, flush=True)
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()
                      if n != "lm_head.weight"}
        generator = torch.Generator().manual_seed(0)
        tensors = {n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
        _save(base, tensors, config, save_file)
        save_tokenizer(base, 1024)
    paths = []
    for i in range(finetunes):
        path = folder / f"ft{i}"
        paths.append(path)
        if (path / "model.safetensors").exists():
            continue
        print(f"making fine-tune {path} ...", file=sys.stderr, flush=True)
        generator = torch.Generator().manual_seed(100 + i)
        tensors = {n: (t.float() + torch.randn(t.shape, generator=generator) * 0.002).to(torch.bfloat16)
                   for n, t in load_file(base / "model.safetensors").items()}
        _save(path, tensors, config, save_file)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(base / name, path / name)
    return base, paths


def _save(path: Path, tensors, config, save_file) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)


# --- the tools' command lines ----------------------------------------------------------------------------


def ours(method: str, base: Path, fts: list[Path], out: Path) -> list[str]:
    params = dict(METHODS[method])
    if method == "mask_merging":
        params["weight_mask_rates"] = ",".join(["0.5"] * len(fts))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
    return [str(ROOT / ".venv/bin/modelmerge"), "merge", "--progress", "none", "--base-model", str(base),
            "--models-to-merge", ",".join(map(str, fts)), "--merge-method", method, "--output-dir", str(out),
            "--overwrite", *flags]


def merging_eval(method: str, base: Path, fts: list[Path], out: Path) -> list[str]:
    params = dict(METHODS[method])
    if method == "mask_merging":
        params["weight_mask_rates"] = [0.5] * len(fts)
    spec = {"method": method, "base": str(base), "models": list(map(str, fts)), "out": str(out), "params": params}
    return [sys.executable, str(ROOT / "bench" / "merging_eval_runner.py"), json.dumps(spec)]


def merge_with_config(config: dict, out: Path, *, tool: str, kit: list[str] | None) -> list[str]:
    """The command that merges mergekit YAML `config` (written beside `out`) with this engine or with mergekit."""
    config_path = out.parent / f"config-{tool}.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    if tool == "ours":
        return [str(ROOT / ".venv/bin/modelmerge"), "merge", "--progress", "none", "--config", str(config_path),
                "--output-dir", str(out), "--overwrite"]
    return [*kit, str(config_path), str(out), "--copy-tokenizer", "--allow-crimes"]


def mergekit_equivalent(method: str, base: Path, fts: list[Path]) -> dict:
    """mergekit's config nearest to merging-eval's `method` (the same family of arithmetic)."""
    kind = MERGEKIT[method]
    params = METHODS[method]
    models = []
    for ft in fts:
        p: dict = {"weight": 1.0 if kind == "linear" else params.get("scaling_coefficient", 1.0)}
        if kind == "ties":
            p["density"] = round(1 - params["param_value_mask_rate"], 4)
        if kind == "dare_linear":
            p["density"] = 0.5
        models.append({"model": str(ft), "parameters": p})
    config = {"merge_method": kind, "models": models, "dtype": "bfloat16"}
    if kind != "linear":
        config["base_model"] = str(base)
    if kind == "ties":
        config["parameters"] = {"normalize": True}
    return config


def find_mergekit(explicit: str | None) -> list[str] | None:
    """The command that runs mergekit-yaml: `--mergekit`, else mergekit-yaml's module in the virtualenv the oracle
    tests use (made on first use; run with `python -m`, since its console scripts name the folder it was built
    in), else one on PATH."""
    if explicit:
        return [explicit] if Path(explicit).exists() else None
    try:
        return [str(mergekit_venv() / "bin" / "python"), "-m", "mergekit.scripts.run_yaml"]
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        found = shutil.which("mergekit-yaml")
        return [found] if found else None


# --- page cache, numba cache ------------------------------------------------------------------------------


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm_page_cache(paths: list[Path]) -> None:
    """Reads every input file once, so the tool finds it in the page cache."""
    for folder in paths:
        for file in sorted(folder.iterdir()):
            if file.is_file():
                with open(file, "rb") as handle:
                    while handle.read(16 << 20):
                        pass


def precompiled_cache(max_models: int, *, methods: list[str] | None) -> Path:
    """numba's cache with every bfloat16 kernel signature of `methods` (None: every method) compiled, as `make
    install` does (the benchmark merges in bfloat16)."""
    cache = BENCH / "numba-cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    print("precompiling the engine's kernels into .bench/numba-cache ...", file=sys.stderr, flush=True)
    only = ["--methods", ",".join(methods)] if methods else []
    subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "modelmerge_engine.precompile", "--max-models",
                    str(max_models), "--dtypes", "bfloat16", *only], check=True, env=env, stdout=subprocess.DEVNULL)
    return cache


def ours_env(state: str, precompiled: Path, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    if state == "warm":
        return {**env, "NUMBA_CACHE_DIR": str(precompiled)}
    fresh = Path(tempfile.mkdtemp(prefix="numba-", dir=scratch))  # an empty cache, as a fresh pod's emptyDir
    env["NUMBA_CACHE_DIR"] = str(fresh)
    if state == "cold":
        env.update(NUMBA_CACHE_LOCATOR_CLASSES="modelmerge_engine.precompile.SeededCacheLocator",
                   MODELMERGE_NUMBA_CACHE_SEED=str(precompiled))
    return env


# --- one measured run -------------------------------------------------------------------------------------


def _proc_kib(pid: int) -> tuple[int, int]:
    anon = rss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    except OSError:
        pass
    return anon, rss


def measure(command: list[str], env: dict[str, str], *, limit_bytes: int, timeout: float) -> dict:
    """Runs `command` in its own memory cgroup limited to `limit_bytes`; wall time, peaks, outcome."""
    with MemoryCgroup("bench", limit_bytes=limit_bytes) as cgroup:
        started = time.monotonic()
        process = cgroup.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        peak_anon = peak_rss = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_anon, peak_rss
            while not done.is_set():
                try:
                    pids = cgroup.pids()
                except OSError:
                    pids = []
                sizes = [_proc_kib(pid) for pid in pids]
                peak_anon = max(peak_anon, sum(a for a, _ in sizes))
                peak_rss = max(peak_rss, sum(r for _, r in sizes))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, err = process.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            timed_out = True
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
        stats = cgroup.stats()
    killed = stats["oom_kills"] > 0 or process.returncode == -9
    outcome = "timeout" if timed_out else "killed" if killed else "ok" if process.returncode == 0 else "failed"
    row = {"outcome": outcome, "returncode": process.returncode, "seconds": round(seconds, 3),
           "rss_anon_peak_bytes": peak_anon * 1024, "rss_peak_bytes": peak_rss * 1024,
           "cgroup_peak_bytes": stats["peak_bytes"], "oom_kills": stats["oom_kills"], "limit_bytes": limit_bytes}
    if outcome != "ok":
        row["error"] = (err or out or "")[-1500:]
    return row


# --- the run ----------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def finetune_counts(method: str, counts: list[int]) -> list[int]:
    """The fine-tune counts `method` runs with: its fixed one for a two-model method, else `counts`."""
    return [TWO_MODEL[method]] if method in TWO_MODEL else counts


def plan(args) -> list[dict]:
    trials = []
    for tool in args.tools:
        for method in args.methods:
            for count in finetune_counts(method, args.finetunes):
                for state in args.states:
                    if state == "cold-compile" and tool != "ours":
                        continue
                    trials += [{"tool": tool, "method": method, "finetunes": count, "state": state, "run": run}
                               for run in range(args.runs)]
    random.Random(args.seed).shuffle(trials)
    limit_trials = [{"tool": tool, "method": method, "finetunes": count, "state": "warm", "run": 0,
                     "limit": limit}
                    for tool in args.tools for method in args.limit_methods
                    for count in finetune_counts(method, args.limit_finetunes) for limit in args.limits]
    random.Random(args.seed + 1).shuffle(limit_trials)
    return trials + limit_trials


def command_for(trial: dict, suite: str, base: Path, fts: list[Path], out: Path,
                kit: list[str] | None) -> list[str]:
    inputs, method, tool = fts[: trial["finetunes"]], trial["method"], trial["tool"]
    if suite == "mergekit":
        config = {"dtype": "bfloat16", **MERGEKIT_METHODS[method](base, inputs)}  # as mergekit's examples
        return merge_with_config(config, out, tool=tool, kit=kit)
    if tool == "ours":
        return ours(method, base, inputs, out)
    if tool == "merging-eval":
        return merging_eval(method, base, inputs, out)
    return merge_with_config(mergekit_equivalent(method, base, inputs), out, tool=tool, kit=kit)


def resumed(checkpoint: Path, fresh: dict, trials: list[dict]) -> dict:
    """The rows of an interrupted run of the same plan (settings, seed and commit), to go on after them."""
    earlier = json.loads(checkpoint.read_text())
    for field in ("commit", "uncommitted_changes"):
        if earlier["provenance"][field] != fresh["provenance"][field]:
            raise SystemExit(f"--resume {checkpoint}: recorded at {field} {earlier['provenance'][field]!r}, this "
                             f"checkout has {fresh['provenance'][field]!r}; resume from the same commit")
    ignored = {"command"}
    changed = [k for k in fresh["settings"] if k not in ignored and earlier["settings"].get(k) != fresh["settings"][k]]
    if changed:
        raise SystemExit(f"--resume {checkpoint}: settings differ ({', '.join(changed)}); pass the same flags and "
                         f"--seed {earlier['settings']['seed']}")
    for row, trial in zip(earlier["rows"], trials[: len(earlier["rows"])], strict=True):
        if any(row.get(k) != v for k, v in trial.items() if k != "limit") or row.get("limit_bytes") != trial.get(
                "limit", row.get("limit_bytes")):
            raise SystemExit(f"--resume {checkpoint}: its rows do not follow this plan's order")
    earlier["settings"]["command"] = fresh["settings"]["command"]
    earlier.setdefault("sessions", []).append(fresh["provenance"]["date"])
    return earlier


def engine_methods(args) -> list[str]:
    """The engine's methods (registry names) the run merges with, whose kernels are compiled before it: the
    merging-eval suite's, or the mergekit methods asked for (with those of the memory-limit runs, if any)."""
    if args.suite == "merging-eval":
        return list(METHODS)
    from modelmerge.mergekit_config import MERGEKIT_METHOD_NAMES

    limited = args.limit_methods if args.limits else []
    return sorted({MERGEKIT_METHOD_NAMES.get(method, method) for method in [*args.methods, *limited]})


def run(args, checkpoint: Path) -> dict:
    kit = find_mergekit(args.mergekit) if "mergekit" in args.tools else None
    if "mergekit" in args.tools and kit is None:
        raise SystemExit("mergekit-yaml not found: its virtualenv could not be made (see above); pass --mergekit, "
                         "or leave it out with --tools ours,merging-eval")
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"the benchmark runs every tool in a memory cgroup: {reason} (run it as root)")
    if {"cold", "cold-compile"} & set(args.states) and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        raise SystemExit("cold runs drop the page cache: /proc/sys/vm/drop_caches is not writable (run as root, "
                         "or --states warm)")
    most = max(args.finetunes + (args.limit_finetunes if args.limits else []))
    base, fts = make_models(args.shape, most)
    precompiled = precompiled_cache(most, methods=engine_methods(args)) if "ours" in args.tools else Path()
    trials = plan(args)
    packages = ["numba", "llvmlite", "numpy", "torch", "transformers", "safetensors", "merging-eval"]
    mergekit_version = package_version("mergekit", kit[0] if len(kit) > 1 else str(Path(kit[0]).parent / "python")) \
        if kit else None
    result = {"benchmark": SUITES[args.suite].results, "provenance": provenance(packages, mergekit=mergekit_version),
              "settings": {
        "command": " ".join(sys.argv), "suite": args.suite, "shape": args.shape, "runs": args.runs, "seed": args.seed,
        "methods": args.methods, "finetunes": args.finetunes, "states": args.states, "tools": args.tools,
        "limits": args.limits, "limit_methods": args.limit_methods, "limit_finetunes": args.limit_finetunes,
        "safety_limit_bytes": args.safety_limit,
        "input_bytes": {str(n): sum((p / "model.safetensors").stat().st_size for p in [base, *fts[:n]])
                        for n in sorted(set(args.finetunes + args.limit_finetunes))}}, "rows": []}
    if args.resume:
        result = resumed(args.resume, result, trials)
    print(f"{len(trials)} runs in shuffled order (seed {args.seed}), {len(result['rows'])} done before",
          file=sys.stderr, flush=True)
    BENCH.mkdir(exist_ok=True)
    # The disk before and after the trials: what a cold run reads its inputs and writes its output at.
    probed = [file for model in [base, *fts[: min(args.finetunes)]] for file in sorted(model.glob("*.safetensors"))]
    output_bytes = sum(file.stat().st_size for file in base.glob("*.safetensors"))
    disk = result.setdefault("disk", {})
    if "start" not in disk:  # a resumed run keeps the probe of its first session
        disk["start"] = probe(probed, BENCH, write_bytes=output_bytes)
        print(f"disk at the start: {describe(disk['start'])}", file=sys.stderr, flush=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BENCH, prefix="run-") as tmp:
        scratch = Path(tmp)
        out = scratch / "out"
        for index, trial in enumerate(trials, 1):
            if index <= len(result["rows"]):
                continue
            shutil.rmtree(out, ignore_errors=True)
            env = ours_env(trial["state"], precompiled, scratch) if trial["tool"] == "ours" else \
                {**os.environ, "HF_HUB_OFFLINE": "1"}
            env["HF_HUB_OFFLINE"] = "1"
            command = command_for(trial, args.suite, base, fts, out, kit)
            if trial["state"] == "warm":
                warm_page_cache([base, *fts[: trial["finetunes"]]])
            else:
                drop_page_cache()
            row = {**trial, **measure(command, env, limit_bytes=trial.get("limit") or args.safety_limit,
                                      timeout=args.run_timeout)}
            row.pop("limit", None)
            row["kind"] = "limit" if "limit" in trial else "timing"
            result["rows"].append(row)
            checkpoint.write_text(json.dumps(result) + "\n")
            print(f"[{index}/{len(trials)}] {row['kind']:6} {row['tool']:12} {row['method']:18} "
                  f"{row['finetunes']} fts {row['state']:12} {row['outcome']:7} {row['seconds']:8.2f}s "
                  f"anon {row['rss_anon_peak_bytes'] / MIB:7.0f} MiB rss {row['rss_peak_bytes'] / MIB:7.0f} MiB "
                  f"cgroup {row['cgroup_peak_bytes'] / MIB:7.0f} MiB", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    disk["end"] = probe(probed, BENCH, write_bytes=output_bytes)
    print(f"disk at the end: {describe(disk['end'])}", file=sys.stderr, flush=True)
    return result


# --- summary ----------------------------------------------------------------------------------------------


def summarize(result: dict, peers: tuple[str, ...]) -> dict:
    """Per (method, fine-tunes, state, tool): median and spread of each measure over the successful runs, and
    ours' ratios against the fastest / leanest peer."""
    groups: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        if row["kind"] == "timing":
            groups.setdefault((row["method"], row["finetunes"], row["state"], row["tool"]), []).append(row)
    cells = {}
    for key, rows in groups.items():
        good = [r for r in rows if r["outcome"] == "ok"]
        cell = {"runs": len(rows), "ok": len(good)}
        for measure_name in ("seconds", "rss_anon_peak_bytes", "rss_peak_bytes", "cgroup_peak_bytes"):
            if good:
                cell[measure_name] = median_spread([r[measure_name] for r in good])
        cells[key] = cell
    ratios = []
    for method, count, state, tool in sorted(cells):
        if tool != "ours" or "seconds" not in cells[(method, count, state, tool)]:
            continue
        mine = cells[(method, count, state, tool)]
        peer_state = "cold" if state == "cold-compile" else state
        measured = {p: cells[(method, count, peer_state, p)] for p in peers
                    if "seconds" in cells.get((method, count, peer_state, p), {})}
        entry = {"method": method, "finetunes": count, "state": state}
        if measured:
            fastest = min(measured, key=lambda p: measured[p]["seconds"]["median"])
            entry.update(fastest_peer=fastest,
                         speedup=measured[fastest]["seconds"]["median"] / mine["seconds"]["median"])
            for measure_name in ("rss_anon_peak_bytes", "rss_peak_bytes", "cgroup_peak_bytes"):
                leanest = min(measured[p][measure_name]["median"] for p in measured)
                entry[f"{measure_name}_ratio"] = leanest / max(1, mine[measure_name]["median"])
        ratios.append(entry)
    return {"cells": [{"method": k[0], "finetunes": k[1], "state": k[2], "tool": k[3], **v}
                      for k, v in sorted(cells.items())], "ratios": ratios}


def print_summary(summary: dict, rows: list[dict]) -> None:
    def spread(cell: dict, name: str, scale: float = 1.0, digits: int = 2) -> str:
        if name not in cell:
            return "-"
        m = cell[name]
        return f"{m['median'] / scale:.{digits}f} ({m['min'] / scale:.{digits}f}-{m['max'] / scale:.{digits}f})"

    print(f"\n{'method':18} {'fts':>3} {'state':12} {'tool':12} {'ok':>5} {'seconds med (min-max)':>24} "
          f"{'RssAnon MiB':>18} {'RSS MiB':>18} {'cgroup MiB':>18}")
    for cell in summary["cells"]:
        print(f"{cell['method']:18} {cell['finetunes']:>3} {cell['state']:12} {cell['tool']:12} "
              f"{cell['ok']:>2}/{cell['runs']:<2} {spread(cell, 'seconds'):>24} "
              f"{spread(cell, 'rss_anon_peak_bytes', MIB, 0):>18} {spread(cell, 'rss_peak_bytes', MIB, 0):>18} "
              f"{spread(cell, 'cgroup_peak_bytes', MIB, 0):>18}")
    print(f"\n{'method':18} {'fts':>3} {'state':12} {'fastest peer':>13} {'speed-up':>9} {'anon':>7} {'rss':>7} "
          f"{'cgroup':>7}   (memory: leanest peer / ours)")
    for r in summary["ratios"]:
        if "speedup" in r:
            print(f"{r['method']:18} {r['finetunes']:>3} {r['state']:12} {r['fastest_peer']:>13} "
                  f"{r['speedup']:8.1f}x {r['rss_anon_peak_bytes_ratio']:6.1f}x {r['rss_peak_bytes_ratio']:6.1f}x "
                  f"{r['cgroup_peak_bytes_ratio']:6.1f}x")
    limits = [r for r in rows if r["kind"] == "limit"]
    if limits:
        print(f"\n{'memory limit':>12} {'tool':12} {'method':18} {'fts':>3} {'outcome':8} {'seconds':>8}")
        for r in sorted(limits, key=lambda r: (r["limit_bytes"], r["tool"], r["method"], r["finetunes"])):
            print(f"{r['limit_bytes'] / MIB:>8.0f} MiB {r['tool']:12} {r['method']:18} {r['finetunes']:>3} "
                  f"{r['outcome']:8} {r['seconds']:8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="merging-eval",
                        help="merging-eval's five methods against merging-eval and mergekit (bench/results/"
                             "engine.json), or mergekit's methods against mergekit from one YAML (methods.json)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--runs", type=int, default=5, help="runs per tool, method, fine-tune count and state")
    parser.add_argument("--methods", help="default: the suite's")
    parser.add_argument("--finetunes", default="2,8",
                        help="fine-tune counts (comma-separated; two-model methods read their fixed count)")
    parser.add_argument("--tools", help="default: the suite's")
    parser.add_argument("--states", help="default: the suite's")
    parser.add_argument("--limits", help="memory limits of the limit table ('' skips; default: the suite's)")
    parser.add_argument("--limit-methods", help="default: the suite's")
    parser.add_argument("--limit-finetunes", default="2,8", help="fine-tune counts of the limit table")
    parser.add_argument("--safety-limit", default=None,
                        help="memory cgroup limit of the timing runs (default: 85%% of MemTotal)")
    parser.add_argument("--run-timeout", type=float, default=3600)
    parser.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random, recorded)")
    parser.add_argument("--mergekit")
    parser.add_argument("--resume", type=Path,
                        help="go on with an interrupted run from its checkpoint (~/.cache/modelmerge-bench/"
                             "<results name>.partial.json, rewritten after every run); the same flags, seed and "
                             "commit")
    parser.add_argument("--smoke", action="store_true",
                        help="small shape, 1 run, 2 fine-tunes, two methods, 256MiB limit only; written to .bench/")
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/<suite's name>.json for a "
                                                 "full run, .bench/results/<name>-smoke.json otherwise)")
    args = parser.parse_args()
    suite = SUITES[args.suite]
    defaults = {"methods": ",".join(suite.methods), "tools": ",".join(suite.tools),
                "states": ",".join(suite.states), "limits": suite.limits,
                "limit_methods": ",".join(suite.limit_methods)}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        args.shape, args.runs, args.finetunes, args.limits, args.limit_finetunes = "small", 1, "2", "256MiB", "2"
        if args.suite == "merging-eval":
            args.methods, args.limit_methods = "task_arithmetic,ties_merging_dare", "task_arithmetic"
    args.methods = [m for m in args.methods.split(",") if m]
    args.tools = [t for t in args.tools.split(",") if t]
    args.states = [s for s in args.states.split(",") if s]
    args.finetunes = [int(n) for n in args.finetunes.split(",") if n]
    args.limits = [parse_size(s) for s in args.limits.split(",") if s]
    args.limit_methods = [m for m in args.limit_methods.split(",") if m]
    args.limit_finetunes = [int(n) for n in args.limit_finetunes.split(",") if n]
    for field, values, allowed in (("--methods", args.methods, suite.methods), ("--tools", args.tools, suite.tools),
                                   ("--states", args.states, suite.states),
                                   ("--limit-methods", args.limit_methods, suite.methods)):
        unknown = [v for v in values if v not in allowed]
        if unknown or (not values and field != "--limit-methods"):
            parser.error(f"{field}: unknown or missing {', '.join(unknown) or 'values'} for --suite {args.suite}; "
                         f"choose from {', '.join(allowed)}")
    if args.runs < 1 or not args.finetunes or min(args.finetunes + args.limit_finetunes) < 1:
        parser.error("--runs and every --finetunes and --limit-finetunes count must be at least 1")
    args.safety_limit = parse_size(args.safety_limit) if args.safety_limit else int(memory_total_bytes() * 0.85)
    args.seed = random.randrange(2**31) if args.seed is None else args.seed
    full = (args.runs >= 5 and args.shape == "qwen2.5-0.5b" and set(args.tools) == set(suite.tools)
            and not args.smoke)
    out = args.out or results_path(suite.results, recorded=full)
    checkpoint = CHECKPOINTS / f"{out.stem}.partial.json"

    result = run(args, checkpoint)
    result["summary"] = summarize(result, suite.peers)
    print_summary(result["summary"], result["rows"])
    write_results(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
