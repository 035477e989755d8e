"""DVC's time on a stage's large output: one file against shards of at most 1 GB, with DVC's default
hashing threads against the project's `core.checksum_jobs`.

In a scratch DVC repo with the project's `.dvc/config` (the cache link type; `checksum_jobs` dropped
for the default), one stage writes `--gb` GiB of random bytes into a directory, as one file or in
shards. The time DVC adds is `dvc repro`'s wall time less the stage command's own (printed by it):
hashing the output (md5) and linking it into the cache. Printed as ratios against the default (one
file, DVC's default threads: max(1, min(4, cores // 2))).

    python benchmarks/dvc_hashing.py --gb 8 --out benchmarks/results/dvc-hashing-cpu-2core.json
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import ROOT, dvc, publish

from quantorder.provenance import library_versions

WRITER = """import os, sys, time
start, (files, size) = time.perf_counter(), (int(sys.argv[1]), int(sys.argv[2]))
os.makedirs("out")
block = os.urandom(2**24)
for i in range(files):
    with open(f"out/part-{i}.bin", "wb") as f:
        for _ in range(size // files // len(block)):
            f.write(block)
print(f"command {time.perf_counter() - start:.3f}s")
"""


def dvc_seconds(repo: Path, files: int, size: int) -> float:
    """Seconds `dvc repro` adds to the stage command writing `size` bytes in `files` files."""
    (repo / "dvc.yaml").write_text(f"stages:\n  write:\n    cmd: python write.py {files} {size}\n    outs: [out]\n")
    shutil.rmtree(repo / "out", ignore_errors=True)
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    start = time.perf_counter()
    log = dvc("repro", "-f", cwd=repo)
    wall = time.perf_counter() - start
    return wall - float(re.search(r"command ([0-9.]+)s", log).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=8, help="size of the output, in GiB")
    parser.add_argument("--shard-mb", type=int, default=1024, help="shard size, in MiB (layout.SHARD_SIZE: 1 GB)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case; the fastest counts")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    size = int(args.gb * 2**30)
    shards = max(2, size // (args.shard_mb * 2**20))
    jobs = dvc("config", "core.checksum_jobs", cwd=ROOT).strip()
    results = {}
    with tempfile.TemporaryDirectory(dir=ROOT) as scratch:  # on the project's file system
        repo = Path(scratch)
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        dvc("init", "-q", cwd=repo)
        shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
        (repo / "write.py").write_text(WRITER)
        for threads in ("default", jobs):
            if threads == "default":
                dvc("config", "--unset", "core.checksum_jobs", cwd=repo)
            else:
                dvc("config", "core.checksum_jobs", jobs, cwd=repo)
            for files in (1, shards):
                name = f"{'one file' if files == 1 else f'{files} shards'}, checksum_jobs {threads}"
                results[name] = round(min(dvc_seconds(repo, files, size) for _ in range(args.repeats)), 2)
                print(f"{name}: DVC adds {results[name]} s", flush=True)
    default = results["one file, checksum_jobs default"]
    result = {
        "cores": os.cpu_count(),
        "output_gb": args.gb,
        "dvc_seconds": results,
        "speedup_vs_one_file_default": {k: round(default / v, 2) for k, v in results.items()},
        "versions": library_versions(),
    }
    publish(result, ("cores", "output_gb", "speedup_vs_one_file_default"), args.out)


if __name__ == "__main__":
    main()
