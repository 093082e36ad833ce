"""What an evaluation is asked to do, checked before any data or model is read."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_LENGTH = 2048  # merging-eval's default
DEFAULT_BATCH_SIZE = 10  # merging-eval's default


class EvalInputError(ValueError):
    """Invalid input (options or data): the message names the field, file or record and the reason."""


@dataclass(frozen=True)
class EvalOptions:
    max_length: int = DEFAULT_MAX_LENGTH  # capped at the model's maximum positions when the model is loaded
    batch_size: int = DEFAULT_BATCH_SIZE  # sequences per forward pass (length-sorted, padded to the longest)
    limit: int | None = None  # the first N records of each data file
    use_gpu: bool = False
    dtype: str | None = None  # None: bfloat16 on GPU, float32 on CPU (merging-eval's choice)

    def __post_init__(self) -> None:
        for name, low in (("max_length", 2), ("batch_size", 1), ("limit", 1)):
            value = getattr(self, name)
            if value is None and name == "limit":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise EvalInputError(f"{name}: expected an integer, got {value!r}")
            if value < low:
                raise EvalInputError(f"{name}: must be at least {low}, got {value}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise EvalInputError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def compute_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.use_gpu else "float32")
