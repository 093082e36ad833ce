"""Where the arithmetic of one range runs: compiled CPU kernels (default) or torch on CUDA (`use_gpu`).

Both take and give numpy arrays holding the compute dtype's bit patterns (see safetensors_io.DType), so the
engine around them is the same. The CPU path never imports torch: it starts fast and stays small.
"""

from __future__ import annotations

import numpy as np

from modelmerge_engine.errors import MergeError
from modelmerge_engine.safetensors_io import DType


class CpuBackend:
    device = "cpu"

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
            values, source_code = values.astype(np.float32), 2
        else:
            source_code = dtype.code
        self.k.convert(values, source_code, out, self.code)
        return out

    def _out(self, like: np.ndarray) -> np.ndarray:
        return np.empty(like.shape[0], self.dtype.storage)

    def histogram(self, base, inputs, task_vectors: bool, shift: int, bins: int, buckets: np.ndarray):
        counts = np.zeros((len(inputs), bins), dtype=np.int64)
        self.k.histogram(base, tuple(inputs), self.code, task_vectors, shift, buckets, counts)
        return counts

    def mask(self, base, raw, delta: bool, threshold: int, random_key: int | None, start: int, rate: float,
             rescale: bool):
        out = self._out(base)
        self.k.mask(base, raw, self.code, delta, threshold, random_key is not None, random_key or 0, start, rate,
                    rescale, out)
        return out

    def average(self, inputs):
        out = self._out(inputs[0])
        self.k.average(tuple(inputs), self.code, out)
        return out

    def task_arithmetic(self, base, inputs, scaling: float):
        out = self._out(base)
        self.k.task_arithmetic(base, tuple(inputs), self.code, scaling, out)
        return out

    def ties(self, base, inputs, thresholds: np.ndarray, scaling: float):
        out = self._out(base)
        self.k.ties(base, tuple(inputs), self.code, thresholds, scaling, out)
        return out

    def dare_balance(self, base, inputs, thresholds: np.ndarray) -> int:
        return int(self.k.dare_balance(base, tuple(inputs), self.code, thresholds))

    def dare(self, base, inputs, thresholds: np.ndarray, majority: float, scaling: float):
        out = self._out(base)
        self.k.dare(base, tuple(inputs), self.code, thresholds, majority, scaling, out)
        return out

    def to_host(self, values: np.ndarray) -> np.ndarray:
        return values


class TorchBackend:
    """The same operations with torch (torch_kernels.py) on `device`: CUDA for use_gpu."""

    def __init__(self, dtype: DType, device: str = "cuda"):
        import torch

        from modelmerge_engine import torch_kernels

        if device == "cuda" and not torch.cuda.is_available():
            raise MergeError("use_gpu is set but CUDA is not available on this machine (no GPU visible to "
                             "torch); run without --use-gpu")
        self.torch, self.k = torch, torch_kernels
        self.dtype = dtype
        self.device = device
        self.tdtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype.name]
        self._views = {"BF16": torch.bfloat16, "F16": torch.float16}

    def prepare(self, values: np.ndarray, dtype: DType):
        if dtype.code is None and dtype.name != "F64":
            raise MergeError(f"cannot merge tensors stored as {dtype.name}")
        tensor = self.torch.from_numpy(values)
        if dtype.name in self._views:
            tensor = tensor.view(self._views[dtype.name])
        return tensor.to(device=self.device, dtype=self.tdtype, non_blocking=True)

    def histogram(self, base, inputs, task_vectors: bool, shift: int, bins: int, buckets: np.ndarray):
        counts = self.k.histogram(base, inputs, task_vectors, shift, bins, [int(b) for b in buckets])
        return self.torch.stack(counts).cpu().numpy()

    def mask(self, base, raw, delta: bool, threshold: int, random_key: int | None, start: int, rate: float,
             rescale: bool):
        draws = None
        if random_key is not None:  # the CPU kernels' draws, so both paths drop the same weights
            from modelmerge_engine.cpu_kernels import uniform_draws

            host = np.empty(base.shape[0], dtype=np.float32)
            uniform_draws(random_key, start, host)
            draws = self.torch.from_numpy(host).to(self.device)
        return self.k.mask(base, raw, delta, int(threshold), draws, rate, rescale)

    def average(self, inputs):
        return self.k.average(inputs)

    def task_arithmetic(self, base, inputs, scaling: float):
        return self.k.task_arithmetic(base, inputs, scaling)

    def ties(self, base, inputs, thresholds: np.ndarray, scaling: float):
        trimmed = self.k.trim_task_vectors(base, inputs, [int(t) for t in thresholds])
        return self.k.ties(base, trimmed, scaling).to(self.tdtype)

    def dare_balance(self, base, inputs, thresholds: np.ndarray) -> int:
        return self.k.dare_balance(base, inputs, [int(t) for t in thresholds])

    def dare(self, base, inputs, thresholds: np.ndarray, majority: float, scaling: float):
        trimmed = self.k.trim_task_vectors(base, inputs, [int(t) for t in thresholds])
        signs = self.k.dare_signs(trimmed)
        return self.k.dare_disjoint(base, trimmed, signs, majority, scaling).to(self.tdtype)

    def to_host(self, values) -> np.ndarray:
        values = values.to("cpu")
        if self.dtype.name in self._views:
            values = values.view(self.torch.uint16)
        return values.numpy()


def make_backend(dtype: DType, use_gpu: bool, name: str | None = None):
    """`name` ("cpu" or "torch", from MODELMERGE_ENGINE_KERNELS) overrides the choice on CPU; the tests use
    it to check both kernel sets against the oracle."""
    if use_gpu:
        return TorchBackend(dtype, "cuda")
    if name == "torch":
        return TorchBackend(dtype, "cpu")
    return CpuBackend(dtype)
