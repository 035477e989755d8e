"""dvc.yaml and the library agree on paths; no stage before quantization depends on `algo`."""

from __future__ import annotations

import yaml

from quantorder.layout import FINETUNE_BASES, MERGE_REFERENCES, QUANTIZE_SOURCES, VARIANTS

from .conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_variant_deps_match_layout():
    items = STAGES["evaluate"]["foreach"]
    assert list(items) == list(VARIANTS)
    for name, spec in VARIANTS.items():
        assert items[name]["model"] == str(spec.model)
        assert items[name]["adapter"] == str(spec.adapter or spec.model)


def test_quantize_finetune_merge_sources_match_layout():
    quantize = STAGES["quantize"]["foreach"]
    assert {k: v["source"] for k, v in quantize.items()} == {k: str(v) for k, v in QUANTIZE_SOURCES.items()}
    for name, (reference, _) in MERGE_REFERENCES.items():
        assert quantize[name]["reference"] == str(reference)
    assert STAGES["finetune"]["foreach"] == {k: str(v) for k, v in FINETUNE_BASES.items()}
    assert STAGES["merge"]["foreach"] == {k: str(v) for k, v in FINETUNE_BASES.items()}


def test_float_chain_does_not_depend_on_algo():
    for stage in ("prepare", "calibrate", "finetune", "merge", "evaluate"):
        spec = STAGES[stage].get("do", STAGES[stage])
        assert not any(str(p).startswith("algo") for p in spec.get("params", [])), stage
    assert "algo" in STAGES["quantize"]["do"]["params"]
