"""mergekit's YAML merge configuration, as mergekit users write it, validated the way the merge request is.

The CLI (`modelmerge merge --config merge.yml`), POST /api/merge (`mergekit_config`: the YAML text or the parsed
object) and a ModelMerge (`spec.config`) all hand the parsed object to MergeRequest's `config` field, which
validates it here (pydantic only: the callers parse YAML to a dict first) and derives the request's base_model,
models_to_merge, merge_method and dtype from it. Errors name the key, e.g.
`config: models[1].parameters.weight: Input should be a valid number`.

What a config can say (mergekit 0.1.5's MergeConfiguration): `models` with per-model `parameters`, or `slices`
(layer ranges of one or several models: depth up-scaling, frankenmerges), `merge_method` (mergekit's names),
`base_model`, global `parameters`, `dtype`, `out_dtype`, `tokenizer_source` (base, union or a model; where the
models' vocabularies differ the engine moves embedding and head rows to that vocabulary as mergekit does, and refuses
naming tokenizer_source what it does not do: merge_image/modelmerge_engine/tokenizer_source.py). A parameter is
a scalar, a gradient (a list of numbers interpolated over the layers of a slice) or a list of conditions
`{filter: self_attn, value: ...}` (the first whose filter is in the tensor's name wins). `resolve` looks a
parameter up for one tensor exactly as mergekit's parameter resolver does; the engine calls it through
`Method.value`, so every method gets per-tensor values.

Refused with a message naming the key: `modules` (multi-module architectures), `tokenizer` (a tokenizer config
with added tokens), `chat_template`, LoRA references (`model+lora`), and parameters that no method has (typos).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

# mergekit's methods that treat base_model as one more input (its contract ignores the base); every other method
# takes base_model apart from the models it merges.
BASE_AS_INPUT = frozenset({"linear", "passthrough", "karcher"})
# mergekit's methods whose base_model is optional (InputContract base=BasePolicy.OPTIONAL): with one they merge the
# models' task vectors and add the base; without one every model is an input (as with BASE_AS_INPUT) and they merge
# the models' weights themselves. A flat request always has a base.
BASE_OPTIONAL = frozenset({"nuslerp", "multislerp"})
# A config's merge_method names mergekit's method; where the registry's name differs (task_arithmetic is
# merging-eval's in a flat request), it maps here.
MERGEKIT_METHOD_NAMES: dict[str, str] = {"task_arithmetic": "mergekit_task_arithmetic"}
# Parameters mergekit accepts that change nothing in the result (memory or speed options): accepted, ignored.
NO_EFFECT_PARAMETERS = frozenset({"int8_mask"})
DTYPE_NAMES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
_LAYER_RANGE_LIMIT = 1 << 16

Scalar = Union[bool, int, float, str]  # noqa: UP007 - the order is mergekit's (smart union keeps the YAML type)
Gradient = list[Scalar]


class ConditionalParameter(BaseModel):
    """`{filter: self_attn, value: ...}`: the value for tensors whose name contains `filter` (every tensor when
    it is unset or `*`)."""

    model_config = ConfigDict(extra="forbid")

    value: Scalar | Gradient
    filter: str | None = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], Scalar, Gradient]  # noqa: UP007
_SCALARS = (bool, int, float, str)


def _setting(name: str, value: Any) -> ParameterSetting:
    """One parameter's setting, with a message naming it when it is none of mergekit's forms."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        return _condition(f"{name}", value)
    if isinstance(value, list):
        if all(isinstance(e, _SCALARS) for e in value):
            return value
        if all(isinstance(e, dict) for e in value):
            return [_condition(f"{name}[{i}]", e) for i, e in enumerate(value)]
        if all(isinstance(e, (dict, *_SCALARS)) for e in value):
            raise ValueError(f"{name}: a list is either values (a gradient) or conditions ({{filter, value}}), "
                             "not both")
    raise ValueError(f"{name}: a value, a list of values (a gradient over the layers) or a list of conditions "
                     f"({{filter, value}}), got {value!r}")


