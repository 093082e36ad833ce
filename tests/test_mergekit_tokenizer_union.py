"""mergekit's `tokenizer_source` where the models' vocabularies differ (merge_image/modelmerge_engine/
tokenizer_source.py): `union` gives the output the union of the vocabularies (the base's ids, then the tokens the
other models bring), `base` or a model that model's, and every model's embeddings and head are moved to it before
the merge, a token a model lacks taking another model's row (or their average).

Against mergekit 0.1.5 (the oracle, tests/helpers/mergekit.py) on tiny Llama-shaped (bfloat16) and Qwen2-shaped
(float32) models whose fine-tunes add tokens (as added tokens, special and plain, so that they have more embedding
rows than the base and not as many as each other) and one of which renames a token of the base's (so the base and
the other fine-tunes have a token it lacks, and it has one that only it has): union with linear, task_arithmetic
and ties, in bfloat16, float16 and float32, on both kernel sets and over ranges that split rows; base and a named
model with task_arithmetic; one vocabulary with padding rows (fewer tokens than embedding rows), with base_model
and without. Every tensor bit-identical, the written tokenizer loads with the same ids and added
tokens as mergekit's, config.json's vocab_size is the same. The fine-tunes' new tokens are chosen so that
mergekit's union has one order: it visits the models in a set's order (random from one process to the next), so
where two models each bring tokens the other lacks its ids vary from run to run; ours follow the config's order.
Then the configurations refused, naming tokenizer_source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelmerge.contract import MergeRequest
from modelmerge_engine.engine import RANGE_ELEMENTS_ENV
from modelmerge_engine.kernels import KERNELS_ENV
from modelmerge_engine.run import run_merge
from tests.helpers.mergekit import assert_agrees_with_mergekit, mergekit_python, mergekit_run
from tests.helpers.models import make_family, read_state_dict

SIZE = {"vocab": 96, "hidden": 32, "intermediate": 64, "layers": 2}
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# What each fine-tune adds: (content, special). ft1's are ft0's and one more, so that mergekit's union has one
# order whichever of them it visits first; ft1 also renames the base's `w9`.
PADDED_TOKENS = 90  # of SIZE's 96 rows
ADDED = ([("<tool>", True), ("extra", False)], [("<tool>", True), ("extra", False), ("<end_tool>", True)])


def add_tokens(model: Path, tokens: list[tuple[str, bool]], *, rename: tuple[str, str] | None, seed: int) -> None:
    """Gives a saved model `tokens` as added tokens of its tokenizer.json (after its vocabulary) and one new
    embedding row each (and head row), config.json's vocab_size grown to match; `rename` (old, new) renames a token
    of its vocabulary (same id, so the model lacks `old` and has `new`)."""
    document = json.loads((model / "tokenizer.json").read_text())
    vocab = document["model"]["vocab"]
    if rename:
        vocab[rename[1]] = vocab.pop(rename[0])
    first = len(vocab) + len(document["added_tokens"]) - sum(1 for t in document["added_tokens"]
                                                            if t["content"] in vocab)
    for offset, (content, special) in enumerate(tokens):
        document["added_tokens"].append({"id": first + offset, "content": content, "single_word": False,
                                         "lstrip": False, "rstrip": False, "normalized": not special,
                                         "special": special})
    (model / "tokenizer.json").write_text(json.dumps(document, indent=2))
    config = json.loads((model / "config.json").read_text())
    rows = first + len(tokens)
    config["vocab_size"] = rows
    (model / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(model / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name in VOCABULARY_TENSORS:
        if name in tensors:
            old = tensors[name]
            new = (torch.randn((rows - old.shape[0], old.shape[1]), generator=generator) * 0.05).to(old.dtype)
            tensors[name] = torch.cat([old, new])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("families")
    made = {}
    for arch, dtype in (("llama", torch.bfloat16), ("qwen2", torch.float32)):
        base, finetunes = make_family(root / arch, n=3, arch=arch, dtype=dtype, **SIZE)
        add_tokens(finetunes[0], ADDED[0], rename=None, seed=7)
        add_tokens(finetunes[1], ADDED[1], rename=("w9", "renamed"), seed=8)
        made[arch] = base, finetunes
    base, finetunes = make_family(root / "padded", n=2, arch="llama", dtype=torch.bfloat16, **SIZE)
    for model in (base, *finetunes):  # the last rows are padding: no token of the tokenizer (as Qwen2.5's)
        document = json.loads((model / "tokenizer.json").read_text())
        document["model"]["vocab"] = {t: i for t, i in document["model"]["vocab"].items() if i < PADDED_TOKENS}
        (model / "tokenizer.json").write_text(json.dumps(document, indent=2))
    made["padded"] = base, finetunes
    return made


def ours(config: dict, out: Path) -> dict[str, torch.Tensor]:
    request = MergeRequest.model_validate({"config": config, "output_dir": str(out)})
    assert run_merge(request, progress="none") == 0
    return read_state_dict(out)


def tokenizer_of(directory: Path) -> tuple[dict[str, int], dict[int, str]]:
    """What transformers loads from a merge's output: token ids, and each added token with its settings."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    return tokenizer.get_vocab(), {index: repr(token) for index, token in tokenizer.added_tokens_decoder.items()}


def union_config(method: str, base: Path, finetunes: list[Path], dtype: str, source: str = "union") -> dict:
    models = [{"model": str(model), "parameters": {"weight": weight}}
              for model, weight in zip(finetunes, (0.5, 0.3, 0.9), strict=False)]
    config = {"merge_method": method, "base_model": str(base), "dtype": dtype, "tokenizer_source": source,
              "models": models}
    if method == "linear":  # the base is one more input (mergekit adds it), weighted by the global weight
        config["parameters"] = {"weight": 0.2, "normalize": True}
    if method == "ties":
        for model in models:
            model["parameters"]["density"] = 0.6
    return config


