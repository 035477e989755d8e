"""Perplexity (Olive study definition or answer-only), size on disk, bits per weight, memory, speed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quantorder.config import ANSWER_MARKER, EvalCfg
from quantorder.data import render
from quantorder.memory import peak_memory_bytes, reset_peak_memory
from quantorder.models import dir_size
from quantorder.progress import progress
from quantorder.tokens import Example, encode, pad_batch, token_nll

PPL_DEFINITIONS = {
    False: "olive: each example as f'{bos} {template(row)} {eos}', truncated to max_seq_len, loss over all real "
    "tokens, corpus-level exp(sum NLL / sum tokens)",
    True: f"answer-only: as olive, but only tokens after {ANSWER_MARKER!r} are targets",
}


@dataclass
class Perplexity:
    ppl: float
    nll_sum: float
    n_tokens: int
    per_example: list[tuple[int, float]]  # (tokens, summed NLL) in test-file order
    seconds: float
    tokens_per_s: float


def examples_of(tokenizer, rows: list[dict], template: str, cfg: EvalCfg) -> list[Example]:
    """The scored examples: the first `cfg.max_examples` rows (all if 0), tokenized as `encode` does."""
    rows = rows[: cfg.max_examples] if cfg.max_examples else rows
    return [encode(tokenizer, render(template, r), cfg.max_seq_len, cfg.answer_only) for r in rows]


def perplexity(model, tokenizer, rows: list[dict], template: str, cfg: EvalCfg) -> Perplexity:
    """Corpus-level perplexity of `model` on `rows`, with per-example token counts and NLL.

    Examples are batched by length (less padding, same numbers) and reported in input order.
    """
    device = next(model.parameters()).device
    examples = examples_of(tokenizer, rows, template, cfg)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    results: list[tuple[int, float]] = [(0, 0.0)] * len(examples)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        starts = range(0, len(order), cfg.batch_size)
        for i in progress(starts, len(starts), "[evaluate] scoring", unit="batches"):
            idx = order[i : i + cfg.batch_size]
            batch = {k: v.to(device) for k, v in pad_batch([examples[j] for j in idx], tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, n = token_nll(logits, batch["labels"])
            for j, tokens, loss in zip(idx, n.tolist(), nll.tolist()):
                results[j] = (tokens, loss)
    return _perplexity(results, examples, time.perf_counter() - start)


def runtime_perplexity(session, examples: list[Example], runtime: str) -> Perplexity:
    """The same perplexity from another runtime's logits on the same tokens: `session.logits(ids)`
    (tokens x vocab) for one example at a time, e.g. a GGUF in llama.cpp (`Quantizer.serve`)."""
    results = []
    start = time.perf_counter()
    for e in progress(examples, len(examples), f"[evaluate] scoring in {runtime}", unit="examples"):
        nll, n = token_nll(torch.from_numpy(session.logits(e.input_ids))[None], torch.tensor([e.labels]))
        results.append((int(n), float(nll)))
    return _perplexity(results, examples, time.perf_counter() - start)


def _perplexity(results: list[tuple[int, float]], examples: list[Example], seconds: float) -> Perplexity:
    n_tokens = sum(t for t, _ in results)
    nll_sum = sum(loss for _, loss in results)
    return Perplexity(
        ppl=float(torch.exp(torch.tensor(nll_sum / n_tokens, dtype=torch.float64))),
        nll_sum=nll_sum,
        n_tokens=n_tokens,
        per_example=results,
        seconds=seconds,
        tokens_per_s=sum(len(e.input_ids) for e in examples) / seconds,
    )


def footprint(model_dir: Path, adapter_dir: Path | None, base_params: int) -> dict:
    """Bytes on disk of the weights (+ adapter) and the bits they spend per base-model parameter."""
    size = dir_size(model_dir) + (dir_size(adapter_dir) if adapter_dir else 0)
    return {"size_bytes": size, "bits_per_param": 8 * size / base_params}


def measure(model, tokenizer, rows, template, cfg: EvalCfg) -> tuple[Perplexity, int]:
    """Perplexity plus peak memory during it."""
    device = next(model.parameters()).device
    reset_peak_memory(device)
    result = perplexity(model, tokenizer, rows, template, cfg)
    return result, peak_memory_bytes(device)


def metrics_record(variant: str, result: Perplexity, peak: int, eval_cfg: EvalCfg) -> dict:
    """The numbers of one evaluation as metrics/eval/<variant>.json holds them (footprint and
    provenance are added by the stage)."""
    return {
        "variant": variant,
        "ppl": result.ppl,
        "nll_sum": result.nll_sum,
        "n_tokens": result.n_tokens,
        "n_examples": len(result.per_example),
        "ppl_definition": PPL_DEFINITIONS[eval_cfg.answer_only],
        "peak_mem_bytes": peak,
        "eval_tokens_per_s": result.tokens_per_s,
        "eval_seconds": result.seconds,
    }


def served_record(runtime: str, version: str, theirs: Perplexity, ours: Perplexity) -> dict:
    """The perplexity a serving runtime computes on the same tokens, beside the evaluator's."""
    assert theirs.n_tokens == ours.n_tokens, "both runtimes score the same tokens"
    return {
        "runtime": runtime,
        "version": version,
        "ppl": theirs.ppl,
        "nll_sum": theirs.nll_sum,
        "ppl_rel_diff": theirs.ppl / ours.ppl - 1,
        "max_example_nll_per_token_diff": max(
            abs(a - b) / max(n, 1) for (n, a), (_, b) in zip(theirs.per_example, ours.per_example)
        ),
        "eval_tokens_per_s": theirs.tokens_per_s,
    }


def samples_csv(result: Perplexity) -> str:
    """Per-example token counts and summed NLL, in test-file order (for paired statistics)."""
    return "tokens,nll\n" + "".join(f"{t},{nll:.6f}\n" for t, nll in result.per_example)
