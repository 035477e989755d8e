"""Model weights are written in shards: DVC hashes a directory output's large files in parallel."""

from __future__ import annotations

import torch

from quantorder import models
from quantorder.config import ModelCfg, RTNCfg
from quantorder.quantize import gptqmodel_backend, load_model
from quantorder.quantize.rtn import RTNQuantizer

from .conftest import TEMPLATE, TINY_ARCH

CPU = torch.device("cpu")


def logits(model_dir) -> torch.Tensor:
    with torch.no_grad():
        return load_model(model_dir, "float32", CPU)(input_ids=torch.arange(1, 30)[None]).logits


def test_base_and_quantized_models_are_written_in_shards(tmp_path, monkeypatch, qa_rows, rtn_dir):
    monkeypatch.setattr(models, "SHARD_SIZE", "400KB")  # the tiny model is 1.4 MB
    cfg = ModelCfg(name="tiny", source="random", architecture=TINY_ARCH, dtype="float32")
    base = tmp_path / "base"
    models.materialize_base(cfg, base, [TEMPLATE.format(**row) for row in qa_rows])
    assert len(list(base.glob("*.safetensors"))) >= 3 and (base / "model.safetensors.index.json").is_file()

    monkeypatch.setattr(gptqmodel_backend, "SHARD_SIZE", "100KB")  # the 4-bit model is about 0.4 MB
    quantized = tmp_path / "quantized"
    RTNQuantizer(RTNCfg(name="rtn", bits=4, group_size=32)).quantize(base, None, quantized, "float32")
    assert len(list(quantized.glob("*.safetensors"))) >= 2
    # the same model as one written whole (conftest's rtn_dir: the same seed, settings and data)
    torch.testing.assert_close(logits(quantized), logits(rtn_dir), rtol=0, atol=0)
