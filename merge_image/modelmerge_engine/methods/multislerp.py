"""mergekit's multislerp (mergekit/merge_methods/multislerp.py, 0.1.5): barycentric spherical interpolation of the
fine-tunes' task vectors, added to the base, or (a mergekit config without base_model: mergekit's base is optional)
of the models' weights themselves, nothing added. Per tensor, in the compute dtype as mergekit's torch ops are
(every operation rounded to it), with w the model_parameters weights (divided by their sum with normalize_weights):

    v_i = model_i − base (without a base: model_i);  n_i = |v_i|;  u_i = v_i / (n_i + eps)
    m = Σ w_i u_i;  |m| < eps: with two models w_0 v_0 + w_1 v_1 (+ base), else an error naming the tensor
    m̂ = m / |m|;  d_i = u_i · m̂;  r = Σ w_i (u_i − d_i m̂);  ρ = |r| + eps
    merged = base + (m̂ cos ρ + r (sin ρ / ρ)) · Σ w_i n_i  (without a base: no base added, not even 0, which
    would turn −0 into +0)
    one fine-tune: the fine-tune itself (mergekit interpolates nothing)

Four streaming statistics passes over the base (if any) and every fine-tune (the norms n_i, |m|, the dots d_i,
|r|), each a segment at a time, reduced in torch's CPU order (torch_reductions.py), so memory stays a few segments
whatever the tensor. cos and sin are torch's CPU functions on values of the compute dtype
(torch_reductions.scalar_function), so the scalars are mergekit's to the bit: for bfloat16 and float16 SLEEF's
functions as torch's kernels take them, reproduced without torch (methods/sleef.py); for float32 torch's own
(MKL's) where torch is installed, SLEEF's where it is not (the CPU merge image), which differ from MKL's in the last
bit for a few percent of arguments.
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _per_dtype, _specialised, rnd, store, widen
from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.errors import MergeError
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.methods.torch_reductions import (
    LANES,
    host_values,
    norm_add,
    norm_finish,
    rounded,
    row_sum,
    scalar_function,
    sum_begin,
    sum_finish,
    sum_rows,
    task_vectors,
)
from modelmerge_engine.progress import Step

SEGMENT = 1 << 20  # values of each input per statistics step (a multiple of torch_reductions' row of vectors)
PASSES = 4


BLOCK = 512  # elements per step of the combine step's loops (each loop over a block vectorises)


@register_jitable(inline="always")
def _means_into(vectors, denominators, weights, code, out, n):
    """out[e] = m at element e: Σ_i w_i (v_i / (n_i + eps)), products rounded, summed from 0 in model order,
    the sum rounded once; vectors [models, elements], the first n elements (of each array) taken."""
    for e in range(n):
        out[e] = np.float32(0.0)
    for i in range(vectors.shape[0]):
        denominator, weight = denominators[i], weights[i]
        for e in range(n):
            out[e] += rnd(rnd(vectors[i, e] / denominator, code) * weight, code)
    for e in range(n):
        out[e] = rnd(out[e], code)


@register_jitable(inline="always")
def _mean_hats_into(vectors, denominators, weights, mean_norm, code, out, n):
    """out[e] = m̂ at element e: m / |m|."""
    _means_into(vectors, denominators, weights, code, out, n)
    for e in range(n):
        out[e] = rnd(out[e] / mean_norm, code)


@register_jitable(inline="always")
def _tangents_into(vectors, denominators, weights, mean_hats, dots, code, out, n):
    """out[e] = r at element e: Σ_i w_i (u_i − d_i m̂), summed from 0 in model order, rounded once."""
    for e in range(n):
        out[e] = np.float32(0.0)
    for i in range(vectors.shape[0]):
        denominator, weight, dot = denominators[i], weights[i], dots[i]
        for e in range(n):
            unit = rnd(vectors[i, e] / denominator, code)
            out[e] += rnd(rnd(unit - rnd(dot * mean_hats[e], code), code) * weight, code)
    for e in range(n):
        out[e] = rnd(out[e], code)


@register_jitable(inline="always")
def _means(constants, args):
    code, = constants
    vectors, denominators, weights, out = args
    _means_into(vectors, denominators, weights, code, out, out.shape[0])


@register_jitable(inline="always")
def _unit_products(constants, args):
    """out[i, e] = u_i · m̂ at element e (rounded), for the dots; hats is scratch for m̂."""
    code, = constants
    vectors, denominators, weights, mean_norm, hats, out = args
    _mean_hats_into(vectors, denominators, weights, mean_norm, code, hats, hats.shape[0])
    for i in range(out.shape[0]):
        denominator = denominators[i]
        for e in range(out.shape[1]):
            out[i, e] = rnd(rnd(vectors[i, e] / denominator, code) * hats[e], code)


@register_jitable(inline="always")
def _tangents(constants, args):
    code, = constants
    vectors, denominators, weights, mean_norm, dots, hats, out = args
    _mean_hats_into(vectors, denominators, weights, mean_norm, code, hats, out.shape[0])
    _tangents_into(vectors, denominators, weights, hats, dots, code, out, out.shape[0])


# the statistics passes' kernels on float32 host values [models, elements], specialised per dtype
means, unit_products, tangents = _per_dtype(_means), _per_dtype(_unit_products), _per_dtype(_tangents)


@register_jitable(inline="always")
def _multislerp(constants, args):
    """with_base: the task vectors interpolated and the base added; else the models' values themselves. A block
    of BLOCK elements at a time: the task vectors, then each intermediate over the block, model by model."""
    code, with_base = constants
    base, inputs, denominators, weights, scalars, out = args
    mean_norm, cos_rho, ratio, scale, linear = scalars[0], scalars[1], scalars[2], scalars[3], scalars[4] != 0
    dots = scalars[5:]
    count = len(inputs)
    v = np.empty((count, BLOCK), np.float32)
    b, hat, tangent = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for start in range(0, out.shape[0], BLOCK):
        n = min(BLOCK, out.shape[0] - start)
        for k in range(n):
            b[k] = widen(base[start + k], code) if with_base else np.float32(0.0)
        i = 0
        for model in inputs:
            for k in range(n):
                x = widen(model[start + k], code)
                v[i, k] = rnd(x - b[k], code) if with_base else x
            i += 1
        if linear:
            for k in range(n):
                merged = rnd(rnd(v[0, k] * weights[0], code) + rnd(v[1, k] * weights[1], code), code)
                store(out, start + k, b[k] + merged if with_base else merged, code)
            continue
        _mean_hats_into(v, denominators, weights, mean_norm, code, hat, n)
        _tangents_into(v, denominators, weights, hat, dots, code, tangent, n)
        for k in range(n):
            sphere = rnd(rnd(hat[k] * cos_rho, code) + rnd(tangent[k] * ratio, code), code)
            merged = rnd(sphere * scale, code)
            store(out, start + k, b[k] + merged if with_base else merged, code)


def multislerp_kernel(code, *args, with_base: bool = True):
    _specialised(_multislerp, int(code), bool(with_base))(args)


@register
class Multislerp(Method):
    name = "multislerp"
    parameters = ("model_parameters", "normalize_weights", "eps")
    statistics_ahead = True

    def __init__(self, merge):
        super().__init__(merge)
        # a mergekit config without base_model: the models' values are interpolated, no base subtracted or added
        self.with_base = self.request.config is None or self.request.config.base_model is not None

    def planned_steps(self, merge_work: int, statistics_work: int) -> list[Step]:
        """The merge step holds the four statistics passes over the base and every fine-tune (none with one)."""
        count = len(self.merge.finetunes)
        passes = PASSES if count > 1 else 0
        reads = count + 1 if self.with_base else count
        statistics = sum(plan.numel * reads * passes for plan in self.merge.plans if plan.merged)
        return [Step("merge", merge_work + statistics_work + statistics)]

    def _round(self, values) -> np.ndarray:
        return rounded(values, self.merge.dtype.code)

    def _segments(self, name: str, numel: int):
        merge = self.merge
        for start in range(0, numel, SEGMENT):
            stop = min(start + SEGMENT, numel)
            models = tuple(host_values(merge, model, name, start, stop) for model in merge.finetunes)
            vectors = np.empty((len(models), stop - start), np.float32)
            if self.with_base:
                task_vectors(merge.dtype.code, host_values(merge, merge.base, name, start, stop), models, vectors)
            else:
                vectors[:] = models
            merge.progress.advance((len(models) + self.with_base) * (stop - start))
            yield vectors

    def _norm(self, name: str, numel: int, rows, values_of) -> np.ndarray:
        """The 2-norms (torch's order, rounded to the dtype) of `rows` rows that values_of(vectors) gives per
        segment."""
        packed = self.merge.dtype.code != F32
        acc = np.zeros((rows, LANES), np.float32)
        tails = [np.empty(0, np.float32)] * rows
        for vectors in self._segments(name, numel):
            values = values_of(vectors).reshape(rows, -1)
            for i in range(rows):
                tails[i] = values[i, norm_add(values[i], packed, acc[i]):].copy()
        return self._round([norm_finish(tails[i], acc[i]) for i in range(rows)])

    def tensor_state(self, plan) -> np.ndarray | None:
        """The tensor's scalars [|m|, cos ρ, sin ρ / ρ, Σ w_i n_i, linear?, d_0, ...], the denominators n_i + eps
        and the weights; None with one fine-tune."""
        name, numel, code = plan.name, plan.numel, self.merge.dtype.code
        count = len(self.merge.finetunes)
        if count == 1:
            return None
        packed = code != F32
        eps = np.float32(float(self.value("eps", tensor=name)))
        weights = self._round([float(self.value("weight", tensor=name, model=i)) for i in range(count)])
        if self.value("normalize_weights", tensor=name):
            weights = self._round(weights / self._round(row_sum(weights, packed))[0])
        norms = self._norm(name, numel, count, lambda vectors: vectors)
        denominators = self._round(norms + eps)

        def mean_of(vectors):
            out = np.empty(vectors.shape[1], np.float32)
            means(code, vectors, denominators, weights, out)
            return out

        mean_norm = self._norm(name, numel, 1, mean_of)[0]
        scalars = np.zeros(5 + count, np.float32)
        if float(mean_norm) < float(self.value("eps", tensor=name)):
            if count != 2:
                raise MergeError(f"multislerp: tensor {name}: the weighted sum of the unit task vectors is zero "
                                 "(antipodal models whose weights balance out); change model_parameters weights")
            scalars[4] = 1.0
            return denominators, weights, scalars
        accumulators = [sum_begin(numel, packed) for _ in range(count)]
        tails = [np.empty(0, np.float32)] * count
        for vectors in self._segments(name, numel):
            products = np.empty_like(vectors)
            unit_products(code, vectors, denominators, weights, mean_norm, np.empty(vectors.shape[1], np.float32),
                          products)
            for i, (acc, state) in enumerate(accumulators):
                tails[i] = products[i, sum_rows(products[i], acc, state):].copy()
        dots = self._round([sum_finish(tails[i], *accumulators[i]) for i in range(count)])

        def tangent_of(vectors):
            out = np.empty(vectors.shape[1], np.float32)
            tangents(code, vectors, denominators, weights, mean_norm, dots, np.empty(vectors.shape[1], np.float32),
                     out)
            return out

        rho = self._round(self._norm(name, numel, 1, tangent_of)[0] + eps)[0]
        cos_rho, sin_rho = (scalar_function(name, rho, code) for name in ("cos", "sin"))
        ratio = self._round(sin_rho / rho)[0]
        scale = self._round(row_sum(self._round(norms * weights), packed))[0]
        scalars[:5] = mean_norm, cos_rho, ratio, scale, 0.0
        scalars[5:] = dots
        return denominators, weights, scalars

    def combine_cpu(self, kernels, base, inputs, state):
        if state is None:
            return inputs[0].copy()
        out = kernels.empty(base)
        multislerp_kernel(kernels.code, base, tuple(inputs), *state, out, with_base=self.with_base)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        if state is None:
            return inputs[0].clone()
        torch = kernels.torch
        from modelmerge_engine.torch_kernels import rounder

        rnd = rounder(base.dtype)
        denominators, weights, scalars = state
        b = base.to(torch.float32)
        vectors = [rnd(raw.to(torch.float32) - b) if self.with_base else raw.to(torch.float32) for raw in inputs]

        def placed(merged):
            return (b + merged if self.with_base else merged).to(kernels.tdtype)

        if scalars[4]:
            return placed(rnd(rnd(vectors[0] * float(weights[0])) + rnd(vectors[1] * float(weights[1]))))
        units = [rnd(v / float(d)) for v, d in zip(vectors, denominators, strict=True)]
        total = torch.zeros_like(b)
        for unit, weight in zip(units, weights, strict=True):
            total += rnd(unit * float(weight))
        mean_hat = rnd(rnd(total) / float(scalars[0]))
        tangent = torch.zeros_like(b)
        for unit, weight, dot in zip(units, weights, scalars[5:], strict=True):
            tangent += rnd(rnd(unit - rnd(float(dot) * mean_hat)) * float(weight))
        sphere = rnd(rnd(mean_hat * float(scalars[1])) + rnd(rnd(tangent) * float(scalars[2])))
        return placed(rnd(sphere * float(scalars[3])))
