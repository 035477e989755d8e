"""The quantizer interface, and its implementation on GPTQModel shared by the int-packed algorithms."""

from __future__ import annotations

import contextlib
import importlib.metadata
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, TextIO

import torch

from quantorder.config import AlgoCfg
from quantorder.errors import UserError
from quantorder.io import captured_output, read_json, write_json
from quantorder.models import set_gptqmodel_workers
from quantorder.progress import Progress
from quantorder.quantize.fused import fuse_split_layers

BACKEND_LOG = "backend.log"


@contextlib.contextmanager
def layer_progress(model: torch.nn.Module, desc: str, out: TextIO) -> Iterator[None]:
    """Report, on `out`, how many decoder layers the backend has finished: it quantizes them in
    order, and a layer's first forward pass means the ones before it are done."""
    layers = next(m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n.endswith("layers"))
    bar = Progress(len(layers), desc, unit="layers", out=out)
    started: set[int] = set()

    def on_forward(index: int):
        def hook(*_) -> None:
            if index not in started:
                started.add(index)
                bar.update(len(started) - 1)

        return hook

    handles = [layer.register_forward_pre_hook(on_forward(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        bar.update(len(layers))
        bar.close()


def drop_scratch_path(out_dir: Path) -> None:
    """Blank the temp dir GPTQModel offloaded layers to, which it records in the checkpoint's configs:
    a scratch path is no property of the model, and it gave every run of one quantization another hash."""
    for path in (out_dir / "config.json", out_dir / "quantize_config.json"):
        config = read_json(path)
        meta = config.get("quantization_config", config).get("meta") or {}
        if meta.get("offload_to_disk_path") is not None:
            meta["offload_to_disk_path"] = None
            write_json(path, config)


class Quantizer(ABC):
    """Quantizes a float model dir into a self-describing dir that transformers can load.

    Lifecycle: `Quantizer(cfg)` -> `check(model)` (shape constraints, before any slow work)
    -> `quantize(model_dir, calibration, out_dir)`. Subclasses set `name`, `config_class` and
    `requires_calibration`, and register in `quantize/__init__.py`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AlgoCfg]]
    requires_calibration: ClassVar[bool]
    backend: ClassVar[str]

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

    @abstractmethod
    def quantize(self, model_dir: Path, calibration: list[dict[str, Any]] | None, out_dir: Path, dtype: str) -> dict:
        """Write the quantized model into `out_dir`; return a record of backend and settings."""


class GPTQModelQuantizer(Quantizer):
    """Quantizers backed by GPTQModel: it packs weights into the GPTQ (or AWQ) checkpoint format
    that transformers, vLLM and SGLang load, so size on disk and kernels are the real ones."""

    backend = "gptqmodel"

    @abstractmethod
    def backend_config(self) -> Any:
        """The GPTQModel quantization config for `self.cfg`."""

    def compute_dtype(self, dtype: str) -> str:
        """The dtype the model is loaded in for quantizing, given the model config's dtype."""
        return dtype

    def run(self, model: Any, calibration: list[dict[str, Any]] | None, out_dir: Path) -> dict:
        """Quantize the loaded GPTQModel model in place; return extra records (files go in `out_dir`)."""
        model.quantize(calibration)
        return {}

    def quantize(self, model_dir: Path, calibration: list[dict[str, Any]] | None, out_dir: Path, dtype: str) -> dict:
        set_gptqmodel_workers()
        model_dir, out_dir = model_dir.resolve(), out_dir.resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        # GPTQModel logs every layer with progress bars; keep its log beside the weights instead
        # of in the stage output, and run it in a scratch dir because it writes ./logs/.
        with (
            captured_output(out_dir / BACKEND_LOG) as console,
            tempfile.TemporaryDirectory() as scratch,
            contextlib.chdir(scratch),
        ):
            from gptqmodel import GPTQModel

            dtype = self.compute_dtype(dtype)
            model = GPTQModel.load(str(model_dir), self.backend_config(), dtype=getattr(torch, dtype))
            self.check(model.model)
            with layer_progress(model.model, f"[quantize] {self.name}", console):
                extra = self.run(model, calibration, out_dir)
            model.save(str(out_dir))
        drop_scratch_path(out_dir)
        fused = fuse_split_layers(out_dir)
        return {
            "backend": self.backend,
            "backend_version": importlib.metadata.version("gptqmodel"),
            "dtype": dtype,
            **({"fused_after_saving": len(fused)} if fused else {}),
            **extra,
        }
