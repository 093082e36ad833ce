"""CPU kernels: one compiled pass per range, no temporaries, the GIL released (numba, nogil).

Each function reproduces, element by element, the torch operations merging-eval performs on whole models:
float32 arithmetic with a rounding to the compute dtype wherever a torch op on a 16-bit tensor rounds
(`rnd`). Values are stored as their bit patterns: bfloat16 and float16 in uint16 arrays, float32 in float32
arrays; `code` (dtype_codes.py) says which format an array holds. Inputs are a tuple of arrays (one per model).
Thresholds are magnitude bit patterns (see select.py); -1 means "no threshold" (nothing trimmed).

Each loop is written once, generic in the dtype code and the flags, and compiled per combination by
`_specialised`: every constant folded in, so the machine code is branch-free and vectorises.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload, register_jitable

from modelmerge_engine.dtype_codes import BF16, F32

# Inlining the dtype overloads (needed for the loops to vectorise) trips a pedantic internal check of
# numba's SSA pass at compile time; the compiled code is checked against merging-eval by the tests.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

KEEP_ALL, BY_MAGNITUDE, AT_RANDOM = 0, 1, 2


@intrinsic
def _u32_as_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _f16_bits_to_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16_bits(typingctx, x):
    def codegen(context, builder, signature, args):  # fptrunc rounds to nearest even, like c10::Half
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma: one instruction on x86-64-v3)."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fma = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fma, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _bf16_bits(typingctx, x):
    """Round to nearest even, NaN kept NaN: c10::BFloat16's conversion.

    An intrinsic (LLVM IR at each use), not a function numba inlines: numba relabels an inlined function's blocks
    after every label it has handed out in the process, so an inlined function that itself inlines one (rnd,
    store and mag use this at every call) doubled the process's highest label, and a process compiling many
    kernels reached block names too long for LLVM ("name is too long", "unable to create block named"). A plain
    function call instead left the loops storing bfloat16 unvectorised (2x slower)."""
    def codegen(context, builder, signature, args):
        i32, i16 = ir.IntType(32), ir.IntType(16)
        u = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.lshr(builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), odd), ir.Constant(i32, 16))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(is_nan, ir.Constant(i16, 0x7FC0), builder.trunc(rounded, i16))

    return types.uint16(types.float32), codegen


@njit(inline="always")
def rnd(f, code):
    """float32 → compute dtype → float32: where a 16-bit torch op rounds its result."""
    if code == F32:
        return f
    if code == BF16:
        return _u32_as_f32(np.uint32(_bf16_bits(f)) << np.uint32(16))
    return _f16_bits_to_f32(_f32_to_f16_bits(f))


@njit(inline="always")
def mag(f, code):
    """Magnitude bit pattern of f rounded to the compute dtype (ordered like |f|)."""
    if code == F32:
        return np.int64(_f32_as_u32(f) & np.uint32(0x7FFFFFFF))
    bits = _bf16_bits(f) if code == BF16 else _f32_to_f16_bits(f)  # no function numba inlines: see _bf16_bits
    return np.int64(bits & np.uint16(0x7FFF))


def widen(x, code):  # pragma: no cover - replaced by the overload below inside compiled code
    raise NotImplementedError


@overload(widen, inline="always")
def _widen(x, code):
    if isinstance(x, types.Float):
        return lambda x, code: np.float32(x)

    def from_bits(x, code):
        if code == BF16:
            return _u32_as_f32(np.uint32(x) << np.uint32(16))
        return _f16_bits_to_f32(x)

    return from_bits


def store(out, e, f, code):  # pragma: no cover
    raise NotImplementedError


@overload(store, inline="always")
def _store(out, e, f, code):
    if isinstance(out.dtype, types.Float):
        def to_float(out, e, f, code):
            out[e] = f
        return to_float

    def to_bits(out, e, f, code):
        out[e] = _bf16_bits(f) if code == BF16 else _f32_to_f16_bits(f)  # no function numba inlines: _bf16_bits

    return to_bits


# --- specialisation --------------------------------------------------------------------------------------

# Compiled kernels by (loop, constants): each compiles on first use and is cached on disk; variants never
# used are never compiled. Module-level, so precompile.py finds every kernel a merge has used.
_SPECIALISED: dict[tuple, object] = {}


def source_fingerprint(root: Path) -> str:
    """A hash of the source of every Python module under `root` (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def engine_source_fingerprint() -> str:
    """The engine package's source_fingerprint, read once per process."""
    return source_fingerprint(Path(__file__).parent)


def _specialised(loop, *constants):
    """A compiled `run(args)` = `loop(constants, args)`, with the constants (dtype code, flags) folded in.

    Loops take their constants and their arguments as two tuples and unpack them first: numba cannot
    inline a call with *args. `loop` is a register_jitable function: numba's cache key pickles the closure's
    contents, and a plain module-level function pickles by name (a dispatcher pickles with a per-process id,
    so the on-disk cache would never hit). A name says nothing of the body, and numba checks only this file's
    stamp: a loop (or a helper it inlines) edited in a method's module would keep running the machine code
    cached for the old one. So the closure also holds the engine's source fingerprint: any change to the
    engine's modules is a new cache key for every specialised kernel (precompile builds them again).

    numpy's error model: a float division by zero gives inf or NaN (as torch's ops do) instead of raising, so a
    loop that divides has no check and exception path per element and vectorises (nuslerp's combine step: 10.9
    against 0.9 ms per 1M elements)."""
    key = (loop.__name__, *constants)
    kernel = _SPECIALISED.get(key)
    if kernel is None:
        source = engine_source_fingerprint()

        @njit(nogil=True, cache=True, error_model="numpy")  # IEEE division as torch's; no zero check per element
        def run(args):
            source  # noqa: B018 (a free variable, so numba's cache key hashes it with the closure)
            return loop(constants, args)

        kernel = _SPECIALISED.setdefault(key, run)
    return kernel


def _per_dtype(loop):
    """The public kernel `name(code, *args)`: `loop` specialised for the dtype `code`."""
    def kernel(code, *args):
        return _specialised(loop, int(code))(args)

    kernel.__name__ = kernel.__qualname__ = loop.__name__.lstrip("_")
    kernel.__doc__ = loop.__doc__
    return kernel


# --- conversions -----------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def convert(source, source_code, out, out_code):
    """Cast between float formats (e.g. float32 checkpoints merged in bfloat16), rounding to nearest even."""
    for e in range(out.shape[0]):
        store(out, e, widen(source[e], source_code), out_code)


# --- thresholds ------------------------------------------------------------------------------------------


@register_jitable(inline="always")
def _histogram(constants, args):
    """counts[i] += histogram of the magnitude bits (>> shift) of input i's task vector (rounded like
    merging-eval's `finetuned - pretrained`) or of its weights; with buckets[i] >= 0 only values whose high
    16 bits equal it are counted, by their low 16 bits (the second pass of the float32 radix select)."""
    code, = constants
    base, inputs, task_vectors, shift, buckets, counts = args
    for e in range(base.shape[0]):
        b = widen(base[e], code)
        for i in range(len(inputs)):
            v = widen(inputs[i][e], code)
            if task_vectors:
                v = rnd(v - b, code)
            m = mag(v, code)
            if buckets[i] >= 0:
                if (m >> 16) != buckets[i]:
                    continue
                m &= 0xFFFF
            counts[i, m >> shift] += 1


histogram = _per_dtype(_histogram)


# --- mask_merging's first step ---------------------------------------------------------------------------


@njit(inline="always")
def _uniform_bits(key, index):
    """The 24 random bits of element `index` of a stream (splitmix64 of key + index): the same draw whatever
    the ranges, threads or device, and no state to carry between ranges."""
    z = np.uint64(key) + np.uint64(index) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(40)


@njit(inline="always")
def _uniform(key, index):
    """A uniform float32 in [0, 1) for element `index` of a stream: its 24 random bits / 2**24 (exact)."""
    return np.float32(_uniform_bits(key, index)) * np.float32(1.0 / 16777216.0)


def draw_cut(rate: float) -> int:
    """The least 24-bit draw that is >= `rate` once divided by 2**24, so `_uniform(..) >= rate` exactly when
    `_uniform_bits(..) >= draw_cut(rate)` (rate * 2**24 is exact in float64): the loop compares integers."""
    return min(max(math.ceil(rate * 16777216.0), 0), 1 << 24)


@njit(nogil=True, cache=True)
def uniform_draws(key, start, out):
    """The draws `mask` makes for elements start.. of a stream (for the torch kernel set)."""
    for e in range(out.shape[0]):
        out[e] = _uniform(key, start + e)


@register_jitable(inline="always")
def _mask(constants, args):
    """One model's masked weights: drop by magnitude (threshold >= 0: |v| <= kth) or at random (draw < rate,
    for elements start.. of the stream `key`), rescale by 1 / (1 - rate), and re-add the base for delta
    weights (`pretrained + 1.0 * masked`). Dropping multiplies by 0, as merging-eval's `values * ~mask`."""
    code, delta, mode, rescale = constants
    base, raw, threshold, key, start, rate, cut, out = args
    keep_scale = np.float32(1.0 - rate)
    cut = np.uint64(cut)
    for e in range(out.shape[0]):
        b = widen(base[e], code)
        v = widen(raw[e], code)
        if delta:
            v = rnd(v - b, code)
        if mode == BY_MAGNITUDE:
            v = v * np.float32(mag(v, code) > threshold)
        elif mode == AT_RANDOM:
            v = v * np.float32(_uniform_bits(key, start + e) >= cut)
        if rescale:
            v = rnd(v / keep_scale, code)
        if delta:
            v = rnd(b + v, code)
        store(out, e, v, code)


def mask(code, base, raw, params, out):
    """One model's masked weights (see `_mask`), as `params` (kernels.MaskParams) describes them; the loop is
    specialised for the dtype and every flag."""
    if params.threshold >= 0:
        mode = BY_MAGNITUDE
    else:
        mode = AT_RANDOM if params.random_key is not None else KEEP_ALL
    rescale = params.rescale and params.rate != 1.0
    kernel = _specialised(_mask, int(code), bool(params.delta), mode, bool(rescale))
    kernel((base, raw, params.threshold, params.random_key or 0, params.start, params.rate,
            draw_cut(params.rate), out))


# --- the methods -----------------------------------------------------------------------------------------


@register_jitable(inline="always")
def _average(constants, args):
    """`stack(inputs).mean(dim=0)`: float32 sum, float32 division, one rounding."""
    code, = constants
    inputs, out = args
    n = np.float32(len(inputs))
    for e in range(out.shape[0]):
        total = widen(inputs[0][e], code)
        for i in range(1, len(inputs)):
            total += widen(inputs[i][e], code)
        store(out, e, total / n, code)


average = _per_dtype(_average)


@register_jitable(inline="always")
def _task_arithmetic(constants, args):
    """base + s * (tv_0 + tv_1 + ...), each tv and each partial sum rounded like merging-eval's tensors."""
    code, = constants
    base, inputs, scaling, out = args
    s = np.float32(scaling)
    for e in range(out.shape[0]):
        b = widen(base[e], code)
        total = rnd(widen(inputs[0][e], code) - b, code)
        for i in range(1, len(inputs)):
            total = rnd(total + rnd(widen(inputs[i][e], code) - b, code), code)
        store(out, e, b + rnd(s * total, code), code)


task_arithmetic = _per_dtype(_task_arithmetic)


@njit(inline="always")
def _trimmed(base_value, value, code, threshold):
    """`task_vector * (|task_vector| >= kth)`; branch-free, so the loops compile to selects and vectorise."""
    v = rnd(value - base_value, code)
    return v * np.float32((threshold < 0) | (mag(v, code) >= threshold))


@register_jitable(inline="always")
def _ties(constants, args):
    """merging-eval's ties_merging: trim per tensor, elect sign(sum) (0 counts as +), average the values of
    the elected sign (its `sum(list)` rounds after each addition), scale, add to the base in float32."""
    code, = constants
    base, inputs, thresholds, scaling, out = args
    s = np.float32(scaling)
    for e in range(out.shape[0]):
        b = widen(base[e], code)
        total = _trimmed(b, widen(inputs[0][e], code), code, thresholds[0])
        for i in range(1, len(inputs)):
            total = rnd(total + _trimmed(b, widen(inputs[i][e], code), code, thresholds[i]), code)
        elected = np.float32(1.0) - np.float32(2.0) * np.float32(total < 0)
        kept = np.float32(0.0)
        count = np.float32(0.0)
        for i in range(len(inputs)):
            t = _trimmed(b, widen(inputs[i][e], code), code, thresholds[i])
            keep = np.float32(t * elected > 0)
            kept = rnd(kept + t * keep, code)  # adding the dropped ±0 changes nothing, as in merging-eval
            count += keep
        store(out, e, b + s * (kept / max(count, np.float32(1.0))), code)


ties = _per_dtype(_ties)


@njit(inline="always")
def _trimmed_sum(b, inputs, e, code, thresholds):
    """Σ_i trimmed_i at element e, in float32 (`stack(trimmed).sum(dim=0)`)."""
    total = np.float32(0.0)
    for i in range(len(inputs)):
        total += _trimmed(b, widen(inputs[i][e], code), code, thresholds[i])
    return total


@register_jitable(inline="always")
def _global_ties_sign_balance(constants, args):
    """Σ sign(Σ_i trimmed_i) over the range: what decides ties_merging_dare's majority sign."""
    code, = constants
    base, inputs, thresholds = args
    balance = 0
    for e in range(base.shape[0]):
        total = _trimmed_sum(widen(base[e], code), inputs, e, code, thresholds)
        balance += np.int64(total > 0) - np.int64(total < 0)
    return balance


global_ties_sign_balance = _per_dtype(_global_ties_sign_balance)


@register_jitable(inline="always")
def _global_ties(constants, args):
    """merging-eval's ties_merging_dare (TIES with one global threshold per model): sign of the float32 sum
    (0 → majority sign), float32 sum of the agreeing values rounded once (`torch.sum(dim=0)`), mean, scale,
    add to the base."""
    code, = constants
    base, inputs, thresholds, majority, scaling, out = args
    s = np.float32(scaling)
    m = np.float32(majority)
    for e in range(out.shape[0]):
        b = widen(base[e], code)
        total = _trimmed_sum(b, inputs, e, code, thresholds)
        elected = np.float32(total > 0) - np.float32(total < 0) + m * np.float32(total == 0)
        kept = np.float32(0.0)
        count = np.float32(0.0)
        for i in range(len(inputs)):
            t = _trimmed(b, widen(inputs[i][e], code), code, thresholds[i])
            keep = np.float32(t * elected > 0)
            kept += t * keep
            count += keep
        store(out, e, b + s * (rnd(kept, code) / max(count, np.float32(1.0))), code)


global_ties = _per_dtype(_global_ties)


# --- mergekit's methods ----------------------------------------------------------------------------------


@register_jitable(inline="always")
def _linear(constants, args):
    """mergekit's linear: Σ_i weight_i * x_i accumulated in float32 with a fused multiply-add per model (what
    torch's `addcmul_` into a float32 accumulator compiles to), divided by the sum of the weights with normalize,
    one rounding to the compute dtype."""
    code, normalize = constants
    inputs, weights, denominator, out = args
    for e in range(out.shape[0]):
        total = np.float32(0.0)
        for i in range(len(inputs)):
            total = _fma(widen(inputs[i][e], code), weights[i], total)
        if normalize:
            total = total / denominator
        store(out, e, total, code)


def linear(code, inputs, weights, denominator, out, *, normalize: bool):
    """mergekit's linear on one range (see `_linear`), specialised for the dtype and `normalize`."""
    _specialised(_linear, int(code), bool(normalize))((inputs, weights, np.float32(denominator), out))
