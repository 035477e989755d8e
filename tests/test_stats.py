"""Perplexity gaps get paired-bootstrap intervals that tell a real shift from noise."""

from __future__ import annotations

import numpy as np
import pytest

from quantorder.errors import UserError
from quantorder.report import gap_intervals, markdown_table, plot_rows, summarize
from quantorder.stats import paired_gap_ci, read_samples
from quantorder.variants import VARIANTS

RNG = np.random.default_rng(0)
TOKENS = RNG.integers(50, 200, 120).astype(float)
FT = TOKENS * 2.0 + RNG.normal(0, 5, 120)  # about 2 nats per token


def test_a_shift_of_every_example_is_significant_and_noise_is_not():
    worse = paired_gap_ci((TOKENS, FT), (TOKENS, FT + 0.05 * TOKENS + RNG.normal(0, 2, 120)))
    assert worse["excludes_zero"] and 4.0 < worse["gap_pct"] < 6.0  # exp(0.05) - 1 = 5.1%
    low, high = worse["ci95_pct"]
    assert low < worse["gap_pct"] < high and high - low < 2.0
    jitter = RNG.normal(0, 2, 120)
    noise = paired_gap_ci((TOKENS, FT), (TOKENS, FT + jitter - jitter.mean()))
    assert not noise["excludes_zero"] and noise["ci95_pct"][0] < 0 < noise["ci95_pct"][1]


def test_pairing_needs_the_same_examples():
    with pytest.raises(UserError, match="same examples and token counts"):
        paired_gap_ci((TOKENS, FT), (TOKENS + 1, FT))


PROVENANCE = {"seed": 3, "git_commit": "abc", "versions": {"torch": "x"}, "data_sha256": "d", "base_sha256": "b"}


def test_report_carries_intervals_into_summary_and_table(tmp_path):
    shift = {
        "base": 0.6, "base_q": 0.8, "ft": 0.0, "ft_q": 0.1, "ft_merge_q": 0.1, "q_ft": 0.0,
        "q_ft_merge_q": 0.5, "q_ft_fmerge": 0.05, "q_ft_fmerge_q": 0.2, "qat_merge_q": 0.15,
    }  # fmt: skip
    metrics = {}
    for v in VARIANTS:
        noise = RNG.normal(0, 2, 120) if v != "ft" else np.zeros(120)
        nll = FT + shift[v] * TOKENS + noise - noise.mean()  # zero-mean noise: only the shift is real
        rows = "".join(f"{int(t)},{x:.6f}\n" for t, x in zip(TOKENS, nll))
        (tmp_path / f"{v}.samples.csv").write_text("tokens,nll\n" + rows)
        ppl = float(np.exp(nll.sum() / TOKENS.sum()))
        metrics[v] = {"ppl": ppl, "size_bytes": 1, "bits_per_param": 4.0, "eval_tokens_per_s": 1.0, "peak_mem_bytes": 1}
        metrics[v] |= {"ppl_definition": "corpus", "provenance": {**PROVENANCE, "model_sha256": v}}
    served = {"runtime": "llama.cpp", "version": "b1", "ppl": metrics["base_q"]["ppl"] * 1.003, "nll_sum": 1.0}
    metrics["base_q"]["serving_runtime"] = served | {"ppl_rel_diff": 0.003, "eval_tokens_per_s": 250.0}
    tokens, nll = read_samples(tmp_path / "q_ft.samples.csv")
    assert tokens.shape == nll.shape == (120,)
    summary = summarize(metrics, "rtn 4-bit g64", "0123456789", gap_intervals(tmp_path, metrics))
    assert summary["provenance"] == {"ppl_definition": "corpus", **PROVENANCE}  # shared by all; per-model hashes not
    assert set(summary["gap_to_ft_ci95_pct"]) == set(VARIANTS) - {"ft"}
    assert summary["gap_to_ft_significant"]["base_q"] and not summary["gap_to_ft_significant"]["q_ft"]
    low, high = summary["gap_to_ft_ci95_pct"]["base_q"].values()
    assert low < summary["gap_to_ft_pct"]["base_q"] < high
    table = markdown_table(summary)
    assert "| `q_ft` |" in table and "(n.s.)" in table.split("| `q_ft` |")[1].splitlines()[0]
    # the serving runtime's perplexity on the same tokens: only where a variant has one
    assert list(summary["serving_runtime"]) == ["base_q"]
    assert summary["serving_runtime"]["base_q"]["ppl_rel_diff"] == 0.003
    base_q = summary["ppl"]["base_q"]
    assert f"| `base_q` | llama.cpp | {base_q:.3f} | {base_q * 1.003:.3f} | +0.30% | 250 |" in table
    with pytest.raises(UserError, match="missing"):
        read_samples(tmp_path / "absent.samples.csv")


def test_an_na_variant_is_listed_with_its_reason_and_left_out_of_the_numbers(tmp_path):
    """A variant the algorithm cannot make: "n/a: reason" in the table, no number, no interval, no plot row."""
    metrics = {}
    for v in VARIANTS:
        rows = "".join(f"10,{20 + RNG.normal():.4f}\n" for _ in range(30))
        (tmp_path / f"{v}.samples.csv").write_text("tokens,nll\n" + rows)
        metrics[v] = {"ppl": 7.0, "size_bytes": 1, "bits_per_param": 4.0, "eval_tokens_per_s": 1.0, "peak_mem_bytes": 1}
        metrics[v] |= {"ppl_definition": "corpus", "provenance": PROVENANCE}
    metrics["q_ft_merge_q"] = {"variant": "q_ft_merge_q", "na": "cannot fold an adapter into this format"}
    (tmp_path / "q_ft_merge_q.samples.csv").write_text("tokens,nll\n")
    summary = summarize(metrics, "x 4-bit g64", "0123456789", gap_intervals(tmp_path, metrics))
    assert summary["na"] == {"q_ft_merge_q": "cannot fold an adapter into this format"}
    assert "q_ft_merge_q" not in summary["ppl"] and "q_ft_merge_q" not in summary["gap_to_ft_ci95_pct"]
    assert "| `q_ft_merge_q` | n/a: cannot fold an adapter into this format |" in markdown_table(summary)
    assert [r["variant"] for r in plot_rows(summary)] == [v for v in VARIANTS if v != "q_ft_merge_q"]
