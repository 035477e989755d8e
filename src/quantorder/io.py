"""Atomic file and directory writes: an output is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO
from unittest import mock

from quantorder.errors import UserError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block completes.

    On an exception the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    tmp.rename(path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path that replaces `path` only if the block completes (else it is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def json_sha256(data: Any) -> str:
    """SHA-256 of `data` as key-sorted JSON (values JSON cannot hold as their str)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    with Path(path).open() as f:
        return json.load(f)


@contextlib.contextmanager
def captured_output(log_path: str | Path) -> Iterator[TextIO]:
    """Send everything written to stdout/stderr (Python and native code) to `log_path`; yield a
    stream to the real stdout, for the caller's own progress lines.

    For chatty backends: the stage log keeps one summary line, the backend's own log stays on
    disk. On a crash the log's last lines are replayed to stderr; a UserError propagates alone.
    Meanwhile TERM is `dumb`: the output is a file, so libraries that redraw progress bars on a
    terminal (GPTQModel's logbar) print plain lines instead: GPTQ of the embedded default took
    168-189 s with redraws and 148-158 s without, on 2 cores, with the same weights to the bit.
    """
    log_path = Path(log_path)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with (
        log_path.open("w") as log,
        open(saved[0], "w", closefd=False) as console,
        mock.patch.dict(os.environ, TERM="dumb"),
    ):
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield console
        except UserError:
            _restore(saved)
            raise
        except BaseException:
            _restore(saved)
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            print("\n".join(tail), file=sys.stderr)
            raise
        _restore(saved)


def _restore(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
