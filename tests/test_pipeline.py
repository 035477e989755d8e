"""End to end on the tiny model: `dvc exp run` of the float chain; a queued grid of GPTQ and NF4 that
re-executes only the quantization chain of each and makes every variant; switching to NF4
afterwards restores every stage but the report from the run-cache; `quantorder compare` grids
them; the MLflow UI shows them in a browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantorder.stage import stage_times
from quantorder.variants import FINETUNES, VARIANTS

from .conftest import ROOT
from .project import env, executed, free_port, make_project, run, wait_until_up

pytestmark = pytest.mark.slow
LOFTQ = "qlora.init=loftq"
FLOAT_CHAIN = {"prepare", "calibrate", "finetune@ft", "merge@ft", "evaluate@base", "evaluate@ft"}
QUANT_CHAIN = {
    "quantize@base_q",
    "finetune@q_ft",
    "merge@q_ft",
    "quantize@ft_merge_q",
    "quantize@q_ft_merge_q",
    "merge@q_ft_fmerge",
    "quantize@q_ft_fmerge_q",
    "evaluate@base_q",
    "evaluate@ft_q",
    "evaluate@ft_merge_q",
    "evaluate@q_ft",
    "evaluate@q_ft_merge_q",
    "evaluate@q_ft_fmerge",
    "evaluate@q_ft_fmerge_q",
    "finetune@qat",
    "merge@qat",
    "quantize@qat_merge_q",
    "evaluate@qat_merge_q",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def float_run(project) -> str:
    """The first experiment: the float chain alone (`dvc exp run` of its stages). Its log."""
    return run(["dvc", "exp", "run", "-S", "+experiment=tiny", *sorted(FLOAT_CHAIN)], project)


def test_float_chain_then_queued_grid_then_algo_switch(project, float_run):
    assert executed(float_run) == FLOAT_CHAIN
    assert "peak memory RSS" in float_run
    # DVC links outputs into its cache (.dvc/config cache.type) instead of copying: each model is on disk once
    weights = project / "models/merged/ft/model.safetensors"
    assert weights.stat().st_nlink >= 2 and weights.stat().st_mode & 0o222 == 0  # read-only: cache protection

    # the grid of two algorithms, queued: each experiment runs only its quantization chain (nf4's
    # q_ft adapter starts from LoftQ)
    run(["dvc", "exp", "run", "--queue", "-S", "+experiment=tiny", "-S", "algo=gptq"], project)
    run(["dvc", "exp", "run", "--queue", "-S", "+experiment=tiny", "-S", "algo=nf4", "-S", LOFTQ], project)
    # two workers: both experiments at once, one MLflow store and one run-cache between them
    # (`dvc queue start` returns when the queue is empty: started aside, so the queue can be watched)
    starter = subprocess.Popen(["dvc", "queue", "start", "-j", "2"], cwd=project, env=env(), stdout=subprocess.DEVNULL)
    names, most_at_once = _wait_for_queue(project)
    assert starter.wait() == 0 and len(names) == 2 and most_at_once == 2
    logs = [run(["dvc", "queue", "logs", name], project) for name in names]
    assert all(executed(log) == QUANT_CHAIN | {"report"} for log in logs), [executed(log) for log in logs]
    timed = stage_times(float_run) | stage_times(logs[0])  # every stage's closing line carries its time
    assert set(timed) == FLOAT_CHAIN | QUANT_CHAIN | {"report"} and all(s > 0 for s in timed.values())
    shown = _experiment_summaries(project)
    assert sorted(s["algo"].split()[0] for s in shown.values()) == ["gptq", "nf4"]
    assert len({s["ppl"]["base"] for s in shown.values()}) == 1  # one float chain, shared
    assert len({s["ppl"]["base_q"] for s in shown.values()}) == 2  # two different quantizations

    third = run(["dvc", "exp", "run", "-S", "+experiment=tiny", "-S", "algo=nf4", "-S", LOFTQ], project)
    assert executed(third) == {"report"}  # everything else comes back from the run-cache the queue filled
    assert "MLflow already has these results" in third
    assert (project / "models/quantized/base_q/quantorder.json").stat().st_nlink >= 2  # restored as a link too
    made = json.loads((project / "models/quantized/base_q/quantorder.json").read_text())
    assert made["algo"]["name"] == "nf4" and made["backend"] == "bitsandbytes"
    assert made["calibration_sha256"] is None  # bitsandbytes quantizes without calibration
    loftq = json.loads((project / "models/adapters/q_ft/quantorder.json").read_text())
    assert loftq["qlora"]["init"] == "loftq" and 0 < loftq["loftq_error"]["after"] < loftq["loftq_error"]["before"]
    assert any("LoftQ init: relative quantization error" in log for log in logs)

    # the workspace now holds every output of the nf4 experiment
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
    assert set(summary["update_kept"]) == {"ft_merge_q", "q_ft_merge_q", "q_ft_fmerge_q", "qat_merge_q"}
    shared = {"ppl_definition", "seed", "git_commit", "versions", "data_sha256", "base_sha256"}
    assert shared <= set(summary["provenance"])
    assert set(summary["gap_to_ft_ci95_pct"]) == set(VARIANTS) - {"ft"}  # paired-bootstrap intervals
    assert metrics["q_ft_merge_q"]["update_survival"]["per_layer"]
    assert (project / "reports/ppl.png").read_bytes()[:4] == b"\x89PNG"
    for made_dir in ("quantized/base_q", "merged/ft"):  # the stages that hold whole models record their peak
        peak = json.loads((project / "models" / made_dir / "quantorder.json").read_text())["peak_memory"]
        assert peak["rss_bytes"] > 50 * 2**20, made_dir
        assert peak["gpu_bytes"] is None or peak["gpu_bytes"] > 0, made_dir

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quantorder"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 2 and len(runs) == 2 + 2 * len(VARIANTS)  # the float chain alone logs no run
    assert set(runs["tags.mlflow.runName"]) >= set(VARIANTS)
    assert parents["params.provenance.git_commit"].notna().all() and parents["params.provenance.seed"].eq("0").all()
    nested = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert nested["tags.ppl_definition"].notna().all() and nested["params.data_sha256"].notna().all()

    # the cross-experiment grid: the two algorithms from `dvc exp show`, and one MLflow comparison run
    verdict = run([sys.executable, "-m", "quantorder", "compare"], project)
    grid = json.loads((project / "reports/compare/grid.json").read_text())
    # rows are labelled with the settings each experiment changed from its commit
    assert sorted(grid["grid"]) == ["gptq 4-bit g32", f"nf4 4-bit g32 {LOFTQ}"]
    assert {a.split()[0]: row["base_q"]["mean"] for a, row in grid["grid"].items()} == {
        s["algo"].split()[0]: s["ppl"]["base_q"] for s in shown.values()
    }
    assert "is the best quantized variant" in verdict and (project / "reports/compare/grid.png").stat().st_size > 10_000
    compared = mlflow.search_runs(experiment_names=["quantorder"], filter_string="tags.kind = 'comparison'")
    assert len(compared) == 1 and compared["metrics.gptq_4-bit_g32.q_ft.ppl_mean"].notna().all()


def test_editing_code_makes_exactly_the_stages_that_run_it_stale(project):
    """The perplexity's tokenization is read by every evaluate and finetune stage and by nothing else."""
    tokens = project / "src/quantorder/tokens.py"
    original = tokens.read_text()
    assert json.loads(run(["dvc", "status", "--json"], project)).keys() <= {"report"}  # always_changed
    try:
        tokens.write_text(original + "# an edit\n")
        stale = set(json.loads(run(["dvc", "status", "--json"], project))) - {"report"}
    finally:
        tokens.write_text(original)
    assert stale == {f"evaluate@{v}" for v in VARIANTS} | {f"finetune@{a}" for a in FINETUNES}


