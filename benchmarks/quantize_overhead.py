"""Quantization wall time: quantorder's quantizer against the backend's own minimal script
(`GPTQModel.load(...).quantize(samples)` then `save`) on the same model, samples and settings,
measured in the same run. Both run once untimed on a few samples first (CUDA context, kernel
compilation, the checkpoint in the page cache), then timed in the order quantorder, minimal,
minimal, quantorder, so neither profits from going second or from drift; each side's time is
the mean of its two runs.

The model has random weights in a configured architecture, saved once as a bf16 checkpoint; the
calibration windows are drawn from the embedded SymPy prose as the `calibrate` stage draws them.
`--layers N` keeps the first N decoder layers at full width: both quantizers work layer by layer,
so the per-layer cost is the 8B model's, while the fixed costs (load, save, set-up) weigh more.

    python benchmarks/quantize_overhead.py --model llama-3.1-8b --algo gptq --layers 4 --work /scratch \\
        --out benchmarks/results/quantize-gptq-llama-3.1-8b-h100.json
    python benchmarks/quantize_overhead.py --model tiny --algo gptq --n-samples 8 --seq-len 32   # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, conf, model_with_tokenizer, publish

from quantorder.calibration import draw_windows
from quantorder.cli import composed
from quantorder.config import CalibCfg, as_dict, parse_config
from quantorder.data import package_prose
from quantorder.models import resolve_device
from quantorder.provenance import device_name, library_versions
from quantorder.quantize import get_quantizer
from quantorder.quantize.gptqmodel_backend import set_gptqmodel_workers


def timed(fn) -> float:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a conf/model/ choice with an architecture")
    parser.add_argument("--algo", default="gptq", choices=["gptq", "awq"])
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers (default: all)")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work", type=Path, help="folder for the model and outputs (default: a temp dir)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    algo = parse_config(composed([f"model={args.model}", f"algo={args.algo}"], ROOT / "conf")).algo
    quantizer = get_quantizer(algo)
    calib = conf("calib", "sympy-docs")
    calib_cfg = CalibCfg(**{**calib, "n_samples": args.n_samples, "seq_len": args.seq_len})
    device = resolve_device("auto")
    set_gptqmodel_workers()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        model, tokenizer, arch = model_with_tokenizer(args.model, device, layers=args.layers)
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        del model
        windows = draw_windows(tokenizer, package_prose(calib["package"], calib["package_version"]), calib_cfg)
        samples = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]

        def ours(n: int = len(samples)) -> None:
            quantizer.quantize(work / "model", samples[:n], work / "ours", "bfloat16")

        def minimal(n: int = len(samples)) -> None:
            from gptqmodel import GPTQModel

            loaded = GPTQModel.load(str(work / "model"), quantizer.backend_config(), dtype=torch.bfloat16)
            loaded.quantize(samples[:n])
            loaded.save(str(work / "minimal"))

        warm_up = min(len(samples), 4)
        ours(warm_up)
        minimal(warm_up)
        runs = {"quantorder": [], "minimal": []}
        for name, fn in (("quantorder", ours), ("minimal", minimal), ("minimal", minimal), ("quantorder", ours)):
            runs[name].append(round(timed(fn), 2))
    seconds = {name: sum(times) / len(times) for name, times in runs.items()}
    result = {
        "device": device_name(device),
        "model_shape": args.model,
        "layers": arch["num_hidden_layers"],
        "algo": as_dict(algo),
        "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "runs_s": runs,
        "overhead": round(seconds["quantorder"] / seconds["minimal"] - 1, 4),
        "versions": library_versions(),
    }
    publish(result, ("device", "seconds", "overhead"), args.out)


if __name__ == "__main__":
    main()
