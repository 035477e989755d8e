"""Stage finetune@X: LoRA on the float base (ft) or on the quantized base (q_ft).

Usage: dvc repro finetune@ft   (or python stages/finetune.py ft)
With finetune.devices=N (0: every GPU) it relaunches itself as N data-parallel torchrun processes.
"""

import tempfile
from dataclasses import asdict
from pathlib import Path

from quantorder import distributed
from quantorder.checkpoint import Checkpointer, fingerprint
from quantorder.cli import print_config, run_stage, stage_target
from quantorder.config import as_dict, load_config
from quantorder.data import read_jsonl
from quantorder.errors import UserError
from quantorder.finetune import TRAIN_LOG, setup_data, setup_model, train_loop
from quantorder.io import atomic_dir, read_json, write_json
from quantorder.layout import ADAPTERS_DIR, CHECKPOINTS_DIR, FINETUNE_BASES, QA_DIR
from quantorder.models import PROVENANCE_FILE, check_seq_len, load_model, load_tokenizer, resolve_device
from quantorder.provenance import library_versions


def main() -> str | None:
    name = stage_target("finetune target", FINETUNE_BASES)
    cfg = load_config()
    n = distributed.processes(cfg.finetune.devices, cfg.model.device)
    if n > 1 and not distributed.is_worker():
        if cfg.finetune.grad_accum % n:
            raise UserError(
                f"finetune.grad_accum={cfg.finetune.grad_accum}: must be a multiple of finetune.devices "
                f"({n} processes), so that each takes the same share of every step"
            )
        if cfg.model.device != "cpu":
            distributed.claim_gpus(n)
        distributed.launch(n, [__file__, name])  # the workers train, save and print the closing line
        return None
    device = resolve_device(cfg.model.device)
    distributed.init_worker(device)
    lead = distributed.rank() == 0
    if lead:
        print_config("finetune", cfg.finetune)
    base, out = FINETUNE_BASES[name], ADAPTERS_DIR / name
    check_seq_len(base, cfg.finetune.max_seq_len, "finetune.max_seq_len")
    tokenizer = load_tokenizer(base)
    train = setup_data(tokenizer, read_jsonl(QA_DIR / "train.jsonl"), cfg.data.template, cfg.finetune.max_seq_len)
    val = setup_data(tokenizer, read_jsonl(QA_DIR / "val.jsonl"), cfg.data.template, cfg.finetune.max_seq_len)
    model = setup_model(load_model(base, cfg.model.dtype, device, training=True), cfg.finetune, cfg.seed)
    base_sha = read_json(base / PROVENANCE_FILE)["sha256"]
    data_sha = read_json(QA_DIR / "manifest.json")["sha256"]
    run = {k: v for k, v in as_dict(cfg.finetune).items() if k not in ("checkpoint_every", "log_every")}
    run |= {"seed": cfg.seed, "template": cfg.data.template, "dtype": cfg.model.dtype}
    run |= {"base_sha256": base_sha, "data_sha256": data_sha, "processes": distributed.world_size()}
    checkpoint = Checkpointer(CHECKPOINTS_DIR / f"finetune@{name}", cfg.finetune.checkpoint_every, fingerprint(run))
    # the first process writes the adapter; the others train along and keep nothing
    with atomic_dir(out) if lead else tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = train_loop(
            model, train, val, cfg.finetune, tokenizer.pad_token_id, cfg.seed, tmp / TRAIN_LOG, checkpoint
        )
        if lead:
            model.save_pretrained(tmp)
            write_json(
                tmp / PROVENANCE_FILE,
                {
                    "finetune": as_dict(cfg.finetune),
                    "seed": cfg.seed,
                    "base": str(base),
                    "base_sha256": base_sha,
                    "data_sha256": data_sha,
                    "result": asdict(result),
                    "versions": library_versions(),
                },
            )
    distributed.finish_worker()
    if not lead:
        return None
    checkpoint.clear()  # the adapter is in place: nothing left to resume
    return (
        f"[finetune@{name}] {result.steps} steps, loss {result.final_loss:.4f}, val loss {result.val_loss:.4f}, "
        f"{result.trainable_params / 1e6:.2f}M trainable, {result.tokens_per_s:.0f} tok/s"
        f"{f' on {result.processes} processes' if result.processes > 1 else ''}, "
        f"peak {result.peak_mem_bytes / 2**30:.2f} GiB -> {out}"
    )


if __name__ == "__main__":
    run_stage(main)