def _stale_with(project: Path, old: str, new: str) -> set[str]:
    """The stages `dvc status` calls stale once `old` in params.yaml reads `new` (put back after)."""
    params = project / "params.yaml"
    original = params.read_text()
    assert old in original
    try:
        params.write_text(original.replace(old, new))
        return set(json.loads(run(["dvc", "status", "--json"], project))) - {"report"}
    finally:
        params.write_text(original)


def test_adapter_settings_rerun_only_the_adapter_they_set(project):
    assert _stale_with(project, "weight: merged", "weight: base") == {"finetune@qat"}
    assert _stale_with(project, "init: loftq", "init: default") == {"finetune@q_ft"}


def _wait_for_queue(project: Path, timeout_s: float = 1200) -> tuple[list[str], int]:
    """Wait until no queued experiment is waiting or running; the names of those that ran (all must
    succeed) and the most that were running at once."""
    deadline, most_at_once = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        lines = run(["dvc", "queue", "status"], project).splitlines()
        tasks = [
            row.split() for row in lines[1:] if row.split()[-1:] in (["Queued"], ["Running"], ["Success"], ["Failed"])
        ]
        most_at_once = max(most_at_once, sum(t[-1] == "Running" for t in tasks))
        if tasks and not any(t[-1] in ("Queued", "Running") for t in tasks):
            assert all(t[-1] == "Success" for t in tasks), tasks
            return [t[1] for t in tasks], most_at_once
        time.sleep(10)  # each `dvc queue status` is a process of its own: about a CPU-second
    raise AssertionError("queued experiments did not finish in time")


