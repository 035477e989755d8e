"""Pinned numbers: a numerics change (tokenization, loss, LoRA, RTN, perplexity) fails here.

The tiny model, its data and its RTN checkpoint are built from seeds and pinned SymPy source, all
in float32 on a CPU. Tolerance: 1e-4 relative, far above run-to-run noise on one machine (zero: the
numbers repeat exactly) and above float32 differences between CPU families, far below any real
change of the computation (a masked token or a changed learning-rate step moves them by >1e-3).
"""

from __future__ import annotations

import json

import pytest
import torch

from quantorder.config import EvalCfg, FinetuneCfg
from quantorder.evaluate import perplexity
from quantorder.finetune import setup_data, setup_model, train_loop
from quantorder.models import load_tokenizer
from quantorder.quantize import load_model

from .conftest import TEMPLATE

CPU = torch.device("cpu")
RTOL = 1e-4
# steps 1..6 of LoRA r 8 on the tiny model, lr 1e-2, batch 4 x 64 tokens, seed 0 (measured 2026-12-02)
LOSSES = [6.227638, 6.214911, 6.005632, 5.90727, 5.835049, 5.800042]
# the last 16 rows, 64-token windows, float32: the random-init model, and its RTN 4-bit g32 checkpoint
PPL = {"tiny_dir": 524.5792717814296, "rtn_dir": 525.9125757121876}


def test_tiny_model_lora_losses_are_pinned(tiny_dir, qa_rows, tmp_path):
    cfg = FinetuneCfg(
        r=8, alpha=16, dropout=0.0, lr=1e-2, batch_size=4, max_steps=6, warmup_steps=1, max_seq_len=64, log_every=1
    )
    tok = load_tokenizer(tiny_dir)
    train = setup_data(tok, qa_rows[:8], TEMPLATE, cfg.max_seq_len)
    model = setup_model(load_model(tiny_dir, "float32", CPU), cfg, seed=0)
    train_loop(model, train, train, cfg, tok.pad_token_id, 0, tmp_path / "log.jsonl")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(LOSSES, rel=RTOL)


@pytest.mark.parametrize("fixture", ["tiny_dir", "rtn_dir"])
def test_float_and_rtn_perplexity_are_pinned(request, fixture, qa_rows):
    model_dir = request.getfixturevalue(fixture)
    model, tok = load_model(model_dir, "float32", CPU), load_tokenizer(model_dir)
    result = perplexity(model, tok, qa_rows[-16:], TEMPLATE, EvalCfg(max_seq_len=64, batch_size=8))
    assert result.ppl == pytest.approx(PPL[fixture], rel=RTOL)
