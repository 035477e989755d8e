"""Data-parallel fine-tune scaling: quantorder's finetune loop with its GPU preset on 1 GPU against
N GPUs (torchrun processes, DDP), same global batch, same examples, measured in the same run.

Each run trains the same LoRA from the same seeded init on the same 1024-token windows; with N
processes every step's micro-batches are split between them (finetune.devices=N), so the loss
curves must agree up to float rounding. Throughput counts trained tokens over the steps after the
first two. On a CPU the processes use gloo (the smoke test).

    python benchmarks/finetune_scaling.py --model llama-3.1-8b --devices 1 2 --steps 12 \\
        --out benchmarks/results/finetune-scaling-llama-3.1-8b-h200x2.json
    python benchmarks/finetune_scaling.py --model tiny --devices 1 2 --steps 4 --seq-len 32   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import architecture_and_tokenizer, conf, model_with_tokenizer, publish
from finetune_throughput import STUDY_BATCH, steady_tokens_per_s, windows

from quantorder import distributed
from quantorder.config import FinetuneCfg
from quantorder.finetune import setup_model, train_loop
from quantorder.io import write_json
from quantorder.models import resolve_device
from quantorder.provenance import device_name, library_versions

WORKER_ARGS = ("model", "finetune", "steps", "seq_len", "seed")  # passed on to the torchrun processes


def preset(name: str, steps: int, seq_len: int) -> FinetuneCfg:
    """The conf/finetune/ preset at the study's global batch, logging every step, without dropout
    (each process would draw its own masks) so runs on different process counts compare exactly."""
    cfg = conf("finetune", name)
    cfg.update(max_steps=steps, max_seq_len=seq_len, log_every=1, dropout=0.0)
    cfg.update(warmup_steps=min(cfg["warmup_steps"], steps), grad_accum=STUDY_BATCH // cfg["batch_size"])
    return FinetuneCfg(**cfg)


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: train, and on the first process write the run's numbers to --result."""
    device = resolve_device("auto")
    distributed.init_worker(device)
    cfg = preset(args.finetune, args.steps, args.seq_len)
    _, tokenizer = architecture_and_tokenizer(args.model)
    pool = windows(tokenizer, STUDY_BATCH * args.steps, args.seq_len)
    model, _, _ = model_with_tokenizer(args.model, device, args.seed)
    model = setup_model(model, cfg, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.jsonl"
        result = train_loop(model, pool, pool[: cfg.batch_size], cfg, pad_id=0, seed=args.seed, log_path=log)
        records = [json.loads(line) for line in log.read_text().splitlines()]
    if distributed.rank() == 0:
        times = [0.0] + [r["seconds"] for r in records]
        write_json(
            args.result,
            {
                "processes": result.processes,
                "tokens_per_s": round(steady_tokens_per_s(times, STUDY_BATCH * args.seq_len), 1),
                "peak_mem_gib_per_process": round(result.peak_mem_bytes / 2**30, 2),
                "losses": [r["loss"] for r in records],
                "device": device_name(device),
            },
        )
    distributed.finish_worker()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a conf/model/ choice with an architecture")
    parser.add_argument("--finetune", default="lora-gpu", help="the conf/finetune/ preset measured")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="process counts (1st: baseline)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # internal: a worker's output file
    args = parser.parse_args()
    if distributed.is_worker():
        return worker(args)

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.devices:
            out = Path(tmp) / f"{n}.json"
            argv = [__file__, *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in WORKER_ARGS)]
            distributed.launch(n, [*argv, f"--result={out}"])
            runs[n] = json.loads(out.read_text())
            print(f"{n} process(es): {runs[n]['tokens_per_s']:.0f} tok/s, losses {runs[n]['losses'][-3:]}", flush=True)
    base = runs[args.devices[0]]
    result = {
        "device": base["device"],
        "model_shape": args.model,
        "settings": {
            "finetune": args.finetune,
            "global_batch": STUDY_BATCH,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "lora_dropout": 0.0,
        },
        "scaling": {n: round(r["tokens_per_s"] / base["tokens_per_s"], 3) for n, r in runs.items()},
        "max_loss_gap": {
            n: round(max(abs(a - b) for a, b in zip(base["losses"], r["losses"])), 6) for n, r in runs.items()
        },
        "runs": runs,
        "versions": library_versions(),
    }
    publish(result, ("device", "scaling", "max_loss_gap"), args.out)


if __name__ == "__main__":
    main()
