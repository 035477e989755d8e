"""What every output records about how it was made: versions, commit, seeds, content hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from quantorder.io import json_sha256, read_json
from quantorder.layout import BASE_DIR, PROVENANCE_FILE, QA_DIR

TOOLS = ("sympy", "dvc", "mlflow", "hydra-core")  # the data source and the pipeline's tools, imported or not


def library_versions() -> dict[str, str]:
    """Python and the installed version of every distribution this process has imported (torch,
    transformers, peft, the quantization backend, ...) plus TOOLS: what shaped the numbers."""
    imported = {name.partition(".")[0] for name in list(sys.modules)} - set(sys.stdlib_module_names)
    providers = importlib.metadata.packages_distributions()
    names = {dist for module in imported for dist in providers.get(module, ())} | set(TOOLS)
    versions = {"python": platform.python_version()}
    for name in sorted(names - {"quantorder"}, key=str.lower):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def git_commit(cwd: str | Path = ".") -> str | None:
    """HEAD commit of the repository containing `cwd`, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def hash_file(path: str | Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_dir(path: str | Path, suffixes: tuple[str, ...] = (".safetensors", ".gguf", ".json", ".jsonl")) -> str:
    """sha256 over the relative names and contents of the files in `path` with the given suffixes.

    Provenance files (`quantorder.json`) are excluded so that a hash never covers itself.
    """
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes and p.name != PROVENANCE_FILE)
    h = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=16) as pool:  # hashlib frees the GIL: a model's shards at once
        for f, digest in zip(files, pool.map(hash_file, files)):
            h.update(str(f.relative_to(root)).encode())
            h.update(digest.encode())
    return h.hexdigest()


def hash_adapter(adapter_dir: str | Path) -> str:
    """sha256 of a PEFT adapter: its weights and its config, not its training log (which holds
    timings). PEFT writes `target_modules` from a set, in an order that changes from run to run:
    hashed sorted."""
    config = read_json(Path(adapter_dir) / "adapter_config.json")
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return json_sha256([hash_dir(adapter_dir, suffixes=(".safetensors",)), config])


def made_from(model_dir: Path, adapter_dir: Path | None, **settings: dict | None) -> dict:
    """What one variant's numbers rest on: `settings` (config sections), the seed its adapter was
    trained with, the algorithm its quantized weights came from, the content hashes of its model,
    adapter, base and data, the commit and the library versions."""
    model = read_json(model_dir / PROVENANCE_FILE)
    return {
        "seed": read_json(adapter_dir / PROVENANCE_FILE)["seed"] if adapter_dir else None,
        **settings,
        "algo": model.get("algo"),
        "model_sha256": model["sha256"],
        "adapter_sha256": hash_adapter(adapter_dir) if adapter_dir else None,
        "base_sha256": read_json(BASE_DIR / PROVENANCE_FILE)["sha256"],
        "data_sha256": read_json(QA_DIR / "manifest.json")["sha256"],
        "git_commit": git_commit(),
        "versions": library_versions(),
    }
