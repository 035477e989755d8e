"""DVC's own share of a pipeline's wall time, and the disk the pipeline peaks at.

Runs `dvc exp run` with the given `-S` overrides (and stage targets, if any) in the current
project and splits its wall time into the stage processes and the rest, which is DVC's work:
hashing outputs, linking them into the cache, writing dvc.lock and the run-cache, git. The stage
processes are timed by a `python` shim put first on PATH (DVC starts every stage as `python
stages/...`), so their time includes starting Python, imports and loading models. A thread samples
the file system's used bytes every second: the peak over the start is the pipeline's peak disk use
(models, cache, temporary files; hard links counted once). At the end, `du` tells how much of
`.dvc/cache` is not a link to a file in `models/` or `data/`: in a fresh clone, a second copy of an
output; in one with history, also the outputs of other experiments, which the cache keeps.

    python benchmarks/dvc_overhead.py -S +experiment=olive-phi35 -S model.source=random \\
        -S data=sympy-qa -S calib=sympy-docs -S algo=rtn -S finetune.max_steps=10 \\
        -S tracking.enabled=false --out benchmarks/results/dvc-overhead-phi-3.5-h100.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import publish

from quantorder.models import resolve_device
from quantorder.provenance import device_name, library_versions

SHIM = """#!/bin/sh
start=$(date +%s.%N)
"{python}" "$@"
rc=$?
echo "$start $(date +%s.%N) $*" >> "{log}"
exit $rc
"""


class DiskPeak(threading.Thread):
    """Samples the used bytes of the file system holding `path` until stopped; keeps the peak."""

    def __init__(self, path: Path, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.path, self.every_s, self.done = path, every_s, threading.Event()
        self.start_bytes = self.peak_bytes = shutil.disk_usage(path).used

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.peak_bytes = max(self.peak_bytes, shutil.disk_usage(self.path).used)

    def stop(self) -> int:
        """Stop sampling; the peak growth over the start, in bytes."""
        self.done.set()
        self.join()
        self.peak_bytes = max(self.peak_bytes, shutil.disk_usage(self.path).used)
        return self.peak_bytes - self.start_bytes


def stage_lifetimes(log: Path) -> dict[str, float]:
    """Seconds per stage process (`stage@target`), from the shim's log; other python calls left out."""
    times = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        start, end, script, *target = line.split()
        if script.startswith("stages/"):
            name = Path(script).stem + (f"@{target[0]}" if target else "")
            times[name] = times.get(name, 0.0) + float(end) - float(start)
    return times


def du_bytes(*paths: str) -> list[int]:
    """Disk bytes of each path as one `du` sees them: a hard link already counted counts 0 again."""
    out = subprocess.run(["du", "-s", "-B1", *paths], check=True, capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="a `dvc exp run -S` override")
    parser.add_argument("targets", nargs="*", help="stages to run (default: the whole pipeline)")
    parser.add_argument("--force", action="store_true", help="rerun stages whose inputs did not change")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "dvc-overhead.log",
                        help="where dvc's output goes")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as shim_dir:
        shim_log = Path(shim_dir) / "stages.log"
        shim = Path(shim_dir) / "python"
        shim.write_text(SHIM.format(python=sys.executable, log=shim_log))
        shim.chmod(0o755)
        env = {**os.environ, "PATH": f"{shim_dir}:{os.environ['PATH']}"}
        cmd = ["dvc", "exp", "run", *(["--force"] if args.force else [])]
        cmd += [*(a for o in args.overrides for a in ("-S", o)), *args.targets]
        disk = DiskPeak(Path.cwd())
        disk.start()
        start = time.perf_counter()
        with args.log.open("w") as log:
            code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
        peak_disk = disk.stop()
        if code:
            raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}; its output: {args.log}")
        stages = stage_lifetimes(shim_log)
    models, data, cache_extra = du_bytes("models", "data", ".dvc/cache")
    stage_s = sum(stages.values())
    result = {
        "device": device_name(resolve_device("auto")),
        "overrides": args.overrides,
        "targets": args.targets,
        "wall_s": round(wall, 1),
        "stage_s": round(stage_s, 1),
        "dvc_s": round(wall - stage_s, 1),
        "dvc_share": round((wall - stage_s) / wall, 4),
        "peak_disk_bytes": peak_disk,
        "models_bytes": models,
        "data_bytes": data,
        "cache_beyond_workspace_bytes": cache_extra,
        "stages_s": {name: round(s, 1) for name, s in sorted(stages.items())},
        "versions": library_versions(),
    }
    headline = ("device", "wall_s", "dvc_share", "peak_disk_bytes", "models_bytes", "cache_beyond_workspace_bytes")
    publish(result, headline, args.out)


if __name__ == "__main__":
    main()
