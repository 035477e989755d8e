"""A single weight's round trip on each method's grid (what quantization-aware training computes
with) is exactly what the method's own saved checkpoint holds for it; the gradient passes straight."""

from __future__ import annotations

import pytest
import torch

from quantorder.config import BnB4bitCfg, BnBInt8Cfg, RTNCfg
from quantorder.quantize import get_quantizer, load_model

CPU = torch.device("cpu")
CONFIGS = {
    "rtn": RTNCfg(name="rtn", group_size=32),
    "rtn-sym": RTNCfg(name="rtn", group_size=32, sym=True),
    "rtn-8bit-rows": RTNCfg(name="rtn", bits=8, group_size=-1),
    "rtn-3bit": RTNCfg(name="rtn", bits=3, group_size=32),
    "rtn-2bit": RTNCfg(name="rtn", bits=2, group_size=32, sym=True),
    "nf4": BnB4bitCfg(name="nf4", group_size=64, compute_dtype="float32"),
    "fp4": BnB4bitCfg(name="fp4", group_size=128, double_quant=False, compute_dtype="float32"),
    "int8-bnb": BnBInt8Cfg(name="int8-bnb"),
}


def _layers(model_dir, quantizer) -> dict[str, torch.nn.Module]:
    model = load_model(model_dir, "float32", CPU)
    return {n: m for n, m in model.named_modules() if quantizer.is_quantized_linear(m)}


def _floats(tiny_dir) -> dict[str, torch.Tensor]:
    model = load_model(tiny_dir, "float32", CPU)
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_round_trip_is_what_the_methods_checkpoint_holds(config, tiny_dir, tmp_path):
    quantizer = get_quantizer(CONFIGS[config])
    quantizer.quantize(tiny_dir, None, tmp_path, "float32")
    layers, floats = _layers(tmp_path, quantizer), _floats(tiny_dir)
    assert layers
    for name, layer in layers.items():
        assert torch.equal(quantizer.round_trip(floats[name]), quantizer.linear_weight(layer).float()), name


def test_fake_quantize_passes_the_gradient_straight_through():
    quantizer = get_quantizer(RTNCfg(name="rtn", group_size=32))
    weight = torch.randn(8, 64, requires_grad=True)
    out = quantizer.fake_quantize(weight)
    assert torch.equal(out.detach(), quantizer.round_trip(weight.detach())) and not torch.equal(out, weight)
    (out * torch.arange(64.0)).sum().backward()
    assert torch.equal(weight.grad, torch.arange(64.0).expand(8, 64))
