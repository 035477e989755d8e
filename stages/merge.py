"""Stage merge@X: fold an adapter into a base (quantorder.variants.MERGES[X]); a quantized base is
dequantized first.

Usage: dvc repro merge@ft   (or python stages/merge.py ft)
"""

from quantorder.availability import mark_na
from quantorder.config import load_config
from quantorder.io import atomic_dir, read_json, write_json
from quantorder.layout import PROVENANCE_FILE, SHARD_SIZE
from quantorder.memory import process_peak_memory
from quantorder.merge import merge_adapter
from quantorder.models import copy_tokenizer, is_quantized, resolve_device
from quantorder.provenance import hash_dir, library_versions
from quantorder.stage import run_stage, stage_target
from quantorder.variants import MERGES


def main() -> str:
    name = stage_target("merge target", MERGES)
    cfg = load_config()
    base, adapter, out = MERGES[name].base, MERGES[name].adapter, MERGES[name].out
    if reason := mark_na(out, [base, adapter]):
        return f"[merge@{name}] n/a: {reason}"
    merged = merge_adapter(base, adapter, cfg.model.dtype, resolve_device(cfg.model.device))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        copy_tokenizer(base, tmp)
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
