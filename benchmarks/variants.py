"""Per-variant footprint and speed: size on disk, bits per weight, peak memory, decode tokens/s.

Reads the outputs of a finished pipeline (`dvc repro`) and measures each variant in a fresh
process (so peak memory is its own), with ratios against `base` measured in the same run.
Decoding runs in transformers' eager `generate` for every variant; where the experiment's format
has a runtime of its own (GGUF: llama.cpp), every variant also decodes there, quantized ones from
their checkpoint and float ones from a 16-bit conversion (the baseline in that runtime).

Usage (from the project root, after `dvc repro`):
    python benchmarks/variants.py                       # writes benchmarks/results/variants-<device>.{json,md}
    python benchmarks/variants.py --batch-sizes 1 16 --new-tokens 64 --repeats 5
    python benchmarks/variants.py --variants base_q q_ft   # a subset (base is always measured: the baseline)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from quantorder.config import ANSWER_MARKER, load_config
from quantorder.data import read_jsonl, render
from quantorder.evaluate import footprint
from quantorder.io import read_json, write_json, write_text
from quantorder.layout import BASE_DIR, PROVENANCE_FILE, QA_DIR
from quantorder.memory import peak_memory_bytes, reset_peak_memory
from quantorder.models import load_tokenizer, resolve_device
from quantorder.provenance import device_name
from quantorder.quantize import bits_per_weight, get_quantizer, load_model
from quantorder.quantize.base import Quantizer
from quantorder.variants import VARIANTS


def decode_rate(generate, batch: int, new_tokens: int, repeats: int) -> float:
    """Decoding tokens/s of `generate(n)` (greedy, `n` new tokens for each of `batch` prompts), the
    prompt excluded: the median time of `new_tokens + 1` tokens less the median time of 1 token
    (the prompt's forward pass and the first token), as llama-bench's tg is kept apart from pp.
    Medians of `repeats` timed runs: small-batch decoding is bound by host overhead, which jitters."""
    generate(2)  # warm-up

    def median_seconds(n: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(n)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    decoding = median_seconds(new_tokens + 1) - median_seconds(1)
    if decoding <= 0:  # timing noise larger than the decoding itself: no rate to report
        raise SystemExit(
            f"error: decoding {new_tokens} tokens at batch {batch} took no measurable time beyond the noise "
            f"of one token's run; raise --new-tokens or --repeats"
        )
    return batch * new_tokens / decoding


def decode_tokens_per_s(model, tokenizer, prompts: list[str], batch: int, new_tokens: int, repeats: int) -> float:
    """`decode_rate` of transformers' eager `generate` on `batch` of `prompts`."""
    tokenizer.padding_side = "left"
    enc = tokenizer([prompts[i % len(prompts)] for i in range(batch)], return_tensors="pt", padding=True)
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}

    def generate(n: int) -> None:
        model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if enc["input_ids"].is_cuda:
            torch.cuda.synchronize()

    return decode_rate(generate, batch, new_tokens, repeats)


def served_decode_tokens_per_s(
    method: type[Quantizer], spec, token_ids: list[list[int]], batch_sizes: list[int], new_tokens: int, repeats: int
) -> dict[str, float]:
    """`decode_rate` in the format's own runtime (`Quantizer.serve`), each batch of prompts decoded
    together as separate sequences."""
    n_ctx = max(len(ids) for ids in token_ids) + new_tokens + 1
    with method.serve(spec.model, spec.adapter, n_ctx=n_ctx, n_seq=max(batch_sizes)) as session:
        speeds = {}
        for b in batch_sizes:
            prompts = [token_ids[i % len(token_ids)] for i in range(b)]
            speeds[str(b)] = decode_rate(lambda n, p=prompts: session.greedy(p, n), b, new_tokens, repeats)
    return speeds


