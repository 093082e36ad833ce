"""Whole-tensor statistics of mergekit's methods (norms, dot products), reduced in the order torch's CPU kernels
reduce, so the scalars a method derives from them (slerp's angle, ...) are mergekit's to the bit.

mergekit (the oracle) computes these with torch on CPU: `torch.linalg.vector_norm(x, dim=-1)` and
`x.sum(dim=-1)` over rows of float32 (slerp) or of the compute dtype (model_stock). torch reduces a contiguous row
with 8-lane float32 vectors (its vectorised kernels at the width its reductions use on x86-64; a vector of a
bfloat16 or float16 row holds 16 values, its two halves added, or squared and accumulated, one after the other),
in a fixed order:

- the 2-norm (ReduceOpsKernel's last-dimension path): lane l accumulates x[8i + l]² (a multiply, then an add),
  the lanes are added in order, then the leftover elements' squares one by one (as the compiler built torch's
  scalar loop: groups of four squared apart and added, the last up to three with a fused multiply-add), then
  one square root;
- the sum (SumKernel's cascade sum): rows of 4 vectors are accumulated into 4 levels of partial sums that are
  folded together every 2^p rows (p = max(4, ceil(log2(rows)) // 4)), then the partials, the leftover vectors
  and the leftover elements are added in a fixed order. Rows shorter than one vector take the same path with
  one lane.

The kernels run on host arrays of float32 values whatever the kernel set, so the compiled and torch paths (and
CUDA) get the same statistics. torch splits a sum of more than 32768 elements between its threads (the split
depends on how many it has); these kernels reduce as one thread does (mergekit with OMP_NUM_THREADS=1), which
only the last bits of a statistic of a large tensor can tell apart. torch's float16 2-norm takes its generic
reduction, which agrees with these up to 100000 elements (checked) but not on much longer rows.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable

from modelmerge_engine.cpu_kernels import _fma, _per_dtype, convert, rnd, widen
from modelmerge_engine.dtype_codes import BF16, F16, F32
from modelmerge_engine.layout import BASE
from modelmerge_engine.methods import sleef

LANES = 8  # float32 lanes of torch's reduction vectors
ILP = 4  # vectors per row of the cascade sum
LEVELS = 4  # partial-sum levels of the cascade sum


def host_values(merge, model, name: str, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of tensor `name` of `model` (merge.base or one of merge.finetunes) as float32 host
    values of the compute dtype: host_raw's values widened."""
    raw = host_raw(merge, model, name, start, stop)
    if merge.dtype.code == F32:
        return raw
    wide = np.empty(raw.shape[0], np.float32)
    widen_into(raw, merge.dtype.code, wide)
    return wide


