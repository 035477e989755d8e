"""Full-grid cost with DVC's caching against running every algorithm x variant combination from scratch.

Queues one experiment per algorithm (`dvc exp run --queue -S algo=A` plus `--set` overrides), runs
the queue and times it. The baseline is what the same combinations cost without sharing: for each
algorithm and variant, the measured durations of every stage that `evaluate@<variant>` depends on
(`dvc dag`), as if each combination ran alone. Stage durations come from the queue's logs; a stage
that only the first experiment ran (the float chain) counts with its duration there.

    python benchmarks/grid_walltime.py --algos rtn gptq awq --out benchmarks/results/grid-h100.json
    python benchmarks/grid_walltime.py --no-run    # only read the finished queue's logs
    python benchmarks/grid_walltime.py --logs out/rtn.log out/gptq.log out/awq.log   # one `dvc repro` per algo
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from common import dvc, publish

from quantorder.models import resolve_device
from quantorder.provenance import device_name
from quantorder.stage import stage_times
from quantorder.variants import VARIANTS


def queue_tasks() -> list[list[str]]:
    """[task, name, ..., status] rows of `dvc queue status`."""
    rows = [line.split() for line in dvc("queue", "status").splitlines()[1:]]
    return [r for r in rows if r and r[-1] in ("Queued", "Running", "Success", "Failed")]


def run_grid(algos: list[str], overrides: list[str]) -> float:
    """Queue and run one experiment per algorithm; the wall time from queue start to the last finish."""
    sets = [arg for o in overrides for arg in ("-S", o)]
    dvc("exp", "run", "--queue", "-S", f"algo={','.join(algos)}", *sets)
    start = time.perf_counter()
    dvc("queue", "start")
    while any(t[-1] in ("Queued", "Running") for t in queue_tasks()):
        time.sleep(5)
    return time.perf_counter() - start


def queue_logs() -> list[str]:
    """The logs of the queue's successful experiments."""
    return [dvc("queue", "logs", task[1]) for task in queue_tasks() if task[-1] == "Success"]


def stage_seconds(logs: list[str]) -> dict[str, dict[str, float]]:
    """algo -> stage -> seconds, from experiment logs."""
    out: dict[str, dict[str, float]] = {}
    for log in logs:
        out.setdefault(_algo_of(log), {}).update(stage_times(log))
    return out


def _algo_of(log: str) -> str:
    """The algorithm an experiment's log quantized with (the config its quantize stages print)."""
    found = re.search(r"^algo:\n  name: (\w+)", log, re.M)
    return found.group(1) if found else "unknown"


def upstream(variant: str) -> set[str]:
    """The stages `evaluate@<variant>` needs, itself included."""
    return set(re.findall(r'^"([^"]+)";$', dvc("dag", "--dot", f"evaluate@{variant}"), re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="an extra -S override")
    parser.add_argument("--no-run", action="store_true", help="read the finished queue instead of running one")
    parser.add_argument("--logs", nargs="+", type=Path, help="read these `dvc repro` logs instead of a queue")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    wall = None if args.no_run or args.logs else run_grid(args.algos, args.overrides)
    seconds = stage_seconds([p.read_text() for p in args.logs] if args.logs else queue_logs())
    shared = {stage: s for per_algo in seconds.values() for stage, s in per_algo.items()}
    needs = {v: upstream(v) for v in VARIANTS}
    unmeasured = set().union(*needs.values()) - set(shared)
    if unmeasured:
        raise SystemExit(f"error: no queued experiment ran {', '.join(sorted(unmeasured))}; run the grid from scratch")
    scratch = {
        algo: {v: round(sum(per_algo.get(s, shared[s]) for s in needs[v]), 1) for v in VARIANTS}
        for algo, per_algo in seconds.items()
    }
    baseline = sum(sum(per_variant.values()) for per_variant in scratch.values())
    executed = sum(sum(per_algo.values()) for per_algo in seconds.values())
    result = {
        "device": device_name(resolve_device("auto")),
        "algos": sorted(seconds),
        "grid_wall_s": round(wall, 1) if wall is not None else None,
        "grid_stage_s": round(executed, 1),
        "from_scratch_s": round(baseline, 1),
        "ratio_wall": round(wall / baseline, 3) if wall is not None else None,
        "ratio_stages": round(executed / baseline, 3),
        "from_scratch_per_combination_s": scratch,
        "stage_seconds": seconds,
    }
    headline = ("device", "algos", "grid_wall_s", "from_scratch_s", "ratio_wall", "ratio_stages")
    publish(result, headline, args.out)


if __name__ == "__main__":
    main()
