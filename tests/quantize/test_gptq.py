"""GPTQ keeps its promise: lower output error ||WX - QX|| than RTN at the same bits and group size."""

from __future__ import annotations

import pytest
import torch

from quantorder import progress
from quantorder.config import AWQCfg, GPTQCfg, RTNCfg
from quantorder.quantize import load_model
from quantorder.quantize.awq import AWQQuantizer
from quantorder.quantize.gptq import GPTQQuantizer
from quantorder.quantize.gptqmodel_backend import BACKEND_LOG
from quantorder.quantize.rtn import RTNQuantizer

from ..conftest import calibration_samples, layer_inputs

CPU = torch.device("cpu")
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]


@pytest.fixture(scope="module")
def calibration(tiny_dir):
    return calibration_samples(tiny_dir, 32, chars=100_000)


def _weights(model_dir, name) -> torch.Tensor:
    layer = dict(load_model(model_dir, "float32", CPU).named_modules())[name]
    return (layer.dequantize_weight().t() if hasattr(layer, "qweight") else layer.weight).detach().double()


def test_gptq_beats_rtn_on_output_error_and_stays_on_the_grid(tmp_path, tiny_dir, calibration):
    gptq_dir, rtn_dir = tmp_path / "gptq", tmp_path / "rtn"
    GPTQQuantizer(GPTQCfg(name="gptq", bits=4, group_size=32)).quantize(tiny_dir, calibration, gptq_dir, "float32")
    RTNQuantizer(RTNCfg(name="rtn", bits=4, group_size=32)).quantize(tiny_dir, None, rtn_dir, "float32")
    float_model = load_model(tiny_dir, "float32", CPU)
    for name in LAYERS:
        x, w = layer_inputs(float_model, calibration, name), _weights(tiny_dir, name)
        err = {d.name: torch.linalg.norm(x @ (w - _weights(d, name)).T).item() for d in (gptq_dir, rtn_dir)}
        assert err["gptq"] < 0.9 * err["rtn"], (name, err)
    layer = dict(load_model(gptq_dir, "float32", CPU).named_modules())[LAYERS[0]]
    steps = layer.dequantize_weight().t().double() / layer.scales.double().t().repeat_interleave(32, dim=1)
    assert torch.allclose(steps, steps.round(), atol=0.02) and steps.round().abs().max() <= 15


def test_damping_must_be_a_fraction():
    from quantorder.errors import ConfigError

    with pytest.raises(ConfigError, match=r"algo.damp_percent=0: must be in \(0, 1\)"):
        GPTQCfg(name="gptq", damp_percent=0)


def test_a_calibration_batch_holds_at_least_one_sample():
    from quantorder.errors import ConfigError

    with pytest.raises(ConfigError, match=r"algo.batch_size=0: must be >= 1"):
        AWQCfg(name="awq", batch_size=0)


@pytest.mark.parametrize(
    "quantizer",
    [
        GPTQQuantizer(GPTQCfg(name="gptq", group_size=32, batch_size=4)),
        AWQQuantizer(AWQCfg(name="awq", group_size=32, batch_size=4)),
    ],
    ids=["gptq", "awq"],
)
def test_calibration_runs_through_the_model_in_batches_of_the_configured_size(
    quantizer, tmp_path, tiny_dir, calibration, monkeypatch
):
    from gptqmodel.models.base import BaseQModel

    sizes, quantize = [], BaseQModel.quantize

    def recorded(self, samples, *args, **kwargs):
        sizes.append(kwargs.get("batch_size", 1))
        return quantize(self, samples, *args, **kwargs)

    monkeypatch.setattr(BaseQModel, "quantize", recorded)
    quantizer.quantize(tiny_dir, calibration, tmp_path, "float32")
    assert sizes == [4]


def test_quantizing_reports_layer_progress_on_the_console(tmp_path, tiny_dir, calibration, capfd, monkeypatch):
    """The backend's own output goes to its log; the stage output gets one line per finished layer."""
    monkeypatch.setattr(progress, "MIN_INTERVAL_S", 0.0)
    GPTQQuantizer(GPTQCfg(name="gptq", bits=4, group_size=32)).quantize(tiny_dir, calibration, tmp_path, "float32")
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[quantize] gptq")]
    assert [line.split(",")[0] for line in lines] == [f"[quantize] gptq: {n}/2 layers ({50 * n}%)" for n in (1, 2)]
    assert "[quantize]" not in (tmp_path / BACKEND_LOG).read_text()
