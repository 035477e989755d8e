"""4-bit group-quantized layers (GPTQ, RTN, AWQ checkpoints) on PyTorch's own int4 matmul,
"tinygemm" (`aten._weight_int4pack_mm`, the kernel torchao's int4 weight-only tensors call): a
plain ATen op, so torch.compile keeps a decoding step in one graph and CUDA graphs replay it.

tinygemm computes w = (c - 8) * s + z per group, with codes c in 0..15 and a bf16 scale s and
offset z. A checkpoint's weight is (q - zero) * s with whole steps q - zero; shifted by k into 0..15
they are the codes, and z = (8 - k) * s: the same grid, with the scale and offset rounded to bf16
(the checkpoint keeps float16 scales). k is taken nearest 8, so z is small (0 for a symmetric grid).
"""

from __future__ import annotations

import torch

from quantorder.quantize.base import Quantizer

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel supports


class TinyGemmLinear(torch.nn.Module):
    """A linear layer whose weight is held in tinygemm's packed int4 layout; computes in bf16."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None):
        """`weight` (out, in): the dequantized checkpoint weight; `scales` (in / group_size, out): its
        per-group scales."""
        super().__init__()
        out_features, in_features = weight.shape
        groups = in_features // group_size
        scale = scales.float().t().reshape(out_features, groups, 1)
        steps = torch.round(weight.float().reshape(out_features, groups, group_size) / scale)
        lowest, highest = steps.amin(-1, keepdim=True), steps.amax(-1, keepdim=True)
        if (highest - lowest).max() > 15:
            raise ValueError(f"a group spans more than 16 steps: not a 4-bit grid of group size {group_size}")
        shift = torch.clamp(torch.full_like(lowest, 8), -lowest, 15 - highest)  # nearest 8: the smallest offset
        codes = (steps + shift).reshape(out_features, in_features).to(torch.int32)
        offset = (8 - shift) * scale  # 0 for a symmetric grid
        # (groups, out, 2): scale and offset per group, the layout the kernel reads
        self.register_buffer("scales_and_zeros", torch.cat([scale, offset], -1).transpose(0, 1).bfloat16().contiguous())
        self.register_buffer("packed", _pack(codes, in_features))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().bfloat16(), requires_grad=False)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).bfloat16()
        matmul = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        out = matmul(flat, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _pack(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """Codes (out, in) in tinygemm's tiled layout, with the most inner k-tiles `in_features` allows."""
    inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
    if codes.is_cuda:  # two codes a byte, the even one in the high nibble
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()  # the op reads memory as laid out
        return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)


def _group_size(module: torch.nn.Module) -> int:
    """A quantized layer's group size, a whole row where the checkpoint says -1."""
    return module.in_features if module.group_size == -1 else module.group_size


def supported(module: torch.nn.Module) -> str | None:
    """Why a quantized layer cannot run on tinygemm, or None if it can."""
    group_size = _group_size(module)
    if module.bits != 4:
        return f"{module.bits}-bit weights (tinygemm computes 4 bits)"
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} (tinygemm takes {', '.join(map(str, GROUP_SIZES))})"
    if module.in_features % 32 or module.out_features % 8:
        return f"shape {module.out_features} x {module.in_features} (in a multiple of 32, out of 8)"
    g_idx = getattr(module, "g_idx", None)
    if g_idx is not None and not torch.equal(g_idx.cpu(), torch.arange(module.in_features) // group_size):
        return "act-order (desc_act) groups, which tinygemm cannot gather"
    return None


def to_tinygemm(model: torch.nn.Module, method: type[Quantizer]) -> int:
    """Replace every quantized linear layer of `model` (loaded by `method`, a GPTQModel-format
    quantizer) with a TinyGemmLinear of the same grid, on the layer's device. Returns how many;
    raises ValueError naming the first layer tinygemm cannot compute, before replacing any."""
    layers = [(name, m) for name, m in model.named_modules() if method.is_quantized_linear(m)]
    for name, module in layers:
        if reason := supported(module):
            raise ValueError(f"{name}: {reason}")
    for name, module in layers:
        bias = getattr(module, "bias", None)
        with torch.no_grad():
            fast = TinyGemmLinear(method.linear_weight(module), module.scales, _group_size(module), bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, fast)
    return len(layers)
