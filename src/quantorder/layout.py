"""Where every stage reads and writes, and which model + adapter each variant evaluates.

dvc.yaml declares the same paths as deps/outs; tests/test_dvc_yaml.py keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BASE_DIR = Path("models/base")
QA_DIR = Path("data/qa")
CALIB_DIR = Path("data/calibration")
QUANTIZED_DIR = Path("models/quantized")
ADAPTERS_DIR = Path("models/adapters")
MERGED_DIR = Path("models/merged")
EVAL_DIR = Path("metrics/eval")
SUMMARY_FILE = Path("metrics/summary.json")
PLOTS_DIR = Path("metrics/plots")
REPORTS_DIR = Path("reports")
CHECKPOINTS_DIR = Path("checkpoints")  # not a DVC output: it must outlive a killed stage


@dataclass(frozen=True)
class Variant:
    """A model dir to evaluate, optionally with a LoRA adapter on top."""

    model: Path
    adapter: Path | None = None
    quantized: bool = False


VARIANTS: dict[str, Variant] = {
    "base": Variant(BASE_DIR),
    "base_q": Variant(QUANTIZED_DIR / "base_q", quantized=True),
    "ft": Variant(BASE_DIR, ADAPTERS_DIR / "ft"),
    "ft_q": Variant(QUANTIZED_DIR / "base_q", ADAPTERS_DIR / "ft", quantized=True),
    "ft_merge_q": Variant(QUANTIZED_DIR / "ft_merge_q", quantized=True),
    "q_ft": Variant(QUANTIZED_DIR / "base_q", ADAPTERS_DIR / "q_ft", quantized=True),
    "q_ft_merge_q": Variant(QUANTIZED_DIR / "q_ft_merge_q", quantized=True),
}
QUANTIZED_VARIANTS = [v for v, spec in VARIANTS.items() if spec.quantized]

# quantize@X: the float model each quantized dir is made from
QUANTIZE_SOURCES: dict[str, Path] = {
    "base_q": BASE_DIR,
    "ft_merge_q": MERGED_DIR / "ft",
    "q_ft_merge_q": MERGED_DIR / "q_ft",
}
# quantize@X of a merged model: (the quantized model, the float model) the merged update started from,
# for measuring how much of the update survives requantization
MERGE_REFERENCES: dict[str, tuple[Path, Path]] = {
    "ft_merge_q": (QUANTIZED_DIR / "base_q", BASE_DIR),
    "q_ft_merge_q": (QUANTIZED_DIR / "base_q", QUANTIZED_DIR / "base_q"),
}
# finetune@X and merge@X: the model the adapter is trained on and merged into
FINETUNE_BASES: dict[str, Path] = {"ft": BASE_DIR, "q_ft": QUANTIZED_DIR / "base_q"}
