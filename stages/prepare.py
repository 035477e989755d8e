"""Stage prepare: the base model into models/base, the Q&A splits into data/qa.

Usage: dvc repro prepare   (or python stages/prepare.py from the project root)
"""

from quantorder.config import as_dict, load_config
from quantorder.data import build_splits, render, write_splits
from quantorder.io import atomic_dir, write_json
from quantorder.layout import BASE_DIR, PROVENANCE_FILE, QA_DIR
from quantorder.models import materialize_base
from quantorder.provenance import hash_dir, library_versions
from quantorder.stage import print_config, run_stage


def main() -> str:
    cfg = load_config()
    print_config("model", cfg.model)
    print_config("data", cfg.data)
    splits, source = build_splits(cfg.data)
    with atomic_dir(QA_DIR) as tmp:
        manifest = write_splits(tmp, splits, source, cfg.data)
    texts = [render(cfg.data.template, row) for row in splits["train"]]
    with atomic_dir(BASE_DIR) as tmp:
        model_source = materialize_base(cfg.model, tmp, tokenizer_texts=texts)
        write_json(
            tmp / PROVENANCE_FILE,
            {
                "model": as_dict(cfg.model),
                "source": model_source,
                "sha256": hash_dir(tmp),
                "versions": library_versions(),
            },
        )
    return (
        f"[prepare] {manifest['rows']} rows (sha256 {manifest['sha256'][:12]}), "
        f"model {cfg.model.name}: {model_source['parameters'] / 1e6:.1f}M params -> {BASE_DIR}"
    )


if __name__ == "__main__":
    run_stage(main)
