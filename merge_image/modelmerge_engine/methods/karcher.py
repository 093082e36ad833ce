"""mergekit's karcher (mergekit/merge_methods/karcher.py, 0.1.5): the weighted Karcher (Riemannian) mean of the
models' tensors on the unit sphere, scaled by their mean norm. Every model of models_to_merge is an input with
weight 1/N (a mergekit config's base_model is one more input, mergekit_config.BASE_AS_INPUT); per tensor, in the
compute dtype as mergekit's torch ops are (every elementwise operation rounded to it):

    n_i = |x_i| (float32);  u_i = x_i / n_i (0 where n_i = 0);  the inputs with n_i > tol take part (V)
    a_j = (1/N) / Σ_V (1/N);  m = Σ_V a_j u_j;  m = m / |m|  (|m| < tol: the first of V's unit vector)
    max_iter times:  d_j = clamp(m · u_j, −1, 1);  θ_j = acos d_j;  those with θ_j >= tol:
                     t = Σ_j a_j (θ_j / sin θ_j) (u_j − d_j m);  |t| < tol: stop
                     m = cos|t| m + sin|t| (t / |t|);  m = m / |m| where |m| > tol
    merged = (Σ_i n_i / N) · m;  one model: itself;  every norm <= tol: zeros

Each output element depends only on the inputs' values at that element and on the tensor's scalars (the norms,
the dots, the coefficients, cos|t|, sin|t|, the norms of m and t): `tensor_state` computes the scalars as mergekit
does, with torch's own CPU reductions and functions (torch.dot, vector_norm, acos, sin, cos) over the whole
tensor, so they are mergekit's to the bit; the combine step of a range replays the elementwise arithmetic from
the inputs with them, in the compiled kernel or in torch (CUDA for use_gpu), each operation rounded where torch
rounds. The statistics hold the tensor's unit vectors in the compute dtype (mergekit holds its inputs as well), not
a segment at a time; torch splits its reductions of more than 32768 elements between its threads, so a large
tensor's scalars are mergekit's where both run with the same number of threads (torch's default, the cores).

Where torch is not installed (the CPU merge image) `_state_without_torch` takes the same steps over the whole
tensor without it: the elementwise steps with the combine step's own rounded arithmetic, the float32 2-norms and
the 16-bit dots reduced in torch's CPU order (torch_reductions.row_norm, row_dot: torch's to the bit for rows of
up to 4096 values; torch reduces longer 16-bit dots another way, which only rarely shows after the dot is rounded
to the dtype), acos, sin and cos SLEEF's (torch_reductions.scalar_function, methods/sleef.py: torch's own for
bfloat16 and float16 values, to the bit). So 16-bit merges are torch's, and mergekit's, wherever those agree (every
element of the tiny test families in bfloat16 and float16). A float32 dot torch hands to MKL's sdot, whose order
cannot be reproduced, and torch's float32 acos, sin and cos are MKL's, from which SLEEF's differ in the last bit
for a few percent of arguments: without torch a float32 merge
can differ from the one with torch in the last bits, more where several iterations run (3 inputs of the tiny
families: a third of the elements, each within 2e-7 of its tensor's largest magnitude, which is a few thousand
ulps only for the elements nearest zero)."""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _per_dtype, rnd, store, widen
from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.methods.torch_reductions import (
    _torch,
    host_values,
    rounded,
    row_dot,
    row_norm,
    scalar_function,
)
from modelmerge_engine.progress import Step

ZERO = "zero"  # a tensor whose inputs all have norms <= tol: mergekit writes zeros


@register_jitable(inline="always")
def _unit(x, norm, code):
    """u = x / |x| (0 where |x| = 0), rounded to the compute dtype."""
    return np.float32(0.0) if norm == 0 else rnd(x / norm, code)


@register_jitable(inline="always")
def _tangent_term(t, u, dot, m, coef, code):
    """t + coef (u - dot m), each operation rounded."""
    return rnd(t + rnd(coef * rnd(u - rnd(dot * m, code), code), code), code)


@register_jitable(inline="always")
def _moved(m, t, cos, sin, tangent_norm, code):
    """cos|t| m + sin|t| (t / |t|), each operation rounded."""
    return rnd(rnd(cos * m, code) + rnd(sin * rnd(t / tangent_norm, code), code), code)


