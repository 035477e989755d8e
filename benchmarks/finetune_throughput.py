"""LoRA fine-tune throughput on a hub model's shape with random weights: quantorder's finetune loop
with its GPU preset (conf/finetune/lora-gpu.yaml) against plain transformers Trainer + PEFT at the
Olive study's settings (batch 16, gradient checkpointing, SDPA), both measured in this run.

Both runs train the same LoRA (r and alpha from the preset, all linear layers) from the same seeded
init on the same 1024-token windows of the embedded SymPy Q&A text (tokenized by a BPE tokenizer
trained on it), in the same order and with the same effective batch, so their loss curves are
comparable step by step. Throughput counts trained tokens over the steps after the first two.

MFU counts the useful FLOPs per trained token: 4 x frozen linear weights (forward, and backward to
the inputs; no weight gradients), 6 x LoRA weights, and 6 x layers x seq x hidden for causal
attention (forward 2, backward 4); recomputation by checkpointing is not useful work.

    python benchmarks/finetune_throughput.py --model llama-3.1-8b --steps 20 \\
        --out benchmarks/results/finetune-llama-3.1-8b-h100.json
    python benchmarks/finetune_throughput.py --model tiny --steps 3 --seq-len 64   # CPU smoke run

`--set compile=true,batch_size=2` (repeatable) also measures the preset with those settings changed,
against the same baseline: each set is one more run, `quantorder[compile=true,batch_size=2]`.
`--profile` runs quantorder's configurations under torch.profiler instead (no baseline, no JSON) and
prints the operators that took the most device time (CPU time on a CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import architecture_and_tokenizer, conf, model_with_tokenizer, publish, qa_rows

from quantorder.config import FinetuneCfg
from quantorder.data import render
from quantorder.finetune import batch_order, setup_model, train_loop
from quantorder.memory import peak_memory_bytes, reset_peak_memory
from quantorder.models import resolve_device
from quantorder.provenance import device_name, library_versions
from quantorder.tokens import Example

STUDY_BATCH = 16
SKIP_STEPS = 2  # warm-up (kernel compilation, allocator growth) left out of the throughput
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16 tensor-core peaks


def windows(tokenizer, n: int, seq_len: int) -> list[Example]:
    """`n` windows of `seq_len` tokens cut from the concatenated Q&A text (cycled if short)."""
    template = conf("data", "sympy-qa")["template"]
    ids: list[int] = []
    for row in qa_rows():
        ids += tokenizer(render(template, row) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        if len(ids) >= n * seq_len:
            break
    ids = (ids * (n * seq_len // len(ids) + 1))[: n * seq_len]
    return [Example(ids[i : i + seq_len], ids[i : i + seq_len]) for i in range(0, n * seq_len, seq_len)]


def flops_per_token(model, arch: dict, seq_len: int) -> float:
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    frozen = sum(m.weight.numel() for m in linears)
    attention = 6 * arch["num_hidden_layers"] * seq_len * arch["hidden_size"]
    return 4 * frozen + 6 * lora + attention


def steady_tokens_per_s(step_times: list[float], tokens_per_step: int) -> float:
    """Tokens per second over the steps after SKIP_STEPS; `step_times` are cumulative end times."""
    return tokens_per_step * (len(step_times) - 1 - SKIP_STEPS) / (step_times[-1] - step_times[SKIP_STEPS])


def run_baseline(model, train: list[Example], cfg: FinetuneCfg, steps: int, seed: int) -> dict:
    """transformers Trainer + PEFT at the study's settings, fed in the given order."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    torch.manual_seed(seed)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules)
    model = get_peft_model(model, lora)
    dataset = [{"input_ids": torch.tensor(e.input_ids), "labels": torch.tensor(e.labels)} for e in train]
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=STUDY_BATCH, max_steps=steps, learning_rate=cfg.lr,
            warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine", weight_decay=cfg.weight_decay,
            max_grad_norm=1.0, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=torch.cuda.is_available(), logging_steps=1,
            save_strategy="no", report_to=[], seed=seed, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        )  # fmt: skip
        trainer = InOrder(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
        trainer.add_callback(clock)
        device = next(model.parameters()).device
        reset_peak_memory(device)
        clock.times.append(time.perf_counter())
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_times": clock.times, "losses": losses, "peak_mem_bytes": peak_memory_bytes(device), "model": model}


def run_quantorder(model, train: list[Example], cfg: FinetuneCfg, seed: int) -> dict:
    """quantorder's setup_model + train_loop with the preset, logging every step."""
    model = setup_model(model, cfg, seed)
    with tempfile.TemporaryDirectory() as out:
        log = Path(out) / "log.jsonl"
        result = train_loop(model, train, train[: cfg.batch_size], cfg, pad_id=0, seed=seed, log_path=log)
        records = [json.loads(line) for line in log.read_text().splitlines()]
    return {
        "step_times": [0.0] + [r["seconds"] for r in records],
        "losses": [r["loss"] for r in records],
        "peak_mem_bytes": result.peak_mem_bytes,
        "model": model,
    }


def profile(model, train: list[Example], cfg: FinetuneCfg, seed: int, rows: int = 20) -> str:
    """The `rows` operators with the most self time (CUDA if used, else CPU) over a run of `cfg`."""
    from torch.profiler import ProfilerActivity

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        run_quantorder(model, train, cfg, seed)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows)


