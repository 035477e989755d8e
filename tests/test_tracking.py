"""MLflow view: a parent run with one nested run per variant, never logged twice, store in the project."""

from __future__ import annotations

import pytest

from quantorder.config import TrackingCfg
from quantorder.tracking import flatten, log_experiment, metric_key
from quantorder.variants import VARIANTS


def test_flatten_gives_dotted_keys():
    assert flatten({"algo": {"bits": 4, "sym": False}, "seed": 0}) == {"algo.bits": 4, "algo.sym": False, "seed": 0}


def test_a_comparison_row_label_becomes_a_metric_name_mlflow_accepts():
    from mlflow.utils.validation import _validate_metric_name  # MLflow's own check (raises on bad names)

    for label in ("gptq 4-bit g64", "nf4 4-bit g32 qlora.init=loftq", "rtn 4-bit g64 model.hub_id=org/m [a1b2]"):
        _validate_metric_name(f"{metric_key(label)}.q_ft.ppl_mean")
    assert metric_key("nf4 4-bit g32 qlora.init=loftq") == "nf4_4-bit_g32_qlora.init:loftq"


def test_parent_and_nested_runs_logged_once(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    monkeypatch.chdir(tmp_path)
    chart = tmp_path / "ppl.png"
    chart.write_bytes(b"\x89PNG fake")
    variants = {
        v: {"ppl": 10.0 + i, "ppl_definition": "corpus", "provenance": {"seed": 0, "versions": {"torch": "x"}}}
        for i, v in enumerate(VARIANTS)
    }
    variants["q_ft_merge_q"] = {"variant": "q_ft_merge_q", "na": "cannot fold an adapter into this format"}
    params = {"algo": {"name": "rtn", "bits": 4}, "seed": 0}
    summary = {"ppl": {"ft": 12.0}, "provenance": {"git_commit": "abc", "data_sha256": "d"}}
    run_id = log_experiment(TrackingCfg(), params, summary, variants, [chart])
    assert run_id is not None
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")  # same results under another name: not logged again
    assert log_experiment(TrackingCfg(), params, summary, variants, [chart]) is None

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quantorder"])
    assert len(runs) == 1 + len(VARIANTS)
    parent = runs[runs["run_id"] == run_id].iloc[0]
    assert parent["tags.mlflow.runName"] == "exp-a" and parent["params.algo.bits"] == "4"
    assert parent["metrics.ppl.ft"] == pytest.approx(12.0)
    child = runs[runs["tags.mlflow.runName"] == "q_ft"].iloc[0]
    assert child["tags.mlflow.parentRunId"] == run_id and child["metrics.ppl"] == pytest.approx(15.0)
    assert child["params.versions.torch"] == "x" and child["tags.ppl_definition"] == "corpus"
    assert parent["params.provenance.git_commit"] == "abc" and parent["params.provenance.data_sha256"] == "d"
    na = runs[runs["tags.mlflow.runName"] == "q_ft_merge_q"].iloc[0]  # n/a: the reason, no number
    assert na["tags.na"] == "cannot fold an adapter into this format" and na.isna()["metrics.ppl"]
    artifacts = mlflow.artifacts.list_artifacts(run_id=run_id)
    assert [a.path for a in artifacts] == ["ppl.png"]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts live in the project, not in a DVC temp workspace


def test_a_run_cut_off_midway_is_logged_again_next_time(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    variants = {v: {"ppl": 10.0, "ppl_definition": "corpus"} for v in VARIANTS}
    params = {"algo": {"name": "rtn"}, "seed": 0}
    real = mlflow.log_metrics
    calls = []

    def store_fails_on_the_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ConnectionError("store unreachable")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", store_fails_on_the_third_call)
    with pytest.raises(ConnectionError):
        log_experiment(TrackingCfg(), params, {"ppl": {"ft": 10.0}}, variants, [])
    monkeypatch.setattr(mlflow, "log_metrics", real)
    assert log_experiment(TrackingCfg(), params, {"ppl": {"ft": 10.0}}, variants, []) is not None  # backfilled
    assert log_experiment(TrackingCfg(), params, {"ppl": {"ft": 10.0}}, variants, []) is None  # and only once
    runs = mlflow.search_runs(experiment_names=["quantorder"], filter_string="attributes.status = 'FINISHED'")
    assert len(runs) == 1 + len(VARIANTS)


def test_runs_left_open_by_a_killed_report_are_removed_when_it_is_logged_again(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    variants = {v: {"ppl": 10.0, "ppl_definition": "corpus"} for v in VARIANTS}
    params = {"algo": {"name": "rtn"}, "seed": 0}
    log_experiment(TrackingCfg(), params, {"ppl": {"ft": 10.0}}, {"ft": variants["ft"]}, [])  # the store exists
    experiment = mlflow.get_experiment_by_name("quantorder")
    client = MlflowClient()
    killed = client.create_run(experiment.experiment_id, run_name="workspace", tags={"kind": "experiment"})
    client.create_run(experiment.experiment_id, tags={"mlflow.parentRunId": killed.info.run_id, "kind": "variant"})
    someone_elses = client.create_run(experiment.experiment_id, run_name="notebook")  # open, not a report's
    # another experiment's report, logging at this moment from another clone (quantorder grid)
    concurrent = client.create_run(experiment.experiment_id, run_name="g-algo-nf4", tags={"kind": "experiment"})
    assert log_experiment(TrackingCfg(), params, {"ppl": {"ft": 10.0}}, variants, []) is not None
    runs = mlflow.search_runs(experiment_names=["quantorder"])
    reports = runs[~runs["run_id"].isin([someone_elses.info.run_id, concurrent.info.run_id])]
    assert (reports["status"] == "FINISHED").all() and len(reports) == (1 + 1) + (1 + len(VARIANTS))
    assert client.get_run(killed.info.run_id).info.lifecycle_stage == "deleted"
    assert client.get_run(someone_elses.info.run_id).info.lifecycle_stage == "active"
    assert client.get_run(concurrent.info.run_id).info.lifecycle_stage == "active"
