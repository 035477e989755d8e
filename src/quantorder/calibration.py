"""Calibration windows: seeded, non-overlapping token windows drawn from a text."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantorder.config import CalibCfg, as_dict
from quantorder.errors import UserError
from quantorder.io import read_json, write_json

SAMPLES_FILE = "samples.safetensors"
MANIFEST_FILE = "manifest.json"


def draw_windows(tokenizer, text: str, cfg: CalibCfg) -> torch.Tensor:
    """`cfg.n_samples` windows of `cfg.seq_len` tokens, picked by a seeded shuffle of all windows.

    Raises:
        UserError: the text holds fewer whole windows than asked for.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // cfg.seq_len
    if available < cfg.n_samples:
        raise UserError(
            f"calib.n_samples={cfg.n_samples}: the '{cfg.name}' text holds only {available} windows of "
            f"calib.seq_len={cfg.seq_len} tokens; lower one of them"
        )
    starts = list(range(available))
    random.Random(cfg.seed).shuffle(starts)
    picked = sorted(starts[: cfg.n_samples])
    return torch.tensor([ids[s * cfg.seq_len : (s + 1) * cfg.seq_len] for s in picked], dtype=torch.long)


def save_calibration(out_dir: Path, windows: torch.Tensor, text: str, cfg: CalibCfg) -> dict:
    save_file({"input_ids": windows.contiguous()}, str(out_dir / SAMPLES_FILE))
    manifest = {
        "calib": as_dict(cfg),
        "n_samples": windows.shape[0],
        "seq_len": windows.shape[1],
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def load_calibration(calib_dir: Path) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Samples in the form quantization backends take, and the manifest that describes them."""
    if not (calib_dir / SAMPLES_FILE).is_file():
        raise UserError(f"{calib_dir / SAMPLES_FILE} missing; run `dvc repro calibrate`")
    ids = load_file(str(calib_dir / SAMPLES_FILE))["input_ids"]
    samples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    return samples, read_json(calib_dir / MANIFEST_FILE)
