"""Tiny random models made on the fly for tests and benchmarks: real transformers configs, random weights,
real safetensors files and a real (tiny) tokenizer. Nothing reaches the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

ARCHS = ("qwen2", "llama")


def tiny_config(arch: str = "qwen2", *, vocab: int = 128, hidden: int = 32, layers: int = 2,
                intermediate: int = 64, heads: int = 4, kv_heads: int = 2, tie: bool = False, experts: int = 4):
    """`arch` qwen2 or llama (dense), or a Mixture of Experts with `experts` experts per layer, stored one
    tensor per expert and fused by transformers 5 into mlp.experts.gate_up_proj/down_proj: mixtral
    (block_sparse_moe.experts.N.w1/w2/w3) or qwen2_moe (mlp.experts.N.gate_proj/up_proj/down_proj, plus a
    shared expert)."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig

    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mixtral": MixtralConfig,
                    "qwen2_moe": Qwen2MoeConfig}[arch]
    moe = {
        "mixtral": {"num_local_experts": experts, "num_experts_per_tok": 2},
        "qwen2_moe": {"num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": intermediate // 2,
                      "shared_expert_intermediate_size": intermediate},
    }.get(arch, {})
    return config_class(
        **moe,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer with `vocab_size` entries, saved the way from_pretrained expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(path)


def make_model(path: Path, *, arch: str = "qwen2", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               shard_size: str | None = None, tokenizer: bool = True, **config_kwargs) -> Path:
    """A random base model saved as safetensors (sharded with an index when `shard_size` is given)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # the default init leaves many exact zeros/ones; real checkpoints look random
        for param in model.parameters():
            param.copy_(torch.randn_like(param, dtype=torch.float32).mul_(0.05).to(dtype))
    save_model(model, path, shard_size=shard_size)
    if tokenizer:
        save_tokenizer(path, config.vocab_size)
    return path


def save_model(model, path: Path, *, shard_size: str | None = None) -> None:
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)


def make_finetune(base: Path, path: Path, *, seed: int, scale: float = 0.01,
                  shard_size: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """base + small noise in every parameter, like a fine-tune; config and tokenizer copied from base."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_((param.float() + noise).to(param.dtype))
    save_model(model, path, shard_size=shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).exists():
            shutil.copy(base / name, path / name)
    return path


def make_family(root: Path, *, n: int = 2, arch: str = "qwen2", dtype: torch.dtype = torch.bfloat16,
                shard_size: str | None = None, **config_kwargs) -> tuple[Path, list[Path]]:
    """A base model and `n` fine-tunes under `root`."""
    base = make_model(root / "base", arch=arch, dtype=dtype, shard_size=shard_size, **config_kwargs)
    finetunes = [make_finetune(base, root / f"ft{i}", seed=100 + i, shard_size=shard_size)
                 for i in range(n)]
    return base, finetunes


def fill_hf_cache(hf_home: Path, repo_id: str, source: Path, revision: str = "main", *,
                  repo_type: str = "model") -> str:
    """Lay out `source` as huggingface_hub's cache does (blobs, snapshot symlinks, refs) for `repo_id` (a
    model repo, or a `dataset` one).

    Returns the commit hash. With HF_HOME=hf_home and HF_HUB_OFFLINE=1 the repo id then resolves with no
    network, exactly as a pre-filled cache does on a real machine."""
    repo_dir = Path(hf_home) / "hub" / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in Path(source).rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return commit


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model directory (single file or sharded)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(path / name))
    return tensors


def untie_head(model_dir: Path, *, seed: int, scale: float = 0.01) -> Path:
    """Give a saved model its own output head (the embeddings plus noise) and untie it in its config, as a
    fine-tune that trained its head separately stores it."""
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    embeddings = tensors["model.embed_tokens.weight"]
    noise = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(seed)) * scale
    tensors["lm_head.weight"] = (embeddings.float() + noise).to(embeddings.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir
