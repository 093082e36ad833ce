"""Compiled CPU kernels of mergekit's generalized task arithmetic family (generalized_task_arithmetic.py).

Three kinds: the per-tensor statistics (magnitude keys, the top-k selection as torch's CPU sort makes it, exact
L1 sums), the keep masks of one range (by magnitude window, DARE's seeded draws, della's ranked probabilities),
and the combine step of one range. Values are the compute dtype's bit patterns as in cpu_kernels.py, whose
conversion helpers (`widen`, `rnd`, `mag`, `store`) and counter-based draws (`_uniform`) they use.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from modelmerge_engine.cpu_kernels import (
    _f32_as_u32,
    _specialised,
    _uniform,
    _uniform_bits,
    draw_cut,
    mag,
    rnd,
    store,
    widen,
)
from modelmerge_engine.dtype_codes import F32

NO_CONSENSUS, CONSENSUS_SUM = 0, 1
SMALL_BLOCK = 16  # libstdc++'s _S_threshold: introsort leaves blocks of at most this many to insertion sort


# --- statistics ------------------------------------------------------------------------------------------


@register_jitable(inline="always")
def _magnitude_keys(constants, args):
    """keys[e] = magnitude bit pattern of the task vector `rnd(x - base)` (what mergekit ranks)."""
    code, = constants
    base, raw, keys = args
    for e in range(keys.shape[0]):
        keys[e] = mag(rnd(widen(raw[e], code) - widen(base[e], code), code), code)


def magnitude_keys(code, base, raw, keys):
    _specialised(_magnitude_keys, int(code))((base, raw, keys))


@njit(nogil=True, cache=True)
def fill_positions(order):
    """order[p] = p: the element order before a sort."""
    for p in range(order.shape[0]):
        order[p] = p


@njit(inline="always")
def _before(keys, a, b, descending):
    """torch's KeyValueCompDesc / KeyValueCompAsc on magnitudes (never NaN here)."""
    return keys[a] > keys[b] if descending else keys[a] < keys[b]


@njit(inline="always")
def _swap(keys, order, a, b):
    keys[a], keys[b] = keys[b], keys[a]
    order[a], order[b] = order[b], order[a]


@njit(inline="always")
def _move_median_to_first(keys, order, result, a, b, c, descending):
    if _before(keys, a, b, descending):
        if _before(keys, b, c, descending):
            _swap(keys, order, result, b)
        elif _before(keys, a, c, descending):
            _swap(keys, order, result, c)
        else:
            _swap(keys, order, result, a)
    elif _before(keys, a, c, descending):
        _swap(keys, order, result, a)
    elif _before(keys, b, c, descending):
        _swap(keys, order, result, c)
    else:
        _swap(keys, order, result, b)


@njit(inline="always")
def _partition(keys, order, first, last, descending):
    """libstdc++'s __unguarded_partition_pivot: median of (first+1, mid, last-1) moved to first, then a Hoare
    partition of [first+1, last) around it; returns the cut."""
    _move_median_to_first(keys, order, first, first + 1, first + (last - first) // 2, last - 1, descending)
    lo, hi = first + 1, last
    while True:
        while _before(keys, lo, first, descending):
            lo += 1
        hi -= 1
        while _before(keys, first, hi, descending):
            hi -= 1
        if not lo < hi:
            return lo
        _swap(keys, order, lo, hi)
        lo += 1


@njit(inline="always")
def _adjust_heap(keys, order, first, hole, length, key, item, descending):
    """libstdc++'s __adjust_heap (with __push_heap) on [first, first + length), placing (key, item)."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if (keys[first + child] > keys[first + child - 1]) if descending else \
                (keys[first + child] < keys[first + child - 1]):
            child -= 1
        keys[first + hole] = keys[first + child]
        order[first + hole] = order[first + child]
        hole = child
    if (length & 1) == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        keys[first + hole] = keys[first + child - 1]
        order[first + hole] = order[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and ((keys[first + parent] > key) if descending else (keys[first + parent] < key)):
        keys[first + hole] = keys[first + parent]
        order[first + hole] = order[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    keys[first + hole] = key
    order[first + hole] = item


@njit(inline="always")
def _make_heap(keys, order, first, length, descending):
    """libstdc++'s __make_heap on [first, first + length): sifts every parent down, the last one first (nothing
    to do for fewer than two elements). Shared by the heap sort here and sce_kernels' heap select."""
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(keys, order, first, parent, length, keys[first + parent], order[first + parent], descending)
        if parent == 0:
            break
        parent -= 1


