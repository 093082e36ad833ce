"""Streaming merge: plan the output, then produce it tensor by tensor, range by range.

Peak memory is a few ranges of `chunk` elements per input, whatever the model size or the number of
fine-tunes: inputs are mapped files, outputs are appended to shards as they are computed. Ranges are
computed by a pool of threads (the kernels release the GIL) and written in order.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from modelmerge.contract import MergeRequest
from modelmerge_engine.direct_read import ahead_blocks
from modelmerge_engine.early_reads import ask_shared
from modelmerge_engine.errors import MergeError
from modelmerge_engine.kernels import CpuKernels, make_kernels
from modelmerge_engine.layout import BASE, output_config, placements
from modelmerge_engine.methods import method_class
from modelmerge_engine.output import write_synced
from modelmerge_engine.pool import OrderedPool, available_cpus
from modelmerge_engine.progress import Progress, Step
from modelmerge_engine.safetensors_io import (
    COMPUTE_DTYPES,
    DType,
    PlannedTensor,
    SafetensorsModel,
    ShardedWriter,
    numel,
)
from modelmerge_engine.select import kth_magnitudes
from modelmerge_engine.tokenizer_source import (
    MovedVocabulary,
    apply_tokenizer_source,
    is_vocabulary_tensor,
    moved_vocabulary,
)
from modelmerge_engine.work_cache import WorkCache

# Buffers that some checkpoints carry: never merged, copied from the base like merging-eval's saved model.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", "position_ids")
CPU_WORK_ELEMENTS = 1 << 20  # elements per step over all inputs together: bounds memory, fits caches
GPU_WORK_ELEMENTS = 1 << 27
ALIGN = 1 << 12  # default range sizes are multiples of this
STATISTICS_WINDOW = 16  # tensor states computed ahead (Method.statistics_ahead): small, a few scalars or rows each
RANGE_ELEMENTS_ENV = "MODELMERGE_ENGINE_RANGE_ELEMENTS"  # overrides the range size (tests split every tensor)
# How a merge that reads its inputs once reads them: auto (files the page cache does not hold around it, the rest
# mapped), mapped (every file), direct (every file around the page cache, where the filesystem allows; the tests)
INPUT_READS_ENV = "MODELMERGE_ENGINE_INPUT_READS"
INPUT_READS = ("auto", "mapped", "direct")


# Mixture-of-Experts checkpoints store one tensor per expert; transformers 5 loads them as one fused parameter
# per layer (mixtral: block_sparse_moe.experts.N.w1 + w3 -> mlp.experts.gate_up_proj, w2 -> mlp.experts.down_proj;
# qwen2_moe and the many MoE models mapped to it: gate_proj + up_proj, down_proj). merging-eval sees those
# fused parameters: its per-tensor statistics (the ties_merging trim, magnitude masks) cover all their
# experts, and its exclude regexes match their names, and the router's new name. Ours do the same (regexes match
# either name).
_EXPERT_TENSOR = re.compile(r"\.experts\.\d+\.")
_FUSABLE_EXPERT_TENSOR = re.compile(r"^(?P<experts>.+\.experts)\.\d+\.(?P<projection>[^.]+)\.weight$")
_FUSED_PARAMETER = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj",
                    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: DType
    merged: bool
    fused_group: tuple[str, ...] = ()  # the expert tensors forming one fused parameter with it (itself too)
    # Where a mergekit config's merge reads it (layout.py); the defaults are a flat request's: the same name in
    # every model, the base read as the base.
    base_source: tuple[int, str] | None = None  # (position: BASE or a fine-tune's, tensor) read as the base
    sources: tuple[str, ...] = ()  # the tensor read from each fine-tune
    inputs_from: tuple[int, ...] | None = None  # the fine-tunes that feed it (passthrough: one); None: all
    slice_index: int = 0  # the config's slice it belongs to and its position in the slice's layers, for
    t: float = 0.0  # per-tensor parameters (Method.value)

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def statistics_group(self) -> tuple[str, ...]:
        """The tensors a per-tensor statistic of this one covers: its fused parameter's, or just itself."""
        return self.fused_group or (self.name,)


def tied_embeddings(directory) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("tie_word_embeddings", False))


