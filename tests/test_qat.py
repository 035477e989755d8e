"""Quantization-aware LoRA: with the merged weight fake-quantized, the model deployed after merging
and quantizing with RTN computes what the trained model computed; fake-quantizing the base weight
alone leaves the merged update to be rounded at deployment."""

from __future__ import annotations

import pytest
import torch

from quantorder.config import FinetuneCfg, RTNCfg
from quantorder.finetune import mean_loss, setup_data, setup_model, train_loop
from quantorder.merge import merge_adapter
from quantorder.models import load_tokenizer
from quantorder.qat import apply_qat
from quantorder.quantize import load_model
from quantorder.quantize.rtn import RTNQuantizer

from .conftest import TEMPLATE

CPU = torch.device("cpu")
RTN = RTNQuantizer(RTNCfg(name="rtn", group_size=32))
CFG = FinetuneCfg(r=8, alpha=16, lr=2e-2, batch_size=4, max_steps=12, warmup_steps=1, max_seq_len=64, log_every=6)


@pytest.fixture(scope="module", params=["merged", "base"])
def deployed(request, tiny_dir, qa_rows, tmp_path_factory):
    """(qat.weight, the trained model's logits, the deployed model's logits, loss before, val loss after)."""
    out = tmp_path_factory.mktemp(f"qat-{request.param}")
    tok = load_tokenizer(tiny_dir)
    train = setup_data(tok, qa_rows[:16], TEMPLATE, CFG.max_seq_len)
    model = setup_model(load_model(tiny_dir, "float32", CPU), CFG, seed=0)
    assert apply_qat(model, RTN, request.param) == 7 * 2  # every adapted layer of the tiny model's 2 blocks
    before = mean_loss(model, train, tok.pad_token_id, 4, CPU)
    result = train_loop(model, train, train, CFG, tok.pad_token_id, 0, out / "log.jsonl")
    x = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=x).logits
    model.save_pretrained(out / "adapter")
    merge_adapter(tiny_dir, out / "adapter", "float32", CPU).save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")
    RTN.quantize(out / "merged", None, out / "quantized", "float32")
    with torch.no_grad():
        shipped = load_model(out / "quantized", "float32", CPU)(input_ids=x).logits
    return request.param, trained, shipped, before, result.val_loss


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def test_qat_trains(deployed):
    _, _, _, before, after = deployed
    assert after < before - 0.2  # 12 steps (the untrained loss: 6.2)


def test_merged_weight_qat_deploys_the_function_it_trained(deployed):
    weight, trained, shipped, _, _ = deployed
    gap = _rel(shipped, trained)
    if weight == "merged":
        assert gap < 1e-4, gap  # the same int4 weights, float rounding aside
    else:
        assert gap > 1e-3, gap  # the update is rounded onto the grid only at deployment
