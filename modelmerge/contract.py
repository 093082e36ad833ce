"""The one contract of ModelMerge: the merge request, the method registry, and the ModelMerge status.

Everything else derives from this module: the engine's CLI flags, the REST API's validation and
`/api/methods`, the CRD schema (`modelmerge crds`), the docs. It imports pydantic only, so the operator and
API images carry no torch.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from modelmerge.mergekit_config import CONFIG_DESCRIPTION, CONFIG_JSON_SCHEMA, CONFIG_KEYS, MergekitConfig, request_data

API_GROUP = "modelmerge.io"
API_VERSION = "v1alpha1"
KIND = "ModelMerge"
PLURAL = "modelmerges"
SHORT_NAME = "mm"

MAX_MODELS = 32
DELLA_EPSILON = 0.15  # mergekit's default epsilon (ModelParameters.epsilon unset)
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
    # mergekit's methods, with mergekit's names and semantics
    linear = "linear"
    mergekit_task_arithmetic = "mergekit_task_arithmetic"
    ties = "ties"
    dare_ties = "dare_ties"
    dare_linear = "dare_linear"
    breadcrumbs = "breadcrumbs"
    breadcrumbs_ties = "breadcrumbs_ties"
    della = "della"
    della_linear = "della_linear"
    slerp = "slerp"
    nearswap = "nearswap"
    model_stock = "model_stock"
    nuslerp = "nuslerp"
    sce = "sce"
    multislerp = "multislerp"
    karcher = "karcher"
    passthrough = "passthrough"


class MaskApplyMethod(StrEnum):
    average_merging = "average_merging"
    task_arithmetic = "task_arithmetic"
    ties_merging = "ties_merging"
    ties_merging_dare = "ties_merging_dare"


ModelRef = Annotated[str, Field(min_length=1, max_length=MAX_REF_LENGTH, pattern=_REF_PATTERN)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


class ModelParameters(BaseModel):
    """The parameters of one fine-tuned model (mergekit's per-model `parameters`): entry i of
    `model_parameters` belongs to `models_to_merge[i]`."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(default=1.0, ge=-100.0, le=100.0, allow_inf_nan=False,
                          description="linear and the task arithmetic family (mergekit_task_arithmetic, ties, "
                          "dare_*, breadcrumbs*, della*), nuslerp, multislerp: the model's weight (mergekit's "
                          "`weight`).")
    density: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False,
                                  description="ties, dare_*, breadcrumbs*, della*: the fraction of the model's task "
                                  "vector kept in each tensor (mergekit's `density`); unset: 1.0, all of it.")
    gamma: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False,
                                description="breadcrumbs, breadcrumbs_ties: the fraction of each tensor's largest "
                                "magnitudes dropped as outliers before the smallest are dropped down to density "
                                "(mergekit's `gamma`); unset: 0.01.")
    epsilon: float | None = Field(default=None, ge=0.0, lt=1.0, allow_inf_nan=False,
                                  description="della, della_linear: keep probabilities spread over density ± "
                                  "epsilon by each magnitude's rank in its row (mergekit's `epsilon`; density ± "
                                  "epsilon must lie inside (0, 1)); unset: 0.15.")
    scale: float | None = Field(default=None, ge=-100.0, le=100.0, allow_inf_nan=False,
                                description="passthrough: multiply the model's tensors by this (mergekit's `scale`); "
                                "unset: copied as they are.")


def _split_csv(value: Any) -> Any:
    """The predecessor's CLI and API took comma-separated strings; lists are the canonical form (never split).
    A string splits at commas outside {}, [] and () and not escaped, so a regex such as `layers\\.\\d{1,3}\\.`
    stays whole."""
    if not isinstance(value, str):
        return value
    parts, current, depth, in_class, escaped = [], [], 0, False, False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:  # inside [...] only ']' means something
            in_class = char != "]"
            depth -= not in_class
        elif char in "{([":
            depth += 1
            in_class = char == "["
        elif char in "})":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


MAX_EVAL_FILES = 16
DATA_REPO_PREFIX = "hf://datasets/"
_DATA_REF_PATTERN = r"^[^\s,]+$"
DataRef = Annotated[str, Field(min_length=1, max_length=MAX_REF_LENGTH, pattern=_DATA_REF_PATTERN)]


