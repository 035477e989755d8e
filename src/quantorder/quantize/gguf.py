"""llama.cpp GGUF: made by llama.cpp's own converter and quantizer, read back by transformers.

Sample config (conf/algo/gguf.yaml):
    name: gguf
    type: Q4_K_M     # a llama.cpp quantization type: Q4_K_M, Q5_K_M, Q8_0, Q4_0, ...
`quantize` runs llama.cpp's `convert_hf_to_gguf.py` (a 16-bit GGUF of the float model) and
`llama_model_quantize` (the type, with llama.cpp's per-tensor mix: Q4_K_M keeps some tensors at
Q6_K, and a k-quant tensor whose width is not a multiple of 256 falls back to a legacy type).
The checkpoint dir holds `model.gguf` beside a config.json that names it. Every stage loads it
with transformers, which dequantizes the GGUF's weights into a float model; each linear layer
that was quantized is tagged with its GGUF type and stored bytes, so merging, update survival and
bits per weight read the same weights llama.cpp computes with.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch

from quantorder import llama_cpp_runtime as runtime
from quantorder.errors import UserError
from quantorder.models import copy_tokenizer, load_pretrained, model_config, torch_dtype
from quantorder.quantize.base import Quantizer

GGUF_FILE = "model.gguf"
TENSOR_TYPES_FILE = "gguf_tensor_types.json"  # beside it: each tensor's type and bytes, read without parsing the GGUF


class GGUFQuantizer(Quantizer):
    """Settings: config.GGUFCfg."""

    name = "gguf"
    backend = "llama.cpp"
    requires_calibration = False
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("gguf",)
    serving_runtime = "llama.cpp"

    def check(self, model: torch.nn.Module) -> None:
        """Nothing to refuse: llama.cpp picks a fallback type for a tensor its type cannot store."""

    def unsupported_variants(self) -> dict[str, str]:
        return {
            "qat_merge_q": "llama.cpp's k-quant mixes choose a type per tensor at export; there is no "
            "per-weight round trip to train against"
        }

    def quantize(self, model_dir: Path, calibration: list[dict[str, Any]] | None, out_dir: Path, dtype: str) -> dict:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            f16 = Path(tmp) / "f16.gguf"
            convert_to_gguf(model_dir, f16)
            runtime.quantize(f16, out_dir / GGUF_FILE, self.cfg.type)
        config = model_config(model_dir)
        config["quantization_config"] = {"quant_method": "gguf", "type": self.cfg.type, "gguf_file": GGUF_FILE}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
        types = tensor_types(out_dir / GGUF_FILE)
        (out_dir / TENSOR_TYPES_FILE).write_text(json.dumps(types, indent=1))
        copy_tokenizer(model_dir, out_dir)
        return {
            "backend": "llama.cpp",
            "type": self.cfg.type,
            "tensor_types": dict(Counter(t for t, _ in types.values())),
            "llama_cpp": runtime.version(),
        }

    @classmethod
    def load(cls, model_dir: Path, dtype: str, device: torch.device, training: bool) -> torch.nn.Module:
        """The GGUF's weights, dequantized by transformers. gguf-py parses a GGUF's metadata (the
        tokenizer's vocabulary and merges too) in seconds per read, so the architecture comes from
        config.json and the tensor types from their JSON beside the file: one parse, not three."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        model = load_pretrained(model_dir, config=config, gguf_file=GGUF_FILE, dtype=torch_dtype(dtype)).to(device)
        types = json.loads((model_dir / TENSOR_TYPES_FILE).read_text())
        names = gguf_names(model)
        for name, module in cls.quantized_linears(model):
            gguf_type, nbytes = types[names[name]]
            if gguf_type not in ("F32", "F16", "BF16"):
                module.gguf_type, module.gguf_bytes = gguf_type, nbytes
        return model

    @classmethod
    @contextmanager
    def serve(
        cls, model_dir: Path, adapter_dir: Path | None = None, n_ctx: int = 512, n_seq: int = 1, threads: int = 0
    ) -> Iterator[runtime.Session]:
        """The GGUF in llama.cpp; an adapter goes in as a GGUF LoRA made by llama.cpp's converter. A
        float model dir is converted to a 16-bit GGUF first: the baseline in the same runtime."""
        with tempfile.TemporaryDirectory() as tmp:
            gguf_file = model_dir / GGUF_FILE
            if not gguf_file.is_file():
                gguf_file = convert_to_gguf(model_dir, Path(tmp) / "f16.gguf")
            lora = convert_lora(adapter_dir, model_dir, Path(tmp) / "lora.gguf") if adapter_dir else None
            with runtime.Session(gguf_file, lora, n_ctx, n_seq, threads) as session:
                yield session

    @classmethod
    def is_quantized_linear(cls, module: torch.nn.Module) -> bool:
        return isinstance(module, torch.nn.Linear) and hasattr(module, "gguf_type")

    @classmethod
    def linear_weight(cls, module: torch.nn.Module) -> torch.Tensor:
        return module.weight.float()  # transformers dequantized it on load

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(self.unsupported_variants()["qat_merge_q"])

    @classmethod
    def stored_bits(cls, module: torch.nn.Module) -> int:
        return 8 * module.gguf_bytes


def convert_to_gguf(model_dir: Path, out_file: Path) -> Path:
    """llama.cpp's converter: the float model dir as a 16-bit GGUF."""
    done = _convert("convert_hf_to_gguf.py", model_dir, out_file)
    if "BPE pre-tokenizer was not recognized" in done.stderr:
        raise UserError(
            f"algo=gguf: llama.cpp's converter does not recognize the tokenizer of {model_dir} (its pre-tokenizer "
            "is not one of a published model's); use a model llama.cpp supports"
        )
    if done.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{done.stderr[-2000:]}")
    return out_file


def convert_lora(adapter_dir: Path, base_dir: Path, out_file: Path) -> Path:
    """llama.cpp's converter: a PEFT LoRA adapter as a 16-bit GGUF LoRA for the model in `base_dir`
    (of which the converter reads only the architecture: config.json, less any quantization)."""
    with tempfile.TemporaryDirectory() as config_dir:
        config = {k: v for k, v in model_config(base_dir).items() if k != "quantization_config"}
        (Path(config_dir) / "config.json").write_text(json.dumps(config))
        done = _convert("convert_lora_to_gguf.py", adapter_dir, out_file, "--base", config_dir)
    if done.returncode:
        raise RuntimeError(f"convert_lora_to_gguf.py failed on {adapter_dir}:\n{done.stderr[-2000:]}")
    return out_file


def _convert(script: str, src: Path, out_file: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(runtime.tools_dir() / script), str(src), "--outtype", "f16", "--outfile", str(out_file)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True)


def tensor_types(gguf_file: Path) -> dict[str, tuple[str, int]]:
    """GGUF tensor name -> (type name, stored bytes)."""
    import gguf

    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(gguf_file).tensors}


def gguf_names(model: torch.nn.Module) -> dict[str, str]:
    """transformers module name -> the GGUF tensor name of its weight (gguf-py's name map)."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == model.config.model_type)
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    return {name: f"{names.get_name(name)}.weight" for name, _ in Quantizer.quantized_linears(model)}
