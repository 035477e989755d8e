"""Summary metrics, plot data, the Olive-style chart and a markdown table from metrics/eval/*.json.

A variant the algorithm cannot make has `na` (the reason) instead of numbers; it is listed as
"n/a: reason" and left out of every number, interval and chart.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from quantorder.errors import UserError
from quantorder.io import read_json, write_text
from quantorder.stats import paired_gap_ci, read_samples
from quantorder.variants import COMPARED, QUANTIZED_VARIANTS, REFERENCE_VARIANTS, TARGET, VARIANTS


def load_eval_metrics(eval_dir: Path) -> dict[str, dict]:
    """The metrics of every variant, in VARIANTS order; a missing file is a UserError naming it."""
    missing = [v for v in VARIANTS if not (eval_dir / f"{v}.json").is_file()]
    if missing:
        raise UserError(f"no metrics for variant(s) {', '.join(missing)} in {eval_dir}; run `dvc repro`")
    return {v: read_json(eval_dir / f"{v}.json") for v in VARIANTS}


def measured(metrics: dict[str, dict]) -> dict[str, dict]:
    """The variants that have numbers (not n/a)."""
    return {v: m for v, m in metrics.items() if "na" not in m}


def gap_intervals(eval_dir: Path, metrics: dict[str, dict]) -> dict[str, dict]:
    """For every measured variant but the target: its perplexity gap to the target (`ft`) with a
    paired-bootstrap 95% interval."""
    target = read_samples(eval_dir / f"{TARGET}.samples.csv")
    return {
        v: paired_gap_ci(target, read_samples(eval_dir / f"{v}.samples.csv")) for v in measured(metrics) if v != TARGET
    }


def summarize(all_metrics: dict[str, dict], algo_label: str, algo_digest: str, intervals: dict[str, dict]) -> dict:
    """Headline numbers per variant; the gap of each variant to `ft` is the number that matters,
    with its 95% interval and whether that interval excludes zero (`intervals`, from gap_intervals)."""
    metrics = measured(all_metrics)
    ft = metrics[TARGET]["ppl"]
    return {
        "algo": algo_label,
        "algo_digest": algo_digest,
        "na": {v: m["na"] for v, m in all_metrics.items() if "na" in m},
        "ppl": {v: round(m["ppl"], 4) for v, m in metrics.items()},
        "gap_to_ft": {v: round(m["ppl"] - ft, 4) for v, m in metrics.items()},
        "gap_to_ft_pct": {v: round(100 * (m["ppl"] / ft - 1), 3) for v, m in metrics.items()},
        # {low, high}, not a pair: DVC's metrics (`dvc exp show`, hence `quantorder compare`) drop lists
        "gap_to_ft_ci95_pct": {v: dict(zip(("low", "high"), i["ci95_pct"])) for v, i in intervals.items()},
        "gap_to_ft_significant": {v: i["excludes_zero"] for v, i in intervals.items()},
        "size_mib": {v: round(m["size_bytes"] / 2**20, 3) for v, m in metrics.items()},
        "bits_per_param": {v: round(m["bits_per_param"], 3) for v, m in metrics.items()},
        "linear_bits_per_weight": {
            v: round(m["linear_bits_per_weight"], 3) for v, m in metrics.items() if m.get("linear_bits_per_weight")
        },
        "eval_tokens_per_s": {v: round(m["eval_tokens_per_s"], 1) for v, m in metrics.items()},
        "peak_mem_mib": {v: round(m["peak_mem_bytes"] / 2**20, 1) for v, m in metrics.items()},
        # share of the merged LoRA update that survives requantization (1: all of it)
        "update_kept": {
            v: round(m["update_survival"]["overall"]["kept"], 4) for v, m in metrics.items() if m.get("update_survival")
        },
        # the same test tokens scored by the runtime that serves the format (GGUF: llama.cpp), where it has one
        "serving_runtime": {
            v: {k: m["serving_runtime"][k] for k in ("runtime", "ppl", "ppl_rel_diff", "eval_tokens_per_s")}
            for v, m in metrics.items()
            if "serving_runtime" in m
        },
        "provenance": shared_provenance(metrics),
    }


def shared_provenance(metrics: dict[str, dict]) -> dict:
    """What every variant's numbers rest on: seed, perplexity definition, code, libraries, data and base."""
    ft = metrics[TARGET]
    keys = ("seed", "git_commit", "versions", "data_sha256", "base_sha256")
    return {"ppl_definition": ft["ppl_definition"], **{k: ft["provenance"][k] for k in keys}}


