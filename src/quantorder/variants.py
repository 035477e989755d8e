"""The experiment's variants, each with its recipe, and the artifacts the pipeline makes for them.

The only place variant names are written. dvc.yaml's `foreach` lists hold the same entries
(tests/test_dvc_yaml.py). Adding a variant: one entry in VARIANTS (plus the adapter, merge or
quantization it needs in FINETUNES / MERGES / QUANTIZATIONS) and the matching items in dvc.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantorder.layout import ADAPTERS_DIR, BASE_DIR, MERGED_DIR, QUANTIZED_DIR

BASE_Q = QUANTIZED_DIR / "base_q"  # quantize(base): the starting point of every quantized variant


@dataclass(frozen=True)
class Merge:
    """merge@X: adapter `adapter` folded into `base` (dequantized first if quantized), saved in float to `out`."""

    base: Path
    adapter: Path
    out: Path


# finetune@X: the model adapter X is trained on
FINETUNES: dict[str, Path] = {"ft": BASE_DIR, "q_ft": BASE_Q, "qat": BASE_DIR}
QUANTIZATION_AWARE = {"qat"}  # finetune@X that fake-quantizes the weights on the algorithm's grid (quantorder.qat)
ON_QUANTIZED_BASE = {"q_ft"}  # finetune@X whose adapter takes the `qlora` settings (quantorder.qlora)
# merge@X
MERGES: dict[str, Merge] = {
    "ft": Merge(BASE_DIR, ADAPTERS_DIR / "ft", MERGED_DIR / "ft"),
    "q_ft": Merge(BASE_Q, ADAPTERS_DIR / "q_ft", MERGED_DIR / "q_ft"),  # into the dequantized base it trained on
    "q_ft_fmerge": Merge(BASE_DIR, ADAPTERS_DIR / "q_ft", MERGED_DIR / "q_ft_fmerge"),  # into the float base
    "qat": Merge(BASE_DIR, ADAPTERS_DIR / "qat", MERGED_DIR / "qat"),
}
# quantize@X: the float model quantized into models/quantized/X
QUANTIZATIONS: dict[str, Path] = {
    "base_q": BASE_DIR,
    "ft_merge_q": MERGES["ft"].out,
    "q_ft_merge_q": MERGES["q_ft"].out,
    "q_ft_fmerge_q": MERGES["q_ft_fmerge"].out,
    "qat_merge_q": MERGES["qat"].out,
}


@dataclass(frozen=True)
class Variant:
    """What one variant evaluates: a model dir, optionally a LoRA adapter on top.

    `quantized`: the weights come from the experiment's algorithm. `requantizes`: the merge whose
    float model `model` quantizes; its evaluation also measures how much of the merged LoRA update
    survived (update_survival).
    """

    model: Path
    adapter: Path | None = None
    quantized: bool = False
    requantizes: Merge | None = None
    reference: bool = False  # a float yardstick (base, ft), drawn as a line in the chart
    finetuned_first: bool = False  # quantized after fine-tuning (the "after" arm of the question)

    def inputs(self) -> list[Path]:
        """Every model dir evaluate@V reads (dvc.yaml lists the same as deps)."""
        paths = [self.model, *([self.adapter] if self.adapter else [])]
        if self.requantizes:
            paths += [self.requantizes.out, self.requantizes.base, BASE_Q]
        return list(dict.fromkeys(paths))


VARIANTS: dict[str, Variant] = {
    "base": Variant(BASE_DIR, reference=True),
    "base_q": Variant(BASE_Q, quantized=True),
    "ft": Variant(BASE_DIR, ADAPTERS_DIR / "ft", reference=True),
    "ft_q": Variant(BASE_Q, ADAPTERS_DIR / "ft", quantized=True, finetuned_first=True),
    "ft_merge_q": Variant(QUANTIZED_DIR / "ft_merge_q", quantized=True, requantizes=MERGES["ft"], finetuned_first=True),
    "q_ft": Variant(BASE_Q, ADAPTERS_DIR / "q_ft", quantized=True),
    "q_ft_merge_q": Variant(QUANTIZED_DIR / "q_ft_merge_q", quantized=True, requantizes=MERGES["q_ft"]),
    "q_ft_fmerge": Variant(MERGES["q_ft_fmerge"].out),
    "q_ft_fmerge_q": Variant(QUANTIZED_DIR / "q_ft_fmerge_q", quantized=True, requantizes=MERGES["q_ft_fmerge"]),
    "qat_merge_q": Variant(QUANTIZED_DIR / "qat_merge_q", quantized=True, requantizes=MERGES["qat"]),
}
BASELINE = "base"  # the untouched model
TARGET = "ft"  # the float fine-tune: every quantized variant's gap is measured against it
QUANTIZED_VARIANTS = [v for v, spec in VARIANTS.items() if spec.quantized]
REFERENCE_VARIANTS = [v for v, spec in VARIANTS.items() if spec.reference]
FINETUNED_FIRST = [v for v, spec in VARIANTS.items() if spec.finetuned_first]
COMPARED = [v for v, spec in VARIANTS.items() if not spec.reference]  # the deliverables: a bar each in the charts


def merge_base_pairs() -> list[tuple[str, str]]:
    """(float-base variant, quantized-base variant) pairs that requantize the same adapter merged into
    the float base and into the dequantized quantized base: the merge base as a measured factor."""
    requantized = {v: spec.requantizes for v, spec in VARIANTS.items() if spec.requantizes}
    return [
        (f, q)
        for f, fm in requantized.items()
        for q, qm in requantized.items()
        if fm.adapter == qm.adapter and fm.base == BASE_DIR and qm.base == BASE_Q
    ]


def sources(path: Path) -> list[Path]:
    """The artifacts the stage making `path` reads (none for the base)."""
    name = path.name
    if path.parent == QUANTIZED_DIR:
        return [QUANTIZATIONS[name]]
    if path.parent == ADAPTERS_DIR:
        return [FINETUNES[name]]
    if path.parent == MERGED_DIR:
        return [MERGES[name].base, MERGES[name].adapter]
    return []


def needs(variant: str) -> set[Path]:
    """Every artifact variant `variant` is made from, directly or through other artifacts."""
    found: set[Path] = set()
    todo = VARIANTS[variant].inputs()
    while todo:
        path = todo.pop()
        if path not in found:
            found.add(path)
            todo += sources(path)
    return found


def users(path: Path) -> list[str]:
    """The variants that need artifact `path`."""
    return [v for v in VARIANTS if path in needs(v)]
