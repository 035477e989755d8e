"""Quantization-aware LoRA: the `qat` adapter trains on the float base while the linear weights are
fake-quantized on the experiment's algorithm grid (`Quantizer.fake_quantize`), then is merged into
the float base and quantized with the algorithm (variant `qat_merge_q`).

`qat.weight` picks what is fake-quantized:
- `merged`: each adapted layer's merged weight W + scaling * B @ A, so the function trained is the
  function deployed after merging and quantizing (exactly, for round-to-nearest methods). LoRA
  dropout has no place in one merged weight: the adapter trains without it.
- `base`: the frozen base weight W alone, as torchao's and torchtune's QAT + LoRA recipes do. W is
  frozen, so it is rounded once; the adapter then trains on the method's grid of W (with RTN and
  bitsandbytes, the base `q_ft` trains on).
Linear layers without an adapter are rounded once in both cases: the deployed model quantizes them too.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from quantorder.quantize.base import Quantizer


class MergedWeightGrid(torch.nn.Module):
    """Parametrization of an adapted layer's base weight: FQ(W + delta) - delta. With the LoRA branch
    (scaling * B @ A x) added back, the layer computes FQ(W + delta) x, and gradients reach A and B
    through the branch as if FQ were the identity (straight-through)."""

    def __init__(self, delta, quantizer: Quantizer) -> None:
        super().__init__()
        self.delta = delta  # the LoRA layer's get_delta_weight (a bound method, not a submodule)
        self.quantizer = quantizer

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta("default").to(weight.dtype)
        return self.quantizer.fake_quantize(weight + delta) - delta


def apply_qat(model: torch.nn.Module, quantizer: Quantizer, weight: str) -> int:
    """Fake-quantize the linear layers of a PEFT LoRA `model` on `quantizer`'s grid; the number of
    adapted layers whose `weight` ("merged" or "base") trains against the grid."""
    from peft.tuners.lora import Linear as LoraLinear

    adapted = [m for m in model.modules() if isinstance(m, LoraLinear)]
    inner = {id(m) for layer in adapted for m in (*layer.lora_A.values(), *layer.lora_B.values())}
    bases = {id(layer.get_base_layer()): layer for layer in adapted}
    for _, linear in quantizer.quantized_linears(model):
        if id(linear) in inner:
            continue  # the adapter's own A and B stay float
        layer = bases.get(id(linear))
        if layer is None or weight == "base":
            with torch.no_grad():
                linear.weight.copy_(quantizer.round_trip(linear.weight).to(linear.weight.dtype))
        else:
            layer.lora_dropout["default"] = torch.nn.Identity()
            parametrize.register_parametrization(linear, "weight", MergedWeightGrid(layer.get_delta_weight, quantizer))
    return len(adapted)