def host_raw(merge, model, name: str, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of tensor `name` of `model` (merge.base or one of merge.finetunes) in the compute
    dtype's storage (float32, or bfloat16/float16 bit patterns; as stored, without a copy, where the checkpoint
    holds that dtype): rounded to it first, as mergekit loads every input in the config's dtype. A vocabulary
    tensor whose rows tokenizer_source moves is read with them moved (engine.moved_range), as every range the
    engine merges is."""
    compute = merge.dtype
    if merge.moves_rows(name):
        position = BASE if model is merge.base else next(i for i, m in enumerate(merge.finetunes) if m is model)
        raw, stored_code = merge.moved_range(position, name, start, stop), compute.code
    elif model.tensors[name].dtype.code is None:  # float64 checkpoints: numpy narrows to float32 first
        raw, stored_code = model.read(name, start, stop).astype(np.float32), F32
    else:
        raw, stored_code = model.read(name, start, stop), model.tensors[name].dtype.code
    if stored_code != compute.code:
        rounded = np.empty(raw.shape[0], compute.storage)
        convert(raw, stored_code, rounded, compute.code)
        raw = rounded
    return raw


@register_jitable(inline="always")
def _widen_loop(raw, code, out):
    for e in range(out.shape[0]):
        out[e] = widen(raw[e], code)


@njit(nogil=True, cache=True)
def widen_into(raw, code, out):
    """out = the bfloat16 (`code` BF16) or float16 bit patterns `raw` as float32: the dtype branch taken once,
    outside the loop, so each loop is a vectorised shift or conversion (cpu_kernels.convert, generic in both
    codes, branches per element)."""
    if code == BF16:
        _widen_loop(raw, BF16, out)
    else:
        _widen_loop(raw, F16, out)


@register_jitable(inline="always")
def _task_vectors(constants, args):
    code, = constants
    base, models, out = args
    i = 0
    for model in models:
        row = out[i]
        for e in range(base.shape[0]):
            row[e] = rnd(widen(model[e], code) - widen(base[e], code), code)
        i += 1


# task_vectors(code, base, models, out): out[i] = models[i] − base as float32 rounded to the dtype `code`, for
# inputs in its storage (host_raw), widened a value at a time: no widened copies of the inputs (measured on
# model_stock's statistics before they derived their own per block (block_vectors): 15% faster than from
# host_values' copies; nuslerp and sce read them so); specialised per dtype, so each model's loop vectorises.
task_vectors = _per_dtype(_task_vectors)


@njit(nogil=True, cache=True)
def _ceil_log2(value):
    if value <= 2:
        return 1
    bits = 0
    value -= 1
    while value > 0:
        value >>= 1
        bits += 1
    return bits


@njit(inline="always")
def _vector_lane(values, v, lane, lanes, packed):
    """Lane `lane` of vector `v` as torch loads it: 16-bit rows load 16 values per vector and add the upper 8
    to the lower 8 in float32."""
    if packed:
        return values[v * 2 * LANES + lane] + values[v * 2 * LANES + LANES + lane]
    return values[v * lanes + lane]


@njit(nogil=True, cache=True)
def _cascade_levels(rows):
    """(level_power, full_blocks) of torch's cascade sum over `rows` rows: a level folds into the next every
    2^level_power rows, up to the last whole block."""
    level_power = max(4, _ceil_log2(rows) // LEVELS)
    return level_power, rows // (1 << level_power) * (1 << level_power)


@njit(nogil=True, cache=True)
def _fold(acc, k, first, last, done, level_power, full_blocks):
    """The cascade's fold after `done` rows, for partial k of lanes (or columns) first..last-1 of acc
    [LEVELS, ILP, ...]."""
    level_step = 1 << level_power
    if done % level_step != 0 or done > full_blocks:
        return
    level_mask = level_step - 1
    for j in range(1, LEVELS):
        for c in range(first, last):
            acc[j, k, c] += acc[j - 1, k, c]
            acc[j - 1, k, c] = 0.0
        if done & (level_mask << (j * level_power)):
            break


# A sum in progress is (acc, state): acc the partial sums [LEVELS, ILP, lanes], state int64 [n, lanes, per_vector,
# packed, rows, level_power, full_blocks, rows done]. Segments fed to sum_rows hold whole rows of ILP vectors (a
# multiple of SUM_SEGMENT_MULTIPLE values) except the last; sum_finish takes what follows the last whole row.
SUM_SEGMENT_MULTIPLE = ILP * 2 * LANES
_N, _LANES, _PER_VECTOR, _PACKED, _ROWS, _LEVEL_POWER, _FULL_BLOCKS, _DONE = range(8)


@njit(nogil=True, cache=True)
def sum_begin(n, packed):
    """A float32 sum of a row of `n` values (`packed`: bfloat16 or float16) in torch's cascade order."""
    width = 2 * LANES if packed else LANES  # values per vector
    vectorised = n >= width
    state = np.zeros(8, np.int64)
    state[_N] = n
    state[_LANES] = LANES if vectorised else 1
    state[_PER_VECTOR] = width if vectorised else 1
    state[_PACKED] = 1 if packed and vectorised else 0
    rows = n // state[_PER_VECTOR] // ILP
    state[_ROWS] = rows
    state[_LEVEL_POWER], state[_FULL_BLOCKS] = _cascade_levels(rows)
    return np.zeros((LEVELS, ILP, state[_LANES]), np.float32), state


