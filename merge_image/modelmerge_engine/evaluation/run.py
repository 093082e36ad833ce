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
from pathlib import Path

from modelmerge_engine.errors import MergeError
from modelmerge_engine.evaluation.options import EvalInputError, EvalOptions
from modelmerge_engine.evaluation.scoring import EvalProgress, evaluate
from modelmerge_engine.evaluation.sources import load_data, resolve_data
from modelmerge_engine.run import Interrupted
from modelmerge_engine.run import _emit_summary as emit_summary  # the merge's summary line and file
from modelmerge_engine.run import _raise_interrupted as raise_interrupted


def run_eval(model_ref: str, data_paths: Sequence[str], options: EvalOptions, *, output: str | None = None,
             summary_file: str | None = None, progress: str = "auto") -> int:
    started = time.monotonic()

    def finish(summary: dict, code: int) -> int:
        summary["seconds"] = round(time.monotonic() - started, 3)
        emit_summary(summary, summary_file)
        return code

    try:
        output_path = _output_path(output)
        files = load_data(resolve_data(data_paths), limit=options.limit)
    except EvalInputError as exc:
        return finish({"status": "failed", "error": str(exc)}, 2)
    except MergeError as exc:  # a dataset reference that cannot be fetched
        return finish({"status": "failed", "error": str(exc)}, 1)
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
