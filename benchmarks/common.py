"""Shared by the benchmark scripts: configs from conf/, and random-weight models of a configured
architecture with a tokenizer trained on the embedded SymPy Q&A text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import torch
import yaml

from quantorder.data import package_qa_rows, render
from quantorder.io import write_json
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


def architecture_and_tokenizer(model: str) -> tuple[dict, object]:
    """The architecture of conf/model/<model>.yaml and a tokenizer (at most 32k tokens) for it."""
    arch = conf("model", model)["architecture"]
    return arch, qa_tokenizer(min(arch["vocab_size"], 32000))


def model_with_tokenizer(
    model: str, device: torch.device, seed: int = 0, layers: int | None = None, dtype: torch.dtype = torch.bfloat16
):
    """Random weights in the architecture of conf/model/<model>.yaml (cut to its first `layers`
    decoder layers if given), its tokenizer and the architecture."""
    arch, tokenizer = architecture_and_tokenizer(model)
    if layers:
        arch = {**arch, "num_hidden_layers": layers}
    return random_model(arch, tokenizer, seed=seed, dtype=dtype, device=device), tokenizer, arch


def publish(result: dict, headline: tuple[str, ...], out: Path | None) -> None:
    """Print the headline fields of a benchmark's result as one JSON line; write it all to `out`."""
    print(json.dumps({k: result[k] for k in headline}))
    if out:
        write_json(out, result)


def dvc(*args: str, cwd: Path | None = None) -> str:
    """The output of `dvc <args>` run in `cwd` (default: here), with this environment's DVC."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["dvc", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout
