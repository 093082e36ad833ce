"""float32 acos, sin and cos as torch's CPU kernels compute them for bfloat16 and float16 tensors: SLEEF's
vectorised 1.0-ulp functions (Sleef_acosf16_u10, Sleef_sinf16_u10, Sleef_cosf16_u10 on AVX512, their 8-lane twins
on AVX2: the same algorithm), reimplemented here one value at a time so that the values mergekit derives from them
(slerp's angle, ...) are reproduced to the bit without importing torch. (torch's float32 tensors take MKL's VML
instead, where torch is built with MKL: see torch_reductions.scalar_function.)

The algorithms and their constants are SLEEF's (https://github.com/shibatch/sleef, src/libm/sleefsimdsp.c
xacosf_u1, xsinf_u1, xcosf_u1 and the double-float arithmetic of src/libm/df.h, in the build with fused
multiply-add that torch's AVX2 and AVX512 kernels use; Copyright Naoki Shibata and contributors 2010 - 2020,
distributed under the Boost Software License, Version 1.0, https://www.boost.org/LICENSE_1_0.txt). Every
operation is one float32 operation rounded to nearest even as there: additions, products, divisions and square
roots in float32, and each fused multiply-add with one rounding (llvm.fma, cpu_kernels._fma: exact by LLVM's
definition, one instruction on x86-64-v3 and libm's fmaf elsewhere, so no float64 emulation with its double
rounding is needed).

Range: acos takes every float32 (NaN outside [-1, 1]). sin and cos are reproduced for |x| < 125 (SLEEF's
TRIGRANGEMAX2f: its two-constant Cody-Waite reduction, the only path a vector of such values takes), NaN for NaN
and the infinities; larger finite arguments take SLEEF's Payne-Hanek reduction (rempif), not reproduced here:
`supported` says False for them and the caller must take another path (torch_reductions.scalar_function does).

A 16-bit tensor's value goes through the same float32 function (torch widens it, applies the float32 function,
rounds back to nearest even): `scalar(name, value, code)`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from modelmerge_engine.cpu_kernels import _f32_as_u32, _fma, _u32_as_f32, rnd

F = np.float32
SIGN = np.uint32(0x80000000)
ONE, HALF, TWO = F(1.0), F(0.5), F(2.0)
TRIG_RANGE = F(125.0)  # TRIGRANGEMAX2f: below it SLEEF reduces with PI_A2f, PI_B2f, PI_C2f
ONE_OVER_PI = F(0.318309886183790671537767526745028724)  # (float)M_1_PI
PI_A2, PI_B2, PI_C2 = F(3.1414794921875), F(0.00011315941810607910156), F(1.9841872589410058936e-09)
PI_HI, PI_LO = F(3.1415927410125732422), F(-8.7422776573475857731e-08)  # π as a double-float
SIN_POLY = (F(2.6083159809786593541503e-06), F(-0.0001981069071916863322258), F(0.00833307858556509017944336))
SIN_C3 = F(-0.166666597127914428710938)
ACOS_POLY = (F(0.4197454825e-1), F(0.2424046025e-1), F(0.4547423869e-1), F(0.7495029271e-1), F(0.1666677296e+0))


# Double-float arithmetic (df.h, fused multiply-add build): a value is a pair (hi, lo) of float32.

@njit(inline="always", error_model="numpy")
def _mulsign(x, y):
    """x with its sign flipped where y is negative (or -0)."""
    return _u32_as_f32(_f32_as_u32(x) ^ (_f32_as_u32(y) & SIGN))


@njit(inline="always", error_model="numpy")
def _add_ff(x, y):  # dfadd_vf2_vf_vf
    hi = x + y
    return hi, (x - hi) + y


@njit(inline="always", error_model="numpy")
def _add2_ff(x, y):  # dfadd2_vf2_vf_vf
    hi = x + y
    v = hi - x
    return hi, (x - (hi - v)) + (y - v)


@njit(inline="always", error_model="numpy")
def _add2_df_f(xh, xl, y):  # dfadd2_vf2_vf2_vf
    hi = xh + y
    v = hi - xh
    return hi, ((xh - (hi - v)) + (y - v)) + xl


@njit(inline="always", error_model="numpy")
def _add_df_f(xh, xl, y):  # dfadd_vf2_vf2_vf
    hi = xh + y
    return hi, ((xh - hi) + y) + xl


@njit(inline="always", error_model="numpy")
def _add_f_df(x, yh, yl):  # dfadd_vf2_vf_vf2
    hi = x + yh
    return hi, ((x - hi) + yh) + yl


@njit(inline="always", error_model="numpy")
def _add2_f_df(x, yh, yl):  # dfadd2_vf2_vf_vf2
    hi = x + yh
    v = hi - x
    return hi, ((x - (hi - v)) + (yh - v)) + yl


@njit(inline="always", error_model="numpy")
def _sub_df_df(xh, xl, yh, yl):  # dfsub_vf2_vf2_vf2
    hi = xh - yh
    lo = xh - hi
    lo = lo - yh
    lo = lo + xl
    return hi, lo - yl


@njit(inline="always", error_model="numpy")
def _mul_ff(x, y):  # dfmul_vf2_vf_vf
    hi = x * y
    return hi, _fma(x, y, -hi)


@njit(inline="always", error_model="numpy")
def _mul_df_df(xh, xl, yh, yl):  # dfmul_vf2_vf2_vf2
    hi = xh * yh
    return hi, _fma(xh, yl, _fma(xl, yh, _fma(xh, yh, -hi)))


@njit(inline="always", error_model="numpy")
def _mul_df_df_f(xh, xl, yh, yl):  # dfmul_vf_vf2_vf2
    return _fma(xh, yh, _fma(xl, yh, xh * yl))


@njit(inline="always", error_model="numpy")
def _squ_df(xh, xl):  # dfsqu_vf2_vf2
    hi = xh * xh
    return hi, _fma(xh + xh, xl, _fma(xh, xh, -hi))


@njit(inline="always", error_model="numpy")
def _rec_f(d):  # dfrec_vf2_vf
    hi = ONE / d
    return hi, hi * _fma(-d, hi, ONE)


@njit(inline="always", error_model="numpy")
def _sqrt_f(d):  # dfsqrt_vf2_vf
    t = F(np.sqrt(d))
    sh, sl = _mul_ff(t, t)
    ah, al = _add2_f_df(d, sh, sl)
    rh, rl = _rec_f(t)
    mh, ml = _mul_df_df(ah, al, rh, rl)
    return mh * HALF, ml * HALF


# The functions.

@njit(nogil=True, cache=True, error_model="numpy")
def acosf(d):
    """SLEEF's xacosf_u1 of the float32 d."""
    a = F(abs(d))
    small = a < HALF
    x2 = d * d if small else (ONE - a) * HALF
    if small:
        xh, xl = a, F(0.0)
    else:
        xh, xl = _sqrt_f(x2)
    if a == ONE:
        xh, xl = F(0.0), F(0.0)
    u = ACOS_POLY[0]
    for k in range(1, 5):
        u = _fma(u, x2, ACOS_POLY[k])
    u = u * (x2 * xh)
    sh, sl = _add_ff(_mulsign(xh, d), _mulsign(u, d))
    yh, yl = _sub_df_df(PI_HI * HALF, PI_LO * HALF, sh, sl)
    xh, xl = _add_df_f(xh, xl, u)
    if not small:
        yh, yl = xh * TWO, xl * TWO
        if d < F(0.0):
            yh, yl = _sub_df_df(PI_HI, PI_LO, yh, yl)
    return yh + yl


