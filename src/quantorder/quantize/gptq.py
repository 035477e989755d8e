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
    batch_size: 16       # calibration samples per forward pass (GPTQModel's default: 1, slower)
Lifecycle: GPTQModel runs the calibration samples layer by layer, accumulates each linear
layer's Hessian, quantizes it, and packs the result in the GPTQ checkpoint format.
"""

from __future__ import annotations

from typing import Any

from quantorder.quantize.gptqmodel_backend import GPTQModelQuantizer


class GPTQQuantizer(GPTQModelQuantizer):
    """Settings: config.GPTQCfg."""

    name = "gptq"
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
            dynamic=c.dynamic or None,
        )
