"""merging-eval's task_arithmetic: base + scaling_coefficient * Σ (fine-tune − base), rounded as its tensors are.

(mergekit's task_arithmetic, with per-model weights, normalize and lambda, is a different method: it is what a
mergekit config's `merge_method: task_arithmetic` will select; the flat request's name keeps merging-eval's.)"""

from __future__ import annotations

from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method


@register
class TaskArithmetic(Method):
    name = "task_arithmetic"
    parameters = ("scaling_coefficient",)

    def reads_inputs_once(self) -> bool:
        return True

    def combine_cpu(self, kernels, base, inputs, state):
        out = kernels.empty(base)
        kernels.k.task_arithmetic(kernels.code, base, tuple(inputs), float(self.request.scaling_coefficient), out)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        return kernels.k.task_arithmetic(base, inputs, float(self.request.scaling_coefficient))
