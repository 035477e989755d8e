"""Put a quantized checkpoint back into its architecture's own module layout.

GPTQModel quantizes some architectures with a fused projection split in two (Phi-3's `gate_up_proj`
into `gate_proj` and `up_proj`, quantized as separate layers) and saves them split. transformers
builds the model's own classes, finds no `gate_up_proj` in such a checkpoint and initializes it
randomly. Both halves see the same input, so the fused layer is exactly their concatenation along
the output features: packed weights, zero points and scales side by side, one shared group index.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

FUSED = {"gate_up_proj": ("gate_proj", "up_proj")}  # fused module -> its halves, in output order
WEIGHTS_INDEX = "model.safetensors.index.json"


def _module_names(model_dir: Path) -> set[str]:
    """Module names of the architecture in `model_dir`'s config, built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.quantization_config = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name for name, _ in model.named_modules()}


def _fuse(first: torch.Tensor, second: torch.Tensor, tensor: str, key: str) -> torch.Tensor:
    if tensor == "g_idx":  # the input channels' groups: the same for both halves
        if not torch.equal(first, second):
            raise ValueError(f"{key}: the two halves have different group indices, cannot fuse")
        return first
    # float weight [out, in] and bias [out]: output features first; packed qweight, qzeros and
    # scales of the GPTQ and AWQ formats: output features (or packs of them) in the last dim
    return torch.cat([first, second], dim=0 if tensor in ("weight", "bias") else -1)


def fuse_split_layers(model_dir: Path) -> list[str]:
    """Rewrite the weights in `model_dir` so every module its architecture fuses is one tensor set
    again; return the fused module names (none for most architectures: then nothing is written)."""
    from huggingface_hub import save_torch_state_dict

    first_halves = {first: target for target, (first, _) in FUSED.items()}  # gate_proj -> gate_up_proj
    files = sorted(model_dir.glob("*.safetensors"))
    keys = [key for f in files for key in safe_open(f, "pt").keys()]
    candidates = [k for k in keys if k.rpartition(".")[0].rpartition(".")[2] in first_halves]
    modules = _module_names(model_dir) if candidates else set()
    pairs = []  # (first half's key, second half's key, fused key), decided from names alone
    for key in candidates:
        module, _, tensor = key.rpartition(".")
        parent, _, name = module.rpartition(".")
        target = first_halves[name]
        if f"{parent}.{target}" in modules:
            pairs.append((key, f"{parent}.{FUSED[target][1]}.{tensor}", f"{parent}.{target}.{tensor}"))
    if not pairs:  # the architecture fuses nothing the checkpoint holds split: its weights are not read
        return []
    state = {k: v for f in files for k, v in load_file(f).items()}
    for first, second, fused_key in pairs:
        state[fused_key] = _fuse(state.pop(first), state.pop(second), fused_key.rpartition(".")[2], first)
    for f in files:
        f.unlink()
    (model_dir / WEIGHTS_INDEX).unlink(missing_ok=True)
    save_torch_state_dict(state, model_dir, metadata={"format": "pt"})
    return sorted({fused_key.rpartition(".")[0] for _, _, fused_key in pairs})
