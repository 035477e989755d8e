"""Quantization methods by short name, and loading any model dir the pipeline makes.

Adding a method: its settings class in config.py (`ALGO_CONFIGS`), a module here with a
`Quantizer` subclass, one line in `ALGORITHMS`, and `conf/algo/<name>.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantorder.config import AlgoCfg
from quantorder.models import load_float, model_config
from quantorder.quantize.ao import FP8Quantizer, Int8DynamicQuantizer
from quantorder.quantize.awq import AWQQuantizer
from quantorder.quantize.base import Quantizer
from quantorder.quantize.bnb import FP4Quantizer, Int8Quantizer, NF4Quantizer
from quantorder.quantize.gguf import GGUFQuantizer
from quantorder.quantize.gptq import GPTQQuantizer
from quantorder.quantize.rtn import RTNQuantizer

ALGORITHMS: dict[str, type[Quantizer]] = {
    q.name: q
    for q in (
        RTNQuantizer,
        GPTQQuantizer,
        AWQQuantizer,
        NF4Quantizer,
        FP4Quantizer,
        Int8Quantizer,
        GGUFQuantizer,
        Int8DynamicQuantizer,
        FP8Quantizer,
    )
}


def get_quantizer(cfg: AlgoCfg) -> Quantizer:
    """The quantizer for a validated algo config."""
    return ALGORITHMS[cfg.name](cfg)


def method_of(model_dir: str | Path) -> type[Quantizer] | None:
    """The method that loads the checkpoint in `model_dir` (by its `quant_method`); None if it is float."""
    qcfg = model_config(model_dir).get("quantization_config")
    if qcfg is None:
        return None
    fmt = qcfg.get("quant_method")
    for method in ALGORITHMS.values():
        if fmt in method.checkpoint_formats:
            return method
    raise ValueError(f"model dir {model_dir}: no registered method loads quant_method={fmt!r}")


def load_model(model_dir: str | Path, dtype: str, device: torch.device, training: bool = False) -> torch.nn.Module:
    """Load a float or quantized model dir on `device`: quantized ones with their method's kernels
    for evaluation, or (`training`) kernels that pass gradients to a LoRA adapter."""
    method = method_of(model_dir)
    if method is None:
        return load_float(model_dir, dtype, device)
    return method.load(Path(model_dir), dtype, device, training)


def load_dequantized(model_dir: str | Path, dtype: str, device: torch.device) -> torch.nn.Module:
    """A model dir as a plain float model: quantized layers replaced by their dequantized weights."""
    method = method_of(model_dir)
    # the training kernels keep the checkpoint's layout, which dequantization reads (Marlin repacks it)
    model = load_model(model_dir, dtype, device, training=True)
    return method.dequantize(model, getattr(torch, dtype)) if method else model


def bits_per_weight(model_dir: str | Path, model: torch.nn.Module) -> float | None:
    """Stored bits per weight of a loaded model's quantized linear layers; None for a float dir."""
    method = method_of(model_dir)
    return method.bits_per_weight(model) if method else None
