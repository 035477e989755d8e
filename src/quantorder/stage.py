"""What every stage script shares: its target from the command line, its printed config, and the
runner that turns user errors into one line and prints the closing line with time and memory."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import NoReturn

import yaml

from quantorder.errors import UserError

# a stage's name as DVC announces it, then the time on the closing line run_stage prints for it
_STAGE_TIME = re.compile(r"Running stage '([^']+)':.*?\| ([0-9.]+)s, peak memory", re.S)


def stage_times(log: str) -> dict[str, float]:
    """Seconds per stage that a `dvc repro` / `dvc exp run` log shows running."""
    return {name: float(seconds) for name, seconds in _STAGE_TIME.findall(log)}


def run_stage(main: Callable[[], str | None]) -> NoReturn:
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
    if closing is not None:  # None: another process (a data-parallel worker) reports for this stage
        seconds = time.perf_counter() - start
        from quantorder.memory import process_peak_memory  # torch: loaded by every stage already

        peak = process_peak_memory()
        gpu = f"GPU {peak['gpu_bytes'] / 2**30:.2f} GiB, " if peak["gpu_bytes"] is not None else ""
        print(f"{closing} | {seconds:.1f}s, peak memory {gpu}RSS {peak['rss_bytes'] / 2**30:.2f} GiB")
    _exit_now()


def _exit_now() -> NoReturn:
    """End a stage that succeeded without the interpreter's teardown: its outputs are written and
    closed by now, and freeing the thousands of modules torch and transformers load costs 1-1.5 s
    of CPU, which every stage process of a pipeline or a grid would pay."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
