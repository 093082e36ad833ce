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

Two paths, by the tensor's size:

- Tensors of at most EXACT_NUMEL (32768) values, which torch reduces on one thread (the tiny test families'
  tensors, a model's norms and biases): mergekit's arithmetic replayed exactly. Each output element depends only
  on the inputs' values at that element and on the tensor's scalars (the norms, the dots, the coefficients,
  cos|t|, sin|t|, the norms of m and t): `tensor_state` computes the scalars as mergekit does, over the whole
  tensor (its inputs' unit vectors held, at most EXACT_NUMEL values each), and the combine step of a range replays
  the elementwise arithmetic from the inputs with them, in the compiled kernel or in torch (CUDA for use_gpu),
  each operation rounded where torch rounds. Where the torch-free reductions are torch's (16-bit compute, tensors
  of at most ROW_DOT_NUMEL values) they compute the scalars and torch is never imported (`_state_without_torch`,
  below); else torch's own CPU reductions and functions (torch.dot, vector_norm, acos, sin, cos), mergekit's to
  the bit.
- Larger tensors: the Karcher mean itself, exactly, rounded once. mergekit's iteration in a 16-bit dtype is
  dominated by its own rounding: m · u_j is within a few ulps of 1, so u_j − d_j m, and with it the tangent, is
  mostly the rounding of m, and each of the iterations moves m by that noise. Replaying it takes the tensor's
  scalars of every iteration, three dependent whole-tensor reductions each, so a pass over the inputs per
  reduction or the inputs held (mergekit holds every unit vector and m: gigabytes for an embedding matrix). The
  mean is a combination Σ_j c_j u_j of the unit vectors, so every dot and norm of the iteration is a product with
  their Gram matrix: `_gram_state` makes one streaming pass for it (float64, nothing held but a block of each
  input), `karcher_weights` runs mergekit's steps on it in float64 (O(N²) per step whatever the tensor's size),
  and the combine step writes Σ_i w_i x_i with w_i = scale c_i / |x_i| (the linear kernel: float32 products
  fused into a float32 sum, rounded once to the dtype). On the Qwen2.5-0.5B-shaped bench models (bfloat16, 2
  fine-tunes, θ ≈ 0.14) every element of the tensors checked is the float64 Karcher mean correctly rounded or
  its neighbour (all but a few equal), RMS error 1.7e-3 of the RMS value (bfloat16's own rounding); mergekit's
  bfloat16 result equals that rounded mean on 38-50% of the elements, RMS error 4.3e-3, up to 14000 ulps off
  near zero. So outside the exact path this is not mergekit's bytes: 52.5% of the elements are equal, 41% one
  ulp off. Scalars and edge cases follow mergekit: norms <= tol leave an input out (its norm still in the scale),
  a mean of norm < tol starts from the first valid unit vector, angles < tol drop out, |t| < tol stops, and a
  u_j − d_j m of length below RESIDUAL_FLOOR (antipodal inputs, where mergekit's is 0) adds nothing.

Where torch is not installed (the CPU merge image) `_state_without_torch` takes the exact path's steps over the
whole tensor without it: the elementwise steps with the combine step's own rounded arithmetic, the float32 2-norms
and the 16-bit dots reduced in torch's CPU order (torch_reductions.row_norm, row_dot: torch's to the bit for rows
of up to 4096 values; torch reduces longer 16-bit dots another way, which only rarely shows after the dot is
rounded to the dtype), acos, sin and cos SLEEF's (torch_reductions.scalar_function, methods/sleef.py: torch's own
for bfloat16 and float16 values, to the bit; cos|t| and sin|t| of the float32 |t| SLEEF's float32 functions, which
differ from torch's MKL ones in the last bit for a few percent of arguments: a 16-bit merge sees that only where it
moves the value across a rounding boundary of the dtype). So 16-bit merges are torch's, and mergekit's, wherever
those agree (every element of the tiny test families in bfloat16 and float16). A float32 dot torch hands to MKL's
sdot, whose order cannot be reproduced, and torch's float32 acos, sin and cos are MKL's, from which SLEEF's differ
in the last bit for a few percent of arguments: without torch a float32 merge can differ from the one with torch
in the last bits, more where several iterations run (3 inputs of the tiny families: a third of the elements, each
within 2e-7 of its tensor's largest magnitude, which is a few thousand ulps only for the elements nearest
zero)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _per_dtype, rnd, store, widen
from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.kernels import CpuKernels
from modelmerge_engine.methods import register, sleef
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
EXACT_NUMEL = 1 << 15  # the largest tensor replayed as mergekit computes it (torch reduces it on one thread)
ROW_DOT_NUMEL = 4096  # the longest 16-bit row torch_reductions.row_dot reduces as torch.dot does
GRAM_BLOCK = 1 << 10  # values of each input per block of the Gram kernel (the block stays in cache)
GRAM_SEGMENT = 1 << 20  # values of each input per step of the Gram pass
RESIDUAL_FLOOR = 1e-7  # |u_j − d_j m| below this is the Gram matrix's rounding (antipodal inputs): no direction


