"""A killed stage loses nothing: `dvc repro` afterwards ends with the numbers of a run never killed.

On the tiny model: one copy of the project runs the float chain and the chain to `ft_merge_q`
(calibrate, merge, quantize) undisturbed. Each test copies it, reruns one stage and SIGKILLs it (its
whole process group, as a lost machine would be) partway through; the next `dvc repro` must
recompute that stage and end with the numbers and model hashes of the undisturbed run (for a
resumed fine-tune: the same adapter weights and loss curve, which fix every number downstream).

Each copy lives in another directory, so the same tests show that one config and seed give the same
numbers: each stage that makes a model or numbers (finetune, merge, quantize, evaluate of a quantized
model) runs again from nothing there and reproduces its outputs byte for byte (prepare's own
determinism: tests/test_data.py; an evaluation's atomic write: tests/test_bad_input.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .project import env, executed, make_project, run

pytestmark = pytest.mark.slow
TARGETS = ["evaluate@ft", "evaluate@ft_merge_q"]  # the float chain, and the chain through calibrate, merge, quantize
CHECKPOINT = Path("checkpoints/finetune@ft/state.pt")
OVERRIDES = ["+experiment=tiny", "finetune.max_steps=12", "finetune.checkpoint_every=3", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A copy of the project composed for the tiny model, with enough steps that a kill lands
    mid-training, run to the end once, undisturbed."""
    project = make_project(tmp_path_factory.mktemp("clean"))
    run([sys.executable, "-m", "quantorder", "compose", *OVERRIDES], project)
    run(["dvc", "repro", *TARGETS], project)
    assert not (project / CHECKPOINT).exists()  # a completed run leaves no checkpoint behind
    return project


def _copy(clean: Path, tmp_path: Path) -> Path:
    """The finished project (workspace, git, dvc.lock, DVC cache) without DVC's run-cache, so that a
    killed stage cannot be restored from an earlier run of it: DVC must run it again."""
    project = tmp_path / "project"
    shutil.copytree(clean, project, symlinks=True, ignore=lambda d, _: ["runs"] if d.endswith("/.dvc/cache") else [])
    return project


def _outputs(project: Path) -> dict:
    """What the runs made: adapter weights, training result and loss curve, every evaluation's numbers
    (no timings), the content hash of every model dir."""
    adapter = project / "models/adapters/ft"
    result = json.loads((adapter / "quantorder.json").read_text())["result"]
    evals = {}
    for v in ("ft", "ft_merge_q"):
        metrics = json.loads((project / "metrics/eval" / f"{v}.json").read_text())
        evals[v] = (metrics["ppl"], metrics["n_tokens"], metrics.get("update_survival"))
        evals[v] += ((project / "metrics/eval" / f"{v}.samples.csv").read_text(),)
    made = {
        d: json.loads((project / "models" / d / "quantorder.json").read_text())["sha256"]
        for d in ("base", "merged/ft", "quantized/base_q", "quantized/ft_merge_q")
    }
    return {
        "weights": load_file(adapter / "adapter_model.safetensors"),
        "loss": (result["final_loss"], result["val_loss"]),
        "log": [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (adapter / "train_log.jsonl").open())],
        "evals": evals,
        "made": made,
        "calibration": json.loads((project / "data/calibration/manifest.json").read_text())["sha256"],
    }


def _same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    assert all((a["weights"][k] == b["weights"][k]).all() for k in a["weights"])
    assert {k: v for k, v in a.items() if k != "weights"} == {k: v for k, v in b.items() if k != "weights"}


def _kill_during(project: Path, stage: str, ready, log: Path) -> None:
    """Run `stage` as if it had never completed (its entry gone from `dvc.lock`, as after a crash
    mid-stage) and SIGKILL its process group once `ready()` holds, as a lost machine would; it must
    still be running."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    del lock["stages"][stage]
    (project / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["dvc", "repro", "--single-item", stage],
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


def _rerun(project: Path) -> str:
    """The next `dvc repro`."""
    return run(["dvc", "repro", *TARGETS], project)


def test_killed_finetune_resumes_from_its_checkpoint_and_ends_identical(clean, tmp_path, monkeypatch):
    # checkpoints outside the workspace, as `quantorder grid --checkpoints` puts them on shared storage
    shared = tmp_path / "shared-checkpoints"
    monkeypatch.setenv("QUANTORDER_CHECKPOINTS", str(shared))
    checkpoint = shared / CHECKPOINT.relative_to("checkpoints")
    project = _copy(clean, tmp_path)
    _kill_during(project, "finetune@ft", checkpoint.is_file, tmp_path / "log")
    assert not (project / "models/adapters/ft").exists()  # nothing a later run could mistake for an adapter
    killed_at = torch.load(checkpoint, weights_only=False)["step"]
    assert 3 <= killed_at < 12 and not (project / CHECKPOINT).exists()

    log = run(["dvc", "repro", "finetune@ft"], project)  # identical weights make identical numbers downstream
    assert "finetune@ft" in executed(log)
    assert f"resuming after step {killed_at}" in log
    assert not checkpoint.exists()
    resumed, undisturbed = _outputs(project), _outputs(clean)
    _same(*({k: run[k] for k in ("weights", "loss", "log")} for run in (resumed, undisturbed)))


def _into_stage(log: Path, stage: str, seconds: float = 1.0):
    """A `ready()` that holds `seconds` into the stage's own process: loading or computing, not yet written."""
    started: list[float] = []

    def ready() -> bool:
        if not started and f"Running stage '{stage}'" in log.read_text():
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > seconds

    return ready


@pytest.mark.parametrize(
    "stage,out",
    [
        ("merge@ft", "models/merged/ft"),
        ("quantize@ft_merge_q", "models/quantized/ft_merge_q"),
    ],
)
def test_killed_stage_reruns_to_the_same_numbers(clean, stage, out, tmp_path):
    project, log = _copy(clean, tmp_path), tmp_path / "log"
    _kill_during(project, stage, _into_stage(log, stage), log)
    assert f"Running stage '{stage}'" in log.read_text() and not (project / out).exists()  # killed mid-stage
    assert stage in executed(_rerun(project))
    _same(_outputs(project), _outputs(clean))
