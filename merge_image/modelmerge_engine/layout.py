"""Where each output tensor of a mergekit config's merge comes from, as mergekit's planner lays it out
(mergekit/plan.py): which tensor of which model feeds it, its slice and its position `t` in the slice's layers
(for gradients), and the output config's layer count and per-layer lists.

- `models` configs: the base model's tensors, each read under its own name from every model; a layer tensor's t is
  layer / (layers - 1) (1 with one layer), other tensors' 0.
- `slices` configs: the output's decoder layers are the slices' layers in order, renumbered from 0; output layer j
  of a slice reads layer `layer_range[0] + offset` of each source (their own numbers), t = offset / (layers - 1).
  Tensors outside the layers come from the first slice's sources when they are embeddings (`embed` in the name,
  mergekit's pre-weights) and from the last slice's otherwise (norm, head: its post-weights), with t = 0.
  passthrough takes each tensor from its slice's one source; other methods need the same models in every slice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelmerge.contract import MergeRequest
from modelmerge.mergekit_config import BASE_AS_INPUT, MergekitConfig, layer_of
from modelmerge_engine.errors import MergeError
from modelmerge_engine.safetensors_io import SafetensorsModel

BASE = -1  # the position of base_model among the models read (models_to_merge are 0, 1, ...)
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Placement:
    """One output tensor: read `base` = (position, tensor) as the base, and from models_to_merge[i] its tensor
    `sources[i]` (for i in `inputs_from`, every model when None); its slice and layer position for parameters."""

    name: str
    base: tuple[int, str]
    sources: tuple[str, ...]
    inputs_from: tuple[int, ...] | None
    slice_index: int
    t: float


def layer_count(names) -> int:
    """The number of decoder layers a model's tensor names hold."""
    indices = [found[1] for found in map(layer_of, names) if found is not None]
    return max(indices) + 1 if indices else 0


def layer_position(offset: int, layers: int) -> float:
    """mergekit's t of the offset-th of a slice's `layers` layers."""
    return offset / (layers - 1) if layers > 1 else 1.0


def placements(request: MergeRequest, base: SafetensorsModel, finetunes: list[SafetensorsModel],
               base_names: list[str]) -> list[Placement]:
    """Every output tensor of a config's merge (base_names: the base's tensors the output may have)."""
    config = request.config
    count = len(finetunes)
    if not config.slices:
        layers = layer_count(base_names)
        out = []
        for name in base_names:
            found = layer_of(name)
            t = layer_position(found[1], layers) if found else 0.0
            out.append(Placement(name, (BASE, name), (name,) * count, None, 0, t))
        return out
    return _SliceLayout(request, config, base, finetunes).placements(base_names)


