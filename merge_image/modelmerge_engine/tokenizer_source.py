"""A mergekit config's `tokenizer_source`: which model's tokenizer the output carries.

`base` (and no tokenizer_source) keeps the base model's tokenizer files, which the output has already; a model
named in the config gives its own tokenizer files instead. mergekit builds a new vocabulary for either (and for
`union`, the union of every model's) and permutes the embedding rows to it; where all the models' vocabularies
are the same (the same tokens at the same ids, as many as the embedding rows) that permutation is the identity and
the merge needs nothing else, so all three are accepted then. Where they differ, rows would have to move or be
made: refused with a message naming tokenizer_source and the models whose vocabularies differ."""

from __future__ import annotations

import json
from pathlib import Path

from modelmerge_engine.errors import MergeError
from modelmerge_engine.output import copy_synced

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def vocabulary(directory: Path, label: str) -> dict[str, int]:
    """Token → id of a model's tokenizer (tokenizer.json's model vocabulary and added tokens)."""
    try:
        document = json.loads((directory / "tokenizer.json").read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"config: tokenizer_source needs every model's tokenizer.json to compare vocabularies, "
                         f"and {label} has none readable ({exc})") from None
    vocab = document.get("model", {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [token, score] pairs in id order
        vocab = {entry[0]: index for index, entry in enumerate(vocab)}
    if not isinstance(vocab, dict):
        raise MergeError(f"config: tokenizer_source: cannot read the vocabulary of {label}'s tokenizer.json")
    vocab = dict(vocab)
    vocab.update({token["content"]: token["id"] for token in document.get("added_tokens", [])})
    return vocab


def apply_tokenizer_source(source: str | None, *, models: dict[str, tuple[Path, str]], base_ref: str,
                           embedding_rows: int | None, staging: Path | None) -> list[str]:
    """Checks that `source` (base, union, or a model of `models`: ref → (directory, label)) leaves the
    embeddings as they are, and gives the output in `staging` the chosen model's tokenizer files (None: only
    checks, before the merge); returns the files copied."""
    if source is None:
        return []
    if source not in ("base", "union") and source not in models:
        raise MergeError(f"config: tokenizer_source: {source!r} is none of the config's models (nor base or union)")
    vocabularies = {ref: vocabulary(directory, label) for ref, (directory, label) in models.items()}
    reference = vocabularies[base_ref]
    differing = [ref for ref, vocab in vocabularies.items() if vocab != reference]
    if differing:
        raise MergeError(f"config: tokenizer_source: {source}: the vocabularies of {', '.join(differing)} differ from "
                         f"{base_ref}'s; mergekit would rebuild the vocabulary and move embedding rows, which this "
                         "engine does not do: merge models that share one tokenizer")
    if embedding_rows is not None and len(reference) != embedding_rows:
        raise MergeError(f"config: tokenizer_source: {source}: the tokenizer has {len(reference)} tokens but the "
                         f"embeddings {embedding_rows} rows; mergekit would resize them to the tokenizer, which this "
                         "engine does not do: leave tokenizer_source out to keep the embeddings as they are")
    if staging is None or source in ("base", "union", base_ref):
        return []
    directory = models[source][0]
    copied = []
    for name in TOKENIZER_FILES:
        target = staging / name
        if target.exists():
            target.unlink()
        if (directory / name).is_file():
            copy_synced(directory / name, target)
            copied.append(name)
    return copied
