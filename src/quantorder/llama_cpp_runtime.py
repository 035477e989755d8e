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

# where scripts/install_llama_cpp.py puts the converter scripts; a GPU host's unpacked wheelhouse sets the variable
TOOLS_DIR = Path(os.environ.get("QUANTORDER_LLAMA_CPP_TOOLS", Path(sys.prefix) / "share" / "llama.cpp"))
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


def cpu_threads() -> int:
    """Threads for llama.cpp: `OMP_NUM_THREADS` where set (the knob torch follows too, so several
    stage processes on one host can split its cores), else every core this process may use."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


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
    params.nthread = threads or cpu_threads()
    partial = dst.with_name(dst.name + ".partial")
    rc = lib.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {type_name} (llama_model_quantize returned {rc})")
    partial.replace(dst)


class Session:
    """A GGUF model (plus an optional GGUF LoRA at scale 1) in llama.cpp, with a context of `n_seq`
    independent sequences of up to `n_ctx` tokens each. Use as a context manager."""

    def __init__(self, gguf_file: Path, lora: Path | None = None, n_ctx: int = 512, n_seq: int = 1, threads: int = 0):
        lib = self.lib = bindings()
        self.model = lib.llama_model_load_from_file(str(gguf_file).encode(), lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_file}")
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx * n_seq
        params.n_ubatch = min(512, params.n_batch)
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads or cpu_threads()
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.lora = lib.llama_adapter_lora_init(self.model, str(lora).encode()) if lora else None
        if not self.ctx or (lora and not self.lora):
            self.close()
            raise RuntimeError(f"llama.cpp could not set up {gguf_file}" + (f" with LoRA {lora}" if lora else ""))
        if self.lora:
            adapters, scales = (lib.llama_adapter_lora_p_ctypes * 1)(self.lora), (ctypes.c_float * 1)(1.0)
            lib.llama_set_adapters_lora(self.ctx, adapters, 1, scales)
        self.n_seq = n_seq
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(params.n_batch, 0, 1)

    @property
    def version(self) -> str:
        return version()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        lib = self.lib
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
        if self.lora:
            lib.llama_adapter_lora_free(self.lora)
        if self.ctx:
            lib.llama_free(self.ctx)
        if self.model:
            lib.llama_model_free(self.model)
        self.batch = self.lora = self.ctx = self.model = None

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One `llama_decode` of (token, position, sequence, wants logits) entries."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, wants_logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, wants_logits
            batch.seq_id[i][0] = seq
        if rc := self.lib.llama_decode(self.ctx, batch):
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The logits (tokens x vocab, float32) of one sequence, from an empty cache."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self._decode([(t, pos, 0, True) for pos, t in enumerate(tokens)])
        return np.stack([self._logits(i) for i in range(len(tokens))])

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (one sequence each, decoded together) by `new_tokens` tokens."""
        if len(prompts) > self.n_seq:
            raise ValueError(f"{len(prompts)} prompts: this session holds {self.n_seq} sequences")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        entries = [(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, t in enumerate(p)]
        self._decode(entries)
        rows = [i for i, entry in enumerate(entries) if entry[3]]  # each prompt's last token, in sequence order
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(new_tokens):
            for seq, row in enumerate(rows):
                out[seq].append(int(self._logits(row).argmax()))
            if step + 1 < new_tokens:
                self._decode([(out[s][-1], len(p) + step, s, True) for s, p in enumerate(prompts)])
                rows = list(range(len(prompts)))
        return out


def logits(gguf_file: Path, tokens: list[int], lora: Path | None = None, threads: int = 0) -> np.ndarray:
    """llama.cpp's logits (tokens x vocab, float32) for one token sequence, optionally with a GGUF LoRA."""
    with Session(gguf_file, lora, n_ctx=len(tokens), threads=threads) as session:
        return session.logits(tokens)
