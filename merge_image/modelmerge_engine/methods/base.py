"""What every merge method provides to the streaming engine (engine.StreamingMerge)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from modelmerge.contract import ModelParameters
from modelmerge_engine.progress import Step

if TYPE_CHECKING:
    from modelmerge.contract import MergeRequest
    from modelmerge_engine.engine import StreamingMerge, TensorPlan
    from modelmerge_engine.kernels import CpuKernels, TorchKernels


class Method:
    """One merge method bound to one merge. Subclasses set `name` and `parameters` and implement the combine
    step of one range twice, side by side: `combine_cpu` with the compiled kernels (cpu_kernels.py, where numba's
    on-disk cache needs them) and `combine_torch` with the torch ones (torch_kernels.py; CUDA for use_gpu).
    Both get the base's and the fine-tunes' values of one range in the compute dtype and return the merged
    range; they must agree bit for bit."""

    name: ClassVar[str]
    # The request fields the method reads besides contract.COMMON_PARAMETERS, in the catalogue's order.
    parameters: ClassVar[tuple[str, ...]]

    def __init__(self, merge: StreamingMerge):
        self.merge = merge
        self.request = merge.request

    def value(self, name: str, *, tensor: str, model: int | None = None) -> Any:
        """The value of parameter `name` for tensor `tensor` (and, for a per-model parameter of
        model_parameters, for models_to_merge[model]). Methods read parameters that mergekit lets vary by
        tensor (its conditional `filter` parameters and layer gradients) through here, never from the request
        directly, so a mergekit config's per-tensor values reach every method: with a config (request.config),
        its value for this tensor as mergekit resolves it (the model's own, its slice's, then the global
        parameters; filters on the tensor's name, gradients over its slice's layers), else the request's."""
        config = self.request.config
        if config is not None:
            plan = self.merge.plan(tensor)
            ref = source = None
            if model is not None:  # per-model filters match the model's own tensor name (slices renumber layers)
                ref, source = self.request.models_to_merge[model], plan.sources[model] if plan.sources else tensor
            found = config.resolve(name, tensor=tensor, t=plan.t, slice_index=plan.slice_index, model=ref,
                                   model_tensor=source)
            if found is not None:
                return found
        if model is not None:
            entries = self.request.model_parameters
            if entries is None:
                return ModelParameters.model_fields[name].get_default(call_default_factory=True)
            return getattr(entries[model], name)
        return getattr(self.request, name)

    @classmethod
    def per_tensor_statistics(cls, request: MergeRequest) -> list[str]:
        """What in `request` takes a statistic over each whole tensor (then fused MoE experts are grouped as
        merging-eval sees them), named for error messages."""
        return []

    # --- planning -------------------------------------------------------------------------------------

    def statistics_work(self, group_numel: int) -> int:
        """Element work of the per-tensor statistics of one tensor (or fused parameter) of this size."""
        return 0

    def planned_steps(self, merge_work: int, statistics_work: int) -> list[Step]:
        """The steps of the whole merge with their work; per-tensor statistics run inside the merge step."""
        return [Step("merge", merge_work + statistics_work)]

    # Whether the merge reads the base's values of a merged tensor (its combine step or `inputs` uses them); else
    # `base` is None there, and the base model is read only for the tensors that are not merged.
    reads_base = True

    # Whether the engine computes the next tensors' states (tensor_state) on threads of their own while the current
    # tensor merges: for methods whose per-tensor statistics read the inputs in passes of a few segments and keep a
    # few values per tensor or row, no prepare_tensor, and state a thread-safe tensor_state (several run at once).
    statistics_ahead = False

    def reads_inputs_once(self) -> bool:
        """Whether the merge step is the only read of the inputs and reads each range once, in order (no
        statistics passes, no per-tensor statistics, no method reading inputs on its own): then the engine reads
        inputs that are not in the page cache around it (direct_read.py), since nothing reads them again."""
        return False

    # --- passes -----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Passes over all inputs before the merge step (global statistics)."""

    def prepare_tensor(self, plan: TensorPlan) -> None:
        """Statistics of one tensor the inputs need before they are read (masks' thresholds)."""

    def inputs(self, name: str, start: int, base, raws: list, models: list[int]) -> list:
        """The fine-tunes' values as the combine step sees them (models[i] is the position of raws[i])."""
        return raws

    def tensor_state(self, plan: TensorPlan) -> Any:
        """What the combine step of every range of `plan` needs (a per-tensor threshold), or None."""
        return None

    def combiner(self) -> Method:
        """The method whose combine step produces the output (mask_merging's apply method; else itself)."""
        return self

    # --- the combine step of one range --------------------------------------------------------------------

    def combine_cpu(self, kernels: CpuKernels, base: np.ndarray, inputs: list[np.ndarray], state: Any) -> np.ndarray:
        raise NotImplementedError(f"{self.name} has no compiled CPU combine step")

    def combine_torch(self, kernels: TorchKernels, base, inputs: list, state: Any):
        raise NotImplementedError(f"{self.name} has no torch combine step")
