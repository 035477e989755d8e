"""Stage merge@X: fold adapter X into its base; a quantized base is dequantized first.

Usage: dvc repro merge@ft   (or python stages/merge.py ft)
"""

import shutil

from quantorder.cli import run_stage, stage_target
from quantorder.config import load_config
from quantorder.io import atomic_dir, read_json, write_json
from quantorder.layout import ADAPTERS_DIR, FINETUNE_BASES, MERGED_DIR
from quantorder.memory import process_peak_memory
from quantorder.merge import merge_adapter
from quantorder.models import PROVENANCE_FILE, is_quantized, resolve_device
from quantorder.provenance import hash_dir, library_versions

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def main() -> str:
    name = stage_target("merge target", FINETUNE_BASES)
    cfg = load_config()
    base, adapter, out = FINETUNE_BASES[name], ADAPTERS_DIR / name, MERGED_DIR / name
    merged = merge_adapter(base, adapter, cfg.model.dtype, resolve_device(cfg.model.device))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            if (base / f).is_file():
                shutil.copy(base / f, tmp / f)
        write_json(
            tmp / PROVENANCE_FILE,
            {
                "base": str(base),
                "base_sha256": read_json(base / PROVENANCE_FILE)["sha256"],
                "adapter": str(adapter),
                "dequantized_base": is_quantized(base),
                "peak_memory": process_peak_memory(),
                "sha256": hash_dir(tmp),
                "versions": library_versions(),
            },
        )
    return f"[merge@{name}] {base} + {adapter} -> {out}"


if __name__ == "__main__":
    run_stage(main)