@njit(inline="always")
def _heap_sort(keys, order, first, last, descending):
    """libstdc++'s __partial_sort(first, last, last): make_heap, then sort_heap (introsort's depth-limit
    fallback). The comparator is inverted here: a max-heap of the `before` order sorts it ascending."""
    length = last - first
    if length < 2:
        return
    _make_heap(keys, order, first, length, descending)
    end = last
    while end - first > 1:
        end -= 1
        key, item = keys[end], order[end]
        keys[end] = keys[first]
        order[end] = order[first]
        _adjust_heap(keys, order, first, 0, end - first, key, item, descending)


@njit(inline="always")
def _insertion_sort(keys, order, first, last, descending):
    """Stable insertion sort of a block: what libstdc++'s final insertion sort does inside each block the
    partitions left (nothing crosses a cut: every element left of one is not after every element right)."""
    for i in range(first + 1, last):
        key, item = keys[i], order[i]
        j = i
        while j > first and ((key > keys[j - 1]) if descending else (key < keys[j - 1])):
            keys[j] = keys[j - 1]
            order[j] = order[j - 1]
            j -= 1
        keys[j] = key
        order[j] = item


@njit(nogil=True, cache=True)
def sort_window(keys, order, window_start, window_stop, descending):
    """Permutes (keys, order) as libstdc++'s std::sort (torch's CPU sort, `stable=False`) would, as far as needed
    to decide which elements end at positions [window_start, window_stop): only blocks holding one of the two
    boundaries are partitioned further (introsort with median-of-three Hoare partitions, a heap sort past depth
    2*log2(n), stable insertion sort of blocks of at most 16)."""
    n = keys.shape[0]
    if n < 2:
        return
    depth = 0
    while (1 << (depth + 1)) <= n:
        depth += 1
    stack = np.empty((2 * 64 + 8, 3), dtype=np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2] = 0, n, 2 * depth
    size = 1
    while size:
        size -= 1
        first, last, limit = stack[size, 0], stack[size, 1], stack[size, 2]
        if not ((first < window_start < last) or (first < window_stop < last)):
            continue
        if last - first <= SMALL_BLOCK:
            _insertion_sort(keys, order, first, last, descending)
            continue
        if limit == 0:
            _heap_sort(keys, order, first, last, descending)
            continue
        cut = _partition(keys, order, first, last, descending)
        stack[size, 0], stack[size, 1], stack[size, 2] = cut, last, limit - 1
        stack[size + 1, 0], stack[size + 1, 1], stack[size + 1, 2] = first, cut, limit - 1
        size += 2


@njit(nogil=True, cache=True)
def window_selection(keys, order, window_start, window_stop):
    """After `sort_window`: the kept magnitudes [low, high] (inclusive) and, for a magnitude the window shares with
    positions outside it, the sorted element indices of its kept elements. Returns (low, high, split_a,
    split_b, kept_indices); split values are -1 where none."""
    if window_start >= window_stop:
        return np.int64(1), np.int64(0), np.int64(-1), np.int64(-1), np.empty(0, dtype=np.int64)
    low = keys[window_start]
    high = keys[window_start]
    for p in range(window_start, window_stop):
        low = min(low, keys[p])
        high = max(high, keys[p])
    split_low = False
    split_high = False
    for p in range(window_start):  # branch-free scans of the positions outside the window
        split_low |= keys[p] == low
        split_high |= keys[p] == high
    for p in range(window_stop, keys.shape[0]):
        split_low |= keys[p] == low
        split_high |= keys[p] == high
    count = 0
    for p in range(window_start, window_stop):
        if (split_low and keys[p] == low) or (split_high and keys[p] == high):
            count += 1
    kept = np.empty(count, dtype=np.int64)
    count = 0
    for p in range(window_start, window_stop):
        if (split_low and keys[p] == low) or (split_high and keys[p] == high):
            kept[count] = order[p]
            count += 1
    kept.sort()
    return (np.int64(low), np.int64(high), np.int64(low) if split_low else np.int64(-1),
            np.int64(high) if split_high else np.int64(-1), kept)