def _condition(name: str, value: dict) -> ConditionalParameter:
    unknown = sorted(set(value) - {"filter", "value"})
    if unknown:
        raise ValueError(f"{name}: a condition is {{filter, value}}; unknown key {unknown[0]!r}")
    if "value" not in value:
        raise ValueError(f"{name}: a condition needs a value")
    setting, where = value["value"], value.get("filter")
    if not (isinstance(setting, _SCALARS) or (isinstance(setting, list) and setting
                                              and all(isinstance(e, _SCALARS) for e in setting))):
        raise ValueError(f"{name}.value: a value or a list of values (a gradient), got {setting!r}")
    if where is not None and not isinstance(where, str):
        raise ValueError(f"{name}.filter: a part of tensor names (text), got {where!r}")
    return ConditionalParameter(value=setting, filter=where)


def _parameters(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError("parameters are a mapping of names to settings")
    return {name: _setting(name, setting) for name, setting in value.items()}


Parameters = Annotated[dict[str, Any], BeforeValidator(_parameters)]


def _model_reference(value: Any) -> Any:
    """mergekit writes a model as `path[@revision]` or `{model: {path, revision}}`; LoRA (`model+lora`) is
    refused."""
    if isinstance(value, dict):
        inner = value.get("model", value)
        if set(value) - {"model", "lora", "override_architecture"} or value.get("lora") or \
                value.get("override_architecture"):
            raise ValueError("a model is `path[@revision]` (LoRA adapters and override_architecture are not "
                             "supported here)")
        if isinstance(inner, dict):
            path, revision = inner.get("path"), inner.get("revision")
            if not isinstance(path, str) or set(inner) - {"path", "revision"}:
                raise ValueError("a model is `path[@revision]` or {model: {path, revision}}")
            return f"{path}@{revision}" if revision else path
        value = inner
    if isinstance(value, str) and "+" in value:
        raise ValueError(f"{value!r}: LoRA references (model+lora) are not supported here; merge the adapter "
                         "into its model first")
    if isinstance(value, str) and value.count("@") > 1:
        raise ValueError(f"{value!r}: at most one '@revision'")
    return value


ModelRef = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[^\s,]+$")]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputModel(_Node):
    model: ModelRef
    parameters: Parameters | None = None

    _reference = field_validator("model", mode="before")(_model_reference)


LayerIndex = Annotated[int, Field(ge=0, le=_LAYER_RANGE_LIMIT)]


class InputSlice(_Node):
    model: ModelRef
    layer_range: tuple[LayerIndex, LayerIndex]
    parameters: Parameters | None = None

    _reference = field_validator("model", mode="before")(_model_reference)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] >= value[1]:
            raise ValueError(f"[{value[0]}, {value[1]}] holds no layer: the end (exclusive) must be above the start")
        return value

    @property
    def layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(_Node):
    sources: list[InputSlice] = Field(min_length=1, max_length=64)
    base_model: ModelRef | None = None
    residual_weight: float | None = Field(default=None, description="Accepted and unused, as in mergekit.")
    parameters: Parameters | None = None

    _reference = field_validator("base_model", mode="before")(_model_reference)

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {source.layers for source in self.sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"sources: every source of a slice must hold the same number of layers (got {ranges})")
        return self

    @property
    def layers(self) -> int:
        return self.sources[0].layers


