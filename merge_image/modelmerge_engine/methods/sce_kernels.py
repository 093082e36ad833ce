"""Compiled kernels of mergekit's sce (sce.py): the per-element variance of the task vectors, torch's CPU top-k
selection of the largest variances (libstdc++'s nth_element / partial_sort, which decide which of several equal
variances at the boundary are kept), and the combine step of one range. Values are the compute dtype's bit
patterns or float32 host values as in cpu_kernels.py; the sorting primitives are gta_kernels' (the same libstdc++
algorithms torch's sort uses)."""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import _per_dtype, rnd, store, widen
from modelmerge_engine.methods.gta_kernels import _adjust_heap, _insertion_sort, _make_heap, _partition


@njit(nogil=True, cache=True)
def task_vectors(base, models, code, out):
    """out[i] = models[i] − base, rounded to the dtype (float32 host values of the compute dtype)."""
    for i in range(len(models)):
        for e in range(base.shape[0]):
            out[i, e] = rnd(models[i][e] - base[e], code)


@njit(nogil=True, cache=True)
def variances(vectors, code, out):
    """torch.var(vectors, dim=0, unbiased=False), as torch computes it (in float64, rounded to the dtype)."""
    n = vectors.shape[0]
    for e in range(vectors.shape[1]):
        mean = 0.0
        for i in range(n):
            mean += np.float64(vectors[i, e])
        mean /= n
        total = 0.0
        for i in range(n):
            deviation = np.float64(vectors[i, e]) - mean
            total += deviation * deviation
        out[e] = rnd(np.float32(total / n), code)


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
def top_k(keys, order, k, keep):
    """torch.topk(keys, k, largest=True)'s indices on CPU, as flags in `keep`: torch runs std::partial_sort when
    k * 64 <= n, else std::nth_element (introselect: median-of-three Hoare partitions, a heap select past depth
    2*log2(n), an insertion sort of the last few); the first k positions are the kept ones."""
    n = keys.shape[0]
    for p in range(n):
        order[p] = p
    if k * 64 <= n:
        _heap_select(keys, order, 0, k, n)
    else:
        first, last, nth = 0, n, k - 1
        depth = 0
        while (1 << (depth + 1)) <= n:
            depth += 1
        depth *= 2
        done = False
        while last - first > 3:
            if depth == 0:
                _heap_select(keys, order, first, nth + 1, last)
                keys[first], keys[nth] = keys[nth], keys[first]
                order[first], order[nth] = order[nth], order[first]
                done = True
                break
            depth -= 1
            cut = _partition(keys, order, first, last, True)
            if cut <= nth:
                first = cut
            else:
                last = cut
        if not done:
            _insertion_sort(keys, order, first, last, True)
    keep.fill(False)
    for p in range(k):
        keep[order[p]] = True


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
