"""`modelmerge eval`: evaluate one model on data files and report, as `modelmerge merge` does: progress lines
on stderr (the contract's MergeProgress, one step `eval`), the JSON summary as the last stdout line, the report
in `--output`. Exit codes: 0 evaluated, 1 evaluation failed, 2 invalid input (options or data, found before
any model is loaded), 128+signal when interrupted (SIGTERM, SIGINT); a report is written whole or not at all."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from modelmerge import __version__
from modelmerge_engine.errors import MergeError
from modelmerge_engine.evaluation.data import DataFile, load_data_files
from modelmerge_engine.evaluation.options import EvalInputError, EvalOptions
from modelmerge_engine.progress import Progress, Step
from modelmerge_engine.run import Interrupted
from modelmerge_engine.run import _emit_summary as emit_summary  # the merge's summary line and file
from modelmerge_engine.run import _raise_interrupted as raise_interrupted

STEP = "eval"


class EvalProgress(Progress):
    """The merge's progress reporting, counting tokens instead of tensor values."""

    def detail(self) -> str:
        now = time.monotonic()
        rate = self.step_done / max(now - self.step_started, 1e-9)
        return f"{self.step_done}/{self.step.work} tokens {rate:.1f} tokens/s {now - self.started:.1f}s"


def evaluate(model_ref: str, files: Sequence[DataFile], options: EvalOptions, *,
             progress: Progress | None = None, field: str = "model") -> dict:
    """The report of `model_ref` on `files` (from load_data_files; options.limit applies to each); `field`
    names the model in errors. Raises MergeError when the model cannot be evaluated."""
    from modelmerge_engine.evaluation.encode import encode_files
    from modelmerge_engine.evaluation.loading import load_weights, open_model, require_device
    from modelmerge_engine.evaluation.metric import score_records, uses_full_forward
    from modelmerge_engine.evaluation.report import file_results, overall_result

    progress = progress or EvalProgress("none")
    started = time.monotonic()
    files = [data.first(options.limit) for data in files]
    device = require_device(use_gpu=options.use_gpu)
    source = open_model(model_ref, field=field)
    max_length = source.max_length(options.max_length)
    records = encode_files(source.tokenizer, files, max_length=max_length)
    if not any(r.answer_tokens for r in records):
        raise MergeError(f"data: no answer tokens are left within max_length {max_length} in any data file "
                         f"(the prompts of all {len(records)} record(s) fill it)")
    model = load_weights(source, dtype=options.compute_dtype, device=device)
    processed = sum(len(r.input_ids) for r in records if r.answer_tokens)
    progress.plan([Step(STEP, processed)])
    progress.message(f"evaluating {model_ref} on {len(records)} record(s) of {len(files)} file(s) on {device} "
                     f"({options.compute_dtype}, max_length {max_length}, batch size {options.batch_size})")
    clock = time.monotonic()
    progress.begin_step(STEP)
    scores = score_records(model, records, batch_size=options.batch_size, on_batch=progress.advance)
    progress.end_step()
    seconds = time.monotonic() - clock
    results = file_results(files, records, scores)
    return {
        "metric": "cross_entropy",
        "engine_version": __version__,
        "model": source.resolved.describe(),
        "device": device,
        "dtype": options.compute_dtype,
        "max_length": max_length,
        "requested_max_length": options.max_length,
        "batch_size": options.batch_size,
        "limit": options.limit,
        "full_forward": uses_full_forward(model),
        "files": results,
        "overall": overall_result(results),
        "timings": {"total": round(time.monotonic() - started, 3), "eval": round(seconds, 3)},
        "tokens_per_second": round(processed / seconds, 1) if seconds > 0 else None,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run_eval(model_ref: str, data_paths: Sequence[str], options: EvalOptions, *, output: str | None = None,
             summary_file: str | None = None, progress: str = "auto") -> int:
    started = time.monotonic()

    def finish(summary: dict, code: int) -> int:
        summary["seconds"] = round(time.monotonic() - started, 3)
        emit_summary(summary, summary_file)
        return code

    try:
        output_path = _output_path(output)
        files = load_data_files(data_paths, limit=options.limit)
    except EvalInputError as exc:
        return finish({"status": "failed", "error": str(exc)}, 2)
    previous = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        report = evaluate(model_ref, files, options, progress=EvalProgress(progress))
        if output_path is not None:
            _write_atomically(output_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    except MergeError as exc:
        return finish({"status": "failed", "error": str(exc)}, 1)
    except Interrupted as exc:
        return finish({"status": "failed", "error": f"interrupted by {exc}"}, 128 + exc.signum)
    except Exception as exc:  # a bug: still reported the way callers read failures
        traceback.print_exc()
        return finish({"status": "failed", "error": f"internal error: {type(exc).__name__}: {exc}"}, 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    overall = report["overall"]
    summary = {"status": "succeeded", "model": model_ref, "ce": overall["ce"], "ppl": overall["ppl"],
               "mean_ce": overall["mean_ce"], "tokens": overall["tokens"], "records": overall["records"],
               "answer_cut_away": overall["answer_cut_away"], "dtype": report["dtype"], "device": report["device"],
               "files": {f["name"]: f["ce"] for f in report["files"]},
               "output": str(output_path) if output_path else None}
    return finish(summary, 0)


def _output_path(output: str | None) -> Path | None:
    if output is None:
        return None
    path = Path(output).expanduser()
    if path.is_dir():
        raise EvalInputError(f"output: {output} is a directory; give the report's file name")
    if not path.parent.is_dir():
        raise EvalInputError(f"output: directory {path.parent} does not exist")
    return path


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise MergeError(f"output: cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
