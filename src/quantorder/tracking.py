"""MLflow view of the metrics files: a parent run per DVC experiment, a nested run per variant.

The only module that imports mlflow. The default store is `mlflow.db` in the project root (the
real root, `DVC_ROOT`, also inside DVC's temporary experiment workspaces), written under a file
lock so that queued experiments never race on it. Identical results are never logged twice.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantorder.config import TrackingCfg
from quantorder.io import json_sha256

SUMMARY_TAG = "quantorder.summary_sha256"
LOCK_TIMEOUT_S = 120  # waiting longer for another writer means the store is stuck


def project_root() -> Path:
    """The real project root: DVC_ROOT inside `dvc exp run` workspaces, else the working dir."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def tracking_uri(cfg: TrackingCfg, root: Path) -> str:
    return cfg.uri or f"sqlite:///{root / 'mlflow.db'}"


def run_name() -> str:
    """The DVC experiment's name, or `workspace` for a plain `dvc repro`."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"algo": {"bits": 4}} -> {"algo.bits": 4}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _numeric(data: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(data).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def log_experiment(
    cfg: TrackingCfg,
    params: Mapping[str, Any],
    summary: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]],
    artifacts: list[Path],
) -> str | None:
    """Log one experiment; return the parent run id, or None when this exact result is already logged.

    The result's digest is tagged last, so a run cut off midway (store failure, kill) counts as not
    logged and the next `report` logs it again. A store locked by another writer for longer than
    LOCK_TIMEOUT_S raises filelock's Timeout, which `report` turns into a warning.
    """
    import mlflow
    from filelock import FileLock

    root = project_root()
    digest = json_sha256([params, variants])
    with FileLock(str(root / ".mlflow.lock"), timeout=LOCK_TIMEOUT_S):
        mlflow.set_tracking_uri(tracking_uri(cfg, root))
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else mlflow.create_experiment(cfg.experiment, artifact_location=(root / "mlartifacts").as_uri())
        )
        name = run_name()
        _delete_killed(experiment_id, name)
        if len(mlflow.search_runs([experiment_id], filter_string=f"tags.`{SUMMARY_TAG}` = '{digest}'")):
            return None  # e.g. a run-cache restore of results already logged under another name
        started: list[str] = []
        try:
            with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags={"kind": "experiment"}) as parent:
                started.append(parent.info.run_id)
                shared = {"provenance": summary.get("provenance", {})}  # seed, definition, commit, versions, hashes
                mlflow.log_params({k: str(v)[:500] for k, v in flatten({**params, **shared}).items()})
                mlflow.log_metrics(_numeric({k: v for k, v in summary.items() if k not in ("algo", "provenance")}))
                for path in artifacts:
                    mlflow.log_artifact(str(path))
                for variant, metrics in variants.items():
                    with mlflow.start_run(
                        experiment_id=experiment_id, run_name=variant, nested=True, tags={"kind": "variant"}
                    ):
                        provenance = flatten(metrics.get("provenance") or {})
                        mlflow.log_params({k: str(v)[:500] for k, v in provenance.items()})
                        mlflow.log_metrics(_numeric({k: v for k, v in metrics.items() if k != "provenance"}))
                        tags = {"variant": variant, "parent": name}
                        # n/a: the algorithm cannot make this variant; the reason instead of numbers
                        na = {"na": metrics["na"]} if "na" in metrics else None
                        tags |= na or {"ppl_definition": metrics["ppl_definition"]}
                        mlflow.set_tags(tags)
                mlflow.set_tag(SUMMARY_TAG, digest)  # complete: from now on this result counts as logged
        except Exception:
            if started:
                _delete_partial(experiment_id, started[0])
            raise
        return started[0]


def _delete_killed(experiment_id: str, name: str) -> None:
    """Delete runs of experiment `name` still open, with their nested runs: what a killed `report`
    of it left (its result counts as not logged and is logged again). Other experiments' runs are
    left alone: they may be logging right now, from other clones or hosts (`quantorder grid`), which
    the store lock does not reach."""
    import mlflow

    query = f"attributes.status = 'RUNNING' and tags.kind = 'experiment' and attributes.run_name = '{name}'"
    for run in mlflow.search_runs([experiment_id], filter_string=query, output_format="list"):
        _delete_partial(experiment_id, run.info.run_id)


def _delete_partial(experiment_id: str, parent_id: str) -> None:
    """Best effort: hide a run cut off midway (and its nested runs) from the UI; the store may be down."""
    import mlflow

    with contextlib.suppress(Exception):
        nested = mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
        for run_id in [*nested["run_id"], parent_id]:
            mlflow.delete_run(run_id)


def metric_key(label: str) -> str:
    """A comparison row's label as MLflow accepts in a metric name: `gptq 4-bit g64 qlora.init=loftq`
    -> `gptq_4-bit_g64_qlora.init:loftq` (MLflow allows letters, digits and `_-. :/`)."""
    return re.sub(r"[^\w\-.:/]", "_", label.replace("=", ":"))


def log_comparison(cfg: TrackingCfg, data: Mapping[str, Any], artifacts: list[Path]) -> str:
    """Log the cross-experiment grid as one `compare` run (mean perplexities, the files); its id."""
    import mlflow
    from filelock import FileLock

    root = project_root()
    with FileLock(str(root / ".mlflow.lock"), timeout=LOCK_TIMEOUT_S):
        mlflow.set_tracking_uri(tracking_uri(cfg, root))
        mlflow.set_experiment(cfg.experiment)
        with mlflow.start_run(run_name="compare", tags={"kind": "comparison"}) as run:
            mlflow.log_param("experiments", ", ".join(data["experiments"])[:500])
            for algo, row in data["grid"].items():
                key = metric_key(algo)
                mlflow.log_metrics({f"{key}.{variant}.ppl_mean": cell["mean"] for variant, cell in row.items()})
            for path in artifacts:
                mlflow.log_artifact(str(path))
        return run.info.run_id


def variants_page(cfg: TrackingCfg, experiment_run: str | None = None) -> str:
    """The MLflow UI page (the part after its base URL) that shows one DVC experiment's variants side
    by side: their runs as rows sorted by perplexity, and a chart of each metric with a bar per
    variant. `experiment_run`: the parent run's name (a DVC experiment), default the latest.

    Raises:
        UserError: the store has no quantorder runs yet.
    """
    import mlflow

    from quantorder.errors import UserError

    mlflow.set_tracking_uri(tracking_uri(cfg, project_root()))
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    search = "tags.kind = 'experiment'" + (f" and attributes.run_name = '{experiment_run}'" if experiment_run else "")
    parents = (
        mlflow.search_runs([experiment.experiment_id], search, order_by=["start_time DESC"], output_format="list")
        if experiment
        else []
    )
    if not parents:
        which = f"run {experiment_run!r}" if experiment_run else "runs"
        raise UserError(f"MLflow experiment {cfg.experiment!r} has no quantorder {which} yet; run `dvc repro` first")
    state = {
        "workflowType": "machine_learning",  # MLflow 3 opens experiments on a GenAI overview otherwise
        "compareRunsMode": "CHART",
        "searchFilter": f"tags.kind = 'variant' and tags.parent = '{parents[0].info.run_name}'",
        "orderByKey": "metrics.`ppl`",
        "orderByAsc": "true",
    }
    query = urllib.parse.urlencode(state, quote_via=urllib.parse.quote)
    return f"/#/experiments/{experiment.experiment_id}/runs?{query}"