def loaded_name(name: str) -> str:
    """The name transformers 5 loads a checkpoint tensor as: an expert's fused parameter, or the tensor renamed
    out of Mixtral's `block_sparse_moe` module (its router `block_sparse_moe.gate` is `mlp.gate`); else itself."""
    return fused_parameter_name(name) or name.replace(".block_sparse_moe.", ".mlp.")


def fused_parameter_name(name: str) -> str | None:
    """The fused parameter transformers 5 loads a per-expert checkpoint tensor into; None for other tensors."""
    match = _FUSABLE_EXPERT_TENSOR.match(name)
    fused = _FUSED_PARAMETER.get(match["projection"]) if match else None
    return f"{match['experts'].replace('.block_sparse_moe.', '.mlp.')}.{fused}" if fused else None


def plan_tensors(request: MergeRequest, base: SafetensorsModel, finetunes: list[SafetensorsModel],
                 out_dtype: DType, *, vocabulary_rows: int | None = None) -> list[TensorPlan]:
    """Which tensors the output has, which are merged, and checks that every input agrees on them.
    `vocabulary_rows`: the rows of the vocabulary tensors (tokenizer_source over differing vocabularies),
    whatever each input has."""
    excluded = [re.compile(pattern) for pattern in request.exclude_param_names_regex]
    # A base with tied embeddings has no head of its own (transformers re-ties lm_head.weight to the
    # embeddings on load, stored or not), so merging-eval's saved model has none and a fine-tune's stored
    # head, untied or not, is ignored.
    tied = tied_embeddings(base.directory)
    names = [name for name in base.tensors if not (tied and name == "lm_head.weight")]
    if request.config is not None:
        plans = _config_plans(request, base, finetunes, names, out_dtype, excluded, vocabulary_rows=vocabulary_rows)
        return _with_fused_groups(plans, request)
    plans = []
    for name in names:
        info = base.tensors[name]
        plans.append(TensorPlan(name, info.shape, out_dtype if info.dtype.floating else info.dtype,
                                _merged(name, info.dtype, excluded)))
    merged_names = {plan.name for plan in plans if plan.merged}
    for model in finetunes:
        _check_model_matches(base, model, merged_names, ignored={"lm_head.weight"} if tied else set())
    return _with_fused_groups(plans, request)


def _merged(name: str, dtype: DType, excluded: list[re.Pattern]) -> bool:
    names = [name, loaded_name(name)]
    return dtype.floating and not name.endswith(BUFFER_SUFFIXES) and not any(
        p.match(n) for p in excluded for n in names)


def _config_plans(request: MergeRequest, base: SafetensorsModel, finetunes: list[SafetensorsModel],
                  names: list[str], out_dtype: DType, excluded: list[re.Pattern], *,
                  vocabulary_rows: int | None = None) -> list[TensorPlan]:
    """A mergekit config's output tensors (layout.py), each checked in every model that feeds it."""
    models = {BASE: base, **dict(enumerate(finetunes))}
    plans = []
    for placed in placements(request, base, finetunes, names):
        position, tensor = placed.base
        info = _source_info(models[position], tensor)
        merged = _merged(placed.name, info.dtype, excluded)
        shape, compared = info.shape, slice(None)
        if vocabulary_rows is not None and is_vocabulary_tensor(placed.name):
            shape, compared = (vocabulary_rows, *info.shape[1:]), slice(1, None)  # rows: the output vocabulary's
        if merged:
            feeding = placed.inputs_from if placed.inputs_from is not None else range(len(finetunes))
            for i in feeding:
                theirs = _source_info(finetunes[i], placed.sources[i])
                if theirs.shape[compared] != info.shape[compared] or not theirs.dtype.floating:
                    raise MergeError(f"tensor {placed.name}: {models[position].label} has {tensor} "
                                     f"{list(info.shape)}, {finetunes[i].label} has {placed.sources[i]} "
                                     f"{list(theirs.shape)} {theirs.dtype.name}")
        plans.append(TensorPlan(placed.name, shape, out_dtype if info.dtype.floating else info.dtype, merged,
                                base_source=placed.base, sources=placed.sources, inputs_from=placed.inputs_from,
                                slice_index=placed.slice_index, t=placed.t))
    return plans


