"""Stage report: metrics/summary.json, plot CSVs, reports/ppl.png + summary.md, and the MLflow runs.

Always runs (never restored from the run-cache), so that MLflow sees every experiment.
Usage: dvc repro report
"""

from dataclasses import asdict

from quantorder.cli import run_stage
from quantorder.config import load_config
from quantorder.io import write_json
from quantorder.layout import EVAL_DIR, PLOTS_DIR, REPORTS_DIR, SUMMARY_FILE
from quantorder.report import gap_intervals, load_eval_metrics, markdown_table, summarize, write_reports


def main() -> str:
    cfg = load_config()
    metrics = load_eval_metrics(EVAL_DIR)
    algo = cfg.algo
    label = f"{algo.name} {algo.bits}-bit g{algo.group_size}{' sym' if algo.sym else ''}"
    summary = summarize(metrics, label, gap_intervals(EVAL_DIR))
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
            print(
                f"[report] MLflow run {run_id}"
                if run_id
                else "[report] MLflow already has these results; not logged again"
            )
    best = min((v for v in summary["gap_to_ft_pct"] if v not in ("base", "ft")), key=summary["gap_to_ft_pct"].get)
    return (
        f"[report] {label}: best quantized variant {best} ({summary['gap_to_ft_pct'][best]:+.2f}% vs ft) "
        f"-> {SUMMARY_FILE}, {', '.join(str(a) for a in artifacts)}"
    )


if __name__ == "__main__":
    run_stage(main)