@register_jitable(inline="always")
def _karcher(constants, args):
    """One range: the units, the first mean and each recorded iteration replayed element by element, then the
    scale; every operation rounded to the compute dtype where mergekit's torch ops round."""
    code, = constants
    inputs, norms, valid, alphas, start, dots, coefs, moves, scale, out = args
    count = len(inputs)
    u = np.empty(count, np.float32)
    for e in range(out.shape[0]):
        for i in range(count):
            u[i] = _unit(widen(inputs[i][e], code), norms[i], code)
        m = np.float32(0.0)
        for j in range(valid.shape[0]):
            m = rnd(m + rnd(u[valid[j]] * alphas[j], code), code)
        m = u[valid[0]] if start[1] != 0 else rnd(m / start[0], code)
        for k in range(moves.shape[0]):
            t = np.float32(0.0)
            for j in range(valid.shape[0]):
                if coefs[k, j] == coefs[k, j]:  # NaN: θ_j < tol, left out of this iteration
                    t = _tangent_term(t, u[valid[j]], dots[k, j], m, coefs[k, j], code)
            m = _moved(m, t, moves[k, 0], moves[k, 1], moves[k, 2], code)
            if moves[k, 4] != 0:
                m = rnd(m / moves[k, 3], code)
        store(out, e, rnd(scale * m, code), code)


karcher_kernel = _per_dtype(_karcher)


# The torch-free statistics (the CPU merge image has no torch): the same arithmetic over whole tensors of float32
# values of the compute dtype.
@njit(nogil=True, cache=True)
def _units_of(values, norm, code, out):
    for e in range(out.shape[0]):
        out[e] = _unit(values[e], norm, code)


@njit(nogil=True, cache=True)
def _first_mean(units, valid, alphas, code, out):
    """Σ_V a_j u_j, accumulated in the order torch's `mean += share * unit` does, each operation rounded."""
    for e in range(out.shape[0]):
        m = np.float32(0.0)
        for j in range(valid.shape[0]):
            m = rnd(m + rnd(units[valid[j], e] * alphas[j], code), code)
        out[e] = m


@njit(nogil=True, cache=True)
def _divided(values, divisor, code, out):
    for e in range(out.shape[0]):
        out[e] = rnd(values[e] / divisor, code)


@njit(nogil=True, cache=True)
def _tangent(units, valid, dots, coefs, m, code, out):
    for e in range(out.shape[0]):
        t = np.float32(0.0)
        for j in range(valid.shape[0]):
            if coefs[j] == coefs[j]:
                t = _tangent_term(t, units[valid[j], e], dots[j], m[e], coefs[j], code)
        out[e] = t


@njit(nogil=True, cache=True)
def _move(m, t, cos, sin, tangent_norm, code, out):
    for e in range(out.shape[0]):
        out[e] = _moved(m[e], t[e], cos, sin, tangent_norm, code)


