"""The `quantorder` command: compose, validate, compare, ui, grid. (Stages run through quantorder.stage.)"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import yaml

from quantorder.errors import UserError


def composed(overrides: list[str], conf_dir: Path = Path("conf")) -> dict:
    """conf/ composed with Hydra overrides (what `dvc exp run -S` does), interpolations resolved, validated.

    Raises:
        UserError: an unknown group choice or key, or a value the schemas reject.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from quantorder.config import parse_config

    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(" ".join(str(e).split())) from e
    params = OmegaConf.to_container(cfg, resolve=True)
    parse_config(params)
    return params


def compose(overrides: list[str], conf_dir: Path = Path("conf"), out: Path = Path("params.yaml")) -> None:
    """Compose conf/ with Hydra overrides into params.yaml, validated (see `composed`)."""
    from quantorder.io import write_text

    write_text(out, yaml.safe_dump(composed(overrides, conf_dir), sort_keys=False))


def compare(out: Path, mlflow: bool, exp_show: Path | None = None) -> None:
    """`quantorder compare`: the grid of every finished DVC experiment (of this project, or in a saved
    `dvc exp show --json`), logged to MLflow if enabled."""
    from quantorder import compare as grid
    from quantorder.config import load_config

    experiments = grid.saved_experiments(exp_show) if exp_show else grid.dvc_experiments(Path("."))
    data, files = grid.write(experiments, out)
    print(data["verdict"])
    print(f"wrote {', '.join(str(f) for f in files)}")
    if not mlflow or not (tracking := load_config().tracking).enabled:
        return
    from quantorder.tracking import log_comparison

    print(f"MLflow run {log_comparison(tracking, data, files)} (experiment {tracking.experiment})")


def ui(host: str, port: int, experiment_run: str | None) -> None:
    """`quantorder ui`: start the MLflow UI on the project's store, at the page with the variants side by side."""
    import subprocess

    from quantorder.config import load_config
    from quantorder.tracking import project_root, tracking_uri, variants_page

    tracking = load_config().tracking
    uri = tracking_uri(tracking, project_root())
    page = variants_page(tracking, experiment_run)
    if not uri.startswith("sqlite:"):  # a tracking server: its own UI
        print(f"open {uri.rstrip('/')}{page}")
        return
    print(f"open http://{host}:{port}{page}  (Ctrl-C stops the UI)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    cmd += ["--workers", "1"]  # one person's browser: mlflow's default of 4 processes only costs start-up
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(cmd, check=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="quantorder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compose", help="compose conf/ (+ Hydra overrides) into params.yaml and validate it")
    p.add_argument("overrides", nargs="*", help="e.g. algo=rtn algo.bits=8 +experiment=olive-phi35")
    sub.add_parser("validate", help="validate params.yaml")
    p = sub.add_parser("compare", help="all DVC experiments as one grid: table, chart, verdict (+ an MLflow run)")
    p.add_argument("--out", type=Path, default=Path("reports/compare"), help="folder for grid.{md,png,json}")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the comparison run")
    p.add_argument(
        "--exp-show", type=Path, metavar="FILE", help="read `dvc exp show --json` saved here (e.g. on a GPU host)"
    )
    p = sub.add_parser("ui", help="start the MLflow UI at the page with one experiment's variants side by side")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--run", dest="experiment_run", help="DVC experiment (MLflow parent run) to show; default: latest")
    p = sub.add_parser("grid", help="run a grid of experiments as tasks on a Ray cluster (docs/cluster.md)")
    p.add_argument("--ray", default="auto", metavar="ADDRESS", help="the cluster: auto, host:port, or local")
    p.add_argument(
        "-S",
        "--set-param",
        dest="sweeps",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="Hydra override or sweep, as dvc exp run -S (e.g. 'algo=rtn,gptq,awq'; repeatable)",
    )
    p.add_argument("--git-remote", default="origin", help="git remote (name or URL) that gets the experiments")
    p.add_argument("--dvc-remote", help="DVC remote (name or URL) for outputs and run-cache; default: the default one")
    p.add_argument("--mlflow", metavar="URL", help="MLflow tracking server for every run (sets tracking.uri)")
    p.add_argument("--name", help="experiment name prefix (default grid-<commit>)")
    p.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "quantorder-grid"),
        help="where each host clones the project for a task",
    )
    p.add_argument(
        "--checkpoints",
        help="shared folder for fine-tuning checkpoints, so a retry on any host resumes "
        "(default: <workdir>/checkpoints on each host)",
    )
    p.add_argument("--retries", type=int, default=2, help="retries of a task whose worker died")
    p.add_argument("--cpus", type=float, default=1, help="CPUs each task reserves")
    p.add_argument("--summary", type=Path, help="write each task's node, stages run and error here (JSON)")
    args = parser.parse_args(argv)
    try:
        if args.command == "compose":
            compose(args.overrides)
            print("wrote params.yaml")
        elif args.command == "compare":
            compare(args.out, mlflow=not args.no_mlflow, exp_show=args.exp_show)
        elif args.command == "grid":
            from quantorder.grid import run_grid

            sys.exit(
                run_grid(
                    args.ray,
                    args.sweeps,
                    args.git_remote,
                    args.dvc_remote,
                    args.mlflow,
                    args.name,
                    args.workdir,
                    args.checkpoints,
                    args.retries,
                    args.cpus,
                    args.summary,
                )  # fmt: skip
            )
        elif args.command == "ui":
            ui(args.host, args.port, args.experiment_run)
        else:
            from quantorder.config import load_config

            load_config()
            print("params.yaml is valid")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
