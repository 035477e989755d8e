"""Architectures with fused projections (Phi-3's gate_up_proj) come back in their own layout after
quantizing, so transformers loads every weight instead of initializing the fused ones randomly."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from quantorder.config import RTNCfg
from quantorder.models import random_model
from quantorder.quantize import load_model
from quantorder.quantize.gptqmodel_backend import GPTQModelQuantizer as Packed
from quantorder.quantize.rtn import RTNQuantizer

CPU = torch.device("cpu")
PHI3 = {
    "model_type": "phi3", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}  # fmt: skip


def test_phi3_quantized_checkpoint_keeps_fused_gate_up_and_computes_like_the_float_model(tmp_path, tiny_dir):
    from quantorder.models import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    random_model(PHI3, tok, seed=0, dtype=torch.bfloat16, device=CPU).save_pretrained(tmp_path / "float")
    tok.save_pretrained(tmp_path / "float")
    record = RTNQuantizer(RTNCfg(name="rtn", bits=8, group_size=32)).quantize(
        tmp_path / "float", None, tmp_path / "q", "bfloat16"
    )
    assert record["fused_after_saving"] == 2  # one gate_up_proj per layer
    keys = load_file(tmp_path / "q" / "model.safetensors").keys()
    assert "model.layers.0.mlp.gate_up_proj.qweight" in keys and not any(".gate_proj." in k for k in keys)

    quantized = load_model(tmp_path / "q", "bfloat16", CPU)
    gate_up = quantized.model.layers[1].mlp.gate_up_proj
    assert Packed.is_quantized_linear(gate_up) and gate_up.out_features == 2 * PHI3["intermediate_size"]
    x = torch.randint(0, PHI3["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_model(tmp_path / "float", "bfloat16", CPU)(input_ids=x).logits.float()
        got = quantized(input_ids=x).logits.float()
    # 8-bit: close to the float model; a randomly initialized gate_up_proj would be far off
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 0.05
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"] == 8
