"""torchao: INT8 weights with dynamic INT8 activations, and FP8 (float8 e4m3) weights, no calibration.

Sample configs (conf/algo/int8-dynamic.yaml, fp8.yaml):
    name: int8-dynamic   # symmetric int8 weights, one scale per row; int8 activations per row at run time
    ---
    name: fp8
    activations: none    # or dynamic: float8 activations too (GPUs of compute capability 8.9+)
transformers quantizes while loading (`TorchAoConfig`) and saves torchao's tensors (codes and
scales) in safetensors with the torchao config in config.json; every stage loads them back the
same way, and PEFT trains LoRA on them (its `TorchaoLoraLinear`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from quantorder.errors import UserError
from quantorder.quantize.onload import QuantizeOnLoad

FP8_MATMUL_CAPABILITY = (8, 9)  # Ada / Hopper and later: float8 tensor-core matmuls


class TorchAOQuantizer(QuantizeOnLoad):
    """Settings: config.TorchAOCfg."""

    backend = "torchao"
    requires_calibration = False
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("torchao",)

    def check(self, model: torch.nn.Module | None = None) -> None:
        """Any layer width works (one scale per row); refuse float8 activations where no float8
        matmul exists (torchao asserts deep inside)."""
        if self.cfg.activations == "dynamic" and self.name == "fp8" and not fp8_matmul_available():
            raise UserError(
                "algo.activations=dynamic: float8 activations need a CUDA GPU of compute capability 8.9+ "
                "(H100, H200, L4, RTX 40xx); use algo.activations=none here"
            )

    def ao_config(self, activations: str | None = None) -> Any:
        """torchao's config for these settings (`activations` overrides the configured mode)."""
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )

        dynamic = (activations or self.cfg.activations) == "dynamic"
        if self.name == "int8-dynamic":
            return Int8DynamicActivationInt8WeightConfig(granularity=PerRow()) if dynamic else Int8WeightOnlyConfig()
        if dynamic:
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        return Float8WeightOnlyConfig()

    def backend_config(self) -> Any:
        from transformers import TorchAoConfig

        return TorchAoConfig(self.ao_config())  # the output head and embeddings stay in the model's dtype

    def quantize(self, model_dir: Path, calibration: list[dict[str, Any]] | None, out_dir: Path, dtype: str) -> dict:
        self.check()
        return {
            **super().quantize(model_dir, calibration, out_dir, dtype),
            "torchao_config": type(self.ao_config()).__name__,
        }

    @classmethod
    def load(cls, model_dir: Path, dtype: str, device: torch.device, training: bool) -> torch.nn.Module:
        """As saved. For training (PEFT wraps the layers) the same weights compute without activation
        quantization: float8 matmuls have no backward, and rounding the activations would zero the
        gradient that reaches the adapters of earlier layers."""
        model = super().load(model_dir, dtype, device, training)
        if training:
            for module in model.modules():
                if cls.is_quantized_linear(module):
                    module.weight.act_quant_kwargs = None
        return model

    @classmethod
    def is_quantized_linear(cls, module: torch.nn.Module) -> bool:
        from torchao.utils import TorchAOBaseTensor

        return isinstance(module, torch.nn.Linear) and isinstance(module.weight, TorchAOBaseTensor)

    @classmethod
    def linear_weight(cls, module: torch.nn.Module) -> torch.Tensor:
        return module.weight.dequantize()

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """torchao's own quantization of a layer holding `weight` (weight-only: the weight's grid is
        the same with dynamic activations), read back in float32."""
        from torchao.quantization import quantize_

        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
        layer.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        quantize_(layer, self.ao_config(activations="none"))
        return layer.weight.dequantize().float()

    @classmethod
    def stored_bits(cls, module: torch.nn.Module) -> int:
        """Codes, scales and zero points: the tensors torchao's weight holds (and the checkpoint saves)."""
        weight = module.weight
        names = [*weight.tensor_data_names, *getattr(weight, "optional_tensor_data_names", [])]
        tensors = [t for t in (getattr(weight, n) for n in names) if t is not None]
        return sum(t.numel() * t.element_size() * 8 for t in tensors)


def fp8_matmul_available() -> bool:
    """Whether this machine has a GPU with float8 matmuls."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP8_MATMUL_CAPABILITY


class Int8DynamicQuantizer(TorchAOQuantizer):
    name = "int8-dynamic"


class FP8Quantizer(TorchAOQuantizer):
    name = "fp8"
