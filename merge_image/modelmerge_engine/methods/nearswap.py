"""mergekit's nearswap (mergekit/merge_methods/nearswap.py, 0.1.5): take the model's value where it is near the
base's, keep the base's where they are far apart. Element by element, in the compute dtype as mergekit's torch
ops on its loaded tensors are (every operation rounded to it):

    weight = clamp(t / max(|base − model|, 1e-6), 0, 1);  merged = weight · model + (1 − weight) · base

`t / x` is torch's `reciprocal(x) * t` (Tensor.__rtruediv__), so the quotient is rounded twice, as there.
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _per_dtype, rnd, store, widen
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method

MIN_DISTANCE = 1e-6  # mergekit's clamp(min=1e-6)


@register_jitable(inline="always")
def _nearswap(constants, args):
    code, = constants
    base, inputs, t, out = args
    model = inputs[0]
    floor = rnd(np.float32(MIN_DISTANCE), code)
    one = np.float32(1.0)
    for e in range(out.shape[0]):
        a = widen(base[e], code)
        b = widen(model[e], code)
        distance = max(abs(rnd(a - b, code)), floor)
        weight = rnd(rnd(one / distance, code) * t, code)
        weight = min(max(weight, np.float32(0.0)), one)
        store(out, e, rnd(weight * b, code) + rnd(rnd(one - weight, code) * a, code), code)


nearswap_kernel = _per_dtype(_nearswap)


@register
class Nearswap(Method):
    name = "nearswap"
    parameters = ("t",)

    def tensor_state(self, plan) -> np.float32:
        return np.float32(self.value("t", tensor=plan.name))

    def combine_cpu(self, kernels, base, inputs, t):
        out = kernels.empty(base)
        nearswap_kernel(kernels.code, base, tuple(inputs), t, out)
        return out

    def combine_torch(self, kernels, base, inputs, t):
        model = inputs[0]
        weight = ((base - model).abs().clamp(min=MIN_DISTANCE).reciprocal() * float(t)).clamp(min=0, max=1)
        return weight * model + (1 - weight) * base
