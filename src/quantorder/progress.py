"""Progress of long loops, readable both on a terminal and in DVC's and CI's logs."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], total: int, desc: str, unit: str = "it", every_pct: int = 10, min_interval_s: float = 5.0
) -> Iterator[T]:
    """Yield `items`, reporting progress: a tqdm bar on a terminal; elsewhere (a log file, DVC's
    output), since a bar's carriage returns garble logs, one line at a `every_pct` percent mark
    when at least `min_interval_s` passed since the last line (short loops stay silent)."""
    if sys.stdout.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False)
        return
    start = last = time.perf_counter()
    mark = every_pct
    for done, item in enumerate(items, 1):
        yield item
        pct = 100 * done // max(total, 1)
        if pct >= mark:
            mark = (pct // every_pct + 1) * every_pct
            if (now := time.perf_counter()) - last >= min_interval_s:
                print(f"{desc}: {done}/{total} {unit} ({pct}%), {now - start:.1f}s", flush=True)
                last = now
