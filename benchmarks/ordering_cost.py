"""What each fine-tuning ordering costs on a hub model's shape (random weights): training throughput
and peak memory of the adapter each ordering trains, and its one-off costs, as ratios to `ft` (LoRA
on the 16-bit base) measured in the same run.

Rows: `ft`; `q_ft` on the base quantized by each of `--algos` (settings from conf/algo/, the model's group size), with
PEFT's default init, with LoftQ (`qlora.init=loftq`) and, on GPTQ-format bases, as QA-LoRA
(`qlora.qalora=true`); `qat` on each method's grid, fake-quantizing the merged or the base weight
(`qat.weight`). Every row trains the same LoRA preset from the same seed on the same windows of the
embedded Q&A text for `--steps` steps; throughput counts the steps after the first two. Methods
that calibrate (GPTQ, AWQ) are left out: their q_ft trains on the same kernels as RTN's.

    python benchmarks/ordering_cost.py --model llama-3.1-8b --steps 6 \\
        --out benchmarks/results/ordering-cost-llama-3.1-8b-h200.json
    python benchmarks/ordering_cost.py --model phi-3.5-mini --target-modules qkv_proj,o_proj,gate_up_proj,down_proj \\
        --out benchmarks/results/ordering-cost-phi-3.5-mini-h200.json   # Phi-3 fuses q/k/v and gate/up
    python benchmarks/ordering_cost.py --model tiny --steps 4 --seq-len 64 --algos rtn   # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from common import conf, model_with_tokenizer, publish
from finetune_throughput import STUDY_BATCH, steady_tokens_per_s, windows

from quantorder.config import ALGO_CONFIGS, QALORA_ALGOS, FinetuneCfg, QLoRACfg
from quantorder.finetune import setup_model, train_loop
from quantorder.memory import reset_peak_memory
from quantorder.models import resolve_device
from quantorder.provenance import device_name, library_versions
from quantorder.qat import apply_qat
from quantorder.qlora import loftq_init, lora_options
from quantorder.quantize import get_quantizer, load_model, method_of


def train_row(model_dir: Path, dtype: str, cfg: FinetuneCfg, pool: list, seed: int, prepare=None, **options) -> dict:
    """Load `model_dir`, add LoRA (`options`: more LoraConfig settings), run `prepare(model)` (LoftQ
    or QAT; timed), train: throughput, peak memory, the prepare time and its result."""
    device = resolve_device("auto")
    reset_peak_memory(device)
    model = setup_model(load_model(model_dir, dtype, device, training=True), cfg, seed, **options)
    start = time.perf_counter()
    prepared = prepare(model) if prepare else None
    prepare_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as out:
        log = Path(out) / "log.jsonl"
        result = train_loop(model, pool, pool[: cfg.batch_size], cfg, pad_id=0, seed=seed, log_path=log)
        records = [json.loads(line) for line in log.read_text().splitlines()]
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens_per_step = cfg.grad_accum * cfg.batch_size * len(pool[0].input_ids)
    return {
        "tokens_per_s": round(steady_tokens_per_s([0.0] + [r["seconds"] for r in records], tokens_per_step), 1),
        "peak_mem_gib": round(result.peak_mem_bytes / 2**30, 2),
        "prepare_s": round(prepare_s, 2),
        "prepared": prepared,
        "losses": [round(r["loss"], 4) for r in records],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a conf/model/ choice with an architecture")
    parser.add_argument("--finetune", default="lora-gpu", help="the conf/finetune/ preset")
    parser.add_argument("--target-modules", help="comma-separated LoRA targets (default: the preset's)")
    parser.add_argument("--algos", default="rtn,nf4", help="comma-separated methods that need no calibration")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the model copies go (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    quantizers = {}
    for algo in args.algos.split(","):
        if algo not in ALGO_CONFIGS:
            parser.error(f"--algos: unknown method {algo!r} (allowed: {', '.join(sorted(ALGO_CONFIGS))})")
        settings = conf("algo", algo) | {"group_size": conf("model", args.model)["group_size"]}  # as composed
        quantizers[algo] = get_quantizer(ALGO_CONFIGS[algo](**settings))
        if quantizers[algo].requires_calibration:
            parser.error(f"--algos: {algo} calibrates; its q_ft trains like rtn's (same kernels)")
    preset = conf("finetune", args.finetune)
    preset.update(max_steps=args.steps, max_seq_len=args.seq_len, log_every=1)
    if args.target_modules:
        preset["target_modules"] = args.target_modules.split(",")
    preset.update(warmup_steps=min(preset["warmup_steps"], args.steps), grad_accum=STUDY_BATCH // preset["batch_size"])
    cfg = FinetuneCfg(**preset)
    device = resolve_device("auto")
    dtype = "bfloat16" if device.type == "cuda" else "float32"

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        base = Path(work) / "base"
        model, tokenizer, _ = model_with_tokenizer(args.model, device, args.seed, dtype=getattr(torch, dtype))
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        del model
        pool = windows(tokenizer, STUDY_BATCH * args.steps, args.seq_len)

        rows: dict[str, dict] = {}

        def row(name: str, model_dir: Path, prepare=None, **options) -> None:
            rows[name] = train_row(model_dir, dtype, cfg, pool, args.seed, prepare, **options)
            print(f"{name}: {json.dumps({k: v for k, v in rows[name].items() if k != 'losses'})}", flush=True)

        row("ft", base)
        quantize_s = {}
        for algo, quantizer in quantizers.items():
            quantized = Path(work) / algo
            start = time.perf_counter()
            quantizer.quantize(base, None, quantized, dtype)
            quantize_s[algo] = round(time.perf_counter() - start, 1)
            row(f"q_ft {algo}", quantized)
            row(f"q_ft {algo} loftq", quantized, lambda m, q=quantized: loftq_init(m, base, method_of(q)))
            if algo in QALORA_ALGOS:
                row(f"q_ft {algo} qalora", quantized, **lora_options(QLoRACfg(qalora=True), quantized))
            for weight in ("merged", "base"):
                row(f"qat {algo} {weight}", base, lambda m, q=quantizer, w=weight: apply_qat(m, q, w))

    ft = rows["ft"]
    for r in rows.values():
        r["throughput_vs_ft"] = round(r["tokens_per_s"] / ft["tokens_per_s"], 3)
        r["memory_vs_ft"] = round(r["peak_mem_gib"] / ft["peak_mem_gib"], 3)
    summary = {
        "device": device_name(device),
        "model_shape": args.model,
        "settings": {
            "finetune": f"{args.finetune}: batch {cfg.batch_size} x {cfg.grad_accum}, r {cfg.r}, alpha {cfg.alpha}, "
            f"checkpointing {cfg.grad_checkpointing}, {', '.join(cfg.target_modules)}",
            "algos": {a: q.cfg.label for a, q in quantizers.items()},
            "steps": args.steps,
            "seq_len": args.seq_len,
            "dtype": dtype,
        },
        "quantize_s": quantize_s,
        "table": {n: (r["throughput_vs_ft"], r["memory_vs_ft"]) for n, r in rows.items()},
        "rows": rows,
        "versions": library_versions(),
    }
    publish(summary, ("device", "model_shape", "quantize_s", "table"), args.out)


if __name__ == "__main__":
    main()
