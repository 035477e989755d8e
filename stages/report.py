"""Stage report: metrics/summary.json, plot CSVs, reports/ppl.png + summary.md, and the MLflow runs.

Always runs (never restored from the run-cache), so that MLflow sees every experiment.
Usage: dvc repro report
"""

from dataclasses import asdict

from quantorder.config import load_config
from quantorder.io import write_json
from quantorder.layout import EVAL_DIR, PLOTS_DIR, REPORTS_DIR, SUMMARY_FILE
from quantorder.report import gap_intervals, load_eval_metrics, markdown_table, summarize, write_reports
from quantorder.stage import run_stage
from quantorder.variants import QUANTIZED_VARIANTS, TARGET


def main() -> str:
    cfg = load_config()
    metrics = load_eval_metrics(EVAL_DIR)
    label = cfg.algo.label
    summary = summarize(metrics, label, cfg.algo.digest, gap_intervals(EVAL_DIR, metrics))
    write_json(SUMMARY_FILE, summary)
    artifacts = write_reports(summary, PLOTS_DIR, REPORTS_DIR)
    print(markdown_table(summary))
    if cfg.tracking.enabled:
        from quantorder.tracking import log_experiment

        try:
            run_id = log_experiment(cfg.tracking, asdict(cfg), summary, metrics, artifacts)
        except Exception as e:  # the metrics files are the source of truth; tracking is a view
            print(f"[report] warning: MLflow logging failed ({type(e).__name__}: {e}); metrics files are complete")
        else:
            logged = f"MLflow run {run_id}" if run_id else "MLflow already has these results; not logged again"
            print(f"[report] {logged}; `quantorder ui` shows the variants side by side")
    best = min((v for v in QUANTIZED_VARIANTS if v in summary["ppl"]), key=summary["gap_to_ft_pct"].get)
    return (
        f"[report] {label}: best quantized variant {best} ({summary['gap_to_ft_pct'][best]:+.2f}% vs {TARGET}) "
        f"-> {SUMMARY_FILE}, {', '.join(str(a) for a in artifacts)}"
    )


if __name__ == "__main__":
    run_stage(main)
