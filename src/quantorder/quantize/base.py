"""The quantization-method interface: everything format-specific lives behind it.

A method quantizes and saves; loads its checkpoints for evaluation and for training (kernel
choice); reads back the float weight of a quantized layer (merging, update survival); rounds a
single weight onto its grid (quantization-aware training); accounts for stored bits; and says
which variants it cannot make, and why.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch

from quantorder.config import AlgoCfg
from quantorder.errors import UserError
from quantorder.models import float_model_from_state


class Quantizer(ABC):
    """One quantization method: `Quantizer(cfg)` -> `check(model)` (shape constraints, before any
    slow work) -> `quantize(model_dir, calibration, out_dir, dtype)`; then, for the dirs it wrote,
    `load`, `is_quantized_linear` / `linear_weight`, `dequantize` and `stored_bits`.

    Subclasses set `name` (the `algo.name` it serves, whose settings class is in config.py),
    `requires_calibration` and `checkpoint_formats` (the `quant_method` values of the
    checkpoints it loads), and register in `quantize/__init__.py`.
    """

    name: ClassVar[str]
    requires_calibration: ClassVar[bool]
    backend: ClassVar[str]
    checkpoint_formats: ClassVar[tuple[str, ...]]
    serving_runtime: ClassVar[str | None] = None  # a runtime of the format's own that serves its checkpoints

    def __init__(self, cfg: AlgoCfg) -> None:
        self.cfg = cfg

    @staticmethod
    def quantized_linears(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> Iterator[tuple[str, Any]]:
        """(name, layer) of the nn.Linear layers the backends quantize (all but the output head)."""
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith(skip):
                yield name, module

    def check(self, model: torch.nn.Module) -> None:
        """Raise a UserError if `group_size` does not divide the input width of a linear layer."""
        g = self.cfg.group_size
        if g == -1:
            return
        for name, module in self.quantized_linears(model):
            if module.in_features % g:
                raise UserError(
                    f"algo.group_size={g} does not divide the input width {module.in_features} of {name}; "
                    f"use a group size that divides every input width (or -1)"
                )

    def unsupported_variants(self) -> dict[str, str]:
        """Variant -> why this method cannot make it (the report shows "n/a: reason"); none by default."""
        return {}

    @abstractmethod
    def quantize(self, model_dir: Path, calibration: list[dict[str, Any]] | None, out_dir: Path, dtype: str) -> dict:
        """Write the quantized model into `out_dir`; return a record of backend and settings."""

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path, dtype: str, device: torch.device, training: bool) -> torch.nn.Module:
        """A transformers model of a checkpoint this method wrote, with the kernels for `device`:
        the fastest for evaluation, or ones that pass gradients through for training (q_ft)."""

    @classmethod
    @abstractmethod
    def is_quantized_linear(cls, module: torch.nn.Module) -> bool:
        """Whether `module` is one of this method's quantized linear layers."""

    @classmethod
    @abstractmethod
    def linear_weight(cls, module: torch.nn.Module) -> torch.Tensor:
        """The (out, in) float weight a quantized linear layer computes with."""

    @abstractmethod
    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """A float (out, in) weight quantized alone on this method's grid and read back in float32:
        what `linear_weight` returns for it once quantized. GPTQ and AWQ choose their rounding from
        calibration data; alone, a weight gets their grid with round-to-nearest."""

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` as the quantized model computes with it, for quantization-aware training: the
        round trip forward, the identity backward (straight-through estimator)."""
        return weight + (self.round_trip(weight.detach()).to(weight.dtype) - weight.detach())

    @classmethod
    @abstractmethod
    def stored_bits(cls, module: torch.nn.Module) -> int:
        """Bits a quantized linear layer stores for its weight (codes, scales, zero points)."""

    @classmethod
    def dequantize(cls, model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        """A plain float transformers model whose linear layers hold the dequantized weights."""
        state: dict[str, torch.Tensor] = {}
        quantized = []
        for name, module in model.named_modules():
            if cls.is_quantized_linear(module):
                state[f"{name}.weight"] = cls.linear_weight(module).to(dtype).contiguous()
                if getattr(module, "bias", None) is not None:
                    state[f"{name}.bias"] = module.bias.to(dtype)
                quantized.append(f"{name}.")
        for name, tensor in model.state_dict().items():
            if not name.startswith(tuple(quantized)):
                state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return float_model_from_state(model, state, dtype)

    @classmethod
    def serve(
        cls, model_dir: Path, adapter_dir: Path | None = None, n_ctx: int = 512, n_seq: int = 1, threads: int = 0
    ) -> AbstractContextManager[Any]:
        """A checkpoint (plus a PEFT adapter) in `serving_runtime`, for `n_seq` sequences of up to
        `n_ctx` tokens: a session with `logits(tokens)` and `greedy(prompts, new_tokens)`."""
        raise NotImplementedError(f"{cls.name} checkpoints have no serving runtime of their own")

    @classmethod
    def bits_per_weight(cls, model: torch.nn.Module) -> float | None:
        """Stored bits per weight of the quantized linear layers, or None if there are none."""
        layers = [m for m in model.modules() if cls.is_quantized_linear(m)]
        weights = sum(m.in_features * m.out_features for m in layers)
        return sum(cls.stored_bits(m) for m in layers) / weights if weights else None
