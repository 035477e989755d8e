"""The package Q&A builder is deterministic, its splits disjoint, its errors clear."""

from __future__ import annotations

import json

import pytest

from quantorder.config import CalibCfg, DataCfg
from quantorder.data import SPLITS, build_splits, package_prose, package_qa_rows, read_jsonl, render, write_splits
from quantorder.errors import UserError

from .conftest import SYMPY, TEMPLATE


def _cfg(**kw) -> DataCfg:
    return DataCfg(
        **{
            "name": "t",
            "source": "package",
            "package": SYMPY[0],
            "package_version": SYMPY[1],
            "template": TEMPLATE,
            "n_train": 50,
            "n_val": 10,
            "n_test": 20,
            **kw,
        }
    )


def test_package_rows_are_real_code_qa():
    rows = package_qa_rows(*SYMPY, max_answer_chars=1200)
    assert len(rows) > 5000
    for row in rows[:50]:
        assert row["programming_language"] == "Python"
        assert row["prompt"].startswith("Write the function `")
        assert row["response"].lstrip().startswith(("def ", "async def ", "@"))
    sample = next(r for r in rows if r["prompt"].startswith("Write the function `is_zero_dimensional(F, *gens"))
    assert "sympy.polys.polytools" in sample["prompt"] and "Groebner basis is zero-dimensional" in sample["prompt"]
    assert "Checks if" not in sample["response"] and "return GroebnerBasis(F, *gens, **args)" in sample["response"]
    assert not any(".tests." in r["prompt"] for r in rows)
    assert len({(r["prompt"], r["response"]) for r in rows}) == len(rows)


def test_package_must_be_installed_at_the_pinned_version():
    with pytest.raises(UserError, match=r"data.package_version=0.1: installed sympy is 1.14.0; pip install sympy==0.1"):
        package_qa_rows("sympy", "0.1", max_answer_chars=1200)
    with pytest.raises(UserError, match=r"calib.package='no-such-pkg' is not installed"):
        package_prose("no-such-pkg", "1.0")
    with pytest.raises(UserError, match="data.source=package needs data.package and data.package_version"):
        _cfg(package=None)


@pytest.fixture(scope="module")
def built() -> tuple[dict, dict]:
    """The splits and source record of `_cfg()` (split seed 0), built once for this module."""
    return build_splits(_cfg())


def test_build_is_deterministic_and_splits_disjoint(tmp_path, built):
    cfg = _cfg()
    manifests = []
    for run, (splits, source) in (("a", built), ("b", build_splits(cfg))):
        (tmp_path / run).mkdir()
        manifests.append(write_splits(tmp_path / run, splits, source, cfg))
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    assert manifests[0]["rows"] == {"train": 50, "val": 10, "test": 20}
    assert manifests[0]["source"] == {
        "kind": "package",
        "package": "sympy",
        "version": "1.14.0",
        "rows_available": 5125,
    }
    prompts = {name: {r["prompt"] for r in read_jsonl(tmp_path / "a" / f"{name}.jsonl")} for name in SPLITS}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]


def test_split_seed_changes_the_split_but_not_the_pool(built):
    a, _ = built
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
    wrong_column.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(12)))
    with pytest.raises(UserError, match=r"column\(s\) programming_language, prompt, response absent"):
        build_splits(_cfg(source="jsonl", path=str(wrong_column), n_train=8, n_val=2, n_test=2))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_jsonl(latin1)
    with pytest.raises(UserError, match="not found"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_calibration_text_is_prose_disjoint_from_code_rows():
    from quantorder.data import calibration_text

    text = calibration_text(CalibCfg(name="docs", source="package", package=SYMPY[0], package_version=SYMPY[1]))
    assert len(text) > 1_000_000
    assert "An identity morphism is a morphism with equal domain and codomain" in text  # a class docstring
    assert "Groebner basis is zero-dimensional" not in text  # a function docstring: a Q&A question
    assert "def " not in text[:2000]
