"""llama.cpp from Python: its quantizer, its logits and its converter scripts.

The bindings are llama-cpp-python's (`llama_cpp`), the native libraries llama.cpp's prebuilt CPU
build (package `modelnexus`, whose CPU backend variants load at run time), the converter scripts
llama.cpp's own in `<venv>/share/llama.cpp/`: `scripts/install_llama_cpp.py` (run by
`make install`) puts all three in place.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
from functools import cache
from pathlib import Path

import numpy as np

from quantorder.errors import UserError

TOOLS_DIR = Path(sys.prefix) / "share" / "llama.cpp"
INSTALL_HINT = "run `make install` (scripts/install_llama_cpp.py)"


def tools_dir() -> Path:
    """Where llama.cpp's `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` are."""
    if not (TOOLS_DIR / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"llama.cpp's converter is not installed in {TOOLS_DIR}: {INSTALL_HINT}")
    return TOOLS_DIR


@cache
def bindings():
    """llama-cpp-python's `llama_cpp` module, on llama.cpp's libraries with its CPU backends loaded."""
    spec = importlib.util.find_spec("modelnexus")
    if spec is None or importlib.util.find_spec("llama_cpp") is None:
        raise UserError(f"llama.cpp is not installed: {INSTALL_HINT}")
    lib_dir = Path(spec.origin).parent / "native" / "linux-x86_64"
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)  # the soname libllama links
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
    import llama_cpp

    global _log_errors_only  # the callback must outlive every call into the library
    _log_errors_only = llama_cpp.llama_log_callback(_errors_only)
    llama_cpp.llama_log_set(_log_errors_only, ctypes.c_void_p())
    llama_cpp.llama_backend_init()
    return llama_cpp


def _errors_only(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level >= 4:  # GGML_LOG_LEVEL_ERROR
        sys.stderr.write(text.decode(errors="replace"))


_log_errors_only = None


def version() -> str:
    """The bindings' and the libraries' package versions."""
    bindings_version = importlib.metadata.version("llama-cpp-python")
    libraries_version = importlib.metadata.version("muthuishere-modelnexus")
    return f"llama-cpp-python {bindings_version}, modelnexus {libraries_version} (llama.cpp b9371)"


def quantize(src: Path, dst: Path, type_name: str, threads: int | None = None) -> None:
    """`llama_model_quantize`: the GGUF `src` as `type_name` (a `LLAMA_FTYPE_MOSTLY_*` name) into
    `dst`, written beside it first and renamed, so an interrupted run leaves no partial file."""
    lib = bindings()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads or os.cpu_count() or 1
    partial = dst.with_name(dst.name + ".partial")
    rc = lib.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {type_name} (llama_model_quantize returned {rc})")
    partial.replace(dst)


def logits(gguf_file: Path, tokens: list[int], lora: Path | None = None, threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits (tokens x vocab, float32) for one token sequence, optionally with a GGUF LoRA."""
    bindings()
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_file),
        lora_path=str(lora) if lora else None,
        n_ctx=len(tokens),
        n_batch=len(tokens),
        n_ubatch=len(tokens),
        n_threads=threads or os.cpu_count(),
        logits_all=True,
        verbose=False,
    )
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out
