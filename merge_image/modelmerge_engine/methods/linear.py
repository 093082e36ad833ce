"""mergekit's linear (mergekit/merge_methods/linear.py, 0.1.5): Σ weight_i · model_i in float32, divided by
Σ weight_i with `normalize`, rounded once to the compute dtype. The models are models_to_merge (each with its
model_parameters weight); the base model supplies only the tensors that are not merged, as in every method
here. mergekit adds each product into a float32 accumulator with `addcmul_`, which torch's CPU kernels compile to a
fused multiply-add (one rounding per model; CUDA's too); the compiled kernel calls llvm.fma, the torch path
`addcmul_`, so both agree with mergekit bit for bit."""

from __future__ import annotations

import numpy as np

from modelmerge_engine.errors import MergeError
from modelmerge_engine.methods import register
from modelmerge_engine.methods.base import Method


@register
class Linear(Method):
    name = "linear"
    parameters = ("model_parameters", "normalize")
    reads_base = False  # a config without base_model has its first model as the base: read once, as an input

    def reads_inputs_once(self) -> bool:
        return True

    def prepare(self) -> None:
        """Every tensor's weights before anything is written, so weights summing to 0 under normalize (a
        division by zero; mergekit writes NaN and inf) fail the merge naming the tensor."""
        self._states = {plan.name: self._state(plan) for plan in self.merge.plans if plan.merged}

    def tensor_state(self, plan) -> tuple[np.ndarray, np.float32, bool]:
        return self._states[plan.name]

    def _state(self, plan) -> tuple[np.ndarray, np.float32, bool]:
        """This tensor's weights (float32, as mergekit's weight tensor), their in-order float32 sum and normalize:
        per tensor, since a mergekit config may vary them by tensor and layer (Method.value)."""
        weights = np.array([self.value("weight", tensor=plan.name, model=i) for i in range(len(self.merge.finetunes))],
                           dtype=np.float32)
        normalize = bool(self.value("normalize", tensor=plan.name))
        denominator = np.float32(0.0)
        for weight in weights:  # `weight.sum()` over a handful of float32 values: in order
            denominator = np.float32(denominator + weight)
        if normalize and denominator == 0:
            raise MergeError(f"weight: the weights of tensor {plan.name} sum to 0 ({', '.join(map(str, weights))}), "
                             "and linear with normalize divides by their sum; change a weight or set normalize false")
        return weights, denominator if normalize else np.float32(1.0), normalize

    def combine_cpu(self, kernels, base, inputs, state):
        weights, denominator, normalize = state
        out = kernels.empty(inputs[0])
        kernels.k.linear(kernels.code, tuple(inputs), weights, denominator, out, normalize=normalize)
        return out

    def combine_torch(self, kernels, base, inputs, state):
        weights, denominator, normalize = state
        merged = kernels.k.linear(inputs, [float(w) for w in weights], float(denominator), normalize=normalize)
        return merged.to(kernels.tdtype)
