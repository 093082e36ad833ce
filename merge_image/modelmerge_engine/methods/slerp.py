"""mergekit's slerp (mergekit/merge_methods/slerp.py, 0.1.5): spherical interpolation between the base model
(t = 0) and the one model of models_to_merge (t = 1), tensor by tensor.

Per tensor, in float32 (mergekit widens the inputs, which are in the compute dtype): the 2-norms of both
endpoints (over chunks of 2^20 elements, then the norm of the chunks' norms; a norm <= eps = 1e-8 counts as 1),
the dot product of the normalised endpoints (per chunk, then summed), clamped to [-1, 1]. Where |dot| >
0.9995 (parallel or antiparallel endpoints) the coefficients are lerp's (1 - t, t), else sin((1 - t)θ)/sin θ and
sin(tθ)/sin θ with θ = acos(dot). The merged tensor is coef_a · base + coef_b · model in float32 (two products
and a sum, no fused multiply-add), rounded once to the compute dtype.

The statistics are two streaming passes over each tensor (norms, then the dot product) in torch's reduction
order (torch_reductions.py), a chunk of each endpoint at a time, the chunks of a pass on the merge's threads;
the combine step is per element. The scalar acos and sin are torch's own CPU functions on the float32 values
(MKL's, called in torch's library without importing torch: torch_reductions.scalar_function), so the
coefficients are mergekit's to the bit. Without torch (the CPU merge image) they are the correctly rounded float32
values, which torch's (SLEEF's) differ from in the last bit for 3-8% of arguments: a tensor whose angle rounds
differently then gets coefficients one ulp apart (in 16-bit compute an element now and then one ulp off, in
float32 compute part of the tensor's elements).
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _per_dtype, store, widen
from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.methods.torch_reductions import host_values, row_norm, row_sum, scalar_function, scaled_products

CHUNK_ELEMENTS = 1 << 20  # mergekit's _CHUNK_ELEMENTS: its norms and dot products go chunk by chunk
DOT_THRESHOLD = np.float32(0.9995)
EPS = np.float32(1e-8)


def _f32(value: float) -> np.float32:
    return np.float32(value)


def coefficients(t: float, dot: np.float32) -> tuple[np.float32, np.float32]:
    """(coef_a, coef_b) of slerp at `t` for endpoints whose normalised dot product is `dot`, in float32."""
    t32 = _f32(t)
    one_minus_t = _f32(np.float32(1.0) - t32)
    if abs(dot) > DOT_THRESHOLD:
        return one_minus_t, t32
    theta = scalar_function("acos", dot, F32)
    sin_theta = scalar_function("sin", theta, F32)
    coef_a = _f32(scalar_function("sin", _f32(one_minus_t * theta), F32) / sin_theta)
    coef_b = _f32(scalar_function("sin", _f32(t32 * theta), F32) / sin_theta)
    return coef_a, coef_b


def chunks(numel: int) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK_ELEMENTS, numel)) for start in range(0, numel, CHUNK_ELEMENTS)]


@register_jitable(inline="always")
def _slerp(constants, args):
    """coef_a · base + coef_b · model in float32 (products rounded, then the sum), rounded to the dtype."""
    code, = constants
    base, inputs, coef_a, coef_b, out = args
    model = inputs[0]
    for e in range(out.shape[0]):
        a = coef_a * widen(base[e], code)
        b = coef_b * widen(model[e], code)
        store(out, e, a + b, code)


slerp_kernel = _per_dtype(_slerp)


@register
class Slerp(Method):
    name = "slerp"
    parameters = ("t",)

    def statistics_work(self, group_numel: int) -> int:
        return 4 * group_numel  # two passes over both endpoints

    def tensor_state(self, plan) -> tuple[np.float32, np.float32]:
        merge = self.merge
        endpoints = (merge.base, merge.finetunes[0])
        spans = chunks(plan.numel)

        def values(start: int, stop: int) -> list[np.ndarray]:
            return [host_values(merge, model, plan.name, start, stop) for model in endpoints]

        def chunk_norms(span: tuple[int, int]) -> list[float]:
            return [row_norm(endpoint, False) for endpoint in values(*span)]

        # the chunks of a pass are independent (mergekit reduces each, then their results): they run on the
        # merge's threads, each chunk's statistic in torch's order, the results taken in chunk order
        norms = np.array(list(merge.pool.map(chunk_norms, spans)), np.float32).reshape(-1, 2)
        merge.progress.advance(2 * plan.numel)
        # float32 scalars (a compiled function returns a Python float): the products divide in float32
        norm_a, norm_b = (np.float32(row_norm(np.ascontiguousarray(norms[:, i]), False)) if len(spans)
                          else np.float32(0.0) for i in range(2))
        norm_a = norm_a if norm_a > EPS else np.float32(1.0)
        norm_b = norm_b if norm_b > EPS else np.float32(1.0)

        def chunk_dot(span: tuple[int, int]) -> float:
            products = np.empty(span[1] - span[0], np.float32)
            scaled_products(*values(*span), norm_a, norm_b, products)
            return row_sum(products, False)

        parts = np.array(list(merge.pool.map(chunk_dot, spans)), np.float32)
        merge.progress.advance(2 * plan.numel)
        dot = np.clip(row_sum(parts, False), np.float32(-1.0), np.float32(1.0)) if len(parts) else np.float32(1.0)
        return coefficients(float(self.value("t", tensor=plan.name)), np.float32(dot))

    def combine_cpu(self, kernels, base, inputs, state):
        out = kernels.empty(base)
        slerp_kernel(kernels.code, base, tuple(inputs), state[0], state[1], out)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        torch = kernels.torch
        coef_a, coef_b = (torch.tensor(float(c), dtype=torch.float32, device=base.device) for c in state)
        return (base.to(torch.float32) * coef_a + inputs[0].to(torch.float32) * coef_b).to(kernels.tdtype)