class EvaluationRequest(BaseModel):
    """Evaluate the merged model after it is written, with merging-eval's metric: the token-level cross-entropy
    of the answers of chat-templated instruction/answer records (lower is better). `modelmerge eval` takes the
    same options as flags."""

    model_config = ConfigDict(extra="forbid")

    data: list[DataRef] = Field(
        min_length=1,
        max_length=MAX_EVAL_FILES,
        description="Data files or folders of JSON arrays / JSONL records with instruction + output (or problem + "
        "solution): a local path (in a ModelMerge: relative to the output volume), or "
        "hf://datasets/<owner>/<name>[@revision]/<path> read through the Hugging Face cache.",
    )
    max_length: int = Field(default=2048, ge=2, le=1_048_576, description="Tokens per record, prompt "
                            "included; capped at the model's maximum positions (merging-eval's default 2048).")
    batch_size: int = Field(default=10, ge=1, le=4096, description="Records per forward pass (length-sorted, "
                            "padded to the longest of the batch).")
    limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N records of each file.")
    baselines: bool = Field(default=False, description="Also evaluate the base model and each fine-tuned model "
                            "on the same data, so the report compares the merge with its inputs.")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        default=None, description="Dtype of the forward pass; unset: bfloat16 on GPU, float32 on CPU "
        "(merging-eval's choice).")

    @field_validator("data", mode="before")
    @classmethod
    def _split_data(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("data")
    @classmethod
    def _data_refs(cls, refs: list[str]) -> list[str]:
        for ref in refs:
            if ref.startswith("hf://") and not (ref.startswith(DATA_REPO_PREFIX)
                                                 and len(ref[len(DATA_REPO_PREFIX):].split("/")) >= 2):
                raise ValueError(f"{ref!r}: a Hugging Face dataset is hf://datasets/<owner>/<name>[@revision]"
                                 "[/<path>]")
        if len(set(refs)) != len(refs):
            raise ValueError("lists a data file twice")
        return refs


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
        allow_inf_nan=False,
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
    model_parameters: list[ModelParameters] | None = Field(
        default=None,
        max_length=MAX_MODELS,
        description="Per-model parameters of mergekit's methods, one entry per model in models_to_merge, e.g. "
        "[{\"weight\": 0.3}, {\"weight\": 0.7}]; unset: every model with the defaults (weight 1.0). "
        "A JSON array string is accepted too.",
    )
    t: float | None = Field(
        default=None,
        allow_inf_nan=False,
        examples=[0.5],
        description="slerp: the interpolation factor from the base model (0) to the model (1) (mergekit's `t`; "
        "required, values outside [0, 1] extrapolate). nearswap: the distance below which the model's value is "
        "taken (weight t / |base - model|, clamped to [0, 1]; required).",
    )
    filter_wise: bool = Field(
        default=False,
        description="model_stock: one interpolation ratio per row of each tensor's last dimension instead of one "
        "per tensor (mergekit's `filter_wise`).",
    )
    nuslerp_flatten: bool = Field(
        default=True,
        description="nuslerp: interpolate each tensor as one flat vector; false: each row of its last dimension "
        "(mergekit's `nuslerp_flatten`).",
    )
    nuslerp_row_wise: bool = Field(
        default=False,
        description="nuslerp without nuslerp_flatten: interpolate each column instead of each row, along the "
        "first dimension (mergekit's `nuslerp_row_wise`).",
    )
    normalize: bool | None = Field(
        default=None,
        description="linear and the task arithmetic family: divide the weighted sum by the sum of the weights "
        "(mergekit's `normalize`); unset: the method's mergekit default (true for linear, ties and della, false "
        "for the others).",
    )
    rescale: bool | None = Field(
        default=None,
        description="ties, dare_*, breadcrumbs*, della*: rescale each sparsified task vector to its L1 norm "
        "before sparsification (mergekit's `rescale`); unset: the method's mergekit default (true for dare_* and "
        "della*, false for the others).",
    )
    __annotations__["lambda"] = "float"  # mergekit's name is a Python keyword: getattr(request, "lambda")
    locals()["lambda"] = Field(
        default=1.0,
        ge=-100.0,
        le=100.0,
        allow_inf_nan=False,
        description="The task arithmetic family: factor on the merged task vector before it is added to the base "
        "(mergekit's `lambda`).",
    )
    select_topk: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="sce: the fraction of each tensor's elements (of those whose task vectors vary between the "
        "models) kept, those of largest variance; 1: every element (mergekit's `select_topk`).",
    )
    normalize_weights: bool = Field(
        default=True,
        description="multislerp: divide the model_parameters weights by their sum (mergekit's "
        "`normalize_weights`).",
    )
    eps: float = Field(
        default=1e-8,
        gt=0.0,
        le=1e-2,
        allow_inf_nan=False,
        description="multislerp: the small constant added to the norms (mergekit's `eps`).",
    )
    max_iter: int = Field(
        default=10,
        ge=0,
        le=10_000,
        description="karcher: the most iterations of the Karcher mean's fixed-point update (mergekit's `max_iter`).",
    )
    tol: float = Field(
        default=1e-5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="karcher: norms and angles below this count as zero, and the iteration stops once the update's "
        "norm is below it (mergekit's `tol`).",
    )
    int8_mask: bool = Field(
        default=False,
        description="ties, dare_ties, breadcrumbs_ties, della, sce: accepted as mergekit accepts it (it holds its sign "
        "masks in int8 to save memory); it changes nothing in the result.",
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
        description="mask_merging with mask_strategy random, dare_*, della*: seed that makes the drop masks "
        "reproducible.",
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
    evaluation: EvaluationRequest | None = Field(
        default=None,
        description="Evaluate the merged model (and with baselines its inputs) once it is written; the results "
        "go into merge_report.json, the model card, the ModelMerge status and the REST job view.",
    )

    config: Annotated[MergekitConfig, WithJsonSchema(CONFIG_JSON_SCHEMA)] | None = Field(
        default=None, validation_alias=AliasChoices(*CONFIG_KEYS), description=CONFIG_DESCRIPTION)

    _split_models = field_validator("models_to_merge", mode="before")(_split_csv)

    @model_validator(mode="before")
    @classmethod
    def _from_config(cls, data: Any) -> Any:
        """A mergekit config sets base_model, models_to_merge, merge_method and dtype (mergekit_config.py)."""
        return request_data(data)

    _split_regexes = field_validator("exclude_param_names_regex", mode="before")(_split_csv)

    @field_validator("weight_mask_rates", mode="before")
    @classmethod
    def _split_rates(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("model_parameters", mode="before")
    @classmethod
    def _parse_model_parameters(cls, value: Any) -> Any:
        """The CLI gives a flag's text: a JSON array of objects."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ValueError(f"expected a JSON array of objects such as [{{\"weight\": 0.5}}]: {exc}") from None

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
        for name, value in METHODS[self.merge_method].defaults.items():
            if getattr(self, name) is None:  # unset: the method's own default (mergekit's differ by method)
                setattr(self, name, value)
        if self.merge_method in (MergeMethod.della, MergeMethod.della_linear):
            for index, entry in enumerate(self.model_parameters or []):
                density = 1.0 if entry.density is None else entry.density
                epsilon = DELLA_EPSILON if entry.epsilon is None else entry.epsilon
                if 0.0 < density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
                    raise ValueError(
                        f"model_parameters[{index}].epsilon: {self.merge_method} needs density - epsilon > 0 and "
                        f"density + epsilon < 1, got density {density} and epsilon {epsilon}")
        if self.merge_method == MergeMethod.mask_merging:
            if self.weight_mask_rates is None:
                raise ValueError("weight_mask_rates is required for mask_merging (one rate per model)")
            if len(self.weight_mask_rates) != len(self.models_to_merge):
                raise ValueError(
                    f"weight_mask_rates needs one rate per model: got {len(self.weight_mask_rates)} "
                    f"rates for {len(self.models_to_merge)} models_to_merge"
                )
        if self.model_parameters is not None and len(self.model_parameters) != len(self.models_to_merge):
            raise ValueError(
                f"model_parameters needs one entry per model: got {len(self.model_parameters)} entries for "
                f"{len(self.models_to_merge)} models_to_merge"
            )
        spec = METHODS[self.merge_method]
        if self.config is None:  # a mergekit config's own checks name its keys
            for name in spec.required:
                if getattr(self, name) is None:
                    raise ValueError(f"{name} is required for {spec.name}")
            fewest, most = spec.models
            if not fewest <= len(self.models_to_merge) <= (most or MAX_MODELS):
                wanted = f"exactly {fewest}" if fewest == most else f"at least {fewest}"
                raise ValueError(f"models_to_merge: {spec.name} takes {wanted} model(s) besides base_model"
                                 f"{spec.models_note}: got {len(self.models_to_merge)}")
        if self.merge_method == MergeMethod.linear and self.normalize and sum(self.weights()) == 0.0:
            raise ValueError("model_parameters weights sum to 0, and linear with normalize divides by their "
                             "sum; set normalize to false or change a weight")
        return self

    def weights(self) -> list[float]:
        """Each model's `weight` (model_parameters, else 1.0 each)."""
        if self.model_parameters is None:
            return [1.0] * len(self.models_to_merge)
        return [entry.weight for entry in self.model_parameters]

    def merge_params(self) -> dict[str, Any]:
        """The parameters that the chosen method actually uses (for reports and status)."""
        names = METHODS[self.merge_method].parameters
        dumped = self.model_dump(mode="json", include=set(names))
        if dumped.get("model_parameters"):  # each model's parameters that are set (unset ones, e.g. scale, are None)
            dumped["model_parameters"] = [{k: v for k, v in entry.items() if v is not None}
                                          for entry in dumped["model_parameters"]]
        return {name: dumped[name] for name in names}


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


MERGING_EVAL = "merging-eval"
MERGEKIT = "mergekit"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    parameters: tuple[str, ...]
    origin: str = MERGING_EVAL  # whose names, semantics and results it has: merging-eval's or mergekit's (the oracles)
    # Defaults of request fields that differ by method (unset in a request: this value; see MergeRequest)
    defaults: dict[str, Any] = dataclass_field(default_factory=dict)
    required: tuple[str, ...] = ()  # parameters without a default that the method needs (fields with examples)
    models: tuple[int, int | None] = (1, None)  # how many models_to_merge it takes (None: up to MAX_MODELS)
    models_note: str = ""  # what that count means, for the error message


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
        MethodSpec(
            "linear",
            "mergekit's linear: the weighted sum of the models (weight from model_parameters), divided by the "
            "sum of the weights with normalize; the base model only supplies what is not merged.",
            ("model_parameters", "normalize", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            defaults={"normalize": True},
        ),
        MethodSpec(
            "mergekit_task_arithmetic",
            "mergekit's task_arithmetic (what a mergekit config's `merge_method: task_arithmetic` selects): base + "
            "lambda × Σ weight × (model − base), divided by the sum of the weights with normalize.",
            ("model_parameters", "normalize", "lambda", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            defaults={"normalize": False},
        ),
        MethodSpec(
            "ties",
            "mergekit's TIES: keep the density largest magnitudes of each task vector per tensor, weight them, "
            "elect each element's sign by the weighted sum, add the values that agree (divided by their weights' "
            "sum with normalize), × lambda, to the base.",
            ("model_parameters", "normalize", "lambda", "rescale", "int8_mask", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            defaults={"normalize": True, "rescale": False},
        ),
        MethodSpec(
            "dare_ties",
            "mergekit's DARE TIES: drop each task vector value at random (keep with probability density, seeded), "
            "rescale to the L1 norm, then TIES' sign election and merge.",
            ("model_parameters", "normalize", "lambda", "rescale", "int8_mask", "seed", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            defaults={"normalize": False, "rescale": True},
        ),
        MethodSpec(
            "dare_linear",
            "mergekit's DARE linear: drop each task vector value at random (keep with probability density, "
            "seeded), rescale to the L1 norm, weighted sum added to the base.",
            ("model_parameters", "normalize", "lambda", "rescale", "seed", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            defaults={"normalize": False, "rescale": True},
        ),
        MethodSpec(
            "breadcrumbs",
            "mergekit's Model Breadcrumbs: drop the gamma largest magnitudes of each task vector per tensor as "
            "outliers and the smallest down to density, weighted sum added to the base.",
            ("model_parameters", "normalize", "lambda", "rescale", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            defaults={"normalize": False, "rescale": False},
        ),
        MethodSpec(
            "breadcrumbs_ties",
            "mergekit's Model Breadcrumbs with TIES: breadcrumbs' sparsification, then TIES' sign election and "
            "merge.",
            ("model_parameters", "normalize", "lambda", "rescale", "int8_mask", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            defaults={"normalize": False, "rescale": False},
        ),
        MethodSpec(
            "della",
            "mergekit's DELLA: drop task vector values at random with keep probabilities from density - epsilon to "
            "density + epsilon by magnitude rank in each row (seeded), rescale to the L1 norm, then TIES' sign "
            "election and merge.",
            ("model_parameters", "normalize", "lambda", "rescale", "int8_mask", "seed", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            defaults={"normalize": True, "rescale": True},
        ),
        MethodSpec(
            "della_linear",
            "mergekit's DELLA linear: della's magnitude-ranked random drop and rescale, weighted sum added to the "
            "base.",
            ("model_parameters", "normalize", "lambda", "rescale", "seed", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            defaults={"normalize": False, "rescale": True},
        ),
        MethodSpec(
            "passthrough",
            "mergekit's passthrough: the one model's tensors as they are (times its model_parameters scale when "
            "set); with a mergekit config's slices, layer ranges of several models stacked (depth up-scaling, "
            "frankenmerges), layers renumbered and the output config resized.",
            ("model_parameters", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            models=(1, 1),
            models_note=" (it copies that one; a mergekit config's slices stack layers of several)",
        ),
        MethodSpec(
            "slerp",
            "mergekit's slerp: spherical interpolation, tensor by tensor, from the base model (t = 0) to the one "
            "model of models_to_merge (t = 1); linear interpolation where the two are (anti)parallel.",
            ("t", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            required=("t",),
            models=(1, 1),
            models_note=" (the base model is the other endpoint)",
        ),
        MethodSpec(
            "nearswap",
            "mergekit's nearswap: element by element, the model's value where it is within t of the base's, the "
            "base's where they are far apart (weight t / |base - model|, clamped to [0, 1]).",
            ("t", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            required=("t",),
            models=(1, 1),
        ),
        MethodSpec(
            "model_stock",
            "mergekit's model_stock: per tensor (or per row with filter_wise), the base model interpolated toward "
            "the fine-tunes' average by a ratio from the mean cosine between their task vectors (Model Stock).",
            ("filter_wise", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            models=(2, None),
        ),
        MethodSpec(
            "nuslerp",
            "mergekit's nuslerp: spherical interpolation of the two fine-tunes' task vectors (t = weight_1 / "
            "(weight_0 + weight_1) from model_parameters), per tensor or per row, added to the base; a mergekit "
            "config without base_model interpolates the two models' weights themselves.",
            ("model_parameters", "nuslerp_flatten", "nuslerp_row_wise", *COMMON_PARAMETERS),
            origin=MERGEKIT,
            models=(2, 2),
        ),
        MethodSpec(
            "sce",
            "mergekit's SCE: per tensor, keep the select_topk elements whose task vectors vary most between the "
            "models, weight each model by its mean squared task vector, elect each element's sign by the sum and "
            "add the agreeing values' weighted mean to the base.",
            ("select_topk", "int8_mask", *COMMON_PARAMETERS),
            origin=MERGEKIT,
        ),
        MethodSpec(
            "multislerp",
            "mergekit's multislerp: barycentric spherical interpolation of the fine-tunes' task vectors (weights "
            "from model_parameters) on the unit sphere, scaled by their weighted mean norm, added to the base; a "
            "mergekit config without base_model interpolates the models' weights themselves.",
            ("model_parameters", "normalize_weights", "eps", *COMMON_PARAMETERS),
            origin=MERGEKIT,
        ),
        MethodSpec(
            "karcher",
            "mergekit's karcher: the Karcher (Riemannian) mean of the models' tensors on the unit sphere, each "
            "model weighted equally, iterated up to max_iter times, scaled by their mean norm; a mergekit config's "
            "base_model is one more input.",
            ("max_iter", "tol", *COMMON_PARAMETERS),
            origin=MERGEKIT,
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
    if "properties" in prop:  # an object such as ModelParameters: each of its fields described the same way
        info["properties"] = {
            name: {**_describe(field, defs), "description": field.get("description", ""),
                   "default": field.get("default")}
            for name, field in prop["properties"].items()
        }
    return info


def methods_catalogue() -> list[dict[str, Any]]:
    """Every method with every parameter it takes, as `/api/methods` and the docs show it."""
    return [
        {
            "name": spec.name,
            "description": spec.description,
            "origin": spec.origin,
            "parameters": {name: {**parameter_schema(name),
                                  **({"default": spec.defaults[name]} if name in spec.defaults else {})}
                           for name in spec.parameters},
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


class EvaluationScore(BaseModel):
    """Cross-entropy of one model on some data: token-weighted over the answer tokens (lower is better)."""

    model_config = ConfigDict(extra="ignore")

    ce: float | None = Field(default=None, description="Token-weighted mean cross-entropy of the answer tokens; "
                             "null when no answer token is left or the losses are not finite.")
    ppl: float | None = Field(default=None, description="Perplexity, exp(ce).")
    tokens: int = Field(default=0, ge=0, description="Answer tokens scored.")
    records: int = Field(default=0, ge=0, description="Records read.")


class FileEvaluation(EvaluationScore):
    name: str = Field(max_length=253, description="The data file's name.")
    answerCutAway: int = Field(default=0, ge=0, description="Records whose answer max_length cut away entirely: "
                               "counted, no tokens (as in merging-eval); merge_report.json names them.")


class OverallEvaluation(EvaluationScore):
    meanCe: float | None = Field(default=None, description="Plain mean of the files' cross-entropies "
                                 "(merging-eval's Avg. row).")


class InputEvaluation(BaseModel):
    """A baseline: one input of the merge evaluated on the same data."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=MAX_REF_LENGTH, description="The input's reference.")
    role: Literal["base", "finetuned"]
    ce: float | None = None
    ppl: float | None = None
    files: dict[str, float | None] = Field(default_factory=dict, description="Cross-entropy per data file.")


class MergeEvaluation(BaseModel):
    """The evaluation of a merged model, as the engine's summary, the ModelMerge status and the REST job view
    carry it (merge_report.json has the full report: per-record detail, timings, options). An evaluation that
    failed after a successful merge keeps the merged model: state Failed, the reason in message."""

    model_config = ConfigDict(extra="ignore")

    state: Literal["Succeeded", "Failed"]
    message: str | None = Field(default=None, max_length=2000, description="Why the evaluation failed.")
    metric: Literal["cross_entropy"] = "cross_entropy"
    dtype: str | None = Field(default=None, description="Dtype of the forward pass.")
    device: str | None = Field(default=None, description="cpu or cuda.")
    overall: OverallEvaluation | None = Field(default=None, description="The merged model over all files.")
    files: list[FileEvaluation] = Field(default_factory=list, description="The merged model per data file.")
    baselines: list[InputEvaluation] = Field(default_factory=list, description="The inputs on the same data "
                                             "(with evaluation.baselines).")
    bestInput: str | None = Field(default=None, description="The baseline with the lowest overall "
                                  "cross-entropy.")
    bestInputCe: float | None = Field(default=None, description="Its overall cross-entropy, to compare with "
                                      "overall.ce.")

    @model_validator(mode="after")
    def _fill_best_input(self) -> MergeEvaluation:
        scored = [b for b in self.baselines if b.ce is not None]
        if scored and self.bestInput is None:
            best = min(scored, key=lambda b: b.ce)
            self.bestInput, self.bestInputCe = best.model, best.ce
        return self


# The container's termination message (where the operator reads the summary) holds at most 4096 bytes: the
# engine's summary line fits in it (the engine drops the baselines' per-file scores first, then the files').
MAX_SUMMARY_BYTES = 4096


class MergeSummary(BaseModel):
    """The engine's final JSON line (stdout, and `--summary-file` = the container's termination message)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["succeeded", "failed"]
    output_dir: str | None = None
    error: str | None = None
    method: str | None = None
    tensors: int | None = None
    seconds: float | None = None
    evaluation: MergeEvaluation | None = None  # the merged model's, when the request asked for one


# ---------------------------------------------------------------------------------------------------------
# Engine outcome: the one reader of the engine's exit code and summary (the operator and the local backend)
# ---------------------------------------------------------------------------------------------------------

EXIT_MERGED = 0
EXIT_FAILED = 1
EXIT_INVALID_REQUEST = 2  # the engine rejected the request: running it again cannot help
EXIT_SIGNAL_BASE = 128  # a shell or container runtime reports death by signal N as 128 + N
_MAX_SIGNAL = 64


@dataclass(frozen=True)
class EngineOutcome:
    """How one run of the engine ended: `error` is the engine's own error when it wrote one, else a sentence
    about the exit code or the signal that ended it; None when it succeeded."""

    succeeded: bool
    error: str | None
    summary: MergeSummary | None


def _last_summary(output: str | bytes | None) -> MergeSummary | None:
    """The engine's summary: the last line of `output` that is a JSON object (the whole summary file, a
    termination message, or a log tail), if it is one."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", "replace")
    for line in reversed((output or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return MergeSummary.model_validate_json(line)
            except ValidationError:
                return None
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_sentence(exit_code: int | None) -> str:
    if exit_code is None:
        return "the merge ended without an exit code or a summary"
    if exit_code < 0 or EXIT_SIGNAL_BASE < exit_code <= EXIT_SIGNAL_BASE + _MAX_SIGNAL:
        number = -exit_code if exit_code < 0 else exit_code - EXIT_SIGNAL_BASE
        code = f" (exit code {exit_code})" if exit_code > 0 else ""
        return f"the merge was killed by {_signal_name(number)}{code}"
    if exit_code == EXIT_INVALID_REQUEST:
        return f"the engine rejected the request (exit code {exit_code}) without saying why; see the merge's log"
    if exit_code == EXIT_MERGED:
        return "the merge exited with code 0 but its summary says it failed, without an error"
    return f"the merge failed with exit code {exit_code} without reporting an error; see the merge's log"


def engine_outcome(*, exit_code: int | None, summary: str | bytes | None) -> EngineOutcome:
    """Reads how the engine ended from its exit code (0 merged, 1 failed, 2 invalid request, 128+N or -N killed
    by signal N; None when unknown) and its summary (`summary`: text whose last JSON line is the summary)."""
    parsed = _last_summary(summary)
    if exit_code is None and parsed is not None:
        succeeded = parsed.status == "succeeded"
    else:
        succeeded = exit_code == EXIT_MERGED and (parsed is None or parsed.status == "succeeded")
    if succeeded:
        return EngineOutcome(succeeded=True, error=None, summary=parsed)
    error = parsed.error if parsed is not None and parsed.error else _exit_sentence(exit_code)
    return EngineOutcome(succeeded=False, error=error, summary=parsed)


# ---------------------------------------------------------------------------------------------------------
# Progress: the engine writes these lines on stderr; both backends read them with parse_progress
# ---------------------------------------------------------------------------------------------------------
# One line per update: `[merge 3/3]  80.7% overall, 42.0% of step 120/290 tensors 85.1 tensors/s 1.4s`.
# The bracket names the current step and its index out of all steps of this merge (ties_merging_dare has
# thresholds, signs, merge; the others one step); `overall` weighs each step by the elements it reads, so it
# never goes down over one run of the engine. Everything after `of step` is free text for humans.

_PROGRESS_LINE = re.compile(
    r"^\[(?P<step>[a-z][a-z0-9_-]*) (?P<index>[0-9]+)/(?P<steps>[0-9]+)\]\s+(?P<percent>[0-9]+(?:\.[0-9]+)?)% "
    r"overall, (?P<step_percent>[0-9]+(?:\.[0-9]+)?)% of step(?P<detail>.*)$",
    re.MULTILINE,
)


class MergeProgress(BaseModel):
    """How far a running merge is: what the engine reports, the ModelMerge status carries and the REST API
    shows (`progress` = percent)."""

    model_config = ConfigDict(extra="ignore")

    percent: float = Field(ge=0.0, le=100.0, description="Overall progress of the merge in percent, weighted "
                           "by the work of each step; never decreases during one run of the engine.")
    step: str = Field(min_length=1, max_length=63, description="The current step, e.g. thresholds, signs, "
                      "merge.")
    stepIndex: int = Field(ge=1, description="1-based index of the current step.")
    steps: int = Field(ge=1, description="Number of steps of this merge.")
    stepPercent: float = Field(ge=0.0, le=100.0, description="Progress of the current step in percent.")
    text: str = Field(default="", max_length=128, description="Short form for humans and kubectl, e.g. "
                      "'merge 3/3 81%'.")

    @model_validator(mode="after")
    def _fill_text(self) -> MergeProgress:
        if self.stepIndex > self.steps:
            raise ValueError(f"stepIndex {self.stepIndex} is larger than steps {self.steps}")
        if not self.text:
            self.text = f"{self.step} {self.stepIndex}/{self.steps} {self.percent:.0f}%"
        return self

    @classmethod
    def finished(cls, *, steps: int = 1) -> MergeProgress:
        """A merge that succeeded: 100%, at the last of its `steps` (what a succeeded ModelMerge's status.progress
        and a completed job's `progress` on either REST backend show)."""
        return cls(percent=100.0, step="merge", stepIndex=steps, steps=steps, stepPercent=100.0)

    def line(self, detail: str = "") -> str:
        """The engine's stderr line for this state; `detail` is free text (counts, rates, elapsed time)."""
        text = (f"[{self.step} {self.stepIndex}/{self.steps}] {self.percent:5.1f}% overall, "
                f"{self.stepPercent:.1f}% of step")
        return f"{text} {detail}".rstrip()


def parse_progress(output: str | bytes | None) -> MergeProgress | None:
    """The last progress line in a piece of the engine's output (a log tail, one line), or None."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", "replace")
    matches = list(_PROGRESS_LINE.finditer(output or ""))
    if not matches:
        return None
    last = matches[-1]
    return MergeProgress(percent=min(100.0, float(last["percent"])), step=last["step"],
                         stepIndex=int(last["index"]), steps=int(last["steps"]),
                         stepPercent=min(100.0, float(last["step_percent"])))


# ---------------------------------------------------------------------------------------------------------
# ModelMerge spec (the CRD's spec = merge request + Kubernetes fields)
# ---------------------------------------------------------------------------------------------------------
# The merge request keeps the predecessor API's snake_case names; the Kubernetes fields use the camelCase
# names of the pod/Job fields they fill, so users recognise them. `modelmerge crds` makes the CRD from these.

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_QUALIFIED_NAME = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                   r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_RELATIVE_PATH = r"^[^/].*$"

ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN)]
Quantity = Annotated[
    int | str,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": _QUANTITY}),
]


def _check_quantity(value: int | str | None) -> int | str | None:
    if isinstance(value, str) and not re.fullmatch(_QUANTITY, value):
        raise ValueError(f"invalid quantity {value!r}")
    return value


def _check_relative(value: str | None) -> str | None:
    if value is not None and (value.startswith("/") or ".." in value.split("/")):
        raise ValueError("must be a relative path without '..'")
    return value


class _KubeModel(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class MergeResources(_KubeModel):
    """CPU, memory and GPUs of the merge container (requests = limits)."""

    cpu: Quantity | None = Field(default=None, description="CPU request and limit, e.g. 4 or '3500m'.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit, e.g. '32Gi'.")
    gpu: int = Field(default=1, ge=1, le=64,
                     description="Number of GPUs to request when use_gpu is true.")
    gpuResourceName: str = Field(default=DEFAULT_GPU_RESOURCE, max_length=253, pattern=_QUALIFIED_NAME,
                                 description="Extended resource name of a GPU, e.g. nvidia.com/gpu or "
                                 "amd.com/gpu.")
    shmSize: Quantity | None = Field(default=None, description="Size limit of the in-memory /dev/shm "
                                     "volume; unset means no limit beyond the memory limit.")

    _quantities = field_validator("cpu", "memory", "shmSize")(_check_quantity)


class OutputVolume(_KubeModel):
    """Where the merged model lands: an existing PersistentVolumeClaim in the ModelMerge's namespace."""

    pvc: ObjectName = Field(description="Name of an existing PersistentVolumeClaim mounted at /output.")
    subPath: str | None = Field(default=None, max_length=1024, pattern=_RELATIVE_PATH,
                                description="Folder inside the claim to mount instead of its root.")

    _relative = field_validator("subPath")(_check_relative)


class CacheVolume(_KubeModel):
    """A PersistentVolumeClaim with the Hugging Face cache, mounted at /cache with HF_HOME pointing at it."""

    pvc: ObjectName = Field(description="Name of an existing PersistentVolumeClaim used as HF_HOME.")
    subPath: str | None = Field(default=None, max_length=1024, pattern=_RELATIVE_PATH,
                                description="Folder inside the claim to use instead of its root.")
    readOnly: bool = Field(default=False, description="Mount the cache read-only (a pre-filled cache; "
                           "combine with HF_HUB_OFFLINE-style use).")

    _relative = field_validator("subPath")(_check_relative)


class SecretKeyRef(_KubeModel):
    name: ObjectName = Field(description="Name of a Secret in the ModelMerge's namespace.")
    key: str = Field(default="token", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key inside the Secret.")


class LocalObjectReference(_KubeModel):
    name: ObjectName = Field(description="Name of an object in the same namespace.")


class Toleration(_KubeModel):
    key: str | None = Field(default=None, max_length=317, description="Taint key; empty with Exists "
                            "matches all taints.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; unset matches all effects.")
    tolerationSeconds: int | None = Field(default=None, ge=0, description="NoExecute only: how long the "
                                          "pod stays bound after the taint appears.")


_LABEL_VALUE = Annotated[str, Field(max_length=63)]


def check_volume_data_refs(refs: list[str]) -> list[str]:
    """Local data files of an evaluation that runs next to an output volume (a ModelMerge, the REST API): paths
    relative to that volume, never absolute and never through '..'; hf://datasets/... refs are not paths."""
    for index, ref in enumerate(refs):
        if ref.startswith(DATA_REPO_PREFIX):
            continue
        if ref.startswith("/") or ".." in ref.split("/"):
            raise ValueError(f"item {index} {ref!r}: a local data file must be a path relative to the output "
                             "volume without '..' (or hf://datasets/<owner>/<name>[@revision]/<path>)")
    return refs


class VolumeEvaluationRequest(EvaluationRequest):
    """spec.evaluation: local data paths are relative to the output volume (the merge pod's working directory)."""

    _relative_data = field_validator("data")(check_volume_data_refs)


class ModelMergeSpec(MergeRequest):
    """The ModelMerge custom resource's spec: the merge request plus how to run it on Kubernetes.

    `output_dir` is relative here: the merged model goes to `<output.pvc>/<output.subPath>/<output_dir>`, and
    `output_dir` defaults to the ModelMerge's name."""

    output: OutputVolume = Field(description="The PersistentVolumeClaim the merged model is written to.")
    modelCache: CacheVolume | None = Field(default=None, description="Optional PersistentVolumeClaim with "
                                           "the Hugging Face cache (HF_HOME).")
    hfTokenSecret: SecretKeyRef | None = Field(default=None, description="Secret key holding a Hugging "
                                               "Face token, passed to the merge as HF_TOKEN.")
    resources: MergeResources = Field(default_factory=MergeResources,
                                      description="CPU, memory and GPUs of the merge container.")
    image: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^\S+$",
                              description="Merge image to run instead of the operator's default.")
    imagePullSecrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16,
                                                         description="Secrets for pulling the image.")
    nodeSelector: dict[Annotated[str, Field(max_length=317)], _LABEL_VALUE] = Field(
        default_factory=dict, max_length=64, description="Node labels the merge pod must run on.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32,
                                          description="Taints the merge pod tolerates.")
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity, as in a pod spec "
                                            "(nodeAffinity, podAffinity, podAntiAffinity).")
    priorityClassName: str | None = Field(default=None, max_length=253, pattern=_DNS_SUBDOMAIN,
                                          description="PriorityClass of the merge pod.")
    queueName: str | None = Field(default=None, max_length=63, pattern=_DNS_SUBDOMAIN,
                                  description="Kueue LocalQueue: the Job is created suspended with the "
                                  "kueue.x-k8s.io/queue-name label and Kueue admits it.")
    backoffLimit: int = Field(default=1, ge=0, le=20,
                              description="Retries of a failed merge pod before the merge is Failed.")
    activeDeadlineSeconds: int | None = Field(default=None, ge=1, le=30 * 24 * 3600,
                                              description="Wall-clock limit of the whole Job, retries "
                                              "included.")
    ttlSecondsAfterFinished: int | None = Field(default=None, ge=0, le=365 * 24 * 3600,
                                                description="Delete the finished Job (not the ModelMerge "
                                                "or its status) after this many seconds.")
    cancel: bool = Field(default=False, description="Set to true to stop the merge: the operator deletes "
                         "the Job and marks the ModelMerge Cancelled. The only field that may change.")

    evaluation: VolumeEvaluationRequest | None = Field(
        default=None,
        description="Evaluate the merged model (and with baselines its inputs) once it is written, in the "
        "evaluation image; local data files are relative to the output volume. The results go into "
        "merge_report.json, the model card and status.evaluation.",
    )

    _relative_output = field_validator("output_dir")(_check_relative)

    def merge_request(self) -> MergeRequest:
        """The engine's part of the spec."""
        return MergeRequest.model_validate(self.model_dump(include=set(MergeRequest.model_fields)))


@dataclass(frozen=True)
class OutputLocation:
    """Where a ModelMerge's merged model lands: folder `relative` of the volume mounted from claim `claim` (its
    folder `sub_path` when set, else its root)."""

    claim: str
    sub_path: str | None
    relative: str

    @property
    def claim_path(self) -> str:
        """The output's path inside the claim: `<sub_path>/<relative>`."""
        return "/".join(part for part in (self.sub_path, self.relative) if part)

    @property
    def uri(self) -> str:
        """`pvc://<claim>/<sub_path>/<relative>`: what status.outputPath holds, for people and the API."""
        return f"pvc://{self.claim}/{self.claim_path}"

    def in_mount(self, mount: str) -> str:
        """The output's path in a container that mounts the output volume (the claim's `sub_path`) at `mount`;
        for a mount of the claim's root use `claim_path`."""
        return f"{mount.rstrip('/')}/{self.relative}"


def output_location(spec: ModelMergeSpec, name: str) -> OutputLocation:
    """Where the merged model of ModelMerge `name` with `spec` lands; output_dir defaults to the name."""
    sub_path = (spec.output.subPath or "").strip("/") or None
    return OutputLocation(claim=spec.output.pvc, sub_path=sub_path, relative=(spec.output_dir or name).strip("/"))


class ModelMergeStatus(BaseModel):
    """Written by the operator only (status subresource)."""

    model_config = ConfigDict(extra="ignore", use_enum_values=True)

    phase: Phase | None = Field(default=None, description="Pending, Running, Succeeded, Failed or Cancelled.")
    reason: str | None = Field(default=None, description="Machine-readable reason of the phase, e.g. "
                               "BackoffLimitExceeded, DeadlineExceeded, OOMKilled, MergeFailed, JobDeleted.")
    message: str | None = Field(default=None, description="Human-readable detail; the engine's error "
                                "when a merge failed.")
    jobName: str | None = Field(default=None, description="Name of the Job running the merge.")
    startTime: str | None = Field(default=None, description="When the Job started.")
    completionTime: str | None = Field(default=None, description="When the merge finished.")
    outputPath: str | None = Field(default=None, description="pvc://<claim>/<path> of the merged model.")
    progress: MergeProgress | None = Field(default=None, description="How far the merge is, as the engine "
                                           "reports it; 100% once it succeeded.")
    evaluation: MergeEvaluation | None = Field(default=None, description="The merged model's cross-entropy on "
                                               "spec.evaluation's data (and its inputs' with baselines).")
    attempts: int | None = Field(default=None, description="Merge pods that ran (retries + 1).")
    observedGeneration: int | None = Field(default=None, description="metadata.generation last acted on.")
    conditions: list[Condition] = Field(default_factory=list, description="Accepted, Running, Complete, "
                                        "Failed, Cancelled, Suspended, each with its last transition.")
