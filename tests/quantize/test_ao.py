"""torchao INT8 (dynamic activations) and FP8: the saved checkpoints compute exactly what torchao's own
quantization of the float model computes, stay near the float model, train a LoRA adapter, and
refuse bad settings in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from quantorder.config import FinetuneCfg, TorchAOCfg
from quantorder.errors import ConfigError, UserError
from quantorder.quantize import bits_per_weight, get_quantizer, load_model, method_of
from quantorder.quantize.ao import TorchAOQuantizer, fp8_matmul_available

from ..conftest import TEMPLATE

CPU = torch.device("cpu")
# relative distance of the logits from the float model's on the tiny model (measured: int8 weights and
# activations 1.4%, float8 e4m3 weights 4.7%: three mantissa bits)
LOGIT_RTOL = {"int8-dynamic": 0.02, "fp8": 0.06}


@pytest.fixture(scope="module", params=["int8-dynamic", "fp8"])
def quantized(request, tmp_path_factory, tiny_dir):
    cfg = TorchAOCfg(name=request.param, activations="dynamic" if request.param == "int8-dynamic" else "none")
    out = tmp_path_factory.mktemp(request.param)
    record = get_quantizer(cfg).quantize(tiny_dir, None, out, "float32")
    return cfg, out, record


def test_checkpoint_computes_what_torchao_makes_of_the_float_model(quantized, tiny_dir):
    from torchao.quantization import quantize_

    cfg, out, record = quantized
    assert method_of(out).backend == "torchao" and record["backend_version"]
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    model, reference = load_model(out, "float32", CPU), load_model(tiny_dir, "float32", CPU)
    floats = reference(ids).logits
    quantize_(reference, get_quantizer(cfg).ao_config(), filter_fn=_quantized_by_transformers)
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert torch.equal(ours, theirs)  # the library's own quantization of the same weights
    distance = ((ours - floats).norm() / floats.norm()).item()
    assert 1e-4 < distance < LOGIT_RTOL[cfg.name], distance
    layers = [m for m in model.modules() if TorchAOQuantizer.is_quantized_linear(m)]
    assert len(layers) == 14  # every projection of both blocks; the tied embedding/head stays float


def _quantized_by_transformers(module: torch.nn.Module, name: str) -> bool:
    """The layers transformers' TorchAoConfig converts by default: every linear layer but the head."""
    return isinstance(module, torch.nn.Linear) and name != "lm_head"


def test_stored_bits_are_what_the_checkpoint_holds(quantized, tiny_dir):
    cfg, out, _ = quantized
    model = load_model(out, "float32", CPU)
    layers = {n: m for n, m in model.named_modules() if TorchAOQuantizer.is_quantized_linear(m)}
    saved = load_file(out / "model.safetensors")
    # torchao's tensors save as <layer>._weight_qdata, <layer>._weight_scale, ...
    on_disk = sum(t.numel() * t.element_size() * 8 for k, t in saved.items() if k.rsplit("._weight_", 1)[0] in layers)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    assert bits_per_weight(out, model) == pytest.approx(on_disk / weights)
    # 8-bit codes plus one float32 scale per row of 128 or 256 inputs (int8: an int8 zero point too)
    assert 8 + 32 / 256 <= on_disk / weights <= 8 + 40 / 128


def test_round_trip_is_the_checkpoints_weight(quantized, tiny_dir):
    cfg, out, _ = quantized
    quantizer = get_quantizer(cfg)
    model = load_model(tiny_dir, "float32", CPU)
    floats = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, layer in load_model(out, "float32", CPU).named_modules():
        if quantizer.is_quantized_linear(layer):
            assert torch.equal(quantizer.round_trip(floats[name]), quantizer.linear_weight(layer).float()), name


def test_lora_trains_on_the_quantized_base_and_leaves_it_frozen(quantized, qa_rows, tmp_path):
    from quantorder.finetune import mean_loss, setup_data, setup_model, train_loop
    from quantorder.models import load_tokenizer

    _, out, _ = quantized
    cfg = FinetuneCfg(r=8, alpha=16, lr=1e-2, batch_size=4, max_steps=12, warmup_steps=1, max_seq_len=64, dropout=0.0)
    tok = load_tokenizer(out)
    train = setup_data(tok, qa_rows[:8], TEMPLATE, cfg.max_seq_len)
    model = setup_model(load_model(out, "float32", CPU, training=True), cfg, 0)
    before = mean_loss(model, train, tok.pad_token_id, 4, CPU)
    layers = {n: m for n, m in model.named_modules() if TorchAOQuantizer.is_quantized_linear(m)}
    # training computes with the same weights and unrounded activations (exact input gradients)
    assert all(m.weight.act_quant_kwargs is None for m in layers.values())
    frozen = {n: TorchAOQuantizer.linear_weight(m).clone() for n, m in layers.items()}
    result = train_loop(model, train, train, cfg, tok.pad_token_id, 0, tmp_path / "log.jsonl")
    assert result.val_loss < before - 0.5  # gradients reach the adapter through torchao's layers
    assert len(frozen) == 14 and all(
        torch.equal(TorchAOQuantizer.linear_weight(m), frozen[n]) for n, m in layers.items()
    )


@pytest.mark.skipif(fp8_matmul_available(), reason="checks a machine without float8 matmuls")
def test_float8_activations_without_float8_matmuls_are_one_line(tiny_dir, tmp_path):
    quantizer = get_quantizer(TorchAOCfg(name="fp8", activations="dynamic"))
    with pytest.raises(UserError, match=r"algo.activations=dynamic: float8 activations need a CUDA GPU") as info:
        quantizer.quantize(tiny_dir, None, tmp_path, "float32")
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"name": "fp8", "bits": 4}, r"algo.bits=4: allowed for fp8: 8"),
        ({"name": "int8-dynamic", "bits": 2}, r"algo.bits=2: allowed for int8-dynamic: 8"),
        ({"name": "int8-dynamic", "group_size": 128}, r"algo.group_size=128: int8-dynamic scales per row; use -1"),
        ({"name": "fp8", "sym": False}, r"algo.sym=false: fp8 weights are symmetric"),
        ({"name": "fp8", "activations": "static"}, r"algo.activations='static': allowed for fp8: none, dynamic"),
        ({"name": "int8-dynamic", "activations": "none"}, r"algo.activations='none': allowed for int8-dynamic: dyn"),
    ],
)
def test_bad_settings_fail_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        TorchAOCfg(**settings)
    assert "\n" not in str(info.value)


def test_labels_tell_weight_only_from_dynamic_activations():
    labels = {TorchAOCfg(name="fp8", activations=a).label for a in ("none", "dynamic")}
    assert labels == {"fp8 8-bit per row, float activations", "fp8 8-bit per row, dynamic activations"}
    assert TorchAOCfg(name="int8-dynamic").label == "int8-dynamic 8-bit per row, dynamic activations"
