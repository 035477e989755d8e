"""Methods backed by GPTQModel (rtn, gptq, awq): it packs weights into the GPTQ or AWQ checkpoint
format that transformers, vLLM and SGLang load, so size on disk and kernels are the real ones."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, TextIO

import torch

from quantorder.config import CalibratedCfg
from quantorder.io import captured_output, read_json, write_json
from quantorder.layout import SHARD_SIZE
from quantorder.models import load_pretrained, model_config, torch_dtype
from quantorder.progress import Progress
from quantorder.quantize.base import Quantizer
from quantorder.quantize.fused import fuse_split_layers

BACKEND_LOG = "backend.log"


def set_gptqmodel_workers() -> None:
    """Give GPTQModel its CPU worker count (it refuses to start with fewer cores than it asks for)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 8))))


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


def kernel_config(qcfg: dict, device: torch.device, training: bool):
    """The transformers config that loads an int-packed checkpoint with the right GPTQModel kernel.

    CUDA: Marlin for inference (GPTQ's only where symmetric; 4 and 8 bits), else GPTQModel's Triton kernel for
    GPTQ (2, 4 and 8 bits; its torch kernel for 3) and its torch kernel for AWQ (whose Triton kernel is
    fp16-only); all train. CPU: the torch kernels. GPTQModel's own CUDA default (Machete) JIT-builds
    from downloaded sources and fails offline, so the choice is always explicit.
    """
    from transformers import AwqConfig, GPTQConfig

    marlin = device.type == "cuda" and not training and _marlin_bits(qcfg)
    if qcfg.get("quant_method") == "awq":
        return AwqConfig(bits=qcfg["bits"], backend="marlin" if marlin else "torch_awq")
    if marlin and qcfg.get("sym", True):
        return GPTQConfig(bits=qcfg["bits"], backend="marlin")
    return GPTQConfig(bits=qcfg["bits"], backend="triton" if device.type == "cuda" and _triton_bits(qcfg) else "torch")


def _layer_bits(qcfg: dict) -> set[int]:
    """Every bit width a checkpoint's layers have: its default and its per-module overrides."""
    return {qcfg["bits"], *(o.get("bits", qcfg["bits"]) for o in (qcfg.get("dynamic") or {}).values())}


def _marlin_bits(qcfg: dict) -> bool:
    """Whether every layer of a checkpoint has bits Marlin computes with (4 or 8)."""
    return _layer_bits(qcfg) <= {4, 8}


def _triton_bits(qcfg: dict) -> bool:
    """Whether every layer of a checkpoint has bits GPTQModel's Triton kernel computes with (2, 4 or 8)."""
    return _layer_bits(qcfg) <= {2, 4, 8}


def load_mixed(
    model_dir: Path, qcfg: dict, dtype: torch.dtype, device: torch.device, training: bool
) -> torch.nn.Module:
    """A checkpoint with per-module settings (`dynamic`), through GPTQModel's own loader: the one
    transformers uses (optimum's) builds every layer with the checkpoint's default bits. The same
    kernels as `kernel_config` picks; GPTQModel's torch kernel computes in half precision only, so
    a float32 request loads in bf16 there."""
    from gptqmodel import BACKEND, GPTQModel

    if device.type == "cuda" and not training and qcfg.get("sym", True) and _marlin_bits(qcfg):
        backend = BACKEND.MARLIN
    elif device.type == "cuda" and _triton_bits(qcfg):
        backend = BACKEND.TRITON
    else:
        backend, dtype = BACKEND.TORCH, torch.bfloat16 if dtype == torch.float32 else dtype
    with (
        tempfile.TemporaryDirectory() as scratch,
        captured_output(Path(scratch) / "load.log"),
        contextlib.chdir(scratch),
    ):
        return GPTQModel.load(str(model_dir.resolve()), backend=backend, device=str(device), dtype=dtype).model


