"""The one contract of ModelMerge: the merge request, the method registry, and the ModelMerge status.

Everything else derives from this module: the engine's CLI flags, the REST API's validation and
`/api/methods`, the CRD schema (`modelmerge crds`), the docs. It imports pydantic only, so the operator and
API images carry no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_GROUP = "modelmerge.io"
API_VERSION = "v1alpha1"
KIND = "ModelMerge"
PLURAL = "modelmerges"
SHORT_NAME = "mm"

MAX_MODELS = 32
MAX_REGEXES = 64
MAX_REF_LENGTH = 512

# A Hugging Face repo id ("org/name", optionally "@revision") or a local path. Kept permissive on purpose:
# the engine decides which one it is and fails with a clear message when neither resolves.
_REF_PATTERN = r"^[^\s,]+$"
_SHARD_SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$"
_SHARD_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


class MergeMethod(StrEnum):
    average_merging = "average_merging"
    task_arithmetic = "task_arithmetic"
    ties_merging = "ties_merging"
    ties_merging_dare = "ties_merging_dare"
    mask_merging = "mask_merging"


class MaskApplyMethod(StrEnum):
    average_merging = "average_merging"
    task_arithmetic = "task_arithmetic"
    ties_merging = "ties_merging"
    ties_merging_dare = "ties_merging_dare"


ModelRef = Annotated[str, Field(min_length=1, max_length=MAX_REF_LENGTH, pattern=_REF_PATTERN)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


def _split_csv(value: Any) -> Any:
    """The predecessor's CLI and API took comma-separated strings; lists are the canonical form."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class MergeRequest(BaseModel):
    """What to merge and how. Field names are the predecessor API's, so existing clients keep working."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    base_model: ModelRef = Field(
        description="Base (pre-trained) model: a local directory or a Hugging Face repo id, "
        "optionally with '@revision'."
    )
    models_to_merge: list[ModelRef] = Field(
        min_length=1,
        max_length=MAX_MODELS,
        description="Fine-tuned models to merge into the base (directories or repo ids); "
        "a comma-separated string is accepted too.",
    )
    merge_method: MergeMethod = Field(description="Merging method; see the method registry.")
    output_dir: str | None = Field(
        default=None,
        max_length=1024,
        description="Where the merged model is written. The engine takes any path; the API and the "
        "operator take a relative path under their output root.",
    )
    scaling_coefficient: float = Field(
        default=1.0,
        ge=-100.0,
        le=100.0,
        description="Factor applied to the merged task vector before it is added to the base model.",
    )
    use_gpu: bool = Field(default=False, description="Do the arithmetic on CUDA, tensor by tensor.")
    param_value_mask_rate: Rate = Field(
        default=0.8,
        description="TIES: fraction of smallest-magnitude task-vector values set to zero "
        "(per tensor for ties_merging, over all parameters of a model for ties_merging_dare).",
    )
    weight_mask_rates: list[Rate] | None = Field(
        default=None,
        max_length=MAX_MODELS,
        description="mask_merging: drop rate for each fine-tuned model, one per model, each in [0, 1); "
        "a comma-separated string is accepted too.",
    )
    exclude_param_names_regex: list[Annotated[str, Field(max_length=512)]] = Field(
        default_factory=list,
        max_length=MAX_REGEXES,
        description="Parameters whose names match any of these regexes (re.match, from the start) keep "
        "the base model's values.",
    )
    mask_strategy: Literal["random", "magnitude"] = Field(
        default="random",
        description="mask_merging: drop weights at random (DARE) or the smallest by magnitude.",
    )
    mask_apply_method: MaskApplyMethod = Field(
        default=MaskApplyMethod.average_merging,
        description="mask_merging: the method that merges the masked models.",
    )
    weight_format: Literal["delta_weight", "finetuned_weight"] = Field(
        default="delta_weight",
        description="mask_merging: mask the task vector (delta_weight) or the fine-tuned weights.",
    )
    use_weight_rescale: bool = Field(
        default=True,
        description="mask_merging: rescale kept weights by 1 / (1 - rate).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**63 - 1,
        description="mask_merging with mask_strategy random: seed that makes the drop masks reproducible.",
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16",
        description="Data type of the arithmetic and of the saved model (the predecessor always used bfloat16).",
    )
    max_shard_size: str = Field(
        default="5GB",
        pattern=_SHARD_SIZE_PATTERN,
        description="Largest output safetensors shard, e.g. '5GB' or '500MiB'.",
    )

    _split_models = field_validator("models_to_merge", mode="before")(_split_csv)
    _split_regexes = field_validator("exclude_param_names_regex", mode="before")(_split_csv)

    @field_validator("weight_mask_rates", mode="before")
    @classmethod
    def _split_rates(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("scaling_coefficient")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("exclude_param_names_regex")
    @classmethod
    def _regexes_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return patterns

    @field_validator("max_shard_size")
    @classmethod
    def _positive_shard(cls, value: str) -> str:
        if shard_size_bytes(value) < 1024:
            raise ValueError("must be at least 1KiB")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> MergeRequest:
        if self.merge_method == MergeMethod.mask_merging:
            if self.weight_mask_rates is None:
                raise ValueError("weight_mask_rates is required for mask_merging (one rate per model)")
            if len(self.weight_mask_rates) != len(self.models_to_merge):
                raise ValueError(
                    f"weight_mask_rates needs one rate per model: got {len(self.weight_mask_rates)} "
                    f"rates for {len(self.models_to_merge)} models_to_merge"
                )
        return self

    def merge_params(self) -> dict[str, Any]:
        """The parameters that the chosen method actually uses (for reports and status)."""
        names = METHODS[self.merge_method].parameters
        return {name: getattr(self, name) for name in names}


def shard_size_bytes(text: str) -> int:
    match = re.fullmatch(_SHARD_SIZE_PATTERN, text.strip())
    if not match:
        raise ValueError(f"invalid size {text!r}")
    number = re.match(r"[0-9.]+", text.strip()).group(0)
    return int(float(number) * _SHARD_UNITS[match.group(2)])


# ---------------------------------------------------------------------------------------------------------
# The method registry
# ---------------------------------------------------------------------------------------------------------

COMMON_PARAMETERS = ("exclude_param_names_regex", "dtype", "use_gpu", "max_shard_size")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    parameters: tuple[str, ...]


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "average_merging",
            "Element-wise mean of the fine-tuned models' parameters (the base model is not averaged in).",
            COMMON_PARAMETERS,
        ),
        MethodSpec(
            "task_arithmetic",
            "Base + scaling_coefficient × sum of task vectors (fine-tuned − base).",
            ("scaling_coefficient", *COMMON_PARAMETERS),
        ),
        MethodSpec(
            "ties_merging",
            "TIES: trim each task vector's smallest values per tensor, elect a sign per element, "
            "average the values that agree with it, scale and add to the base.",
            ("scaling_coefficient", "param_value_mask_rate", *COMMON_PARAMETERS),
        ),
        MethodSpec(
            "ties_merging_dare",
            "TIES with one magnitude threshold per model over all its parameters (exact, computed in a "
            "streaming pass); despite its name it has no random drop step.",
            ("scaling_coefficient", "param_value_mask_rate", *COMMON_PARAMETERS),
        ),
        MethodSpec(
            "mask_merging",
            "DARE-style: drop a fraction of each model's weights (random or by magnitude), optionally "
            "rescale the rest, then merge the masked models with mask_apply_method.",
            (
                "weight_mask_rates",
                "mask_strategy",
                "mask_apply_method",
                "weight_format",
                "use_weight_rescale",
                "seed",
                "scaling_coefficient",
                "param_value_mask_rate",
                *COMMON_PARAMETERS,
            ),
        ),
    )
}
assert set(METHODS) == {m.value for m in MergeMethod}


def parameter_schema(name: str) -> dict[str, Any]:
    """Type, default, bounds and description of one request field, from the pydantic schema."""
    prop = MergeRequest.model_json_schema()["properties"][name]
    info = _describe(prop, MergeRequest.model_json_schema().get("$defs", {}))
    info["description"] = prop.get("description", "")
    field = MergeRequest.model_fields[name]
    default = field.get_default(call_default_factory=True)
    info["default"] = default.value if isinstance(default, StrEnum) else default
    return info


def _describe(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in prop:
        prop = defs[prop["$ref"].split("/")[-1]]
    if "anyOf" in prop:
        options = [p for p in prop["anyOf"] if p.get("type") != "null"]
        info = _describe(options[0], defs)
        info["nullable"] = True
        return info
    info: dict[str, Any] = {"type": prop.get("type", "string")}
    for key in ("enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern",
                "minItems", "maxItems"):
        if key in prop:
            info[key] = prop[key]
    if "const" in prop:
        info["enum"] = [prop["const"]]
    if prop.get("type") == "array":
        info["items"] = _describe(prop.get("items", {}), defs)
    return info


def methods_catalogue() -> list[dict[str, Any]]:
    """Every method with every parameter it takes, as `/api/methods` and the docs show it."""
    return [
        {
            "name": spec.name,
            "description": spec.description,
            "parameters": {name: parameter_schema(name) for name in spec.parameters},
        }
        for spec in METHODS.values()
    ]


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def describe_validation_error(exc: ValidationError) -> list[dict[str, str]]:
    """Turn pydantic's errors into [{'field': 'weight_mask_rates[1]', 'message': ...}] for humans."""
    details = []
    for error in exc.errors(include_url=False):
        loc = [part for part in error["loc"] if part not in ("function-after[_cross_field_rules()]",)]
        field = ""
        for part in loc:
            field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "field required"
        elif error["type"] == "extra_forbidden":
            message = "unknown field"
        details.append({"field": field or _field_from_message(message), "message": message})
    return details


def _field_from_message(message: str) -> str:
    """Cross-field errors have no location; they start with the name of the field they are about."""
    first = message.split(" ", 1)[0]
    return first if first in MergeRequest.model_fields else "request"


def format_validation_error(exc: ValidationError) -> str:
    return "; ".join(f"{d['field']}: {d['message']}" for d in describe_validation_error(exc))


# ---------------------------------------------------------------------------------------------------------
# ModelMerge status (written by the operator, read by the API)
# ---------------------------------------------------------------------------------------------------------


class Phase(StrEnum):
    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Cancelled = "Cancelled"


TERMINAL_PHASES = frozenset({Phase.Succeeded, Phase.Failed, Phase.Cancelled})


class Condition(BaseModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None


class MergeSummary(BaseModel):
    """The engine's final JSON line (stdout, and `--summary-file` = the container's termination message)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["succeeded", "failed"]
    output_dir: str | None = None
    error: str | None = None
    method: str | None = None
    tensors: int | None = None
    seconds: float | None = None
