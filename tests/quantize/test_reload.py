"""Every GPTQModel-made checkpoint gives the same logits through transformers (how every stage loads
it) as through GPTQModel's own loader. (GPTQModel's in-memory model right after quantizing offloads
its layers to disk and is not a forward-ready reference.)"""

from __future__ import annotations

import pytest
import torch

from quantorder.config import ALGO_CONFIGS
from quantorder.quantize import ALGORITHMS, load_model

from ..conftest import calibration_samples

CPU = torch.device("cpu")


@pytest.mark.parametrize("algo", sorted(a for a, method in ALGORITHMS.items() if method.backend == "gptqmodel"))
def test_transformers_and_gptqmodel_load_the_same_model(algo, tiny_dir, tmp_path):
    from gptqmodel import BACKEND, GPTQModel

    quantizer = ALGORITHMS[algo](ALGO_CONFIGS[algo](name=algo, group_size=32))
    calibration = calibration_samples(tiny_dir, 8)
    quantizer.quantize(tiny_dir, calibration if quantizer.requires_calibration else None, tmp_path, "float32")
    x = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    backend = BACKEND.AWQ_TORCH if algo == "awq" else BACKEND.GPTQ_TORCH
    with torch.no_grad():
        ours = load_model(tmp_path, "bfloat16", CPU)(input_ids=x).logits.float()  # GPTQModel's loader: half only
        theirs = GPTQModel.load(str(tmp_path), device="cpu", backend=backend, dtype=torch.bfloat16).model(input_ids=x)
    assert ours.abs().max() > 0.1
    assert torch.allclose(ours, theirs.logits.float(), atol=1e-2, rtol=1e-2), (ours - theirs.logits).abs().max()
