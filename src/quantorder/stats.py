"""Is a perplexity gap real? Paired bootstrap confidence intervals over evaluation examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantorder.errors import UserError

CONFIDENCE = 0.95
RESAMPLES = 9999
Samples = tuple[np.ndarray, np.ndarray]  # (tokens, summed NLL) per example


def read_samples(path: Path) -> Samples:
    """(tokens, summed NLL) per example from an evaluate stage's `<variant>.samples.csv`."""
    if not path.is_file():
        raise UserError(f"{path} missing; rerun `dvc repro` to evaluate that variant")
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return table[:, 0], table[:, 1]


def _gap_pct(tokens: np.ndarray, nll_ref: np.ndarray, nll: np.ndarray, axis: int = -1) -> np.ndarray:
    """Corpus perplexity of `nll` over that of `nll_ref`, minus 1, in percent (same tokens per example)."""
    n = tokens.sum(axis=axis)
    return 100 * np.expm1((nll.sum(axis=axis) - nll_ref.sum(axis=axis)) / n)


def paired_gap_ci(reference: Samples, other: Samples, seed: int = 0) -> dict:
    """The perplexity gap of `other` to `reference` (%), with its 95% BCa interval from a paired bootstrap
    over examples (both scored the same examples, token for token), and whether it excludes zero."""
    from scipy.stats import bootstrap

    (tokens, nll_ref), (tokens_other, nll) = reference, other
    if not np.array_equal(tokens, tokens_other):
        raise UserError("paired statistics need the same examples and token counts in both variants")
    result = bootstrap(
        (tokens, nll_ref, nll),
        _gap_pct,
        paired=True,
        vectorized=True,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        rng=np.random.default_rng(seed),
    )
    low, high = (float(x) for x in result.confidence_interval)
    return {
        "gap_pct": round(float(_gap_pct(tokens, nll_ref, nll)), 3),
        "ci95_pct": [round(low, 3), round(high, 3)],
        "excludes_zero": bool(low > 0 or high < 0),
    }
