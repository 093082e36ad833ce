"""Records into token ids as merging-eval's scripts/eval.py makes them: the chat template renders system "You
are a helpful assistant." / user (prompt) / assistant (answer) as text, which the tokenizer encodes as it is
called by default (its own special tokens added, truncated to max_length on its truncation side); the prompt
prefix (the same messages without the assistant turn, with the generation prompt) is encoded the same way
and its length is the number of leading positions left out of the loss. No padding: batches are padded later,
to their longest sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from modelmerge_engine.errors import MergeError
from modelmerge_engine.evaluation.data import DataFile, EvalRecord

SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class EncodedRecord:
    file_index: int  # position of the record's file in the evaluated files
    record_index: int  # the record's position in its file
    input_ids: tuple[int, ...]
    answer_start: int  # positions before it are the prompt (not scored)
    answer_shortened: bool  # max_length cut the end of the sequence off

    @property
    def answer_tokens(self) -> int:
        """Tokens scored: a token at position t is predicted from the positions before it, so position 0 is
        never scored (it is always part of the prompt)."""
        return max(0, len(self.input_ids) - max(self.answer_start, 1))


def render(tokenizer, record: EvalRecord, *, where: str) -> tuple[str, str]:
    """(prompt + answer, prompt with the generation prompt) as the chat template writes them."""
    prompt_messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": record.prompt}]
    try:
        prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*prompt_messages, {"role": "assistant", "content": record.answer}], tokenize=False)
    except Exception as exc:  # the template's own error (jinja raise_exception, a role it refuses)
        raise MergeError(f"{where}: the model's chat template cannot render it: {exc}") from None
    return full, prompt


def encode_files(tokenizer, files: Sequence[DataFile], *, max_length: int) -> list[EncodedRecord]:
    encoded = []
    for file_index, data in enumerate(files):
        rendered = [render(tokenizer, record, where=f"data file {data.path}: record {record.index}")
                    for record in data.records]
        full_ids = _token_ids(tokenizer, [full for full, _ in rendered], max_length=max_length)
        prompt_ids = _token_ids(tokenizer, [prompt for _, prompt in rendered], max_length=max_length)
        at_limit = [i for i, ids in enumerate(full_ids) if len(ids) >= max_length]
        untruncated = _token_ids(tokenizer, [rendered[i][0] for i in at_limit], max_length=None)
        shortened = {i for i, ids in zip(at_limit, untruncated, strict=True) if len(ids) > max_length}
        encoded += [EncodedRecord(file_index=file_index, record_index=record.index, input_ids=tuple(ids),
                                  answer_start=len(prompt), answer_shortened=i in shortened)
                    for i, (record, ids, prompt) in enumerate(zip(data.records, full_ids, prompt_ids, strict=True))]
    return encoded


def _token_ids(tokenizer, texts: list[str], *, max_length: int | None) -> list[list[int]]:
    if not texts:
        return []
    truncation = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    return list(tokenizer(texts, verbose=False, **truncation)["input_ids"])
