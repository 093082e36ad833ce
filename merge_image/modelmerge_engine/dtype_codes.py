"""The codes by which the kernels know the float format they compute in (numba folds them as constants).

Defined once: safetensors_io's DType carries them, the kernel sets pass them, cpu_kernels branches on them."""

BF16, F16, F32 = 0, 1, 2
