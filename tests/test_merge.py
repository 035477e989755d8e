"""Merging: PEFT output equals merged output, for a float base and for a dequantized int base."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from quantorder.merge import merge_adapter
from quantorder.quantize import load_model

from .conftest import LORA_TARGETS

CPU = torch.device("cpu")


@pytest.mark.parametrize("base", ["tiny_dir", "rtn_dir", "awq_dir"])
def test_merged_model_equals_base_plus_adapter(request, base, adapter_dir):
    base_dir = request.getfixturevalue(base)
    x = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model(base_dir, "float32", CPU), adapter_dir)(input_ids=x).logits
        plain = load_model(base_dir, "float32", CPU)(input_ids=x).logits
        merged_model = merge_adapter(base_dir, adapter_dir, "float32", CPU)
        merged = merged_model(input_ids=x).logits
    assert not any(hasattr(m, "qweight") for m in merged_model.modules())  # a plain float model
    assert "quantization_config" not in merged_model.config.to_dict()
    effect = (expected - plain).abs().max()
    assert effect > 1e-3  # the adapter changes the output
    # exact up to float32 rounding; AWQ's kernel computes in bf16 (8-bit mantissa), the merged model in float32
    assert (merged - expected).abs().max() < (2e-2 if base == "awq_dir" else 1e-4) * max(1.0, effect)


def test_an_adapter_trained_on_the_quantized_base_merges_into_the_float_base_exactly(tmp_path, tiny_dir, rtn_dir):
    """An adapter trained on the quantized base (q_ft), folded into the float base: W + scaling * B @ A, bit for bit."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(load_model(rtn_dir, "float32", CPU, training=True), config).save_pretrained(tmp_path)
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    base = load_model(tiny_dir, "float32", CPU).state_dict()
    merged = merge_adapter(tiny_dir, tmp_path, "float32", CPU).state_dict()
    lora_b = [k for k in adapter if ".lora_B." in k]
    assert len(lora_b) == 14  # every linear layer of both blocks
    for key in lora_b:
        name = key.removeprefix("base_model.model.").replace(".lora_B.weight", ".weight")
        expected = base[name] + (adapter[key] @ adapter[key.replace("lora_B", "lora_A")]) * (8 / 4)
        assert torch.equal(merged[name], expected), name
        assert not torch.equal(merged[name], base[name]), name


def test_merged_model_saves_and_reloads_as_float(tmp_path, rtn_dir, adapter_dir):
    merged = merge_adapter(rtn_dir, adapter_dir, "float32", CPU)
    merged.save_pretrained(tmp_path)
    reloaded = load_model(tmp_path, "float32", CPU)
    x = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, merged(input_ids=x).logits)


@pytest.mark.parametrize("scale,low,high", [(1e-3, -0.2, 0.2), (30.0, 0.9, 1.1)])
def test_update_survival_tells_kept_from_rounded_away(tmp_path, tiny_dir, rtn_dir, scale, low, high):
    """A tiny LoRA update rounds back to the old grid (kept ~ 0); a large one survives (kept ~ 1)."""
    from quantorder.config import RTNCfg
    from quantorder.quantize.rtn import RTNQuantizer
    from quantorder.survival import update_survival

    torch.manual_seed(0)
    model = load_model(rtn_dir, "float32", CPU)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(rtn_dir, tmp_path / "adapter", "float32", CPU)
    merged.save_pretrained(tmp_path / "merged")
    for f in rtn_dir.glob("tokenizer*"):  # the quantizer loads the tokenizer with the model
        shutil.copy(f, tmp_path / "merged")
    RTNQuantizer(RTNCfg(name="rtn", bits=4, group_size=32)).quantize(
        tmp_path / "merged", None, tmp_path / "q", "float32"
    )
    survival = update_survival(rtn_dir, rtn_dir, tmp_path / "merged", tmp_path / "q")
    assert len(survival["per_layer"]) == 14
    assert low < survival["overall"]["kept"] < high, survival["overall"]


def test_dequantization_bypasses_the_per_layer_compile_wrapper(rtn_dir):
    """GPTQModel wraps each layer's `dequantize_weight` in torch.compile, which on a GPU compiles
    again for every layer (minutes for a 3.8B model); dequantization must call the eager method."""
    from quantorder.quantize.gptqmodel_backend import GPTQModelQuantizer as Packed

    def compiled(*args, **kwargs):
        raise AssertionError("called the torch.compile wrapper")

    layers = [m for m in load_model(rtn_dir, "float32", CPU).modules() if Packed.is_quantized_linear(m)]
    assert layers and all("dequantize_weight" in vars(m) for m in layers)  # the wrapper GPTQModel installs
    for layer in layers:
        expected = layer.dequantize_weight().t()
        layer.dequantize_weight = compiled
        assert torch.equal(Packed.linear_weight(layer), expected)
