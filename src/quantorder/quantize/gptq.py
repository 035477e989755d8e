"""GPTQ: column-by-column rounding that corrects the remaining weights with the inverse Hessian of
the layer's calibration inputs, minimising ||WX - QX|| rather than ||W - Q||.

Sample config (conf/algo/gptq.yaml):
    name: gptq
    bits: 4              # 2, 3, 4 or 8
    group_size: 128
    sym: false
    desc_act: false      # act-order: quantize columns by descending Hessian diagonal
    damp_percent: 0.01   # diagonal dampening, as a fraction of the mean diagonal
    static_groups: false
    true_sequential: true
Lifecycle: GPTQModel runs the calibration samples layer by layer, accumulates each linear
layer's Hessian, quantizes it, and packs the result in the GPTQ checkpoint format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from quantorder.config import AlgoCfg, raise_problems, require
from quantorder.quantize.base import GPTQModelQuantizer


@dataclass
class GPTQCfg(AlgoCfg):
    """GPTQ settings."""

    desc_act: bool = False  # act-order: better accuracy, slower kernels on some backends
    damp_percent: float = 0.01  # higher: more stable, less exact
    static_groups: bool = False  # with desc_act: fix group boundaries before reordering
    true_sequential: bool = True  # quantize sub-layers in order, feeding quantized outputs forward

    allowed_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        p: list[str] = []
        require(p, 0 < self.damp_percent < 1, f"algo.damp_percent={self.damp_percent}: must be in (0, 1)")
        raise_problems(p)


class GPTQQuantizer(GPTQModelQuantizer):
    name = "gptq"
    config_class = GPTQCfg
    requires_calibration = True

    def backend_config(self) -> Any:
        from gptqmodel.quantization import GPTQConfig

        c = self.cfg
        return GPTQConfig(
            bits=c.bits,
            group_size=c.group_size,
            sym=c.sym,
            desc_act=c.desc_act,
            damp_percent=c.damp_percent,
            static_groups=c.static_groups,
            true_sequential=c.true_sequential,
        )
