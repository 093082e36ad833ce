"""Runs one merge with merging-eval the way its CLI does (bf16 load, MergingMethod, save_pretrained).

Its own `merge.main_merging` cannot be used: it imports a `scripts.eval` module that the wheel does not ship.
Called by bench_engine.py with one JSON argument: {"method", "base", "models", "out", "params"}."""

import json
import sys

import torch
from merge import MergingMethod
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    spec = json.loads(sys.argv[1])

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

    base = load(spec["base"])
    merged = MergingMethod(merging_method_name=spec["method"]).get_merged_model(
        merged_model=base, models_to_merge=[load(p) for p in spec["models"]], exclude_param_names_regex=[],
        **spec["params"])
    merged.to(torch.bfloat16).save_pretrained(spec["out"])
    AutoTokenizer.from_pretrained(spec["base"]).save_pretrained(spec["out"])


if __name__ == "__main__":
    main()
