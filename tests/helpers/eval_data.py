"""What evaluation tests and benchmarks share: tiny chat models (a tiny random model with the tiny chat
tokenizer of tests/helpers/tokenizers.py) and instruction/answer data files of varied lengths."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from tests.helpers.models import make_finetune, make_model
from tests.helpers.tokenizers import CORPUS_WORDS, save_chat_tokenizer

CHAT_VOCAB = 384  # the tokenizer's vocabulary; models are made with exactly this many embeddings
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def make_chat_model(path: Path, *, arch: str = "qwen2", dtype: torch.dtype = torch.float32, seed: int = 0,
                    **config_kwargs) -> Path:
    """A tiny random causal LM with the chat tokenizer, saved as safetensors."""
    make_model(path, arch=arch, dtype=dtype, seed=seed, tokenizer=False,
               **{"vocab": CHAT_VOCAB, **config_kwargs})
    save_chat_tokenizer(path, vocab_size=CHAT_VOCAB)
    return path


def make_chat_finetune(base: Path, path: Path, *, seed: int, scale: float = 0.01) -> Path:
    """base + small noise, with the base's chat tokenizer."""
    make_finetune(base, path, seed=seed, scale=scale)
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, path / name)
    return path


def make_records(count: int, *, seed: int = 0, layout: tuple[str, str] = ("instruction", "output"),
                 max_words: int = 24) -> list[dict]:
    """`count` records whose prompts and answers have random lengths (1 to max_words words)."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(1, max_words)))

    return [{layout[0]: f"  {text()}\n", layout[1]: f"{text()}  "} for _ in range(count)]


def write_records(path: Path, records: list, *, jsonl: bool = False) -> Path:
    """A JSON array (indented, as merging-eval's data files are) or JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        path.write_text(json.dumps(records, indent=2))
    return path


def train_on(model_dir: Path, records: list[dict], *, steps: int = 60, learning_rate: float = 1e-2,
             max_length: int = 64) -> Path:
    """Adam steps on the records' answers (prompt masked, as the metric scores them; all records one batch
    padded to max_length), saved in place: a model that has learnt the records, so that a broken merge of it
    has something to lose (a random model sits at the uniform cross-entropy, log(vocab), where nothing gets
    much worse)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.eval_oracle import labelled

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    items = [labelled(tokenizer, record, max_length=max_length, pad_to_max_length=True) for record in records]
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    return model_dir
