"""Perplexity matches a hand computation; answer-only masks the prompt; footprint is honest."""

from __future__ import annotations

import math

import pytest
import torch

from quantorder.config import EvalCfg
from quantorder.data import render
from quantorder.evaluate import footprint, perplexity
from quantorder.models import load_tokenizer
from quantorder.quantize import bits_per_weight, load_model
from quantorder.tokens import encode

from .conftest import TEMPLATE

CPU = torch.device("cpu")


def _hand_nll(model, tok, text: str, max_len: int) -> tuple[int, float]:
    """One example at a time, no padding: sum of -log p(token | prefix) over tokens 2..n."""
    ids = tok(f"{tok.bos_token} {text} {tok.eos_token}", add_special_tokens=False)["input_ids"][:max_len]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return len(ids) - 1, -sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))


def test_perplexity_equals_hand_computation(tiny_dir, qa_rows):
    model, tok = load_model(tiny_dir, "float32", CPU), load_tokenizer(tiny_dir)
    rows = qa_rows[:10]
    cfg = EvalCfg(max_seq_len=48, batch_size=4)
    result = perplexity(model, tok, rows, TEMPLATE, cfg)
    hand = [_hand_nll(model, tok, render(TEMPLATE, r), 48) for r in rows]
    assert [t for t, _ in result.per_example] == [t for t, _ in hand]
    for (_, got), (_, want) in zip(result.per_example, hand):
        assert got == pytest.approx(want, rel=1e-4)
    total_nll, total_tok = sum(n for _, n in hand), sum(t for t, _ in hand)
    assert result.ppl == pytest.approx(math.exp(total_nll / total_tok), rel=1e-4)
    mean_of_ppls = sum(math.exp(n / t) for t, n in hand) / len(hand)
    assert abs(result.ppl - mean_of_ppls) > 1e-3  # corpus-level, not an average of per-example perplexities


def test_answer_only_scores_only_answer_tokens(tiny_dir, qa_rows):
    tok = load_tokenizer(tiny_dir)
    text = render(TEMPLATE, qa_rows[0])
    full, answer = encode(tok, text, 4096), encode(tok, text, 4096, answer_only=True)
    assert full.input_ids == answer.input_ids
    n_answer = sum(label != -100 for label in answer.labels)
    answer_tokens = tok(" " + qa_rows[0]["response"] + " " + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert 0 < n_answer < len(full.labels)
    assert abs(n_answer - len(answer_tokens)) <= 2  # token boundaries at the marker may merge
    first = answer.labels.index(next(label for label in answer.labels if label != -100))
    assert "### Answer:" in tok.decode(full.input_ids[: first + 1])


def test_footprint_counts_packed_bits(tiny_dir, rtn_dir):
    model = load_model(rtn_dir, "float32", CPU)
    bpw = bits_per_weight(rtn_dir, model)
    # 4-bit codes + one fp16 scale and one packed 4-bit zero per 32 weights
    assert bpw == pytest.approx(4 + 16 / 32 + 4 / 32, rel=1e-6)
    assert bits_per_weight(tiny_dir, load_model(tiny_dir, "float32", CPU)) is None
    n_params = sum(p.numel() for p in load_model(tiny_dir, "float32", CPU).parameters())
    assert footprint(tiny_dir, None, n_params)["bits_per_param"] == pytest.approx(32, rel=0.01)
    assert footprint(rtn_dir, None, n_params)["size_bytes"] < footprint(tiny_dir, None, n_params)["size_bytes"]
