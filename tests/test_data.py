"""The stdlib Q&A builder is deterministic, its splits disjoint, its errors clear."""

from __future__ import annotations

import json

import pytest

from quantorder.config import CalibCfg, DataCfg
from quantorder.data import SPLITS, build_splits, read_jsonl, render, stdlib_qa_rows, write_splits
from quantorder.errors import UserError

from .conftest import TEMPLATE


def _cfg(**kw) -> DataCfg:
    return DataCfg(
        **{"name": "t", "source": "stdlib", "template": TEMPLATE, "n_train": 50, "n_val": 10, "n_test": 20, **kw}
    )


def test_stdlib_rows_are_real_code_qa():
    rows = stdlib_qa_rows(max_answer_chars=1200)
    assert len(rows) > 1000
    for row in rows[:50]:
        assert row["programming_language"] == "Python"
        assert row["prompt"].startswith("Write the function `")
        assert row["response"].lstrip().startswith(("def ", "async def ", "@"))
    sample = next(r for r in rows if "Return True if the future is currently executing" in r["prompt"])
    assert "Return True" not in sample["response"] and "return self._state == RUNNING" in sample["response"]
    assert len({(r["prompt"], r["response"]) for r in rows}) == len(rows)


def test_build_is_deterministic_and_splits_disjoint(tmp_path):
    cfg = _cfg()
    manifests = []
    for run in ("a", "b"):
        splits, source = build_splits(cfg)
        (tmp_path / run).mkdir()
        manifests.append(write_splits(tmp_path / run, splits, source, cfg))
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    assert manifests[0]["rows"] == {"train": 50, "val": 10, "test": 20}
    assert manifests[0]["source"]["python"]
    prompts = {name: {r["prompt"] for r in read_jsonl(tmp_path / "a" / f"{name}.jsonl")} for name in SPLITS}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]


def test_split_seed_changes_the_split_but_not_the_pool():
    a, _ = build_splits(_cfg(split_seed=0))
    b, _ = build_splits(_cfg(split_seed=1))
    assert a["test"] != b["test"]


def test_rendering_uses_the_olive_template():
    row = {"programming_language": "Python", "prompt": "Add.", "response": "def add(a, b): return a + b"}
    assert render(TEMPLATE, row) == "### Language: Python\n### Question: Add.\n### Answer: def add(a, b): return a + b"


def test_jsonl_source_and_its_errors(tmp_path):
    good = tmp_path / "rows.jsonl"
    good.write_text(
        "".join(
            json.dumps({"programming_language": "C", "prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(12)
        )
    )
    splits, source = build_splits(_cfg(source="jsonl", path=str(good), n_train=8, n_val=2, n_test=2))
    assert source["kind"] == "jsonl" and len(splits["train"]) == 8
    with pytest.raises(UserError, match="fewer than n_train"):
        build_splits(_cfg(source="jsonl", path=str(good), n_train=20, n_val=2, n_test=2))
    wrong_column = tmp_path / "wrong.jsonl"
    wrong_column.write_text("".join(json.dumps({"question": "q", "answer": "a"}) + "\n" for _ in range(12)))
    with pytest.raises(UserError, match=r"column\(s\) programming_language, prompt, response absent"):
        build_splits(_cfg(source="jsonl", path=str(wrong_column), n_train=8, n_val=2, n_test=2))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 JSONL"):
        read_jsonl(latin1)
    with pytest.raises(UserError, match="not found"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_calibration_text_is_prose_disjoint_from_code_rows():
    from quantorder.data import calibration_text

    text = calibration_text(CalibCfg(name="pydoc", source="pydoc"))
    assert len(text) > 100_000
    assert "used for conditional execution" in text  # the `if` statement's documentation
    assert "def " not in text[:2000]
