"""mergekit's generalized task arithmetic family (mergekit/merge_methods/generalized_task_arithmetic.py and
sparsify.py, 0.1.5): each fine-tune's task vector (model − base) is sparsified, weighted, optionally reduced to
the values that agree with an elected sign (TIES consensus), summed, divided by the weights' sum with
`normalize`, scaled by `lambda` and added to the base. The variants are configuration:

| method | sparsification | consensus |
| --- | --- | --- |
| mergekit_task_arithmetic | none | none |
| ties | magnitude (top `density` of each tensor) | sum |
| dare_linear / dare_ties | random (DARE: keep with probability `density`) | none / sum |
| breadcrumbs / breadcrumbs_ties | magnitude outliers (drop the `gamma` largest and the smallest) | none / sum |
| della_linear / della | della (keep with probability rising with the magnitude's rank in its row) | none / sum |

`mergekit_task_arithmetic` is mergekit's `task_arithmetic` (per-model weights, normalize, lambda) under another
name: the flat request's `task_arithmetic` is merging-eval's; a mergekit config's `merge_method: task_arithmetic`
selects this one (mergekit_config.MERGEKIT_METHOD_NAMES). Every parameter is read per tensor through
`Method.value`, so a config's filters and layer gradients apply (weight, density, gamma, epsilon, normalize,
rescale, lambda); unset per-model values take mergekit's defaults (MODEL_DEFAULTS), unset normalize and rescale
the method's (the contract's catalogue).

How the results equal mergekit's, element by element: the arithmetic rounds to the compute dtype where
mergekit's tensors in that dtype round (gta_kernels._combine). The top-k selections (ties, breadcrumbs) are
torch's CPU `argsort`, which is not stable: which of several equal magnitudes at the boundary are kept is what
libstdc++'s introsort leaves there, and the engine runs that algorithm (gta_kernels.sort_window) on the
tensor's magnitudes, only as far as the boundaries need. Random masks (dare_*, della*) are seeded and drawn per
element from (seed, model, tensor, index), identical on every kernel set and range split; with density 1
nothing is dropped and the results equal mergekit's exactly.

Deliberate differences (mergekit bugs fixed): DARE keeps with probability `density` exactly (mergekit rounds it
to the dtype of bfloat16 tensors: 0.3 → 0.30078125) and della computes its probabilities from exact ranks in
float32 (mergekit rounds ranks above 256 in bfloat16); della on a one-column row keeps with probability
`density` (mergekit divides 0 by 0 and fails); mergekit's unseeded masks are seeded; the L1 norms of `rescale`
are exact sums rounded once (mergekit sums in float32 in an order that depends on its threads, which can move
the scale by one ulp in float32), and a float16 norm too large for float16 is kept in float32 (mergekit's
becomes inf and the tensor NaN). `int8_mask` is accepted and changes nothing in the result: mergekit holds its
sign masks in int8 instead of the compute dtype to save memory, and the engine holds no masks.

Per-tensor statistics, one tensor at a time, the models in parallel: the selection window of each model (ties,
breadcrumbs) and, with `rescale`, the L1 norms of each model's task vector before and after its mask. A selection
holds its model's magnitudes and element order (8 bytes an element) while it is made, as scratch arrays
(scratch.py: a file-backed mapping in TMPDIR for a large tensor, which a memory limit can write back), so at most
one per worker thread. Masks are computed on the host
by compiled kernels for both kernel sets (the torch set gets them as tensors), so they are the same bits.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from modelmerge.contract import DELLA_EPSILON
from modelmerge_engine.errors import MergeError
from modelmerge_engine.kernels import CpuKernels
from modelmerge_engine.layout import BASE
from modelmerge_engine.methods import gta_kernels as gk
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method
from modelmerge_engine.progress import Step
from modelmerge_engine.scratch import scratch_arrays

MAGNITUDE, RANDOM, OUTLIERS, DELLA = "magnitude", "random", "magnitude_outliers", "della_magprune"
RESCALE_EPSILON = 1e-7  # mergekit's rescaled_masked_tensor: norms below this leave the masked tensor unscaled
MAX_SELECTION_ELEMENTS = 2**31 - 1  # element order held as int32
# mergekit's defaults of the per-model parameters that model_parameters leaves unset (None)
MODEL_DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": DELLA_EPSILON}


@dataclass
class ModelState:
    """One model's sparsification of one tensor."""

    sparsified: bool  # density < 1 (mergekit returns the task vector untouched at density >= 1)
    density: float
    selection: tuple | None = None  # ties/breadcrumbs: gta_kernels.window_selection's result
    random_key: int = 0  # dare/della: the model's stream for this tensor
    epsilon: float = 0.0
    scale: float = 1.0  # rescale: before / after, rounded as mergekit's; 1.0: unscaled


