"""Several GPUs of one host: data-parallel fine-tuning processes, and one GPU per stage process.

Data parallel (`finetune.devices` > 1): the finetune stage relaunches itself under torchrun
(`torch.distributed.run`, one process per GPU; on a CPU, processes on the gloo backend). Each
process holds the whole model and takes every W-th micro-batch of the single-process order, so a
step sees the same examples as on one device and the loss curve is the same up to float rounding
(with LoRA dropout, each process draws its own masks: the same in distribution, not bit for bit).

GPU pinning: when several GPUs are visible and CUDA_VISIBLE_DEVICES is unset, a stage process
claims free GPUs with an exclusive lock per GPU (under the system temp dir, shared by every
process of the host) and sets CUDA_VISIBLE_DEVICES before CUDA starts. So `dvc queue start -j 3`
runs three experiments on three GPUs, and a fourth waits for one to free up.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from quantorder.errors import UserError

LOCK_DIR = Path(tempfile.gettempdir()) / "quantorder-gpu-locks"
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for this process when its parent dies
_claimed: list[object] = []  # open lock files, held until the process exits


def is_worker() -> bool:
    """True inside a process that torchrun started."""
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def gpu_count() -> int:
    """GPUs this process may use, without starting CUDA (which would freeze CUDA_VISIBLE_DEVICES)."""
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if not shutil.which("nvidia-smi"):
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0


def claim_gpus(n: int, poll_s: float = 2.0) -> None:
    """Pin this process (and its children) to `n` GPUs no other quantorder process holds, waiting
    for them if need be. No-op when CUDA_VISIBLE_DEVICES is set, in torchrun workers, once
    claimed, and where at most one GPU exists."""
    if _claimed or is_worker() or "CUDA_VISIBLE_DEVICES" in os.environ:
        return
    total = gpu_count()
    if total <= 1:
        return
    if n > total:
        raise UserError(f"finetune.devices={n}: this host has {total} GPUs")
    LOCK_DIR.mkdir(exist_ok=True)
    while True:
        held = []
        for gpu in range(total):
            lock = (LOCK_DIR / f"gpu{gpu}.lock").open("w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append((gpu, lock))
            except BlockingIOError:
                lock.close()
            if len(held) == n:
                _claimed.extend(lock for _, lock in held)
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu, _ in held)
                return
        for _, lock in held:
            lock.close()  # releases it
        time.sleep(poll_s)


def processes(devices: int, model_device: str) -> int:
    """How many data-parallel processes `finetune.devices` asks for on `model.device` (0: one
    per visible GPU, or one on a CPU)."""
    if devices == 0:
        return max(gpu_count(), 1) if model_device in ("auto", "cuda") else 1
    return devices


def relaunch(devices: int, grad_accum: int, model_device: str, argv: list[str]) -> bool:
    """In the stage's own process, when `finetune.devices` asks for several: run `argv` as that many
    torchrun workers on GPUs of their own and return True (the workers do the work); else False.

    Raises:
        UserError: `grad_accum` is no multiple of the process count.
    """
    n = processes(devices, model_device)
    if n <= 1 or is_worker():
        return False
    if grad_accum % n:
        raise UserError(
            f"finetune.grad_accum={grad_accum}: must be a multiple of finetune.devices "
            f"({n} processes), so that each takes the same share of every step"
        )
    if model_device != "cpu":
        claim_gpus(n)
    launch(n, argv)
    return True


def launch(n: int, argv: list[str]) -> None:
    """Run `argv` (a Python script and its arguments) as `n` torchrun processes; wait for them.

    Raises:
        SystemExit: with the workers' exit code if one failed (their errors are already printed).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))}
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        raise SystemExit(done.returncode)


def _die_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so killing the stage's process group (a
    lost job, a SIGKILLed `dvc repro`) would leave the workers training and writing outputs behind a
    later run's back. On Linux, ask the kernel to kill this worker when its torchrun agent dies."""
    if not sys.platform.startswith("linux"):
        return
    agent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != agent:  # the agent died before the request
        os._exit(1)


def init_worker(device: torch.device) -> None:
    """Join the process group torchrun set up: NCCL on GPUs, gloo on CPUs."""
    if is_worker() and not torch.distributed.is_initialized():
        _die_with_launcher()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def finish_worker() -> None:
    """Leave the process group (every process, once its work is saved)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over the processes (the values themselves on one process)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any) -> list[Any]:
    """`obj` of every process, by rank (`[obj]` on one process)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