def measure_one(variant: str, batch_sizes: list[int], new_tokens: int, repeats: int) -> dict:
    cfg = load_config()
    spec = VARIANTS[variant]
    device = resolve_device(cfg.model.device)
    reset_peak_memory(device)
    model = load_model(spec.model, cfg.model.dtype, device)
    if spec.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter)
    model.eval()
    tokenizer = load_tokenizer(spec.model)
    rows = read_jsonl(QA_DIR / "test.jsonl")[:16]
    prompts = [render(cfg.data.template, r).split(ANSWER_MARKER)[0] + ANSWER_MARKER for r in rows]
    base_params = read_json(BASE_DIR / PROVENANCE_FILE)["source"]["parameters"]
    with torch.no_grad():
        speeds = {str(b): decode_tokens_per_s(model, tokenizer, prompts, b, new_tokens, repeats) for b in batch_sizes}
    measured = {
        **footprint(spec.model, spec.adapter, base_params),
        "linear_bits_per_weight": bits_per_weight(spec.model, model),
        "decode_tokens_per_s": speeds,
        "peak_mem_bytes": peak_memory_bytes(device),
        "device": device_name(device),
    }
    method = type(get_quantizer(cfg.algo))
    if method.serving_runtime:
        del model
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        measured["served"] = {
            "runtime": method.serving_runtime,
            "decode_tokens_per_s": served_decode_tokens_per_s(method, spec, ids, batch_sizes, new_tokens, repeats),
        }
    return measured


def markdown(results: dict, baseline: str = "base") -> str:
    base = results["variants"][baseline]
    batches = list(base["decode_tokens_per_s"])
    served = base.get("served", {}).get("runtime")

    def speeds(r: dict, b: dict) -> list[str]:
        return [f"{r[k]:.1f} ({r[k] / b[k]:.2f}x)" for k in batches]

    head = "| variant | size (MiB) | size vs base | bits/param | linear bits/weight | peak mem (MiB) | "
    head += " | ".join(f"transformers eager tok/s b{b} (vs base)" for b in batches)
    head += "".join(f" | {served} tok/s b{b} (vs base 16-bit)" for b in batches if served) + " |\n"
    head += "|---" * (6 + len(batches) * (2 if served else 1)) + "|\n"
    rows = []
    for name, r in results["variants"].items():
        lbw = f"{r['linear_bits_per_weight']:.2f}" if r["linear_bits_per_weight"] else "-"
        cells = speeds(r["decode_tokens_per_s"], base["decode_tokens_per_s"])
        if served:
            cells += speeds(r["served"]["decode_tokens_per_s"], base["served"]["decode_tokens_per_s"])
        rows.append(
            f"| `{name}` | {r['size_bytes'] / 2**20:.1f} | {r['size_bytes'] / base['size_bytes']:.2f}x | "
            f"{r['bits_per_param']:.2f} | {lbw} | {r['peak_mem_bytes'] / 2**20:.0f} | {' | '.join(cells)} |"
        )
    runs = results.get("repeats", 1)
    title = f"Variants on {results['device']} ({results['algo']}, {results['new_tokens']} new tokens, greedy, "
    title += f"median of {runs} timed runs)\n\n" if runs > 1 else "one timed run)\n\n"
    title += "Decoding tokens/s leave out the prompt's forward pass (time of N+1 new tokens less time of 1).\n\n"
    if served:
        title += f"In {served}, quantized variants run from their checkpoint, float ones from a 16-bit conversion.\n\n"
    return title + head + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the median counts)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path; a .md table is written beside it")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), metavar="V", help="variants to measure (default: all)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = parser.parse_args()
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        parser.error(f"--variants {' '.join(unknown)}: unknown (allowed: {', '.join(VARIANTS)})")
    variants = ["base", *(v for v in args.variants if v != "base")]  # base: the baseline of every ratio
    if args.one:
        print(json.dumps(measure_one(args.one, args.batch_sizes, args.new_tokens, args.repeats)))
        return
    algo = load_config().algo
    results = {
        "algo": algo.label,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "variants": {},
    }
    out = args.out
    for variant in variants:
        cmd = [sys.executable, __file__, "--one", variant, "--new-tokens", str(args.new_tokens)]
        cmd += ["--repeats", str(args.repeats), "--batch-sizes"]
        done = subprocess.run(cmd + [str(b) for b in args.batch_sizes], capture_output=True, text=True, check=True)
        measured = results["variants"][variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{variant}: {measured['decode_tokens_per_s']}", flush=True)
        if out is None:
            slug = "".join(c if c.isalnum() else "-" for c in measured["device"].lower()).strip("-")
            out = Path("benchmarks/results") / f"variants-{slug}.json"
        results["device"] = measured["device"]
        write_json(out, results)  # after every variant: a cut-off run keeps what it measured
    write_text(out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
