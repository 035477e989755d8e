"""Per-variant footprint and speed: size on disk, bits per weight, peak memory, decode tokens/s.

Reads the outputs of a finished pipeline (`dvc repro`) and measures each variant in a fresh
process (so peak memory is its own), with ratios against `base` measured in the same run.
Decoding runs in transformers' `generate` for every variant: eager with its default dynamic KV
cache, and with `--compile` also the fastest path transformers has without a serving engine: a
static KV cache and the decoding step compiled by torch.compile (CUDA graphs on a GPU). Where the
experiment's format has a runtime of its own (GGUF: llama.cpp), every variant also decodes there,
quantized ones from their checkpoint and float ones from a 16-bit conversion (the baseline in that
runtime).

Usage (from the project root, after `dvc repro`):
    python benchmarks/variants.py                       # writes benchmarks/results/variants-<device>.{json,md}
    python benchmarks/variants.py --batch-sizes 1 16 --new-tokens 64 --repeats 5
    python benchmarks/variants.py --compile             # a GPU host: eager and compiled decoding side by side
    python benchmarks/variants.py --variants base_q q_ft   # a subset (base is always measured: the baseline)
    python benchmarks/variants.py --compile --int4-kernel tinygemm --variants base_q
                            # int4 GPTQ-format layers on PyTorch's tinygemm matmul instead of the checkpoint's kernel
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import CompileConfig, StaticCache

from quantorder.config import ANSWER_MARKER, load_config
from quantorder.data import read_jsonl, render
from quantorder.evaluate import footprint
from quantorder.io import read_json, write_json, write_text
from quantorder.layout import BASE_DIR, PROVENANCE_FILE, QA_DIR
from quantorder.memory import peak_memory_bytes, reset_peak_memory
from quantorder.models import load_tokenizer, resolve_device
from quantorder.provenance import device_name
from quantorder.quantize import bits_per_weight, get_quantizer, load_model, method_of
from quantorder.quantize.base import Quantizer
from quantorder.quantize.tinygemm import to_tinygemm
from quantorder.variants import VARIANTS


def decode_rate(generate, batch: int, new_tokens: int, repeats: int) -> float:
    """Decoding tokens/s of `generate(n)` (greedy, `n` new tokens for each of `batch` prompts), the
    prompt excluded: the median time of `new_tokens + 1` tokens less the median time of 1 token
    (the prompt's forward pass and the first token), as llama-bench's tg is kept apart from pp.
    Medians of `repeats` timed runs: small-batch decoding is bound by host overhead, which jitters."""
    generate(4)  # warm-up: with torch.compile, the compiling, recording and first replay of a CUDA graph

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


def generation(model, tokenizer, prompts: list[str], batch: int, new_tokens: int, compiled: bool = False):
    """`generate(n)`: greedy decoding of `n` new tokens for `batch` of `prompts`, returning the token ids,
    in transformers' `generate`: eager with a dynamic KV cache (its default), or `compiled`: a static KV
    cache sized for up to `new_tokens` + 1 tokens and the decoding step compiled by transformers' own
    `CompileConfig` (torch.compile, mode reduce-overhead). Run a compiled one under `compile_any_format`."""
    tokenizer.padding_side = "left"
    enc = tokenizer([prompts[i % len(prompts)] for i in range(batch)], return_tensors="pt", padding=True)
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    options = {}
    if compiled:
        cache = StaticCache(config=model.config, max_cache_len=enc["input_ids"].shape[1] + new_tokens + 1)
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers' switch to compile off accelerators too (a CPU
        options = {"past_key_values": cache, "compile_config": compile_config}  # run checks the path, not its speed)

    def generate(n: int) -> torch.Tensor:
        if compiled:
            cache.reset()  # in place: the CUDA graphs keep pointing at the same buffers
        ids = model.generate(
            **enc, **options, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        if ids.is_cuda:
            torch.cuda.synchronize()
        return ids

    return generate


def decode_tokens_per_s(
    model, tokenizer, prompts: list[str], batch: int, new_tokens: int, repeats: int, compiled: bool = False
) -> float:
    """`decode_rate` of `generation`."""
    generate = generation(model, tokenizer, prompts, batch, new_tokens, compiled)
    with compile_any_format(model) if compiled else contextlib.nullcontext():
        return decode_rate(generate, batch, new_tokens, repeats)


@contextlib.contextmanager
def compile_any_format(model):
    """transformers compiles decoding only under the quantizers it marks compileable (torchao, not
    GPTQ, AWQ or bitsandbytes); torch.compile itself breaks the graph around a kernel it cannot
    trace, so the gate is opened for every format and the breaks are counted (`graph_breaks`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(base, "hf_quantizer", None)
    base.hf_quantizer = None
    try:
        yield
    finally:
        base.hf_quantizer = quantizer


@contextlib.contextmanager
def cudagraph_skips():
    """The reasons torch.compile gives for running a compiled graph without CUDA graphs (e.g. an
    input a kernel writes to), collected from its `cudagraphs` log while the block runs; deduplicated."""
    reasons: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reason = " ".join(line.strip() for line in record.getMessage().splitlines()[:2])  # and where from
            if reason.startswith("skipping cudagraphs") and reason not in reasons:
                reasons.append(reason)

    torch._logging.set_logs(cudagraphs=True)
    logger, handler = logging.getLogger("torch._inductor"), Collect()
    logger.addHandler(handler)
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)


def graph_breaks() -> int:
    """Graph breaks torch.compile has met in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process (0: it ran nothing compiled, e.g. turned off)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


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


def measure_one(
    variant: str, batch_sizes: list[int], new_tokens: int, repeats: int, compiled: bool, int4_kernel: str
) -> dict:
    cfg = load_config()
    spec = VARIANTS[variant]
    device = resolve_device(cfg.model.device)
    reset_peak_memory(device)
    method = method_of(spec.model)
    tinygemm = int4_kernel == "tinygemm" and method is not None
    # tinygemm reads the checkpoint's own layout, which the training kernels keep (Marlin repacks it)
    model = load_model(spec.model, cfg.model.dtype, device, training=tinygemm)
    linear_bits = bits_per_weight(spec.model, model)  # what the checkpoint stores, whichever kernel runs it
    if tinygemm:
        to_tinygemm(model, method)
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
        "linear_bits_per_weight": linear_bits,
        "decode_tokens_per_s": speeds,
        "peak_mem_bytes": peak_memory_bytes(device),  # eager decoding's peak: the static cache adds its own
        "device": device_name(device),
        "int4_kernel": "tinygemm" if tinygemm else None,
    }
    if compiled:
        with torch.no_grad(), cudagraph_skips() as skips:
            measured["compiled_decode_tokens_per_s"] = {
                str(b): decode_tokens_per_s(model, tokenizer, prompts, b, new_tokens, repeats, compiled=True)
                for b in batch_sizes
            }
        measured |= {"compiled_graphs": compiled_graphs(), "graph_breaks": graph_breaks(), "cudagraph_skips": skips}
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
    compiled = "compiled_decode_tokens_per_s" in base
    # (column title, the speeds of a result) for each way of decoding, ratios against base decoded the same way
    paths = [("transformers eager tok/s b{} (vs base)", lambda r: r["decode_tokens_per_s"])]
    if compiled:
        paths.append(
            ("transformers static cache + compile tok/s b{} (vs base)", lambda r: r["compiled_decode_tokens_per_s"])
        )
    if served:
        paths.append((f"{served} tok/s b{{}} (vs base 16-bit)", lambda r: r["served"]["decode_tokens_per_s"]))

    head = "| variant | size (MiB) | size vs base | bits/param | linear bits/weight | peak mem (MiB) | "
    head += " | ".join(title.format(b) for title, _ in paths for b in batches)
    head += " | compiled graphs | graph breaks |\n" if compiled else " |\n"
    head += "|---" * (6 + len(batches) * len(paths) + 2 * compiled) + "|\n"
    rows = []
    for name, r in results["variants"].items():
        lbw = f"{r['linear_bits_per_weight']:.2f}" if r["linear_bits_per_weight"] else "-"
        cells = [f"{get(r)[k]:.1f} ({get(r)[k] / get(base)[k]:.2f}x)" for _, get in paths for k in batches]
        cells += [str(r.get("compiled_graphs", "-")), str(r["graph_breaks"])] if compiled else []
        rows.append(
            f"| `{name}` | {r['size_bytes'] / 2**20:.1f} | {r['size_bytes'] / base['size_bytes']:.2f}x | "
            f"{r['bits_per_param']:.2f} | {lbw} | {r['peak_mem_bytes'] / 2**20:.0f} | {' | '.join(cells)} |"
        )
    runs = results.get("repeats", 1)
    title = f"Variants on {results['device']} ({results['algo']}, {results['new_tokens']} new tokens, greedy, "
    title += f"median of {runs} timed runs)\n\n" if runs > 1 else "one timed run)\n\n"
    title += "Decoding tokens/s leave out the prompt's forward pass (time of N+1 new tokens less time of 1).\n\n"
    if compiled:
        title += (
            "Compiled: a static KV cache and the decoding step compiled by transformers' `CompileConfig` "
            "(torch.compile, CUDA graphs on a GPU). Compiled graphs and graph breaks: torch.compile's counts in that "
            "variant's process (no graph: it decoded uncompiled; on a CPU, loading GPTQModel's kernel turns "
            "torch.compile off).\n\n"
        )
    if served:
        title += f"In {served}, quantized variants run from their checkpoint, float ones from a 16-bit conversion.\n\n"
    skipped = [
        f"- `{name}`: {reason}" for name, r in results["variants"].items() for reason in r.get("cudagraph_skips", [])
    ]
    notes = "\nCompiled graphs that ran without CUDA graphs:\n\n" + "\n".join(skipped) + "\n" if skipped else ""
    return title + head + "\n".join(rows) + "\n" + notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the median counts)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path; a .md table is written beside it")
    parser.add_argument(
        "--compile", action="store_true", help="also decode with a static KV cache and torch.compile (slow to start)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), metavar="V", help="variants to measure (default: all)"
    )
    parser.add_argument(
        "--int4-kernel",
        choices=["checkpoint", "tinygemm"],
        default="checkpoint",
        help="tinygemm: int4 GPTQ-format layers (rtn, gptq, awq) on PyTorch's int4 matmul, bf16",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = parser.parse_args()
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        parser.error(f"--variants {' '.join(unknown)}: unknown (allowed: {', '.join(VARIANTS)})")
    variants = ["base", *(v for v in args.variants if v != "base")]  # base: the baseline of every ratio
    if args.one:
        measured = measure_one(
            args.one, args.batch_sizes, args.new_tokens, args.repeats, args.compile, args.int4_kernel
        )
        print(json.dumps(measured))
        return
    algo = load_config().algo
    if args.int4_kernel == "tinygemm":
        if get_quantizer(algo).backend != "gptqmodel":
            parser.error(f"--int4-kernel tinygemm: algo={algo.name} is not GPTQ-format (rtn, gptq, awq)")
        if adapted := [v for v in args.variants if VARIANTS[v].adapter]:
            parser.error(f"--int4-kernel tinygemm: {' '.join(adapted)} decode through an adapter; merged variants only")
    results = {
        "algo": algo.label + (", int4 on tinygemm" if args.int4_kernel == "tinygemm" else ""),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "variants": {},
    }
    out = args.out
    for variant in variants:
        cmd = [sys.executable, __file__, "--one", variant, "--new-tokens", str(args.new_tokens)]
        cmd += ["--repeats", str(args.repeats), *(["--compile"] if args.compile else []), "--int4-kernel"]
        cmd += [args.int4_kernel, "--batch-sizes"]
        done = subprocess.run(cmd + [str(b) for b in args.batch_sizes], capture_output=True, text=True)
        if done.returncode:  # the measuring process's own last lines say why
            raise SystemExit(
                f"{done.stderr.strip()[-3000:]}\nerror: measuring {variant} failed (exit {done.returncode})"
            )
        measured = results["variants"][variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{variant}: {measured['decode_tokens_per_s']} {measured.get('compiled_decode_tokens_per_s', '')}",
            flush=True,
        )
        if out is None:
            slug = "".join(c if c.isalnum() else "-" for c in measured["device"].lower()).strip("-")
            out = Path("benchmarks/results") / f"variants-{slug}.json"
        results["device"] = measured["device"]
        write_json(out, results)  # after every variant: a cut-off run keeps what it measured
    write_text(out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
