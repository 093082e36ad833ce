"""The kernel sets that do the arithmetic of one range: compiled CPU kernels (default) or torch (CUDA for
`use_gpu`; on CPU when MODELMERGE_ENGINE_KERNELS=torch, which the tests use to check it against the oracle).

Both take and give numpy arrays holding the compute dtype's bit patterns (see safetensors_io.DType), so the
engine around them is the same. They hold what methods share (conversion, thresholds' histograms,
mask_merging's masks, ties_merging_dare's sign balance); each method's combine step is in its module under
methods/, calling the set's kernel module (`k`: cpu_kernels or torch_kernels) directly. The CPU set never
imports torch: it starts fast and stays small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.errors import MergeError
from modelmerge_engine.safetensors_io import DType
from modelmerge_engine.select import NO_THRESHOLD

KERNELS_ENV = "MODELMERGE_ENGINE_KERNELS"
KERNEL_SET_NAMES = ("compiled", "torch")


@dataclass(frozen=True)
class MaskParams:
    """How one model's range is masked (mask_merging's first step)."""

    delta: bool  # mask the task vector (delta_weight) and re-add the base, or the weights themselves
    rate: float  # the model's drop rate
    rescale: bool  # divide the kept values by 1 - rate
    start: int  # the range's first element: random draws are a function of the element's position
    threshold: int = NO_THRESHOLD  # by magnitude: drop |v| <= this magnitude bit pattern
    random_key: int | None = None  # at random: the stream of (seed, model, tensor)


class CpuKernels:
    """cpu_kernels.py: compiled numba loops, one pass per range, GIL released."""

    device = "cpu"
    name = "compiled-cpu"

    def __init__(self, dtype: DType):
        from modelmerge_engine import cpu_kernels

        self.k = cpu_kernels
        self.dtype = dtype
        self.code = dtype.code

    def prepare(self, values: np.ndarray, dtype: DType) -> np.ndarray:
        """An input range in the compute dtype (merging-eval loads every model in it)."""
        if dtype == self.dtype:
            return values
        out = np.empty(values.shape[0], self.dtype.storage)
        if dtype.code is None:  # float64: numpy narrows to float32 first
            if dtype.name != "F64":
                raise MergeError(f"cannot merge tensors stored as {dtype.name}")
            values, source_code = values.astype(np.float32), F32
        else:
            source_code = dtype.code
        self.k.convert(values, source_code, out, self.code)
        return out

    def empty(self, like: np.ndarray) -> np.ndarray:
        """An output range as long as `like`, in the compute dtype (what the combine steps write into)."""
        return np.empty(like.shape[0], self.dtype.storage)

    def histogram(self, base, inputs, *, task_vectors: bool, shift: int, bins: int, buckets: np.ndarray):
        counts = np.zeros((len(inputs), bins), dtype=np.int64)
        self.k.histogram(self.code, base, tuple(inputs), task_vectors, shift, buckets, counts)
        return counts

    def mask(self, base, raw, params: MaskParams):
        out = self.empty(base)
        self.k.mask(self.code, base, raw, params, out)
        return out

    def global_ties_sign_balance(self, base, inputs, thresholds: np.ndarray) -> int:
        return int(self.k.global_ties_sign_balance(self.code, base, tuple(inputs), thresholds))

    def to_host(self, values: np.ndarray) -> np.ndarray:
        return values


class TorchKernels:
    """The same operations with torch (torch_kernels.py) on `device`: CUDA for use_gpu."""

    def __init__(self, dtype: DType, *, device: str):
        try:
            import torch
        except ImportError:
            raise MergeError(f"{'use_gpu' if device == 'cuda' else 'the torch kernel set'} needs torch, which is not "
                             "installed here (the CPU merge image and the 'engine' extra carry none): install the "
                             "'gpu' extra (pip install 'modelmerge[gpu]') or use the GPU merge image") from None

        from modelmerge_engine import torch_kernels

        if device == "cuda" and not torch.cuda.is_available():
            raise MergeError("use_gpu is set but CUDA is not available on this machine (no GPU visible to "
                             "torch); run without --use-gpu")
        self.torch, self.k = torch, torch_kernels
        self.dtype = dtype
        self.device = device
        self.name = f"torch-{device}"
        self.tdtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype.name]
        self._views = {"BF16": torch.bfloat16, "F16": torch.float16}

    def prepare(self, values: np.ndarray, dtype: DType):
        if dtype.code is None and dtype.name != "F64":
            raise MergeError(f"cannot merge tensors stored as {dtype.name}")
        tensor = self.torch.from_numpy(values)
        if dtype.name in self._views:
            tensor = tensor.view(self._views[dtype.name])
        return tensor.to(device=self.device, dtype=self.tdtype, non_blocking=True)

    def histogram(self, base, inputs, *, task_vectors: bool, shift: int, bins: int, buckets: np.ndarray):
        counts = self.k.histogram(base, inputs, task_vectors=task_vectors, shift=shift, bins=bins,
                                  buckets=[int(b) for b in buckets])
        return self.torch.stack(counts).cpu().numpy()

    def mask(self, base, raw, params: MaskParams):
        draws = None
        if params.random_key is not None:  # the CPU kernels' draws, so both sets drop the same weights
            from modelmerge_engine.cpu_kernels import uniform_draws

            host = np.empty(base.shape[0], dtype=np.float32)
            uniform_draws(params.random_key, params.start, host)
            draws = self.torch.from_numpy(host).to(self.device)
        return self.k.mask(base, raw, delta=params.delta, threshold=int(params.threshold), draws=draws,
                           rate=params.rate, rescale=params.rescale)

    def global_ties_sign_balance(self, base, inputs, thresholds: np.ndarray) -> int:
        return self.k.global_ties_sign_balance(base, inputs, [int(t) for t in thresholds])

    def to_host(self, values) -> np.ndarray:
        values = values.to("cpu")
        if self.dtype.name in self._views:
            values = values.view(self.torch.uint16)
        return values.numpy()


def make_kernels(dtype: DType, *, use_gpu: bool, name: str | None = None) -> CpuKernels | TorchKernels:
    """torch on CUDA for use_gpu; otherwise the set `name` (default: MODELMERGE_ENGINE_KERNELS, else compiled)."""
    if use_gpu:
        return TorchKernels(dtype, device="cuda")
    name = name or os.environ.get(KERNELS_ENV, "").strip() or "compiled"
    if name not in KERNEL_SET_NAMES:
        raise MergeError(f"{KERNELS_ENV} must be one of {', '.join(KERNEL_SET_NAMES)}, got {name!r}")
    return TorchKernels(dtype, device="cpu") if name == "torch" else CpuKernels(dtype)