@dataclass
class TensorState:
    models: list[ModelState]
    weights: np.ndarray  # float32 values of the weights rounded to the compute dtype (mergekit's `weights`)
    divisor: float  # without consensus: Σ weights (|Σ| < 1e-8 → 1)
    columns: int  # della: elements per row
    normalize: bool
    lam: float  # lambda


def _round_to(value: float, dtype_name: str) -> float:
    """A Python float rounded as torch rounds it into a tensor of this dtype (through float32)."""
    single = np.float32(value)
    if dtype_name == "F32":
        return float(single)
    if dtype_name == "F16":
        return float(np.float16(single))
    bits = np.array([single], dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return float(rounded.astype(np.uint32).view(np.float32)[0])


class GeneralizedTaskArithmetic(Method):
    """The family; subclasses choose `sparsification` and `consensus`."""

    sparsification: str | None = None
    consensus: int = gk.NO_CONSENSUS

    def __init__(self, merge):
        super().__init__(merge)
        self.host = merge.kernels if isinstance(merge.kernels, CpuKernels) else CpuKernels(merge.dtype)
        self._states: OrderedDict[str, TensorState] = OrderedDict()
        self._keep_states = merge.pool.workers + 4  # tensors whose ranges can still be in flight

    # --- planning -----------------------------------------------------------------------------------------

    def planned_steps(self, merge_work: int, statistics_work: int) -> list[Step]:
        """The merge step holds the per-tensor statistics: each pass reads one model's tensor once."""
        statistics = sum(plan.numel * self._statistics_passes(plan.name, i) for plan in self.merge.plans
                         if plan.merged for i in range(len(self.merge.finetunes)))
        return [Step("merge", merge_work + statistics_work + statistics)]

    def reads_inputs_once(self) -> bool:
        """No statistics passes (no selection by magnitude, no rescale): the merge step is the only read."""
        return not any(self._statistics_passes(plan.name, i) for plan in self.merge.plans if plan.merged
                       for i in range(len(self.merge.finetunes)))

    def _statistics_passes(self, name: str, index: int) -> int:
        """Passes over model `index`'s tensor `name` before it is merged: the selection's, the L1 norms'."""
        if not self.sparsification or not 0.0 < self._model_value("density", name, index) < 1.0:
            return 0
        return int(self.sparsification in (MAGNITUDE, OUTLIERS)) + int(bool(self.value("rescale", tensor=name)))

    # --- per-tensor statistics ------------------------------------------------------------------------------

    def prepare_tensor(self, plan) -> None:
        if plan.name in self._states:
            return
        name = plan.name
        dtype_name = self.merge.dtype.name
        models = []
        weights = []
        masked = []  # (index, state) of the models whose masks keep anything
        for i in range(len(self.merge.finetunes)):
            weights.append(_round_to(self._model_value("weight", name, i), dtype_name))
            density = self._model_value("density", name, i) if self.sparsification else 1.0
            state = ModelState(sparsified=self.sparsification is not None and density < 1.0, density=density)
            if state.sparsified and density > 0.0:  # density <= 0: mergekit's all zeros (no norm to match)
                self._check_model(plan, i, state)
                masked.append((i, state))
            models.append(state)
        if self.sparsification in (MAGNITUDE, OUTLIERS):
            self._each_model(masked, lambda item: self._select(plan, *item))
        if masked and self.value("rescale", tensor=name):
            self._each_model(masked, lambda item: self._rescale(plan, *item))
        divisor = float(np.float32(0.0) + np.float32(sum(np.float32(w) for w in weights)))
        divisor = _round_to(divisor, dtype_name)
        self._states[name] = TensorState(models, np.array(weights, dtype=np.float32),
                                         1.0 if abs(divisor) < _round_to(1e-8, dtype_name) else divisor,
                                         _columns(plan), bool(self.value("normalize", tensor=name)),
                                         float(self.value("lambda", tensor=name)))
        while len(self._states) > self._keep_states:
            self._states.popitem(last=False)

    def _each_model(self, items: list[tuple[int, ModelState]], statistic) -> None:
        """Runs `statistic((index, state))` for each model, the models in parallel (each reads its tensor through
        in order, so at most one model's working arrays per worker are held at once)."""
        for done in self.merge.pool.map(statistic, items):
            self.merge.progress.advance(done)

    def _model_value(self, name: str, tensor: str, model: int) -> float:
        value = self.value(name, tensor=tensor, model=model)
        return MODEL_DEFAULTS[name] if value is None else float(value)

    def _check_model(self, plan, index: int, state: ModelState) -> None:
        """Reads model `index`'s parameters that its masks need and checks them."""
        name = plan.name
        if self.sparsification in (RANDOM, DELLA):
            state.random_key = self._stream_key(index, name)
        if self.sparsification == DELLA:
            state.epsilon = self._model_value("epsilon", name, index)
            if not (state.density - state.epsilon > 0.0 and state.density + state.epsilon < 1.0):
                raise MergeError(f"model_parameters[{index}].epsilon: della needs density - epsilon > 0 and "
                                 f"density + epsilon < 1 (tensor {name}: density {state.density}, epsilon "
                                 f"{state.epsilon})")
            if len(plan.shape) > 2:
                raise MergeError(f"merge_method {self.name}: tensor {name} has {len(plan.shape)} dimensions; "
                                 "della ranks magnitudes in rows of 1- and 2-dimensional tensors only "
                                 "(exclude it with exclude_param_names_regex)")
        if self.sparsification in (MAGNITUDE, OUTLIERS) and plan.numel > MAX_SELECTION_ELEMENTS:
            raise MergeError(f"merge_method {self.name}: tensor {name} has {plan.numel} elements; the magnitude "
                             f"selection handles at most {MAX_SELECTION_ELEMENTS}")

    def _stream_key(self, index: int, name: str) -> int:
        key = f"mergekit-gta/{self.request.seed}/{index}/{name}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # fits an int64

    def _window(self, plan, index: int, density: float) -> tuple[int, int, bool]:
        """Which positions of the sorted magnitudes are kept: (start, stop, descending)."""
        numel = plan.numel
        if self.sparsification == MAGNITUDE:
            return 0, max(1, int(density * numel)), True
        gamma = self._model_value("gamma", plan.name, index)
        target = int(density * numel)
        bottom = max(0, numel - target - int(gamma * numel))
        return bottom, bottom + target, False

    def _select(self, plan, index: int, state: ModelState) -> int:
        """Model `index`'s magnitude selection of the tensor into `state`; returns the elements read. Its keys
        and element order (8 bytes an element) are scratch arrays (scratch.py), dropped when it returns."""
        numel = plan.numel
        keys, order = scratch_arrays([(np.int32, numel), (np.int32, numel)],
                                     purpose=f"the magnitude selection of tensor {plan.name}", per_thread=True)
        for start, stop in self.merge.ranges(numel):
            base, raw = self._host(plan.name, start, stop, index)
            gk.magnitude_keys(self.host.code, base, raw, keys[start:stop])
        gk.fill_positions(order)
        start, stop, descending = self._window(plan, index, state.density)
        gk.sort_window(keys, order, start, stop, descending)
        state.selection = gk.window_selection(keys, order, start, stop)
        return numel

    def _rescale(self, plan, index: int, state: ModelState) -> int:
        """mergekit's rescale (l1) into `state.scale`: |task vector|₁ / |kept part|₁, each norm and the ratio
        rounded to the dtype mergekit computes them in (float32 for float16 random masks on CPU; else the compute
        dtype). Returns the elements read."""
        before = np.zeros(256, dtype=np.int64)
        after = np.zeros(256, dtype=np.int64)
        for start, stop in self._mask_ranges(plan):
            base, raw = self._host(plan.name, start, stop, index)
            keep = self._keep(start, base, raw, state, _columns(plan))
            gk.l1_buckets(self.host.code, base, raw, keep, before, after)
        work = self.merge.dtype.name
        if work == "F16" and self.sparsification in (RANDOM, DELLA):
            work = "F32"  # mergekit: bernoulli is not implemented for float16 on CPU, so it works in float32
        norms = [_round_to(gk.exact_sum(buckets), work) for buckets in (before, after)]
        if not all(np.isfinite(norms)):
            norms = [_round_to(gk.exact_sum(buckets), "F32") for buckets in (before, after)]
        if norms[0] >= RESCALE_EPSILON and norms[1] >= RESCALE_EPSILON:
            state.scale = _round_to(float(np.float32(norms[0]) / np.float32(norms[1])), work)
        return plan.numel

    def _mask_ranges(self, plan) -> list[tuple[int, int]]:
        """Ranges for a pass computing masks: della's in whole rows."""
        if self.sparsification != DELLA:
            return self.merge.ranges(plan.numel)
        columns = _columns(plan)
        rows = max(1, self.merge.chunk // columns)
        step = rows * columns
        return [(start, min(start + step, plan.numel)) for start in range(0, plan.numel, step)] or [(0, 0)]

    # --- one range ----------------------------------------------------------------------------------------

    def _host(self, name: str, start: int, stop: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The base's and model `index`'s values on a range, in the compute dtype, on the host."""
        merge, prepare = self.merge, self.host.prepare
        moved = merge.moved_range(BASE, name, start, stop)  # tokenizer_source: rows moved to the output's tokens
        if moved is not None:
            return moved, merge.moved_range(index, name, start, stop)
        model = merge.finetunes[index]
        return (prepare(merge.base.read(name, start, stop), merge.base.tensors[name].dtype),
                prepare(model.read(name, start, stop), model.tensors[name].dtype))

    def _keep(self, start: int, base, raw, state: ModelState, columns: int) -> np.ndarray:
        """Which elements of the range starting at `start` model `state` keeps; base/raw: the range on the host
        (della: whole rows of `columns` elements; random masks read no values)."""
        keep = np.empty(base.shape[0], dtype=np.bool_)
        if state.density <= 0.0:
            keep.fill(False)
        elif state.selection is not None:
            gk.magnitude_mask(self.host.code, base, raw, start, state.selection, keep)
        elif self.sparsification == RANDOM:
            gk.random_mask(state.random_key, start, state.density, keep)
        else:
            gk.ranked_mask(self.host.code, base, raw, start, columns, state.random_key, state.density,
                           state.epsilon, keep)
        return keep

    def inputs(self, name, start, base, raws, models):
        """The fine-tunes' values, each with its keep mask for the range (None: nothing dropped)."""
        state = self._states[name]
        stop = start + base.shape[0]
        items = []
        for i, raw in zip(models, raws, strict=True):
            model = state.models[i]
            keep = None
            if model.sparsified and self.sparsification == DELLA:
                columns = state.columns
                row_start, row_stop = start // columns * columns, -(-stop // columns) * columns
                keep = self._keep(row_start, *self._host(name, row_start, row_stop, i), model, columns)
                keep = keep[start - row_start:stop - row_start]
            elif model.sparsified:
                on_host = isinstance(base, np.ndarray) or self.sparsification == RANDOM
                values = (base, raw) if on_host else self._host(name, start, stop, i)
                keep = self._keep(start, *values, model, state.columns)
            items.append((raw, keep))
        return items

    def tensor_state(self, plan) -> TensorState:
        return self._states[plan.name]

    # --- the combine step -----------------------------------------------------------------------------------

    def combine_cpu(self, kernels, base, inputs, state: TensorState):
        contributions = np.empty((len(inputs), base.shape[0]), dtype=np.float32)
        for row, ((raw, keep), model, weight) in enumerate(zip(inputs, state.models, state.weights, strict=True)):
            gk.products(kernels.code, base, raw, keep, model.scale, weight, contributions[row])
        out = kernels.empty(base)
        gk.combine(kernels.code, base, contributions, state.weights, state.divisor, state.lam, out,
                   consensus=self.consensus, normalize=state.normalize)
        return out

    def combine_torch(self, kernels, base, inputs, state: TensorState):
        torch = kernels.torch
        from modelmerge_engine.torch_kernels import rounder

        rnd = rounder(base.dtype)
        b = base.to(torch.float32)
        products = []
        for (raw, keep), model, weight in zip(inputs, state.models, state.weights, strict=True):
            d = rnd(raw.to(torch.float32) - b)
            if keep is not None:
                d = d * torch.from_numpy(keep).to(device=b.device, dtype=torch.float32)
            d = rnd(d * model.scale)
            products.append(rnd(d * float(weight)))
        total = torch.zeros_like(b)
        for p in products:
            total += p
        if self.consensus == gk.NO_CONSENSUS:
            mixed, divisor = rnd(total), state.divisor
        else:
            positive = rnd(total) >= 0
            mixed = torch.zeros_like(b)
            divisor = torch.zeros_like(b)
            for p, weight in zip(products, state.weights, strict=True):
                agree = torch.where(positive, p > 0, p < 0)
                mixed += torch.where(agree, p, 0.0)
                divisor += torch.where(agree, float(weight), 0.0)
            mixed, divisor = rnd(mixed), rnd(divisor)
            divisor = torch.where(divisor == 0, 1.0, divisor)
        if state.normalize:
            mixed = rnd(mixed / divisor)
        if state.lam != 1.0:
            mixed = rnd(mixed * float(np.float32(state.lam)))
        return (b + mixed).to(kernels.tdtype)


def _columns(plan) -> int:
    """Elements per row of della's ranking: a 2-D tensor's rows; anything else is one row (mergekit unsqueezes
    1-D tensors)."""
    return plan.shape[-1] if len(plan.shape) == 2 else max(plan.numel, 1)


def _variant(name: str, parameters: tuple[str, ...], sparsification: str | None = None,
             consensus: int = gk.NO_CONSENSUS) -> type[GeneralizedTaskArithmetic]:
    """One registered method of the family: its name, the request fields it reads, its configuration."""
    return register(type(name, (GeneralizedTaskArithmetic,), {
        "name": name, "parameters": ("model_parameters", "normalize", "lambda", *parameters),
        "sparsification": sparsification, "consensus": consensus, "__module__": __name__,
        "__doc__": f"mergekit's {name} (see the module docstring)."}))


_variant("mergekit_task_arithmetic", ())
_variant("ties", ("rescale", "int8_mask"), MAGNITUDE, gk.CONSENSUS_SUM)
_variant("dare_ties", ("rescale", "int8_mask", "seed"), RANDOM, gk.CONSENSUS_SUM)
_variant("dare_linear", ("rescale", "seed"), RANDOM)
_variant("breadcrumbs", ("rescale",), OUTLIERS)
_variant("breadcrumbs_ties", ("rescale", "int8_mask"), OUTLIERS, gk.CONSENSUS_SUM)
_variant("della", ("rescale", "int8_mask", "seed"), DELLA, gk.CONSENSUS_SUM)
_variant("della_linear", ("rescale", "seed"), DELLA)
