"""dvc.yaml and the library agree: every stage depends on exactly the code it runs, the foreach
lists hold the variants and artifacts of quantorder.variants, no stage before quantization
depends on `algo`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from quantorder.layout import MERGED_DIR
from quantorder.variants import FINETUNES, MERGES, ON_QUANTIZED_BASE, QUANTIZATION_AWARE, QUANTIZATIONS, VARIANTS

from .conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """quantorder modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "quantorder"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "quantorder":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def import_closure(script: Path) -> set[str]:
    """Files (relative to the project root) of every quantorder module `script` imports, directly
    or through other modules, with the packages they sit in."""
    seen: set[Path] = set()
    todo = list(_imports(script))
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            file = _module_file(".".join(parts[:i]))
            if file and file not in seen:
                seen.add(file)
                todo += _imports(file)
    return {str(f.relative_to(ROOT)) for f in seen}


def _spec(stage: str) -> dict:
    return STAGES[stage].get("do", STAGES[stage])


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_depends_on_exactly_the_code_it_runs(stage):
    script = f"stages/{stage}.py"
    code_deps = {d for d in _spec(stage)["deps"] if d.startswith(("src/", "stages/"))}
    assert script in code_deps
    closure = import_closure(ROOT / script)
    assert not closure - code_deps, f"{stage} runs code dvc.yaml does not list: {sorted(closure - code_deps)}"
    assert not code_deps - closure - {script}, f"{stage} lists code it never runs: {sorted(code_deps - closure)}"


def test_the_closure_follows_imports_inside_functions_and_packages():
    closure = import_closure(ROOT / "stages/evaluate.py")
    assert "src/quantorder/tokens.py" in closure  # through evaluate.py
    assert {"src/quantorder/quantize/__init__.py", "src/quantorder/quantize/awq.py"} <= closure
    assert "src/quantorder/tracking.py" not in closure and "src/quantorder/compare.py" not in closure
    assert "src/quantorder/quantize/__init__.py" not in import_closure(ROOT / "stages/prepare.py")


def test_variant_deps_match_the_variants_module():
    items = STAGES["evaluate"]["foreach"]
    assert list(items) == list(VARIANTS)
    for name, variant in VARIANTS.items():
        assert set(items[name].values()) == {str(p) for p in variant.inputs()}, name
        assert items[name]["model"] == str(variant.model)


def test_quantize_finetune_merge_items_match_the_variants_module():
    assert STAGES["quantize"]["foreach"] == {k: str(v) for k, v in QUANTIZATIONS.items()}
    assert {k: item["base"] for k, item in STAGES["finetune"]["foreach"].items()} == {
        k: str(v) for k, v in FINETUNES.items()
    }
    merges = {k: {"base": str(m.base), "adapter": str(m.adapter)} for k, m in MERGES.items()}
    assert STAGES["merge"]["foreach"] == merges
    assert STAGES["merge"]["do"]["outs"] == ["models/merged/${key}"]
    assert all(m.out == MERGED_DIR / k for k, m in MERGES.items())


def test_float_chain_does_not_depend_on_algo():
    for stage in ("prepare", "calibrate", "finetune", "merge", "evaluate"):
        assert not any(str(p).startswith("algo") for p in _spec(stage).get("params", [])), stage
    assert "algo" in _spec("quantize")["params"]
    # finetune@X reads `algo` and `qat` exactly when it trains against the grid, `qlora` exactly when
    # it trains on the quantized base (the slots of its item)
    for name, item in STAGES["finetune"]["foreach"].items():
        grid = {item["algo"], item["qat"]}
        assert grid == ({"algo", "qat"} if name in QUANTIZATION_AWARE else {"seed"}), name
        assert item["qlora"] == ("qlora" if name in ON_QUANTIZED_BASE else "seed"), name
    assert {"${item.algo}", "${item.qat}", "${item.qlora}"} <= set(_spec("finetune")["params"])
