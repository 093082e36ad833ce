"""mergekit's passthrough (mergekit/merge_methods/passthrough.py, 0.1.5): each output tensor is its one input's,
multiplied by the input's `scale` when one is set (per model, per tensor: model_parameters or a mergekit
config's conditions). A flat request copies its one model; a mergekit config's `slices` stack layer ranges of
several models (layout.py places each tensor, renumbered). mergekit scales in the compute dtype
(`tensor * scale`: both widened to float32, one rounding); the compiled kernel and the torch one do the same."""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _specialised, store, widen
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method


@register_jitable(inline="always")
def _scale(constants, args):
    """out = rnd(float32(x) * float32(factor)): torch's `tensor * float` in a 16-bit or 32-bit dtype."""
    (code,) = constants
    values, factor, out = args
    for e in range(out.shape[0]):
        store(out, e, widen(values[e], code) * factor, code)


@register
class Passthrough(Method):
    name = "passthrough"
    parameters = ("model_parameters",)

    def tensor_state(self, plan) -> float | None:
        """The scale of the model that feeds this tensor, or None (copied as it is)."""
        (model,) = self.merge.feeding(plan)
        return self.value("scale", tensor=plan.name, model=model)

    def combine_cpu(self, kernels, base, inputs, scale):
        if scale is None:
            return inputs[0]
        out = kernels.empty(inputs[0])
        _specialised(_scale, int(kernels.code))((inputs[0], np.float32(scale), out))
        return out

    def combine_torch(self, kernels, base, inputs, scale):
        if scale is None:
            return inputs[0]
        return inputs[0] * scale