PARTIAL_BUCKETS = 8  # sets of buckets an L1 pass fills in turn, element by element (see _l1_buckets)


@njit(inline="always")
def _exact_parts(f):
    """|f| (a float32) as (exponent, significand) for the bucket sums (see `exact_sum`)."""
    u = np.int64(_f32_as_u32(abs(np.float32(f))))
    exponent = u >> 23
    significand = u & 0x7FFFFF
    if exponent:
        significand |= 0x800000
    else:
        exponent = 1
    return exponent, significand


@register_jitable(inline="always")
def _l1_buckets(constants, args):
    """Exact L1 norms of one model's task vector and of its kept part over a range, as significand sums per
    exponent (order-free, so they do not depend on ranges, threads or the device). Neighbouring values mostly
    share an exponent, so adding each to one set of buckets made every add wait for the one before it, and the
    kept part's branch on a random mask was mispredicted half the time (5 ns an element): element e adds to set
    e % PARTIAL_BUCKETS, the kept part adds its significand times the mask, and the sets are summed at the end
    (integer sums: the same totals)."""
    code, masked = constants
    base, raw, keep, before, after = args
    partial_before = np.zeros((PARTIAL_BUCKETS, before.shape[0]), np.int64)
    partial_after = np.zeros((PARTIAL_BUCKETS, after.shape[0]), np.int64)
    for e in range(base.shape[0]):
        exponent, significand = _exact_parts(rnd(widen(raw[e], code) - widen(base[e], code), code))
        lane = e % PARTIAL_BUCKETS
        partial_before[lane, exponent] += significand
        if masked:
            partial_after[lane, exponent] += significand * np.int64(keep[e])
    for lane in range(PARTIAL_BUCKETS):
        for exponent in range(before.shape[0]):
            before[exponent] += partial_before[lane, exponent]
            after[exponent] += partial_after[lane, exponent]


def l1_buckets(code, base, raw, keep, before, after):
    _specialised(_l1_buckets, int(code), keep is not None)(
        (base, raw, keep if keep is not None else np.empty(0, np.bool_), before, after))


def exact_sum(buckets: np.ndarray) -> float:
    """The sum the buckets hold (significand · 2^(exponent − 150) each), rounded once to float64; inf when a
    value was not finite."""
    if buckets[255]:
        return float("inf")
    total = sum(int(count) << (exponent - 1) for exponent, count in enumerate(buckets[:255]) if count)
    return total / (1 << 149)


# --- keep masks of one range ----------------------------------------------------------------------------


def window_range(selection, start: int, length: int) -> tuple:
    """A window selection's values as a range mask kernel takes them: (low, high, split_a, split_b, kept, first,
    last), kept[first:last] being the split values' kept elements in [start, start + length)."""
    low, high, split_a, split_b, kept = selection
    first, last = (int(i) for i in np.searchsorted(kept, [start, start + length]))
    return low, high, split_a, split_b, kept, first, last


@register_jitable(inline="always")
def _in_window(key, low, high, split_a, split_b):
    """Whether `key` is a kept one by value alone: in [low, high] and not a split value (branch-free)."""
    return (key >= low) & (key <= high) & (key != split_a) & (key != split_b)


@register_jitable(inline="always")
def _keep_split(kept, first, last, start, keep):
    """The split values' kept elements of the range at `start` (kept[first:last], element indices)."""
    for c in range(first, last):
        keep[kept[c] - start] = True


@register_jitable(inline="always")
def _magnitude_mask(constants, args):
    """keep[e] for elements start.. of a tensor: magnitude in the window (a branch-free pass), then the split
    magnitudes' kept elements."""
    code, = constants
    base, raw, start, low, high, split_a, split_b, kept, first, last, keep = args
    for e in range(keep.shape[0]):
        keep[e] = _in_window(mag(rnd(widen(raw[e], code) - widen(base[e], code), code), code),
                             low, high, split_a, split_b)
    _keep_split(kept, first, last, start, keep)


