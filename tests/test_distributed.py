"""Data-parallel fine-tuning: the finetune stage relaunches itself as 2 gloo processes on a CPU and
trains the same steps as one process; GPU pinning claims distinct GPUs per process."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantorder import distributed

from .conftest import ROOT

STEPS = 4


def _stage(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True)


def _compose(project: Path, devices: int, *extra: str) -> None:
    overrides = ["+experiment=tiny", "model.device=cpu", "finetune.grad_accum=2", f"finetune.max_steps={STEPS}"]
    # no LoRA dropout: its masks come from each process's own random stream
    overrides += ["finetune.dropout=0", "finetune.log_every=1", f"finetune.devices={devices}", *extra]
    done = _stage(project, "-m", "quantorder", "compose", *overrides)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A project with the tiny experiment's data and base model (the prepare stage's outputs)."""
    project = tmp_path_factory.mktemp("dp")
    for item in ("conf", "stages"):
        shutil.copytree(ROOT / item, project / item, ignore=shutil.ignore_patterns("__pycache__"))
    _compose(project, 1)
    done = _stage(project, "stages/prepare.py")
    assert done.returncode == 0, done.stderr[-2000:]
    return project


def _finetune(project: Path, devices: int) -> tuple[list[dict], dict, str]:
    """Fine-tune `ft` with `devices` processes; its train log, provenance and stage output."""
    _compose(project, devices)
    done = _stage(project, "stages/finetune.py", "ft")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    adapter = project / "models" / "adapters" / "ft"
    log = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]
    return log, json.loads((adapter / "quantorder.json").read_text()), done.stdout


def test_two_processes_train_the_same_steps_as_one(prepared):
    one_log, one, _ = _finetune(prepared, 1)
    two_log, two, out = _finetune(prepared, 2)
    assert one["result"]["processes"] == 1 and two["result"]["processes"] == 2
    assert [r["step"] for r in two_log] == list(range(1, STEPS + 1))
    # each process takes one of the step's two micro-batches; gradients are summed: the same step
    for a, b in zip(one_log, two_log):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert two["result"]["val_loss"] == pytest.approx(one["result"]["val_loss"], rel=1e-5)
    assert one_log[-1]["loss"] < one_log[0]["loss"]  # it trained
    # one closing line for the stage, from the first process
    assert out.count("[finetune@ft]") == 1 and "on 2 processes" in out


def test_two_processes_resume_after_a_kill(prepared):
    """Each process's dropout stream is in the checkpoint: the resumed pair ends as an unbroken pair."""
    _compose(prepared, 2, "finetune.max_steps=8", "finetune.checkpoint_every=2", "finetune.dropout=0.1")
    unbroken = _stage(prepared, "stages/finetune.py", "ft")
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    expected = (prepared / "models/adapters/ft/train_log.jsonl").read_text().splitlines()
    state = prepared / "checkpoints/finetune@ft/state.pt"
    assert not state.exists()

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, "stages/finetune.py", "ft"],
        cwd=prepared,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not state.exists() and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = _stage(prepared, "stages/finetune.py", "ft")
    assert resumed.returncode == 0 and "resuming after step" in resumed.stdout, resumed.stderr[-2000:]
    got = (prepared / "models/adapters/ft/train_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in got] == [json.loads(r)["loss"] for r in expected]


def test_devices_must_divide_the_accumulation_steps(prepared):
    _compose(prepared, 3)
    done = _stage(prepared, "stages/finetune.py", "ft")
    assert done.returncode == 2
    assert "error: finetune.grad_accum=2: must be a multiple of finetune.devices (3 processes)" in done.stderr
    assert "Traceback" not in done.stderr


def test_gpu_claims_are_exclusive_and_wait(tmp_path, monkeypatch):
    """On a 2-GPU host with GPU 0 held elsewhere a process gets GPU 1; the next one waits."""
    monkeypatch.setattr(distributed, "LOCK_DIR", tmp_path)
    monkeypatch.setattr(distributed, "gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    other = (tmp_path / "gpu0.lock").open("w")
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process holds GPU 0
    first: list = []
    monkeypatch.setattr(distributed, "_claimed", first)
    distributed.claim_gpus(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and len(first) == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(distributed, "_claimed", [])
    with pytest.raises(TimeoutError):  # both GPUs held: it waits (here until the alarm gives up)
        _claim_within(1.0)
    other.close()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    distributed.claim_gpus(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # GPU 0 came free
    for lock in [*first, *distributed._claimed]:
        lock.close()


def _claim_within(seconds: float) -> None:
    def give_up(*_):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        distributed.claim_gpus(1, poll_s=0.05)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
