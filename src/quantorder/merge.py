"""Fold a LoRA adapter into its base: float merge, after dequantizing a quantized base."""

from __future__ import annotations

from pathlib import Path

import torch

from quantorder.models import is_quantized, load_model, model_config


def is_int_linear(module: torch.nn.Module) -> bool:
    """An int-packed linear layer of GPTQModel (GPTQ or AWQ format)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return isinstance(module, BaseQuantLinear)


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight a linear layer computes with, dequantized if it is int-packed."""
    if not is_int_linear(module):
        return module.weight
    if hasattr(module, "dequantize_weight"):
        # The class's eager method: GPTQModel's torch-family kernels wrap `dequantize_weight` per
        # instance in torch.compile, which compiles anew for every layer (minutes for a 3.8B model).
        return type(module).dequantize_weight(module).t()  # GPTQModel returns (in_features, out_features)
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(module.qweight, module.qzeros, module.scales, module.bits, module.group_size).t()


def dequantize(model, dtype: torch.dtype):
    """A float model of the same architecture whose linear layers hold the dequantized weights.

    Returns a fresh transformers model (no quantization config), ready for PEFT merging and for
    `save_pretrained` as a plain float checkpoint.
    """
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    state = {}
    quant_prefixes = []
    for name, module in model.named_modules():
        if is_int_linear(module):
            state[f"{name}.weight"] = linear_weight(module).to(dtype).contiguous()
            if getattr(module, "bias", None) is not None:
                state[f"{name}.bias"] = module.bias.to(dtype)
            quant_prefixes.append(f"{name}.")
    for name, tensor in model.state_dict().items():
        if not name.startswith(tuple(quant_prefixes)):
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    with torch.device("meta"):  # no random init of weights the state replaces
        float_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _, unexpected = float_model.load_state_dict(state, strict=False, assign=True)
    buffers = dict(model.named_buffers())  # non-persistent ones (rotary frequencies) are in no state dict
    for name, buffer in list(float_model.named_buffers()):
        if buffer.is_meta and name in buffers:
            module, _, leaf = name.rpartition(".")
            float_model.get_submodule(module).register_buffer(leaf, buffers[name].clone(), persistent=False)
    if config.tie_word_embeddings:
        float_model.tie_weights()
    # whatever the state left unset is still on the meta device (tied weights are set by now)
    missing = [n for n, t in [*float_model.named_parameters(), *float_model.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise RuntimeError(
            f"dequantized state does not match the float architecture: missing {missing}, unexpected {unexpected}"
        )
    return float_model.to(next(model.parameters()).device)


def merge_adapter(base_dir: Path, adapter_dir: Path, dtype: str, device: torch.device):
    """Load base (dequantizing it if int-packed), apply the adapter, merge: a plain float model."""
    from peft import PeftModel

    # The trainable kernels keep the checkpoint's packed layout, which dequantization reads (Marlin repacks it).
    model = load_model(base_dir, dtype, device, training=True)
    if is_quantized(base_dir):
        model = dequantize(model, getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return merged


def _linear_layers(model_dir: Path) -> dict[str, torch.nn.Module]:
    """The modules of a model dir on the CPU: int-packed ones with float32 scales (their packed ints
    stay compact), float ones in their stored dtype (bf16 widens to float32 exactly, layer by layer)."""
    dtype = "float32" if is_quantized(model_dir) else model_config(model_dir).get("dtype", "float32")
    return dict(load_model(model_dir, dtype, torch.device("cpu")).named_modules())


def update_survival(before_q: Path, source: Path, merged: Path, after_q: Path) -> dict:
    """How much of a merged LoRA update survives requantization, per layer and overall.

    dW = merged - source is the float update; dQ = Q(merged) - Q(source) is what the quantized
    model actually changed. `kept` = <dQ, dW> / ||dW||^2 (1: the update survives, 0: it rounded
    away) and `norm_ratio` = ||dQ|| / ||dW||. Layers are widened to float32 one at a time, so
    memory stays near the four models' stored size.
    """
    after = _linear_layers(after_q)
    before = _linear_layers(before_q)
    new = _linear_layers(merged)
    src = before if source == before_q else _linear_layers(source)  # q_ft_merge_q started from Q(W)
    per_layer, dots, dw_sq, dq_sq = {}, 0.0, 0.0, 0.0
    with torch.no_grad():
        for n in [n for n, m in after.items() if is_int_linear(m)]:
            w_new, w_src, w_after, w_before = (linear_weight(m[n]).float() for m in (new, src, after, before))
            dw, dq = w_new - w_src, w_after - w_before
            dot, w2, q2 = (dq * dw).sum().item(), dw.pow(2).sum().item(), dq.pow(2).sum().item()
            per_layer[n] = {"kept": dot / w2 if w2 else 0.0, "norm_ratio": (q2 / w2) ** 0.5 if w2 else 0.0}
            dots, dw_sq, dq_sq = dots + dot, dw_sq + w2, dq_sq + q2
    overall = {"kept": dots / dw_sq, "norm_ratio": (dq_sq / dw_sq) ** 0.5}
    return {"overall": overall, "per_layer": per_layer}
