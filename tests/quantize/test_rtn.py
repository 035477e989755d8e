"""RTN: weights on the int grid, error within half a step, a real packed checkpoint that reloads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantorder.config import RTNCfg
from quantorder.errors import UserError
from quantorder.provenance import hash_dir
from quantorder.quantize import ALGORITHMS, get_quantizer, load_model
from quantorder.quantize.gptqmodel_backend import GPTQModelQuantizer as Packed
from quantorder.quantize.rtn import RTNQuantizer

CPU = torch.device("cpu")


def _layer(model, name="model.layers.0.mlp.down_proj"):
    return dict(model.named_modules())[name]


def test_registry_resolves_rtn():
    assert ALGORITHMS["rtn"] is RTNQuantizer
    assert isinstance(get_quantizer(RTNCfg(name="rtn")), RTNQuantizer)


def test_checkpoint_is_packed_gptq_format(rtn_dir, tiny_dir):
    config = json.loads((rtn_dir / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["sym"]) == ("gptq", 4, 32, False)
    tensors = load_file(str(rtn_dir / "model.safetensors"))
    qweight = tensors["model.layers.0.mlp.down_proj.qweight"]
    assert qweight.dtype == torch.int32 and qweight.shape == (256 * 4 // 32, 128)  # 8 codes per int32
    assert "model.layers.0.mlp.down_proj.weight" not in tensors


def test_dequantized_weights_lie_on_the_grid_within_half_a_step(rtn_dir, tiny_dir):
    original = _layer(load_model(tiny_dir, "float32", CPU)).weight.detach().double()  # (out, in)
    layer = _layer(load_model(rtn_dir, "float32", CPU))
    deq = layer.dequantize_weight().t().double()  # (out, in)
    scales = layer.scales.double().t().repeat_interleave(32, dim=1)  # one scale per group of 32 inputs
    # w = scale * (q - z) with integers q, z in [0, 15]: w / scale is an integer in [-15, 15]
    k = deq / scales
    assert torch.allclose(k, k.round(), atol=0.02)  # dequantization runs in fp16
    assert k.round().abs().max() <= 15
    levels_per_group = [g.round().unique().numel() for g in k.reshape(-1, 32)]
    assert max(levels_per_group) <= 16
    err = (deq - original).abs()
    assert torch.all(err <= 0.505 * scales)  # half a step, plus fp16 rounding of scale and result
    assert (err > 0.45 * scales).any()  # and the bound is tight: some weights sit near mid-step
    assert err.max() > 0  # it really quantized


def test_reload_gives_same_logits_as_dequantized_float_model(rtn_dir):
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    first = load_model(rtn_dir, "float32", CPU)
    with torch.no_grad():
        a = first(input_ids=x).logits
        b = load_model(rtn_dir, "float32", CPU)(input_ids=x).logits
        c = Packed.dequantize(first, torch.float32)(input_ids=x).logits
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-4, rtol=1e-4)


def test_eight_bit_is_closer_than_four_bit(tmp_path, tiny_dir, rtn_dir):
    out = tmp_path / "rtn8"
    RTNQuantizer(RTNCfg(name="rtn", bits=8, group_size=32)).quantize(tiny_dir, None, out, "float32")
    w = _layer(load_model(tiny_dir, "float32", CPU)).weight.detach()
    err4 = (_layer(load_model(rtn_dir, "float32", CPU)).dequantize_weight().t() - w).abs().mean()
    err8 = (_layer(load_model(out, "float32", CPU)).dequantize_weight().t() - w).abs().mean()
    assert err8 < err4 / 8


def test_group_size_must_divide_every_input_width(tmp_path, tiny_dir):
    with pytest.raises(UserError, match=r"algo.group_size=256 does not divide the input width 128"):
        RTNQuantizer(RTNCfg(name="rtn", bits=4, group_size=256)).quantize(tiny_dir, None, tmp_path / "x", "float32")


def test_quantizing_twice_gives_the_same_checkpoint_hash(tmp_path, tiny_dir, rtn_dir):
    """No scratch path or other run detail in the saved configs: provenance hashes are reproducible."""
    again = tmp_path / "again"
    RTNQuantizer(RTNCfg(name="rtn", bits=4, group_size=32)).quantize(tiny_dir, None, again, "float32")
    assert hash_dir(again) == hash_dir(rtn_dir)
