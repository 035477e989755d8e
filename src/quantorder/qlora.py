"""The q_ft adapter beyond PEFT's default LoRA (config section `qlora`): LoftQ initialisation and
QA-LoRA's group-pooled adapter.

- LoftQ (Li et al., 2023): the adapter starts at the best rank-r approximation of the base's
  quantization error, scaling * B @ A = SVD_r(W - Q(W)), so training starts near the float model
  instead of the quantized one. The quantized base is base_q, shared with every other variant, so
  this is LoftQ's one-step form, PEFT's `replace_lora_weights_loftq`. That function serves
  bitsandbytes 4-bit layers on CUDA only and sets B @ A (not scaling * B @ A) to the SVD; this one
  reads Q(W) through the quantization interface (every method, CPU or GPU) and divides by the scaling.
- QA-LoRA (Xu et al., 2023; PEFT `use_qalora`): A sees the input averaged over each quantization
  group, so the update B @ A is constant within a group: the part a zero point can absorb. PEFT
  trains it on GPTQ-format layers; `load_adapter` turns it into the plain LoRA adapter that computes
  the same update, to merge it into a float or dequantized base.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from quantorder.config import QLoRACfg
from quantorder.models import model_config
from quantorder.quantize.base import Quantizer

PEFT_PREFIX = "base_model.model."  # PeftModel's module names: this + the transformers model's


def lora_options(qlora: QLoRACfg, base_dir: Path) -> dict:
    """Extra LoraConfig settings for an adapter trained on the quantized base in `base_dir`."""
    if not qlora.qalora:
        return {}
    return {"use_qalora": True, "qalora_group_size": model_config(base_dir)["quantization_config"]["group_size"]}


def _checkpoint_tensors(model_dir: Path) -> Callable[[str], torch.Tensor]:
    """A reader of single tensors of a (possibly sharded) safetensors model dir, by name."""
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            files |= dict.fromkeys(f.keys(), file)

    def read(name: str) -> torch.Tensor:
        with safe_open(files[name], framework="pt") as f:
            return f.get_tensor(name)

    return read


@torch.no_grad()
def loftq_init(model: torch.nn.Module, float_dir: Path, method: type[Quantizer]) -> tuple[float, float]:
    """Set every LoRA layer of the PEFT `model` (on a base quantized by `method`) so that
    scaling * B @ A is the rank-r truncated SVD of W - Q(W), W read from `float_dir`.

    Returns the quantization error of the adapted layers, ||W - Q|| / ||W||, before and after
    (with Q + scaling * B @ A in place of Q), Frobenius norms over all adapted layers together.
    """
    from peft.tuners.lora import LoraLayer

    read = _checkpoint_tensors(float_dir)
    before = after = total = 0.0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        quantized = method.linear_weight(layer.get_base_layer()).float()
        weight = read(f"{name.removeprefix(PEFT_PREFIX)}.weight").to(quantized.device, torch.float32)
        error = weight - quantized
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        r = a.shape[0]
        root = (s[:r] / layer.scaling["default"]).sqrt()
        b.copy_(u[:, :r] * root)
        a.copy_(root[:, None] * vh[:r])
        left = error - layer.scaling["default"] * (b.float() @ a.float())
        before += error.square().sum().item()
        after += left.square().sum().item()
        total += weight.square().sum().item()
    return (before / total) ** 0.5, (after / total) ** 0.5


def load_adapter(model: torch.nn.Module, adapter_dir: Path):
    """`PeftModel.from_pretrained` for a float `model`. A QA-LoRA adapter loads as the plain LoRA
    adapter that computes the same update: A (r, in / g) acts on input averaged over groups of g
    and scaled by in / g (PEFT's pooling), so each column of A repeats g times, times (in / g) / g."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    config = LoraConfig.from_pretrained(adapter_dir)
    if not config.use_qalora:
        return PeftModel.from_pretrained(model, adapter_dir)
    group = config.qalora_group_size
    config.use_qalora = False
    state = {
        k: v.repeat_interleave(group, dim=1) * (v.shape[1] / group) if ".lora_A." in k else v
        for k, v in load_peft_weights(str(adapter_dir)).items()
    }
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise ValueError(f"{adapter_dir}: adapter tensors the model has no place for: {result.unexpected_keys[:3]}")
    return peft_model
