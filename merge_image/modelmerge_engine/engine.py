"""Streaming merge: plan the output, then produce it tensor by tensor, range by range.

Peak memory is a few ranges of `Compute.chunk` elements per input, whatever the model size or the number of
fine-tunes: inputs are mapped files, outputs are appended to shards as they are computed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from modelmerge.contract import MergeRequest
from modelmerge_engine import kernels
from modelmerge_engine.errors import MergeError
from modelmerge_engine.kernels import Compute, Input, MaskedInput, RawInput
from modelmerge_engine.pool import OrderedPool, available_cpus
from modelmerge_engine.progress import Progress
from modelmerge_engine.safetensors_io import PlannedTensor, SafetensorsModel, ShardedWriter
from modelmerge_engine.select import kth_magnitude_bits

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Buffers that some checkpoints carry: never merged, copied from the base like merging-eval's saved model.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", "position_ids")
CPU_WORK_ELEMENTS = 1 << 20  # elements held per step over all inputs together (bounds memory)
GPU_WORK_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merged: bool

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def make_compute(request: MergeRequest, inputs: int) -> Compute:
    if request.use_gpu:
        if not torch.cuda.is_available():
            raise MergeError("use_gpu is set but CUDA is not available on this machine "
                             "(no GPU visible to torch); run without --use-gpu")
        device, budget = torch.device("cuda"), GPU_WORK_ELEMENTS
    else:
        device, budget = torch.device("cpu"), CPU_WORK_ELEMENTS
    per_input = max(kernels.RNG_BLOCK, budget // (inputs + 1) // kernels.RNG_BLOCK * kernels.RNG_BLOCK)
    return Compute(dtype=DTYPES[request.dtype], device=device, chunk=per_input)


def tied_embeddings(directory: Path) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("tie_word_embeddings", False))


def plan_tensors(request: MergeRequest, base: SafetensorsModel, finetunes: list[SafetensorsModel],
                 out_dtype: torch.dtype) -> list[TensorPlan]:
    """Which tensors the output has, which are merged, and checks that every input agrees on them."""
    excluded = [re.compile(pattern) for pattern in request.exclude_param_names_regex]
    tied = tied_embeddings(base.directory) and "lm_head.weight" in base.tensors
    plans = []
    for name, info in base.tensors.items():
        if tied and name == "lm_head.weight":
            continue  # transformers re-ties it on load; merging-eval's saved model does not store it
        floating = info.dtype.is_floating_point
        merged = floating and not name.endswith(BUFFER_SUFFIXES) and not any(p.match(name) for p in excluded)
        plans.append(TensorPlan(name, info.shape, out_dtype if floating else info.dtype, merged))
    merged_names = {plan.name for plan in plans if plan.merged}
    for model in finetunes:
        _check_model_matches(base, model, merged_names, ignored={"lm_head.weight"} if tied else set())
    return plans


def _check_model_matches(base: SafetensorsModel, model: SafetensorsModel, merged: set[str],
                         ignored: set[str]) -> None:
    for name in sorted(merged):
        if name not in model.tensors:
            raise MergeError(f"tensor {name} is in base_model ({base.label}) but missing in {model.label}")
        theirs, ours = model.tensors[name], base.tensors[name]
        if theirs.shape != ours.shape:
            raise MergeError(f"shape mismatch for tensor {name}: base_model ({base.label}) has "
                             f"{list(ours.shape)}, {model.label} has {list(theirs.shape)}")
        if not theirs.dtype.is_floating_point:
            raise MergeError(f"tensor {name} in {model.label} has non-floating dtype {theirs.dtype}")
    for name in sorted(set(model.tensors) - set(base.tensors) - ignored):
        if not name.endswith(BUFFER_SUFFIXES):
            raise MergeError(f"tensor {name} is in {model.label} but missing in base_model ({base.label})")


class StreamingMerge:
    """Runs one merge request over opened models, writing into a ShardedWriter."""

    def __init__(self, request: MergeRequest, base: SafetensorsModel, finetunes: list[SafetensorsModel],
                 progress: Progress, workers: int | None = None):
        self.request = request
        self.compute = make_compute(request, len(finetunes))
        if self.compute.device.type == "cpu":
            torch.set_num_threads(1)  # parallelism comes from the pool: one range per thread
            self.pool = OrderedPool(workers or available_cpus())
        else:
            self.pool = OrderedPool(1)  # the GPU parallelises each range itself
        self.base_model = base
        self.base = RawInput(base, self.compute)
        self.inputs = self._inputs(finetunes)
        self.plans = plan_tensors(request, base, finetunes, self.compute.dtype)
        self.progress = progress
        self.scaling = float(request.scaling_coefficient)
        self.stats: dict[str, object] = {"workers": self.pool.workers}

    def _inputs(self, finetunes: list[SafetensorsModel]) -> list[Input]:
        raw = [RawInput(model, self.compute) for model in finetunes]
        if self.request.merge_method != "mask_merging":
            return raw
        r = self.request
        return [MaskedInput(raw=model, base=self.base, rate=rate, strategy=r.mask_strategy,
                            rescale=r.use_weight_rescale, weight_format=r.weight_format, seed=r.seed, index=i)
                for i, (model, rate) in enumerate(zip(raw, r.weight_mask_rates, strict=True))]

    @property
    def method(self) -> str:
        r = self.request
        return r.mask_apply_method if r.merge_method == "mask_merging" else r.merge_method

    def output_tensors(self) -> list[PlannedTensor]:
        return [PlannedTensor(p.name, p.out_dtype, p.shape) for p in self.plans]

    def run(self, writer: ShardedWriter) -> None:
        try:
            if self.method == "ties_merging_dare":
                self._prepare_dare()
            self.progress.start("merge", sum(p.numel for p in self.plans), len(self.plans))
            current = None
            for plan, chunk in self.pool.map(self._produce, self._jobs()):
                if plan is not current:
                    if current is not None:
                        self.progress.tensor_done()
                    writer.begin_tensor(plan.name)
                    current = plan
                writer.write(chunk)
                self.progress.advance(chunk.numel())
            self.progress.tensor_done()
            self.progress.finish()
        finally:
            self.pool.close()

    def _jobs(self) -> Iterator[tuple[TensorPlan, int, int, list[int | None] | None]]:
        for plan in self.plans:
            thresholds = self._tensor_thresholds(plan) if plan.merged and self.method == "ties_merging" else None
            for start, stop in self.compute.ranges(plan.numel):
                yield plan, start, stop, thresholds

    def _produce(self, job) -> tuple[TensorPlan, torch.Tensor]:
        plan, start, stop, thresholds = job
        if not plan.merged:
            return plan, self.base_model.flat(plan.name)[start:stop].to(plan.out_dtype)
        return plan, self._merge_range(plan.name, start, stop, thresholds).to(plan.out_dtype)

    def _merge_range(self, name: str, start: int, stop: int, thresholds: list[int | None] | None):
        values = [source.values(name, start, stop) for source in self.inputs]
        method = self.method
        if method == "average_merging":
            return kernels.average(values)
        base = self.base.values(name, start, stop)
        if method == "task_arithmetic":
            return kernels.task_arithmetic(base, values, self.scaling)
        if method == "ties_merging":
            trimmed = [kernels.trim(v - base, t) for v, t in zip(values, thresholds, strict=True)]
            return kernels.ties(base, trimmed, self.scaling)
        trimmed = kernels.dare_trim(base, values, self.dare_thresholds)
        signs = kernels.dare_signs(trimmed)
        return kernels.dare_disjoint(base, trimmed, signs, self.majority_sign, self.scaling)

    # --- thresholds -----------------------------------------------------------------------------------

    def _task_vector_steps(self, plans: list[TensorPlan], progress: bool = False):
        """One callable per range of `plans`, producing each model's task vector on that range."""
        def step(name: str, start: int, stop: int) -> list[torch.Tensor]:
            base = self.base.values(name, start, stop)
            vectors = [source.values(name, start, stop) - base for source in self.inputs]
            if progress:
                self.progress.advance(stop - start)
            return vectors

        for plan in plans:
            for start, stop in self.compute.ranges(plan.numel):
                yield partial(step, plan.name, start, stop)

    def _tensor_thresholds(self, plan: TensorPlan) -> list[int | None]:
        """ties_merging: per tensor and model, the k-th smallest |task vector| (k = int(numel * rate))."""
        k = int(plan.numel * self.request.param_value_mask_rate)
        return kth_magnitude_bits(lambda: self._task_vector_steps([plan]), [k] * len(self.inputs),
                                  self.compute.dtype, self.pool.map)

    def _prepare_dare(self) -> None:
        """ties_merging_dare's two global statistics, each in one streaming pass: the k-th smallest |task
        vector| of each model over all merged parameters, then the majority sign of the elected signs."""
        merged = [p for p in self.plans if p.merged]
        total = sum(p.numel for p in merged)
        k = int(total * self.request.param_value_mask_rate)
        passes = 2 if self.compute.dtype == torch.float32 else 1
        self.progress.start("thresholds", total * passes, len(merged) * passes)
        self.dare_thresholds = kth_magnitude_bits(lambda: self._task_vector_steps(merged, progress=True),
                                                  [k] * len(self.inputs), self.compute.dtype, self.pool.map)
        self.progress.finish()
        self.progress.start("signs", total, len(merged))

        def balance(job: tuple[str, int, int]) -> int:
            name, start, stop = job
            base = self.base.values(name, start, stop)
            values = [source.values(name, start, stop) for source in self.inputs]
            signs = kernels.dare_signs(kernels.dare_trim(base, values, self.dare_thresholds))
            self.progress.advance(stop - start)
            return int((signs > 0).sum()) - int((signs < 0).sum())

        jobs = ((p.name, start, stop) for p in merged for start, stop in self.compute.ranges(p.numel))
        overall = sum(self.pool.map(balance, jobs))
        self.progress.finish()
        self.majority_sign = float((overall > 0) - (overall < 0))
        self.stats.update({"global_threshold_k": k, "majority_sign": int(self.majority_sign)})
