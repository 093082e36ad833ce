"""merging-eval's mask_merging: drop a fraction of each model's weights (at random, DARE, or the smallest by
magnitude), optionally rescale the rest by 1 / (1 - rate), then merge the masked models with
`mask_apply_method` (another registered method, whose statistics and combine step see the masked values)."""

from __future__ import annotations

import hashlib

import numpy as np

from modelmerge_engine.kernels import MaskParams
from modelmerge_engine.methods import method_class, register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.select import NO_THRESHOLD


@register
class MaskMerging(Method):
    name = "mask_merging"
    parameters = ("weight_mask_rates", "mask_strategy", "mask_apply_method", "weight_format", "use_weight_rescale",
                  "seed", "scaling_coefficient", "param_value_mask_rate")

    def __init__(self, merge):
        super().__init__(merge)
        self.apply = method_class(self.request.mask_apply_method)(merge)
        self.thresholds: dict[str, np.ndarray] = {}

    @property
    def by_magnitude(self) -> bool:
        return self.request.mask_strategy == "magnitude"

    def reads_inputs_once(self) -> bool:
        """Random masks (or none) need no statistics: then it is the apply method's say."""
        return not self.by_magnitude and self.apply.reads_inputs_once()

    @classmethod
    def per_tensor_statistics(cls, request):
        found = ["mask_merging with mask_strategy magnitude"] if request.mask_strategy == "magnitude" else []
        applied = method_class(request.mask_apply_method).per_tensor_statistics(request)
        return found + [f"mask_merging with mask_apply_method {name}" for name in applied]

    def statistics_work(self, group_numel: int) -> int:
        masks = 0
        if self.by_magnitude:
            masks = group_numel * sum(self.merge.histogram_passes(int(group_numel * rate))
                                      for rate in self.request.weight_mask_rates)
        return masks + self.apply.statistics_work(group_numel)

    def planned_steps(self, merge_work, statistics_work):
        return self.apply.planned_steps(merge_work, statistics_work)

    def prepare(self) -> None:
        self.apply.prepare()

    def prepare_tensor(self, plan) -> None:
        """By magnitude: per tensor (fused parameter) and model, the k-th smallest |delta| (or |weight|)."""
        if not self.by_magnitude or plan.name in self.thresholds:
            return
        merge = self.merge
        group = merge.statistics_group(plan)
        ks = [int(sum(p.numel for p in group) * rate) for rate in self.request.weight_mask_rates]
        thresholds = merge.thresholds(group, ks, masked=False,
                                      task_vectors=self.request.weight_format == "delta_weight")
        self.thresholds.update({p.name: thresholds for p in group})

    def inputs(self, name, start, base, raws, models):
        r = self.request
        thresholds = self.thresholds.get(name)
        masked = []
        for i, raw in zip(models, raws, strict=True):
            params = MaskParams(delta=r.weight_format == "delta_weight", rate=r.weight_mask_rates[i],
                                rescale=r.use_weight_rescale, start=start,
                                threshold=int(thresholds[i]) if thresholds is not None else NO_THRESHOLD,
                                random_key=self._random_key(i, name) if r.mask_strategy == "random" else None)
            masked.append(self.merge.kernels.mask(base, raw, params))
        return masked

    def _random_key(self, index: int, name: str) -> int:
        """The random stream of one model's tensor: a function of (seed, model position, tensor name) only."""
        key = f"{self.request.seed}/{index}/{name}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # fits an int64

    def tensor_state(self, plan):
        return self.apply.tensor_state(plan)

    def combiner(self) -> Method:
        return self.apply