def magnitude_mask(code, base, raw, start, selection, keep):
    _specialised(_magnitude_mask, int(code))((base, raw, start, *window_range(selection, start, keep.shape[0]),
                                              keep))


def random_mask(key, start, density, keep):
    """DARE: keep element start+e when its draw (cpu_kernels._uniform: seed, model, tensor, index) < density (in
    float32), compared as integers: the draw's 24 bits below draw_cut(density) (exact; no float per element)."""
    _random_mask(key, start, draw_cut(float(np.float32(density))), keep)


@njit(nogil=True, cache=True)
def _random_mask(key, start, cut, keep):
    bound = np.uint64(cut)
    for e in range(keep.shape[0]):
        keep[e] = _uniform_bits(key, start + e) < bound


@njit(inline="always")
def _stable_ranks(keys, key_bits, ranks, order, spare, counts):
    """ranks[c] = the place of element c in the ascending order of the non-negative `keys` (below 2**key_bits), equal
    keys in index order: what a stable sort (np.argsort(kind="stable")) gives, by a least-significant-digit radix
    sort of the indices, 8 bits a pass: every digit's counts in one pass over the keys, a pass skipped where every key
    has the same digit, the first pass reading the indices in order and the last writing the ranks. order and
    spare: index buffers as long as keys; counts: [4, 256]."""
    n = keys.shape[0]
    digits = (key_bits + 7) // 8
    counts[:digits] = 0
    for i in range(n):
        key = keys[i]
        for d in range(digits):
            counts[d, (key >> (8 * d)) & 255] += 1
    last = -1  # the last digit whose pass moves anything
    for d in range(digits):
        if n > 0 and counts[d, (keys[0] >> (8 * d)) & 255] != n:
            last = d
    if last < 0:
        for i in range(n):
            ranks[i] = i
        return
    first = True
    for d in range(last + 1):
        if counts[d, (keys[0] >> (8 * d)) & 255] == n:
            continue
        total = 0
        for digit in range(256):
            count = counts[d, digit]
            counts[d, digit] = total
            total += count
        shift = 8 * d
        for i in range(n):
            element = i if first else order[i]
            digit = (keys[element] >> shift) & 255
            place = counts[d, digit]
            counts[d, digit] = place + 1
            if d == last:
                ranks[element] = place
            else:
                spare[place] = element
        order, spare = spare, order
        first = False


