"""Evaluation benchmark: answer tokens per second of `modelmerge eval` against merging-eval's own loop (every
record padded to max_length, batches of 10, transformers' loss: tests/helpers/eval_oracle.padded_batches and
batches_loss, the oracle of tests/test_eval_metric.py, since merging-eval's scripts/eval.py is not in its
wheel), timing the loops only (tokenizing comes before either clock), on the same model, data, dtype and
device, each run in its own process, alternated --runs times; medians, peak RSS (VmHWM) of each process, and
the two cross-entropies (they must agree).

Shapes (random weights; the tiny chat tokenizer of tests/helpers/tokenizers.py trained to 1024 tokens, so every
word of its corpus is one token as English words mostly are in a real 32k-152k BPE vocabulary, and the records'
token counts are realistic: prompts of 10-150 words, answers of 10-400; the model's vocabulary is a real one's
size, of which the tokenizer uses the first 1024, so the output head costs what a real one does):
  realistic  hidden 512, 8 layers, 8 heads (2 KV), intermediate 1408, vocab 32000 (Llama-2's), tied embeddings
             (merging-eval's loop at its defaults, 10 x 2048 positions, over Qwen's 151936-row vocabulary needs
             about 25 GB for the float32 logits and their log-softmax and was OOM-killed on this 24 GiB machine)
  qwen0.5b   Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads (2 KV), intermediate 4864, vocab 151936 (for a
             GPU)
  smoke      hidden 64, 2 layers, vocab 4096: a quick check that everything runs (not a result)

    .venv/bin/python bench/bench_eval.py                          # CPU, realistic shape, 5 runs (the recorded run)
    .venv/bin/python bench/bench_eval.py --smoke                  # quick check, 1 run
    .venv/bin/python bench/bench_eval.py --shape qwen0.5b --use-gpu   # a lent GPU

Raw rows, the medians with their spread (min-max) and the provenance go to bench/results/eval.json for the
recorded settings (realistic shape, CPU, >= 5 runs), bench/results/eval-gpu.json for the qwen0.5b shape on a
GPU, .bench/results/eval-smoke.json otherwise (bench/provenance.py).

Models and data are made once under .bench/eval/.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "merge_image")]

from bench.provenance import median_spread, provenance, results_path, write_results  # noqa: E402

BENCH = ROOT / ".bench" / "eval"
SHAPES = {
    "realistic": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
                  "intermediate_size": 1408, "vocab_size": 32000},
    "qwen0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                 "intermediate_size": 4864, "vocab_size": 151936},
    "smoke": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 4096},
}
TOOLS = ("ours", "merging-eval")
TOKENIZER_VOCAB = 1024  # whole words of the corpus as single tokens


# --- inputs ----------------------------------------------------------------------------------------------


def make_model(shape: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.helpers.tokenizers import save_chat_tokenizer

    path = BENCH / f"{shape}-vocab{SHAPES[shape]['vocab_size']}-tokenizer{TOKENIZER_VOCAB}"
    if (path / "model.safetensors").exists():
        return path
    print(f"making {shape} model in {path} ...", file=sys.stderr, flush=True)
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=32768,
                         bos_token_id=None, eos_token_id=2, pad_token_id=0, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(path, safe_serialization=True)
    if save_chat_tokenizer(path, vocab_size=TOKENIZER_VOCAB) > SHAPES[shape]["vocab_size"]:
        raise SystemExit(f"the tokenizer outgrew the {shape} model's vocabulary")
    return path


def make_data(records: int, *, seed: int = 0) -> Path:
    """Records with realistic spread: prompts of 10-150 words, answers of 10-400 words."""
    from tests.helpers.eval_data import write_records
    from tests.helpers.tokenizers import CORPUS_WORDS

    path = BENCH / "data" / f"bench-{records}-{seed}.json"
    if path.exists():
        return path
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(low, high)))

    return write_records(path, [{"instruction": text(10, 150), "output": text(10, 400)} for _ in range(records)])


# --- one measurement (a child process) -------------------------------------------------------------------


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(tool: str, model: Path, data: Path, *, max_length: int, batch_size: int, use_gpu: bool) -> dict:
    started = time.monotonic()
    if tool == "ours":
        from modelmerge_engine.evaluation.data import load_data_files
        from modelmerge_engine.evaluation.options import EvalOptions
        from modelmerge_engine.evaluation.scoring import evaluate

        report = evaluate(str(model), load_data_files([data]),
                          EvalOptions(max_length=max_length, batch_size=batch_size, use_gpu=use_gpu))
        (result,) = report["files"]
        loss_sum, tokens, seconds = result["loss_sum"], result["tokens"], report["timings"]["eval"]
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tests.helpers.eval_oracle import batches_loss, padded_batches

        # as merging-eval's script: bfloat16 on CUDA, float32 on the CPU
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if use_gpu else torch.float32)
        loaded = loaded.to("cuda" if use_gpu else "cpu").eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        batches = padded_batches(tokenizer, json.loads(data.read_text()), max_length=max_length, batch_size=10)
        clock = time.monotonic()  # the loop only, as ours: tokenizing is done before either clock starts
        loss_sum, tokens = batches_loss(loaded, batches)
        if use_gpu:
            torch.cuda.synchronize()
        seconds = time.monotonic() - clock
    return {"tool": tool, "tokens": tokens, "ce": loss_sum / tokens, "eval_seconds": seconds,
            "tokens_per_second": tokens / seconds, "total_seconds": time.monotonic() - started,
            "peak_rss_bytes": peak_rss_bytes()}


def run_child(tool: str, args: argparse.Namespace, model: Path, data: Path) -> dict:
    command = [sys.executable, __file__, "--child", tool, "--model", str(model), "--data", str(data),
               "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
    if args.use_gpu:
        command.append("--use-gpu")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the benchmark ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="realistic")
    parser.add_argument("--records", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=2048, help="merging-eval's default")
    parser.add_argument("--batch-size", type=int, default=10, help="ours (merging-eval's loop always uses 10)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="smoke shape, 12 records, max_length 1024, 1 run")
    parser.add_argument("--out", type=Path, help="results JSON (default: by the settings, see above)")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, Path(args.model), Path(args.data), max_length=args.max_length,
                                 batch_size=args.batch_size, use_gpu=args.use_gpu)))
        return
    if args.smoke:
        args.shape, args.records, args.max_length, args.runs = "smoke", 12, 1024, 1
    model, data = make_model(args.shape), make_data(args.records)
    rows = []
    for run in range(args.runs):
        for tool in (TOOLS if run % 2 == 0 else TOOLS[::-1]):  # alternate who goes first
            row = run_child(tool, args, model, data)
            print(f"run {run + 1}/{args.runs} {tool:13s} {row['tokens_per_second']:10.1f} tokens/s "
                  f"{row['eval_seconds']:8.2f} s  peak {row['peak_rss_bytes'] / 2**30:.3f} GiB  ce {row['ce']:.6f}",
                  file=sys.stderr, flush=True)
            rows.append(row)
    summary = summarize(rows)
    print(f"shape {args.shape}, {args.records} records, max_length {args.max_length}, "
          f"{'cuda' if args.use_gpu else 'cpu'}, {args.runs} run(s); median (min-max)")
    print(f"{'tool':14s}{'tokens/s':>28s}{'eval s':>22s}{'peak GiB':>10s}{'ce':>12s}")
    for tool in TOOLS:
        s = summary[tool]
        print(f"{tool:14s}{_spread(s['tokens_per_second'], '.1f'):>28s}{_spread(s['eval_seconds'], '.2f'):>22s}"
              f"{s['peak_rss_bytes']['median'] / 2**30:10.3f}{s['ce']['median']:12.6f}")
    print(f"speed-up {_spread(summary['speedup'], '.2f')}x (run by run), peak memory ratio (merging-eval / ours) "
          f"{summary['memory_ratio']:.2f}x, ce agree to {summary['ce_relative_difference']:.1e}")
    recorded = not args.smoke and args.runs >= 5 and args.records >= 60 and args.max_length == 2048 and (
        (args.shape, args.use_gpu) in (("realistic", False), ("qwen0.5b", True)))
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "model", "data", "out")}
    result = {"benchmark": "eval", "provenance": provenance(["torch", "transformers", "tokenizers"]),
              "settings": settings, "summary": summary, "rows": rows}
    write_results(result, args.out or results_path("eval-gpu" if args.use_gpu else "eval", recorded=recorded))


def _spread(cell: dict, spec: str) -> str:
    return f"{cell['median']:{spec}} ({cell['min']:{spec}}-{cell['max']:{spec}})"


def summarize(rows: list[dict]) -> dict:
    """Per tool the median and spread of each measure; the speed-up of each run (ours against the
    merging-eval run beside it) with its median and spread."""
    summary: dict = {}
    for tool in TOOLS:
        mine = [row for row in rows if row["tool"] == tool]
        summary[tool] = {key: median_spread([row[key] for row in mine])
                         for key in ("tokens_per_second", "eval_seconds", "peak_rss_bytes", "ce", "tokens")}
    ours, peer = summary["ours"], summary["merging-eval"]
    if ours["tokens"]["min"] != ours["tokens"]["max"] or ours["tokens"] != peer["tokens"]:
        raise SystemExit(f"the tools scored different token counts: {ours['tokens']} and {peer['tokens']}")
    pairs = zip((r for r in rows if r["tool"] == "ours"), (r for r in rows if r["tool"] == "merging-eval"),
                strict=True)
    summary["speedup"] = median_spread([a["tokens_per_second"] / b["tokens_per_second"] for a, b in pairs])
    summary["memory_ratio"] = peer["peak_rss_bytes"]["median"] / ours["peak_rss_bytes"]["median"]
    summary["ce_relative_difference"] = abs(ours["ce"]["median"] - peer["ce"]["median"]) / max(
        abs(peer["ce"]["median"]), math.ulp(1.0))
    return summary


if __name__ == "__main__":
    main()