@register
class Karcher(Method):
    name = "karcher"
    parameters = ("max_iter", "tol")

    def planned_steps(self, merge_work: int, statistics_work: int) -> list[Step]:
        """The merge step holds one read of every input for the statistics (none with one model)."""
        count = len(self.merge.finetunes)
        statistics = sum(plan.numel * count for plan in self.merge.plans if plan.merged) if count > 1 else 0
        return [Step("merge", merge_work + statistics_work + statistics)]

    def tensor_state(self, plan):
        """None with one model; ZERO where no input's norm exceeds tol; else the replay's scalars: (norms, valid,
        alphas, start = [|m|, first unit?], dots [K, V], coefs [K, V] (NaN: left out), moves [K, 5] = [cos|t|,
        sin|t| (both in the dtype), |t|, |m|, renormalised?], scale (in the dtype)). With torch installed the
        scalars are torch's own; without it (the CPU merge image) `_state_without_torch` computes them."""
        merge = self.merge
        count = len(merge.finetunes)
        if count == 1:
            return None
        name = plan.name
        max_iter = int(self.value("max_iter", tensor=name))
        tol = float(self.value("tol", tensor=name))
        torch = _torch()
        if torch is None:
            return self._state_without_torch(plan, max_iter, tol)
        numel = plan.numel
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[merge.dtype.name]
        norms, units = [], []
        for model in merge.finetunes:  # one input at a time: the iteration needs only its unit vector
            x = torch.from_numpy(host_values(merge, model, name, 0, numel)).to(dtype)
            norms.append(torch.linalg.vector_norm(x.float()))
            units.append(torch.zeros_like(x) if norms[-1].item() == 0.0 else (x / norms[-1]).to(dtype))
            merge.progress.advance(numel)
        valid = [i for i, n in enumerate(norms) if n.item() > tol]
        if not valid:
            return ZERO
        alphas = [1.0 / count] * count
        total = sum(alphas[i] for i in valid)
        shares = [alphas[i] / total for i in valid]
        mean = torch.zeros_like(units[valid[0]])
        for share, i in zip(shares, valid, strict=True):
            mean += share * units[i]
        mean_norm = torch.linalg.vector_norm(mean.float())
        first = mean_norm.item() < tol
        mean = units[valid[0]].clone() if first else (mean / mean_norm).to(dtype)
        dots, coefs, moves = [], [], []
        for _ in range(max_iter):
            tangent = torch.zeros_like(mean)
            dot_row, coef_row = [], []
            for share, i in zip(shares, valid, strict=True):
                dot = torch.clamp(torch.dot(mean.flatten(), units[i].flatten()), -1.0, 1.0)
                theta = torch.arccos(dot)
                dot_row.append(dot.item())
                if theta.item() < tol:
                    coef_row.append(float("nan"))
                    continue
                coef = share * (theta / torch.sin(theta))
                coef_row.append(coef.item())
                tangent += coef * (units[i] - dot * mean)
            tangent_norm = torch.linalg.vector_norm(tangent.float())
            if tangent_norm.item() < tol:
                break
            cos, sin = torch.cos(tangent_norm), torch.sin(tangent_norm)
            mean = (cos * mean + sin * (tangent / tangent_norm)).to(dtype)
            mean_norm_k = torch.linalg.vector_norm(mean.float())
            renormalised = mean_norm_k.item() > tol
            if renormalised:
                mean = (mean / mean_norm_k).to(dtype)
            dots.append(dot_row)
            coefs.append(coef_row)
            moves.append([cos.to(dtype).item(), sin.to(dtype).item(), tangent_norm.item(), mean_norm_k.item(),
                          float(renormalised)])
        scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
        width = len(valid)
        return (np.array([n.item() for n in norms], np.float32), np.array(valid, np.int64),
                np.array(shares, np.float32), np.array([mean_norm.item(), float(first)], np.float32),
                np.array(dots, np.float32).reshape(-1, width), np.array(coefs, np.float32).reshape(-1, width),
                np.array(moves, np.float32).reshape(-1, 5), np.float32(scale.to(dtype).item()))

    def _state_without_torch(self, plan, max_iter: int, tol: float):
        """tensor_state's scalars where torch is not installed: the same steps over float32 arrays of the compute
        dtype's values, each elementwise operation rounded as the combine step rounds it; the norms and dots are
        torch_reductions' (torch's CPU order: float32 2-norms, 16-bit dots of up to 4096 values to the bit; a
        float32 dot, which torch hands to MKL, within a few float32 ulps) and acos, sin, cos the correctly rounded
        values (torch's SLEEF ones differ in the last bit for a few percent of arguments). So on 16-bit compute
        the result is torch's wherever those functions agree, and a float32 merge may differ from the one with
        torch installed in the last bits of a few elements."""
        merge = self.merge
        code = merge.dtype.code
        count = len(merge.finetunes)
        name, numel = plan.name, plan.numel
        norms = np.empty(count, np.float32)
        units = np.empty((count, numel), np.float32)
        for i, model in enumerate(merge.finetunes):
            values = host_values(merge, model, name, 0, numel)
            norms[i] = row_norm(values, False)
            _units_of(values, norms[i], code, units[i])
            merge.progress.advance(numel)
        valid = np.array([i for i in range(count) if float(norms[i]) > tol], np.int64)
        if not len(valid):
            return ZERO
        total = sum(1.0 / count for _ in valid)
        shares = [(1.0 / count) / total for _ in valid]
        alphas = np.array(shares, np.float32)
        mean = np.empty(numel, np.float32)
        _first_mean(units, valid, alphas, code, mean)
        mean_norm = row_norm(mean, False)
        first = float(mean_norm) < tol
        if first:
            mean = units[valid[0]].copy()
        else:
            _divided(mean.copy(), mean_norm, code, mean)
        tangent, moved = np.empty(numel, np.float32), np.empty(numel, np.float32)
        dots, coefs, moves = [], [], []
        for _ in range(max_iter):
            dot_row = np.empty(len(valid), np.float32)
            coef_row = np.empty(len(valid), np.float32)
            for j, (share, i) in enumerate(zip(alphas, valid, strict=True)):
                dot_row[j] = np.clip(rounded(row_dot(mean, units[i]), code)[0], np.float32(-1.0), np.float32(1.0))
                theta = scalar_function("acos", dot_row[j], code)
                if float(theta) < tol:
                    coef_row[j] = np.nan
                    continue
                ratio = rounded(theta / scalar_function("sin", theta, code), code)[0]
                coef_row[j] = rounded(share * ratio, code)[0]
            _tangent(units, valid, dot_row, coef_row, mean, code, tangent)
            tangent_norm = row_norm(tangent, False)
            if float(tangent_norm) < tol:
                break
            cos, sin = (rounded(scalar_function(f, tangent_norm, F32), code)[0] for f in ("cos", "sin"))
            _move(mean, tangent, cos, sin, tangent_norm, code, moved)
            mean_norm_k = row_norm(moved, False)
            renormalised = float(mean_norm_k) > tol
            if renormalised:
                _divided(moved, mean_norm_k, code, mean)
            else:
                mean[:] = moved
            dots.append(dot_row)
            coefs.append(coef_row)
            moves.append([cos, sin, tangent_norm, mean_norm_k, float(renormalised)])
        scale = np.float32(0.0)
        for norm in norms:  # Σ alpha_i n_i: float32 products added one by one, as Python's sum of 0-dim tensors
            scale = np.float32(scale + np.float32(np.float32(1.0 / count) * norm))
        width = len(valid)
        return (norms, valid, alphas, np.array([mean_norm, float(first)], np.float32),
                np.array(dots, np.float32).reshape(-1, width), np.array(coefs, np.float32).reshape(-1, width),
                np.array(moves, np.float32).reshape(-1, 5), rounded(scale, code)[0])

    def combine_cpu(self, kernels, base, inputs, state):
        if state is None:
            return inputs[0].copy()
        out = kernels.empty(base)
        if state is ZERO:
            out.fill(0)
            return out
        karcher_kernel(kernels.code, tuple(inputs), *state, out)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        if state is None:
            return inputs[0].clone()
        torch = kernels.torch
        if state is ZERO:
            return torch.zeros_like(base, dtype=kernels.tdtype)
        from modelmerge_engine.torch_kernels import rounder

        rnd = rounder(base.dtype)

        def divide(x, value):
            """x / value, correctly rounded: CUDA divides by a Python number as a product with its reciprocal."""
            return x / torch.full((), float(value), dtype=torch.float32, device=x.device)

        norms, valid, alphas, start, dots, coefs, moves, scale = state
        units = [rnd(divide(x.to(torch.float32), norms[i])) if norms[i] else torch.zeros_like(x, dtype=torch.float32)
                 for i, x in enumerate(inputs)]
        m = torch.zeros_like(units[0])
        for j, i in enumerate(valid):
            m = rnd(m + rnd(units[i] * float(alphas[j])))
        m = units[valid[0]] if start[1] else rnd(divide(m, start[0]))
        for k in range(moves.shape[0]):
            t = torch.zeros_like(m)
            for j, i in enumerate(valid):
                if not np.isnan(coefs[k, j]):
                    t = rnd(t + rnd(float(coefs[k, j]) * rnd(units[i] - rnd(float(dots[k, j]) * m))))
            cos, sin, tangent_norm, mean_norm, renormalised = (float(v) for v in moves[k])
            m = rnd(rnd(cos * m) + rnd(sin * rnd(divide(t, tangent_norm))))
            if renormalised:
                m = rnd(divide(m, mean_norm))
        return rnd(float(scale) * m).to(kernels.tdtype)
