"""Stage evaluate@V: perplexity, size, memory and speed of variant V into metrics/eval/V.json.

Per-example token counts and summed NLL go to metrics/eval/V.samples.csv (for paired statistics);
a variant that quantizes a merged model also records how much of the LoRA update survived.
Usage: dvc repro evaluate@base   (or python stages/evaluate.py base)
"""

from quantorder.availability import na_reason
from quantorder.config import as_dict, load_config
from quantorder.data import read_jsonl
from quantorder.evaluate import (
    examples_of,
    footprint,
    measure,
    metrics_record,
    runtime_perplexity,
    samples_csv,
    served_record,
)
from quantorder.io import read_json, write_json, write_text
from quantorder.layout import BASE_DIR, EVAL_DIR, PROVENANCE_FILE, QA_DIR
from quantorder.models import check_seq_len, load_tokenizer, resolve_device
from quantorder.provenance import made_from
from quantorder.quantize import bits_per_weight, load_model, method_of
from quantorder.stage import run_stage, stage_target
from quantorder.survival import update_survival
from quantorder.variants import BASE_Q, VARIANTS


def main() -> str:
    name = stage_target("variant", VARIANTS)
    cfg, variant = load_config(), VARIANTS[name]
    csv, out = EVAL_DIR / f"{name}.samples.csv", EVAL_DIR / f"{name}.json"
    if reason := na_reason(variant.inputs(), [name]):
        write_text(csv, "tokens,nll\n")
        write_json(out, {"variant": name, "na": reason})
        return f"[evaluate@{name}] n/a: {reason}"
    check_seq_len(variant.model, cfg.eval.max_seq_len, "eval.max_seq_len")
    model = load_model(variant.model, cfg.model.dtype, resolve_device(cfg.model.device))
    if variant.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, variant.adapter)
    rows, tokenizer = read_jsonl(QA_DIR / "test.jsonl"), load_tokenizer(variant.model)
    result, peak = measure(model, tokenizer, rows, cfg.data.template, cfg.eval)
    merge = variant.requantizes
    metrics = {
        **metrics_record(name, result, peak, cfg.eval),
        **footprint(variant.model, variant.adapter, read_json(BASE_DIR / PROVENANCE_FILE)["source"]["parameters"]),
        "linear_bits_per_weight": bits_per_weight(variant.model, model),
        "update_survival": update_survival(BASE_Q, merge.base, merge.out, variant.model) if merge else None,
        "provenance": made_from(variant.model, variant.adapter, eval=as_dict(cfg.eval)),
    }
    served = ""
    if (method := method_of(variant.model)) and method.serving_runtime:  # the same tokens in the format's own runtime
        del model
        examples = examples_of(tokenizer, rows, cfg.data.template, cfg.eval)
        with method.serve(variant.model, variant.adapter, n_ctx=max(len(e.input_ids) for e in examples)) as session:
            theirs = runtime_perplexity(session, examples, method.serving_runtime)
            metrics["serving_runtime"] = served_record(method.serving_runtime, session.version, theirs, result)
        served = f", {method.serving_runtime} ppl {theirs.ppl:.4f} ({metrics['serving_runtime']['ppl_rel_diff']:+.2e})"
    write_text(csv, samples_csv(result))
    write_json(out, metrics)
    kept = f", LoRA update kept {metrics['update_survival']['overall']['kept']:.1%}" if merge else ""
    return (
        f"[evaluate@{name}] ppl {result.ppl:.4f} over {result.n_tokens} tokens, "
        f"{metrics['size_bytes'] / 2**20:.1f} MiB, {result.tokens_per_s:.0f} tok/s, peak {peak / 2**30:.2f} GiB{kept}"
        f"{served}"
    )


if __name__ == "__main__":
    run_stage(main)