def overrides(text: str) -> dict:
    """`key=value,key=value` as preset settings (values parsed as YAML)."""
    pairs = [item.split("=", 1) for item in text.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--set {text!r}: expected key=value[,key=value...]")
    return {key.strip(): yaml.safe_load(value) for key, value in pairs}


def finetune_cfg(preset: dict, steps: int, seq_len: int, **settings) -> FinetuneCfg:
    """The preset with `settings` at the benchmark's steps and length, accumulating to the study's batch."""
    cfg = {**preset, **settings, "max_steps": steps, "max_seq_len": seq_len, "log_every": 1}
    cfg.update(warmup_steps=min(cfg["warmup_steps"], steps), grad_accum=STUDY_BATCH // cfg["batch_size"])
    return FinetuneCfg(**cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a conf/model/ choice with an architecture")
    parser.add_argument("--finetune", default="lora-gpu", help="the conf/finetune/ preset measured")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", type=overrides, action="append", default=[], metavar="KEY=VALUE[,...]",
                        help="also measure the preset with these settings changed (repeatable)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="profile quantorder's runs instead of timing them")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (and a .md beside it)")
    args = parser.parse_args()

    preset = conf("finetune", args.finetune)
    cfg = finetune_cfg(preset, args.steps, args.seq_len)
    tried = {"quantorder": cfg} | {
        "quantorder[" + ",".join(f"{k}={v}" for k, v in changed.items()) + "]": finetune_cfg(
            preset, args.steps, args.seq_len, **changed
        )
        for changed in args.set
    }
    micro_batches = cfg.grad_accum
    device = resolve_device("auto")
    arch, tokenizer = architecture_and_tokenizer(args.model)
    pool = windows(tokenizer, STUDY_BATCH * args.steps, args.seq_len)
    # quantorder's loop draws micro-batches in its seeded order (the same examples in the same order
    # for any micro-batch size: it cuts one shuffled epoch); the baseline gets them in that order
    order = batch_order(len(pool), cfg.batch_size, args.seed, args.steps * micro_batches)
    in_order = [pool[i] for batch in order for i in batch]

    if args.profile:
        for name, run_cfg in tried.items():
            model, _, _ = model_with_tokenizer(args.model, device, args.seed)
            print(f"{name}:\n{profile(model, pool, run_cfg, args.seed)}", flush=True)
            del model
            gc.collect()
        return

    results = {}
    # Liger patches transformers' model classes for the rest of the process: the runs that patch
    # less go first (none, then the fused loss alone under compile, then every kernel)
    patched = {name: (c.liger_kernel, c.liger_kernel and not c.compile) for name, c in tried.items()}
    for name in ("baseline", *sorted(tried, key=patched.get)):
        model, _, _ = model_with_tokenizer(args.model, device, args.seed)
        if name == "baseline":
            run = run_baseline(model, in_order, cfg, args.steps, args.seed)
        else:
            run = run_quantorder(model, pool, tried[name], args.seed)
        tokens_per_s = steady_tokens_per_s(run["step_times"], STUDY_BATCH * args.seq_len)
        flops = flops_per_token(run.pop("model"), arch, args.seq_len)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name(device)), None)
        results[name] = {
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(tokens_per_s * flops / (peak * 1e12), 4) if peak else None,
            "peak_mem_gib": round(run["peak_mem_bytes"] / 2**30, 2),
            "losses": [round(x, 4) for x in run["losses"]],
        }
        if name != "baseline":
            base = results["baseline"]
            results[name]["speedup"] = round(tokens_per_s / base["tokens_per_s"], 3)
            results[name]["max_loss_gap"] = round(max(abs(a - b) for a, b in zip(base["losses"], run["losses"])), 4)
        r = results[name]
        print(f"{name}: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']}, peak {r['peak_mem_gib']} GiB, "
              f"losses {r['losses'][:3]} ... {r['losses'][-1]}", flush=True)  # fmt: skip
        del model, run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ours = results["quantorder"]
    summary = {
        "device": device_name(device),
        "model_shape": args.model,
        "flops_per_token": flops,
        "settings": {
            "baseline": f"Trainer + PEFT, batch {STUDY_BATCH}, gradient checkpointing, SDPA, bf16",
            "quantorder": f"finetune={args.finetune}: batch {cfg.batch_size} x {cfg.grad_accum} accumulation, "
            f"checkpointing {cfg.grad_checkpointing}, liger_kernel {cfg.liger_kernel}, compile {cfg.compile}, "
            "fused AdamW on CUDA",
            "lora": f"r {cfg.r}, alpha {cfg.alpha}, {', '.join(cfg.target_modules)}",
            "steps": args.steps,
            "seq_len": args.seq_len,
        },
        "speedup": ours["speedup"],
        "max_loss_gap": ours["max_loss_gap"],
        "runs": results,
        "versions": library_versions(),
    }
    publish(summary, ("device", "speedup", "max_loss_gap"), args.out)


if __name__ == "__main__":
    main()
