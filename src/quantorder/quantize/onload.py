"""Methods whose library quantizes while transformers loads the float model (a `quantization_config`)
and rebuilds its quantized layers from the saved checkpoint the same way: bitsandbytes, torchao."""

from __future__ import annotations

import importlib.metadata
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch

from quantorder.layout import SHARD_SIZE
from quantorder.models import copy_tokenizer, load_pretrained, torch_dtype
from quantorder.quantize.base import Quantizer


class QuantizeOnLoad(Quantizer):
    """Subclasses give `backend_config`; their `backend` names the distribution whose version the
    checkpoint records."""

    @abstractmethod
    def backend_config(self) -> Any:
        """transformers' quantization config for these settings."""

    def adjust(self, model: torch.nn.Module, model_dir: Path, dtype: str) -> None:
        """Change the quantized model before it is saved (default: nothing)."""

    def quantize(self, model_dir: Path, calibration: list[dict[str, Any]] | None, out_dir: Path, dtype: str) -> dict:
        """Load `model_dir` quantized, on the GPU if there is one, and save it with its tokenizer."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_pretrained(
            model_dir, dtype=torch_dtype(dtype), quantization_config=self.backend_config(), device_map={"": str(device)}
        )
        self.adjust(model, model_dir, dtype)
        model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
        copy_tokenizer(model_dir, out_dir)
        return {"backend": self.backend, "backend_version": importlib.metadata.version(self.backend), "dtype": dtype}

    @classmethod
    def load(cls, model_dir: Path, dtype: str, device: torch.device, training: bool) -> torch.nn.Module:
        """Through transformers, which reads the quantization config and state saved with the weights."""
        return load_pretrained(model_dir, dtype=torch_dtype(dtype), device_map={"": str(device)})