def _source_info(model: SafetensorsModel, tensor: str):
    if tensor not in model.tensors:
        raise MergeError(f"tensor {tensor} is missing in {model.label}")
    return model.tensors[tensor]


def per_tensor_statistics(request: MergeRequest) -> list[str]:
    """What in this request takes a statistic over each tensor (a k-th smallest magnitude): the method's say."""
    return method_class(request.merge_method).per_tensor_statistics(request)


def _with_fused_groups(plans: list[TensorPlan], request: MergeRequest) -> list[TensorPlan]:
    """Marks the expert tensors whose per-tensor statistics merging-eval takes over a fused parameter, and
    refuses expert tensors it cannot group the way transformers fuses them (the results would differ)."""
    statistics = per_tensor_statistics(request)
    if not statistics:
        return plans
    groups: dict[str, list[TensorPlan]] = {}
    ungroupable = []
    for plan in plans:
        if not _EXPERT_TENSOR.search(plan.name):
            continue
        fused = fused_parameter_name(plan.name)
        if fused is None:
            if plan.merged:
                ungroupable.append(plan.name)
            continue
        groups.setdefault(fused, []).append(plan)
    if ungroupable:
        raise MergeError(
            f"merge_method: {' and '.join(statistics)} computes a statistic per tensor, and merging-eval "
            f"computes it over the fused expert parameters transformers builds from per-expert tensors; these "
            f"expert tensors do not follow a layout the engine can group the same way: "
            f"{', '.join(ungroupable[:4])}{' ...' if len(ungroupable) > 4 else ''} ({len(ungroupable)} tensors). "
            "Use average_merging, task_arithmetic, ties_merging_dare or mask_merging with random masks, or "
            "exclude these tensors with exclude_param_names_regex")
    fused_group = {}
    for fused_name, members in groups.items():
        merged = [p.name for p in members if p.merged]
        if merged and len(merged) != len(members):
            kept = next(p.name for p in members if not p.merged)
            raise MergeError(
                f"exclude_param_names_regex: excludes {kept} but not {merged[0]}, which transformers fuses "
                f"into one parameter ({fused_name}, {len(members)} tensors) that {' and '.join(statistics)} "
                "takes statistics over as a whole; exclude all of its tensors or none")
        names = tuple(p.name for p in members)
        fused_group.update({name: names for name in names})
    return [replace(p, fused_group=fused_group[p.name]) if p.name in fused_group else p for p in plans]


def _check_model_matches(base: SafetensorsModel, model: SafetensorsModel, merged: set[str],
                         ignored: set[str]) -> None:
    for name in sorted(merged):
        if name not in model.tensors:
            raise MergeError(f"tensor {name} is in base_model ({base.label}) but missing in {model.label}")
        theirs, ours = model.tensors[name], base.tensors[name]
        if theirs.shape != ours.shape:
            raise MergeError(f"shape mismatch for tensor {name}: base_model ({base.label}) has "
                             f"{list(ours.shape)}, {model.label} has {list(theirs.shape)}")
        if not theirs.dtype.floating:
            raise MergeError(f"tensor {name} in {model.label} has non-floating dtype {theirs.dtype.name}")
    for name in sorted(set(model.tensors) - set(base.tensors) - ignored):
        if not name.endswith(BUFFER_SUFFIXES):
            raise MergeError(f"tensor {name} is in {model.label} but missing in base_model ({base.label})")


def _input_reads_from_environment() -> str:
    text = os.environ.get(INPUT_READS_ENV, "").strip() or "auto"
    if text not in INPUT_READS:
        raise MergeError(f"{INPUT_READS_ENV} must be one of {', '.join(INPUT_READS)}, got {text!r}")
    return text


