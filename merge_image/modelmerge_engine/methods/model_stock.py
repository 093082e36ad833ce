"""mergekit's model_stock (mergekit/merge_methods/model_stock.py, 0.1.5): interpolate between the base model and
the average of the K >= 2 fine-tunes, with a ratio from the angles between their task vectors.

Per row (the whole tensor, or with filter_wise each row of its last dimension; a 1-D tensor is one row), in the
compute dtype as mergekit's torch ops are (every operation rounded to it):

    o_i = w_i − w_0;  cos_ij = clamp((o_i · o_j) / max(|o_i| |o_j|, 1e-6), −1, 1) for i < j
    cos = mean of the cos_ij;  t = K cos / (1 + (K − 1) cos)  (0 where |1 + (K − 1) cos| < 1e-6)
    merged = t · ((w_1 + ... + w_K) / K) + (1 − t) · w_0

The norms and dot products are reduced in torch's CPU order (torch_reductions.py), streamed a segment at a time
(whole rows of the last dimension at once with filter_wise), so memory stays a few segments whatever the tensor.
The combine step reads each element's row ratio from a per-range array the `inputs` hook appends (rows.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _per_dtype, rnd, store, widen
from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.methods.rows import per_element, to_kernels
from modelmerge_engine.methods.torch_reductions import (
    LANES,
    SUM_SEGMENT_MULTIPLE,
    host_raw,
    norm_add,
    norm_finish,
    row_norm,
    row_sum,
    sum_begin,
    sum_finish,
    sum_rows,
    task_vectors,
)

SEGMENT = 1 << 20  # values of each input per statistics step (a multiple of SUM_SEGMENT_MULTIPLE)
EPS = 1e-6  # mergekit's clamp(min=1e-6) of the norms' product and its singular-denominator bound


@njit(nogil=True, cache=True)
def _products(offsets, i, j, code, out):
    for e in range(out.shape[0]):
        out[e] = rnd(offsets[i, e] * offsets[j, e], code)


@njit(nogil=True, cache=True)
def _rows_statistics(offsets, width, code, packed, norms, dots):
    """Norms [rows, K] and pairwise dot products [rows, pairs] of the whole rows of `width` values in `offsets`,
    each rounded to the dtype."""
    models = offsets.shape[0]
    products = np.empty(width, np.float32)
    for r in range(offsets.shape[1] // width):
        row = offsets[:, r * width:(r + 1) * width]
        for i in range(models):
            norms[r, i] = rnd(row_norm(np.ascontiguousarray(row[i]), packed), code)
        pair = 0
        for i in range(models):
            for j in range(i + 1, models):
                for e in range(width):
                    products[e] = rnd(row[i, e] * row[j, e], code)
                dots[r, pair] = rnd(row_sum(products, packed), code)
                pair += 1


@njit(nogil=True, cache=True)
def _ratios(norms, dots, models, code, out):
    """Each row's t from its norms and dot products (mergekit's arithmetic, rounded where its tensors round)."""
    floor = rnd(np.float32(EPS), code)
    one = np.float32(1.0)
    for r in range(out.shape[0]):
        total = np.float32(0.0)
        pair = 0
        for i in range(models):
            for j in range(i + 1, models):
                product = max(rnd(norms[r, i] * norms[r, j], code), floor)
                cosine = min(max(rnd(dots[r, pair] / product, code), -one), one)
                total += cosine
                pair += 1
        cosine = rnd(total / np.float32(pair), code)
        denominator = rnd(one + rnd(np.float32(models - 1) * cosine, code), code)
        if abs(denominator) < np.float32(EPS):
            out[r] = 0.0
        else:
            out[r] = rnd(rnd(np.float32(models) * cosine, code) / denominator, code)


@register_jitable(inline="always")
def _model_stock(constants, args):
    """t · mean(models) + (1 − t) · base, the mean a running sum rounded after each model, then divided."""
    code, = constants
    base, inputs, ratios, out = args
    count = np.float32(len(inputs))
    one = np.float32(1.0)
    for e in range(out.shape[0]):
        total = widen(inputs[0][e], code)
        for i in range(1, len(inputs)):
            total = rnd(total + widen(inputs[i][e], code), code)
        t = ratios[e]
        merged = rnd(t * rnd(total / count, code), code) + rnd(rnd(one - t, code) * widen(base[e], code), code)
        store(out, e, merged, code)


model_stock_kernel = _per_dtype(_model_stock)


@register
class ModelStock(Method):
    name = "model_stock"
    parameters = ("filter_wise",)
    statistics_ahead = True

    def __init__(self, merge):
        super().__init__(merge)
        self._ratios: dict[str, tuple[int, np.ndarray]] = {}  # tensor -> (row width, t of each row)

    def statistics_work(self, group_numel: int) -> int:
        return group_numel * (len(self.merge.finetunes) + 1)

    def tensor_state(self, plan) -> None:
        merge = self.merge
        filter_wise = bool(self.value("filter_wise", tensor=plan.name)) and len(plan.shape) >= 2
        width = plan.shape[-1] if filter_wise else plan.numel
        rows = plan.numel // width if width else 0
        models = len(merge.finetunes)
        pairs = models * (models - 1) // 2
        norms = np.zeros((max(rows, 1), models), np.float32)
        dots = np.zeros((max(rows, 1), pairs), np.float32)
        if 0 < width <= SEGMENT:
            per_step = max(1, SEGMENT // width)
            for first in range(0, rows, per_step):
                last = min(first + per_step, rows)
                offsets = self._read_offsets(plan.name, first * width, last * width)
                _rows_statistics(offsets, width, merge.dtype.code, self._packed, norms[first:last], dots[first:last])
        else:
            for row in range(rows):
                norms[row], dots[row] = self._streamed_row(plan.name, row * width, width, models, pairs)
        ratios = np.empty(max(rows, 1), np.float32)
        _ratios(norms, dots, models, merge.dtype.code, ratios)
        self._ratios[plan.name] = (max(width, 1), ratios)

    @property
    def _packed(self) -> bool:
        return self.merge.dtype.code != F32

    def _read_offsets(self, name: str, start: int, stop: int) -> np.ndarray:
        merge = self.merge
        base = host_raw(merge, merge.base, name, start, stop)
        models = tuple(host_raw(merge, model, name, start, stop) for model in merge.finetunes)
        offsets = np.empty((len(models), stop - start), np.float32)
        task_vectors(merge.dtype.code, base, models, offsets)
        merge.progress.advance((stop - start) * (len(models) + 1))
        return offsets

    def _streamed_row(self, name: str, start: int, width: int, models: int, pairs: int):
        """Norms and dot products of one row longer than a segment, a segment at a time."""
        code, packed = self.merge.dtype.code, self._packed
        norm_acc = np.zeros((models, LANES), np.float32)
        sums = [sum_begin(width, packed) for _ in range(pairs)]
        tails = [np.empty(0, np.float32)] * (models + pairs)
        for offset in range(0, width, SEGMENT):
            stop = min(offset + SEGMENT, width)
            offsets = self._read_offsets(name, start + offset, start + stop)
            for i in range(models):
                used = norm_add(offsets[i], packed, norm_acc[i])
                tails[i] = offsets[i, used:]
            pair = 0
            products = np.empty(stop - offset, np.float32)
            for i in range(models):
                for j in range(i + 1, models):
                    _products(offsets, i, j, code, products)
                    acc, state = sums[pair]
                    used = sum_rows(products, acc, state)
                    tails[models + pair] = products[used:].copy()
                    pair += 1
        rounded = np.empty(models + pairs, np.float32)
        for i in range(models):
            rounded[i] = norm_finish(tails[i], norm_acc[i])
        for pair, (acc, state) in enumerate(sums):
            rounded[models + pair] = sum_finish(tails[models + pair], acc, state)
        out = np.empty(models + pairs, rounded.dtype)
        _round_all(rounded, code, out)
        return out[:models], out[models:]

    def inputs(self, name, start, base, raws, models):
        """The fine-tunes, then each element's row ratio t (float32) for the combine step."""
        width, ratios = self._ratios[name]
        return [*raws, to_kernels(per_element(ratios, width, start, start + raws[0].shape[0]), self.merge.kernels)]

    def combine_cpu(self, kernels, base, inputs, state):
        out = kernels.empty(base)
        model_stock_kernel(kernels.code, base, tuple(inputs[:-1]), inputs[-1], out)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        *models, ratios = inputs
        t = ratios.to(kernels.tdtype)
        total = models[0]
        for values in models[1:]:
            total = total + values
        return t * (total / len(models)) + (1 - t) * base


@njit(nogil=True, cache=True)
def _round_all(values, code, out):
    for i in range(values.shape[0]):
        out[i] = rnd(values[i], code)


assert SEGMENT % SUM_SEGMENT_MULTIPLE == 0