class _SliceLayout:
    def __init__(self, request: MergeRequest, config: MergekitConfig, base: SafetensorsModel,
                 finetunes: list[SafetensorsModel]):
        self.request, self.config = request, config
        self.positions = {ref: i for i, ref in enumerate(request.models_to_merge)}
        self.models = {BASE: base, **dict(enumerate(finetunes))}
        self.passthrough = request.merge_method == "passthrough"
        self.base_as_input = request.merge_method in BASE_AS_INPUT
        self._layers: dict[int, dict[int, list[tuple[str, str]]]] = {}

    def position(self, ref: str) -> int:
        return self.positions[ref] if ref in self.positions else BASE

    def layer_tensors(self, position: int, layer: int, where: str) -> list[tuple[str, str]]:
        """(prefix, rest) of each tensor of one model's layer, in its file's order."""
        if position not in self._layers:
            by_layer: dict[int, list[tuple[str, str]]] = {}
            for name in self.models[position].tensors:
                found = layer_of(name)
                if found is not None:
                    by_layer.setdefault(found[1], []).append((found[0], found[2]))
            self._layers[position] = by_layer
        tensors = self._layers[position].get(layer)
        if not tensors:
            have = len(self._layers[position])
            raise MergeError(f"config: {where}: {self.models[position].label} has no layer {layer} (it has "
                             f"{have} layers)")
        return tensors

    def _read(self, sources: list[tuple[int, str]]) -> tuple[tuple[int, str], tuple[str, ...], tuple[int, ...] | None]:
        """(base read, per-model sources, inputs_from) of one output tensor fed by `sources` = (position, tensor)."""
        count = len(self.request.models_to_merge)
        if self.passthrough:
            position, tensor = sources[0]
            names = tuple(tensor if i == position else "" for i in range(count))
            return (position, tensor), names, (position,)
        by_position = dict(sources)
        names = tuple(by_position[i] for i in range(count))
        base = (BASE, by_position[BASE]) if BASE in by_position and not self.base_as_input else sources[0]
        return base, names, None

    def placements(self, base_names: list[str]) -> list[Placement]:
        slices = self.config.slices
        outside = [name for name in base_names if layer_of(name) is None]
        pre = [name for name in outside if "embed" in name]
        post = [name for name in outside if "embed" not in name]
        out = [self._outside(name, 0) for name in pre]
        layer = 0
        for index, out_slice in enumerate(slices):
            for offset in range(out_slice.layers):
                where = f"slices[{index}]"
                feeding = [(self.position(s.model), s.layer_range[0] + offset) for s in out_slice.sources]
                first_position, first_layer = feeding[0]
                for prefix, rest in self.layer_tensors(first_position, first_layer, where):
                    sources = [(p, f"{prefix}.{source_layer}.{rest}") for p, source_layer in feeding]
                    base, names, inputs_from = self._read(sources)
                    out.append(Placement(f"{prefix}.{layer}.{rest}", base, names, inputs_from, index,
                                         layer_position(offset, out_slice.layers)))
                layer += 1
        out += [self._outside(name, len(slices) - 1) for name in post]
        return out

    def _outside(self, name: str, slice_index: int) -> Placement:
        sources = [(self.position(s.model), name) for s in self.config.slices[slice_index].sources]
        base, names, inputs_from = self._read(sources)
        return Placement(name, base, names, inputs_from, slice_index, 0.0)

    # --- the output config --------------------------------------------------------------------------------

    def layer_origins(self) -> list[tuple[int, int]]:
        """(position, layer) of the model config each output layer's per-layer settings come from: the first
        source of its slice."""
        return [(self.position(s.sources[0].model), s.sources[0].layer_range[0] + offset)
                for s in self.config.slices for offset in range(s.layers)]


def output_config(request: MergeRequest, base: SafetensorsModel, finetunes: list[SafetensorsModel],
                  config: dict[str, Any]) -> dict[str, Any]:
    """The base's config.json for a slices merge: the layer count the slices add up to, and every per-layer list
    (layer_types and others: a list whose key names layers and that holds one entry per layer) taken entry by
    entry from the model and layer each output layer comes from. Unchanged for other merges."""
    if request.config is None or not request.config.slices:
        return config
    layout = _SliceLayout(request, request.config, base, finetunes)
    origins = layout.layer_origins()
    key = next((k for k in _LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    if key is None:
        raise MergeError(f"config: slices need the layer count in the base's config.json (one of "
                         f"{', '.join(_LAYER_COUNT_KEYS)}), and {base.label} has none")
    configs = {position: _model_config(layout.models[position].directory) for position, _ in origins}
    old = config[key]
    for name, value in list(config.items()):
        if isinstance(value, list) and "layer" in name and len(value) == old:
            resized = []
            for position, layer in origins:
                theirs = configs[position].get(name)
                if not isinstance(theirs, list) or layer >= len(theirs):
                    raise MergeError(f"config: the output's {name} takes entry {layer} of "
                                     f"{layout.models[position].label}'s {name}, which has none")
                resized.append(theirs[layer])
            config[name] = resized
    config[key] = len(origins)
    return config


def _model_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return {}
