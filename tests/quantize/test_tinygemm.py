"""GPTQ-format int4 checkpoints on PyTorch's tinygemm kernel: the same grid (scales and offsets
rounded to bf16), the same logits within bf16 rounding, and a one-line refusal of layers it cannot
compute. The CPU build of the kernel runs here; `pytest -m gpu` runs the CUDA one."""

from __future__ import annotations

import types

import pytest
import torch

from quantorder.quantize import load_model, method_of
from quantorder.quantize.tinygemm import TinyGemmLinear, supported, to_tinygemm

CPU = torch.device("cpu")
LAYER = "model.layers.0.mlp.down_proj"


def _weight(layer: torch.nn.Module) -> torch.Tensor:
    """A tinygemm layer's weight (out, in), read back through its own kernel."""
    with torch.no_grad():
        return layer(torch.eye(layer.in_features, dtype=torch.bfloat16)).t().float()


def test_the_checkpoints_grid_and_logits_on_tinygemm(rtn_dir):
    method = method_of(rtn_dir)
    model = load_model(rtn_dir, "bfloat16", CPU)
    checkpoint = dict(model.named_modules())[LAYER]
    weight, scales = method.linear_weight(checkpoint).float(), checkpoint.scales.float()
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=x).logits.float()
    assert to_tinygemm(model, method) == 14  # every linear layer of the two decoder layers
    fast = dict(model.named_modules())[LAYER]
    assert isinstance(fast, TinyGemmLinear) and not any(method.is_quantized_linear(m) for m in model.modules())
    # the same steps, each times the bf16-rounded scale, plus the bf16-rounded offset
    step = scales.t().repeat_interleave(32, dim=1)
    assert ((_weight(fast) - weight).abs() / step).max() < 0.1  # measured: 0.055 of a step
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    assert (logits - expected).norm() / expected.norm() < 0.02  # measured: 0.0067 (bf16 both)
    assert logits.argmax(-1).eq(expected.argmax(-1)).float().mean() > 0.95  # measured: 1.0


def test_a_symmetric_grid_with_bf16_scales_is_exact():
    """Steps in -8..7 times power-of-two scales: nothing to round, so tinygemm holds the very weights."""
    gen = torch.Generator().manual_seed(0)
    steps = torch.randint(-8, 8, (64, 128), generator=gen).float()
    scales = 2.0 ** -torch.randint(4, 9, (128 // 32, 64), generator=gen).float()  # (groups, out)
    weight = steps * scales.t().repeat_interleave(32, dim=1)
    layer = TinyGemmLinear(weight, scales, 32, bias=None)
    assert torch.equal(layer.scales_and_zeros[..., 1], torch.zeros(4, 64, dtype=torch.bfloat16))  # no offsets
    assert torch.equal(_weight(layer), weight)
    with pytest.raises(ValueError, match="more than 16 steps"):
        TinyGemmLinear(weight * torch.tensor([1.0, 3.0]).repeat(32)[:, None], scales, 32, bias=None)


def test_layers_tinygemm_cannot_compute_are_named_in_one_line(rtn_dir):
    dense = {"bits": 4, "group_size": 32, "in_features": 256, "out_features": 128, "g_idx": None}

    def layer(**change) -> types.SimpleNamespace:
        return types.SimpleNamespace(**dense | change)

    assert supported(layer()) is None
    assert supported(layer(bits=8)) == "8-bit weights (tinygemm computes 4 bits)"
    assert supported(layer(group_size=16)) == "group size 16 (tinygemm takes 32, 64, 128, 256)"
    assert "act-order" in supported(layer(g_idx=torch.randperm(256) // 32))
    model = load_model(rtn_dir, "bfloat16", CPU)
    dict(model.named_modules())[LAYER].bits = 8
    with pytest.raises(ValueError, match=f"^{LAYER}: 8-bit weights"):
        to_tinygemm(model, method_of(rtn_dir))
    assert not any(isinstance(m, TinyGemmLinear) for m in model.modules())  # nothing replaced
