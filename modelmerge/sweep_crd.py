"""The ModelMergeSweep CustomResourceDefinition, generated from modelmerge/sweep.py (`modelmerge crds`).

The schemas are the pydantic models' (through crd.model_schema: structural, defaults kept); each field of the space
has its own dimension schema whose values have the field's type and bounds. CEL rules make the API server refuse
what the sweep's validation refuses where CEL can say it, each message naming the field: a dimension in exactly one
form (values, {start, stop, step}, {min, max, log}) with sane bounds, a merge_method from the template or the
space, every swept parameter taken by a chosen method, {min, max} only with strategy random, trials for random
only, at most MAX_TRIALS grid points (the sum over the chosen methods of the product of the sizes of the dimensions
each takes), relative paths, and an immutable spec except cancel. What CEL cannot check (each trial's spec as a
ModelMerge: one mask rate per model, regexes...) the operator checks before creating anything: the sweep becomes
Failed with reason InvalidSpec.
"""

from __future__ import annotations

from typing import Any

import yaml

from modelmerge.contract import API_GROUP, METHODS
from modelmerge.crd import (
    HEADER,
    _Dumper,
    _rule,
    add_path_rules,
    custom_resource,
    immutable_except_cancel,
    model_schema,
    status_schema_of,
)
from modelmerge.sweep import (
    MAX_TRIALS,
    RANGE_TOLERANCE,
    SWEEP_KIND,
    SWEEP_PLURAL,
    SWEEP_SHORT_NAME,
    ModelMergeSweepSpec,
    ModelMergeSweepStatus,
    methods_taking,
    sweepable_parameters,
)

SWEEP_CRD_NAME = f"{SWEEP_PLURAL}.{API_GROUP}"
SWEEP_CRD_FILE = f"{API_GROUP}_{SWEEP_PLURAL}.yaml"
_RANGE = "has(self.start) || has(self.stop) || has(self.step)"