@dataclass(frozen=True)
class Weighted:
    """A large tensor's Karcher mean as a weighted sum of its inputs, Σ_i weights_i x_i (float32 weights),
    rounded once to the compute dtype: the linear kernel's arithmetic."""

    weights: np.ndarray


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


def _float32_function(name: str, value) -> np.float32:
    """cos or sin of a float32 tangent norm without importing torch: SLEEF's float32 function (torch's MKL one
    differs in the last bit for a few percent of arguments, which a 16-bit merge only sees where it moves the
    value across a rounding boundary of the dtype)."""
    x = np.float32(value)
    return sleef.scalar(name, x, F32) if sleef.supported(name, x) else scalar_function(name, value, F32)


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _gram_add(inputs, code, gram):
    """gram[i, j] += Σ_e x_i[e] x_j[e] for j <= i over one segment of every input (their values in the compute
    dtype `code`, as stored or widened to float32), in float64: products of float32 values summed in the
    compiler's order, a cache-sized block of every input at a time."""
    count = len(inputs)
    n = inputs[0].shape[0]
    block = np.empty((count, GRAM_BLOCK), np.float32)
    for start in range(0, n, GRAM_BLOCK):
        width = min(GRAM_BLOCK, n - start)
        for i in range(count):
            values = inputs[i]
            for e in range(width):
                block[i, e] = widen(values[start + e], code)
        for i in range(count):
            for j in range(i + 1):
                total = 0.0
                for e in range(width):
                    total += np.float64(block[i, e]) * np.float64(block[j, e])
                gram[i, j] += total


