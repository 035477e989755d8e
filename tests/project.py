"""A copy of the project in a temp dir, as a user's clone, and commands run in it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .conftest import ROOT

# DVC commits experiments: give git an identity where the machine has none configured.
GIT_IDENTITY = {
    f"GIT_{who}_{what}": value
    for who in ("AUTHOR", "COMMITTER")
    for what, value in (("NAME", "quantorder-test"), ("EMAIL", "test@localhost"))
}


def env() -> dict[str, str]:
    return {**GIT_IDENTITY, **os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def executed(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def make_project(repo: Path) -> Path:
    """Copy the project into `repo` (an empty dir) and commit it."""
    for item in ("conf", "stages", "src", "dvc.yaml", "params.yaml", ".gitignore", "pyproject.toml"):
        src = ROOT / item
        (
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            if src.is_dir()
            else shutil.copy(src, repo / item)
        )
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project"], repo)
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 90) -> None:
    """Wait until the MLflow server started as `server` answers at `url`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "the MLflow server did not start"
            time.sleep(0.5)
