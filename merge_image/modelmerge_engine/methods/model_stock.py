"""mergekit's model_stock (mergekit/merge_methods/model_stock.py, 0.1.5): interpolate between the base model and
the average of the K >= 2 fine-tunes, with a ratio from the angles between their task vectors.

Per row (the whole tensor, or with filter_wise each row of its last dimension; a 1-D tensor is one row), in the
compute dtype as mergekit's torch ops are (every operation rounded to it):

    o_i = w_i − w_0;  cos_ij = clamp((o_i · o_j) / max(|o_i| |o_j|, 1e-6), −1, 1) for i < j
    cos = mean of the cos_ij;  t = K cos / (1 + (K − 1) cos)  (0 where |1 + (K − 1) cos| < 1e-6)
    merged = t · ((w_1 + ... + w_K) / K) + (1 − t) · w_0

The norms and dot products are reduced in torch's CPU order (torch_reductions.py), in one pass over the raw
inputs: a block of every input at a time (in cache), its task vectors derived and every norm and pairwise product
accumulated before the next block (a segment of the mapped inputs per compiled call; whole rows at once with
filter_wise), so memory stays a few blocks whatever the tensor and the number of fine-tunes.
The combine step reads each element's row ratio from a per-range array the `inputs` hook appends (rows.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _per_dtype, _specialised, rnd, store, widen
from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.methods.rows import per_element, to_kernels
from modelmerge_engine.methods.torch_reductions import (
    LANES,
    SUM_SEGMENT_MULTIPLE,
    block_vectors,
    host_raw,
    norm_finish,
    norms_reduced,
    sum_begin,
    sum_finish,
    sum_restart,
    sums_reduced,
)

SEGMENT = 1 << 20  # values of each input per statistics step (a multiple of BLOCK)
BLOCK = 512  # elements of every input derived and reduced at a time, in cache (a multiple of SUM_SEGMENT_MULTIPLE,
# so only a row's last block leaves values to a tail)
EPS = 1e-6  # mergekit's clamp(min=1e-6) of the norms' product and its singular-denominator bound


@register_jitable(inline="always")
def _row_statistics(code, base, inputs, first, last, buffers, norms, sums, states, norm_tail, sum_tail):
    """Adds elements [first, last) of one row of the raw inputs to its accumulators: the task vectors' 2-norm
    lanes (norms [K, LANES]) and their pairwise products' cascade sums (sums, states: one per pair, i < j), a
    block at a time; returns the tail counts (norms', sums') the row's last block leaves."""
    v, b, products = buffers
    models, packed = len(inputs), code != F32
    norm_left = sum_left = 0
    for start in range(first, last, BLOCK):
        n = min(BLOCK, last - start)
        block_vectors(code, True, base, inputs, start, n, b, v)
        norm_left = norms_reduced(v, models, n, packed, norms, norm_tail)
        pair, row = 0, products[0]
        for i in range(models):
            for j in range(i + 1, models):
                left_row, right_row = v[i], v[j]
                for k in range(n):
                    row[k] = rnd(left_row[k] * right_row[k], code)
                sum_left = sums_reduced(products, 1, n, sums[pair:pair + 1], states[pair:pair + 1],
                                        sum_tail[pair:pair + 1])
                pair += 1
    return norm_left, sum_left


@register_jitable(inline="always")
def _buffers(models):
    return (np.empty((models, BLOCK), np.float32), np.empty(BLOCK, np.float32), np.empty((1, BLOCK), np.float32))


@register_jitable(inline="always")
def _statistics(constants, args):
    """Adds the raw inputs' elements offset..offset+size (`size`: base's length) of a tensor of rows of `width`
    values to the running row's accumulators (norms [K, LANES]; sums, states: one cascade sum per pair), a row
    begun where a row starts; where a row ends, its norms [rows, K] and pairwise dot products [rows, pairs] are
    finished, each rounded to the dtype. The caller cuts a row only at multiples of SEGMENT from its start, so
    every cut falls on a whole block. One kernel for short rows (many per call) and long ones (one over calls):
    precompile's tiny merges compile what a model's large tensors run."""
    code, = constants
    base, inputs, width, offset, norms, sums, states, norm_tail, sum_tail, norms_out, dots_out = args
    models, pairs = len(inputs), sums.shape[0]
    buffers = _buffers(models)
    position, size = 0, base.shape[0]
    while position < size:
        row, column = divmod(offset + position, width)
        if column == 0:
            norms[:] = 0.0
            for pair in range(pairs):
                sum_restart(sums[pair], states[pair])
        last = min(size, position + width - column)
        norm_left, sum_left = _row_statistics(code, base, inputs, position, last, buffers, norms, sums, states,
                                              norm_tail, sum_tail)
        if column + last - position == width:
            for i in range(models):
                norms_out[row, i] = rnd(norm_finish(norm_tail[i, :norm_left], norms[i]), code)
            for pair in range(pairs):
                dots_out[row, pair] = rnd(sum_finish(sum_tail[pair, :sum_left], sums[pair], states[pair]), code)
        position = last


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
        if rows:
            sums, states = self._sums_begun(width, pairs)
            accumulators = (np.zeros((models, LANES), np.float32), sums, states,
                            np.empty((models, BLOCK), np.float32), np.empty((pairs, BLOCK), np.float32))
            kernel = _specialised(_statistics, int(merge.dtype.code))
            for start, stop in self._segments(width, rows):
                base = host_raw(merge, merge.base, plan.name, start, stop)
                finetunes = tuple(host_raw(merge, model, plan.name, start, stop) for model in merge.finetunes)
                kernel((base, finetunes, width, start, *accumulators, norms, dots))
                merge.progress.advance((stop - start) * (models + 1))
        ratios = np.empty(max(rows, 1), np.float32)
        _ratios(norms, dots, models, merge.dtype.code, ratios)
        self._ratios[plan.name] = (max(width, 1), ratios)

    @staticmethod
    def _segments(width: int, rows: int) -> list[tuple[int, int]]:
        """The tensor's element ranges read per statistics call: whole rows up to SEGMENT values, or a row longer
        than that in SEGMENT-long pieces from its start."""
        if width > SEGMENT:
            return [(row * width + piece, row * width + min(piece + SEGMENT, width))
                    for row in range(rows) for piece in range(0, width, SEGMENT)]
        step = SEGMENT // width * width
        return [(start, min(start + step, rows * width)) for start in range(0, rows * width, step)]

    def _sums_begun(self, width: int, pairs: int) -> tuple[np.ndarray, np.ndarray]:
        """A cascade sum of a row of `width` values begun for each pair: (sums, states) stacked."""
        begun = [sum_begin(width, self.merge.dtype.code != F32) for _ in range(pairs)]
        return np.stack([acc for acc, _ in begun]), np.stack([state for _, state in begun])

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


assert BLOCK % SUM_SEGMENT_MULTIPLE == 0 and SEGMENT % BLOCK == 0
