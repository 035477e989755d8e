"""Captured backend output: to a file, with terminal redraws off, and everything put back."""

import os
import subprocess
import sys

import pytest

from quantorder.io import captured_output


def test_backend_output_goes_to_the_log_with_a_dumb_terminal_then_all_is_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    with captured_output(tmp_path / "backend.log") as console:
        assert os.environ["TERM"] == "dumb"  # progress-bar libraries print lines, not redraws
        subprocess.run([sys.executable, "-c", "import os; print('native', os.environ['TERM'])"], check=True)
        print("shown", file=console, flush=True)
    assert os.environ["TERM"] == "xterm-256color"
    assert (tmp_path / "backend.log").read_text() == "native dumb\n"


def test_a_failing_backend_leaves_no_term_behind_where_there_was_none(tmp_path, monkeypatch):
    monkeypatch.delenv("TERM", raising=False)
    with pytest.raises(RuntimeError), captured_output(tmp_path / "backend.log"):
        raise RuntimeError("backend crashed")
    assert "TERM" not in os.environ
