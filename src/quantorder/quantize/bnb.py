"""bitsandbytes: NF4 and FP4 (QLoRA's 4-bit formats) and LLM.int8(), no calibration.

Sample configs (conf/algo/nf4.yaml, fp4.yaml, int8-bnb.yaml):
    name: nf4            # or fp4
    group_size: 64       # weights per absmax scale (bitsandbytes' block size)
    double_quant: true   # the scales quantized too
    compute_dtype: bfloat16
    ---
    name: int8-bnb
    threshold: 6.0       # activation outlier threshold of LLM.int8()
transformers quantizes while loading (`BitsAndBytesConfig`) and saves the packed weights with their
quantization state; every stage loads them back the same way. A block size other than
bitsandbytes' default (64) is applied by quantizing each layer again from its float weight.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import torch

from quantorder.config import BnB4bitCfg
from quantorder.models import load_float, torch_dtype
from quantorder.quantize.onload import QuantizeOnLoad

DEFAULT_BLOCK_SIZE = 64  # what transformers' BitsAndBytesConfig quantizes with


class BitsAndBytesQuantizer(QuantizeOnLoad):
    """Settings: config.BnB4bitCfg (nf4, fp4) or config.BnBInt8Cfg (int8-bnb)."""

    backend = "bitsandbytes"
    requires_calibration = False
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("bitsandbytes",)

    def check(self, model: torch.nn.Module) -> None:
        """Nothing to check: blocks run over the flattened weight, so any layer width works."""

    def backend_config(self) -> Any:
        from transformers import BitsAndBytesConfig

        if isinstance(self.cfg, BnB4bitCfg):
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.cfg.name,
                bnb_4bit_use_double_quant=self.cfg.double_quant,
                bnb_4bit_compute_dtype=torch_dtype(self.cfg.compute_dtype),
            )
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.cfg.threshold)

    def adjust(self, model: torch.nn.Module, model_dir: Path, dtype: str) -> None:
        if isinstance(self.cfg, BnB4bitCfg) and self.cfg.group_size != DEFAULT_BLOCK_SIZE:
            self._requantize_blocks(model, load_float(model_dir, dtype, torch.device("cpu")))

    def _requantize_blocks(self, model: torch.nn.Module, float_model: torch.nn.Module) -> None:
        """Quantize every 4-bit layer again from its float weight with the configured block size."""
        import bitsandbytes as bnb

        floats = dict(float_model.named_modules())
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = floats[name].weight.data.to(module.weight.device)
                module.weight = bnb.nn.Params4bit(
                    weight,
                    requires_grad=False,
                    blocksize=self.cfg.group_size,
                    compress_statistics=self.cfg.double_quant,
                    quant_type=self.cfg.name,
                    module=module,
                ).to(module.weight.device)

    @classmethod
    def is_quantized_linear(cls, module: torch.nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)

    @classmethod
    def linear_weight(cls, module: torch.nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        if isinstance(module, bnb.nn.Linear4bit):
            return F.dequantize_4bit(*_saved_layout(module))
        return _int8_weight(*_int8_layout(module))

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' own quantize and dequantize functions, with this config's block size and
        double quantization (4-bit), or LLM.int8()'s per-row absmax codes."""
        import bitsandbytes.functional as F

        if isinstance(self.cfg, BnB4bitCfg):
            packed, state = F.quantize_4bit(
                weight,
                blocksize=self.cfg.group_size,
                compress_statistics=self.cfg.double_quant,
                quant_type=self.cfg.name,
            )
            return F.dequantize_4bit(packed, state).float()
        codes, scales, _ = F.int8_vectorwise_quant(weight.to(torch.float16))
        return _int8_weight(codes, scales)

    @classmethod
    def stored_bits(cls, module: torch.nn.Module) -> int:
        import bitsandbytes as bnb

        if isinstance(module, bnb.nn.Linear4bit):  # what the checkpoint holds: codes, scales, code books, layout
            codes, state = _saved_layout(module)
            tensors = [codes, *(t for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor))]
        else:
            tensors = list(_int8_layout(module))
        return sum(t.numel() * t.element_size() * 8 for t in tensors)


def _int8_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weight of LLM.int8() codes: each row's absmax scale spread over -127..127."""
    return codes.float() * scales.float()[:, None] / 127


def _int8_layout(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An LLM.int8() layer's int8 codes and per-row absmax scales. Its first forward pass on a GPU
    moves them from the weight into the layer's matmul state (`Linear8bitLt.init_8bit_state`)."""
    weight = module.weight
    codes = weight.CB if weight.CB is not None else weight.data
    return codes, weight.SCB if weight.SCB is not None else module.state.SCB


def _saved_layout(module: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """A 4-bit layer's codes and quantization state as saved: on a CPU with AVX512-BF16, bitsandbytes
    repacks them for its kernel at the first inference forward pass."""
    import bitsandbytes.functional as F

    codes, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        codes, state = F._convert_weight_packed_for_cpu_inverse(codes, copy.copy(state))
    return codes, state


class NF4Quantizer(BitsAndBytesQuantizer):
    name = "nf4"


class FP4Quantizer(BitsAndBytesQuantizer):
    name = "fp4"


class Int8Quantizer(BitsAndBytesQuantizer):
    name = "int8-bnb"