def _experiment_summaries(project: Path) -> dict[str, dict]:
    """metrics/summary.json of every experiment `dvc exp show` lists with one, by experiment name."""
    baseline = json.loads(run(["dvc", "exp", "show", "--json"], project))[1]
    revs = [rev for exp in baseline["experiments"] for rev in exp["revs"]]
    summaries = {r["name"]: (r["data"]["metrics"].get("metrics/summary.json") or {}).get("data") for r in revs}
    return {name: summary for name, summary in summaries.items() if summary}


def test_stage_reports_user_errors_in_one_line(project):
    proc = subprocess.run(
        [sys.executable, "stages/evaluate.py", "nonsense"], cwd=project, env=env(), capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: variant 'nonsense' unknown (allowed: {', '.join(VARIANTS)})"
    )
    assert "Traceback" not in proc.stderr


def test_variants_benchmark_runs_on_the_finished_pipeline(project, tmp_path):
    out = tmp_path / "variants.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/variants.py"), "--new-tokens", "8", "--repeats", "2"]
    cmd += ["--batch-sizes", "1", "2", "--variants", "q_ft"]  # an adapter on the quantized base
    run(cmd + ["--out", str(out)], project)
    results = json.loads(out.read_text())
    assert list(results["variants"]) == ["base", "q_ft"]  # base: the baseline, always
    for r in results["variants"].values():
        assert set(r["decode_tokens_per_s"]) == {"1", "2"} and min(r["decode_tokens_per_s"].values()) > 0
        assert r["peak_mem_bytes"] > 0
    # the workspace holds the last experiment, nf4 g32 with double quantization: 4-bit codes, an 8-bit scale
    # per 32 weights, and per layer the code books (a large share on the tiny model's small layers)
    assert 4 + 8 / 32 < results["variants"]["q_ft"]["linear_bits_per_weight"] < 5
    assert results["variants"]["q_ft"]["size_bytes"] < results["variants"]["base"]["size_bytes"]
    assert results["repeats"] == 2
    table = out.with_suffix(".md").read_text()
    assert "| `q_ft` |" in table and "median of 2 timed runs" in table


