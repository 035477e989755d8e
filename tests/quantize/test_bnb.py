"""bitsandbytes NF4, FP4 and LLM.int8(): the saved checkpoints hold exactly what bitsandbytes' own
quantization makes of the float weights, train a LoRA adapter, and refuse bad settings."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from quantorder.config import BnB4bitCfg, BnBInt8Cfg
from quantorder.errors import ConfigError
from quantorder.quantize import bits_per_weight, load_model, method_of
from quantorder.quantize.bnb import BitsAndBytesQuantizer, FP4Quantizer, Int8Quantizer, NF4Quantizer

from ..conftest import TEMPLATE

CPU = torch.device("cpu")


def _float_weights(model_dir) -> dict[str, torch.Tensor]:
    model = load_model(model_dir, "float32", CPU)
    return {n: m.weight.data for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


@pytest.mark.parametrize(
    "quantizer,block,double",
    [(NF4Quantizer, 64, True), (NF4Quantizer, 128, False), (FP4Quantizer, 64, True)],
)
def test_4bit_weights_are_bitsandbytes_own_dequantization(tmp_path, tiny_dir, quantizer, block, double):
    import bitsandbytes.functional as F

    cfg = BnB4bitCfg(name=quantizer.name, group_size=block, double_quant=double, compute_dtype="float32")
    quantizer(cfg).quantize(tiny_dir, None, tmp_path, "float32")
    assert method_of(tmp_path) is not None and method_of(tmp_path).backend == "bitsandbytes"
    model = load_model(tmp_path, "float32", CPU)
    layers = {n: m for n, m in model.named_modules() if BitsAndBytesQuantizer.is_quantized_linear(m)}
    floats = _float_weights(tiny_dir)
    assert layers.keys() == floats.keys()
    for name, layer in layers.items():
        packed, state = F.quantize_4bit(floats[name], blocksize=block, compress_statistics=double, quant_type=cfg.name)
        expected = F.dequantize_4bit(packed, state)
        assert layer.weight.quant_state.blocksize == block, name
        assert torch.equal(BitsAndBytesQuantizer.linear_weight(layer), expected), name
    # stored bits: every tensor the checkpoint holds for a layer's weight (codes, scales, code books)
    saved = load_file(tmp_path / "model.safetensors")
    on_disk = sum(t.numel() * t.element_size() * 8 for k, t in saved.items() if k.split(".weight")[0] in layers)
    weights = sum(w.numel() for w in floats.values())
    assert bits_per_weight(tmp_path, model) == pytest.approx(on_disk / weights)
    assert 4 < on_disk / weights < 4 + (32 + 2 * 16) / block  # codes, block scales and a code book per layer


def test_int8_weights_are_bitsandbytes_own_rowwise_codes(tmp_path, tiny_dir):
    import bitsandbytes.functional as F

    Int8Quantizer(BnBInt8Cfg(name="int8-bnb")).quantize(tiny_dir, None, tmp_path, "float32")
    model = load_model(tmp_path, "float32", CPU)
    floats = _float_weights(tiny_dir)
    layers = {n: m for n, m in model.named_modules() if BitsAndBytesQuantizer.is_quantized_linear(m)}
    assert layers.keys() == floats.keys()
    for name, layer in layers.items():
        codes, scales, _ = F.int8_vectorwise_quant(floats[name].to(torch.float16))
        assert torch.equal(layer.weight.data, codes), name
        weight, bits = BitsAndBytesQuantizer.linear_weight(layer), BitsAndBytesQuantizer.stored_bits(layer)
        step = floats[name].abs().amax(dim=1, keepdim=True) / 127
        assert ((weight - floats[name]).abs() <= step / 2 + 1e-3).all(), name
        layer.init_8bit_state()  # what a first forward pass on a GPU does: the scales move to the matmul state
        assert torch.equal(BitsAndBytesQuantizer.linear_weight(layer), weight), name
        assert BitsAndBytesQuantizer.stored_bits(layer) == bits == codes.numel() * 8 + scales.numel() * 32, name


def test_nf4_base_trains_a_lora_adapter_that_reloads(tmp_path, tiny_dir, qa_rows):
    from peft import PeftModel

    from quantorder.config import FinetuneCfg
    from quantorder.finetune import mean_loss, setup_data, setup_model, train_loop
    from quantorder.models import load_tokenizer

    NF4Quantizer(BnB4bitCfg(name="nf4", compute_dtype="float32")).quantize(tiny_dir, None, tmp_path / "q", "float32")
    cfg = FinetuneCfg(r=8, alpha=16, lr=1e-2, batch_size=4, max_steps=20, warmup_steps=1, max_seq_len=64, dropout=0.0)
    tok = load_tokenizer(tmp_path / "q")
    train = setup_data(tok, qa_rows[:8], TEMPLATE, cfg.max_seq_len)
    model = setup_model(load_model(tmp_path / "q", "float32", CPU, training=True), cfg, 0)
    before = mean_loss(model, train, tok.pad_token_id, 4, CPU)
    # after the first inference pass: on AVX512-BF16 CPUs bitsandbytes has repacked the layers by then
    layers = {n: m for n, m in model.named_modules() if BitsAndBytesQuantizer.is_quantized_linear(m)}
    frozen = {n: BitsAndBytesQuantizer.linear_weight(m) for n, m in layers.items()}
    result = train_loop(model, train, train, cfg, tok.pad_token_id, 0, tmp_path / "log.jsonl")
    assert result.val_loss < before - 0.5  # gradients reach the adapter through the 4-bit layers
    assert len(frozen) == 14 and all(
        torch.equal(BitsAndBytesQuantizer.linear_weight(m), frozen[n]) for n, m in layers.items()
    )
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(tmp_path / "q", "float32", CPU), tmp_path / "adapter")
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert len(trained) == 28 and loaded.keys() == trained.keys()
    assert all(torch.equal(p, trained[n]) for n, p in loaded.items())
    assert mean_loss(reloaded, train, tok.pad_token_id, 4, CPU) == pytest.approx(result.val_loss, rel=1e-3)


@pytest.mark.parametrize(
    "cls,settings,message",
    [
        (BnB4bitCfg, {"name": "nf4", "group_size": 16}, r"algo.group_size=16: allowed for nf4: 32, 64, 128,"),
        (BnB4bitCfg, {"name": "nf4", "compute_dtype": "int8"}, r"algo.compute_dtype='int8': allowed: float32, bf"),
        (BnB4bitCfg, {"name": "fp4", "bits": 8}, r"algo.bits=8: allowed for fp4: 4"),
        (BnB4bitCfg, {"name": "nf4", "sym": True}, r"algo.sym=true: nf4 is symmetric by construction"),
        (BnBInt8Cfg, {"name": "int8-bnb", "group_size": 64}, r"algo.group_size=64: int8-bnb scales per row"),
        (BnBInt8Cfg, {"name": "int8-bnb", "threshold": -1.0}, r"algo.threshold=-1.0: must be >= 0"),
    ],
)
def test_bad_settings_fail_in_one_line(cls, settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        cls(**settings)
    assert "\n" not in str(info.value)
