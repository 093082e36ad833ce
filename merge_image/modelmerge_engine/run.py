"""`modelmerge merge`: resolve inputs, stream the merge into a staging directory, evaluate it when the request
asks (evaluation/after_merge.py), publish it, report.

The last line on stdout is a JSON summary (also written to `--summary-file`, which the operator points at
the container's termination-message path), at most MAX_SUMMARY_BYTES. Exit codes: 0 merged (also when its
evaluation failed: the summary's evaluation says so), 1 merge failed, 2 invalid request (invalid evaluation
data included), 143/130 interrupted (SIGTERM/SIGINT) — in every failure case nothing is left in the output
location."""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from modelmerge import __version__
from modelmerge.contract import MAX_SUMMARY_BYTES, MergeRequest, shard_size_bytes
from modelmerge_engine.allocator import keep_freed_memory
from modelmerge_engine.early_reads import ask_shared, budget_bytes, memory_headroom
from modelmerge_engine.errors import MergeError
from modelmerge_engine.evaluation import after_merge
from modelmerge_engine.evaluation.options import EvalInputError
from modelmerge_engine.evaluation.scoring import EvalProgress
from modelmerge_engine.output import OutputDir, copy_aux_files, disk_error, model_card, write_synced
from modelmerge_engine.progress import Progress
from modelmerge_engine.work_cache import WorkCache


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def run_merge(request: MergeRequest, *, overwrite: bool = False, summary_file: str | None = None,
              progress: str = "auto", work_cache: Path | None = None) -> int:
    """`work_cache`: the directory of the work cache shared with other merges (work_cache.py), if any."""
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    started = time.monotonic()
    keep_freed_memory()  # each range's buffers reuse the pages the range before freed
    output = None
    try:
        evaluation = after_merge.check(request) if request.evaluation else None
        output = OutputDir(request.output_dir, overwrite=overwrite)
        reporter = EvalProgress(progress) if evaluation else Progress(progress)
        cache = WorkCache(work_cache, reporter.message) if work_cache is not None else None
        summary = _merge(request, output, reporter, evaluation, cache)
        code = 0
    except EvalInputError as exc:
        summary, code = {"status": "failed", "error": str(exc)}, 2
    except MergeError as exc:
        summary, code = {"status": "failed", "error": str(exc)}, 1
    except Interrupted as exc:
        summary, code = {"status": "failed", "error": f"interrupted by {exc}"}, 128 + exc.signum
    except Exception as exc:  # a bug: still report it the way the operator and the API read failures
        traceback.print_exc()
        summary, code = {"status": "failed", "error": f"internal error: {type(exc).__name__}: {exc}"}, 1
    finally:
        if output is not None:
            output.discard()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary.setdefault("method", request.merge_method)
    summary["seconds"] = round(time.monotonic() - started, 3)
    _emit_summary(summary, summary_file)
    return code


