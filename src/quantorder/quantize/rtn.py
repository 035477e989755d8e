"""Round-to-nearest: per-group asymmetric (or symmetric) integer weights, no calibration.

Sample config (conf/algo/rtn.yaml):
    name: rtn
    bits: 4          # 2, 3, 4 or 8
    group_size: 128
    sym: false       # asymmetric: a zero point per group
Each weight becomes scale * (q - zero) with q in [0, 2^bits - 1]; scale and zero are chosen per
group from its min and max, so every weight moves by at most half a step. GPTQModel packs the
result in the GPTQ checkpoint format, the same one GPTQ and AWQ runs load through.
"""

from __future__ import annotations

from typing import Any

from quantorder.quantize.gptqmodel_backend import GPTQModelQuantizer


class RTNQuantizer(GPTQModelQuantizer):
    """Settings: config.RTNCfg."""

    name = "rtn"
    requires_calibration = False

    def backend_config(self) -> Any:
        from gptqmodel.quantization import RTNConfig

        c = self.cfg
        return RTNConfig(bits=c.bits, group_size=c.group_size, sym=c.sym, desc_act=False, dynamic=c.dynamic or None)
