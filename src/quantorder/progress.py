"""Progress of long loops, readable both on a terminal and in DVC's and CI's logs."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")
MIN_INTERVAL_S = 5.0  # in logs, no progress line sooner than this after the last


class Progress:
    """How far a job of `total` steps is: a tqdm bar on a terminal; elsewhere (a log file, DVC's
    output), since a bar's carriage returns garble logs, one line at an `every_pct` percent mark
    when at least `min_interval_s` (MIN_INTERVAL_S) passed since the last line (short jobs stay
    silent)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        every_pct: int = 10,
        min_interval_s: float | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every_pct = every_pct
        self.min_interval_s = MIN_INTERVAL_S if min_interval_s is None else min_interval_s
        self.out = out or sys.stdout
        self.start = self.last = time.perf_counter()
        self.mark = every_pct
        self.bar = None
        if self.out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.out)

    def update(self, done: int) -> None:
        """`done` steps of `total` are finished."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        pct = 100 * done // max(self.total, 1)
        if pct < self.mark:
            return
        self.mark = (pct // self.every_pct + 1) * self.every_pct
        if (now := time.perf_counter()) - self.last >= self.min_interval_s:
            line = f"{self.desc}: {done}/{self.total} {self.unit} ({pct}%), {now - self.start:.1f}s"
            print(line, file=self.out, flush=True)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(items: Iterable[T], total: int, desc: str, unit: str = "it", **kwargs) -> Iterator[T]:
    """Yield `items`, reporting progress (see Progress)."""
    bar = Progress(total, desc, unit, **kwargs)
    for done, item in enumerate(items, 1):
        yield item
        bar.update(done)
    bar.close()