def _dtype_name(value: Any) -> Any:
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name not in DTYPE_NAMES:
            raise ValueError(f"{value!r}: one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[name]
    return value


class MergekitConfig(_Node):
    """A mergekit merge config (mergekit/config.py MergeConfiguration) as it is."""

    models: list[InputModel] | None = Field(default=None, max_length=32)
    slices: list[OutputSlice] | None = Field(default=None, max_length=1024)
    merge_method: str = Field(min_length=1, max_length=64)
    base_model: ModelRef | None = None
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    out_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    tokenizer_source: ModelRef | None = None  # "base", "union" or a model
    parameters: Parameters | None = None

    # mergekit keys refused with a reason (rather than as unknown keys)
    modules: Any = Field(default=None, exclude=True)
    tokenizer: Any = Field(default=None, exclude=True)
    chat_template: Any = Field(default=None, exclude=True)

    _reference = field_validator("base_model", "tokenizer_source", mode="before")(_model_reference)
    _dtypes = field_validator("dtype", "out_dtype", mode="before")(_dtype_name)

    @model_validator(mode="after")
    def _check(self) -> MergekitConfig:
        if self.modules is not None:
            raise ValueError("modules: multi-module configs are not supported here; write `models` or `slices`")
        if self.tokenizer is not None:
            raise ValueError("tokenizer: tokenizer configs (added tokens, vocabulary surgery) are not supported "
                             "here; use tokenizer_source: base, union or a model")
        if self.chat_template is not None:
            raise ValueError("chat_template: not supported here; the output keeps the tokenizer's own template")
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of models and slices must be given (a non-empty list)")
        if self.out_dtype is not None and self.out_dtype != (self.dtype or self.out_dtype):
            raise ValueError(f"out_dtype: {self.out_dtype} differs from dtype {self.dtype}; this engine computes "
                             "and writes one dtype: set dtype only")
        method = self.method
        if method is None:
            raise ValueError(f"merge_method: {self.merge_method!r} is not one of mergekit's methods here "
                             f"({', '.join(sorted(mergekit_methods()))})")
        self._check_inputs(method)
        self._check_parameters(method)
        return self

    # --- what the request derives -------------------------------------------------------------------------

    @property
    def method(self) -> str | None:
        """The registry name of the config's merge_method (None: not a mergekit method here)."""
        name = MERGEKIT_METHOD_NAMES.get(self.merge_method, self.merge_method)
        return name if name in mergekit_methods() else None

    def inputs(self) -> list[str]:
        """Every model that feeds the merge, in mergekit's order: the models (or the first slice's sources), then
        the base model when mergekit adds it as one more input (`models` with a base-as-input method)."""
        listed = [m.model for m in self.models] if self.models else [s.model for s in self.slices[0].sources]
        if self.method == "passthrough" and self.slices:
            listed = list(dict.fromkeys(source.model for s in self.slices for source in s.sources))
        if self.models and self.base_model and self.base_model not in listed and self.base_as_input:
            listed.append(self.base_model)
        return listed

    def base(self) -> str:
        """The model whose config, tokenizer and unmerged tensors the output takes (mergekit's donor)."""
        if self.base_model:
            return self.base_model
        return self.models[0].model if self.models else self.slices[0].sources[0].model

    @property
    def base_as_input(self) -> bool:
        """Whether every model is an input and base_model (if any) one of them: a BASE_AS_INPUT method, or a
        BASE_OPTIONAL one without base_model."""
        return self.method in BASE_AS_INPUT or (self.method in BASE_OPTIONAL and self.base_model is None)

    def models_to_merge(self) -> list[str]:
        if self.base_as_input:
            return self.inputs()
        return [model for model in self.inputs() if model != self.base_model]

    def request_fields(self) -> dict[str, Any]:
        """The merge request's fields this config sets: base_model, models_to_merge, merge_method, dtype, and
        the parameters that hold one value for every tensor (global ones as request fields, per-model ones as
        model_parameters); per-tensor values are looked up with `resolve`."""
        models = self.models_to_merge()
        fields: dict[str, Any] = {"base_model": self.base(), "models_to_merge": models, "merge_method": self.method}
        if self.dtype:
            fields["dtype"] = self.dtype
        shared, per_model = parameter_names()
        for name, setting in (self.parameters or {}).items():
            if name in shared and _is_plain(setting):
                fields[name] = setting
        if self.models:
            entries = []
            for model in models:
                own = next((m.parameters or {} for m in self.models if m.model == model), {})
                entry = {}
                for name in per_model:
                    setting = own.get(name, (self.parameters or {}).get(name))
                    if setting is not None and _is_plain(setting):
                        entry[name] = setting
                entries.append(entry)
            if any(entries):
                fields["model_parameters"] = entries
        return fields

    # --- per-tensor parameters ----------------------------------------------------------------------------

    def resolve(self, name: str, *, tensor: str, t: float, slice_index: int, model: str | None = None,
                model_tensor: str | None = None) -> Any:
        """mergekit's value of parameter `name` for output tensor `tensor` of slice `slice_index` (0 for
        `models` configs) at layer position `t` (0 to 1 over the slice's layers; 0 outside layers), for input
        `model` (named as in the config; its own tensor `model_tensor`, which filters match for per-model
        parameters) or for the whole merge (model None). Precedence: the model's parameters in the slice (or
        in `models`), the slice's parameters, the global parameters; None when none sets it."""
        if self.slices:
            out_slice = self.slices[slice_index]
            scopes = [s.parameters for s in out_slice.sources if model is not None and s.model == model]
            scopes.append(out_slice.parameters)
        else:
            scopes = [m.parameters for m in self.models if model is not None and m.model == model]
        scopes.append(self.parameters)
        validate = parameter_validator(name)
        for scope in scopes:
            if scope and name in scope:
                value = evaluate_setting(model_tensor if model is not None and model_tensor else tensor,
                                         scope[name], t, validate=validate)
                if value is not None:
                    return value
        return None

    # --- validation ---------------------------------------------------------------------------------------

    def _check_inputs(self, method: str) -> None:
        if self.models:
            names = [m.model for m in self.models]
            duplicate = next((n for n in names if names.count(n) > 1), None)
            if duplicate:
                raise ValueError(f"models: {duplicate} is listed twice")
            if self.base_model is None and not self.base_as_input:
                raise ValueError(f"base_model: required for merge_method {self.merge_method}")
            if not self.models_to_merge():
                raise ValueError(f"models: merge_method {self.merge_method} needs at least one model besides "
                                 f"base_model {self.base_model}")
            if method == "passthrough" and len(self.inputs()) != 1:
                raise ValueError("models: passthrough takes exactly one model (use slices to stack layers of "
                                 "several)")
            self._check_count("models", len(self.models_to_merge()), method)
            return
        first = [s.model for s in self.slices[0].sources]
        for index, out_slice in enumerate(self.slices):
            where = f"slices[{index}]"
            if out_slice.base_model is not None and out_slice.base_model != self.base_model:
                raise ValueError(f"{where}.base_model: a slice's own base model is not supported here (it must "
                                 f"be the config's base_model {self.base_model})")
            models = [s.model for s in out_slice.sources]
            if len(set(models)) != len(models):
                raise ValueError(f"{where}.sources: a model is listed twice")
            if method == "passthrough":
                if len(models) != 1:
                    raise ValueError(f"{where}.sources: passthrough takes exactly one source per slice "
                                     f"(got {len(models)})")
                continue
            if models != first:
                raise ValueError(f"{where}.sources: merge_method {self.merge_method} needs the same models in the "
                                 f"same order in every slice ({', '.join(first)} in slices[0]); only passthrough "
                                 "stacks slices of different models")
            if not self.base_as_input:
                if self.base_model is None:
                    raise ValueError(f"base_model: required for merge_method {self.merge_method}")
                if self.base_model not in models:
                    raise ValueError(f"{where}.sources: base_model {self.base_model} must be one of the slice's "
                                     f"sources for merge_method {self.merge_method}, as mergekit requires")
                if len(models) < 2:
                    raise ValueError(f"{where}.sources: merge_method {self.merge_method} needs a model besides "
                                     "base_model")
            self._check_count(f"{where}.sources", len(models) - (self.base_model in models), method)

    def _check_count(self, key: str, count: int, method: str) -> None:
        """A BASE_OPTIONAL method's model count, as mergekit's InputContract checks it (besides base_model)."""
        if method not in BASE_OPTIONAL:
            return
        from modelmerge.contract import METHODS

        fewest, most = METHODS[method].models
        if count < fewest or (most is not None and count > most):
            wanted = f"exactly {fewest}" if fewest == most else f"at least {fewest}"
            besides = " besides base_model" if self.base_model else " (without base_model every model is one)"
            raise ValueError(f"{key}: merge_method {self.merge_method} takes {wanted} model(s){besides}: got {count}")

    def _check_parameters(self, method: str) -> None:
        shared, per_model = parameter_names()
        scopes: list[tuple[str, Parameters | None, bool]] = [("parameters", self.parameters, False)]
        for index, model in enumerate(self.models or []):
            scopes.append((f"models[{index}].parameters", model.parameters, True))
        for index, out_slice in enumerate(self.slices or []):
            scopes.append((f"slices[{index}].parameters", out_slice.parameters, False))
            for source_index, source in enumerate(out_slice.sources):
                scopes.append((f"slices[{index}].sources[{source_index}].parameters", source.parameters, True))
        for where, parameters, per_model_scope in scopes:
            for name, setting in (parameters or {}).items():
                key = f"{where}.{name}"
                if name in NO_EFFECT_PARAMETERS:
                    continue
                if name not in shared and name not in per_model:
                    known = ", ".join(sorted(shared | per_model))
                    raise ValueError(f"{key}: no merge method has a parameter {name!r} (they are: {known})")
                if per_model_scope and name in shared and name not in per_model:
                    raise ValueError(f"{key}: {name} applies to the whole merge, not to one model (mergekit "
                                     f"ignores it here): set it under parameters")
                _check_setting(key, setting, parameter_validator(name))


def _is_plain(setting: ParameterSetting) -> bool:
    return isinstance(setting, (bool, int, float, str))


def _check_setting(key: str, setting: ParameterSetting, validate) -> None:
    """Every value a setting can produce is valid for its parameter (interpolations lie between them)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, list):
        if any(isinstance(e, ConditionalParameter) for e in setting):
            if not all(isinstance(e, ConditionalParameter) for e in setting):
                raise ValueError(f"{key}: a list is either values (a gradient) or conditions ({{filter, value}}), "
                                 "not both")
            for index, condition in enumerate(setting):
                _check_setting(f"{key}[{index}].value", condition.value, validate)
            return
        if not setting:
            raise ValueError(f"{key}: an empty list sets nothing")
        for index, element in enumerate(setting):
            _check_value(f"{key}[{index}]", element, validate)
        return
    _check_value(key, setting, validate)


def _check_value(key: str, value: Any, validate) -> None:
    try:
        validate(value)
    except ValidationError as exc:
        reason = "; ".join(error["msg"] for error in exc.errors(include_url=False))
        raise ValueError(f"{key}: {reason} (got {value!r})") from None


def evaluate_setting(tensor: str, setting: ParameterSetting, t: float, *, validate) -> Any:
    """mergekit's evaluate_setting: a scalar as it is; a list of numbers interpolated linearly at `t` over
    its points, a list with a non-number picked at index int(t * (len - 1)); conditions: the first whose filter
    is unset, `*` or a substring of `tensor`. None when nothing applies."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [validate(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        fraction = scaled - low
        return validate((1 - fraction) * values[low] + fraction * values[high])
    for condition in setting:
        if condition.filter is None or condition.filter == "*" or (tensor and condition.filter in tensor):
            return evaluate_setting(tensor, condition.value, t, validate=validate)
    return None


# --- the parameters of the contract's methods -----------------------------------------------------------


def mergekit_methods() -> set[str]:
    from modelmerge.contract import MERGEKIT, METHODS

    return {name for name, spec in METHODS.items() if spec.origin == MERGEKIT}


@cache
def parameter_names() -> tuple[frozenset[str], frozenset[str]]:
    """(global, per-model) parameter names a config may set: the request fields that mergekit methods take,
    and ModelParameters' fields."""
    from modelmerge.contract import COMMON_PARAMETERS, METHODS, ModelParameters

    per_model = frozenset(ModelParameters.model_fields)
    shared = {name for spec in METHODS.values() if spec.origin == "mergekit" for name in spec.parameters}
    return frozenset(shared - set(COMMON_PARAMETERS) - {"model_parameters"}), per_model


@cache
def parameter_validator(name: str):
    """Validates (and coerces, as mergekit's pydantic does) one value of parameter `name`: the per-model field's
    type and bounds when ModelParameters has it, else the request field's."""
    from modelmerge.contract import MergeRequest, ModelParameters

    owner = ModelParameters if name in ModelParameters.model_fields else MergeRequest
    field = owner.model_fields.get(name)
    if field is None:  # NO_EFFECT_PARAMETERS
        return lambda value: value
    return field_adapter(field).validate_python


def field_adapter(field) -> TypeAdapter:
    """Validates one value as a pydantic field does (its type and bounds)."""
    return TypeAdapter(Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)


# --- layers ---------------------------------------------------------------------------------------------

# A decoder layer's tensors: `<prefix>.layers.<index>.<rest>` (Llama, Qwen2, Mistral, ... and GPT-2's `h`).
_LAYER_TENSOR = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")


def layer_of(tensor: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, rest) of a decoder layer's tensor name, or None for other tensors."""
    match = _LAYER_TENSOR.match(tensor)
    return (match["prefix"], int(match["index"]), match["rest"]) if match else None


# --- the merge request's `config` field -----------------------------------------------------------------

CONFIG_KEYS = ("config", "mergekit_config")  # the field's name, and the REST API's name for it
CONFIG_JSON_SCHEMA = {"type": "object", "additionalProperties": True}
CONFIG_DESCRIPTION = (
    "A mergekit YAML config as it is (the parsed object; the CLI's --config and the REST API's mergekit_config also "
    "take the YAML text): models with per-model parameters or slices, merge_method (mergekit's names), base_model, "
    "parameters (scalars, layer gradients, filter conditions), dtype, out_dtype, tokenizer_source. It sets "
    "base_model, models_to_merge, merge_method and dtype (leave them out or give the same values).")


def _error(loc: tuple, message: str) -> ValidationError:
    return ValidationError.from_exception_data("MergeRequest", [
        {"type": "value_error", "loc": loc, "input": None, "ctx": {"error": ValueError(message)}}])


def request_data(data: Any) -> Any:
    """MergeRequest's input with a mergekit config (under `config` or `mergekit_config`) validated and the
    fields it sets derived from it; an explicit field that says otherwise is an error naming it. Other input
    passes through unchanged."""
    if not isinstance(data, dict) or not any(key in data for key in CONFIG_KEYS):
        return data
    if all(key in data for key in CONFIG_KEYS):
        raise _error(("mergekit_config",), "give the config once, as config or as mergekit_config")
    key = next(key for key in CONFIG_KEYS if key in data)
    raw = data[key]
    if raw is None:
        return data
    if isinstance(raw, str):
        raise _error((key,), "expected the parsed mergekit config (an object); the CLI's --config and the REST "
                     "API parse YAML text")
    try:
        config = MergekitConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValidationError.from_exception_data("MergeRequest", [
            {"type": error["type"], "loc": (key, *error["loc"]), "input": error.get("input"),
             **({"ctx": error["ctx"]} if "ctx" in error else {})}
            for error in exc.errors(include_url=False)]) from None
    data = {k: v for k, v in data.items() if k != key}
    for name, value in config.request_fields().items():
        if name in data and data[name] is not None and not _same(name, data[name], value):
            raise _error((name,), f"the config sets it to {value!r}, here it is {data[name]!r}: leave it out or "
                         "give the same value")
        data[name] = value
    data["config"] = config
    return data


def _same(name: str, given: Any, derived: Any) -> bool:
    from modelmerge.contract import MergeRequest

    adapter = field_adapter(MergeRequest.model_fields[name])
    try:
        return adapter.validate_python(given) == adapter.validate_python(derived)
    except ValidationError:
        return False
