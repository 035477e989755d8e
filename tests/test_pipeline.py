"""End to end: `dvc exp run` on the tiny model makes all seven variants with RTN; a queued grid of GPTQ
and AWQ re-executes only the quantization chain of each; switching to AWQ afterwards restores every
stage but the report from the run-cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantorder.cli import stage_times
from quantorder.layout import VARIANTS

from .conftest import ROOT

pytestmark = pytest.mark.slow
FLOAT_CHAIN = {"prepare", "calibrate", "finetune@ft", "merge@ft", "evaluate@base", "evaluate@ft"}
QUANT_CHAIN = {
    "quantize@base_q",
    "finetune@q_ft",
    "merge@q_ft",
    "quantize@ft_merge_q",
    "quantize@q_ft_merge_q",
    "evaluate@base_q",
    "evaluate@ft_q",
    "evaluate@ft_merge_q",
    "evaluate@q_ft",
    "evaluate@q_ft_merge_q",
}


# DVC commits experiments: give git an identity where the machine has none configured.
GIT_IDENTITY = {
    f"GIT_{who}_{what}": value
    for who in ("AUTHOR", "COMMITTER")
    for what, value in (("NAME", "quantorder-test"), ("EMAIL", "test@localhost"))
}


def _env() -> dict[str, str]:
    return {**GIT_IDENTITY, **os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _run(cmd: list[str], cwd: Path) -> str:
    env = _env()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _executed(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("project")
    for item in ("conf", "stages", "src", "dvc.yaml", "params.yaml", ".gitignore", "pyproject.toml"):
        src = ROOT / item
        (
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            if src.is_dir()
            else shutil.copy(src, repo / item)
        )
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "project"], repo)
    return repo


def test_full_grid_then_algo_switch_reuses_the_float_chain(project):
    first = _run(["dvc", "exp", "run", "-S", "+experiment=tiny"], project)
    assert _executed(first) == FLOAT_CHAIN | QUANT_CHAIN | {"report"}
    metrics = {v: json.loads((project / "metrics/eval" / f"{v}.json").read_text()) for v in VARIANTS}
    for name, m in metrics.items():
        assert m["ppl"] > 1 and m["n_tokens"] > 0, name
        samples = (project / "metrics/eval" / f"{name}.samples.csv").read_text().splitlines()
        assert len(samples) == 1 + m["n_examples"] == 1 + 16
        assert m["provenance"]["data_sha256"] and m["provenance"]["versions"]["torch"]
    assert metrics["base_q"]["size_bytes"] < metrics["base"]["size_bytes"]
    assert metrics["ft"]["ppl"] < metrics["base"]["ppl"]  # fine-tuning helped
    summary = json.loads((project / "metrics/summary.json").read_text())
    assert set(summary["ppl"]) == set(VARIANTS) and summary["gap_to_ft"]["ft"] == 0
    assert set(summary["update_kept"]) == {"ft_merge_q", "q_ft_merge_q"}
    assert set(summary["gap_to_ft_ci95_pct"]) == set(VARIANTS) - {"ft"}  # paired-bootstrap intervals
    assert metrics["q_ft_merge_q"]["update_survival"]["per_layer"]
    assert (project / "reports/ppl.png").read_bytes()[:4] == b"\x89PNG"
    for made_dir in ("quantized/base_q", "merged/ft"):  # the stages that hold whole models record their peak
        peak = json.loads((project / "models" / made_dir / "quantorder.json").read_text())["peak_memory"]
        assert peak["rss_bytes"] > 50 * 2**20, made_dir
        assert peak["gpu_bytes"] is None or peak["gpu_bytes"] > 0, made_dir
    assert "peak memory RSS" in first
    timed = stage_times(first)  # every stage's closing line carries its time
    assert set(timed) == FLOAT_CHAIN | QUANT_CHAIN | {"report"} and all(s > 0 for s in timed.values())
    base_ppl = metrics["base"]["ppl"]

    # the grid of the other algorithms, queued: each experiment runs only its quantization chain
    _run(["dvc", "exp", "run", "--queue", "-S", "+experiment=tiny", "-S", "algo=gptq,awq"], project)
    _run(["dvc", "queue", "start"], project)
    names = _wait_for_queue(project)
    assert len(names) == 2
    for name in names:
        assert _executed(_run(["dvc", "queue", "logs", name], project)) == QUANT_CHAIN | {"report"}, name
    shown = _experiment_summaries(project)
    assert sorted(s["algo"].split()[0] for s in shown.values()) == ["awq", "gptq", "rtn"]
    assert len({s["ppl"]["base"] for s in shown.values()}) == 1  # one float chain, shared
    assert len({s["ppl"]["base_q"] for s in shown.values()}) == 3  # three different quantizations

    third = _run(["dvc", "exp", "run", "-S", "+experiment=tiny", "-S", "algo=awq"], project)
    assert _executed(third) == {"report"}  # everything else comes back from the run-cache the queue filled
    assert "MLflow already has these results" in third
    assert json.loads((project / "metrics/eval/base.json").read_text())["ppl"] == base_ppl
    made = json.loads((project / "models/quantized/base_q/quantorder.json").read_text())
    calibration = json.loads((project / "data/calibration/manifest.json").read_text())
    assert made["algo"]["name"] == "awq" and made["calibration_sha256"] == calibration["sha256"]
    assert made["searched_scales"]["groups"] == 6  # qkv, gate/up, down in each of 2 layers (v->o: GQA shapes differ)
    assert (project / "models/quantized/base_q" / made["searched_scales"]["file"]).is_file()

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quantorder"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 3 and len(runs) == 3 + 3 * len(VARIANTS)
    assert set(runs["tags.mlflow.runName"]) >= set(VARIANTS)


def _wait_for_queue(project: Path, timeout_s: float = 1200) -> list[str]:
    """Wait until no queued experiment is waiting or running; the names of those that ran (all must succeed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = _run(["dvc", "queue", "status"], project).splitlines()
        tasks = [
            row.split() for row in lines[1:] if row.split()[-1:] in (["Queued"], ["Running"], ["Success"], ["Failed"])
        ]
        if tasks and not any(t[-1] in ("Queued", "Running") for t in tasks):
            assert all(t[-1] == "Success" for t in tasks), tasks
            return [t[1] for t in tasks]
        time.sleep(5)
    raise AssertionError("queued experiments did not finish in time")


def _experiment_summaries(project: Path) -> dict[str, dict]:
    """metrics/summary.json of every experiment `dvc exp show` lists, by experiment name."""
    baseline = json.loads(_run(["dvc", "exp", "show", "--json"], project))[1]
    revs = [rev for exp in baseline["experiments"] for rev in exp["revs"]]
    return {rev["name"]: rev["data"]["metrics"]["metrics/summary.json"]["data"] for rev in revs}


def test_stage_reports_user_errors_in_one_line(project):
    env = _env()
    proc = subprocess.run(
        [sys.executable, "stages/evaluate.py", "nonsense"], cwd=project, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: variant 'nonsense' unknown (allowed: base, base_q, ft, ft_q, ft_merge_q, q_ft, q_ft_merge_q)"
    )
    assert "Traceback" not in proc.stderr


def test_variants_benchmark_runs_on_the_finished_pipeline(project, tmp_path):
    out = tmp_path / "variants.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/variants.py"), "--new-tokens", "2", "--batch-sizes", "1", "2"]
    _run(cmd + ["--out", str(out)], project)
    results = json.loads(out.read_text())
    assert set(results["variants"]) == set(VARIANTS)
    for r in results["variants"].values():
        assert set(r["decode_tokens_per_s"]) == {"1", "2"} and min(r["decode_tokens_per_s"].values()) > 0
        assert r["peak_mem_bytes"] > 0
    assert results["variants"]["base_q"]["linear_bits_per_weight"] == pytest.approx(4 + 20 / 32)
    assert "| `q_ft_merge_q` |" in out.with_suffix(".md").read_text()
