"""The q_ft adapter's options: LoftQ's initial adapter cancels most of the base's quantization error
(measured on weights and logits, against PEFT's own SVD), and a QA-LoRA adapter merges into a float
model as an update constant per quantization group that computes what it trained."""

from __future__ import annotations

import pytest
import torch

from quantorder.config import BnB4bitCfg, FinetuneCfg, QLoRACfg
from quantorder.finetune import setup_model
from quantorder.merge import merge_adapter
from quantorder.qlora import PEFT_PREFIX, loftq_init, lora_options
from quantorder.quantize import load_dequantized, load_model, method_of
from quantorder.quantize.bnb import NF4Quantizer

from .conftest import LORA_TARGETS

CPU = torch.device("cpu")
CFG = FinetuneCfg(r=8, alpha=16, target_modules=LORA_TARGETS)  # scaling 2: LoftQ must divide by it
X = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("tiny_nf4")
    NF4Quantizer(BnB4bitCfg(name="nf4", group_size=32)).quantize(tiny_dir, None, out, "float32")
    return out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.mark.parametrize("base", ["rtn_dir", "awq_dir", "nf4_dir"])
def test_loftq_init_cancels_most_of_the_quantization_error(request, base, tiny_dir):
    from peft.utils.loftq_utils import _low_rank_decomposition

    base_dir = request.getfixturevalue(base)
    method = method_of(base_dir)
    model = setup_model(load_model(base_dir, "float32", CPU, training=True), CFG, seed=0).eval()
    quantized_logits = _logits(model)
    before, after = loftq_init(model, tiny_dir, method)
    # the tiny model's random weights are spread evenly over 64-256 singular values: rank 8 removes ~10%
    assert 0.05 < before < 0.2 and after < 0.92 * before
    # scaling * B @ A is PEFT's rank-r SVD of W - Q(W) (PEFT's own B @ A ignores the scaling)
    float_model = load_model(tiny_dir, "float32", CPU)
    name = "model.layers.1.mlp.down_proj"
    layer = dict(model.named_modules())[PEFT_PREFIX + name]
    error = dict(float_model.named_modules())[name].weight - method.linear_weight(layer.get_base_layer())
    peft = _low_rank_decomposition(error.detach(), reduced_rank=8)
    ours = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(ours, peft["L"] @ peft["R"], atol=1e-5)
    # the model starts closer to the float model than the quantized base does
    float_logits = _logits(float_model)
    assert _rel(_logits(model), float_logits) < 0.93 * _rel(quantized_logits, float_logits)


def test_qalora_takes_the_group_size_of_the_base(rtn_dir, tiny_dir):
    assert lora_options(QLoRACfg(qalora=True), rtn_dir) == {"use_qalora": True, "qalora_group_size": 32}
    assert lora_options(QLoRACfg(), rtn_dir) == {}


def test_qalora_adapter_merges_as_a_per_group_update_that_computes_what_it_trained(rtn_dir, tmp_path):
    options = lora_options(QLoRACfg(qalora=True), rtn_dir)
    model = setup_model(load_model(rtn_dir, "float32", CPU, training=True), CFG, 0, **options)
    layer = dict(model.named_modules())[PEFT_PREFIX + "model.layers.0.mlp.down_proj"]
    assert layer.lora_A["default"].weight.shape == (8, 256 // 32)  # A acts on the 8 pooled groups of 32
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a trained adapter's non-zero B
    trained = _logits(model.eval())
    model.save_pretrained(tmp_path / "adapter")

    merged = merge_adapter(rtn_dir, tmp_path / "adapter", "float32", CPU)
    assert _rel(_logits(merged), trained) < 1e-5
    base = dict(load_dequantized(rtn_dir, "float32", CPU).named_modules())
    for name, module in merged.named_modules():
        if name.endswith(tuple(LORA_TARGETS)):
            update = (module.weight - base[name].weight).detach()
            groups = update.reshape(update.shape[0], -1, 32)
            assert groups.abs().amax() > 1e-3, name  # the adapter changed the layer
            assert torch.allclose(groups, groups[..., :1].expand_as(groups), atol=1e-6), name  # constant per group
