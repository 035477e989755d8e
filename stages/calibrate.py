"""Stage calibrate: tokenized calibration windows into data/calibration, shared by every quantize@X.

Usage: dvc repro calibrate
"""

from quantorder.calibration import draw_windows, save_calibration
from quantorder.config import load_config
from quantorder.data import calibration_text
from quantorder.io import atomic_dir
from quantorder.layout import BASE_DIR, CALIB_DIR
from quantorder.models import load_tokenizer
from quantorder.stage import print_config, run_stage


def main() -> str:
    cfg = load_config()
    print_config("calib", cfg.calib)
    text = calibration_text(cfg.calib)
    windows = draw_windows(load_tokenizer(BASE_DIR), text, cfg.calib)
    with atomic_dir(CALIB_DIR) as tmp:
        manifest = save_calibration(tmp, windows, text, cfg.calib)
    return (
        f"[calibrate] {manifest['n_samples']} x {manifest['seq_len']} tokens "
        f"(sha256 {manifest['sha256'][:12]}) -> {CALIB_DIR}"
    )


if __name__ == "__main__":
    run_stage(main)