# torch's vectors as LLVM vectors of LANES float32 lanes. numba compiles a loop over an accumulator's lanes
# (acc[lane] += values[d + lane]) to scalar code, a load and a store per value: acc and values are both float32
# arrays that may alias, so LLVM keeps neither the lanes in registers nor the loop vectorised. These intrinsics
# emit the same per-lane adds (each lane's values in the same order, each operation rounded as before: an fmul,
# then an fadd, never fused) on one vector held in registers: 3-4x faster. They read the arrays' data from
# their first element, so callers pass unit-stride values and accumulators (_unit_stride).
_VECTOR = ir.VectorType(ir.FloatType(), LANES)


def _data(context, builder, array_type, array):
    return context.make_array(array_type)(context, builder, array).data


def _vector_at(builder, data, index):
    """The LANES values at data[index:index + LANES] (no alignment assumed)."""
    return builder.load(builder.bitcast(builder.gep(data, [index]), _VECTOR.as_pointer()), align=4)


def _float32_arrays(*arrays) -> bool:
    return all(isinstance(a, types.Array) and a.dtype == types.float32 for a in arrays)


@intrinsic
def _squares_into_lanes(typingctx, values, vectors, acc):
    """acc[lane] += values[LANES v + lane]² for v in range(vectors), in order (norm_add's loop)."""
    if not (_float32_arrays(values, acc) and isinstance(vectors, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = _data(context, builder, signature.args[0], args[0])
        count = context.cast(builder, args[1], signature.args[1], types.intp)
        lanes = builder.bitcast(_data(context, builder, signature.args[2], args[2]), _VECTOR.as_pointer())
        total = cgutils.alloca_once_value(builder, builder.load(lanes, align=4))
        width = ir.Constant(count.type, LANES)
        with cgutils.for_range(builder, count) as loop:
            x = _vector_at(builder, data, builder.mul(loop.index, width))
            builder.store(builder.fadd(builder.load(total), builder.fmul(x, x)), total)
        builder.store(builder.load(total), lanes, align=4)
        return context.get_dummy_value()

    return types.none(values, vectors, acc), codegen


@intrinsic
def _rows_into_partials(typingctx, values, first, rows, packed, acc):
    """acc[0, k, :] += vector k of each row of ILP vectors first..first+rows-1 of `values`, in order (the cascade
    sum's level 0, _add_rows without its folds); `packed`: 16-bit rows, whose vector is the sum of LANES values
    and the LANES after them."""
    if not (_float32_arrays(values, acc) and isinstance(first, types.Integer) and isinstance(rows, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = _data(context, builder, signature.args[0], args[0])
        start = context.cast(builder, args[1], signature.args[1], types.intp)
        count = context.cast(builder, args[2], signature.args[2], types.intp)
        is_packed = context.cast(builder, args[3], signature.args[3], types.boolean)
        partials = builder.bitcast(_data(context, builder, signature.args[4], args[4]), _VECTOR.as_pointer())
        sums = [cgutils.alloca_once_value(builder, builder.load(builder.gep(partials, [ir.Constant(count.type, k)]),
                                                                align=4)) for k in range(ILP)]
        intp = count.type
        per_vector = builder.select(is_packed, ir.Constant(intp, 2 * LANES), ir.Constant(intp, LANES))
        with cgutils.for_range(builder, count) as loop:
            row = builder.mul(builder.add(start, loop.index), ir.Constant(intp, ILP))
            for k, total in enumerate(sums):
                offset = builder.mul(builder.add(row, ir.Constant(intp, k)), per_vector)
                with builder.if_else(is_packed) as (two_halves, one):
                    with two_halves:
                        low = _vector_at(builder, data, offset)
                        high = _vector_at(builder, data, builder.add(offset, ir.Constant(intp, LANES)))
                        builder.store(builder.fadd(builder.load(total), builder.fadd(low, high)), total)
                    with one:
                        builder.store(builder.fadd(builder.load(total), _vector_at(builder, data, offset)), total)
        for k, total in enumerate(sums):
            builder.store(builder.load(total), builder.gep(partials, [ir.Constant(intp, k)]), align=4)
        return context.get_dummy_value()

    return types.none(values, first, rows, packed, acc), codegen


@register_jitable(inline="always")
def _unit_stride(values, acc):
    """values and acc's last dimension are unit-stride, and acc's lanes (and vectors) follow one another."""
    item = values.itemsize
    if values.strides[0] != item or acc.strides[acc.ndim - 1] != item:
        return False
    return acc.ndim == 1 or acc.strides[acc.ndim - 2] == item * acc.shape[acc.ndim - 1]


@register_jitable(inline="always")
def _add_vector_rows(values, acc, state, count, packed):
    """_add_rows for rows of whole LANES-lane vectors: the rows between two folds in one vectorised call."""
    level_power, full_blocks = state[_LEVEL_POWER], state[_FULL_BLOCKS]
    level_step = 1 << level_power
    begun = state[_DONE]
    i = 0
    while i < count:
        done = begun + i
        chunk = count - i
        next_fold = (done // level_step + 1) * level_step
        if next_fold <= full_blocks and next_fold - done < chunk:
            chunk = next_fold - done
        _rows_into_partials(values, i, chunk, packed, acc)
        i += chunk
        done = begun + i
        if done % level_step == 0 and done <= full_blocks:
            for k in range(ILP):
                _fold(acc, k, 0, LANES, done, level_power, full_blocks)
    state[_DONE] += count


@register_jitable(inline="always")
def _add_rows(values, acc, state, count, lanes, packed):
    """Adds `count` rows of ILP vectors of `lanes` lanes to the cascade, folding after each whole block."""
    level_power, full_blocks = state[_LEVEL_POWER], state[_FULL_BLOCKS]
    level_mask = (1 << level_power) - 1
    for i in range(count):
        for k in range(ILP):
            for lane in range(lanes):
                acc[0, k, lane] += _vector_lane(values, i * ILP + k, lane, lanes, packed)
        done = state[_DONE] + i + 1
        if done & level_mask == 0 and done <= full_blocks:  # else _fold returns at once
            for k in range(ILP):
                _fold(acc, k, 0, lanes, done, level_power, full_blocks)
    state[_DONE] += count


@njit(nogil=True, cache=True)
def sum_rows(values, acc, state):
    """Adds the whole rows of ILP vectors that `values` (the next values of the row) holds, up to the row's last."""
    lanes, per_vector, packed = state[_LANES], state[_PER_VECTOR], state[_PACKED] == 1
    count = min(values.shape[0] // (ILP * per_vector), state[_ROWS] - state[_DONE])
    if lanes == LANES and _unit_stride(values, acc):  # rows of at least a vector: LLVM vectors of the lanes
        _add_vector_rows(values, acc, state, count, packed)
    else:
        _add_rows(values, acc, state, count, lanes, packed)
    return count * ILP * per_vector


@njit(nogil=True, cache=True)
def sum_finish(tail, acc, state):
    """The sum, given the values after the last whole row of ILP vectors (leftover vectors, then elements)."""
    lanes, per_vector, packed = state[_LANES], state[_PER_VECTOR], state[_PACKED] == 1
    for j in range(1, LEVELS):
        for k in range(ILP):
            for lane in range(lanes):
                acc[0, k, lane] += acc[j, k, lane]
    vectors = tail.shape[0] // per_vector
    for v in range(vectors):
        for lane in range(lanes):
            acc[0, 0, lane] += _vector_lane(tail, v, lane, lanes, packed)
    for k in range(1, ILP):
        for lane in range(lanes):
            acc[0, 0, lane] += acc[0, k, lane]
    total = np.float32(0.0)
    for e in range(vectors * per_vector, tail.shape[0]):
        total += tail[e]
    for lane in range(lanes):
        total += acc[0, 0, lane]
    return np.float32(np.float32(0.0) + total)  # accumulated into the zero-filled output


@njit(nogil=True, cache=True)
def sum_restart(acc, state):
    """A sum from sum_begin back to no values added, for another row of the same length (no new arrays)."""
    acc.fill(0.0)
    state[_DONE] = 0


@njit(nogil=True, cache=True)
def row_sum(values, packed):
    """`row.sum(dim=-1)` of one contiguous row (its values widened to float32; `packed`: the row is bfloat16 or
    float16), accumulated in float32 in torch's cascade order; the caller rounds it to the row's dtype."""
    acc, state = sum_begin(values.shape[0], packed)
    used = sum_rows(values, acc, state)
    return sum_finish(values[used:], acc, state)


@njit(nogil=True, cache=True)
def norm_add(values, packed, acc):
    """Adds the squares of the whole vectors of `values` (the next values of a row) to the 8 lane sums `acc`;
    returns how many values that was (the rest, fewer than one vector, are the row's last: norm_finish)."""
    width = 2 * LANES if packed else LANES
    whole = values.shape[0] - values.shape[0] % width
    if _unit_stride(values, acc):  # a 16-bit vector's two halves are two vectors of LANES values, in order
        _squares_into_lanes(values, whole // LANES, acc)
        return whole
    for d in range(0, whole, width):
        for half in range(width // LANES):
            for lane in range(LANES):
                square = values[d + half * LANES + lane] * values[d + half * LANES + lane]
                acc[lane] += square
    return whole


@njit(nogil=True, cache=True)
def norm_finish(tail, acc):
    """The 2-norm, given the row's values after its last whole vector."""
    total = acc[0]
    for lane in range(1, LANES):
        total += acc[lane]
    grouped = tail.shape[0] // 4 * 4
    for d in range(grouped):
        square = tail[d] * tail[d]
        total += square
    for d in range(grouped, tail.shape[0]):
        total = _fma(tail[d], tail[d], total)
    return np.float32(np.sqrt(total))


@njit(nogil=True, cache=True)
def row_norm(values, packed):
    """`torch.linalg.vector_norm(row, dim=-1)` of one contiguous row (widened to float32; `packed`: bfloat16 or
    float16, 16 values per vector, squared and accumulated in two halves), in float32 in torch's order; the
    caller rounds it to the row's dtype."""
    acc = np.zeros(LANES, np.float32)
    whole = norm_add(values, packed, acc)
    return norm_finish(values[whole:], acc)


# Streaming statistics loops (multislerp's passes, model_stock's): a block of a few hundred elements of every
# input at a time (in cache), derived (block_vectors) and reduced in order into each row's accumulators
# (norms_reduced, sums_reduced); only a row's last block leaves values to a tail, which norm_finish or sum_finish
# take. Blocks are a multiple of SUM_SEGMENT_MULTIPLE values, so every other block is reduced whole.


@register_jitable(inline="always")
def block_vectors(code, with_base, base, inputs, start, n, b, v):
    """v[:, :n] = the task vectors (without a base: the models' values) at elements start..start+n; b[:n] the
    base's values (0 without one)."""
    block = base[start:start + n]  # indexed from 0: `array[start + k]` would check for a negative index per
    # element and not vectorise (10x slower)
    for k in range(n):
        b[k] = widen(block[k], code) if with_base else np.float32(0.0)
    i = 0
    for model in inputs:
        block, row = model[start:start + n], v[i]
        for k in range(n):
            x = widen(block[k], code)
            row[k] = rnd(x - b[k], code) if with_base else x
        i += 1


@register_jitable(inline="always")
def _tail_into(row, used, n, tail):
    """tail[:count] = the values of row[:n] after the `used` a reduction took (only a tensor's last block leaves
    any: the values after its last whole vector, or row of vectors); returns the count."""
    for k in range(n - used):
        tail[k] = row[used + k]
    return n - used


@register_jitable(inline="always")
def norms_reduced(values, rows, n, packed, norms, tail):
    """values[:rows, :n] added in order to each row's 2-norm lanes (norms [rows, LANES]); returns the tail count."""
    left = 0
    for i in range(rows):
        row = values[i, :n]
        left = _tail_into(row, norm_add(row, packed, norms[i]), n, tail[i])
    return left


@register_jitable(inline="always")
def sums_reduced(values, rows, n, sums, states, tail):
    """values[:rows, :n] added in order to each row's cascade sum (sums [rows, LEVELS, ILP, lanes], states
    [rows, 8]); returns the tail count."""
    left = 0
    for i in range(rows):
        row = values[i, :n]
        left = _tail_into(row, sum_rows(row, sums[i], states[i]), n, tail[i])
    return left


@njit(nogil=True, cache=True)
def scaled_products(a, b, scale_a, scale_b, out):
    """out = (a / scale_a) * (b / scale_b), each operation rounded to float32 (mergekit normalises before it
    multiplies)."""
    for e in range(out.shape[0]):
        out[e] = (a[e] / scale_a) * (b[e] / scale_b)


@njit(nogil=True, cache=True)
def _round_into(values, code, out):
    for i in range(values.shape[0]):
        out[i] = rnd(values[i], code)


def rounded(values, code: int) -> np.ndarray:
    """float32 values rounded to the compute dtype `code` (as float32), as torch rounds a 16-bit op's result."""
    values = np.atleast_1d(np.asarray(values, np.float32))
    out = np.empty_like(values)
    _round_into(values, code, out)
    return out


_torch_module: list = []  # [torch] or [None] once looked up


def _torch():
    if not _torch_module:
        try:
            import torch
        except ImportError:  # the CPU merge image has no torch
            torch = None
        _torch_module.append(torch)
    return _torch_module[0]


SCALAR_FUNCTIONS = {"acos": math.acos, "sin": math.sin, "cos": math.cos}  # correctly rounded: the last resort
# at::vml's MKL calls (aten/src/ATen/cpu/vml.h, IMPLEMENT_VML_MKL): VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE
VML_MODE = 0x2 | 0x140000 | 0x100
_vml_functions: list = []  # [{name: vms function}] or [None] once looked up


def _vml():
    """torch's float32 acos, sin and cos (MKL's VML: vmsAcos, vmsSin, vmsCos, which torch's CPU kernels call on a
    float32 tensor) from the library torch's wheel links MKL into (torch/lib/libtorch_cpu.so, which exports
    them), loaded with ctypes without importing torch: the library's own initialisation costs about 60 MB of
    anonymous memory, torch's import about 285 MB (a slerp would not fit a 256 MiB pod). None where torch is
    not installed (the CPU merge image) or its library has no MKL (then torch itself is asked)."""
    if not _vml_functions:
        functions = None
        try:
            spec = importlib.util.find_spec("torch")
        except (ImportError, ValueError):  # unimportable, or a torch module without a spec
            spec = None
        library = Path(spec.origin).parent / "lib" / "libtorch_cpu.so" if spec and spec.origin else None
        if library is not None and library.is_file():
            try:
                loaded = ctypes.CDLL(str(library))
                functions = {name: getattr(loaded, "vms" + name.capitalize()) for name in SCALAR_FUNCTIONS}
            except (OSError, AttributeError):
                functions = None
        for function in (functions or {}).values():
            function.restype = None
            function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
        _vml_functions.append(functions)
    return _vml_functions[0]


def scalar_function(name: str, value, code: int) -> np.float32:
    """`torch.<name>` (acos, sin, cos) of one value of the compute dtype `code`, as mergekit's op on a CPU tensor
    of that dtype gives it, as float32: the scalars mergekit derives from a tensor's statistics (slerp's angle,
    ...). `value` is a float32 (every caller's); it is rounded to the dtype first, as the tensor holds it.

    - bfloat16 and float16: torch widens the value, takes SLEEF's float32 1-ulp function (vec::map over
      Vectorized<float>) and rounds back; sleef.py reproduces those functions to the bit (tests/test_sleef.py:
      every 16-bit value against torch), so these never import torch (sin and cos of 125 or more, which SLEEF
      reduces another way, excepted).
    - float32: torch (built with MKL, as the PyPI wheels are) takes MKL's VML (vmsAcos, vmsSin, vmsCos in its
      high-accuracy mode), not SLEEF, and MKL's acos even differs between its AVX512 and AVX2 code paths; so
      where torch is installed the value is MKL's own, called in torch's library without importing torch
      (_vml; tests/test_sleef.py: equal to torch's on millions of arguments), or torch's where its library has
      no MKL. Without torch (the CPU merge image) it is SLEEF's float32 value, which differs from MKL's in the
      last bit for about 8% of acos arguments and 2-3% of sin and cos arguments in [-4, 4] (the correctly
      rounded value, the fallback beyond SLEEF's range here, differs for about 9% and 5%)."""
    x = np.float32(value)
    held = float(x) == float(value) or math.isnan(x)  # a float32, as every caller's value is
    reproduced = held and sleef.supported(name, x)
    if reproduced and code != F32:
        return sleef.scalar(name, x, code)
    vml = _vml() if code == F32 and held else None
    if vml is not None:
        argument, result = np.array([x], np.float32), np.empty(1, np.float32)
        vml[name](1, argument.ctypes.data, result.ctypes.data, VML_MODE)
        return result[0]
    torch = _torch()
    if torch is None:
        return sleef.scalar(name, x, code) if reproduced else rounded(SCALAR_FUNCTIONS[name](float(value)), code)[0]
    dtype = {BF16: torch.bfloat16, F16: torch.float16, F32: torch.float32}[code]
    return np.float32(getattr(torch, name)(torch.tensor(float(value), dtype=dtype)).item())


DOT_REGISTERS = 8  # float32 vectors of lanes a 16-bit torch.dot accumulates into (4 pairs of one 16-value load)


@njit(nogil=True, cache=True)
def _lane_tree(acc, lanes):
    """The lanes added as a vector reduction adds them: halves added lane by lane until one is left."""
    width = lanes
    while width > 1:
        width //= 2
        for lane in range(width):
            acc[lane] += acc[lane + width]
    return acc[0]


@njit(nogil=True, cache=True)
def row_dot(a, b):
    """`torch.dot(a, b)` of two contiguous bfloat16 or float16 rows (values widened to float32) as torch's CPU
    kernel computes it (dot_with_fp32_arith), in float32: blocks of 64 values go to 8 registers of 8 lanes (a
    16-value load's halves to two registers), the registers are added as a tree (0+4, 1+5, ...; 0+2, 1+3; 0+1)
    and then their lanes likewise; then the leftover 16-value vectors into one register of 8 lanes (low half,
    then high half), its lanes added as a tree; then the last products one by one. Products of 16-bit values are
    exact in float32, so fused or not they add the same. The caller rounds the result to the dtype. Checked
    against torch 2.15 on rows of up to 4096 values (every one equal); longer rows torch reduces another way
    (not reproduced: results within a few float32 ulps). float32 rows (torch.dot calls MKL's sdot, whose order
    cannot be reproduced) take the same order, each product rounded: within a few float32 ulps of torch's."""
    n = a.shape[0]
    lanes = LANES
    block = DOT_REGISTERS * lanes
    acc = np.zeros((DOT_REGISTERS, lanes), np.float32)
    whole = n - n % block
    for start in range(0, whole, block):
        for r in range(DOT_REGISTERS):
            for lane in range(lanes):
                acc[r, lane] += a[start + r * lanes + lane] * b[start + r * lanes + lane]
    half = DOT_REGISTERS
    while half > 1:
        half //= 2
        for r in range(half):
            for lane in range(lanes):
                acc[r, lane] += acc[r + half, lane]
    total = _lane_tree(acc[0], lanes)
    tail = np.zeros(lanes, np.float32)
    vectors = n - n % (2 * lanes)
    for start in range(whole, vectors, 2 * lanes):
        for lane in range(2 * lanes):
            tail[lane % lanes] += a[start + lane] * b[start + lane]
    total += _lane_tree(tail, lanes)
    for e in range(vectors, n):
        total += a[e] * b[e]
    return np.float32(total)


# Reductions along a tensor's first dimension (mergekit's nuslerp_row_wise transposes it to the last and reduces
# there, a strided dimension): the tensor is viewed as [rows, columns] and each column is reduced, its rows fed in
# order a block of whole rows at a time.
#
# - The 2-norm of a column is torch's generic reduction: one float32 sum of the squares (a multiply, then an add),
#   row after row, then one square root (every dtype).
# - The sum of a column is SumKernel's outer reduction: where there are at least one vector of columns (8 float32,
#   16 bfloat16 or float16 values) the columns in whole groups of 4 vectors (32 columns) are each one cascade over
#   all the rows and the others are split 4 ways (row r into partial r % 4, each a cascade over rows // 4; the
#   last rows % 4 rows added to partial 0 after, then partials 1, 2, 3); with fewer columns, whole groups of 4
#   columns are one cascade each and the rest split 4 ways. Checked against torch 2.15 (every column equal, on
#   one and on two threads, up to 896 x 4864 values; torch may split the columns of a reduction of over 32768
#   elements between its threads, which could move these groups with other thread counts: not checked).
# A column sum in progress is (acc [LEVELS, ILP, columns], tail [ILP - 1, columns], state int64 [rows, columns
# taken as one cascade, rows done]).
_C_ROWS, _C_PLAIN, _C_DONE = range(3)


@njit(nogil=True, cache=True)
def column_norm_add(block, acc):
    """Adds the squares of `block` (the next whole rows, [rows, columns]) to the columns' float32 sums `acc`."""
    for r in range(block.shape[0]):
        for c in range(block.shape[1]):
            square = block[r, c] * block[r, c]
            acc[c] += square


def column_norm_finish(acc) -> np.ndarray:
    """Each column's 2-norm in float32 (the caller rounds them to the dtype)."""
    return np.sqrt(acc.astype(np.float32))


def column_sum_begin(rows: int, columns: int, packed: bool):
    """The sums of the `columns` columns of `rows` rows (`packed`: bfloat16 or float16) in torch's order."""
    vector = 2 * LANES if packed else LANES
    plain = columns // (ILP * LANES) * (ILP * LANES) if columns >= vector else columns // ILP * ILP
    state = np.array([rows, plain, 0], np.int64)
    return np.zeros((LEVELS, ILP, columns), np.float32), np.zeros((ILP - 1, columns), np.float32), state


@njit(nogil=True, cache=True)
def column_sum_rows(block, acc, tail, state):
    """Adds the next whole rows `block` [rows, columns] to the column sums in progress."""
    rows, plain, columns = state[_C_ROWS], state[_C_PLAIN], block.shape[1]
    split = rows // ILP
    whole_power, whole_blocks = _cascade_levels(rows)
    split_power, split_blocks = _cascade_levels(split)
    for i in range(block.shape[0]):
        r = state[_C_DONE] + i
        for c in range(plain):
            acc[0, 0, c] += block[i, c]
        _fold(acc, 0, 0, plain, r + 1, whole_power, whole_blocks)
        if r < split * ILP:
            k = r % ILP
            for c in range(plain, columns):
                acc[0, k, c] += block[i, c]
            if k == ILP - 1:
                for kk in range(ILP):
                    _fold(acc, kk, plain, columns, r // ILP + 1, split_power, split_blocks)
        else:
            for c in range(plain, columns):
                tail[r - split * ILP, c] = block[i, c]
    state[_C_DONE] += block.shape[0]


@njit(nogil=True, cache=True)
def column_sum_finish(acc, tail, state):
    """Each column's float32 sum once every row was added (the caller rounds them to the dtype)."""
    rows, plain, columns = state[_C_ROWS], state[_C_PLAIN], acc.shape[2]
    out = np.empty(columns, np.float32)
    for c in range(columns):
        for j in range(1, LEVELS):
            for k in range(ILP):
                acc[0, k, c] += acc[j, k, c]
        total = acc[0, 0, c]
        if c >= plain:
            for r in range(rows - rows // ILP * ILP):
                total += tail[r, c]
            for k in range(1, ILP):
                total += acc[0, k, c]
        out[c] = np.float32(0.0) + total
    return out
