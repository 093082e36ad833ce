"""methods/sleef.py against SLEEF and torch: the float32 acos, sin and cos that torch's CPU kernels take for
bfloat16 and float16 tensors (SLEEF's 1-ulp functions), reproduced to the bit.

- Every bfloat16 and every float16 value against torch itself (acos over every finite value, sin and cos over
  every value below 125 in magnitude, SLEEF's range here): the 16-bit path of scalar_function is complete.
- A few million float32 arguments (uniform, log-uniform down to the subnormals, and edges: ±0, ±1, ±0.5, the
  neighbours of π/2, π, 3π/2 and the reduction's boundaries) against SLEEF's own AVX2 functions, which torch's
  library exports (Sleef_acosf8_u10avx2, ...) and which are called here through numba. torch's float32 functions
  are MKL's (see torch_reductions.scalar_function), so float32 SLEEF is not compared with torch; the MKL functions
  scalar_function takes from torch's library for float32 are, on millions of arguments, without importing torch.
- The single-rounding fused multiply-add the algorithms rely on, against exact rational arithmetic on the cases
  where a multiply-add in float64 rounded to float32 would round twice.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from modelmerge_engine.cpu_kernels import _fma
from modelmerge_engine.dtype_codes import BF16, F16, F32
from modelmerge_engine.methods import sleef
from modelmerge_engine.methods.torch_reductions import scalar_function

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("acos", "sin", "cos")
TORCH_DTYPES = {BF16: torch.bfloat16, F16: torch.float16}


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: identical float32 bit patterns, or both NaN."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


# --- fused multiply-add -------------------------------------------------------------------------------------


def round_to_f32(value: Fraction) -> float:
    """The exact rational `value` rounded to float32, to nearest even (subnormals and overflow included)."""
    if value == 0:
        return 0.0
    sign, value = (-1.0 if value < 0 else 1.0), abs(value)
    exponent = value.numerator.bit_length() - value.denominator.bit_length()
    if Fraction(2) ** exponent > value:
        exponent -= 1
    exponent = max(exponent, -126)  # below the normal range the quantum stays 2^-149
    quantum = Fraction(2) ** (exponent - 23)
    units, rest = divmod(value, quantum)
    if rest > quantum / 2 or (rest == quantum / 2 and units % 2 == 1):
        units += 1
    result = float(units * quantum)
    return sign * (result if result <= float(np.finfo(np.float32).max) else float("inf"))


@njit
def _fma_many(a, b, c, out):
    for i in range(out.shape[0]):
        out[i] = _fma(a[i], b[i], c[i])


def fma_cases() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = np.float32
    one_plus = f(1 + 2.0**-12)  # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24: exactly halfway between two float32
    tiny = [2.0**-80, 2.0**-149, 2.0**-60, 2.0**-30]
    cases = [(one_plus, one_plus, s * t) for t in tiny for s in (1, -1)]
    cases += [(-one_plus, one_plus, s * t) for t in tiny for s in (1, -1)]
    rng = np.random.default_rng(7)
    a = rng.uniform(-4, 4, 4000).astype(f)
    b = rng.uniform(-4, 4, 4000).astype(f)
    products = a.astype(np.float64) * b
    near = (-products.astype(f)).astype(f)  # cancellation: c = -round(a*b)
    nudges = rng.choice([-1, 1], 4000) * np.float64(2.0) ** rng.integers(-149, -20, 4000)
    cases += list(zip(a, b, near, strict=True))
    cases += list(zip(a, b, nudges.astype(f), strict=True))
    subnormal = rng.uniform(0, 1, 1000).astype(f) * f(2.0**-70)
    cases += list(zip(subnormal, subnormal[::-1], -(subnormal * subnormal[::-1]).astype(f), strict=True))
    cases += [(f(3e38), f(2), f(-3e38)), (f(2.0**-75), f(2.0**-75), f(0)), (f(0), f(5), f(-0.0))]
    columns = np.array(cases, dtype=f).T
    return columns[0].copy(), columns[1].copy(), columns[2].copy()


def test_fma_rounds_once():
    """_fma (llvm.fma on float32) is a*b+c rounded once, where a float64 multiply-add rounded to float32 would
    round twice: the exact halfway products nudged by a tiny c, cancellations, subnormal results, overflow."""
    a, b, c = fma_cases()
    out = np.empty_like(a)
    _fma_many(a, b, c, out)
    expected = np.array([round_to_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                         for x, y, z in zip(a, b, c, strict=True)], np.float32)
    assert np.array_equal(out, expected), np.flatnonzero(out != expected)[:5]
    twice = ((a.astype(np.float64) * b) + c).astype(np.float32)
    assert (twice != expected).any()  # the cases do tell the two apart


# --- every 16-bit value against torch -----------------------------------------------------------------------


def every_16bit_value(code: int) -> np.ndarray:
    bits = np.arange(1 << 16, dtype=np.uint32)
    if code == BF16:
        return (bits << 16).view(np.float32)
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("code", [BF16, F16], ids=["bfloat16", "float16"])
def test_every_16bit_value_is_torchs(name, code):
    values = every_16bit_value(code)
    values = values[np.isfinite(values) & ((np.abs(values) < 125) if name != "acos" else True)]
    ours = sleef.apply(name, values, code)
    theirs = getattr(torch, name)(torch.from_numpy(values).to(TORCH_DTYPES[code])).float().numpy()
    bad = ~same_bits(ours, theirs)
    assert not bad.any(), list(zip(values[bad][:5], ours[bad][:5], theirs[bad][:5], strict=True))
    # scalar_function on one value (a 0-dim tensor in torch) is the same function
    sample = np.random.default_rng(3).choice(values, 300, replace=False)
    for value in sample:
        expected = getattr(torch, name)(torch.tensor(float(value), dtype=TORCH_DTYPES[code])).float().item()
        got = scalar_function(name, value, code)
        assert same_bits(np.float32([got]), np.float32([expected]))[0], (name, value, got, expected)


# --- float32 against SLEEF itself ---------------------------------------------------------------------------


@intrinsic
def _call_vector8(typingctx, address, values, out, start):
    """out[start:start+8] = f(values[start:start+8]) for the function at `address` taking and returning 8
    float32 lanes in one vector register (SLEEF's AVX2 ABI)."""
    def codegen(context, builder, signature, args):
        address, values, out, start = args
        vector = ir.VectorType(ir.FloatType(), 8)
        function = builder.inttoptr(address, ir.FunctionType(vector, [vector]).as_pointer())
        source = context.make_array(signature.args[1])(context, builder, values).data
        target = context.make_array(signature.args[2])(context, builder, out).data
        source = builder.bitcast(builder.gep(source, [start]), vector.as_pointer())
        target = builder.bitcast(builder.gep(target, [start]), vector.as_pointer())
        builder.store(builder.call(function, [builder.load(source, align=4)]), target, align=4)
        return context.get_dummy_value()

    return types.void(address, values, out, start), codegen


@njit
def _map_vector8(address, values, out):
    for start in range(0, values.shape[0] - 7, 8):
        _call_vector8(address, values, out, start)


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def sleef_itself(name: str, values: np.ndarray) -> np.ndarray:
    """SLEEF's own Sleef_<name>f8_u10avx2 (the AVX2 build torch's library carries) of float32 `values`."""
    if not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("SLEEF's AVX2 functions need a CPU with AVX2 and FMA")
    library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    symbol = f"Sleef_{name}f8_u10avx2"
    if not hasattr(library, symbol):
        pytest.skip(f"this torch does not export {symbol}")
    address = ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value
    padded = np.zeros(-(-values.shape[0] // 8) * 8, np.float32)
    padded[:values.shape[0]] = values
    out = np.empty_like(padded)
    _map_vector8(np.int64(address), padded, out)
    return out[:values.shape[0]]


def neighbours(centre: float, count: int) -> np.ndarray:
    """The `count` float32 values each side of float32(centre), and it."""
    bits = np.float32(centre).view(np.int32).astype(np.int64)
    return (bits + np.arange(-count, count + 1)).astype(np.int32).view(np.float32)


def float32_sample(name: str) -> np.ndarray:
    rng = np.random.default_rng(11)
    bound = 1.0 if name == "acos" else 4.0
    uniform = rng.uniform(-bound, bound, 1_500_000)
    wide = rng.uniform(-124.99, 124.99, 300_000) if name != "acos" else rng.uniform(-1.5, 1.5, 300_000)
    tiny = rng.choice([-1, 1], 500_000) * np.exp2(rng.uniform(-149, 0, 500_000))
    edges = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0**-149, -(2.0**-149), 2.0**-126, np.nan, np.inf, -np.inf]
    centres = [np.pi / 2, np.pi, 3 * np.pi / 2, 2 * np.pi, 1.0, 0.5, 0.0, 124.99, np.pi / 4]
    near = [neighbours(s * c, 500) for c in centres for s in (1, -1)]
    sample = np.concatenate([uniform, wide, tiny, edges, *near]).astype(np.float32)
    if name != "acos":
        sample = sample[~(np.abs(sample) >= 125)]  # NaN kept
    return sample


@pytest.mark.parametrize("name", NAMES)
def test_float32_is_sleefs(name):
    values = float32_sample(name)
    ours = sleef.apply(name, values, F32)
    theirs = sleef_itself(name, values)
    bad = ~same_bits(ours, theirs)
    assert not bad.any(), list(zip(values[bad][:5], ours[bad][:5], theirs[bad][:5], strict=True))


def test_sin_and_cos_of_125_or_more_are_not_reproduced():
    """SLEEF reduces larger arguments with its Payne-Hanek tables (rempif): not reproduced, so refused, and
    scalar_function takes torch's value (or, without torch, the correctly rounded one) there."""
    assert sleef.supported("acos", 1e30) and sleef.supported("sin", 124.9) and sleef.supported("cos", float("nan"))
    assert not sleef.supported("sin", 125.0) and not sleef.supported("cos", -1e6) and not sleef.supported("tan", 1)
    with pytest.raises(ValueError, match="Payne-Hanek"):
        sleef.apply("sin", np.float32([1.0, 300.0]), F32)
    for code in (BF16, F16):
        expected = torch.sin(torch.tensor(300.0, dtype=TORCH_DTYPES[code])).float().item()
        assert scalar_function("sin", np.float32(300.0), code) == expected


NO_TORCH_SCALARS = """
import json, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch here")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from modelmerge_engine.methods.torch_reductions import scalar_function
cases = json.loads(sys.argv[1])
print(json.dumps([float(scalar_function(name, np.float32(value), code)) for name, value, code in cases]))
"""


def test_scalar_function_without_torch():
    """With torch unimportable (the CPU merge image) bfloat16 and float16 values are still torch's, and float32
    ones SLEEF's."""
    rng = np.random.default_rng(5)
    cases = [(name, float(value), code) for code in (BF16, F16, F32) for name in NAMES
             for value in rng.uniform(-1 if name == "acos" else -4, 1 if name == "acos" else 4, 40)]
    result = subprocess.run([sys.executable, "-c", NO_TORCH_SCALARS, json.dumps(cases)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    got = np.float32(json.loads(result.stdout))
    expected = []
    for name, value, code in cases:
        if code == F32:
            expected.append(sleef_itself(name, np.float32([value]))[0])
        else:
            expected.append(getattr(torch, name)(torch.tensor(value, dtype=TORCH_DTYPES[code])).float().item())
    assert np.array_equal(got, np.float32(expected))


WITH_TORCH_UNIMPORTED_SCALARS = """
import json, sys
import numpy as np
from modelmerge_engine.methods.torch_reductions import scalar_function
cases = json.loads(sys.argv[1])
values = [float(scalar_function(name, np.float32(value), code)) for name, value, code in cases]
anon = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon:"))
print(json.dumps({"values": values, "torch": "torch" in sys.modules, "anon_kib": anon}))
"""


def test_float32_scalars_are_torchs_without_importing_torch():
    """Where torch is installed, float32 acos, sin and cos are MKL's VML functions, which torch's CPU kernels
    call on float32 tensors, taken from torch's library with ctypes: torch's values to the bit, in a process
    that never imports torch (its import alone would take about 285 MB of anonymous memory)."""
    rng = np.random.default_rng(11)
    cases = [(name, float(value), F32) for name in NAMES
             for value in rng.uniform(-1 if name == "acos" else -4, 1 if name == "acos" else 4, 200)]
    result = subprocess.run([sys.executable, "-c", WITH_TORCH_UNIMPORTED_SCALARS, json.dumps(cases)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not report["torch"]
    assert report["anon_kib"] < 160 * 1024, report["anon_kib"]
    expected = [getattr(torch, name)(torch.tensor(value, dtype=torch.float32)).item() for name, value, _ in cases]
    assert np.array_equal(np.float32(report["values"]), np.float32(expected))


@pytest.mark.parametrize("name", NAMES)
def test_vml_functions_are_torchs_on_millions_of_float32_arguments(name):
    """The library functions scalar_function calls for float32 (torch_reductions._vml) against torch's own op on
    the float32 sample of the SLEEF check (edges, uniform, log-uniform) and a dense sweep of the range slerp's
    angles take ([-1, 1] for acos, [-4, 4] for sin and cos)."""
    from modelmerge_engine.methods.torch_reductions import VML_MODE, _vml

    functions = _vml()
    assert functions is not None, "torch's library exports MKL's VML functions (vmsAcos, vmsSin, vmsCos)"
    bound = 1.0 if name == "acos" else 4.0
    values = np.concatenate([float32_sample(name), np.linspace(-bound, bound, 2_000_001, dtype=np.float32)])
    got = np.empty_like(values)
    functions[name](values.shape[0], values.ctypes.data, got.ctypes.data, VML_MODE)
    expected = getattr(torch, name)(torch.from_numpy(values)).numpy()
    assert same_bits(got, expected).all()
