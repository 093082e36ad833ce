"""A mergekit config's `tokenizer_source`: which vocabulary and tokenizer the output carries.

`base` (and no tokenizer_source) keeps the base model's tokenizer files, which the output has already; a model
named in the config gives its own tokenizer files instead; `union` gives the union of every model's vocabulary.
mergekit 0.1.5 builds that vocabulary and moves the embedding rows to it; where all the models' vocabularies are
the same (the same tokens at the same ids, as many as the embedding rows) that is the identity and the merge needs
nothing else. Where they differ, or a model has more embedding rows (its config's vocab_size) than tokens
(padding), the engine does as mergekit does (tokenizer/build.py build_tokenizer and build_union_tokenizer,
tokenizer/embed.py PermutedVocabulary, merge.py _update_config_vocab):

- the vocabulary: `base`: the base model's; a model: that model's; `union`: the base model's tokens at their ids,
  then the tokens of the other models that are in no model's added tokens (as plain added tokens: normalized, not
  special), then the added tokens of every model (the first model's settings where several add one) that the base
  lacks, each new token once, at the next free id. The models are visited base first, then in the config's order
  (mergekit visits them in the order of a set, which varies from one process to the next, so where two models each
  bring tokens the other lacks its ids vary from run to run; within one model it takes them in hash order: ours by
  id).
- the tokenizer written: `union`: the base's tokenizer.json with the new tokens appended to its added tokens
  (tokenizer.json and tokenizer_config.json are what mergekit's save_pretrained writes; the base's vocab.json,
  merges.txt, tokenizer.model and added_tokens.json, which would lack the new tokens, are removed); a model: its
  tokenizer files; `base`: the base's, as they are.
- every model's vocabulary tensors (embed_tokens, lm_head: rows are tokens) are rebuilt with one row per token of
  the vocabulary, before the merge: a token's row of that model, or for a token the model lacks, the row of the one
  model that has it, else the base_model's, else the average of the models that have it (summed in the compute
  dtype in the config's order of the models, then divided). No padding (pad_to_multiple_of needs a `tokenizer`
  config, which is refused).
- config.json's vocab_size is the number of tokens of the vocabulary (padding rows are dropped).

Refused with a message naming tokenizer_source, where the vocabularies differ: `union` or `base` without base_model
(mergekit takes the base tokenizer from the first model of an unordered set), `slices`, a tokenizer with tokens at
ids beyond its model's vocab_size or (the output's) with holes in its ids, a model with fewer vocabulary rows than
tokens, and a base model with no vocabulary tensor."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelmerge_engine.errors import MergeError
from modelmerge_engine.output import copy_synced, write_synced
from modelmerge_engine.safetensors_io import DType

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
# Tokenizer files that list the vocabulary without the union's new tokens: removed from a union's output.
STALE_VOCABULARY_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def is_vocabulary_tensor(name: str) -> bool:
    """Whether a tensor's rows are the vocabulary's tokens (mergekit's vocabulary_axis 0: embeddings and head)."""
    return name == "lm_head.weight" or name.endswith("embed_tokens.weight")


def _tokenizer_document(directory: Path, label: str) -> dict:
    try:
        return json.loads((directory / "tokenizer.json").read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"config: tokenizer_source needs every model's tokenizer.json to compare vocabularies, "
                         f"and {label} has none readable ({exc})") from None


def vocabulary(directory: Path, label: str, document: dict | None = None) -> dict[str, int]:
    """Token → id of a model's tokenizer (tokenizer.json's model vocabulary and added tokens)."""
    document = document if document is not None else _tokenizer_document(directory, label)
    vocab = document.get("model", {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [token, score] pairs in id order
        vocab = {entry[0]: index for index, entry in enumerate(vocab)}
    if not isinstance(vocab, dict):
        raise MergeError(f"config: tokenizer_source: cannot read the vocabulary of {label}'s tokenizer.json")
    vocab = dict(vocab)
    vocab.update({token["content"]: token["id"] for token in document.get("added_tokens", [])})
    return vocab


def _vocab_size(directory: Path, default: int) -> int:
    try:
        size = json.loads((directory / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        return default
    return size if isinstance(size, int) else default


@dataclass
class MovedVocabulary:
    """The output's vocabulary (tokenizer_source's: the union of the models' vocabularies, mergekit's
    build_union_tokenizer, or the base's or a model's) and, for each model (by reference), the row of its
    vocabulary tensors that each token of it takes (-1: the model lacks the token)."""

    source: str  # union, base or the model whose tokenizer the output takes
    base_ref: str  # the model whose tokenizer files the output has (the request's base_model)
    preferred: str | None  # the config's base_model: its row for a token that several models have, not all
    order: list[str]  # the models whose rows feed a missing token's row, in mergekit's order of the inputs
    size: int
    new_tokens: list[dict]  # union: tokenizer.json added_tokens entries, appended to the base's
    rows: dict[str, np.ndarray]  # ref → int64 [size]: the model's row of each token, -1 where it lacks it
    labels: dict[str, str]
    _defaults: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # tensor → token → row
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def missing(self) -> dict[int, tuple[str, ...]]:
        """Each token that some model lacks → the models whose rows make its row (mergekit's
        assign_embedding_sources): the one model that has it, else the base, else all that have it (averaged)."""
        sources = {}
        matrix = np.stack([self.rows[ref] for ref in self.order])
        for token in np.flatnonzero((matrix < 0).any(axis=0)):
            present = [ref for ref, rows in zip(self.order, matrix, strict=True) if rows[token] >= 0]
            if len(present) > 1 and self.preferred in self.rows and self.rows[self.preferred][token] >= 0:
                present = [self.preferred]
            sources[int(token)] = tuple(present)
        return sources

    def defaults(self, tensor: str, width: int, dtype: DType,
                 read: Callable[[str, int, int], np.ndarray]) -> dict[int, np.ndarray]:
        """The rows of `tensor` for the tokens some model lacks, in the compute `dtype`'s storage: `read(ref,
        start, stop)` gives a model's elements of it, so converted. Made once per tensor."""
        with self._lock:
            if tensor not in self._defaults:
                made = {}
                for token, refs in self.missing().items():
                    if not refs:
                        made[token] = _narrow(np.zeros(width, np.float32), dtype)
                        continue
                    rows = [read(ref, int(self.rows[ref][token]) * width, (int(self.rows[ref][token]) + 1) * width)
                            for ref in refs]
                    made[token] = rows[0] if len(rows) == 1 else _average(rows, dtype)
                self._defaults[tensor] = made
            return self._defaults[tensor]

    def assemble(self, ref: str, tensor: str, start: int, stop: int, width: int, dtype: DType,
                 read: Callable[[str, int, int], np.ndarray]) -> np.ndarray:
        """Elements [start, stop) of model `ref`'s `tensor` moved to the union's rows (row-major, `width`
        elements a row), in the compute dtype's storage; `read(ref, start, stop)` reads a model's elements of
        the tensor as stored, converted to it."""
        first, last = start // width, (stop - 1) // width + 1
        rows = self.rows[ref][first:last]
        defaults = self.defaults(tensor, width, dtype, read) if (rows < 0).any() else {}
        pieces, row = [], 0
        while row < len(rows):
            source = int(rows[row])
            if source < 0:
                pieces.append(defaults[first + row])
                row += 1
                continue
            run = row + 1
            while run < len(rows) and rows[run] == source + (run - row):
                run += 1
            pieces.append(read(ref, source * width, (source + run - row) * width))
            row = run
        values = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        offset = first * width
        return values[start - offset:stop - offset]

    def write_tokenizer(self, staging: Path, models: dict[str, tuple[Path, str]]) -> list[str]:
        """The vocabulary's tokenizer in `staging` (the base's files there already: a union's new tokens added to
        them, a model's files in their place) and config.json's vocab_size."""
        if self.source == "base":
            written = []
        elif self.source != "union":
            written = copy_tokenizer_files(models[self.source][0], staging)
        else:
            written = self._write_union(staging, models[self.base_ref][0])
        model_config = staging / "config.json"
        if model_config.is_file():
            config = json.loads(model_config.read_text())
            config["vocab_size"] = self.size
            write_synced(model_config, json.dumps(config, indent=2, sort_keys=True) + "\n")
            written.append("config.json")
        return written

    def _write_union(self, staging: Path, base_directory: Path) -> list[str]:
        document = _tokenizer_document(base_directory, self.labels[self.base_ref])
        document["added_tokens"] = list(document.get("added_tokens", [])) + self.new_tokens
        write_synced(staging / "tokenizer.json", json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        written = ["tokenizer.json"]
        config_path = staging / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            if isinstance(config.get("added_tokens_decoder"), dict):
                config["added_tokens_decoder"].update({str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                                       for t in self.new_tokens})
                write_synced(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
                written.append("tokenizer_config.json")
        for name in STALE_VOCABULARY_FILES:
            if (staging / name).exists():
                (staging / name).unlink()
        return written


def _widen(values: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype.name == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    if dtype.name == "F16":
        return values.view(np.float16).astype(np.float32)
    return values.astype(np.float32, copy=False)


def _narrow(values: np.ndarray, dtype: DType) -> np.ndarray:
    """float32 values in `dtype`'s storage, rounded to nearest even as torch rounds them."""
    if dtype.name == "BF16":
        bits = values.view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)
    if dtype.name == "F16":
        return values.astype(np.float16).view(np.uint16)
    return values.astype(np.float32)


def _average(rows: list[np.ndarray], dtype: DType) -> np.ndarray:
    """mergekit's `embed = zeros; embed = embed + row ...; embed /= count` in `dtype` (torch's CPU arithmetic on
    16-bit floats: each operation in float32, rounded back)."""
    total = _narrow(np.zeros(rows[0].shape[0], np.float32), dtype)
    for row in rows:
        total = _narrow(_widen(total, dtype) + _widen(row, dtype), dtype)
    return _narrow(_widen(total, dtype) / np.float32(len(rows)), dtype)


def moved_vocabulary(source: str | None, *, models: dict[str, tuple[Path, str]], base_ref: str,
                     order: list[str], config_base: str | None, slices: bool) -> MovedVocabulary | None:
    """The vocabulary tokenizer_source gives the output where `models`' vocabularies (ref → (directory, label))
    differ, and each model's rows of it; None where they are the same (apply_tokenizer_source checks those).
    `order`: the models that feed the merge in mergekit's order; `config_base`: the config's base_model."""
    if source is None or (source not in ("base", "union") and source not in models):
        return None
    documents = {ref: _tokenizer_document(directory, label) for ref, (directory, label) in models.items()}
    vocabularies = {ref: vocabulary(models[ref][0], models[ref][1], documents[ref]) for ref in models}
    sizes = {ref: _vocab_size(models[ref][0], len(vocab)) for ref, vocab in vocabularies.items()}
    same = all(vocab == vocabularies[base_ref] for vocab in vocabularies.values())
    if same and all(sizes[ref] == len(vocab) for ref, vocab in vocabularies.items()):
        return None
    differing = ", ".join(ref for ref, vocab in vocabularies.items() if vocab != vocabularies[base_ref]) or \
        f"vocab_size {', '.join(str(size) for size in sizes.values())} for {len(vocabularies[base_ref])} tokens"
    if slices:
        raise MergeError(f"config: tokenizer_source: {source} with slices is not supported where the vocabularies "
                         f"differ or do not fill the embeddings ({differing}); write `models` instead of slices")
    if config_base is None and source in ("base", "union") and not same:
        raise MergeError(f"config: tokenizer_source: {source} needs base_model where the vocabularies differ "
                         f"({differing}): mergekit takes the base tokenizer from the first model of an unordered "
                         "set, so its token ids vary from run to run; set base_model")
    labels = {ref: label for ref, (_, label) in models.items()}
    for ref, vocab in vocabularies.items():
        size = sizes[ref]
        beyond = sorted(token for token, index in vocab.items() if index >= size)
        if beyond:
            raise MergeError(f"config: tokenizer_source: {source}: {labels[ref]}'s tokenizer has tokens at ids "
                             f"beyond its vocab_size {size} ({', '.join(map(repr, beyond[:4]))}); mergekit strips or "
                             "drops them, which this engine does not do")
    first = base_ref if source in ("base", "union") else source
    if sorted(vocabularies[first].values()) != list(range(len(vocabularies[first]))):
        raise MergeError(f"config: tokenizer_source: {source}: the ids of {labels[first]}'s tokenizer are not "
                         f"0..{len(vocabularies[first]) - 1}, each once")
    target, new_tokens = dict(vocabularies[first]), []
    if source == "union":
        target, new_tokens = _union(base_ref, order, documents, vocabularies)
    tokens = sorted(target, key=target.get)
    rows = {ref: np.array([vocab.get(token, -1) for token in tokens], dtype=np.int64)
            for ref, vocab in vocabularies.items()}
    return MovedVocabulary(source=source, base_ref=base_ref, preferred=config_base, order=list(dict.fromkeys(order)),
                           size=len(target), new_tokens=new_tokens, rows=rows, labels=labels)


def _union(base_ref: str, order: list[str], documents: dict[str, dict],
           vocabularies: dict[str, dict[str, int]]) -> tuple[dict[str, int], list[dict]]:
    """mergekit's build_union_tokenizer: the base's tokens, then the others' plain tokens, then their added
    tokens; the union's token → id and the tokenizer.json added_tokens entries of its new tokens."""
    visiting = [base_ref] + [ref for ref in dict.fromkeys(order) if ref != base_ref]
    added = {}
    for ref in visiting:
        for entry in sorted(documents[ref].get("added_tokens", []), key=lambda t: t["id"]):
            added.setdefault(entry["content"], entry)
    union = dict(vocabularies[base_ref])
    new_tokens = []
    for ref in visiting:
        for token, _ in sorted(vocabularies[ref].items(), key=lambda item: item[1]):
            if token not in union and token not in added:
                union[token] = len(union)
                new_tokens.append({"id": union[token], "content": token, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": True, "special": False})
    for token, entry in added.items():
        if token not in union:
            union[token] = len(union)
            new_tokens.append({**entry, "id": union[token]})
    return union, new_tokens


def copy_tokenizer_files(directory: Path, staging: Path) -> list[str]:
    """A model's tokenizer files in place of those in `staging`."""
    copied = []
    for name in TOKENIZER_FILES:
        target = staging / name
        if target.exists():
            target.unlink()
        if (directory / name).is_file():
            copy_synced(directory / name, target)
            copied.append(name)
    return copied


def apply_tokenizer_source(source: str | None, *, models: dict[str, tuple[Path, str]], base_ref: str,
                           embedding_rows: int | None, staging: Path | None,
                           moved: MovedVocabulary | None = None) -> list[str]:
    """Checks that `source` (base, union, or a model of `models`: ref → (directory, label)) leaves the
    embeddings as they are, and gives the output in `staging` the chosen model's tokenizer files (None: only
    checks, before the merge); returns the files copied. With `moved` (moved_vocabulary's), writes its tokenizer."""
    if source is None:
        return []
    if moved is not None:
        return [] if staging is None else moved.write_tokenizer(staging, models)
    if source not in ("base", "union") and source not in models:
        raise MergeError(f"config: tokenizer_source: {source!r} is none of the config's models (nor base or union)")
    vocabularies = {ref: vocabulary(directory, label) for ref, (directory, label) in models.items()}
    reference = vocabularies[base_ref]
    differing = [ref for ref, vocab in vocabularies.items() if vocab != reference]
    if differing:
        raise MergeError(f"config: tokenizer_source: {source}: the vocabularies of {', '.join(differing)} differ from "
                         f"{base_ref}'s; mergekit would rebuild the vocabulary and move embedding rows, which this "
                         "engine does not do here")
    if embedding_rows is not None and len(reference) != embedding_rows:
        raise MergeError(f"config: tokenizer_source: {source}: the tokenizer has {len(reference)} tokens but the "
                         f"embeddings {embedding_rows} rows; mergekit would resize them to the tokenizer, which this "
                         "engine does not do: leave tokenizer_source out to keep the embeddings as they are")
    if staging is None or source in ("base", "union", base_ref):
        return []
    return copy_tokenizer_files(models[source][0], staging)
