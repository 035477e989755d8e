"""Decode-shaped matmul time of each quantized linear layer of one decoder layer against a bf16
linear of the same shape, on a GPU: inside a CUDA graph (the kernels' own time, as a compiled
decoding step replays them) and eagerly (with the launch overhead `generate` pays per call). The
sum over the layer bounds what the format can gain in decoding speed at that batch size.

Usage (a GPU host, after `python stages/quantize.py base_q`):
    python benchmarks/linear_kernels.py                    # base_q's kernels (Marlin, Triton, torchao, ...)
    python benchmarks/linear_kernels.py --torchao-int4     # base in torchao's int4 (tinygemm) instead
    python benchmarks/linear_kernels.py --batch 16 --out benchmarks/results/linear-kernels-b16.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from quantorder.config import load_config
from quantorder.io import write_json, write_text
from quantorder.provenance import device_name
from quantorder.quantize import load_model
from quantorder.variants import VARIANTS


def graph_us(fn: Callable[[], torch.Tensor], calls: int = 20, replays: int = 20) -> float:
    """Microseconds per call of `fn`, captured `calls` times in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocations, lazy kernel loads)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (calls * replays)


def eager_us(fn: Callable[[], torch.Tensor], calls: int = 400) -> float:
    """Microseconds per call of `fn`, launched one call at a time from Python."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / calls


def measure(layer: torch.nn.Module, batch: int, device: torch.device) -> list[dict]:
    """Each linear module of `layer` (quantized or not) against a random bf16 linear of its shape."""
    rows = []
    for name, module in layer.named_modules():
        if not hasattr(module, "in_features"):
            continue
        x = torch.randn(batch, 1, module.in_features, dtype=torch.bfloat16, device=device)
        w = torch.randn(module.out_features, module.in_features, dtype=torch.bfloat16, device=device)
        row = {"module": name, "kernel": type(module).__name__, "in": module.in_features, "out": module.out_features}
        for key, fn in (("quantized", lambda: module(x)), ("bf16", lambda: torch.nn.functional.linear(x, w))):
            row[f"{key}_graph_us"], row[f"{key}_eager_us"] = graph_us(fn), eager_us(fn)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    head = (
        f"Device: {result['device']}; `{result['variant']}`, decoder layer {result['layer']}, batch {result['batch']}, "
        "one new token. bf16 / quantized time: above 1 the quantized kernel is faster.\n\n"
        "| module | kernel | in x out | quantized, graph us | bf16, graph us | ratio "
        "| quantized, eager us | bf16, eager us |\n"
        "|---|---|---|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['module']} | {r['kernel']} | {r['in']} x {r['out']} | {r['quantized_graph_us']:.1f} | "
        f"{r['bf16_graph_us']:.1f} | {r['bf16_graph_us'] / r['quantized_graph_us']:.2f}x | "
        f"{r['quantized_eager_us']:.1f} | {r['bf16_eager_us']:.1f} |"
        for r in result["linears"]
    ]
    q, b = (sum(r[f"{k}_graph_us"] for r in result["linears"]) for k in ("quantized", "bf16"))
    return head + "\n".join(rows) + f"\n| **layer** | | | {q:.1f} | {b:.1f} | **{b / q:.2f}x** | | |\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="base_q", choices=list(VARIANTS))
    parser.add_argument("--torchao-int4", action="store_true", help="base in torchao's int4 weight-only (tinygemm)")
    parser.add_argument("--layer", type=int, default=0, help="decoder layer to measure")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON path; a .md table is written beside it")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/linear_kernels.py times CUDA kernels; no CUDA device is visible")
    device = torch.device("cuda")
    variant = "base" if args.torchao_int4 else args.variant
    model = load_model(VARIANTS[variant].model, load_config().model.dtype, device).eval()
    if args.torchao_int4:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        variant = "base, torchao int4 g128 (tinygemm)"
    with torch.no_grad():
        linears = measure(model.model.layers[args.layer], args.batch, device)
    result = {"device": device_name(device), "variant": variant, "layer": args.layer, "batch": args.batch}
    result["linears"] = linears
    out = args.out or Path("benchmarks/results") / f"linear-kernels-b{args.batch}.json"
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
