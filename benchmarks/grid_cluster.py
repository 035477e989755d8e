"""What `quantorder grid` on Ray costs on one host, against DVC's own queue running the same grid.

Both start from a fresh clone of the current commit with nothing computed: the baseline queues one
experiment per algorithm and runs `dvc queue start -j JOBS`; `quantorder grid` runs
the same experiments as Ray tasks on a one-node Ray cluster started for it (JOBS CPUs, one per task), each task in
its own clone, sharing a DVC remote directory and a bare git remote. Prints both wall times and
their ratio.

    python benchmarks/grid_cluster.py --set +experiment=tiny --algos rtn gptq awq --jobs 2 \\
        --out benchmarks/results/grid-cluster-cpu-2core.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import dvc, publish

from quantorder.models import resolve_device
from quantorder.provenance import device_name


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def run_queue(clone: Path, sweeps: list[str], jobs: int) -> float:
    """Queue the grid, run it `jobs` at a time; the wall time to the last experiment's end."""
    dvc("exp", "run", "--queue", *sweeps, cwd=clone)
    start = time.perf_counter()
    dvc("queue", "start", "-j", str(jobs), cwd=clone)
    while any(word in dvc("queue", "status", cwd=clone) for word in ("Queued", "Running")):
        time.sleep(2)
    elapsed = time.perf_counter() - start
    if "Failed" in (status := dvc("queue", "status", cwd=clone)):
        raise SystemExit(f"the queue failed:\n{status}")
    return elapsed


def run_ray_grid(clone: Path, sweeps: list[str], jobs: int, scratch: Path) -> float:
    """The same grid through `quantorder grid` on a one-node Ray cluster of `jobs` CPUs; its wall
    time, starting Ray included."""
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [sys.executable, "-m", "quantorder", "grid", "--ray", "auto", "--dvc-remote", str(scratch / "dvc-remote")]
    cmd += ["--workdir", str(scratch / "work"), "--summary", str(scratch / "grid.json"), *sweeps]
    start = time.perf_counter()
    subprocess.run([ray, "start", "--head", f"--num-cpus={jobs}", "--disable-usage-stats"], check=True)
    try:
        subprocess.run(cmd, cwd=clone, check=True)
    finally:
        subprocess.run([ray, "stop"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument("--set", action="append", default=[], help="an override for every experiment (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="experiments at once (queue workers, Ray CPUs)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sweeps = [arg for o in [f"algo={','.join(args.algos)}", *args.set, "tracking.enabled=false"] for arg in ("-S", o)]
    with tempfile.TemporaryDirectory(prefix="grid-cluster-") as tmp:
        scratch = Path(tmp)
        git("init", "-q", "--bare", "-b", "main", str(scratch / "remote.git"), cwd=scratch)
        git("push", "-q", str(scratch / "remote.git"), "HEAD:refs/heads/main", cwd=Path.cwd())
        for name in ("queue", "grid"):
            git("clone", "-q", str(scratch / "remote.git"), str(scratch / name), cwd=scratch)
        queue_s = run_queue(scratch / "queue", sweeps, args.jobs)
        grid_s = run_ray_grid(scratch / "grid", sweeps, args.jobs, scratch)
    result = {
        "device": device_name(resolve_device("cpu")),
        "experiments": len(args.algos),
        "overrides": args.set,
        "jobs": args.jobs,
        "queue_s": round(queue_s, 1),
        "ray_grid_s": round(grid_s, 1),
        "ratio": round(grid_s / queue_s, 3),
    }
    publish(result, ("device", "queue_s", "ray_grid_s", "ratio"), args.out)


if __name__ == "__main__":
    main()
