"""Stage evaluate@V: perplexity, size, memory and speed of variant V into metrics/eval/V.json.

Per-example token counts and summed NLL go to metrics/eval/V.samples.csv (for paired statistics).
Usage: dvc repro evaluate@base   (or python stages/evaluate.py base)
"""

from quantorder.cli import run_stage, stage_target
from quantorder.config import as_dict, load_config
from quantorder.data import read_jsonl
from quantorder.evaluate import PPL_DEFINITIONS, footprint, measure, quantized_bits_per_weight
from quantorder.io import read_json, write_json, write_text
from quantorder.layout import BASE_DIR, EVAL_DIR, QA_DIR, VARIANTS
from quantorder.models import PROVENANCE_FILE, check_seq_len, load_model, load_tokenizer, resolve_device
from quantorder.provenance import git_commit, hash_adapter, library_versions


def main() -> str:
    name = stage_target("variant", VARIANTS)
    cfg = load_config()
    variant = VARIANTS[name]
    check_seq_len(variant.model, cfg.eval.max_seq_len, "eval.max_seq_len")
    model = load_model(variant.model, cfg.model.dtype, resolve_device(cfg.model.device))
    if variant.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, variant.adapter)
    tokenizer = load_tokenizer(variant.model)
    rows = read_jsonl(QA_DIR / "test.jsonl")
    result, peak = measure(model, tokenizer, rows, cfg.data.template, cfg.eval)
    base_info = read_json(BASE_DIR / PROVENANCE_FILE)
    model_info = read_json(variant.model / PROVENANCE_FILE)
    metrics = {
        "variant": name,
        "ppl": result.ppl,
        "nll_sum": result.nll_sum,
        "n_tokens": result.n_tokens,
        "n_examples": len(result.per_example),
        "ppl_definition": PPL_DEFINITIONS[cfg.eval.answer_only],
        **footprint(variant.model, variant.adapter, base_info["source"]["parameters"]),
        "linear_bits_per_weight": quantized_bits_per_weight(model),
        "peak_mem_bytes": peak,
        "eval_tokens_per_s": result.tokens_per_s,
        "eval_seconds": result.seconds,
        "update_survival": model_info.get("update_survival"),
        "provenance": {
            "seed": cfg.seed,
            "eval": as_dict(cfg.eval),
            "algo": as_dict(cfg.algo) if variant.quantized else None,
            "model_sha256": model_info["sha256"],
            "adapter_sha256": hash_adapter(variant.adapter) if variant.adapter else None,
            "base_sha256": base_info["sha256"],
            "data_sha256": read_json(QA_DIR / "manifest.json")["sha256"],
            "git_commit": git_commit(),
            "versions": library_versions(),
        },
    }
    write_text(
        EVAL_DIR / f"{name}.samples.csv", "tokens,nll\n" + "".join(f"{t},{nll:.6f}\n" for t, nll in result.per_example)
    )
    write_json(EVAL_DIR / f"{name}.json", metrics)
    return (
        f"[evaluate@{name}] ppl {result.ppl:.4f} over {result.n_tokens} tokens, "
        f"{metrics['size_bytes'] / 2**20:.1f} MiB, {result.tokens_per_s:.0f} tok/s, peak {peak / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    run_stage(main)
