"""mergekit's sce (mergekit/merge_methods/sce.py, 0.1.5; SCE, arXiv:2408.07990) with a base model: Select the
elements whose task vectors vary most between the fine-tunes, Calculate each model's weight from its squared
magnitudes, Erase the values whose sign disagrees with the elected one. Per tensor, in the compute dtype as
mergekit's torch ops are (every operation rounded to it):

    v_i = model_i − base
    select_topk < 1: keep the int(nonzero · select_topk) elements of largest var_i(v_i) (population variance over
        the models; none at select_topk <= 0 or when no element varies), zero the others in every v_i
    w_i = mean(v_i²) / Σ_j mean(v_j²)   (1 / N each where that sum is below 1e-6)
    sign = +1 where Σ_i v_i >= 0, else −1;  agree_i = sign(v_i) == sign
    merged = base + Σ_i [agree_i] w_i v_i / max(Σ_i [agree_i] w_i, 1e-6)

Per-tensor statistics, one tensor at a time: with select_topk < 1, one pass computes every element's variance
(float64, rounded to the dtype, as torch's var) and torch's CPU top-k picks the kept elements as its libstdc++
selection does, ties at the boundary included (sce_kernels.top_k); memory: one tensor's variances and element
order, 8 bytes an element, as scratch arrays (scratch.py: a file-backed mapping in TMPDIR for a large tensor, which
a memory limit can write back), dropped once the selection is known. What is kept of it is a window selection as
ties' (gta_kernels.window_selection: the range of kept variances, and the sorted indices of the kept elements
of a variance the boundary splits); each range's keep flags come from its elements' variances, computed again
from the inputs it reads (sce_kernels.selection_mask), so no per-element flags are stored and nothing is
written at random places of a tensor-sized array. A second pass sums each model's squared (selected) task
vector in torch's CPU order (torch_reductions; mergekit's mean is that float32 sum over the element count,
rounded once). `int8_mask` is accepted and changes nothing in the result (mergekit holds its
masks in int8 instead of the compute dtype to save memory).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from modelmerge_engine.dtype_codes import F32
from modelmerge_engine.methods import gta_kernels as gk
from modelmerge_engine.methods import register
from modelmerge_engine.methods import sce_kernels as sk
from modelmerge_engine.methods.base import Method
from modelmerge_engine.methods.rows import to_kernels
from modelmerge_engine.methods.torch_reductions import (
    host_raw,
    rounded,
    row_sum,
    sum_begin,
    sum_finish,
    sum_rows,
    task_vectors,
)
from modelmerge_engine.progress import Step
from modelmerge_engine.scratch import scratch_arrays

SEGMENT = 1 << 20  # values of each input per statistics step (a multiple of torch_reductions' row of vectors)
WEIGHT_FLOOR = 1e-6  # mergekit: weights of task vectors whose squares sum to less are equal; divisor clamp
NOTHING = (np.int64(1), np.int64(0), np.int64(-1), np.int64(-1), np.empty(0, np.int64))  # a selection keeping none


@dataclass
class TensorState:
    selection: tuple | None  # select_topk < 1: the kept variances (gta_kernels.window_selection); None: every element
    weights: np.ndarray  # float32 values of each model's weight, rounded to the compute dtype
    floor: np.float32  # 1e-6 rounded to the compute dtype


@register
class Sce(Method):
    name = "sce"
    parameters = ("select_topk", "int8_mask")

    def __init__(self, merge):
        super().__init__(merge)
        self._states: OrderedDict[str, TensorState] = OrderedDict()
        self._keep_states = merge.pool.workers + 4  # tensors whose ranges can still be in flight

    def _selects(self, name: str) -> bool:
        return 0.0 < float(self.value("select_topk", tensor=name)) < 1.0

    def planned_steps(self, merge_work: int, statistics_work: int) -> list[Step]:
        """The merge step holds the per-tensor statistics: each pass reads the base and every model once."""
        inputs = len(self.merge.finetunes) + 1
        statistics = sum(plan.numel * inputs * (1 + int(self._selects(plan.name)))
                         for plan in self.merge.plans if plan.merged)
        return [Step("merge", merge_work + statistics_work + statistics)]

    def _host(self, name: str, start: int, stop: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The base's and the fine-tunes' values on a range in the compute dtype's storage (host_raw: no widened
        copies; task_vectors and selection_mask widen a value at a time)."""
        merge = self.merge
        return (host_raw(merge, merge.base, name, start, stop),
                tuple(host_raw(merge, model, name, start, stop) for model in merge.finetunes))

    def _task_vectors(self, base: np.ndarray, models: tuple[np.ndarray, ...]) -> np.ndarray:
        vectors = np.empty((len(models), base.shape[0]), np.float32)
        task_vectors(self.merge.dtype.code, base, models, vectors)
        self.merge.progress.advance((len(models) + 1) * base.shape[0])
        return vectors

    def prepare_tensor(self, plan) -> None:
        name = plan.name
        if name in self._states:
            return
        code, numel, count = self.merge.dtype.code, plan.numel, len(self.merge.finetunes)
        select_topk = float(self.value("select_topk", tensor=name))
        selection = None
        if select_topk <= 0.0:
            selection = NOTHING
        elif select_topk < 1.0:
            selection = self._select(name, numel, select_topk)
        packed = code != F32
        accumulators = [sum_begin(numel, packed) for _ in range(count)]
        tails = [np.empty(0, np.float32)] * count
        squares = np.empty(0, np.float32)
        keep = np.empty(0, np.bool_)
        for offset in range(0, numel, SEGMENT):
            stop = min(offset + SEGMENT, numel)
            base, models = self._host(name, offset, stop)
            vectors = self._task_vectors(base, models)
            if squares.shape[0] != stop - offset:
                squares = np.empty(stop - offset, np.float32)
            if selection is not None:
                keep = np.empty(stop - offset, np.bool_)
                sk.selection_mask(code, base, models, offset, selection, keep)
            for i, (acc, state) in enumerate(accumulators):
                sk.masked_squares(vectors, i, keep, selection is not None, code, squares)
                tails[i] = squares[sum_rows(squares, acc, state):].copy()
        means = [np.float32(sum_finish(tails[i], *accumulators[i])) / np.float32(max(numel, 1))
                 for i in range(count)]
        means = rounded(np.array(means, np.float32), code)
        total = rounded(np.array([row_sum(means, packed)], np.float32), code)[0]
        if abs(float(total)) < WEIGHT_FLOOR:
            weights = rounded(np.full(count, np.float32(1.0) / np.float32(count), np.float32), code)
        else:
            weights = rounded(means / total, code)
        self._states[name] = TensorState(selection, weights, rounded(np.array([WEIGHT_FLOOR], np.float32), code)[0])
        while len(self._states) > self._keep_states:
            self._states.popitem(last=False)

    def _select(self, name: str, numel: int, select_topk: float) -> tuple:
        """The elements of the int(nonzero · select_topk) largest variances, as torch.topk picks them, as a window
        selection (gta_kernels.window_selection). The variances and their order are scratch arrays (scratch.py)
        dropped on return."""
        code = self.merge.dtype.code
        variances, order = scratch_arrays([(np.float32, numel), (np.int32, numel)],
                                          purpose=f"the top-k selection of tensor {name}")
        for offset in range(0, numel, SEGMENT):
            stop = min(offset + SEGMENT, numel)
            sk.variances(self._task_vectors(*self._host(name, offset, stop)), code, variances[offset:stop])
        nonzero = int(np.count_nonzero(variances))
        k = int(np.float32(nonzero) * np.float32(select_topk))  # torch: an int64 count times a float is float32
        if k <= 0:
            return NOTHING
        sk.top_k(variances, order, k)
        return gk.window_selection(variances.view(np.uint32), order, 0, k)

    def tensor_state(self, plan) -> TensorState:
        return self._states[plan.name]

    def inputs(self, name, start, base, raws, models):
        """The fine-tunes, then the range's keep flags (empty: every element), from its elements' variances:
        of the inputs read for the range on the host, else their host values read again."""
        selection = self._states[name].selection
        flags = np.empty(0, np.bool_)
        if selection is not None:
            stop = start + base.shape[0]
            values = (base, raws) if isinstance(base, np.ndarray) else self._host(name, start, stop)
            flags = np.empty(stop - start, np.bool_)
            sk.selection_mask(self.merge.dtype.code, *values, start, selection, flags)
        return [*raws, to_kernels(flags, self.merge.kernels)]

    def combine_cpu(self, kernels, base, inputs, state: TensorState):
        out = kernels.empty(base)
        sk.sce(kernels.code, base, tuple(inputs[:-1]), inputs[-1], state.weights, state.floor, out)
        return out

    def combine_torch(self, kernels, base, inputs, state: TensorState):
        torch = kernels.torch
        from modelmerge_engine.torch_kernels import rounder

        rnd = rounder(base.dtype)
        b = base.to(torch.float32)
        *raws, keep = inputs
        vectors = [rnd(raw.to(torch.float32) - b) for raw in raws]
        if keep.numel():
            vectors = [torch.where(keep, v, 0.0) for v in vectors]
        total = torch.zeros_like(b)
        for v in vectors:
            total += v
        positive = rnd(total) >= 0
        merged = torch.zeros_like(b)
        divisor = torch.zeros_like(b)
        for v, weight in zip(vectors, state.weights, strict=True):
            agree = torch.where(positive, v > 0, v < 0)
            merged += torch.where(agree, rnd(v * float(weight)), 0.0)
            divisor += torch.where(agree, float(weight), 0.0)
        divisor = rnd(divisor).clamp(min=float(state.floor))
        return (b + rnd(rnd(merged) / divisor)).to(kernels.tdtype)
