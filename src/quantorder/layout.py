"""Where every stage reads and writes. dvc.yaml declares the same paths (tests/test_dvc_yaml.py)."""

from __future__ import annotations

import os
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
# not a DVC output: it must outlive a killed stage (`quantorder grid` points it at shared storage)
CHECKPOINTS_DIR = Path(os.environ.get("QUANTORDER_CHECKPOINTS", "checkpoints"))
PROVENANCE_FILE = "quantorder.json"  # written into every model/adapter dir this project makes
# Model weights go into safetensors shards of at most this size: DVC hashes the large files of a
# directory output in parallel (`core.checksum_jobs` threads, .dvc/config), a single file on one
# core at about 0.8 GB/s
SHARD_SIZE = "1GB"
