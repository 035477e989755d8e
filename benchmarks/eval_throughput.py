"""Perplexity evaluation throughput: quantorder's evaluation (length-bucketed batches) against a
naive loop that scores one example at a time, on the same model and rows, in the same run.

Both must give the same corpus perplexity (to 1e-4 relative); throughput counts real tokens. In
bfloat16 a batch's padding and shape change how the GPU's matmuls round, so `--dtype float32` shows
whether a difference is the batching itself or bf16 rounding.
The rows are the embedded SymPy Q&A text; the model has random weights in a configured
architecture (`--model`), or is a model dir a pipeline made (`--model-dir models/base`).

    python benchmarks/eval_throughput.py --model llama-3.1-8b --n 240 \\
        --out benchmarks/results/eval-llama-3.1-8b-h100.json
    python benchmarks/eval_throughput.py --model tiny --n 16 --seq-len 64   # CPU smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import conf, model_with_tokenizer, publish, qa_rows

from quantorder.config import EvalCfg
from quantorder.data import render
from quantorder.evaluate import perplexity
from quantorder.models import load_tokenizer, resolve_device
from quantorder.provenance import device_name, library_versions
from quantorder.quantize import load_model
from quantorder.tokens import encode, token_nll


def naive_perplexity(model, tokenizer, rows: list[dict], template: str, cfg: EvalCfg) -> tuple[float, float]:
    """(perplexity, seconds) scoring each example alone, as a plain loop over the test file would."""
    device = next(model.parameters()).device
    nll_sum, n_tokens = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for row in rows:
            ex = encode(tokenizer, render(template, row), cfg.max_seq_len, cfg.answer_only)
            ids = torch.tensor([ex.input_ids], device=device)
            nll, n = token_nll(model(input_ids=ids).logits, torch.tensor([ex.labels], device=device))
            nll_sum, n_tokens = nll_sum + nll.item(), n_tokens + int(n.item())
    seconds = time.perf_counter() - start
    return float(torch.exp(torch.tensor(nll_sum / n_tokens, dtype=torch.float64))), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="llama-3.1-8b", help="a conf/model/ choice with an architecture")
    source.add_argument("--model-dir", type=Path, help="a model dir made by the pipeline (float or quantized)")
    parser.add_argument("--n", type=int, default=240, help="rows scored")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    device = resolve_device("auto")
    if args.model_dir:
        model, tokenizer = load_model(args.model_dir, args.dtype, device), load_tokenizer(args.model_dir)
    else:
        model, tokenizer, _ = model_with_tokenizer(args.model, device, dtype=getattr(torch, args.dtype))
    model.eval()
    rows, template = qa_rows()[: args.n], conf("data", "sympy-qa")["template"]
    cfg = EvalCfg(max_seq_len=args.seq_len, batch_size=args.batch_size)
    perplexity(model, tokenizer, rows[: args.batch_size], template, cfg)  # warm-up: kernels, allocator
    naive_ppl, naive_s = naive_perplexity(model, tokenizer, rows, template, cfg)
    ours = perplexity(model, tokenizer, rows, template, cfg)
    result = {
        "device": device_name(device),
        "model": str(args.model_dir or args.model),
        "rows": len(rows),
        "tokens": round(ours.tokens_per_s * ours.seconds),  # every real token read, targets or not
        "settings": {"max_seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": args.dtype},
        "naive": {"ppl": naive_ppl, "seconds": round(naive_s, 3)},
        "quantorder": {"ppl": ours.ppl, "seconds": round(ours.seconds, 3), "tokens_per_s": round(ours.tokens_per_s, 1)},
        "speedup": round(naive_s / ours.seconds, 3),
        "ppl_rel_diff": abs(ours.ppl - naive_ppl) / naive_ppl,
        "versions": library_versions(),
    }
    result["naive"]["tokens_per_s"] = round(result["tokens"] / naive_s, 1)
    publish(result, ("device", "speedup", "ppl_rel_diff"), args.out)


if __name__ == "__main__":
    main()
