"""The GPU wheelhouse splits into folders that each fit one device call's carry."""

from __future__ import annotations

import importlib.util

import pytest

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_wheelhouse", ROOT / "scripts/gpu_wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def test_parts_hold_every_file_once_and_none_is_over_the_limit(tmp_path):
    dest = tmp_path / "wheels"
    dest.mkdir()
    sizes = {"a.whl": 50, "b.whl": 40, "c.whl": 30, "d.whl": 20, "e.tar.gz": 10}
    for name, size in sizes.items():
        (dest / name).write_bytes(b"x" * size)
    parts = wheelhouse.split_into_parts(dest, 60)
    assert parts[0] == dest and [p.name for p in parts[1:]] == [f"wheels-{i}" for i in range(2, len(parts) + 1)]
    held = {f.name: f.stat().st_size for p in parts for f in p.iterdir()}
    assert held == sizes  # nothing lost, nothing twice
    assert all(sum(f.stat().st_size for f in p.iterdir()) <= 60 for p in parts)
    assert len(parts) == 3  # 150 bytes in folders of at most 60


def test_a_file_over_the_limit_is_refused(tmp_path):
    (tmp_path / "big.whl").write_bytes(b"x" * 100)
    with pytest.raises(SystemExit, match="big.whl alone is over"):
        wheelhouse.split_into_parts(tmp_path, 60)
