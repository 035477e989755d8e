"""AWQ keeps its promise: on inputs with a few large-magnitude channels, it scales those channels
up before rounding, and its activation-weighted error ||X(W - Q)^T|| is far below RTN's."""

from __future__ import annotations

import json

import pytest
import torch

from quantorder.config import AWQCfg, RTNCfg
from quantorder.errors import UserError
from quantorder.models import load_tokenizer, random_model
from quantorder.quantize import load_model
from quantorder.quantize.awq import AWQQuantizer, load_scales
from quantorder.quantize.gptqmodel_backend import GPTQModelQuantizer as Packed
from quantorder.quantize.rtn import RTNQuantizer

from ..conftest import TINY_ARCH, calibration_samples, layer_inputs

CPU = torch.device("cpu")
OUTLIERS = [3, 40, 77, 101]  # input channels whose RMSNorm gain is 20x: the activation outliers of real LLMs
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.gate_proj"]


@pytest.fixture(scope="module")
def outlier_dir(tmp_path_factory, tiny_dir):
    """The tiny model with a few large-magnitude channels entering every attention and MLP block."""
    model = load_model(tiny_dir, "float32", CPU)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[OUTLIERS] = 20.0
    out = tmp_path_factory.mktemp("outliers")
    model.save_pretrained(out)
    load_tokenizer(tiny_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def calibration(outlier_dir):
    return calibration_samples(outlier_dir, 32, chars=100_000)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, outlier_dir, calibration):
    awq_dir, rtn_dir = tmp_path_factory.mktemp("awq"), tmp_path_factory.mktemp("rtn")
    record = AWQQuantizer(AWQCfg(name="awq", bits=4, group_size=32)).quantize(
        outlier_dir, calibration, awq_dir, "float32"
    )
    RTNQuantizer(RTNCfg(name="rtn", bits=4, group_size=32)).quantize(outlier_dir, None, rtn_dir, "float32")
    return awq_dir, rtn_dir, record


def test_awq_beats_rtn_on_activation_weighted_error(outlier_dir, calibration, quantized):
    awq_dir, rtn_dir, _ = quantized
    float_model = load_model(outlier_dir, "float32", CPU)
    modules = {d: dict(load_model(d, "float32", CPU).named_modules()) for d in (awq_dir, rtn_dir)}
    scale_of = {layer: s for layers, s in load_scales(awq_dir).values() for layer in layers}
    for name in LAYERS:
        x, w = layer_inputs(float_model, calibration, name), dict(float_model.named_modules())[name].weight.double()
        # AWQ stores Q(W diag(s)) and divides the previous norm by s: its weight seen from x is Q(W s) / s
        w_awq = Packed.linear_weight(modules[awq_dir][name]).double() / scale_of[name].double()
        w_rtn = Packed.linear_weight(modules[rtn_dir][name]).double()
        err_awq, err_rtn = (torch.linalg.norm(x @ (w - q).T.detach()).item() for q in (w_awq, w_rtn))
        assert err_awq < 0.7 * err_rtn, (name, err_awq, err_rtn)


def test_searched_scales_are_recorded_and_are_the_ones_applied(outlier_dir, quantized):
    awq_dir, _, record = quantized
    scales = load_scales(awq_dir)
    assert record["searched_scales"] == {
        "file": "awq/scales.safetensors",
        "groups": len(scales),
        "max_spread": pytest.approx(max((s.max() / s.min()).item() for _, s in scales.values())),
    }
    assert record["dtype"] == "bfloat16"  # AWQ searches in half precision even for a float32 model
    assert scales["model.layers.0.input_layernorm"][0] == LAYERS[:2] + ["model.layers.0.self_attn.v_proj"]
    before = load_model(outlier_dir, "float32", CPU).state_dict()
    after = load_model(awq_dir, "float32", CPU).state_dict()
    for prev in ("model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm"):
        _, s = scales[prev]
        assert s[OUTLIERS].min() > 2 * s.median()  # the large channels are the ones scaled up
        applied = before[f"{prev}.weight"] / after[f"{prev}.weight"].float()
        assert torch.allclose(applied, s, rtol=2e-2)  # the norm was divided by exactly these scales


def test_reload_gives_same_logits_as_dequantized_float_model(quantized):
    awq_dir, _, _ = quantized
    assert json.loads((awq_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    first = load_model(awq_dir, "bfloat16", CPU)
    with torch.no_grad():
        a = first(input_ids=x).logits.float()
        b = load_model(awq_dir, "bfloat16", CPU)(input_ids=x).logits.float()
        c = Packed.dequantize(first, torch.bfloat16)(input_ids=x).logits.float()
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=2e-2, rtol=2e-2)


def test_clip_search_needs_output_widths_divisible_by_64(tmp_path, tiny_dir, calibration):
    narrow = tmp_path / "narrow"
    tok = load_tokenizer(tiny_dir)
    arch = {**TINY_ARCH, "hidden_size": 64, "intermediate_size": 128}
    random_model(arch, tok, seed=0, dtype=torch.float32, device=torch.device("cpu")).save_pretrained(narrow)
    tok.save_pretrained(narrow)
    with pytest.raises(UserError, match=r"algo.clip=true needs output widths divisible by 64, but .*k_proj has 32"):
        AWQQuantizer(AWQCfg(name="awq", group_size=32)).quantize(narrow, calibration, tmp_path / "q", "float32")
    # the switch reaches GPTQModel: without the clip search (which asserts on these widths) it quantizes
    AWQQuantizer(AWQCfg(name="awq", group_size=32, clip=False)).quantize(narrow, calibration, tmp_path / "q", "float32")
    assert (tmp_path / "q" / "awq" / "scales.safetensors").is_file()


def test_duo_scaling_switch_changes_the_searched_scales(tmp_path, outlier_dir, calibration, quantized):
    AWQQuantizer(AWQCfg(name="awq", group_size=32, duo_scaling=False)).quantize(
        outlier_dir, calibration, tmp_path, "float32"
    )
    duo, activation_only = load_scales(quantized[0]), load_scales(tmp_path)
    assert duo.keys() == activation_only.keys()
    assert any(not torch.allclose(duo[k][1], activation_only[k][1]) for k in duo)


def test_awq_packs_four_bits_only():
    from quantorder.errors import ConfigError

    with pytest.raises(ConfigError, match=r"algo.bits=8: allowed for awq: 4"):
        AWQCfg(name="awq", bits=8)
