"""A killed stage loses nothing: `dvc repro` afterwards ends with the numbers of a run never killed.

On the tiny model, in two copies of the project: one runs a chain undisturbed (the float chain, or
the chain to `ft_merge_q`, which adds calibrate, merge and quantize); in the other the first
`dvc repro` is SIGKILLed (its whole process group, as a lost machine would be) partway through one
stage, and a second `dvc repro` finishes the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .project import env, executed, make_project, run

pytestmark = pytest.mark.slow
TARGET = "evaluate@ft"  # the float chain: prepare, finetune@ft, evaluate@ft
CHECKPOINT = Path("checkpoints/finetune@ft/state.pt")


OVERRIDES = ["+experiment=tiny", "finetune.max_steps=200", "finetune.checkpoint_every=5", "tracking.enabled=false"]


def _project(repo: Path) -> Path:
    """A copy of the project composed for the tiny float chain, with enough steps that a kill lands mid-training."""
    make_project(repo)
    run([sys.executable, "-m", "quantorder", "compose", *OVERRIDES], repo)
    return repo


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    project = _project(tmp_path_factory.mktemp("clean"))
    run(["dvc", "repro", TARGET], project)
    assert not (project / CHECKPOINT).exists()  # a completed run leaves no checkpoint behind
    return _outputs(project)


def _outputs(project: Path) -> dict:
    """The adapter's weights, its training result and loss curve, the evaluation's numbers (no timings)."""
    adapter = project / "models/adapters/ft"
    result = json.loads((adapter / "quantorder.json").read_text())["result"]
    metrics = json.loads((project / "metrics/eval/ft.json").read_text())
    return {
        "weights": load_file(adapter / "adapter_model.safetensors"),
        "loss": (result["final_loss"], result["val_loss"]),
        "log": [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (adapter / "train_log.jsonl").open())],
        "ppl": (metrics["ppl"], metrics["n_tokens"]),
        "samples": (project / "metrics/eval/ft.samples.csv").read_text(),
    }


def _kill_during(project: Path, ready, log: Path, target: str = TARGET) -> None:
    """Start `dvc repro target` and SIGKILL its process group once `ready()` holds; it must still be running."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["dvc", "repro", target],
            cwd=project,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    assert all((a["weights"][k] == b["weights"][k]).all() for k in a["weights"])
    assert (a["loss"], a["log"], a["ppl"], a["samples"]) == (b["loss"], b["log"], b["ppl"], b["samples"])


def test_killed_finetune_resumes_from_its_checkpoint_and_ends_identical(clean, tmp_path):
    project = _project(tmp_path / "project")
    _kill_during(project, lambda: (project / CHECKPOINT).is_file(), tmp_path / "log")
    assert not (project / "models/adapters/ft").exists()  # nothing a later run could mistake for an adapter
    killed_at = torch.load(project / CHECKPOINT, weights_only=False)["step"]
    assert 5 <= killed_at < 200

    log = run(["dvc", "repro", TARGET], project)
    assert executed(log) == {"finetune@ft", "evaluate@ft"}
    assert f"resuming after step {killed_at}" in log
    assert not (project / CHECKPOINT).exists()
    _same(_outputs(project), clean)


def _into_stage(log: Path, stage: str, seconds: float = 1.5):
    """A `ready()` that holds `seconds` into the stage's own process: loading or computing, not yet written."""
    started: list[float] = []

    def ready() -> bool:
        if not started and f"Running stage '{stage}'" in log.read_text():
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > seconds

    return ready


@pytest.mark.parametrize("stage", ["prepare", "evaluate@ft"])
def test_killed_stage_reruns_to_the_same_numbers(clean, stage, tmp_path):
    project, log = _project(tmp_path / "project"), tmp_path / "log"
    _kill_during(project, _into_stage(log, stage), log)
    rerun = run(["dvc", "repro", TARGET], project)
    assert stage in executed(rerun)
    _same(_outputs(project), clean)


MERGED_TARGET = "evaluate@ft_merge_q"  # adds calibrate, merge@ft, quantize@base_q and quantize@ft_merge_q


def _merged_outputs(project: Path) -> dict:
    """The requantized merged model's hash, evaluation and LoRA-update measurement (no timings)."""
    metrics = json.loads((project / "metrics/eval/ft_merge_q.json").read_text())
    made = json.loads((project / "models/quantized/ft_merge_q/quantorder.json").read_text())
    return {
        "ppl": (metrics["ppl"], metrics["n_tokens"]),
        "samples": (project / "metrics/eval/ft_merge_q.samples.csv").read_text(),
        "model_sha256": metrics["provenance"]["model_sha256"],
        "update_survival": made["update_survival"],
    }


@pytest.fixture(scope="module")
def clean_merged(tmp_path_factory) -> dict:
    project = _project(tmp_path_factory.mktemp("clean_merged"))
    run(["dvc", "repro", MERGED_TARGET], project)
    return _merged_outputs(project)


@pytest.mark.parametrize(
    "stage,out",
    [
        ("calibrate", "data/calibration"),
        ("merge@ft", "models/merged/ft"),
        ("quantize@ft_merge_q", "models/quantized/ft_merge_q"),
    ],
)
def test_killed_quantization_chain_stage_reruns_to_the_same_numbers(clean_merged, stage, out, tmp_path):
    project, log = _project(tmp_path / "project"), tmp_path / "log"
    _kill_during(project, _into_stage(log, stage, seconds=1.0), log, MERGED_TARGET)
    assert f"Running stage '{stage}'" in log.read_text() and not (project / out).exists()  # killed mid-stage
    rerun = run(["dvc", "repro", MERGED_TARGET], project)
    assert stage in executed(rerun)
    assert _merged_outputs(project) == clean_merged
