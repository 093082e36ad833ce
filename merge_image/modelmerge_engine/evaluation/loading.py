"""The model and tokenizer to evaluate, found as merges find their inputs (modelmerge_engine.refs: a local
directory, or a Hugging Face repo id through the cache, HF_HUB_OFFLINE and HF_TOKEN), loaded from
safetensors only and never with remote code."""

from __future__ import annotations

from dataclasses import dataclass

from modelmerge_engine.errors import MergeError
from modelmerge_engine.refs import ResolvedModel, resolve


@dataclass
class ModelSource:
    """A resolved model with its config and tokenizer: what tokenizing the data needs, before the weights."""

    resolved: ResolvedModel
    config: object
    tokenizer: object
    field: str

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (merging-eval reads n_positions, then max_position_embeddings)."""
        config = self.config.get_text_config()
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

    def max_length(self, requested: int) -> int:
        return min(requested, self.max_positions) if self.max_positions else requested


def open_model(model: str | ResolvedModel, *, field: str = "model") -> ModelSource:
    """The model `model` (a reference, or one a merge has resolved already) with its config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    resolved = model if isinstance(model, ResolvedModel) else resolve(model, field)
    path, ref = resolved.path, resolved.ref
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        found = "only .bin weights, which are never loaded" if any(path.glob("*.bin")) else "no weights"
        raise MergeError(f"{field}: {ref} has {found}; it needs model.safetensors or "
                         "model.safetensors.index.json")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise MergeError(f"{field}: cannot read the config of {ref}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"{field}: cannot load the tokenizer of {ref}: {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise MergeError(f"{field}: the tokenizer of {ref} has no chat template (the metric renders every "
                         "record with it)")
    return ModelSource(resolved, config, tokenizer, field)


def require_device(*, use_gpu: bool) -> str:
    """The device the evaluation runs on; `use_gpu` without CUDA fails at once, as a merge does."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MergeError(f"evaluation needs torch and transformers, and this installation lacks {exc.name} "
                         "(the CPU merge image and the 'engine' extra carry neither): install the 'eval' extra "
                         "(pip install 'modelmerge[eval]') or use the GPU merge image") from None

    if use_gpu and not torch.cuda.is_available():
        raise MergeError("use_gpu is set but CUDA is not available")
    return "cuda" if use_gpu else "cpu"


def load_weights(source: ModelSource, *, dtype: str, device: str):
    """The model in `dtype` on `device`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the progress lines are the contract's; no second bar on stderr
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.resolved.path, config=source.config, dtype=getattr(torch, dtype), use_safetensors=True,
            trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MergeError(f"{source.field}: cannot load {source.resolved.ref} as a causal language model: "
                         f"{exc}") from None
    return model.to(device).eval()
