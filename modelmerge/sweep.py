"""The ModelMergeSweep contract: a search over merge parameters whose trials are ModelMerges.

A sweep is a `template` (a ModelMerge spec whose `evaluation` is required), a `space` (per merge field: a list
`{values: [...]}` (outside the CRD a bare list `[...]` too), a range `{start, stop, step}` or for random sampling
`{min, max, log}`), a `strategy` (`grid` runs every point, `random` draws `trials` points with `seed`),
`parallelism`, an `objective` (the overall cross-entropy, or one data file's), `keep` and optional
`earlyStopping`. `merge_method` may be swept too: each trial of a method varies only the parameters that method
takes (its grid is the product of those dimensions alone).

`sweep_trials(spec)` expands a sweep into its trials, deterministically: grid order is the canonical order of the
dimensions (`merge_method` first, then the parameters in the method registry's order; the last varies fastest),
and random trial i draws from a generator keyed by (seed, i) only, so raising `trials` extends the same sequence.
`trial_name(sweep, i)` names trial i's ModelMerge. The rules that decide a sweep from its trials (best_trial,
stopped_early, trial_counts, ended_sweep) are here, so the operator and the local backend decide alike. Like the
contract it imports pydantic only.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from modelmerge.contract import (
    METHODS,
    Condition,
    MergeEvaluation,
    MergeMethod,
    MergeRequest,
    ModelMergeSpec,
    VolumeEvaluationRequest,
    describe_validation_error,
    format_validation_error,
)

SWEEP_KIND = "ModelMergeSweep"
SWEEP_PLURAL = "modelmergesweeps"
SWEEP_SHORT_NAME = "mms"

MAX_TRIALS = 1000  # trials of one sweep (a grid's size, or random's `trials`)
MAX_VALUES = 256  # values of one dimension
MAX_PARALLELISM = 256
WORK_CACHE_FOLDER = ".work-cache"  # see work_cache_folder
MAX_NAME = 63  # a trial's ModelMerge name ends up in label values
RANGE_TOLERANCE = 1e-9  # (stop - start) / step within this of an integer counts stop in
RANGE_DIGITS = 12  # range points are rounded to this many decimals (0.1 + 2 * 0.1 is 0.3, not 0.30000000000000004)
# Fields that change how a merge runs, not what it computes: nothing to search over.
NOT_SWEPT = frozenset({"use_gpu", "max_shard_size"})
DATA_SUFFIXES = (".json", ".jsonl")


def sweepable_parameters() -> tuple[str, ...]:
    """The fields a sweep's space may vary, in the canonical order of its dimensions: merge_method, then every
    method parameter in the registry's order."""
    params = dict.fromkeys(p for spec in METHODS.values() for p in spec.parameters if p not in NOT_SWEPT)
    return ("merge_method", *params)


def methods_taking(parameter: str) -> list[str]:
    """The merge methods that take `parameter`."""
    return [spec.name for spec in METHODS.values() if parameter in spec.parameters]


@functools.cache
def _field_schema(name: str) -> dict[str, Any]:
    return MergeRequest.model_json_schema()["properties"].get(name, {})


def _integer_field(name: str) -> bool:
    return _field_schema(name).get("type") == "integer"


def _number_field(name: str) -> bool:
    """Whether a numeric range can make values of field `name` (a number, or weight_mask_rates: the same rate
    for every model)."""
    prop = _field_schema(name)
    types = {prop.get("type")} | {option.get("type") for option in prop.get("anyOf", [])}
    items = {option.get("items", {}).get("type") for option in prop.get("anyOf", [])}
    return bool({"number", "integer"} & types) or "number" in items


# ---------------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------------


