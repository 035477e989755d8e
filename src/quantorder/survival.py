"""How much of a merged LoRA update survives requantization (ft_merge_q, q_ft_merge_q)."""

from __future__ import annotations

from pathlib import Path

import torch

from quantorder.models import is_quantized, model_config
from quantorder.quantize import load_model, method_of


def _linear_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Name -> (out, in) weight of every linear layer of a model dir, loaded on the CPU: quantized
    ones with float32 scales (their packed ints stay compact), float ones in their stored dtype."""
    method = method_of(model_dir)
    dtype = "float32" if is_quantized(model_dir) else model_config(model_dir).get("dtype", "float32")
    modules = load_model(model_dir, dtype, torch.device("cpu")).named_modules()
    if method is None:
        return {n: m.weight for n, m in modules if isinstance(m, torch.nn.Linear)}
    return {n: m for n, m in modules if method.is_quantized_linear(m)}  # dequantized one at a time, below


def update_survival(before_q: Path, source: Path, merged: Path, after_q: Path) -> dict:
    """How much of a merged LoRA update survives requantization, per layer and overall.

    dW = merged - source is the float update; dQ = after_q - before_q is what the quantized model
    actually changed. `kept` = <dQ, dW> / ||dW||^2 (1: the update survives, 0: it rounded away)
    and `norm_ratio` = ||dQ|| / ||dW||. Layers are widened to float32 one at a time, so memory
    stays near the four models' stored size.
    """
    dirs = (merged, source, after_q, before_q)
    layers = {d: _linear_weights(d) for d in set(dirs)}  # q_ft_merge_q's source is before_q itself
    methods = {d: method_of(d) for d in layers}

    def weight(d: Path, name: str) -> torch.Tensor:
        w = layers[d][name]
        return (methods[d].linear_weight(w) if methods[d] else w).float()

    per_layer, dots, dw_sq, dq_sq = {}, 0.0, 0.0, 0.0
    with torch.no_grad():
        for n in layers[after_q]:
            w_new, w_src, w_after, w_before = (weight(d, n) for d in dirs)
            dw, dq = w_new - w_src, w_after - w_before
            dot, w2, q2 = (dq * dw).sum().item(), dw.pow(2).sum().item(), dq.pow(2).sum().item()
            per_layer[n] = {"kept": dot / w2 if w2 else 0.0, "norm_ratio": (q2 / w2) ** 0.5 if w2 else 0.0}
            dots, dw_sq, dq_sq = dots + dot, dw_sq + w2, dq_sq + q2
    overall = {"kept": dots / dw_sq, "norm_ratio": (dq_sq / dw_sq) ** 0.5}
    return {"overall": overall, "per_layer": per_layer}
