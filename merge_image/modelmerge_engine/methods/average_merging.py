"""merging-eval's average_merging: the element-wise mean of the fine-tunes (`stack(inputs).mean(dim=0)`)."""

from __future__ import annotations

from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method


@register
class AverageMerging(Method):
    name = "average_merging"
    parameters = ()

    def reads_inputs_once(self) -> bool:
        return True

    def combine_cpu(self, kernels, base, inputs, state):
        out = kernels.empty(inputs[0])
        kernels.k.average(kernels.code, tuple(inputs), out)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        return kernels.k.average(inputs)
