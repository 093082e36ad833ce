"""merging-eval's TIES family: trim each task vector's smallest magnitudes, elect a sign per element, average
the values that agree with it, scale and add to the base. Two variants, by where the trim threshold comes from:

- ties_merging: per tensor (fused MoE parameter) and model, k = int(numel * param_value_mask_rate), found by a
  radix select inside the merge step, tensor by tensor;
- ties_merging_dare: one threshold per model over all merged parameters, plus a global majority sign for
  elements whose signs cancel; two streaming passes (thresholds, signs) before the merge step.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.progress import Step
from modelmerge_engine.work_cache import statistics_key

STATISTICS_ENTRY = "ties_merging_dare-statistics"


@register
class TiesMerging(Method):
    name = "ties_merging"
    parameters = ("scaling_coefficient", "param_value_mask_rate")

    def __init__(self, merge):
        super().__init__(merge)
        self._thresholds_by_group: dict[tuple[str, ...], np.ndarray] = {}

    @classmethod
    def per_tensor_statistics(cls, request):
        return ["ties_merging"]

    def statistics_work(self, group_numel: int) -> int:
        passes = self.merge.histogram_passes(int(group_numel * self.request.param_value_mask_rate))
        return group_numel * passes * len(self.merge.finetunes)

    def tensor_state(self, plan) -> np.ndarray:
        """Per tensor (fused parameter) and model, the k-th smallest |task vector| (k = int(numel * rate))."""
        if plan.statistics_group not in self._thresholds_by_group:
            group = self.merge.statistics_group(plan)
            k = int(sum(p.numel for p in group) * self.request.param_value_mask_rate)
            self._thresholds_by_group[plan.statistics_group] = self.merge.thresholds(
                group, [k] * len(self.merge.finetunes), masked=True, task_vectors=True)
        return self._thresholds_by_group[plan.statistics_group]

    def combine_cpu(self, kernels, base, inputs, thresholds):
        out = kernels.empty(base)
        kernels.k.ties(kernels.code, base, tuple(inputs), thresholds, float(self.request.scaling_coefficient), out)
        return out

    def combine_torch(self, kernels, base, inputs, thresholds):
        trimmed = kernels.k.trim_task_vectors(base, inputs, [int(t) for t in thresholds])
        return kernels.k.ties(base, trimmed, float(self.request.scaling_coefficient)).to(kernels.tdtype)


@register
class GlobalTies(Method):
    name = "ties_merging_dare"
    parameters = ("scaling_coefficient", "param_value_mask_rate")

    def planned_steps(self, merge_work: int, statistics_work: int) -> list[Step]:
        merge = self.merge
        total = sum(p.numel for p in merge.plans if p.merged)
        models = len(merge.finetunes)
        k = int(total * self.request.param_value_mask_rate)
        thresholds = statistics_work + total * merge.histogram_passes(k) * models
        return [Step("thresholds", thresholds), Step("signs", total * models), Step("merge", merge_work)]

    def prepare(self) -> None:
        """The two global statistics, each in one streaming pass: the k-th smallest |task vector| of each model
        over all merged parameters, then the majority sign of the elected signs. With a work cache, both are
        reused from a merge of the same inputs that differed at most in scaling_coefficient."""
        merge = self.merge
        merged = [p for p in merge.plans if p.merged]
        total = sum(p.numel for p in merged)
        k = int(total * self.request.param_value_mask_rate)
        models = len(merge.finetunes)
        cache = merge.work_cache
        key = statistics_key(merge, independent_of=("scaling_coefficient",)) if cache is not None else None
        stored = cache.load(STATISTICS_ENTRY, key, partial(_parse_statistics, models=models)) if key else None
        merge.progress.begin_step("thresholds")
        for plan in merged:
            merge.method.prepare_tensor(plan)  # mask_merging's thresholds, counted in this step
        self.thresholds = stored[0] if stored else merge.thresholds(merged, [k] * models, masked=True,
                                                                     task_vectors=True)
        merge.progress.end_step()
        merge.progress.begin_step("signs")
        if stored:
            self.majority_sign = stored[1]
            cache.reused("ties_merging_dare thresholds and majority sign")
        else:
            self.majority_sign = self._majority_sign(merged)
            if cache is not None:
                cache.store(STATISTICS_ENTRY, key, {"thresholds": [int(t) for t in self.thresholds],
                                                    "majority_sign": int(self.majority_sign)})
        merge.progress.end_step()
        merge.stats.update({"global_threshold_k": k, "majority_sign": int(self.majority_sign)})

    def _majority_sign(self, merged) -> float:
        merge = self.merge
        models = len(merge.finetunes)

        def balance(job: tuple[str, int, int]) -> tuple[int, int]:
            name, start, stop = job
            base, inputs = merge.inputs(name, start, stop)
            return stop - start, merge.kernels.global_ties_sign_balance(base, inputs, self.thresholds)

        overall = 0
        jobs = ((p.name, a, b) for p in merged for a, b in merge.ranges(p.numel))
        for size, part in merge.pool.map(balance, jobs):
            overall += part
            merge.progress.advance(size * models)
        return float((overall > 0) - (overall < 0))

    def combine_cpu(self, kernels, base, inputs, state):
        out = kernels.empty(base)
        kernels.k.global_ties(kernels.code, base, tuple(inputs), self.thresholds, self.majority_sign,
                              float(self.request.scaling_coefficient), out)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        k = kernels.k
        trimmed = k.trim_task_vectors(base, inputs, [int(t) for t in self.thresholds])
        signs = k.elected_signs(trimmed)
        return k.global_ties(base, trimmed, signs, self.majority_sign,
                             float(self.request.scaling_coefficient)).to(kernels.tdtype)


def _parse_statistics(value: dict, *, models: int) -> tuple[np.ndarray, float]:
    """A stored (thresholds, majority sign); ValueError when it is not one for `models` models."""
    thresholds, sign = value["thresholds"], value["majority_sign"]
    if len(thresholds) != models or not all(type(t) is int and t >= 0 for t in thresholds) or sign not in (-1, 0, 1):
        raise ValueError(f"not {models} thresholds and a majority sign")
    return np.array(thresholds, dtype=np.int64), float(sign)