def _range_elements_from_environment() -> int | None:
    text = os.environ.get(RANGE_ELEMENTS_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise MergeError(f"{RANGE_ELEMENTS_ENV} must be a positive number of elements per range, got {text!r}")
    return int(text)


class StreamingMerge:
    """Runs one merge request over opened models, writing into a ShardedWriter."""

    def __init__(self, request: MergeRequest, base: SafetensorsModel, finetunes: list[SafetensorsModel],
                 progress: Progress, *, workers: int | None = None, kernels: str | None = None,
                 range_elements: int | None = None, work_cache: WorkCache | None = None,
                 early_read_budget: int = 0):
        """`kernels`: the kernel set on CPU, compiled or torch (default: MODELMERGE_ENGINE_KERNELS, else
        compiled; use_gpu always runs torch on CUDA). `range_elements` (default: MODELMERGE_ENGINE_RANGE_ELEMENTS,
        else sized to the cache and the number of inputs) is how many elements of each tensor a range holds;
        tests set it small to split every tensor. `work_cache`: where whole-input statistics are reused from
        and stored (work_cache.py). `early_read_budget`: the bytes of all the inputs together that a merge reading
        them once asks for early (early_reads.py), counting those asked for before it started."""
        self.request = request
        self.early_read_budget = early_read_budget
        self.work_cache = work_cache
        self.dtype = COMPUTE_DTYPES[request.dtype]
        self.kernels = make_kernels(self.dtype, use_gpu=request.use_gpu, name=kernels)
        on_cpu = self.kernels.device == "cpu"
        # CPU: one range per thread (kernels release the GIL); GPU: big ranges, each parallel on the device
        self.pool = OrderedPool((workers or available_cpus()) if on_cpu else 1)
        budget = CPU_WORK_ELEMENTS if on_cpu else GPU_WORK_ELEMENTS
        self.chunk = range_elements or _range_elements_from_environment() or \
            max(ALIGN, budget // (len(finetunes) + 1) // ALIGN * ALIGN)
        self.base = base
        self.finetunes = finetunes
        self.vocabulary = self._moved_vocabulary()
        self._tokenizer_source(None, planned=False)  # its refusals before the shape checks of plan_tensors
        self.plans = plan_tensors(request, base, finetunes, self.dtype,
                                  vocabulary_rows=self.vocabulary.size if self.vocabulary else None)
        self.progress = progress
        self._plans_by_name = {plan.name: plan for plan in self.plans}
        self.stats: dict[str, object] = {"workers": self.pool.workers, "kernels": self.kernels.name}
        # The registry's implementation of the request's method, and the one whose combine step writes the
        # output (mask_merging's apply method), on this kernel set.
        self.method = method_class(request.merge_method)(self)
        self.combining = self.method.combiner()
        on_compiled = isinstance(self.kernels, CpuKernels)
        self._combine = self.combining.combine_cpu if on_compiled else self.combining.combine_torch
        self._tokenizer_source(None)

    @property
    def device(self) -> str:
        return self.kernels.device

    @property
    def combine_method(self) -> str:
        """The method that combines the (masked, for mask_merging) fine-tunes."""
        return self.combining.name

    def output_tensors(self) -> list[PlannedTensor]:
        return [PlannedTensor(p.name, p.out_dtype, p.shape) for p in self.plans]

    def ranges(self, numel: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.chunk, numel)) for start in range(0, numel, self.chunk)] or [(0, 0)]

    # --- the output pass ------------------------------------------------------------------------------

    def run(self, writer: ShardedWriter) -> None:
        try:
            self.progress.plan(self._steps())
            self.method.prepare()
            self._read_inputs_around_cache()
            self.progress.begin_step("merge", tensors=len(self.plans))
            current = None
            models = len(self.finetunes)
            for plan, chunk in self.pool.map(self._produce, self._jobs()):
                if plan is not current:
                    if current is not None:
                        self.progress.tensor_done()
                    writer.begin_tensor(plan.name)
                    current = plan
                writer.write(chunk)
                self.progress.advance(chunk.shape[0] * (models if plan.merged else 1))
            self.progress.tensor_done()
            self.progress.end_step()
        finally:
            self.pool.close()

    def _read_inputs_around_cache(self) -> None:
        """When the output pass is the only read of the inputs (the method's say) and reads every model's tensors
        in their order (a flat request; a config without slices, whose output is laid out as its base, and whose
        vocabulary is not moved), input files the page cache does not hold are read around it (direct_read.py):
        nothing would read those pages again. A file that more than one of the models reading it opens (a config's
        base that is also one of its inputs, read as the base too) stays mapped: they share its page cache. The
        base is not read around the cache where the method does not read its values. MODELMERGE_ENGINE_INPUT_READS
        can say otherwise."""
        mode = _input_reads_from_environment()
        config = self.request.config
        files = 0
        if mode != "mapped" and self.method.reads_inputs_once() and (
                config is None or (not config.slices and self.vocabulary is None)):
            ask_shared([self.base, *self.finetunes], self.early_read_budget)  # extended; the readers start after
            readers = [*([self.base] if self.method.reads_base else []), *self.finetunes]
            opened = Counter(file for model in readers for file in set(model.files))
            ahead = ahead_blocks(sum(1 for count in opened.values() if count == 1))
            files = sum(model.read_around_cache(ahead=ahead, only_uncached=mode == "auto",
                                                keep_mapped={file for file in model.files if opened[file] > 1})
                        for model in readers)
        self.stats["direct_read_files"] = files
        self.stats["early_read_bytes"] = sum(model.early_bytes for model in (self.base, *self.finetunes))

    # --- what a mergekit config changes in the output's other files -------------------------------------------

    def finish_output(self, staging: Path) -> list[str]:
        """A mergekit config's changes to the base's files in `staging`: the layer count and per-layer lists of
        config.json for slices, the tokenizer of tokenizer_source. Returns the files it wrote."""
        config = self.request.config
        if config is None:
            return []
        written = []
        path = staging / "config.json"
        if config.slices and path.is_file():
            text = json.dumps(output_config(self.request, self.base, self.finetunes, json.loads(path.read_text())),
                              indent=2, sort_keys=True) + "\n"
            write_synced(path, text)
            written.append("config.json")
        return written + self._tokenizer_source(staging)

    def _tokenizer_models(self) -> dict[str, tuple[Path, str]]:
        models = {ref: (model.directory, model.label)
                  for ref, model in zip(self.request.models_to_merge, self.finetunes, strict=True)}
        models[self.request.base_model] = (self.base.directory, self.base.label)
        return models

    def _moved_vocabulary(self) -> MovedVocabulary | None:
        """tokenizer_source over vocabularies that differ: the output's vocabulary and each model's rows of it."""
        config = self.request.config
        if config is None or config.tokenizer_source is None:
            return None
        listed = [m.model for m in config.models] if config.models else []
        order = listed + ([config.base_model] if config.base_model and config.base_model not in listed else [])
        vocabulary = moved_vocabulary(config.tokenizer_source, models=self._tokenizer_models(),
                                      base_ref=self.request.base_model, order=order, config_base=config.base_model,
                                      slices=bool(config.slices))
        if vocabulary is not None:
            prefix = f"config: tokenizer_source: {config.tokenizer_source}"
            vocabulary_tensors = [name for name in self.base.tensors if is_vocabulary_tensor(name)]
            if not vocabulary_tensors:
                raise MergeError(f"{prefix}: the base model has no embed_tokens or lm_head tensor to move to its "
                                 "vocabulary")
            for ref, (_, label) in self._tokenizer_models().items():
                model = self._model_of(ref)
                for name in vocabulary_tensors:
                    rows = model.tensors[name].shape[0] if name in model.tensors else None
                    if rows is not None and int(vocabulary.rows[ref].max()) >= rows:
                        raise MergeError(f"{prefix}: {label}'s {name} has {rows} rows, fewer than its tokenizer's "
                                         "tokens")
        return vocabulary

    def _tokenizer_source(self, staging: Path | None, *, planned: bool = True) -> list[str]:
        """Checks a config's tokenizer_source (staging None: before the merge; not `planned`: the vocabularies
        only) or applies it to the output."""
        config = self.request.config
        if config is None or config.tokenizer_source is None:
            return []
        embedding = next((p for p in self.plans if "embed_tokens" in p.name), None) if planned else None
        return apply_tokenizer_source(config.tokenizer_source, models=self._tokenizer_models(),
                                      base_ref=self.request.base_model,
                                      embedding_rows=embedding.shape[0] if embedding else None, staging=staging,
                                      moved=self.vocabulary)

    # --- progress: the steps of the whole merge, planned up front ----------------------------------------

    def histogram_passes(self, k: int) -> int:
        """How many passes kth_magnitudes makes over one model's values to find the k-th smallest."""
        return 0 if k == 0 else 2 if self._wide else 1

    def _steps(self) -> list[Step]:
        """Each step with the element work it does (one model's values read once = numel), as `advance`
        counts it: the method's statistics passes (thresholds, signs) and the merge writing every tensor."""
        models = len(self.finetunes)
        merge_work = sum(p.numel * models if p.merged else p.numel for p in self.plans)
        groups = {p.statistics_group: sum(q.numel for q in self.statistics_group(p)) for p in self.plans
                  if p.merged}
        statistics = sum(self.method.statistics_work(numel_of_group) for numel_of_group in groups.values())
        return self.method.planned_steps(merge_work, statistics)

    def _jobs(self) -> Iterator[tuple[TensorPlan, int, int, object]]:
        for plan, state in self._tensor_states():
            for start, stop in self.ranges(plan.numel):
                yield plan, start, stop, state

    def _tensor_state(self, plan: TensorPlan) -> tuple[TensorPlan, object]:
        if not plan.merged:
            return plan, None
        self.method.prepare_tensor(plan)
        return plan, self.combining.tensor_state(plan)

    def _tensor_states(self) -> Iterator[tuple[TensorPlan, object]]:
        """Each plan with its combine step's state, in order: computed here as the merge reaches the tensor, or
        (Method.statistics_ahead) for the next tensors on threads of their own, one tensor per thread, while the
        merge step's threads combine the current one."""
        if not self.method.statistics_ahead:
            yield from map(self._tensor_state, self.plans)
            return
        # one worker: in turn, here; the window lets the other threads go on while one computes a long tensor
        ahead = OrderedPool(self.pool.workers, name="statistics", window=STATISTICS_WINDOW)
        try:
            yield from ahead.map(self._tensor_state, self.plans)
        finally:
            ahead.close()

    def _produce(self, job) -> tuple[TensorPlan, np.ndarray]:
        plan, start, stop, state = job
        kernels = self.kernels
        if not plan.merged:
            model, tensor = self._base_of(plan)
            if self.moves_rows(plan.name):
                return plan, self._read_moved(plan, self._base_ref(plan), start, stop)
            values = model.read(tensor, start, stop)
            if plan.out_dtype.floating and plan.out_dtype != model.tensors[tensor].dtype:
                values = kernels.to_host(kernels.prepare(values, model.tensors[tensor].dtype))
            return plan, values
        base, inputs = self.inputs(plan.name, start, stop)
        return plan, kernels.to_host(self._combine(kernels, base, inputs, state))

    # --- inputs of one range --------------------------------------------------------------------------

    def _base_of(self, plan: TensorPlan) -> tuple[SafetensorsModel, str]:
        """The model and tensor read as the base of `plan` (a config's layout may read it from a fine-tune)."""
        if plan.base_source is None:
            return self.base, plan.name
        position, tensor = plan.base_source
        return (self.base if position == BASE else self.finetunes[position]), tensor

    def _load(self, name: str, start: int, stop: int, models: list[int] | None = None):
        """The base (None where the method does not read it) and the fine-tunes (those at `models`; default: those
        that feed the tensor) on one range, in the compute dtype."""
        prepare = self.kernels.prepare
        plan = self._plans_by_name[name]
        model, tensor = self._base_of(plan)
        positions = self.feeding(plan) if models is None else models
        reads_base = self.method.reads_base
        if self.moves_rows(plan.name):  # tokenizer_source: rows moved to the output's tokens
            return (prepare(self._read_moved(plan, self._base_ref(plan), start, stop), self.dtype) if reads_base
                    else None,
                    [prepare(self._read_moved(plan, self.request.models_to_merge[i], start, stop), self.dtype)
                     for i in positions])
        base = prepare(model.read(tensor, start, stop), model.tensors[tensor].dtype) if reads_base else None
        sources = plan.sources or (name,) * len(self.finetunes)
        return base, [prepare(self.finetunes[i].read(sources[i], start, stop),
                              self.finetunes[i].tensors[sources[i]].dtype) for i in positions]

    def _base_ref(self, plan: TensorPlan) -> str:
        return self._ref_of(plan.base_source[0] if plan.base_source is not None else BASE)

    def _ref_of(self, position: int) -> str:
        """The request's reference of the model at `position` (BASE or a fine-tune's)."""
        return self.request.base_model if position == BASE else self.request.models_to_merge[position]

    def _model_of(self, ref: str) -> SafetensorsModel:
        """The model the request names `ref` (its base_model or one of models_to_merge)."""
        return self.base if ref == self.request.base_model else self.finetunes[self.request.models_to_merge.index(ref)]

    def moved_range(self, position: int, name: str, start: int, stop: int) -> np.ndarray | None:
        """tokenizer_source: model `position`'s (BASE or a fine-tune's) elements [start, stop) of the
        vocabulary tensor `name` with its rows moved to the output's tokens, in the compute dtype on the host; None
        for every other tensor (read as stored). For methods that read inputs on their own."""
        if not self.moves_rows(name):
            return None
        return self._read_moved(self._plans_by_name[name], self._ref_of(position), start, stop)

    def moves_rows(self, name: str) -> bool:
        """Whether tensor `name`'s rows are moved to the output's tokens (tokenizer_source; see moved_range)."""
        return self.vocabulary is not None and is_vocabulary_tensor(name)

    def _read_moved(self, plan: TensorPlan, ref: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of model `ref`'s vocabulary tensor `plan` with its rows moved to the output's
        tokens (tokenizer_source.py), in the compute dtype, on the host."""
        def read(source: str, first: int, last: int) -> np.ndarray:
            model = self._model_of(source)
            values = model.read(plan.name, first, last)
            return self.kernels.to_host(self.kernels.prepare(values, model.tensors[plan.name].dtype))

        width = plan.numel // plan.shape[0]
        return self.vocabulary.assemble(ref, plan.name, start, stop, width, self.dtype, read)

    def feeding(self, plan: TensorPlan) -> list[int]:
        """The positions of the fine-tunes that feed `plan` (all but for a passthrough slice)."""
        return list(plan.inputs_from) if plan.inputs_from is not None else list(range(len(self.finetunes)))

    def plan(self, name: str) -> TensorPlan:
        return self._plans_by_name[name]

    def inputs(self, name: str, start: int, stop: int, models: list[int] | None = None):
        """The base and the fine-tuned weights as the merge method sees them (mask_merging masks them first)."""
        base, raws = self._load(name, start, stop, models)
        positions = models if models is not None else self.feeding(self._plans_by_name[name])
        return base, self.method.inputs(name, start, base, raws, positions)

    # --- thresholds -----------------------------------------------------------------------------------

    def thresholds(self, plans: list[TensorPlan], ks: list[int], *, masked: bool, task_vectors: bool) -> np.ndarray:
        """For each model, the k-th smallest magnitude of its task vectors (or weights) over `plans`: one
        histogram pass (two for float32) over every model that needs one, in parallel over ranges."""
        def histogram_pass(streams: list[int], shift: int, bins: int, buckets: np.ndarray) -> np.ndarray:
            def one(job: tuple[str, int, int]) -> tuple[int, np.ndarray]:
                name, start, stop = job
                base, inputs = (self.inputs if masked else self._load)(name, start, stop, streams)
                counts = self.kernels.histogram(base, inputs, task_vectors=task_vectors, shift=shift, bins=bins,
                                                buckets=buckets)
                return stop - start, counts

            total = np.zeros((len(streams), bins), dtype=np.int64)
            jobs = ((p.name, start, stop) for p in plans for start, stop in self.ranges(p.numel))
            for size, counts in self.pool.map(one, jobs):
                total += counts
                self.progress.advance(size * len(streams))
            return total

        return np.array(kth_magnitudes(histogram_pass, ks, wide=self._wide), dtype=np.int64)

    def statistics_group(self, plan: TensorPlan) -> list[TensorPlan]:
        """The tensors a per-tensor statistic of `plan` covers (a fused MoE parameter's, see plan_tensors)."""
        return [self._plans_by_name[name] for name in plan.statistics_group]

    @property
    def _wide(self) -> bool:
        return self.dtype.name == "F32"
