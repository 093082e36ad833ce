"""Engine benchmark: this engine vs merging-eval (and mergekit where it is installed), same machine, same run.

Makes a Qwen2.5-0.5B-shaped random model (hidden 896, 24 layers, vocab 151936, bf16, ~0.94 GB) and
fine-tunes under .bench/ (reused on later runs), runs every method with each tool one after another, and
prints wall time and peak anonymous memory (RssAnon of the process tree, sampled every 20 ms) with ratios.
Before each method, this engine runs once unmeasured (kernel compilation is cached on disk after the first
use of a signature; it also puts the inputs in the page cache, where they are for the peers that follow).

    .venv/bin/python bench/bench_engine.py [--methods a,b] [--finetunes 2] [--mergekit PATH] [--skip-peers]

mergekit is looked up as `mergekit-yaml` next to --mergekit, in .bench/mergekit-venv/bin, or on PATH.
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
CACHE = ROOT / ".bench" / "models"
sys.path.insert(0, str(ROOT))

QWEN_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
            "max_position_embeddings": 32768}
METHODS = {
    "average_merging": {},
    "task_arithmetic": {"scaling_coefficient": 0.3},
    "ties_merging": {"scaling_coefficient": 1.0, "param_value_mask_rate": 0.8},
    "ties_merging_dare": {"scaling_coefficient": 1.0, "param_value_mask_rate": 0.8},
    "mask_merging": {"mask_strategy": "random", "mask_apply_method": "average_merging"},
}
# mergekit equivalents (same family of arithmetic; timing peers, not oracles)
MERGEKIT = {"average_merging": "linear", "task_arithmetic": "task_arithmetic", "ties_merging": "ties",
            "ties_merging_dare": "ties", "mask_merging": "dare_linear"}


# --- models ----------------------------------------------------------------------------------------------

def make_models(finetunes: int) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.helpers.models import save_tokenizer

    base = CACHE / "base"
    config = Qwen2Config(**QWEN_05B, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         architectures=["Qwen2ForCausalLM"])
    config.torch_dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()
                  if n != "lm_head.weight"}
    if (base / "model.safetensors").exists():
        config.save_pretrained(base)
    else:
        print(f"making base model in {base} ...", flush=True)
        generator = torch.Generator().manual_seed(0)
        tensors = {n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
        _save(base, tensors, config, save_file)
        save_tokenizer(base, 1024)
    fts = []
    for i in range(finetunes):
        path = CACHE / f"ft{i}"
        fts.append(path)
        if (path / "model.safetensors").exists():
            config.save_pretrained(path)
            continue
        print(f"making fine-tune {path} ...", flush=True)
        from safetensors.torch import load_file

        generator = torch.Generator().manual_seed(100 + i)
        tensors = {n: (t.float() + torch.randn(t.shape, generator=generator) * 0.002).to(torch.bfloat16)
                   for n, t in load_file(base / "model.safetensors").items()}
        _save(path, tensors, config, save_file)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(base / name, path / name)
    return base, fts


def _save(path: Path, tensors, config, save_file) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


# --- measuring -------------------------------------------------------------------------------------------

def _rss_anon_kib(pid: int) -> int:
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(command: list[str], env: dict | None = None) -> dict:
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon_kib(process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    done.set()
    sampler.join()
    seconds = time.monotonic() - started
    if process.returncode != 0:
        tail = (err or out)[-2000:]
        return {"ok": False, "seconds": seconds, "peak_gib": peak / 2**20, "error": tail}
    return {"ok": True, "seconds": seconds, "peak_gib": peak / 2**20}


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


def mergekit(method: str, base: Path, fts: list[Path], out: Path, binary: str) -> list[str]:
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
    config_path = out.parent / f"mergekit-{method}.yml"
    config_path.write_text(json.dumps(config))
    return [binary, str(config_path), str(out), "--copy-tokenizer", "--allow-crimes"]


def find_mergekit(explicit: str | None) -> str | None:
    for candidate in ([explicit] if explicit else []) + [str(ROOT / ".bench/mergekit-venv/bin/mergekit-yaml"),
                                                           shutil.which("mergekit-yaml") or ""]:
        if candidate and Path(candidate).exists():
            return candidate
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--finetunes", type=int, default=2)
    parser.add_argument("--memory-check", type=int, default=8,
                        help="also run ours with this many fine-tunes to compare peak memory (0: skip)")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--mergekit")
    args = parser.parse_args()
    methods = args.methods.split(",")
    base, fts = make_models(max(args.finetunes, args.memory_check))
    two = fts[: args.finetunes]
    kit = None if args.skip_peers else find_mergekit(args.mergekit)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench") as tmp:
        out = Path(tmp) / "out"
        for method in methods:
            # One unmeasured run per input count: numba compiles a kernel once per signature and caches it
            # on disk (an image build or first use pays it), and the inputs land in the page cache, as they
            # are for the peers that run after it.
            for count in {args.finetunes, args.memory_check} - {0}:
                measure(ours(method, base, fts[:count], out), env)
                shutil.rmtree(out, ignore_errors=True)
            row = {"method": method, "ours": measure(ours(method, base, two, out), env)}
            shutil.rmtree(out, ignore_errors=True)
            if not args.skip_peers:
                row["merging-eval"] = measure(merging_eval(method, base, two, out), env)
                shutil.rmtree(out, ignore_errors=True)
                if kit:
                    row["mergekit"] = measure(mergekit(method, base, two, out, kit), env)
                    shutil.rmtree(out, ignore_errors=True)
            if args.memory_check:
                row["ours_many"] = measure(ours(method, base, fts[: args.memory_check], out), env)
                shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report(rows, args.memory_check)
    return 0


def report(rows: list[dict], many: int) -> None:
    print(f"\n{'method':20} {'tool':14} {'seconds':>8} {'peak GiB':>9}")
    for row in rows:
        for tool in ("ours", "merging-eval", "mergekit", "ours_many"):
            if tool in row:
                r = row[tool]
                label = f"ours ({many} fts)" if tool == "ours_many" else tool
                status = "" if r["ok"] else "  FAILED: " + r["error"].strip().splitlines()[-1][:80]
                print(f"{row['method']:20} {label:14} {r['seconds']:8.2f} {r['peak_gib']:9.3f}{status}")
    print(f"\n{'method':20} {'speed-up vs fastest peer':>26} {'memory: leanest peer / ours':>28} "
          f"{'ours mem {many}fts/2fts':>20}")
    for row in rows:
        peers = [row[t] for t in ("merging-eval", "mergekit") if t in row and row[t]["ok"]]
        ours_r = row["ours"]
        speed = min(p["seconds"] for p in peers) / ours_r["seconds"] if peers else float("nan")
        memory = min(p["peak_gib"] for p in peers) / ours_r["peak_gib"] if peers else float("nan")
        growth = row["ours_many"]["peak_gib"] / ours_r["peak_gib"] if "ours_many" in row else float("nan")
        print(f"{row['method']:20} {speed:25.1f}x {memory:27.1f}x {growth:19.2f}x")


if __name__ == "__main__":
    sys.exit(main())
