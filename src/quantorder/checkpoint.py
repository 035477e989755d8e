"""Fine-tuning checkpoints: a killed run resumes where it stopped and ends with the same numbers.

A checkpoint holds everything the next step depends on: the adapter weights, the optimizer and
schedule state, every process's random generators (dropout), the step, and the log so far. It lives
outside the stage's DVC output (which DVC deletes before rerunning the stage) and is tagged with a
fingerprint of the run's inputs, so a checkpoint of another config, seed, base model or data is
never resumed. It is written to a temporary file and renamed, so a kill while saving leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantorder.io import atomic_file, json_sha256

STATE_FILE = "state.pt"


def fingerprint(inputs: dict[str, Any]) -> str:
    """A short hash of everything that makes two runs the same run."""
    return json_sha256(inputs)[:16]


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch random generators (CPU, and the device's on CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class Checkpointer:
    """Saves a run's state every `every` steps under `folder`, for runs with this `tag` (0: never)."""

    folder: Path
    every: int
    tag: str

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def due(self, step: int, last_step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < last_step

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or None (no checkpoint, or one from other inputs)."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("tag") != self.tag:
            print(f"[finetune] ignoring {self.path}: it was made with other inputs", flush=True)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        with atomic_file(self.path) as tmp:
            torch.save({**state, "tag": self.tag}, tmp)

    def clear(self) -> None:
        """Remove the checkpoints once the run's output is complete."""
        shutil.rmtree(self.folder, ignore_errors=True)
