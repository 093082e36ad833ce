"""Evaluation as part of a merge request (`MergeRequest.evaluation`): the merged model, and with `baselines` the
base and each fine-tune, scored on the same data in the merge's process, GPU when the request has use_gpu.

Everything that can be checked before the merge is: torch and transformers present and the device usable
(`check`), the data read and validated (`check`: invalid data is an EvalInputError, exit 2), the inputs'
configs and tokenizers loaded and the data encoded with them (`prepare`), so the progress plan holds the
evaluation steps from the start. The merged model is evaluated in the staging directory once it is complete,
before it is put in place, so its merge_report.json and model card carry the results and a SIGTERM during the
evaluation leaves nothing, as during the merge. An evaluation that fails (a model that cannot be loaded,
CUDA out of memory) does not fail the merge: `evaluate_merge` returns the section with state Failed and its
message, and the merged model is published with it.

Nothing here imports torch at import time: the CPU merge image imports this module with every merge."""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelmerge.contract import (
    FileEvaluation,
    InputEvaluation,
    MergeEvaluation,
    MergeRequest,
    OverallEvaluation,
)
from modelmerge_engine.errors import MergeError
from modelmerge_engine.evaluation.data import DataFile
from modelmerge_engine.evaluation.options import EvalOptions
from modelmerge_engine.evaluation.scoring import STEP, EvalProgress, PreparedModel, prepare_model, score
from modelmerge_engine.evaluation.sources import DataSource, load_data, resolve_data
from modelmerge_engine.refs import ResolvedModel
from modelmerge_engine.work_cache import WorkCache, evaluation_key

EVALUATION_ENTRY = "evaluation"  # a baseline's report in the work cache
MESSAGE_LIMIT = 2000  # MergeEvaluation.message's max_length
# The weight of one evaluated token in the overall percent, in the merge's work units (values), per parameter
# of the model: only the weights of the steps, so a rough ratio of times. The merge step runs at about 2e8 values/s
# (bench/results/gpu_check-h200.json: 0.5B, 2 fine-tunes: 2.5-5 s on 16 CPU cores, 5-8 s with use_gpu on an
# H200); a forward pass costs about 2 FLOPs per parameter and token, taken as ~1e12 FLOP/s effective on CPU cores
# and ~2e13 on a GPU (assumed, not measured).
VALUES_PER_TOKEN_PARAMETER = {"cpu": 1 / 2500, "cuda": 1 / 50000}


@dataclass(frozen=True)
class CheckedData:
    """What `check` found before the merge: the options, the device and the data, read and validated."""

    options: EvalOptions
    baselines: bool
    device: str
    sources: list[DataSource]
    files: list[DataFile]


@dataclass
class Subject:
    """One model the evaluation scores, as a planned progress step."""

    step: str
    role: str  # merged | base | finetuned
    ref: str  # the request's reference (output_dir for the merged model)
    field: str  # the request field, for errors
    prepared: PreparedModel | None = None  # baselines: before the merge; the merged model: once it is written


@dataclass
class EvaluationPlan:
    checked: CheckedData
    subjects: list[Subject]  # the merged model first, then the base and each fine-tune
    merged_tokens: int  # the merged model's tokens: the base's (the merged model has the base's tokenizer)


def check(request: MergeRequest) -> CheckedData:
    """Before anything is written: the evaluation can run here, and its data is valid (EvalInputError names
    the file and the record; MergeError: torch or the device is missing, a dataset cannot be fetched)."""
    from modelmerge_engine.evaluation.loading import require_device

    wanted = request.evaluation
    options = EvalOptions(max_length=wanted.max_length, batch_size=wanted.batch_size, limit=wanted.limit,
                          use_gpu=request.use_gpu, dtype=wanted.dtype)
    device = require_device(use_gpu=request.use_gpu)
    sources = resolve_data(wanted.data)
    files = load_data(sources, limit=options.limit)
    return CheckedData(options, wanted.baselines, device, sources, files)


def prepare(checked: CheckedData, base: ResolvedModel, finetunes: Sequence[ResolvedModel]) -> EvaluationPlan:
    """The models to evaluate with the data encoded for each (the merged model's tokens are the base's: its
    tokenizer files are the base's), before the merge starts."""
    files, options = checked.files, checked.options
    base_prepared = prepare_model(base, files, options, field="base_model")
    subjects = [Subject(STEP, "merged", "", "output_dir")]
    if checked.baselines:
        subjects.append(Subject(f"{STEP}-base", "base", base.ref, "base_model", base_prepared))
        subjects += [Subject(f"{STEP}-finetune-{i + 1}", "finetuned", model.ref, f"models_to_merge[{i}]",
                             prepare_model(model, files, options, field=f"models_to_merge[{i}]"))
                     for i, model in enumerate(finetunes)]
    return EvaluationPlan(checked, subjects, base_prepared.processed_tokens)


