"""mergekit's nuslerp (mergekit/merge_methods/nuslerp.py, 0.1.5): spherical interpolation of two models' task
vectors, added to the base, or (a mergekit config without base_model: mergekit's base is optional) of the two
models' weights themselves, nothing added. t = weight_1 / (weight_0 + weight_1) (0.5 where the weights sum to less
than 1e-6 in magnitude), from each model's model_parameters weight.

Per row (nuslerp_flatten, the default: the whole tensor; otherwise each row of the last dimension), in the
compute dtype as mergekit's torch ops are (every operation rounded to it):

    v_i = model_i − base (without a base: model_i);  u_i = v_i / max(|v_i|, 1e-7);  cos = clamp(u_0 · u_1, −1, 1)
    colinear: 1 − cos² <= 1e-16  →  (1 − t) v_0 + t v_1
    else θ = acos(cos):  (sin((1 − t)θ) v_0 + sin(tθ) v_1) / sin θ
    merged = base + that (without a base: that, as it is; no 0 + x, which would turn −0 into +0)

Norms and the dot product are reduced in torch's CPU order (torch_reductions.py), two streaming passes a segment
at a time; the combine step gets the coefficients of the rows a range touches from the `inputs` hook and runs a
row at a time with them as constants (the torch kernel set gets each element's: rows.py). acos and sin
are torch's CPU functions on values of the compute dtype (torch_reductions.scalar_function): for bfloat16 and
float16 SLEEF's functions as torch's kernels take them, reproduced to the bit without torch (methods/sleef.py); for
float32 torch's own (MKL's) where torch is installed, SLEEF's where it is not (the CPU merge image), which differ
from MKL's in the last bit for a few percent of arguments.

nuslerp_row_wise (with nuslerp_flatten false) is the same per column: mergekit transposes the first dimension to
the last, so each column of the tensor viewed as [first dimension, rest] is one vector, its norms and dot reduced
along a strided dimension (torch_reductions' column reductions, in the order torch reduces such a dimension). The
two passes read blocks of whole rows (a segment, or one row where a row is longer) and keep each column's partial
sums; the combine step gets every column's coefficients.
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _per_dtype, _specialised, rnd, store, widen
from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.methods.rows import per_element, to_kernels
from modelmerge_engine.methods.torch_reductions import (
    LANES,
    column_norm_add,
    column_norm_finish,
    column_sum_begin,
    column_sum_finish,
    column_sum_rows,
    host_raw,
    host_values,
    norm_add,
    norm_finish,
    rounded,
    scalar_function,
    sum_begin,
    sum_finish,
    sum_rows,
    task_vectors,
)

SEGMENT = 1 << 20  # values of each input per statistics step (a multiple of torch_reductions' row of vectors)
NORM_FLOOR = 1e-7  # mergekit's _normalize clamp
COLINEAR = 1e-16  # eps ** 2
COLINEAR_FLAG, COEF_0, COEF_1, SIN_THETA = range(4)


@register_jitable(inline="always")
def _unit_product(v0, v1, norm_0, norm_1, code):
    return rnd(rnd(v0 / norm_0, code) * rnd(v1 / norm_1, code), code)


@register_jitable(inline="always")
def _unit_products_loop(constants, args):
    """u_0 · u_1 elementwise, with one norm per vector (norms_i of one value: the row) or one per column (the
    values are whole rows of len(norms_i) columns)."""
    code, = constants
    vectors, norms_0, norms_1, out = args
    width = norms_0.shape[0]
    if width == 1:
        for e in range(out.shape[0]):
            out[e] = _unit_product(vectors[0, e], vectors[1, e], norms_0[0], norms_1[0], code)
    else:
        for row in range(out.shape[0] // width):
            for c in range(width):
                e = row * width + c
                out[e] = _unit_product(vectors[0, e], vectors[1, e], norms_0[c], norms_1[c], code)


unit_products = _per_dtype(_unit_products_loop)


@register_jitable(inline="always")
def _nuslerp_at(b, x0, x1, flag, coef_0, coef_1, sin_theta, one_minus_t, t, code, with_base):
    """One merged element (float32, not yet stored) from its row's or column's coefficients."""
    v0 = rnd(x0 - b, code) if with_base else x0
    v1 = rnd(x1 - b, code) if with_base else x1
    if flag != 0:
        merged = rnd(rnd(one_minus_t * v0, code) + rnd(t * v1, code), code)
    else:
        spherical = rnd(rnd(coef_0 * v0, code) + rnd(coef_1 * v1, code), code)
        merged = rnd(spherical / sin_theta, code)
    return b + merged if with_base else merged


@register_jitable(inline="always")
def _nuslerp(constants, args):
    """with_base: the task vectors interpolated and the base added; else the models' values themselves.
    `table` [4, k] holds the coefficients of the rows the range touches (the first at `position` [0]: the
    range's first element's place in its row) or of every column (the first element's column); `position`
    [1] is the row width, [2] 1 by column. The loops go a row (or a row's columns) at a time, so a row's
    coefficients are constants of a loop that vectorises."""
    code, with_base = constants
    base, inputs, table, position, weights, out = args
    one_minus_t, t = weights[0], weights[1]
    first, second = inputs[0], inputs[1]
    at, width, by_column = position[0], position[1], position[2] != 0
    row, e, n = 0, 0, out.shape[0]
    while e < n:
        stop = min(n, e + width - at)
        if by_column:
            for j in range(e, stop):
                c = at + j - e
                value = _nuslerp_at(widen(base[j], code) if with_base else np.float32(0.0), widen(first[j], code),
                                    widen(second[j], code), table[COLINEAR_FLAG, c], table[COEF_0, c],
                                    table[COEF_1, c], table[SIN_THETA, c], one_minus_t, t, code, with_base)
                store(out, j, value, code)
        else:
            flag, coef_0, coef_1 = table[COLINEAR_FLAG, row], table[COEF_0, row], table[COEF_1, row]
            sin_theta = table[SIN_THETA, row]
            # the row's part as views indexed from 0 (an index numba cannot prove non-negative is wrapped, a
            # select per access, and that loop does not vectorise)
            row_base, row_first, row_second, row_out = base[e:stop], first[e:stop], second[e:stop], out[e:stop]
            for j in range(row_out.shape[0]):
                value = _nuslerp_at(widen(row_base[j], code) if with_base else np.float32(0.0),
                                    widen(row_first[j], code), widen(row_second[j], code), flag, coef_0, coef_1,
                                    sin_theta, one_minus_t, t, code, with_base)
                store(row_out, j, value, code)
            row += 1
        e, at = stop, 0


def nuslerp_kernel(code, *args, with_base: bool = True):
    _specialised(_nuslerp, int(code), bool(with_base))(args)


@register
class Nuslerp(Method):
    name = "nuslerp"
    parameters = ("model_parameters", "nuslerp_flatten", "nuslerp_row_wise")
    statistics_ahead = True

    def __init__(self, merge):
        super().__init__(merge)
        # a mergekit config without base_model: the models' values are interpolated, no base subtracted or added
        self.with_base = self.request.config is None or self.request.config.base_model is not None
        # tensor -> (row width, coefficients of each row or column, whether by column)
        self._rows: dict[str, tuple[int, np.ndarray, bool]] = {}

    def statistics_work(self, group_numel: int) -> int:
        return (6 if self.with_base else 4) * group_numel  # two passes over the base (if any) and both models

    def _rounded(self, value: float) -> np.float32:
        """A float32 value rounded to the compute dtype, as torch rounds a 16-bit op's result."""
        return rounded(value, self.merge.dtype.code)[0]

    def tensor_state(self, plan) -> np.ndarray:
        """Each row's (or column's) coefficients, kept for the inputs hook; returns (1 − t, t) in float32."""
        name = plan.name
        flatten = bool(self.value("nuslerp_flatten", tensor=name)) or len(plan.shape) < 2
        by_column = not flatten and bool(self.value("nuslerp_row_wise", tensor=name))
        weights = [float(self.value("weight", tensor=name, model=i)) for i in range(2)]
        total = weights[0] + weights[1]
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        if by_column:
            rows = plan.shape[0]
            width = plan.numel // rows if rows else 0
            coefficients = self._column_coefficients(name, rows, width, t)
        else:
            width = plan.numel if flatten else plan.shape[-1]
            rows = plan.numel // width if width else 0
            coefficients = np.zeros((max(rows, 1), 4), np.float32)
            for row in range(rows):
                coefficients[row] = self._row_coefficients(name, row * width, width, t)
        self._rows[name] = (max(width, 1), coefficients, by_column)
        return np.array([1.0 - t, t], np.float32)

    def _row_coefficients(self, name: str, start: int, width: int, t: float) -> list:
        merge = self.merge
        code, packed = merge.dtype.code, merge.dtype.code != F32
        norm_acc = np.zeros((2, LANES), np.float32)
        tails = [np.empty(0, np.float32)] * 2
        for offset in range(0, width, SEGMENT):
            vectors = self._task_vectors(name, start + offset, start + min(offset + SEGMENT, width))
            for i in range(2):
                tails[i] = vectors[i, norm_add(vectors[i], packed, norm_acc[i]):]
        norms = [self._norm(norm_finish(tails[i], norm_acc[i])) for i in range(2)]
        acc, state = sum_begin(width, packed)
        tail = np.empty(0, np.float32)
        for offset in range(0, width, SEGMENT):
            vectors = self._task_vectors(name, start + offset, start + min(offset + SEGMENT, width))
            products = np.empty(vectors.shape[1], np.float32)
            unit_products(code, vectors, norms[0], norms[1], products)
            tail = products[sum_rows(products, acc, state):].copy()
        return self._coefficients(sum_finish(tail, acc, state), t)

    def _column_coefficients(self, name: str, rows: int, width: int, t: float) -> np.ndarray:
        """nuslerp_row_wise: the coefficients of each column of the tensor viewed as [rows, width]."""
        merge = self.merge
        code, packed = merge.dtype.code, merge.dtype.code != F32
        numel = rows * width
        step = max(1, SEGMENT // max(width, 1)) * width  # whole rows per pass step
        norm_acc = np.zeros((2, width), np.float32)
        for offset in range(0, numel, step):
            vectors = self._task_vectors(name, offset, min(offset + step, numel))
            for i in range(2):
                column_norm_add(vectors[i].reshape(-1, width), norm_acc[i])
        norms = [self._norm(column_norm_finish(norm_acc[i])) for i in range(2)]
        acc, tail, state = column_sum_begin(rows, width, packed)
        for offset in range(0, numel, step):
            vectors = self._task_vectors(name, offset, min(offset + step, numel))
            products = np.empty(vectors.shape[1], np.float32)
            unit_products(code, vectors, norms[0], norms[1], products)
            column_sum_rows(products.reshape(-1, width), acc, tail, state)
        sums = column_sum_finish(acc, tail, state)
        return np.array([self._coefficients(total, t) for total in sums], np.float32).reshape(-1, 4)

    def _norm(self, norms) -> np.ndarray:
        """float32 2-norms rounded to the compute dtype and clamped as mergekit's _normalize clamps them."""
        return np.maximum(rounded(norms, self.merge.dtype.code), self._rounded(NORM_FLOOR))

    def _coefficients(self, total, t: float) -> list:
        """[colinear, sin((1 − t)θ), sin(tθ), sin θ] of a vector pair whose unit vectors' dot is `total`."""
        cos = min(max(self._rounded(total), np.float32(-1.0)), np.float32(1.0))
        colinear = self._rounded(np.float32(1.0) - self._rounded(cos * cos)) <= self._rounded(COLINEAR)
        code = self.merge.dtype.code
        theta = scalar_function("acos", 0.0 if colinear else cos, code)
        sin_of = lambda angle: scalar_function("sin", angle, code)  # noqa: E731
        return [float(colinear), sin_of(self._rounded(np.float32(1.0 - t) * theta)),
                sin_of(self._rounded(np.float32(t) * theta)), sin_of(theta)]

    def _task_vectors(self, name: str, start: int, stop: int) -> np.ndarray:
        """v_0 and v_1 of elements start:stop (without a base: the models' own values)."""
        merge = self.merge
        vectors = np.empty((2, stop - start), np.float32)
        if self.with_base:
            first, second = (host_raw(merge, model, name, start, stop) for model in merge.finetunes)
            task_vectors(merge.dtype.code, host_raw(merge, merge.base, name, start, stop), (first, second), vectors)
        else:
            vectors[0], vectors[1] = (host_values(merge, model, name, start, stop) for model in merge.finetunes)
        merge.progress.advance((3 if self.with_base else 2) * (stop - start))
        return vectors

    def inputs(self, name, start, base, raws, models):
        """The two fine-tunes, then the coefficients [colinear, sin((1-t)θ), sin(tθ), sin θ] of the rows (or
        columns) the range touches: for the compiled kernels the rows themselves (a [4, rows] table) and where
        the range starts in them; for torch each element's."""
        width, coefficients, by_column = self._rows[name]
        stop = start + raws[0].shape[0]
        kernels = self.merge.kernels
        if hasattr(kernels, "torch"):
            if by_column:
                spread = np.ascontiguousarray(coefficients[np.arange(start, stop, dtype=np.int64) % width])
            else:
                spread = per_element(coefficients, width, start, stop)
            return [*raws, to_kernels(spread, kernels)]
        if by_column:
            table, at = coefficients.T, start % width
        else:
            first, last = start // width, max(start, stop - 1) // width
            table, at = coefficients[first:last + 1].T, start - first * width
        return [*raws, np.ascontiguousarray(table), np.array([at, width, by_column], np.int64)]

    def combine_cpu(self, kernels, base, inputs, state):
        out = kernels.empty(base)
        nuslerp_kernel(kernels.code, base, tuple(inputs[:2]), inputs[2], inputs[3], state, out,
                       with_base=self.with_base)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        first, second, coefficients = inputs
        one_minus_t, t = (float(w) for w in state)
        dtype = kernels.tdtype
        v0, v1 = (first - base, second - base) if self.with_base else (first, second)
        spherical = (coefficients[:, COEF_0].to(dtype) * v0 + coefficients[:, COEF_1].to(dtype) * v1) \
            / coefficients[:, SIN_THETA].to(dtype)
        linear = one_minus_t * v0 + t * v1
        merged = kernels.torch.where(coefficients[:, COLINEAR_FLAG] != 0, linear, spherical)
        return base + merged if self.with_base else merged
