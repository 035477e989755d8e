"""A variant the method cannot make is n/a: its artifacts become markers with the reason, and
evaluate writes the reason instead of numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from quantorder.availability import mark_na, na_reason
from quantorder.layout import ADAPTERS_DIR, BASE_DIR, MERGED_DIR, QUANTIZED_DIR
from quantorder.variants import BASE_Q, VARIANTS, users

from .conftest import ROOT


def test_each_artifact_knows_the_variants_that_need_it():
    assert users(QUANTIZED_DIR / "q_ft_merge_q") == ["q_ft_merge_q"]
    # directly, and through merge@q_ft and merge@q_ft_fmerge
    assert users(ADAPTERS_DIR / "q_ft") == ["q_ft", "q_ft_merge_q", "q_ft_fmerge", "q_ft_fmerge_q"]
    assert users(MERGED_DIR / "ft") == ["ft_merge_q"]
    assert users(MERGED_DIR / "q_ft_fmerge") == ["q_ft_fmerge", "q_ft_fmerge_q"]
    assert users(BASE_DIR) == list(VARIANTS)
    assert set(users(BASE_Q)) == set(VARIANTS) - {"base", "ft"}  # ft_merge_q: its update is measured against it


def test_an_artifact_only_unsupported_variants_need_becomes_a_marker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unsupported = dict.fromkeys(users(ADAPTERS_DIR / "q_ft"), "cannot train on this format")
    assert mark_na(BASE_Q, [BASE_DIR], unsupported) is None  # other variants need base_q
    (tmp_path / BASE_Q).mkdir(parents=True)
    (tmp_path / BASE_Q / "quantorder.json").write_text(json.dumps({"unsupported_variants": unsupported}))
    assert mark_na(ADAPTERS_DIR / "q_ft", [BASE_Q]) == "cannot train on this format"
    marker = tmp_path / ADAPTERS_DIR / "q_ft"
    assert json.loads((marker / "quantorder.json").read_text())["na"] == "cannot train on this format"
    assert sorted(p.name for p in marker.iterdir()) == ["quantorder.json"]
    # downstream of a marker: n/a too, with the same reason
    assert na_reason([BASE_Q, ADAPTERS_DIR / "q_ft"], ["q_ft_merge_q"]) == "cannot train on this format"
    assert na_reason([BASE_Q, ADAPTERS_DIR / "ft"], ["ft_q"]) is None


def test_evaluate_of_an_na_variant_writes_the_reason_and_no_number(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path)
    marker = tmp_path / QUANTIZED_DIR / "q_ft_merge_q"
    marker.mkdir(parents=True)
    (marker / "quantorder.json").write_text(json.dumps({"na": "cannot fold an adapter into this format"}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages/evaluate.py"), "q_ft_merge_q"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "[evaluate@q_ft_merge_q] n/a: cannot fold an adapter into this format" in done.stdout
    metrics = json.loads((tmp_path / "metrics/eval/q_ft_merge_q.json").read_text())
    assert metrics == {"variant": "q_ft_merge_q", "na": "cannot fold an adapter into this format"}
    assert (tmp_path / "metrics/eval/q_ft_merge_q.samples.csv").read_text() == "tokens,nll\n"
