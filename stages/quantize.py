"""Stage quantize@X: quantize a float model dir with the configured algorithm.

X is base_q (the base), ft_merge_q (base merged with the float adapter) or q_ft_merge_q (the
dequantized quantized base merged with the adapter trained on it); quantorder.variants says which.
Usage: dvc repro quantize@base_q   (or python stages/quantize.py base_q)
"""

import time

from quantorder.availability import mark_na
from quantorder.calibration import load_calibration
from quantorder.config import as_dict, load_config
from quantorder.io import atomic_dir, read_json, write_json
from quantorder.layout import CALIB_DIR, PROVENANCE_FILE, QUANTIZED_DIR
from quantorder.memory import process_peak_memory
from quantorder.models import dir_size
from quantorder.provenance import hash_dir, library_versions
from quantorder.quantize import get_quantizer
from quantorder.stage import print_config, run_stage, stage_target
from quantorder.variants import QUANTIZATIONS


def main() -> str:
    name = stage_target("quantize target", QUANTIZATIONS)
    cfg = load_config()
    print_config("algo", cfg.algo)
    source, out = QUANTIZATIONS[name], QUANTIZED_DIR / name
    quantizer = get_quantizer(cfg.algo)
    unsupported = quantizer.unsupported_variants()
    if reason := mark_na(out, [source], unsupported, algo=as_dict(cfg.algo)):
        return f"[quantize@{name}] n/a: {reason}"
    calibration, calib_manifest = load_calibration(CALIB_DIR) if quantizer.requires_calibration else (None, None)
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        backend = quantizer.quantize(source, calibration, tmp, cfg.model.dtype)
        seconds = time.perf_counter() - start
        write_json(
            tmp / PROVENANCE_FILE,
            {
                "algo": as_dict(cfg.algo),
                **backend,
                "source": str(source),
                "source_sha256": read_json(source / PROVENANCE_FILE)["sha256"],
                "calibration_sha256": calib_manifest["sha256"] if calib_manifest else None,
                "unsupported_variants": unsupported,
                "sha256": hash_dir(tmp),
                "seconds": round(seconds, 2),
                "peak_memory": process_peak_memory(),
                "versions": library_versions(),
            },
        )
    return (
        f"[quantize@{name}] {cfg.algo.label}: "
        f"{dir_size(source) / 2**20:.1f} MiB -> {dir_size(out) / 2**20:.1f} MiB in {seconds:.1f}s -> {out}"
    )


if __name__ == "__main__":
    run_stage(main)
