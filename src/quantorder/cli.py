"""Command-line entry points: the stage runner and `quantorder compose`."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from quantorder.errors import UserError

# a stage's name as DVC announces it, then the time on the closing line run_stage prints for it
_STAGE_TIME = re.compile(r"Running stage '([^']+)':.*?\| ([0-9.]+)s, peak memory", re.S)


def stage_times(log: str) -> dict[str, float]:
    """Seconds per stage that a `dvc repro` / `dvc exp run` log shows running."""
    return {name: float(seconds) for name, seconds in _STAGE_TIME.findall(log)}


def run_stage(main: Callable[[], str | None]) -> None:
    """Run a stage's main() and print its closing line (what main() returns: what it wrote, key
    numbers; None where another process reports) with the stage's time and peak memory. User
    errors become one `error:` line and exit code 2, no traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    try:
        closing = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # stages write into a temporary path, removed on the way out: nothing half-written stays
        where = e.filename or "an output"
        print(f"error: no space left on the device writing {where}; free space and rerun", file=sys.stderr)
        sys.exit(2)
    if closing is None:  # another process (a data-parallel worker) reports for this stage
        return
    seconds = time.perf_counter() - start
    from quantorder.memory import process_peak_memory  # torch: loaded by every stage already

    peak = process_peak_memory()
    gpu = f"GPU {peak['gpu_bytes'] / 2**30:.2f} GiB, " if peak["gpu_bytes"] is not None else ""
    print(f"{closing} | {seconds:.1f}s, peak memory {gpu}RSS {peak['rss_bytes'] / 2**30:.2f} GiB", flush=True)


def stage_target(kind: str, allowed: Iterable[str]) -> str:
    """The X of a `stage@X` instance, from the command line, checked against `allowed`."""
    allowed = list(allowed)
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in allowed:
        raise UserError(f"{kind} {name!r} unknown (allowed: {', '.join(allowed)})")
    return name


def print_config(name: str, section: object) -> None:
    """Print one resolved config section, as the stage will use it."""
    body = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
    print(yaml.safe_dump({name: body}, sort_keys=False).rstrip(), flush=True)


def compose(overrides: list[str], conf_dir: Path = Path("conf"), out: Path = Path("params.yaml")) -> None:
    """Compose conf/ with Hydra overrides into params.yaml (what `dvc exp run -S` does), validated.

    Raises:
        UserError: an unknown group choice or key, or a value the schemas reject.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from quantorder.config import parse_config
    from quantorder.io import write_text

    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(" ".join(str(e).split())) from e
    params = OmegaConf.to_container(cfg, resolve=True)
    parse_config(params)
    write_text(out, yaml.safe_dump(params, sort_keys=False))


def compare(out: Path, mlflow: bool) -> None:
    """`quantorder compare`: the grid of every finished DVC experiment, logged to MLflow if enabled."""
    from quantorder import compare as grid
    from quantorder.config import load_config

    data, files = grid.write(grid.dvc_experiments(Path(".")), out)
    print(data["verdict"])
    print(f"wrote {', '.join(str(f) for f in files)}")
    tracking = load_config().tracking
    if mlflow and tracking.enabled:
        from quantorder.tracking import log_comparison

        print(f"MLflow run {log_comparison(tracking, data, files)} (experiment {tracking.experiment})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="quantorder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compose", help="compose conf/ (+ Hydra overrides) into params.yaml and validate it")
    p.add_argument("overrides", nargs="*", help="e.g. algo=rtn algo.bits=8 +experiment=olive-phi35")
    sub.add_parser("validate", help="validate params.yaml")
    p = sub.add_parser("compare", help="all DVC experiments as one grid: table, chart, verdict (+ an MLflow run)")
    p.add_argument("--out", type=Path, default=Path("reports/compare"), help="folder for grid.{md,png,json}")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the comparison run")
    args = parser.parse_args(argv)
    try:
        if args.command == "compose":
            compose(args.overrides)
            print("wrote params.yaml")
        elif args.command == "compare":
            compare(args.out, mlflow=not args.no_mlflow)
        else:
            from quantorder.config import load_config

            load_config()
            print("params.yaml is valid")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
