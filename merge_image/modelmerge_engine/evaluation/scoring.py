"""Evaluating one model: `prepare_model` (config, tokenizer, the data encoded; no weights yet) and `score`
(the weights loaded, the records run, the report), or both at once with `evaluate`. `modelmerge eval` runs one
of them, a merge with `evaluation` one per model it evaluates (evaluation/after_merge.py)."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from modelmerge import __version__
from modelmerge_engine.errors import MergeError
from modelmerge_engine.evaluation.data import DataFile
from modelmerge_engine.evaluation.options import EvalOptions
from modelmerge_engine.progress import Progress, Step
from modelmerge_engine.refs import ResolvedModel

STEP = "eval"  # the step of `modelmerge eval`; the steps of a merge's evaluation start with it too


class EvalProgress(Progress):
    """The merge's progress reporting, counting tokens in the evaluation steps (those named eval...).

    When the evaluation follows a merge, the merge plans its own steps, and the evaluation's (`follow_with`)
    are appended to them: one token weighs `token_weight` units of the merge's work (values), so the overall
    percent weighs the steps by the time they are expected to take."""

    def __init__(self, mode: str = "auto"):
        super().__init__(mode)
        self.eval_steps: tuple[tuple[str, int], ...] = ()  # (name, tokens) of the steps after the merge's
        self.token_weight = 1

    def follow_with(self, eval_steps: Sequence[tuple[str, int]], *, token_weight: int) -> None:
        """The evaluation steps (name, tokens) to plan after the merge's when the merge plans its own."""
        self.eval_steps, self.token_weight = tuple(eval_steps), token_weight

    def plan(self, steps: Sequence[Step]) -> None:
        super().plan([*steps, *(Step(name, tokens * self.token_weight) for name, tokens in self.eval_steps)])

    def advance_tokens(self, tokens: int) -> None:
        self.advance(tokens * self.token_weight)

    def finish_remaining(self) -> None:
        """Ends the current step and passes through the planned steps left (an evaluation that failed, whose
        later models are not evaluated): the overall percent reaches 100 without going down."""
        if self.index >= 0:
            self.end_step()
        for step in self.steps[self.ended:]:
            self.begin_step(step.name)
            self.end_step()

    def detail(self) -> str:
        if not self.step.name.startswith(STEP):
            return super().detail()
        now = time.monotonic()
        tokens, planned = self.step_done // self.token_weight, self.step.work // self.token_weight
        rate = tokens / max(now - self.step_started, 1e-9)
        return f"{tokens}/{planned} tokens {rate:.1f} tokens/s {now - self.started:.1f}s"


@dataclass
class PreparedModel:
    """A model ready to be scored: its config and tokenizer read, the data encoded with them."""

    source: object  # loading.ModelSource
    max_length: int
    records: list  # encode.EncodedRecord, in file order

    @property
    def processed_tokens(self) -> int:
        """Tokens that go through the model: those of the records with an answer token left."""
        return sum(len(r.input_ids) for r in self.records if r.answer_tokens)


def prepare_model(model: str | ResolvedModel, files: Sequence[DataFile], options: EvalOptions, *,
                  field: str = "model") -> PreparedModel:
    """`files` (from load_data_files, already cut to options.limit) encoded for `model` (a reference, or one
    resolved already); `field` names the model in errors. Raises MergeError when the model has no usable
    config or tokenizer, or when no answer token is left within max_length."""
    from modelmerge_engine.evaluation.encode import encode_files
    from modelmerge_engine.evaluation.loading import open_model

    source = open_model(model, field=field)
    max_length = source.max_length(options.max_length)
    records = encode_files(source.tokenizer, files, max_length=max_length)
    if not any(r.answer_tokens for r in records):
        raise MergeError(f"data: no answer tokens are left within max_length {max_length} in any data file "
                         f"(the prompts of all {len(records)} record(s) fill it)")
    return PreparedModel(source, max_length, records)


def score(prepared: PreparedModel, files: Sequence[DataFile], options: EvalOptions, *, device: str,
          progress: EvalProgress, step: str = STEP) -> dict:
    """The report of the prepared model on `files`: its weights loaded on `device` in the options' dtype, the
    records run as the planned step `step` of `progress`, the weights freed afterwards."""
    from modelmerge_engine.evaluation.loading import load_weights
    from modelmerge_engine.evaluation.metric import score_records, uses_full_forward
    from modelmerge_engine.evaluation.report import file_results, overall_result

    started = time.monotonic()
    source = prepared.source
    model = load_weights(source, dtype=options.compute_dtype, device=device)
    try:
        progress.message(f"evaluating {source.resolved.ref} on {len(prepared.records)} record(s) of {len(files)} "
                         f"file(s) on {device} ({options.compute_dtype}, max_length {prepared.max_length}, batch "
                         f"size {options.batch_size})")
        clock = time.monotonic()
        progress.begin_step(step)
        scores = score_records(model, prepared.records, batch_size=options.batch_size,
                               on_batch=progress.advance_tokens)
        progress.end_step()
        seconds = time.monotonic() - clock
        full_forward = uses_full_forward(model)
    finally:
        del model
        _free_device_memory(device)
    results = file_results(files, prepared.records, scores)
    return {
        "metric": "cross_entropy",
        "engine_version": __version__,
        "model": source.resolved.describe(),
        "device": device,
        "dtype": options.compute_dtype,
        "max_length": prepared.max_length,
        "requested_max_length": options.max_length,
        "batch_size": options.batch_size,
        "limit": options.limit,
        "full_forward": full_forward,
        "files": results,
        "overall": overall_result(results),
        "timings": {"total": round(time.monotonic() - started, 3), "eval": round(seconds, 3)},
        "tokens_per_second": round(prepared.processed_tokens / seconds, 1) if seconds > 0 else None,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def evaluate(model_ref: str, files: Sequence[DataFile], options: EvalOptions, *,
             progress: EvalProgress | None = None, field: str = "model") -> dict:
    """The report of `model_ref` on `files` (from load_data_files; options.limit applies to each), as one
    planned step. Raises MergeError when the model cannot be evaluated."""
    from modelmerge_engine.evaluation.loading import require_device

    progress = progress or EvalProgress("none")
    files = [data.first(options.limit) for data in files]
    device = require_device(use_gpu=options.use_gpu)
    prepared = prepare_model(model_ref, files, options, field=field)
    progress.plan([Step(STEP, prepared.processed_tokens)])
    return score(prepared, files, options, device=device, progress=progress)


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
