"""Shared fixtures: a tiny random-init Llama with its own tokenizer, and its RTN-quantized copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from quantorder.config import TinyArchCfg
from quantorder.data import render, stdlib_qa_rows
from quantorder.models import tiny_llama, tiny_tokenizer
from quantorder.quantize.rtn import RTNCfg, RTNQuantizer

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
TEMPLATE = "### Language: {programming_language}\n### Question: {prompt}\n### Answer: {response}"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def qa_rows() -> list[dict]:
    return stdlib_qa_rows(max_answer_chars=600)[:200]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, qa_rows) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer([render(TEMPLATE, r) for r in qa_rows], vocab_size=512)
    tiny_llama(TinyArchCfg(), tok, seed=0, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def rtn_dir(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("tiny_rtn")
    RTNQuantizer(RTNCfg(name="rtn", bits=4, group_size=32)).quantize(tiny_dir, None, out, "float32")
    return out
