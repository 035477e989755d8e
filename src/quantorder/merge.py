"""Fold a LoRA adapter into its base: float merge, after dequantizing a quantized base."""

from __future__ import annotations

from pathlib import Path

import torch

from quantorder.qlora import load_adapter
from quantorder.quantize import load_dequantized


def merge_adapter(base_dir: Path, adapter_dir: Path, dtype: str, device: torch.device):
    """Load base (dequantizing it if quantized), apply the adapter, merge: a plain float model."""
    return load_adapter(load_dequantized(base_dir, dtype, device), adapter_dir).merge_and_unload()
