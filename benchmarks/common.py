"""Shared by the benchmark scripts: configs from conf/, and random-weight models of a configured
architecture with a tokenizer trained on the embedded SymPy Q&A text."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import yaml

from quantorder.data import package_qa_rows, render
from quantorder.models import random_model, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def conf(group: str, choice: str) -> dict:
    """The YAML of conf/<group>/<choice>.yaml."""
    return yaml.safe_load((ROOT / "conf" / group / f"{choice}.yaml").read_text())


@cache
def qa_rows() -> list[dict]:
    """The embedded default's Q&A rows (conf/data/sympy-qa.yaml), in source order."""
    data = conf("data", "sympy-qa")
    return package_qa_rows(data["package"], data["package_version"], data["max_answer_chars"])


@cache
def qa_tokenizer(vocab_size: int):
    """A BPE tokenizer of at most `vocab_size` tokens trained on the Q&A text."""
    return train_tokenizer([render("{prompt}\n{response}", r) for r in qa_rows()[:2000]], vocab_size)


def model_with_tokenizer(model: str, device: torch.device, seed: int = 0):
    """Random bf16 weights in the architecture of conf/model/<model>.yaml, its architecture, and a
    tokenizer (at most 32k tokens) trained on the Q&A text."""
    arch = conf("model", model)["architecture"]
    tokenizer = qa_tokenizer(min(arch["vocab_size"], 32000))
    return random_model(arch, tokenizer, seed=seed, dtype=torch.bfloat16, device=device), tokenizer, arch
