"""Compiled kernels of mergekit's sce (sce.py): the per-element variance of the task vectors, torch's CPU top-k
selection of the largest variances (libstdc++'s nth_element / partial_sort, which decide which of several equal
variances at the boundary are kept), the keep flags of one range from that selection, and the combine step of one
range. Values are the compute dtype's bit patterns or float32 host values as in cpu_kernels.py; the sorting
primitives are gta_kernels' (the same libstdc++ algorithms torch's sort uses)."""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _f32_as_u32, _per_dtype, _specialised, rnd, store, widen
from modelmerge_engine.methods.gta_kernels import (
    _adjust_heap,
    _in_window,
    _insertion_sort,
    _keep_split,
    _make_heap,
    _partition,
    window_range,
)


@register_jitable(inline="always")
def _variance(column, code):
    """torch.var(column, unbiased=False) of one element's task vectors, as torch computes it (in float64, rounded
    to the dtype). The one definition of the value the selection ranks and every range's keep flags test."""
    n = column.shape[0]
    mean = 0.0
    for i in range(n):
        mean += np.float64(column[i])
    mean /= n
    total = 0.0
    for i in range(n):
        deviation = np.float64(column[i]) - mean
        total += deviation * deviation
    return rnd(np.float32(total / n), code)


@njit(nogil=True, cache=True)
def variances(vectors, code, out):
    """out[e] = the variance of element e's task vectors (vectors[:, e])."""
    column = np.empty(vectors.shape[0], np.float32)
    for e in range(vectors.shape[1]):
        for i in range(vectors.shape[0]):
            column[i] = vectors[i, e]
        out[e] = _variance(column, code)


@register_jitable(inline="always")
def _selection_mask(constants, args):
    """keep[e] for elements start.. of a tensor: whether the variance of their task vectors (the inputs as the
    compute dtype's bit patterns or float32 host values) is a selected one. The selection is gta_kernels'
    window_selection of the top-k's positions, on the variances' bit patterns (non-negative floats order as
    their bits): in the window (a branch-free pass), then the split values' kept elements."""
    code, = constants
    base, models, start, low, high, split_a, split_b, kept, first, last, keep = args
    column = np.empty(len(models), np.float32)
    for e in range(keep.shape[0]):
        b = widen(base[e], code)
        for i in range(len(models)):
            column[i] = rnd(widen(models[i][e], code) - b, code)
        keep[e] = _in_window(np.int64(_f32_as_u32(_variance(column, code))), low, high, split_a, split_b)
    _keep_split(kept, first, last, start, keep)


def selection_mask(code, base, models, start, selection, keep):
    """The keep flags of the range of `keep`'s length at `start` (see `_selection_mask`)."""
    _specialised(_selection_mask, int(code))(
        (base, tuple(models), start, *window_range(selection, start, keep.shape[0]), keep))


@njit(nogil=True, cache=True)
def masked_squares(vectors, row, keep, selected, code, out):
    """(vectors[row] · keep)², rounded to the dtype (mergekit squares the masked task vectors)."""
    for e in range(out.shape[0]):
        value = vectors[row, e]
        if selected and not keep[e]:
            value = np.float32(0.0)
        out[e] = rnd(value * value, code)


@njit(inline="always")
def _heap_select(keys, order, first, middle, last):
    """libstdc++'s __heap_select with torch's `largest` comparator (a > b)."""
    length = middle - first
    _make_heap(keys, order, first, length, True)
    for i in range(middle, last):
        if keys[i] > keys[first]:
            key, item = keys[i], order[i]
            keys[i] = keys[first]
            order[i] = order[first]
            _adjust_heap(keys, order, first, 0, length, key, item, True)


@njit(nogil=True, cache=True)
def top_k(keys, order, k):
    """Permutes (keys, order) as torch.topk(keys, k, largest=True) on CPU does: its kept elements end at positions
    [0, k) (order: their indices). torch runs std::partial_sort when k * 64 <= n, else std::nth_element
    (introselect: median-of-three Hoare partitions, a heap select past depth 2*log2(n), an insertion sort of the
    last few)."""
    n = keys.shape[0]
    for p in range(n):
        order[p] = p
    if k * 64 <= n:
        _heap_select(keys, order, 0, k, n)
        return
    first, last, nth = 0, n, k - 1
    depth = 0
    while (1 << (depth + 1)) <= n:
        depth += 1
    depth *= 2
    while last - first > 3:
        if depth == 0:
            _heap_select(keys, order, first, nth + 1, last)
            keys[first], keys[nth] = keys[nth], keys[first]
            order[first], order[nth] = order[nth], order[first]
            return
        depth -= 1
        cut = _partition(keys, order, first, last, True)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(keys, order, first, last, True)


@register_jitable(inline="always")
def _sce(constants, args):
    """mergekit's sce_merge on one range: the (selected) task vectors, the sign elected by their sum (rounded
    once), the squared-magnitude weights of the models that agree, their weighted sum over the sum of their weights
    (at least 1e-6), each rounded to the dtype, added to the base."""
    code, = constants
    base, inputs, keep, weights, floor, out = args
    selected = keep.shape[0] > 0
    n = len(inputs)
    vectors = np.empty(n, np.float32)
    for e in range(out.shape[0]):
        b = widen(base[e], code)
        total = np.float32(0.0)
        for i in range(n):
            value = rnd(widen(inputs[i][e], code) - b, code)
            if selected and not keep[e]:
                value = np.float32(0.0)
            vectors[i] = value
            total += value
        positive = rnd(total, code) >= 0
        merged = np.float32(0.0)
        divisor = np.float32(0.0)
        for i in range(n):
            if (vectors[i] > 0) if positive else (vectors[i] < 0):
                merged += rnd(vectors[i] * weights[i], code)
                divisor += weights[i]
        divisor = max(rnd(divisor, code), floor)
        store(out, e, b + rnd(rnd(merged, code) / divisor, code), code)


sce = _per_dtype(_sce)