@njit(inline="always", error_model="numpy")
def _sin_poly(sh, sl):
    """SLEEF's u1 kernel on the reduced argument s (a double-float): sin(s) before the quadrant's sign."""
    th, tl = sh, sl
    sh, sl = _squ_df(sh, sl)
    u = SIN_POLY[0]
    u = _fma(u, sh, SIN_POLY[1])
    u = _fma(u, sh, SIN_POLY[2])
    ph, pl = _add_ff(SIN_C3, u * sh)
    mh, ml = _mul_df_df(ph, pl, sh, sl)
    xh, xl = _add_f_df(ONE, mh, ml)
    return _mul_df_df_f(th, tl, xh, xl)


@njit(inline="always", error_model="numpy")
def _negate_if(x, flag):
    return _u32_as_f32(_f32_as_u32(x) ^ SIGN) if flag else x


@njit(nogil=True, cache=True, error_model="numpy")
def sinf(d):
    """SLEEF's xsinf_u1 of the float32 d, |d| < 125 (see `supported`); NaN for NaN and the infinities."""
    if not math.isfinite(d):
        return F(np.nan)
    u = F(np.rint(d * ONE_OVER_PI))
    q = np.int32(u)
    v = _fma(u, -PI_A2, d)
    sh, sl = _add2_ff(v, u * -PI_B2)
    sh, sl = _add_df_f(sh, sl, u * -PI_C2)
    r = _negate_if(_sin_poly(sh, sl), (q & 1) == 1)
    if d == F(0.0) and _f32_as_u32(d) == SIGN:  # -0 stays -0
        return d
    return r


