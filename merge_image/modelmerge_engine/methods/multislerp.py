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
|r|), each a segment of the raw inputs at a time and in one compiled loop per segment that derives a block's values
in cache and reduces them in torch's CPU order (torch_reductions.py), so memory stays a few blocks whatever the
tensor. cos and sin are torch's CPU functions on values of the compute dtype
(torch_reductions.scalar_function), so the scalars are mergekit's to the bit: for bfloat16 and float16 SLEEF's
functions as torch's kernels take them, reproduced without torch (methods/sleef.py); for float32 torch's own
(MKL's) where torch is installed, SLEEF's where it is not (the CPU merge image), which differ from MKL's in the last
bit for a few percent of arguments.
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _specialised, rnd, store
from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.errors import MergeError
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.methods.torch_reductions import (
    LANES,
    SUM_SEGMENT_MULTIPLE,
    block_vectors,
    host_raw,
    norm_finish,
    norms_reduced,
    rounded,
    row_sum,
    scalar_function,
    sum_begin,
    sum_finish,
    sums_reduced,
)
from modelmerge_engine.progress import Step

SEGMENT = 1 << 20  # values of each input read per statistics step (a multiple of BLOCK)
PASSES = 4
BLOCK = 512  # elements per step of the kernels' loops (each loop over a block vectorises; a multiple of the
# reductions' row of vectors, SUM_SEGMENT_MULTIPLE, so only a tensor's last block leaves values to a tail)


@register_jitable(inline="always")
def _units_into(vectors, denominators, code, n):
    """vectors[i, e] = u_i at element e: v_i / (n_i + eps), rounded; in place, the first n elements."""
    for i in range(vectors.shape[0]):
        denominator, row = denominators[i], vectors[i]  # a row: see torch_reductions.block_vectors
        for e in range(n):
            row[e] = rnd(row[e] / denominator, code)


@register_jitable(inline="always")
def _means_into(units, weights, code, out, n):
    """out[e] = m at element e: Σ_i w_i u_i, products rounded, summed from 0 in model order, the sum rounded
    once; units [models, elements], the first n elements taken."""
    for e in range(n):
        out[e] = np.float32(0.0)
    for i in range(units.shape[0]):
        weight, row = weights[i], units[i]
        for e in range(n):
            out[e] += rnd(row[e] * weight, code)
    for e in range(n):
        out[e] = rnd(out[e], code)


@register_jitable(inline="always")
def _mean_hats_into(units, weights, mean_norm, code, out, n):
    """out[e] = m̂ at element e: m / |m|."""
    _means_into(units, weights, code, out, n)
    for e in range(n):
        out[e] = rnd(out[e] / mean_norm, code)


@register_jitable(inline="always")
def _tangents_into(units, weights, mean_hats, dots, code, out, n):
    """out[e] = r at element e: Σ_i w_i (u_i − d_i m̂), summed from 0 in model order, rounded once."""
    for e in range(n):
        out[e] = np.float32(0.0)
    for i in range(units.shape[0]):
        weight, dot, row = weights[i], dots[i], units[i]
        for e in range(n):
            out[e] += rnd(rnd(row[e] - rnd(dot * mean_hats[e], code), code) * weight, code)
    for e in range(n):
        out[e] = rnd(out[e], code)


@register_jitable(inline="always")
def _units_and_hats(code, with_base, base, inputs, start, n, denominators, weights, mean_norm, b, v, hat):
    """v[:, :n] = the unit vectors u_i at elements start..start+n, hat[:n] = m̂ there (b: the base's values)."""
    block_vectors(code, with_base, base, inputs, start, n, b, v)
    _units_into(v, denominators, code, n)
    _mean_hats_into(v, weights, mean_norm, code, hat, n)


# A statistics pass over a segment of the raw inputs, a block of BLOCK elements at a time (in cache): the block's
# task vectors, the pass's values, reduced (norms_reduced, sums_reduced). One loop per pass, each taking only what
# its pass needs, then its accumulators (norms, or sums and states) and the tail; each compiles only its own
# arithmetic (numba inlines every helper a loop calls: see cpu_kernels._bf16_bits for what nesting cost).
@register_jitable(inline="always")
def _norms_pass(constants, args):
    """The task vectors' norms (rows: the models)."""
    code, with_base = constants
    base, inputs, norms, tail = args
    count, size = len(inputs), inputs[0].shape[0]
    v, b = np.empty((count, BLOCK), np.float32), np.empty(BLOCK, np.float32)
    left = 0
    for start in range(0, size, BLOCK):
        n = min(BLOCK, size - start)
        block_vectors(code, with_base, base, inputs, start, n, b, v)
        left = norms_reduced(v, count, n, code != F32, norms, tail)
    return left


@register_jitable(inline="always")
def _means_pass(constants, args):
    """|m| (one row)."""
    code, with_base = constants
    base, inputs, denominators, weights, norms, tail = args
    v, b = np.empty((len(inputs), BLOCK), np.float32), np.empty(BLOCK, np.float32)
    means = np.empty((1, BLOCK), np.float32)
    left = 0
    for start in range(0, inputs[0].shape[0], BLOCK):
        n = min(BLOCK, inputs[0].shape[0] - start)
        block_vectors(code, with_base, base, inputs, start, n, b, v)
        _units_into(v, denominators, code, n)
        _means_into(v, weights, code, means[0], n)
        left = norms_reduced(means, 1, n, code != F32, norms, tail)
    return left


@register_jitable(inline="always")
def _dots_pass(constants, args):
    """The dots d_i = u_i · m̂ (rows: the models; sums)."""
    code, with_base = constants
    base, inputs, denominators, weights, mean_norm, sums, states, tail = args
    count = len(inputs)
    v, products = np.empty((count, BLOCK), np.float32), np.empty((count, BLOCK), np.float32)
    b, hat = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    left = 0
    for start in range(0, inputs[0].shape[0], BLOCK):
        n = min(BLOCK, inputs[0].shape[0] - start)
        _units_and_hats(code, with_base, base, inputs, start, n, denominators, weights, mean_norm, b, v, hat)
        for i in range(count):
            unit, product = v[i], products[i]
            for k in range(n):
                product[k] = rnd(unit[k] * hat[k], code)
        left = sums_reduced(products, count, n, sums, states, tail)
    return left


@register_jitable(inline="always")
def _tangents_pass(constants, args):
    """|r| (one row)."""
    code, with_base = constants
    base, inputs, denominators, weights, mean_norm, dots, norms, tail = args
    tangents, hat = np.empty((1, BLOCK), np.float32), np.empty(BLOCK, np.float32)
    v, b = np.empty((len(inputs), BLOCK), np.float32), np.empty(BLOCK, np.float32)
    left = 0
    for start in range(0, inputs[0].shape[0], BLOCK):
        n = min(BLOCK, inputs[0].shape[0] - start)
        _units_and_hats(code, with_base, base, inputs, start, n, denominators, weights, mean_norm, b, v, hat)
        _tangents_into(v, weights, hat, dots, code, tangents[0], n)
        left = norms_reduced(tangents, 1, n, code != F32, norms, tail)
    return left


NORMS, MEANS, DOTS, TANGENTS = _norms_pass, _means_pass, _dots_pass, _tangents_pass  # the passes, in order


def statistics_pass(code, kind, *args, with_base: bool) -> int:
    """Runs the pass `kind` (NORMS, MEANS, DOTS or TANGENTS) over one segment; returns its rows' tail count."""
    return _specialised(kind, int(code), bool(with_base))(args)


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
        block_vectors(code, with_base, base, inputs, start, n, b, v)
        block = out[start:start + n]  # indexed from 0: see block_vectors
        if linear:
            first, second = v[0], v[1]
            for k in range(n):
                merged = rnd(rnd(first[k] * weights[0], code) + rnd(second[k] * weights[1], code), code)
                store(block, k, b[k] + merged if with_base else merged, code)
            continue
        _units_into(v, denominators, code, n)
        _mean_hats_into(v, weights, mean_norm, code, hat, n)
        _tangents_into(v, weights, hat, dots, code, tangent, n)
        for k in range(n):
            sphere = rnd(rnd(hat[k] * cos_rho, code) + rnd(tangent[k] * ratio, code), code)
            merged = rnd(sphere * scale, code)
            store(block, k, b[k] + merged if with_base else merged, code)


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

    def _pass(self, name: str, numel: int, kind, *operands) -> np.ndarray:
        """One statistics pass (NORMS, MEANS, DOTS or TANGENTS, given what it needs: `operands`) over the tensor, a
        segment of the raw inputs at a time: each of its rows' 2-norm, or for DOTS sum, in torch's order, rounded
        to the dtype."""
        merge, code = self.merge, self.merge.dtype.code
        count = len(merge.finetunes)
        rows = count if kind in (NORMS, DOTS) else 1
        tail = np.empty((rows, BLOCK), np.float32)
        if kind == DOTS:
            begun = [sum_begin(numel, code != F32) for _ in range(rows)]
            accumulators = (np.stack([acc for acc, _ in begun]), np.stack([state for _, state in begun]))
        else:
            accumulators = (np.zeros((rows, LANES), np.float32),)
        left = 0
        for start in range(0, numel, SEGMENT):
            stop = min(start + SEGMENT, numel)
            models = tuple(host_raw(merge, model, name, start, stop) for model in merge.finetunes)
            base = host_raw(merge, merge.base, name, start, stop) if self.with_base else models[0]
            left = statistics_pass(code, kind, base, models, *operands, *accumulators, tail, with_base=self.with_base)
            merge.progress.advance((count + self.with_base) * (stop - start))
        if kind == DOTS:
            return self._round([sum_finish(tail[i, :left].copy(), accumulators[0][i], accumulators[1][i])
                                for i in range(rows)])
        return self._round([norm_finish(tail[i, :left].copy(), accumulators[0][i]) for i in range(rows)])

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
        norms = self._pass(name, numel, NORMS)
        denominators = self._round(norms + eps)
        mean_norm = self._pass(name, numel, MEANS, denominators, weights)[0]
        scalars = np.zeros(5 + count, np.float32)
        if float(mean_norm) < float(self.value("eps", tensor=name)):
            if count != 2:
                raise MergeError(f"multislerp: tensor {name}: the weighted sum of the unit task vectors is zero "
                                 "(antipodal models whose weights balance out); change model_parameters weights")
            scalars[4] = 1.0
            return denominators, weights, scalars
        dots = self._pass(name, numel, DOTS, denominators, weights, mean_norm)
        tangent_norm = self._pass(name, numel, TANGENTS, denominators, weights, mean_norm, dots)[0]
        rho = self._round(tangent_norm + eps)[0]
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


assert BLOCK % SUM_SEGMENT_MULTIPLE == 0 and SEGMENT % BLOCK == 0