class GPTQModelQuantizer(Quantizer):
    """Quantizes with GPTQModel; loads, dequantizes and accounts for its packed checkpoints."""

    backend = "gptqmodel"
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("gptq",)

    @abstractmethod
    def backend_config(self) -> Any:
        """The GPTQModel quantization config for `self.cfg`."""

    def unsupported_variants(self) -> dict[str, str]:
        if self.cfg.dynamic:
            return {
                "qat_merge_q": "quantization-aware training rounds every layer on one grid; per-module "
                "settings (algo.dynamic) have none to train against"
            }
        return {}

    def compute_dtype(self, dtype: str) -> str:
        """The dtype the model is loaded in for quantizing, given the model config's dtype."""
        return dtype

    def run(self, model: Any, calibration: list[dict[str, Any]] | None, out_dir: Path) -> dict:
        """Quantize the loaded GPTQModel model in place; return extra records (files go in `out_dir`)."""
        # calibration samples per forward pass: the method's setting where it calibrates (gptq, awq)
        batch_size = self.cfg.batch_size if isinstance(self.cfg, CalibratedCfg) else 1
        model.quantize(calibration, batch_size=batch_size)
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
            model.save(str(out_dir), max_shard_size=SHARD_SIZE)
        drop_scratch_path(out_dir)
        fused = fuse_split_layers(out_dir)
        return {
            "backend": self.backend,
            "backend_version": importlib.metadata.version("gptqmodel"),
            "dtype": dtype,
            **({"fused_after_saving": len(fused)} if fused else {}),
            **extra,
        }

    @classmethod
    def load(cls, model_dir: Path, dtype: str, device: torch.device, training: bool) -> torch.nn.Module:
        """Through transformers with GPTQModel's kernels, which compute with exactly the dequantized
        weights. AWQ checkpoints always load in half precision (bf16 for a float32 request)."""
        if device.type == "cpu":
            # GPTQModel's CPU kernel wraps dequantization in torch.compile, which recompiles for
            # every new input shape (stalls of 30 s and more); eager mode is faster here.
            torch._dynamo.config.disable = True
        set_gptqmodel_workers()
        qcfg = model_config(model_dir)["quantization_config"]
        torch_type = torch_dtype(dtype)
        if qcfg.get("quant_method") == "awq" and torch_type == torch.float32:
            # GPTQModel's AWQ kernels compute in half precision (float32 inputs silently in fp16,
            # which overflows on outlier activations): use bf16, the dtype AWQ quantized in.
            torch_type = torch.bfloat16
        if qcfg.get("dynamic"):
            return load_mixed(model_dir, qcfg, torch_type, device, training)
        config = kernel_config(qcfg, device, training)
        return load_pretrained(
            model_dir, dtype=torch_type, quantization_config=config, device_map={"": str(device)}
        ).to(device)

    @classmethod
    def is_quantized_linear(cls, module: torch.nn.Module) -> bool:
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear

        return isinstance(module, BaseQuantLinear)

    @classmethod
    def linear_weight(cls, module: torch.nn.Module) -> torch.Tensor:
        if hasattr(module, "dequantize_weight"):
            # The class's eager method: GPTQModel's torch-family kernels wrap `dequantize_weight` per
            # instance in torch.compile, which compiles anew for every layer (minutes for a 3.8B model).
            return type(module).dequantize_weight(module).t()  # GPTQModel returns (in_features, out_features)
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        return dequantize_gemm(module.qweight, module.qzeros, module.scales, module.bits, module.group_size).t()

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """GPTQModel's own grid (`Quantizer.find_params`: per-group min/max, integer zero point) and
        rounding, read back as its kernels do: whole steps times the float16 scale the checkpoint keeps."""
        from gptqmodel.quantization import RTNConfig
        from gptqmodel.quantization.quantizer import Quantizer as Grid

        rows, width = weight.shape
        grid = Grid(RTNConfig(bits=self.cfg.bits, group_size=self.cfg.group_size, sym=self.cfg.sym, desc_act=False))
        grid.configure(perchannel=True)
        groups = weight.float().reshape(-1, width if self.cfg.group_size == -1 else self.cfg.group_size)
        grid.find_params(groups, weight=True)
        scale = grid.scale.reshape(-1, 1)
        steps = torch.round(grid.quantize(groups) / scale)  # q - zero: whole numbers
        return (steps.half() * scale.half()).float().reshape(rows, width)

    @classmethod
    def stored_bits(cls, module: torch.nn.Module) -> int:
        stored = [getattr(module, n) for n in ("qweight", "qzeros", "scales") if getattr(module, n, None) is not None]
        return sum(t.numel() * t.element_size() * 8 for t in stored)