def plot_rows(summary: dict) -> list[dict]:
    """One row per variant for `dvc plots`: perplexity, gap to ft, size, and whether it is quantized."""
    return [
        {
            "variant": v,
            "kind": "quantized" if v in QUANTIZED_VARIANTS else "reference" if v in REFERENCE_VARIANTS else "float",
            "ppl": summary["ppl"][v],
            "gap_to_ft_pct": summary["gap_to_ft_pct"][v],
            "size_mib": summary["size_mib"][v],
        }
        for v in VARIANTS
        if v in summary["ppl"]
    ]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _interval(summary: dict, v: str) -> str:
    if v not in summary["gap_to_ft_ci95_pct"]:
        return "-"
    ci = summary["gap_to_ft_ci95_pct"][v]
    return f"[{ci['low']:+.2f}%, {ci['high']:+.2f}%]" + ("" if summary["gap_to_ft_significant"][v] else " (n.s.)")


def markdown_table(summary: dict) -> str:
    header = (
        "| variant | ppl | gap to ft | 95% CI of the gap | size (MiB) | bits/param | eval tok/s |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| `{v}` | n/a: {summary['na'][v]} | | | | | |\n"
        if v in summary["na"]
        else f"| `{v}` | {summary['ppl'][v]:.3f} | {summary['gap_to_ft_pct'][v]:+.2f}% | {_interval(summary, v)} | "
        f"{summary['size_mib'][v]:.1f} | {summary['bits_per_param'][v]:.2f} | {summary['eval_tokens_per_s'][v]:.0f} |\n"
        for v in VARIANTS
    )
    note = "Intervals: paired bootstrap over test examples; n.s.: the interval includes zero."
    return f"Perplexity on the test split, {summary['algo']}.\n\n{header}{body}\n{note}\n{_served_table(summary)}"


def _served_table(summary: dict) -> str:
    """The serving runtime's perplexity on the same tokens, beside the evaluator's (none: empty)."""
    served = summary.get("serving_runtime") or {}
    if not served:
        return ""
    rows = "".join(
        f"| `{v}` | {s['runtime']} | {summary['ppl'][v]:.3f} | {s['ppl']:.3f} | {100 * s['ppl_rel_diff']:+.2f}% | "
        f"{s['eval_tokens_per_s']:.0f} |\n"
        for v, s in served.items()
    )
    return (
        "\nThe same test tokens in the runtime that serves the format:\n\n"
        "| variant | runtime | ppl (evaluator) | ppl (runtime) | difference | runtime eval tok/s |\n"
        f"|---|---|---:|---:|---:|---:|\n{rows}"
    )


def chart(summary: dict, path: Path) -> None:
    """Bars for the deliverables (quantized ones dark, float ones light), horizontal lines for `base` and
    `ft` (the Olive study's layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    shown = [v for v in COMPARED if v in summary["ppl"]]
    ppl = [summary["ppl"][v] for v in shown]
    bars = ax.bar(shown, ppl, color=["#4C72B0" if v in QUANTIZED_VARIANTS else "#A1C9F4" for v in shown])
    ax.tick_params(axis="x", labelsize=7)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for v, style in zip(REFERENCE_VARIANTS, ("--", "-")):
        ax.axhline(
            summary["ppl"][v],
            linestyle=style,
            color="#C44E52" if v == TARGET else "gray",
            label=f"{v} {summary['ppl'][v]:.2f}",
        )
    values = ppl + [summary["ppl"][v] for v in REFERENCE_VARIANTS]
    ax.set_ylim(min(values) * 0.9, max(values) * 1.2)  # headroom above the bars for the legend
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"quantize before or after fine-tuning? ({summary['algo']})")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_reports(summary: dict, plots_dir: Path, reports_dir: Path) -> list[Path]:
    """Plot CSV for DVC, the PNG chart and the markdown table; returns the report files."""
    write_text(plots_dir / "variants.csv", to_csv(plot_rows(summary)))
    reports_dir.mkdir(parents=True, exist_ok=True)
    png, md = reports_dir / "ppl.png", reports_dir / "summary.md"
    chart(summary, png)
    write_text(md, markdown_table(summary))
    return [png, md]
