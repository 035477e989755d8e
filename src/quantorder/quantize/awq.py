"""AWQ: activation-aware weight quantization. Before rounding, each input channel of a group of
linear layers is scaled by s (and the previous op by 1/s), with s = x_mean^a / w_mean^(1-a)
searched over a grid of a for the lowest output error on the calibration inputs, so the channels
that carry large activations are rounded more finely. Then the clipping range of each group is
searched too.

Sample config (conf/algo/awq.yaml):
    name: awq
    bits: 4               # the AWQ (GEMM) checkpoint format packs 4 bits
    group_size: 128
    sym: false            # false: a zero point per group (AWQ's "zero_point: true")
    duo_scaling: true     # search s from activation and weight magnitudes (false: activations only)
    clip: true            # also search each group's clipping range
    chunked_search: true  # stream the search's activations in chunks: less memory, same result
    batch_size: 1         # calibration samples per forward pass (GPTQModel's default)
Lifecycle: GPTQModel runs the calibration samples layer by layer, searches the scales on a
20-point grid (fixed by the backend), folds them into the previous op, quantizes, and packs the
AWQ checkpoint format. The searched scales are saved in `awq/scales.safetensors`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from quantorder.errors import UserError
from quantorder.quantize.gptqmodel_backend import GPTQModelQuantizer

SCALES_FILE = Path("awq") / "scales.safetensors"
CLIP_ROWS = 64  # GPTQModel's clip search walks output rows in blocks of 64 (or 256)


@contextlib.contextmanager
def awq_search(duo_scaling: bool, clip: bool) -> Iterator[list[tuple[str, tuple[str, ...], torch.Tensor, float]]]:
    """Set the search switches GPTQModel keeps on its AWQ processor (not in its config), and
    collect every scale it picks as (previous op, scaled layers, scales, output error)."""
    from gptqmodel.looper.awq_processor import AWQProcessor
    from gptqmodel.quantization.awq.utils.module import get_op_name

    searched: list[tuple[str, tuple[str, ...], torch.Tensor, float]] = []
    init, search = AWQProcessor.__init__, AWQProcessor._search_best_scale

    def configured_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self.duo_scaling, self.apply_clip = duo_scaling, clip

    def recorded_search(self, module, *args, **kwargs):
        result = prev_op, layers, scales, loss = search(self, module, *args, **kwargs)
        prefix = get_op_name(self.model, module) + "."
        searched.append(
            (prefix + prev_op, tuple(prefix + n for n in layers), scales.detach().float().cpu(), float(loss))
        )
        return result

    AWQProcessor.__init__, AWQProcessor._search_best_scale = configured_init, recorded_search
    try:
        yield searched
    finally:
        AWQProcessor.__init__, AWQProcessor._search_best_scale = init, search


def save_scales(searched: list[tuple[str, tuple[str, ...], torch.Tensor, float]], model_dir: Path) -> dict:
    """Write the searched scales into `model_dir` (one tensor per previous op, the scaled layers in
    the metadata); return a summary for the provenance record."""
    from safetensors.torch import save_file

    path = model_dir / SCALES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {prev: scales.contiguous() for prev, _, scales, _ in searched}
    groups = {prev: {"layers": list(layers), "loss": loss} for prev, layers, _, loss in searched}
    save_file(tensors, str(path), metadata={"groups": json.dumps(groups)})
    spread = [(s.max() / s.min()).item() for s in tensors.values()]
    return {"file": str(SCALES_FILE), "groups": len(tensors), "max_spread": max(spread)}


def load_scales(model_dir: Path) -> dict[str, tuple[list[str], torch.Tensor]]:
    """The scales AWQ searched for a quantized dir: previous op -> (scaled layers, scales)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / SCALES_FILE), "pt") as f:
        groups = json.loads(f.metadata()["groups"])
        return {prev: (g["layers"], f.get_tensor(prev)) for prev, g in groups.items()}


class AWQQuantizer(GPTQModelQuantizer):
    """Settings: config.AWQCfg."""

    name = "awq"
    requires_calibration = True
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("awq",)

    def check(self, model: torch.nn.Module) -> None:
        super().check(model)
        if not self.cfg.clip:
            return
        for name, module in self.quantized_linears(model):
            if module.out_features % CLIP_ROWS:
                raise UserError(
                    f"algo.clip=true needs output widths divisible by {CLIP_ROWS}, but {name} has "
                    f"{module.out_features}; set algo.clip=false for this model"
                )

    def compute_dtype(self, dtype: str) -> str:
        return "bfloat16" if dtype == "float32" else dtype  # AWQ's search runs in half precision

    def backend_config(self) -> Any:
        from gptqmodel.quantization import AWQConfig

        c = self.cfg
        return AWQConfig(
            bits=c.bits,
            group_size=c.group_size,
            sym=c.sym,
            scale_search_chunked_activations=c.chunked_search,
            dynamic=c.dynamic or None,
        )

    def run(self, model: Any, calibration: list[dict[str, Any]] | None, out_dir: Path) -> dict:
        with awq_search(self.cfg.duo_scaling, self.cfg.clip) as searched:
            super().run(model, calibration, out_dir)
        return {"searched_scales": save_scales(searched, out_dir)}