def _merge(request: MergeRequest, output: OutputDir, progress: Progress,
           evaluation: after_merge.CheckedData | None, cache: WorkCache | None) -> dict:
    from modelmerge_engine.refs import resolve
    from modelmerge_engine.safetensors_io import SafetensorsModel, ShardedWriter

    timings: dict[str, float] = {}
    clock = time.monotonic()
    base_ref = resolve(request.base_model, "base_model")
    refs = [resolve(ref, f"models_to_merge[{i}]") for i, ref in enumerate(request.models_to_merge)]
    base = SafetensorsModel(base_ref.path, f"base_model {request.base_model}")
    finetunes = [SafetensorsModel(r.path, f"models_to_merge[{i}] {r.ref}") for i, r in enumerate(refs)]
    early_budget = budget_bytes(memory_headroom())
    ask_shared([base, *finetunes], early_budget // 2)  # the disk reads while the engine's imports load
    timings["resolve"] = time.monotonic() - clock
    plan = None
    if evaluation is not None:  # the data encoded for each model to evaluate, before anything is merged
        clock = time.monotonic()
        plan = after_merge.prepare(evaluation, base_ref, refs)
        timings["evaluation_prepare"] = time.monotonic() - clock
    clock = time.monotonic()
    from modelmerge_engine.engine import StreamingMerge

    merge = StreamingMerge(request, base, finetunes, progress, work_cache=cache, early_read_budget=early_budget)
    timings["resolve"] += time.monotonic() - clock
    if plan is not None:
        after_merge.plan_progress(progress, plan, parameters=sum(p.numel for p in merge.plans))
    progress.message(f"merging {len(finetunes)} model(s) into {request.base_model} with "
                     f"{request.merge_method} on {merge.device} ({request.dtype}, {merge.stats['kernels']}, "
                     f"{merge.pool.workers} worker(s))")

    staging = output.create_staging()
    if output.removed_stale:
        progress.message(f"removed what killed merges left in {output.final.parent}: "
                         f"{', '.join(output.removed_stale)}")
    writer = ShardedWriter(staging, merge.output_tensors(), shard_size_bytes(request.max_shard_size))
    clock = time.monotonic()
    try:
        merge.run(writer)
        files = writer.finish()
        files += copy_aux_files(base_ref.path, staging, request.dtype)
        written = merge.finish_output(staging)  # a mergekit config's layer count, per-layer lists, tokenizer
        files = [name for name in files if (staging / name).exists()] + [n for n in written if n not in files]
        timings["merge"] = time.monotonic() - clock
    except OSError as exc:
        writer.abort()
        raise disk_error(exc, staging) from None
    finally:
        base.close()
        for model in finetunes:
            model.close()
    section = None
    if plan is not None:
        clock = time.monotonic()
        section = after_merge.evaluate_merge(plan, staging, output.final, progress, work_cache=cache)
        timings["evaluation"] = time.monotonic() - clock
    report = _report(request, base_ref, refs, merge, files, timings)
    if cache is not None:
        report["work_cache"] = {"directory": str(cache.directory), "reused": cache.reused_work}
    if section is not None:
        report["evaluation"] = section
    try:
        write_synced(staging / "merge_report.json", json.dumps(report, indent=2) + "\n")
        write_synced(staging / "README.md", model_card(report))
    except OSError as exc:
        raise disk_error(exc, staging) from None
    summary = {"status": "succeeded", "output_dir": str(output.final), "tensors": len(merge.plans),
               "files": sorted(files + ["README.md", "merge_report.json"])}
    if section is not None:
        summary["evaluation"] = after_merge.merge_evaluation(section).model_dump(mode="json", exclude_none=True)
    output.commit()
    return summary


def _report(request, base_ref, refs, merge, files, timings) -> dict:
    return {
        "engine": "modelmerge",
        "engine_version": __version__,
        "method": request.merge_method,
        "parameters": request.merge_params(),
        **({"mergekit_config": request.config.model_dump(mode="json", exclude_none=True)} if request.config else {}),
        "inputs": {"base_model": base_ref.describe(), "models_to_merge": [r.describe() for r in refs]},
        "dtype": request.dtype,
        "device": merge.device,
        "tensors": len(merge.plans),
        "merged_tensors": sum(p.merged for p in merge.plans),
        "statistics": merge.stats,
        "files": sorted(files),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _emit_summary(summary: dict, summary_file: str | None) -> None:
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr, flush=True)
    line = _fitted_summary_line(summary)
    print(line, flush=True)
    if summary_file:
        try:
            with open(summary_file, "w", encoding="utf-8") as handle:
                handle.write(line)
        except OSError as exc:
            print(f"warning: cannot write summary file {summary_file}: {exc.strerror}", file=sys.stderr)


def _fitted_summary_line(summary: dict) -> str:
    """The summary as one JSON line of at most MAX_SUMMARY_BYTES (what a termination message holds): when it
    is longer, the list of output files goes first, then the baselines' per-file scores, then the merged
    model's, then the error is cut to 2000 characters; the overall scores always stay."""
    evaluation = summary.get("evaluation") or {}
    shorten = [
        lambda: summary.pop("files", None),
        lambda: [baseline.pop("files", None) for baseline in evaluation.get("baselines", [])],
        lambda: evaluation.pop("files", None),
        lambda: summary.update(error=(summary.get("error") or "")[:2000] or None),
    ]
    line = json.dumps(summary)
    for step in shorten:
        if len(line.encode()) <= MAX_SUMMARY_BYTES:
            break
        step()
        line = json.dumps(summary)
    return line
