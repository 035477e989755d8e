"""Quantization algorithms by short name. Adding one: a module with a config dataclass and a
`Quantizer` subclass, one line in `ALGORITHMS`, and `conf/algo/<name>.yaml`."""

from __future__ import annotations

from quantorder.config import AlgoCfg
from quantorder.quantize.awq import AWQQuantizer
from quantorder.quantize.base import Quantizer
from quantorder.quantize.gptq import GPTQQuantizer
from quantorder.quantize.rtn import RTNQuantizer

ALGORITHMS: dict[str, type[Quantizer]] = {q.name: q for q in (RTNQuantizer, GPTQQuantizer, AWQQuantizer)}


def algo_config_class(name: object, problems: list[str]) -> type[AlgoCfg] | None:
    """The config class of algorithm `name`; appends a problem naming the choices if unknown."""
    if name not in ALGORITHMS:
        problems.append(f"algo.name={name!r}: unknown algorithm (allowed: {', '.join(sorted(ALGORITHMS))})")
        return None
    return ALGORITHMS[name].config_class


def get_quantizer(cfg: AlgoCfg) -> Quantizer:
    """The quantizer for a validated algo config."""
    return ALGORITHMS[cfg.name](cfg)