class ValuesDimension(BaseModel):
    """The values of one field to try, each a valid value of the field."""

    model_config = ConfigDict(extra="forbid")

    values: list[Any] = Field(min_length=1, max_length=MAX_VALUES, description="The values to try.")

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, data: Any) -> Any:
        """A bare list of values is `{values: [...]}` (a REST body; a CRD's structural schema cannot take an array
        or an object in one field, so a ModelMergeSweep always says `{values: [...]}`)."""
        return {"values": data} if isinstance(data, list) else data

    @property
    def kind(self) -> Literal["values", "range", "random"]:
        return "values"

    def points(self) -> list[Any]:
        """The values a grid runs, as JSON values."""
        return self.model_dump(mode="json")["values"]

    def sample(self, rng: random.Random) -> Any:
        return rng.choice(self.points())


class RangeDimension(ValuesDimension):
    """The values of a numeric field: `values`, or a range `{start, stop, step}` (stop included), or `{min, max,
    log}` for random sampling (uniform, or log-uniform with log). For weight_mask_rates a number from a range is
    that rate for every model."""

    values: list[Any] | None = Field(default=None, min_length=1, max_length=MAX_VALUES,
                                     description="The values to try.")
    start: float | None = Field(default=None, allow_inf_nan=False, description="Range: first value.")
    stop: float | None = Field(default=None, allow_inf_nan=False, description="Range: last value (included "
                               "when start + k × step reaches it).")
    step: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Range: distance between "
                               "values.")
    min: float | None = Field(default=None, allow_inf_nan=False, description="Random sampling: lower bound.")
    max: float | None = Field(default=None, allow_inf_nan=False, description="Random sampling: upper bound.")
    log: bool = Field(default=False, description="Random sampling: log-uniform between min and max (min > 0).")

    @model_validator(mode="after")
    def _one_form(self) -> RangeDimension:
        forms = [self.values is not None, any(v is not None for v in (self.start, self.stop, self.step)),
                 self.min is not None or self.max is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of: values, {start, stop, step} or {min, max, log}")
        if forms[1]:
            if None in (self.start, self.stop, self.step):
                raise ValueError("a range needs start, stop and step")
            if self.stop < self.start:
                raise ValueError(f"stop {self.stop:g} is below start {self.start:g}")
            if self.range_size() > MAX_TRIALS:
                raise ValueError(f"the range has {self.range_size()} values, more than {MAX_TRIALS}")
        if forms[2]:
            if self.min is None or self.max is None:
                raise ValueError("random sampling needs min and max")
            if self.min >= self.max:
                raise ValueError(f"min {self.min:g} must be below max {self.max:g}")
        if self.log and not (forms[2] and self.min > 0):
            raise ValueError("log sampling needs {min, max} with min > 0")
        return self

    @property
    def kind(self) -> Literal["values", "range", "random"]:
        if self.values is not None:
            return "values"
        return "range" if self.step is not None else "random"

    def range_size(self) -> int:
        return math.floor((self.stop - self.start) / self.step + RANGE_TOLERANCE) + 1

    def points(self) -> list[Any]:
        """The values a grid runs: `values`, or the range's points."""
        if self.values is not None:
            return self.model_dump(mode="json")["values"]
        if self.step is None:
            raise ValueError("{min, max} ranges are sampled by strategy random; a grid needs values or "
                             "{start, stop, step}")
        return [round(self.start + i * self.step, RANGE_DIGITS) for i in range(self.range_size())]

    def sample(self, rng: random.Random) -> Any:
        if self.kind != "random":
            return rng.choice(self.points())
        if self.log:
            return math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
        return rng.uniform(self.min, self.max)


def _value_type(name: str) -> Any:
    """The type of one value of field `name`, with the field's bounds (None left out)."""
    if name == "merge_method":
        return MergeMethod
    field = MergeRequest.model_fields[name]
    options = [arg for arg in typing.get_args(field.annotation) if arg is not type(None)]
    base = options[0] if type(None) in typing.get_args(field.annotation) and len(options) == 1 else field.annotation
    return Annotated[base, *field.metadata] if field.metadata else base


def _dimension_model(name: str) -> type[ValuesDimension]:
    base = RangeDimension if _number_field(name) else ValuesDimension
    values = (list[_value_type(name)] | None if base is RangeDimension else list[_value_type(name)],
              Field(default=None, min_length=1, max_length=MAX_VALUES, description=f"The values of {name} to try.")
              if base is RangeDimension else
              Field(min_length=1, max_length=MAX_VALUES, description=f"The values of {name} to try."))
    title = "".join(part.capitalize() for part in name.split("_"))
    return create_model(f"{title}Dimension", __base__=base, __doc__=base.__doc__, values=values)


def _space_model() -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for name in sweepable_parameters():
        dimension = _dimension_model(name)
        takers = "" if name == "merge_method" else f" (taken by {', '.join(methods_taking(name))})"
        forms = ("{values: [...]}, {start, stop, step} or {min, max, log}" if issubclass(dimension, RangeDimension)
                 else "{values: [...]}")
        fields[name] = (dimension | None, Field(default=None, description=f"Values of {name} to try{takers}: "
                                                f"{forms}."))
    return create_model("SweepSpace", __config__=ConfigDict(extra="forbid"), **fields)


SweepSpace = _space_model()


def dimensions(space: BaseModel) -> dict[str, ValuesDimension]:
    """The swept fields of a space and their dimensions, in canonical order."""
    return {name: dim for name in type(space).model_fields if (dim := getattr(space, name)) is not None}


class SweepTemplate(ModelMergeSpec):
    """The ModelMerge spec every trial starts from; the trial's point of the space replaces its fields. `output_dir`,
    when set, is the folder the trials' outputs go into (`<output_dir>/<trial name>`; unset: `<trial name>`)."""

    merge_method: MergeMethod | None = Field(default=None, description="Merging method of every trial; leave it "
                                             "out when space.merge_method lists the methods to try.")
    evaluation: VolumeEvaluationRequest = Field(description="How every trial's merged model is evaluated (local "
                                                "data files relative to the output volume): the sweep ranks "
                                                "trials by this cross-entropy.")

    def _cross_field_rules(self) -> SweepTemplate:  # checked on every trial's spec, where the space is filled in
        return self

    @field_validator("cancel")
    @classmethod
    def _no_cancel(cls, value: bool) -> bool:
        if value:
            raise ValueError("set the sweep's cancel, not the template's")
        return value

    @field_validator("config")
    @classmethod
    def _no_config(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("a sweep varies the merge request's fields; a mergekit config cannot be a template "
                             "(give base_model, models_to_merge and merge_method)")
        return value


class SweepObjective(BaseModel):
    """What the sweep minimizes: merging-eval's cross-entropy of a trial's merged model, over all data files
    (token-weighted, `overall.ce`), or on one data file."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["cross_entropy"] = Field(default="cross_entropy", description="Lower is better.")
    dataFile: str | None = Field(default=None, min_length=1, max_length=253, description="The data file whose "
                                 "cross-entropy counts, by the name the evaluation reports (its file name without "
                                 ".json/.jsonl); unset: the overall cross-entropy.")


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patience: int = Field(ge=1, le=MAX_TRIALS, description="Stop creating trials once this many finished trials "
                          "in a row (in trial order) did not improve on the best; running trials finish.")


class ModelMergeSweepSpec(BaseModel):
    """A search over merge parameters: each point of `space` is a trial, run as a ModelMerge made from `template`
    and ranked by its evaluation. Immutable once created, except cancel."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    template: SweepTemplate = Field(description="The ModelMerge spec of every trial (evaluation required).")
    space: SweepSpace = Field(description="Per field of the merge request: the values to try. merge_method may "
                              "be a list of methods; each trial varies only the parameters its method takes. A REST "
                              "body may give a field's values as a bare list ([...] for {values: [...]}); a "
                              "ModelMergeSweep cannot (a structural schema has no field that is an array or an "
                              "object), so it always says {values: [...]}.")
    strategy: Literal["grid", "random"] = Field(default="grid", description="grid: every point of the space; "
                                                 "random: `trials` points drawn with `seed`.")
    trials: int | None = Field(default=None, ge=1, le=MAX_TRIALS, description="Random: number of trials.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Random: seed of the draws (unset: "
                             "0); trial i's point depends only on the seed and i.")
    parallelism: int = Field(default=1, ge=1, le=MAX_PARALLELISM, description="Most trials unfinished at once.")
    objective: SweepObjective = Field(default_factory=SweepObjective, description="What the sweep minimizes.")
    keep: Literal["best", "all"] = Field(default="all", description="all: every trial's merged model stays; best: "
                                         "once the sweep ends, the other trials' outputs and ModelMerges are "
                                         "deleted (their results stay in status.trials).")
    earlyStopping: EarlyStopping | None = Field(default=None, description="Stop creating trials when the best "
                                                "stops improving.")
    cancel: bool = Field(default=False, description="Set to true to stop: no new trials, running ones are "
                         "cancelled. Cannot be undone.")

    @field_validator("space")
    @classmethod
    def _not_empty(cls, space: BaseModel) -> BaseModel:
        if not dimensions(space):
            raise ValueError("give at least one field to vary")
        return space

    @model_validator(mode="after")
    def _consistent(self) -> ModelMergeSweepSpec:
        methods = self.methods()
        for name, dimension in dimensions(self.space).items():
            if name != "merge_method" and not set(methods_taking(name)) & set(methods):
                raise ValueError(f"space.{name}: no chosen merge_method takes it (chosen: {', '.join(methods)}; "
                                 f"taken by: {', '.join(methods_taking(name)) or 'none'})")
            if self.strategy == "grid" and dimension.kind == "random":
                raise ValueError(f"space.{name}: {{min, max}} is sampled by strategy random; a grid needs values "
                                 "or {start, stop, step}")
        if self.strategy == "random" and self.trials is None:
            raise ValueError("trials: strategy random needs the number of trials")
        if self.strategy == "grid" and (self.trials is not None or self.seed is not None):
            raise ValueError("trials: trials and seed are for strategy random (a grid runs every point)")
        if self.strategy == "grid" and (size := grid_size(self)) > MAX_TRIALS:
            raise ValueError(f"space: the grid has {size} points, more than {MAX_TRIALS}")
        self._objective_file_exists()
        for trial in sweep_trials(self):
            try:
                trial_spec(self, trial, "trial")
            except ValidationError as exc:
                raise ValueError(f"space: trial {trial.index} ({trial.describe()}) is not a valid merge: "
                                 f"{format_validation_error(exc)}") from None
        return self

    def _objective_file_exists(self) -> None:
        wanted = self.objective.dataFile
        stems = [_stem(ref) for ref in self.template.evaluation.data]
        if wanted is None or None in stems or wanted in stems:  # a folder's files are known only when read
            return
        raise ValueError(f"objective.dataFile: {wanted!r} is none of template.evaluation.data's files "
                         f"({', '.join(stems)})")

    def methods(self) -> list[str]:
        """The merge methods the trials use."""
        dimension = self.space.merge_method
        if dimension is None:
            if self.template.merge_method is None:
                raise ValueError("template.merge_method: field required unless space.merge_method lists the "
                                 "methods to try")
            return [str(self.template.merge_method)]
        methods = dimension.points()
        if len(set(methods)) != len(methods):
            raise ValueError("space.merge_method: lists a method twice")
        return methods


def _stem(ref: str) -> str | None:
    """The name the evaluation reports for data reference `ref`, or None for a folder (its files' names)."""
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return None


# ---------------------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One point of the space: `parameters` holds merge_method and the values of the dimensions it takes."""

    index: int
    parameters: dict[str, Any]

    def describe(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.parameters.items())


def _dimensions_of(spec: ModelMergeSweepSpec, method: str) -> dict[str, ValuesDimension]:
    taken = set(METHODS[method].parameters)
    return {name: dim for name, dim in dimensions(spec.space).items() if name in taken}


def grid_size(spec: ModelMergeSweepSpec) -> int:
    return sum(math.prod(len(dim.points()) for dim in _dimensions_of(spec, method).values())
               for method in spec.methods())


def _value(name: str, value: Any) -> Any:
    """A drawn or ranged value as the field takes it: integers for integer fields, one rate per model asked of
    weight_mask_rates is filled in by trial_spec."""
    if _integer_field(name) and isinstance(value, float):
        return round(value)
    return value


def _trial_rng(seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"modelmerge-sweep:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sweep_trials(spec: ModelMergeSweepSpec) -> list[Trial]:
    """Every trial of the sweep, in index order: grid order (methods in the order listed, then the dimensions in
    canonical order, the last varying fastest), or `trials` random draws keyed by (seed, index)."""
    methods = spec.methods()
    if spec.strategy == "grid":
        points: list[dict[str, Any]] = []
        for method in methods:
            dims = _dimensions_of(spec, method)
            for combo in itertools.product(*(dim.points() for dim in dims.values())):
                points.append({"merge_method": method,
                               **{name: _value(name, v) for name, v in zip(dims, combo, strict=True)}})
        return [Trial(index, point) for index, point in enumerate(points)]
    trials = []
    for index in range(spec.trials or 0):
        rng = _trial_rng(spec.seed or 0, index)
        method = rng.choice(methods)
        dims = _dimensions_of(spec, method)
        trials.append(Trial(index, {"merge_method": method,
                                    **{name: _value(name, dim.sample(rng)) for name, dim in dims.items()}}))
    return trials


def bounded_name(base: str, suffix: str) -> str:
    """`<base><suffix>`, or with `base` cut and a hash of it when that would pass 63 characters (still DNS-safe
    and unique per base)."""
    if len(base) + len(suffix) <= MAX_NAME:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:10]
    return f"{base[:MAX_NAME - len(suffix) - len(digest) - 1].rstrip('-.')}-{digest}{suffix}"


def trial_name(sweep_name: str, index: int) -> str:
    """Trial `index`'s ModelMerge: `<sweep>-<index>`, hashed as bounded_name does when longer than 63."""
    return bounded_name(sweep_name, f"-{index}")


def trial_spec(spec: ModelMergeSweepSpec, trial: Trial, name: str) -> ModelMergeSpec:
    """The ModelMerge spec of `trial` (ModelMerge `name`): the template with the trial's parameters, its output
    in `<template.output_dir>/<name>`. A scalar weight_mask_rates value is that rate for every model."""
    fields = spec.template.model_dump(mode="json", exclude_unset=True)
    fields.pop("cancel", None)
    for field, value in trial.parameters.items():
        if field == "weight_mask_rates" and isinstance(value, int | float) and not isinstance(value, bool):
            value = [value] * len(spec.template.models_to_merge)
        fields[field] = value
    base = (spec.template.output_dir or "").strip("/")
    fields["output_dir"] = f"{base}/{name}" if base else name
    return ModelMergeSpec.model_validate(fields)


def work_cache_folder(spec: ModelMergeSweepSpec, sweep_name: str) -> str:
    """Where the trials of sweep `sweep_name` share the engine's work cache (`modelmerge merge --work-cache`),
    relative to the output root (volume): beside the trials' folders in the template's output_dir, else (trials
    at the root) in .work-cache/<sweep name>."""
    base = (spec.template.output_dir or "").strip("/")
    return f"{base}/{WORK_CACHE_FOLDER}" if base else f"{WORK_CACHE_FOLDER}/{sweep_name}"


def objective_value(objective: SweepObjective, evaluation: MergeEvaluation | None) -> tuple[float | None, str]:
    """A trial's score (lower is better) from its evaluation, with why there is none."""
    if evaluation is None:
        return None, "no evaluation"
    if evaluation.state != "Succeeded":
        return None, f"evaluation failed: {evaluation.message or 'no message'}"
    if objective.dataFile is None:
        ce = evaluation.overall.ce if evaluation.overall else None
        return ce, "" if ce is not None else "no overall cross-entropy"
    for file in evaluation.files:
        if file.name == objective.dataFile:
            return file.ce, "" if file.ce is not None else f"no cross-entropy for {objective.dataFile}"
    return None, f"the evaluation has no data file named {objective.dataFile!r}"


def describe_sweep_error(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as [{'field': 'space.scaling_coefficient', 'message': ...}] (the contract's
    describe_validation_error); the sweep's cross-field errors have no location and start with the field they are
    about (`space.x: ...`)."""
    details = describe_validation_error(exc)
    for detail in details:
        if detail["field"] == "request":
            head, sep, rest = detail["message"].partition(": ")
            located = sep and " " not in head
            detail["field"], detail["message"] = (head, rest) if located else ("spec", detail["message"])
    return details


def format_sweep_error(exc: ValidationError) -> str:
    return "; ".join(f"{d['field']}: {d['message']}" for d in describe_sweep_error(exc))


# ---------------------------------------------------------------------------------------------------------
# The status (written by the operator only)
# ---------------------------------------------------------------------------------------------------------

TRIAL_PHASES = ("Waiting", "Pending", "Running", "Succeeded", "Failed", "Cancelled", "Skipped")


class SweepTrialStatus(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: int = Field(ge=0, description="The trial's index (grid order or draw number).")
    name: str = Field(description="Its ModelMerge.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="merge_method and the swept values.")
    phase: Literal["Waiting", "Pending", "Running", "Succeeded", "Failed", "Cancelled", "Skipped"] = Field(
        description="Waiting (not created yet), the ModelMerge's phase, or Skipped (never run: early stopping, "
        "cancel).")
    ce: float | None = Field(default=None, description="The objective's cross-entropy (lower is better).")
    message: str | None = Field(default=None, description="Why a trial has no score, or why it failed.")


class SweepBest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: int
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    ce: float
    outputPath: str | None = Field(default=None, description="pvc://<claim>/<path> of its merged model.")


class SweepCounts(BaseModel):
    model_config = ConfigDict(extra="ignore")

    total: int = Field(default=0, description="Trials of the sweep.")
    created: int = Field(default=0, description="ModelMerges created.")
    active: int = Field(default=0, description="Created and not finished (never more than parallelism).")
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = Field(default=0, description="Never run (early stopping or cancel).")


class ModelMergeSweepStatus(BaseModel):
    model_config = ConfigDict(extra="ignore")

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Cancelled"] | None = Field(
        default=None, description="Running until every trial finished; Succeeded when one succeeded, Failed when "
        "all failed (or the spec is invalid), Cancelled by spec.cancel.")
    reason: str | None = Field(default=None, description="Machine-readable reason, e.g. Running, Completed, "
                               "EarlyStopped, AllTrialsFailed, InvalidSpec, Cancelled.")
    message: str | None = None
    progress: str | None = Field(default=None, description="Finished trials / total, e.g. '3/9'.")
    counts: SweepCounts = Field(default_factory=SweepCounts)
    best: SweepBest | None = Field(default=None, description="The trial with the lowest objective so far.")
    trials: list[SweepTrialStatus] = Field(default_factory=list, description="Every trial, in index order.")
    startTime: str | None = None
    completionTime: str | None = None
    observedGeneration: int | None = None
    conditions: list[Condition] = Field(default_factory=list, description="Accepted, Running, Complete, Failed, "
                                        "Cancelled, EarlyStopped, OutputsCleaned, each with its last transition.")


# ---------------------------------------------------------------------------------------------------------
# The rules that decide a sweep: the operator's (from the child ModelMerges) and the local backend's (from its
# sweep tables), both over the trials' rows as the status shows them
# ---------------------------------------------------------------------------------------------------------

ENDED_TRIAL_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})  # ran, and ended
FINISHED_TRIAL_PHASES = ENDED_TRIAL_PHASES | {"Skipped"}  # nothing more will happen to it
MESSAGE_LIMIT = 1024  # a status message's characters


def clip_message(message: str) -> str:
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 3] + "..."


def trial_score(trial: SweepTrialStatus) -> float | None:
    """A trial's objective: its cross-entropy when it succeeded (a failed or cancelled trial has none)."""
    return trial.ce if trial.phase == "Succeeded" else None


def best_trial(trials: Iterable[SweepTrialStatus]) -> SweepTrialStatus | None:
    """The scored trial with the lowest objective (the lower index on a tie), if one has a score."""
    scored = [trial for trial in trials if trial_score(trial) is not None]
    return min(scored, key=lambda trial: (trial.ce, trial.index)) if scored else None


def stopped_early(spec: ModelMergeSweepSpec, trials: Iterable[SweepTrialStatus]) -> bool:
    """Whether `earlyStopping.patience` ended trials in a row, in trial order, did not improve on the best before
    them (a trial without a score does not improve; before the first score there is nothing to improve on). Only
    the ended trials before the first unfinished one count, so the answer does not depend on which of the
    parallel trials ended first."""
    if spec.earlyStopping is None:
        return False
    best, streak = None, 0
    for trial in sorted(trials, key=lambda trial: trial.index):
        if trial.phase not in ENDED_TRIAL_PHASES:
            return False
        score = trial_score(trial)
        if score is not None and (best is None or score < best):
            best, streak = score, 0
        else:
            streak += 1
            if best is not None and streak >= spec.earlyStopping.patience:
                return True
    return False


def trial_counts(trials: Sequence[SweepTrialStatus], total: int | None = None) -> SweepCounts:
    """The counts of the trials' phases; `total` defaults to the number of trials."""
    phases = [trial.phase for trial in trials]
    return SweepCounts(total=len(phases) if total is None else total,
                       created=sum(1 for phase in phases if phase not in ("Waiting", "Skipped")),
                       active=sum(1 for phase in phases if phase in ("Pending", "Running")),
                       succeeded=phases.count("Succeeded"), failed=phases.count("Failed"),
                       cancelled=phases.count("Cancelled"), skipped=phases.count("Skipped"))


def counts_summary(counts: SweepCounts) -> str:
    return (f"{counts.succeeded} succeeded, {counts.failed} failed, {counts.cancelled} cancelled, "
            f"{counts.skipped} skipped of {counts.total}")


def ended_sweep(spec: ModelMergeSweepSpec, trials: Sequence[SweepTrialStatus], *, early: bool,
                total: int | None = None) -> tuple[str, str, str]:
    """(phase, reason, message) of a sweep none of whose trials runs or will run: Cancelled when cancel was asked;
    Failed as AllTrialsFailed (no trial succeeded) or NoTrialScored (none has a score), giving the trials'
    messages; else Succeeded as EarlyStopped (`early`: stopped_early's answer) or Completed, naming the best
    trial. Every message counts the trials."""
    counts = trial_counts(trials, total)
    summary = counts_summary(counts)
    if spec.cancel:
        return "Cancelled", "Cancelled", f"cancelled by request: {summary}"
    best = best_trial(trials)
    if best is None:
        if counts.succeeded == 0:
            reason, why = "AllTrialsFailed", "every trial failed"
        else:
            reason, why = "NoTrialScored", "no succeeded trial has a cross-entropy for the objective"
        reasons = "; ".join(f"trial {trial.index}: {trial.message}" for trial in trials
                            if trial.message and trial.phase in ENDED_TRIAL_PHASES)
        return "Failed", reason, clip_message(f"{why} ({summary}): {reasons or 'none ran'}")
    best_text = f"best: trial {best.index} ({best.name}) with cross-entropy {best.ce:.6g}"
    if early:
        return "Succeeded", "EarlyStopped", (f"stopped early after {spec.earlyStopping.patience} trials in a row "
                                             f"did not improve; {best_text}; {summary}")
    return "Succeeded", "Completed", f"{best_text}; {summary}"
