"""Shared fixtures: a tiny random-init Llama with its own tokenizer, and its RTN- and AWQ-quantized copies."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml

from quantorder.calibration import draw_windows
from quantorder.config import AWQCfg, CalibCfg, RTNCfg
from quantorder.data import package_prose, package_qa_rows, render
from quantorder.models import load_tokenizer, random_model, train_tokenizer
from quantorder.quantize import load_model
from quantorder.quantize.awq import AWQQuantizer
from quantorder.quantize.rtn import RTNQuantizer

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
TEMPLATE = "### Language: {programming_language}\n### Question: {prompt}\n### Answer: {response}"
ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = yaml.safe_load((ROOT / "conf/model/tiny.yaml").read_text())["architecture"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYMPY = ("sympy", "1.14.0")  # the embedded default's data source (conf/data/sympy-qa.yaml)


def sympy_calib(**kw) -> CalibCfg:
    """A calibration config over the embedded default's prose."""
    return CalibCfg(name="docs", source="package", package=SYMPY[0], package_version=SYMPY[1], **kw)


@cache
def prose() -> str:
    """The embedded default's calibration text (SymPy's module and class docstrings)."""
    return package_prose(*SYMPY)


@pytest.fixture(scope="session")
def qa_rows() -> list[dict]:
    return package_qa_rows(*SYMPY, max_answer_chars=600)[:200]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, qa_rows) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer([render(TEMPLATE, r) for r in qa_rows], vocab_size=TINY_ARCH["vocab_size"])
    random_model(TINY_ARCH, tok, seed=0, dtype=torch.float32, device=torch.device("cpu")).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def calibration_samples(model_dir: Path, n_samples: int, chars: int = 50_000) -> list[dict[str, torch.Tensor]]:
    """`n_samples` windows of 64 tokens of SymPy's prose, as the quantizers take them."""
    windows = draw_windows(load_tokenizer(model_dir), prose()[:chars], sympy_calib(n_samples=n_samples, seq_len=64))
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in windows]


def layer_inputs(model: torch.nn.Module, calibration: list[dict], name: str) -> torch.Tensor:
    """The inputs (tokens x features, float64) that layer `name` of `model` sees on the calibration samples."""
    seen = []
    handle = dict(model.named_modules())[name].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        for sample in calibration:
            model(input_ids=sample["input_ids"][None])
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, tiny_dir) -> Path:
    """A LoRA adapter on every linear layer of the tiny model, with random (non-zero) B matrices."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(tiny_dir, "float32", torch.device("cpu"))
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def awq_dir(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("tiny_awq")
    AWQQuantizer(AWQCfg(name="awq", bits=4, group_size=32)).quantize(
        tiny_dir, calibration_samples(tiny_dir, 16), out, "float32"
    )
    return out


@pytest.fixture(scope="session")
def rtn_dir(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("tiny_rtn")
    RTNQuantizer(RTNCfg(name="rtn", bits=4, group_size=32)).quantize(tiny_dir, None, out, "float32")
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests first: under `pytest -n 2 --dist loadfile` (make test) each slow module starts
    at once on its own worker, and the quick modules fill in around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