def karcher_weights(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray | None:
    """mergekit's iteration in exact (float64) arithmetic on the inputs' Gram matrix (its lower triangle, as
    _gram_add fills it): the mean is a combination Σ_j c_j u_j of the unit vectors u_j = x_j / |x_j|, so each of
    its dots, norms and moves is a product with the unit vectors' Gram matrix U, O(N²) per step whatever the
    tensor's size. Returns the float32 weights w_i = scale c_i / |x_i| of merged = Σ_i w_i x_i (0 for the inputs
    left out), or None where no input's norm exceeds tol (mergekit writes zeros)."""
    count = gram.shape[0]
    full = np.tril(gram) + np.tril(gram, -1).T
    norms = np.sqrt(np.maximum(np.diag(full), 0.0))
    valid = np.flatnonzero(norms > tol)
    if not len(valid):
        return None
    lengths = norms[valid]
    unit = full[np.ix_(valid, valid)] / np.outer(lengths, lengths)
    share = 1.0 / len(valid)  # each input's 1/N normalised over the valid ones

    def length(c):
        return math.sqrt(max(float(c @ unit @ c), 0.0))

    mean = np.full(len(valid), share)
    mean_norm = length(mean)
    if mean_norm < tol:
        mean = np.zeros(len(valid))
        mean[0] = 1.0
    else:
        mean /= mean_norm
    for _ in range(max_iter):
        dots = np.clip(unit @ mean, -1.0, 1.0)
        tangent = np.zeros(len(valid))
        for j, dot in enumerate(dots):
            theta = math.acos(dot)
            if theta < tol:
                continue
            residual = -dot * mean  # u_j − d_j m, whose length is sin θ_j
            residual[j] += 1.0
            residual_norm = length(residual)
            if residual_norm < RESIDUAL_FLOOR:
                continue
            tangent += share * (theta / residual_norm) * residual
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        moved_norm = length(mean)
        if moved_norm > tol:
            mean /= moved_norm
    scale = float(norms.sum()) / count  # Σ_i (1/N) |x_i|, the left-out inputs' norms included as mergekit's
    weights = np.zeros(count, np.float32)
    weights[valid] = scale * mean / lengths
    return weights


@register
class Karcher(Method):
    name = "karcher"
    parameters = ("max_iter", "tol")

    def prepare(self) -> None:
        """Compiles the Gram path's kernels for this merge's signatures (the count of inputs, the dtype) or loads
        them from numba's cache: precompile's tiny merges, whose tensors all take the exact path, so leave them
        in the cache for the first merge of a large model."""
        merge = self.merge
        count = len(merge.finetunes)
        if count == 1:
            return
        code, storage = merge.dtype.code, merge.dtype.storage
        for stored in {np.dtype(storage), np.dtype(np.float32)}:  # as mapped, and widened by host_values
            _gram_add(tuple(np.zeros(1, stored) for _ in range(count)), code, np.zeros((count, count)))
        kernels = merge.kernels
        if isinstance(kernels, CpuKernels):
            values = tuple(np.zeros(1, storage) for _ in range(count))
            self.combine_cpu(kernels, values[0], values, Weighted(np.zeros(count, np.float32)))

    def planned_steps(self, merge_work: int, statistics_work: int) -> list[Step]:
        """The merge step holds one read of every input for the statistics (none with one model)."""
        count = len(self.merge.finetunes)
        statistics = sum(plan.numel * count for plan in self.merge.plans if plan.merged) if count > 1 else 0
        return [Step("merge", merge_work + statistics_work + statistics)]

    def tensor_state(self, plan):
        """None with one model; ZERO where no input's norm exceeds tol; a tensor of more than EXACT_NUMEL values
        Weighted (`_gram_state`); else the replay's scalars: (norms, valid, alphas, start = [|m|, first unit?],
        dots [K, V], coefs [K, V] (NaN: left out), moves [K, 5] = [cos|t|, sin|t| (both in the dtype), |t|, |m|,
        renormalised?], scale (in the dtype)), torch's own where the torch-free reductions are not torch's and
        torch is installed, else from `_state_without_torch`."""
        merge = self.merge
        count = len(merge.finetunes)
        if count == 1:
            return None
        name = plan.name
        max_iter = int(self.value("max_iter", tensor=name))
        tol = float(self.value("tol", tensor=name))
        if plan.numel > EXACT_NUMEL:
            return self._gram_state(plan, max_iter, tol)
        # torch only where the torch-free reductions are not torch's: float32 (MKL's sdot, acos, sin, cos) and
        # 16-bit dots of more than ROW_DOT_NUMEL values; a 16-bit merge of small tensors never imports it
        torch = _torch() if merge.dtype.code == F32 or plan.numel > ROW_DOT_NUMEL else None
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
            cos, sin = (rounded(_float32_function(f, tangent_norm), code)[0] for f in ("cos", "sin"))
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

    def _gram_state(self, plan, max_iter: int, tol: float):
        """A tensor of more than EXACT_NUMEL values: one streaming pass for the Gram matrix of its inputs
        (float64; a segment of every input at a time, read as stored, so nothing is held but GRAM_BLOCK values of
        each), then mergekit's iteration on the Gram matrix (karcher_weights): Weighted, or ZERO where no
        input's norm exceeds tol."""
        merge = self.merge
        count = len(merge.finetunes)
        name, numel = plan.name, plan.numel
        # the stored values where every input holds the compute dtype (views of the mapped files), else each
        # segment widened to float32 values of the compute dtype
        stored = (all(model.tensors[name].dtype.code == merge.dtype.code for model in merge.finetunes)
                  and not merge.moves_rows(name))
        gram = np.zeros((count, count))
        for start in range(0, numel, GRAM_SEGMENT):
            stop = min(start + GRAM_SEGMENT, numel)
            segment = tuple(model.read(name, start, stop) if stored else host_values(merge, model, name, start, stop)
                            for model in merge.finetunes)
            _gram_add(segment, merge.dtype.code, gram)
            merge.progress.advance(count * (stop - start))
        weights = karcher_weights(gram, max_iter, tol)
        return ZERO if weights is None else Weighted(weights)

    def combine_cpu(self, kernels, base, inputs, state):
        if state is None:
            return inputs[0].copy()
        out = kernels.empty(base)
        if state is ZERO:
            out.fill(0)
            return out
        if isinstance(state, Weighted):
            kernels.k.linear(kernels.code, tuple(inputs), state.weights, np.float32(1.0), out, normalize=False)
            return out
        karcher_kernel(kernels.code, tuple(inputs), *state, out)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        if state is None:
            return inputs[0].clone()
        torch = kernels.torch
        if state is ZERO:
            return torch.zeros_like(base, dtype=kernels.tdtype)
        if isinstance(state, Weighted):
            merged = kernels.k.linear(inputs, [float(w) for w in state.weights], 1.0, normalize=False)
            return merged.to(kernels.tdtype)
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