def plan_progress(progress: EvalProgress, plan: EvaluationPlan, *, parameters: int) -> None:
    """Appends the evaluation steps to the merge's progress plan, each token weighted for a model of
    `parameters` parameters on the evaluation's device."""
    weight = max(1, round(parameters * VALUES_PER_TOKEN_PARAMETER[plan.checked.device]))
    steps = [(s.step, s.prepared.processed_tokens if s.prepared else plan.merged_tokens) for s in plan.subjects]
    progress.follow_with(steps, token_weight=weight)


def evaluate_merge(plan: EvaluationPlan, staging: Path, output_dir: Path, progress: EvalProgress, *,
                   work_cache: WorkCache | None = None) -> dict:
    """The `evaluation` section of merge_report.json: the merged model in `staging` (reported as `output_dir`)
    and the baselines, each model's full report (taken from `work_cache` when an earlier merge evaluated the
    same model on the same data with the same options). Failures are reported in the section, never raised
    (but an interrupt is)."""
    checked = plan.checked
    section = {
        "state": "Succeeded",
        "message": None,
        "metric": "cross_entropy",
        "device": checked.device,
        "dtype": checked.options.compute_dtype,
        "options": {"max_length": checked.options.max_length, "batch_size": checked.options.batch_size,
                    "limit": checked.options.limit, "baselines": checked.baselines},
        "data": [source.describe() for source in checked.sources],
        "merged": None,
        "baselines": [],
    }
    started = time.monotonic()
    merged = plan.subjects[0]
    merged.ref = str(output_dir)
    current = merged
    try:
        merged.prepared = prepare_model(ResolvedModel(str(output_dir), staging, "local"), checked.files,
                                        checked.options, field="output_dir")
        for subject in plan.subjects:
            current = subject
            report = _score(subject, checked, progress, None if subject is merged else work_cache)
            if subject is merged:
                report["model"]["path"] = str(output_dir)
                section["merged"] = report
            else:
                section["baselines"].append({"model": subject.ref, "role": subject.role, "report": report})
    except Exception as exc:  # the merge succeeded: the evaluation's failure is reported, the model kept
        if not isinstance(exc, MergeError):
            traceback.print_exc()
        what = "the merged model" if current is merged else f"{current.field} {current.ref}"
        reason = str(exc) if isinstance(exc, MergeError) else f"{type(exc).__name__}: {exc}"
        section["state"] = "Failed"
        section["message"] = f"evaluating {what} failed: {reason}"[:MESSAGE_LIMIT]
        progress.message(f"evaluation failed, the merged model is kept: {section['message']}")
        progress.finish_remaining()
    section["seconds"] = round(time.monotonic() - started, 3)
    return section


def _score(subject: Subject, checked: CheckedData, progress: EvalProgress, work_cache: WorkCache | None) -> dict:
    """One subject's report, reused from `work_cache` or scored (and then stored in it)."""
    if work_cache is None:
        return score(subject.prepared, checked.files, checked.options, device=checked.device, progress=progress,
                     step=subject.step)
    key = evaluation_key(subject.prepared, checked.files, checked.options, device=checked.device,
                         role=subject.role)
    report = work_cache.load(EVALUATION_ENTRY, key, _parse_report)
    if report is not None:
        progress.begin_step(subject.step)
        progress.end_step()
        work_cache.reused(f"the evaluation of {subject.field} {subject.ref}")
        return report
    report = score(subject.prepared, checked.files, checked.options, device=checked.device, progress=progress,
                   step=subject.step)
    work_cache.store(EVALUATION_ENTRY, key, report)
    return report


def _parse_report(value: dict) -> dict:
    if not isinstance(value["overall"], dict) or not isinstance(value["files"], list):
        raise ValueError("not an evaluation report")
    return value


def merge_evaluation(section: dict) -> MergeEvaluation:
    """The section as the contract's summary of it (the engine's summary line, the ModelMerge status)."""
    merged = section["merged"]
    overall = files = None
    if merged is not None:
        whole = merged["overall"]
        overall = OverallEvaluation(ce=whole["ce"], ppl=whole["ppl"], tokens=whole["tokens"],
                                    records=whole["records"], meanCe=whole["mean_ce"])
        files = [FileEvaluation(name=f["name"], ce=f["ce"], ppl=f["ppl"], tokens=f["tokens"], records=f["records"],
                                answerCutAway=len(f["answer_cut_away"])) for f in merged["files"]]
    baselines = [InputEvaluation(model=b["model"], role=b["role"], ce=b["report"]["overall"]["ce"],
                                 ppl=b["report"]["overall"]["ppl"],
                                 files={f["name"]: f["ce"] for f in b["report"]["files"]})
                 for b in section["baselines"]]
    return MergeEvaluation(state=section["state"], message=section["message"], dtype=section["dtype"],
                           device=section["device"], overall=overall, files=files or [], baselines=baselines)
