"""Stage finetune@X: LoRA on the float base (ft) or on the quantized base (q_ft).

Usage: dvc repro finetune@ft   (or python stages/finetune.py ft)
"""

from dataclasses import asdict

from quantorder.cli import print_config, run_stage, stage_target
from quantorder.config import as_dict, load_config
from quantorder.data import read_jsonl
from quantorder.finetune import TRAIN_LOG, setup_data, setup_model, train_loop
from quantorder.io import atomic_dir, read_json, write_json
from quantorder.layout import ADAPTERS_DIR, FINETUNE_BASES, QA_DIR
from quantorder.models import PROVENANCE_FILE, load_model, load_tokenizer, resolve_device
from quantorder.provenance import library_versions


def main() -> str:
    name = stage_target("finetune target", FINETUNE_BASES)
    cfg = load_config()
    print_config("finetune", cfg.finetune)
    base, out = FINETUNE_BASES[name], ADAPTERS_DIR / name
    tokenizer = load_tokenizer(base)
    train = setup_data(tokenizer, read_jsonl(QA_DIR / "train.jsonl"), cfg.data.template, cfg.finetune.max_seq_len)
    val = setup_data(tokenizer, read_jsonl(QA_DIR / "val.jsonl"), cfg.data.template, cfg.finetune.max_seq_len)
    model = setup_model(
        load_model(base, cfg.model.dtype, resolve_device(cfg.model.device), training=True), cfg.finetune, cfg.seed
    )
    with atomic_dir(out) as tmp:
        result = train_loop(model, train, val, cfg.finetune, tokenizer.pad_token_id, cfg.seed, tmp / TRAIN_LOG)
        model.save_pretrained(tmp)
        write_json(
            tmp / PROVENANCE_FILE,
            {
                "finetune": as_dict(cfg.finetune),
                "seed": cfg.seed,
                "base": str(base),
                "base_sha256": read_json(base / PROVENANCE_FILE)["sha256"],
                "data_sha256": read_json(QA_DIR / "manifest.json")["sha256"],
                "result": asdict(result),
                "versions": library_versions(),
            },
        )
    return (
        f"[finetune@{name}] {result.steps} steps, loss {result.final_loss:.4f}, val loss {result.val_loss:.4f}, "
        f"{result.trainable_params / 1e6:.2f}M trainable, {result.tokens_per_s:.0f} tok/s, "
        f"peak {result.peak_mem_bytes / 2**30:.2f} GiB -> {out}"
    )


if __name__ == "__main__":
    run_stage(main)