# The MLflow UI as a person sees it: `mlflow server` on the store the runs above made, loaded in
# headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium).
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def ui(project):
    """What the README tells a user to run: `quantorder ui --run NAME` on the project's store (one
    experiment's parent run NAME), on a free localhost port. Yields (the page it prints, NAME, client)."""
    if not (CHROMIUM and DRIVER):
        missing = "headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)"
        if os.environ.get("QUANTORDER_REQUIRE_BROWSER"):  # set by .ci/run: there the test must run
            pytest.fail(missing)
        pytest.skip(missing)
    if not (project / "mlflow.db").exists():  # run alone: make the store with one tiny experiment
        run(["dvc", "exp", "run", "-S", "+experiment=tiny"], project)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quantorder").experiment_id])
    name = next(r.info.run_name for r in runs if r.data.tags.get("kind") == "experiment")
    cmd = [sys.executable, "-m", "quantorder", "ui", "--port", str(free_port()), "--run", name]
    server = subprocess.Popen(cmd, cwd=project, env=env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("open http://127.0.0.1:"), line
        page = line.split()[1]
        wait_until_up(page.split("/#/")[0], server)
        yield page, name, client
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture
def browser():
    """A fresh headless Chromium per test: MLflow keeps a page's sort and filter in the browser's
    local storage, and one test's view must not become the next one's."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def _links(browser, names: list[str], timeout_s: float = 60) -> list[str]:
    """The texts of the page's links that are among `names`, in page order, once a link for each name
    is rendered (MLflow re-renders the runs table after its text first shows); what is there at the
    timeout otherwise."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    found: list[str] = []

    def all_rendered(driver) -> bool:
        nonlocal found
        found = [a.text for a in driver.find_elements("css selector", "a") if a.text in names]
        return sorted(found) == sorted(names)

    wait = WebDriverWait(browser, timeout_s, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException])
    try:
        wait.until(all_rendered)
    except TimeoutException:
        pass  # the caller's assertion reports what was found
    return found


def _page_text(browser, url: str, expected: list[str], timeout_s: float = 60) -> str:
    """Open `url` and wait until every string in `expected` is on the rendered page; its text."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    text = ""

    def shows_all(driver) -> bool:
        nonlocal text
        text = driver.find_element("tag name", "body").text
        return all(e in text for e in expected)

    try:
        WebDriverWait(browser, timeout_s, poll_frequency=0.5).until(shows_all)
    except Exception:
        missing = [e for e in expected if e not in text]
        raise AssertionError(f"{url} never showed {missing}; it showed:\n{text[:3000]}") from None
    return text


def test_quantorder_ui_lands_on_the_variants_side_by_side(ui, browser, tmp_path):
    """The page `quantorder ui` prints: one experiment's variants as rows, sorted by perplexity,
    beside a chart with a bar per variant."""
    page, name, client = ui
    experiment = client.get_experiment_by_name("quantorder")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == name and r.data.tags.get("kind") == "experiment")
    variants = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_ppl = [r.info.run_name for r in sorted(variants, key=lambda r: r.data.metrics["ppl"])]
    assert sorted(by_ppl) == sorted(VARIANTS)

    shown = _page_text(browser, page, [*VARIANTS, "ppl", f"{len(VARIANTS)} matching runs"])
    browser.save_screenshot(str(tmp_path / "variants.png"))
    rows = _links(browser, list(VARIANTS))
    assert rows == by_ppl, (rows, shown[:2000])  # the table: one row per variant, best first
    assert "Sort: ppl" in shown and "/runs?" in browser.current_url  # the runs page, not a GenAI overview


def test_the_ui_shows_runs_metrics_and_the_chart(ui, browser, tmp_path):
    page, _, client = ui
    url = page.split("/#/")[0]
    experiment = client.get_experiment_by_name("quantorder")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("kind") != "comparison"]
    assert parents, "the pipeline logged no experiment run"
    base = f"{url}/#/experiments/{experiment.experiment_id}"

    # the runs list names every experiment (DVC's experiment names)
    _page_text(browser, f"{base}/runs", [r.info.run_name for r in parents])
    browser.save_screenshot(str(tmp_path / "runs.png"))

    # one experiment's page: its headline metrics with their values, and its variants as child runs
    parent = parents[0]
    metrics = {k: v for k, v in parent.data.metrics.items() if k.startswith("ppl.")}
    assert {"ppl.base", "ppl.ft", "ppl.q_ft"} <= set(metrics)
    children = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(VARIANTS)
    shown = _page_text(browser, f"{base}/runs/{parent.info.run_id}", ["ppl.q_ft", repr(metrics["ppl.q_ft"]), *children])
    assert repr(metrics["ppl.ft"]) in shown
    browser.save_screenshot(str(tmp_path / "run.png"))

    # the chart and the table are artifacts of the run
    _page_text(browser, f"{base}/runs/{parent.info.run_id}/artifacts", ["ppl.png", "summary.md"])
    screenshot = tmp_path / "artifacts.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    print(f"screenshots in {tmp_path}")