def assert_union_matches_mergekit(config: dict, tmp_path: Path, *, grows: bool = True) -> None:
    python = mergekit_python()
    ok, log = mergekit_run(python, config, tmp_path / "mergekit")
    assert ok, log[-4000:]
    theirs, mine = tmp_path / "mergekit", tmp_path / "ours"
    merged = ours(config, mine)
    assert_agrees_with_mergekit(merged, read_state_dict(theirs))
    base_rows = len(tokenizer_of(Path(config["base_model"] or config["models"][0]["model"]))[0])
    assert (merged["model.embed_tokens.weight"].shape[0] > base_rows) == grows  # the vocabulary grew
    assert tokenizer_of(mine) == tokenizer_of(theirs)
    vocab_size = json.loads((theirs / "config.json").read_text())["vocab_size"]
    assert json.loads((mine / "config.json").read_text())["vocab_size"] == vocab_size == len(tokenizer_of(mine)[0])


@pytest.mark.parametrize(("arch", "method", "dtype"), [("llama", "task_arithmetic", "bfloat16"),
                                                       ("llama", "linear", "bfloat16"),
                                                       ("llama", "ties", "bfloat16"),
                                                       ("qwen2", "task_arithmetic", "float32"),
                                                       ("qwen2", "linear", "float16"),
                                                       ("llama", "sce", "bfloat16"),
                                                       ("llama", "multislerp", "bfloat16"),
                                                       ("llama", "model_stock", "bfloat16"),
                                                       ("llama", "karcher", "bfloat16")])
def test_union_of_vocabularies_gives_mergekits_tensors_tokenizer_and_vocab_size(families, tmp_path, arch, method,
                                                                                dtype):
    """sce, multislerp, model_stock and karcher also read their inputs for per-tensor statistics: with the rows
    moved as the merged ranges' are (before, their vocabulary tensors' statistics read the rows as stored)."""
    base, finetunes = families[arch]
    assert_union_matches_mergekit(union_config(method, base, finetunes, dtype), tmp_path)


@pytest.mark.parametrize("source", ["base", "ft1"])
def test_the_base_or_a_models_vocabulary_over_differing_ones_gives_mergekits_tensors(families, tmp_path, source):
    """tokenizer_source base or a model where the vocabularies differ: rows moved to that vocabulary the same way
    (tokens the others bring dropped; the named model's added tokens kept)."""
    base, finetunes = families["llama"]
    named = str(base) if source == "base" else str(finetunes[1])
    config = union_config("task_arithmetic", base, finetunes, "bfloat16", "base" if source == "base" else named)
    assert_union_matches_mergekit(config, tmp_path, grows=source != "base")


def test_union_of_one_vocabulary_drops_padding_rows_as_mergekit(families, tmp_path):
    """The same vocabulary in every model, fewer tokens than embedding rows: the union (with base_model or not: the
    same tokens whichever model comes first) is that vocabulary, the padding rows dropped."""
    base, finetunes = families["padded"]
    config = union_config("task_arithmetic", base, finetunes, "bfloat16")
    assert_union_matches_mergekit(config, tmp_path / "task_arithmetic", grows=False)
    linear = {"merge_method": "linear", "dtype": "bfloat16", "tokenizer_source": "union",
              "models": [{"model": str(model), "parameters": {"weight": 0.5}} for model in (base, *finetunes)]}
    assert_union_matches_mergekit({**linear, "base_model": None}, tmp_path / "linear", grows=False)
    assert read_state_dict(tmp_path / "linear" / "ours")["lm_head.weight"].shape[0] == PADDED_TOKENS


def test_union_on_the_torch_kernel_set_with_every_tensor_split_into_ranges(families, tmp_path, monkeypatch):
    """The rows moved range by range (a range starting and ending inside a row) on the other kernel set."""
    monkeypatch.setenv(KERNELS_ENV, "torch")
    monkeypatch.setenv(RANGE_ELEMENTS_ENV, "40")
    base, finetunes = families["llama"]
    assert_union_matches_mergekit(union_config("task_arithmetic", base, finetunes, "bfloat16"), tmp_path)


def refusal(config: dict, out: Path, capsys) -> str:
    request = MergeRequest.model_validate({"config": config, "output_dir": str(out)})
    assert run_merge(request, progress="none") == 1
    assert not out.exists()
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]


def test_unsupported_tokenizer_sources_over_differing_vocabularies_are_refused_naming_it(families, tmp_path,
                                                                                       capsys):
    base, finetunes = families["llama"]
    config = union_config("task_arithmetic", base, finetunes, "bfloat16")
    without_base = {**union_config("linear", base, finetunes, "bfloat16"), "base_model": None}
    assert refusal(without_base, tmp_path / "no-base", capsys).startswith(
        "config: tokenizer_source: union needs base_model where the vocabularies differ")
    assert refusal({**without_base, "tokenizer_source": "base"}, tmp_path / "no-base", capsys).startswith(
        "config: tokenizer_source: base needs base_model where the vocabularies differ")
    assert refusal({**config, "tokenizer_source": "missing"}, tmp_path / "missing", capsys).startswith(
        "config: tokenizer_source: 'missing' is none of the config's models")
    slices = {"merge_method": "linear", "base_model": str(base), "tokenizer_source": "union", "slices": [
        {"sources": [{"model": str(model), "layer_range": [0, SIZE["layers"]], "parameters": {"weight": 0.5}}
                     for model in (base, finetunes[1])]}]}
    assert refusal(slices, tmp_path / "slices", capsys).startswith(
        "config: tokenizer_source: union with slices is not supported")
