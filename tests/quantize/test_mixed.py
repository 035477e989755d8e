"""Mixed precision: per-module settings (`algo.dynamic`, GPTQModel's syntax) reach the checkpoint,
read back per layer, and are refused in one line where they cannot apply."""

from __future__ import annotations

import json

import pytest
import torch

from quantorder.config import GPTQCfg, QLoRACfg, RTNCfg, _check_qalora
from quantorder.errors import ConfigError
from quantorder.quantize import bits_per_weight, get_quantizer, load_model

CPU = torch.device("cpu")
MIXED = {r".*self_attn.*": {"bits": 8}, r"-:.*layers\.1\.mlp\.down_proj": {}}


def test_attention_at_8_bits_and_a_float_layer_read_back_from_the_checkpoint(tiny_dir, tmp_path):
    quantizer = get_quantizer(RTNCfg(name="rtn", bits=4, group_size=32, dynamic=MIXED))
    quantizer.quantize(tiny_dir, None, tmp_path, "float32")
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["dynamic"] == MIXED
    model, floats = load_model(tmp_path, "float32", CPU), dict(load_model(tiny_dir, "float32", CPU).named_modules())
    layers = {n: m for n, m in model.named_modules() if quantizer.is_quantized_linear(m)}
    assert {m.bits for n, m in layers.items() if "self_attn" in n} == {8}
    assert {m.bits for n, m in layers.items() if "mlp" in n} == {4} and len(layers) == 13
    plain = dict(model.named_modules())["model.layers.1.mlp.down_proj"]  # left in float (bf16: GPTQModel's CPU kernel)
    assert type(plain) is torch.nn.Linear
    assert torch.equal(plain.weight, floats["model.layers.1.mlp.down_proj"].weight.to(plain.weight.dtype))

    def error(name: str) -> float:
        w = floats[name].weight
        return ((quantizer.linear_weight(layers[name]).float() - w).norm() / w.norm()).item()

    assert max(error(n) for n in layers if "self_attn" in n) * 8 < min(error(n) for n in layers if "mlp" in n)
    # stored bits per weight: the 8-bit attention layers count twice as much as the 4-bit MLPs
    attention = sum(m.in_features * m.out_features for n, m in layers.items() if "self_attn" in n)
    mlp = sum(m.in_features * m.out_features for n, m in layers.items() if "mlp" in n)
    nominal = (8 * attention + 4 * mlp) / (attention + mlp)
    assert nominal < bits_per_weight(tmp_path, model) < nominal + 2  # plus scales and zero points per group of 32
    assert "qat_merge_q" in quantizer.unsupported_variants()


@pytest.mark.parametrize(
    "dynamic,message",
    [
        ({".*mlp.*": {"bits": 5}}, r"algo.dynamic\['.\*mlp.\*'\]: algo.bits=5: allowed for rtn: 2, 3, 4, 8"),
        ({".*mlp.*": {"desc_act": True}}, r"algo.dynamic\['.\*mlp.\*'\].desc_act: cannot differ per module"),
        ({"-:.*mlp.*": {"bits": 8}}, r"a '-:' pattern leaves its modules in float; give it no settings"),
        ({".*mlp[": {"bits": 8}}, r"algo.dynamic\['.\*mlp\['\]: not a regular expression"),
        ({".*mlp.*": 8}, r"algo.dynamic\['.\*mlp.\*'\]=8: expected a mapping of bits, group_size, sym"),
    ],
)
def test_bad_module_settings_fail_in_one_line(dynamic, message):
    with pytest.raises(ConfigError, match=message) as info:
        RTNCfg(name="rtn", group_size=32, dynamic=dynamic)
    assert "\n" not in str(info.value)


def test_qalora_refuses_per_module_settings():
    problems: list[str] = []
    _check_qalora(GPTQCfg(name="gptq", group_size=32, dynamic=MIXED), QLoRACfg(qalora=True), problems)
    assert problems == [
        "qlora.qalora=true with algo=gptq and algo.dynamic: QA-LoRA pools over one group layout for every layer"
    ]


def test_the_label_names_the_module_settings():
    assert GPTQCfg(name="gptq", group_size=32).label == "gptq 4-bit g32"
    assert GPTQCfg(name="gptq", group_size=32, dynamic=MIXED).label == f"gptq 4-bit g32 dynamic={MIXED}"


@pytest.mark.parametrize(
    ("bits", "dynamic", "sym", "training", "kernel"),
    [
        (4, None, True, False, "marlin"),
        (4, None, False, False, "triton"),  # Marlin runs symmetric GPTQ only
        (4, None, True, True, "triton"),  # Marlin has no backward
        (2, None, True, False, "triton"),
        (3, None, True, False, "torch"),  # neither Marlin nor Triton computes 3 bits
        (4, {r".*mlp.*": {"bits": 3}}, True, False, "torch"),  # one 3-bit layer decides for all
        (8, {r".*mlp.*": {"bits": 2}}, True, False, "triton"),
    ],
)
def test_the_cuda_kernel_computes_every_width_the_checkpoint_holds(bits, dynamic, sym, training, kernel):
    from quantorder.quantize.gptqmodel_backend import kernel_config

    qcfg = {"quant_method": "gptq", "bits": bits, "sym": sym, "dynamic": dynamic}
    assert kernel_config(qcfg, torch.device("cuda"), training).backend == kernel
    assert kernel_config(qcfg, CPU, training).backend == "torch"
