"""Calibration windows: the requested count and length, seeded, never more than the text holds."""

from __future__ import annotations

import pytest
import torch

from quantorder.calibration import draw_windows, load_calibration, save_calibration
from quantorder.errors import UserError
from quantorder.models import load_tokenizer

from .conftest import prose
from .conftest import sympy_calib as _cfg


def test_windows_are_seeded_disjoint_slices_of_the_text(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    text = prose()[:50_000]
    cfg = _cfg(n_samples=16, seq_len=64, seed=0)
    a, b = draw_windows(tok, text, cfg), draw_windows(tok, text, cfg)
    assert a.shape == (16, 64) and torch.equal(a, b)
    assert not torch.equal(a, draw_windows(tok, text, _cfg(n_samples=16, seq_len=64, seed=1)))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    starts = {tuple(ids[i : i + 64]) for i in range(0, len(ids) - 63, 64)}
    assert all(tuple(row.tolist()) in starts for row in a)  # whole, aligned, non-overlapping windows
    save_calibration(tmp_path, a, text, cfg)
    samples, manifest = load_calibration(tmp_path)
    assert len(samples) == 16 and torch.equal(samples[3]["input_ids"], a[3]) and manifest["seq_len"] == 64


def test_asking_for_more_windows_than_the_text_holds_fails_clearly(tiny_dir):
    cfg = _cfg(n_samples=1000, seq_len=256)
    with pytest.raises(UserError, match=r"calib.n_samples=1000: the 'docs' text holds only \d+ windows"):
        draw_windows(load_tokenizer(tiny_dir), prose()[:20_000], cfg)