@register_jitable(inline="always")
def _ranked_mask(constants, args):
    """della: within each row of `columns` elements (rows whole: elements row_start..), keep an element with
    probability (density − ε) + 2ε · (rank − 1) / (columns − 1), rank 1 the smallest magnitude (ties in index
    order; a one-column row: density)."""
    code, = constants
    base, raw, row_start, columns, key, low, span, keep = args
    key_bits = 31 if code == F32 else 15  # `mag`: the magnitude bits of the compute dtype
    keys = np.empty(columns, dtype=np.int64)
    ranks = np.empty(columns, dtype=np.int64)
    order = np.empty(columns, dtype=np.int64)
    spare = np.empty(columns, dtype=np.int64)
    counts = np.empty((4, 256), dtype=np.int64)
    for row in range(keep.shape[0] // columns):
        offset = row * columns
        for c in range(columns):
            keys[c] = mag(rnd(widen(raw[offset + c], code) - widen(base[offset + c], code), code), code)
        _stable_ranks(keys, key_bits, ranks, order, spare, counts)
        for c in range(columns):
            share = np.float32(ranks[c]) / np.float32(columns - 1) if columns > 1 else np.float32(0.5)
            probability = np.float32(low) + share * np.float32(span)
            keep[offset + c] = _uniform(key, row_start + offset + c) < probability


@njit(nogil=True, cache=True)
def stable_ranks(keys, key_bits):
    """`_stable_ranks` on its own (for tests)."""
    n = keys.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    _stable_ranks(keys, key_bits, ranks, np.empty(n, np.int64), np.empty(n, np.int64), np.empty((4, 256), np.int64))
    return ranks


def ranked_mask(code, base, raw, row_start, columns, key, density, epsilon, keep):
    _specialised(_ranked_mask, int(code))(
        (base, raw, row_start, columns, key, density - epsilon, 2.0 * epsilon, keep))


# --- the combine step -------------------------------------------------------------------------------------


@register_jitable(inline="always")
def _products(constants, args):
    """One model's contributions on a range: its task vector, masked (keep), rescaled, times its weight, each
    step rounded to the compute dtype; written as float32 (the values are the compute dtype's)."""
    code, masked = constants
    base, raw, keep, scale, weight, out = args
    for e in range(out.shape[0]):
        d = rnd(widen(raw[e], code) - widen(base[e], code), code)
        if masked:
            d = d * np.float32(keep[e])
        out[e] = rnd(rnd(d * scale, code) * weight, code)


def products(code, base, raw, keep, scale, weight, out):
    """`_products` for one model (keep None: nothing dropped), specialised for the dtype and the mask only, so the
    compiled kernels do not multiply with the number of models."""
    _specialised(_products, int(code), keep is not None)(
        (base, raw, keep if keep is not None else np.empty(0, np.bool_), np.float32(scale), np.float32(weight), out))


@register_jitable(inline="always")
def _combine(constants, args):
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group on one range, given each model's contributions
    (`products`, one row per model): the sign election on their float32 sum rounded once (sum consensus), the sums
    of the agreeing values and of their weights, each rounded once, the division, lambda, the base added."""
    code, consensus = constants
    base, contributions, weights, divisor_all, normalize, lam, out = args
    scaled = lam != np.float32(1.0)
    # the float32 sums, model by model over the range (each element's terms still added in the models' order, from
    # 0.0): loops over the elements with no loop inside vectorize, a loop over the models inside does not (5x)
    totals = np.zeros(out.shape[0], dtype=np.float32)
    for i in range(contributions.shape[0]):
        for e in range(out.shape[0]):
            totals[e] += contributions[i, e]
    if consensus == CONSENSUS_SUM:
        # the election model by model too, branch-free (a select per value: adding 0.0 to a sum that is never -0.0
        # leaves it as skipping the value would), each element's agreeing values still added in the models' order
        signs = np.empty(out.shape[0], dtype=np.float32)  # the elected sign: 1 (a sum >= 0), else -1
        for e in range(out.shape[0]):
            signs[e] = np.float32(1.0) if rnd(totals[e], code) >= 0 else np.float32(-1.0)
            totals[e] = np.float32(0.0)
        divisors = np.zeros(out.shape[0], dtype=np.float32)
        for i in range(contributions.shape[0]):
            weight = weights[i]
            for e in range(out.shape[0]):
                p = contributions[i, e]
                agree = p * signs[e] > 0  # p > 0 where the sign is positive, p < 0 where negative (NaN: neither)
                totals[e] += p if agree else np.float32(0.0)
                divisors[e] += weight if agree else np.float32(0.0)
        for e in range(out.shape[0]):
            divisor = rnd(divisors[e], code)
            _finish(out, e, base[e], rnd(totals[e], code), divisor if divisor != 0 else np.float32(1.0), normalize,
                    scaled, lam, code)
    else:  # apart, so that this loop has no loop inside
        for e in range(out.shape[0]):
            _finish(out, e, base[e], rnd(totals[e], code), divisor_all, normalize, scaled, lam, code)


@register_jitable(inline="always")
def _finish(out, e, base_value, mixed, divisor, normalize, scaled, lam, code):
    """The division (normalize), lambda and the base added, each rounded to the compute dtype."""
    if normalize:
        mixed = rnd(mixed / divisor, code)
    if scaled:
        mixed = rnd(mixed * lam, code)
    store(out, e, widen(base_value, code) + mixed, code)


def combine(code, base, contributions, weights, divisor, lam, out, *, consensus: int, normalize: bool):
    """One range of the merge (see `_combine`), specialised for the dtype and the consensus."""
    _specialised(_combine, int(code), int(consensus))(
        (base, contributions, weights, np.float32(divisor), bool(normalize), np.float32(lam), out))