def _cel_list(items: list[str]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


def _dimension_rules() -> list[dict[str, str]]:
    full_range = "has(self.start) && has(self.stop) && has(self.step)"
    return [
        _rule(f"(has(self.values) ? 1 : 0) + ({_RANGE} ? 1 : 0) + (has(self.min) || has(self.max) ? 1 : 0) == 1",
              "give exactly one of: values, {start, stop, step} or {min, max, log}"),
        _rule(f"!({_RANGE}) || ({full_range})", "a range needs start, stop and step"),
        _rule(f"!({full_range}) || self.stop >= self.start", "stop must not be below start", field_path=".stop"),
        _rule(f"!({full_range}) || (self.stop - self.start) / self.step + {RANGE_TOLERANCE} < {MAX_TRIALS}.0",
              f"the range has more than {MAX_TRIALS} values", field_path=".step"),
        _rule("has(self.min) == has(self.max)", "random sampling needs min and max"),
        _rule("!has(self.min) || !has(self.max) || self.min < self.max", "min must be below max",
              field_path=".min"),
        _rule("!self.log || (has(self.min) && self.min > 0.0)", "log sampling needs {min, max} with min > 0",
              field_path=".log"),
    ]


def _chosen(method: str) -> str:
    """CEL: whether the sweep's trials use `method`."""
    return (f"(has(self.space.merge_method) ? '{method}' in self.space.merge_method.values : "
            f"(has(self.template.merge_method) && self.template.merge_method == '{method}'))")


def _size(name: str, *, ranged: bool) -> str:
    """CEL: the number of grid points of dimension `name` (1 when the space does not vary it)."""
    d = f"self.space.{name}"
    if not ranged:
        return f"(has({d}) ? size({d}.values) : 1)"
    return (f"(has({d}) ? (has({d}.values) ? size({d}.values) : has({d}.step) ? "
            f"int(({d}.stop - {d}.start) / {d}.step + {RANGE_TOLERANCE}) + 1 : 1) : 1)")


def _grid_size(ranged: set[str]) -> str:
    swept = set(sweepable_parameters())
    terms = []
    for spec in METHODS.values():
        sizes = [_size(name, ranged=name in ranged) for name in spec.parameters if name in swept] or ["1"]
        terms.append(f"({_chosen(spec.name)} ? {' * '.join(sizes)} : 0)")
    return " + ".join(terms)


def _spec_rules(ranged: set[str]) -> list[dict[str, str]]:
    rules = [
        _rule("!has(self.template.config)", "a sweep varies the merge request's fields; a mergekit config cannot "
              "be a template (give base_model, models_to_merge and merge_method)", field_path=".template.config"),
        _rule("has(self.template.merge_method) || has(self.space.merge_method)",
              "template.merge_method is required unless space.merge_method lists the methods to try",
              field_path=".template.merge_method", reason="FieldValueRequired"),
    ]
    for name in sweepable_parameters()[1:]:
        takers = methods_taking(name)
        chosen = " || ".join(_chosen(method) for method in takers) or "false"
        rules.append(_rule(f"!has(self.space.{name}) || {chosen}",
                           f"no chosen merge_method takes {name} (taken by: {', '.join(takers)})",
                           field_path=f".space.{name}"))
    rules += [_rule(f"self.strategy != 'grid' || !has(self.space.{name}) || !has(self.space.{name}.min)",
                    "{min, max} is sampled by strategy random; a grid needs values or {start, stop, step}",
                    field_path=f".space.{name}") for name in sweepable_parameters() if name in ranged]
    rules += [
        _rule("self.strategy != 'random' || has(self.trials)", "strategy random needs the number of trials",
              field_path=".trials", reason="FieldValueRequired"),
        _rule("self.strategy != 'grid' || (!has(self.trials) && !has(self.seed))",
              "trials and seed are for strategy random (a grid runs every point)", field_path=".trials"),
        _rule(f"self.strategy != 'grid' || {_grid_size(ranged)} <= {MAX_TRIALS}",
              f"the grid has more than {MAX_TRIALS} points", field_path=".space"),
    ]
    return rules


def spec_schema() -> dict[str, Any]:
    schema = model_schema(ModelMergeSweepSpec)
    schema["description"] = ModelMergeSweepSpec.__doc__.strip().replace("\n    ", " ")
    add_path_rules(schema["properties"]["template"]["properties"])
    space = schema["properties"]["space"]
    space["minProperties"] = 1
    ranged = {name for name, dim in space["properties"].items() if "step" in dim["properties"]}
    for name in ranged:
        space["properties"][name]["x-kubernetes-validations"] = _dimension_rules()
    schema["x-kubernetes-validations"] = _spec_rules(ranged)
    schema["x-kubernetes-validations"].append(immutable_except_cancel(schema, SWEEP_KIND))
    return schema


def status_schema() -> dict[str, Any]:
    schema = status_schema_of(ModelMergeSweepStatus)
    trials = schema["properties"]["trials"]
    trials.pop("default", None)
    trials["x-kubernetes-list-type"] = "atomic"
    return schema


def printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Done", "type": "string", "jsonPath": ".status.progress"},  # finished / total trials
        {"name": "Best CE", "type": "number", "jsonPath": ".status.best.ce"},
        {"name": "Best Trial", "type": "string", "jsonPath": ".status.best.name"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy", "priority": 1},
        {"name": "Parallelism", "type": "integer", "jsonPath": ".spec.parallelism", "priority": 1},
    ]


def sweep_crd() -> dict[str, Any]:
    return custom_resource(kind=SWEEP_KIND, plural=SWEEP_PLURAL, short_name=SWEEP_SHORT_NAME,
                           description="A search over merge parameters: its trials run as ModelMerges it owns, "
                           "ranked by their evaluation.", spec=spec_schema(), status=status_schema(),
                           columns=printer_columns())


def render_sweep() -> str:
    header = HEADER.replace("from modelmerge/contract.py", "from modelmerge/sweep.py")
    return header + yaml.dump(sweep_crd(), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