@njit(nogil=True, cache=True, error_model="numpy")
def cosf(d):
    """SLEEF's xcosf_u1 of the float32 d, |d| < 125 (see `supported`); NaN for NaN and the infinities."""
    if not math.isfinite(d):
        return F(np.nan)
    dq = _fma(F(np.rint(_fma(d, ONE_OVER_PI, -HALF))), TWO, ONE)
    q = np.int32(dq)
    sh, sl = _add2_ff(d, dq * (-PI_A2 * HALF))
    sh, sl = _add2_df_f(sh, sl, dq * (-PI_B2 * HALF))
    sh, sl = _add2_df_f(sh, sl, dq * (-PI_C2 * HALF))
    return _negate_if(_sin_poly(sh, sl), (q & 2) == 0)


OPS = {"acos": 0, "sin": 1, "cos": 2}


@njit(inline="always", error_model="numpy")
def _evaluate(op, x):
    if op == 0:
        return acosf(x)
    if op == 1:
        return sinf(x)
    return cosf(x)


def supported(name: str, value: float) -> bool:
    """Whether `name` (acos, sin, cos) of the float32 `value` is reproduced here (sin, cos: |value| < 125 or not
    finite; larger arguments take SLEEF's Payne-Hanek reduction, not reproduced)."""
    if name not in OPS:
        return False
    return name == "acos" or not math.isfinite(value) or abs(value) < TRIG_RANGE


@njit(nogil=True, cache=True, error_model="numpy")
def _map(op, code, values, out):
    for i in range(values.shape[0]):
        out[i] = rnd(_evaluate(op, rnd(values[i], code)), code)


def apply(name: str, values, code: int) -> np.ndarray:
    """`torch.<name>` of float32 `values` (each rounded to the compute dtype `code` first, as a tensor of that
    dtype holds it), as float32 values of that dtype. Every value must be `supported`."""
    values = np.ascontiguousarray(values, np.float32).reshape(-1)
    if name != "acos" and np.any(np.abs(values) >= TRIG_RANGE):
        raise ValueError(f"{name} of an argument of magnitude 125 or more takes SLEEF's Payne-Hanek reduction, "
                         "which is not reproduced here")
    out = np.empty_like(values)
    _map(np.int64(OPS[name]), np.int64(code), values, out)
    return out


def scalar(name: str, value, code: int) -> np.float32:
    """`torch.<name>(torch.tensor(value, dtype))` for the compute dtype `code`, as float32: `value` a float32
    (every caller's), `supported`."""
    return apply(name, np.float32(value), code)[0]
