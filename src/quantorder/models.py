"""Materialize base models, load float or quantized model dirs, place them on a device."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from quantorder.config import ModelCfg
from quantorder.distributed import claim_gpus, is_worker
from quantorder.errors import UserError
from quantorder.provenance import hash_file

PROVENANCE_FILE = "quantorder.json"  # written into every model/adapter dir this project makes


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA on a machine without it is a UserError.

    On a host with several GPUs the process first claims a free one (see quantorder.distributed);
    a torchrun worker gets the GPU of its local rank.
    """
    if device in ("auto", "cuda"):
        claim_gpus(1)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda but no CUDA GPU is visible; use model.device=auto or cpu")
    if device == "cuda" and is_worker():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _package_dir(package: str) -> Path:
    # Located without importing: packages that ship model files may not import cleanly.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.package={package!r} is not installed; install it (see README) or pick another model")
    return Path(list(spec.submodule_search_locations)[0])


def _distribution_of(package: str) -> tuple[str, str]:
    """PyPI distribution name and version that provide the importable `package`."""
    name = importlib.metadata.packages_distributions().get(package, [package])[0]
    return name, importlib.metadata.version(name)


def _from_package(cfg: ModelCfg, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = _package_dir(cfg.package)
    gguf = folder / cfg.gguf_file
    if not gguf.is_file():
        raise UserError(f"model.gguf_file={cfg.gguf_file!r} not found in {folder}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=cfg.gguf_file, quantization_config=GgufConfig(dequantize=True), dtype=dtype
    )
    dist, version = _distribution_of(cfg.package)
    source = {
        "kind": "package",
        "distribution": dist,
        "version": version,
        "file": cfg.gguf_file,
        "sha256": hash_file(gguf),
    }
    return model, tok, source


def _from_hub(cfg: ModelCfg, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.hub_id, revision=cfg.revision)
    model = AutoModelForCausalLM.from_pretrained(cfg.hub_id, revision=cfg.revision, dtype=dtype)
    return model, tok, {"kind": "hub", "hub_id": cfg.hub_id, "revision": cfg.revision}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` (deterministic for the same texts); at most
    `vocab_size` tokens, fewer where the texts hold fewer merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_model(architecture: dict, tokenizer, seed: int, dtype: torch.dtype, device: torch.device):
    """A model of `architecture` (a transformers config: `model_type` and its fields) with seeded
    random weights, built directly on `device` (an 8B model initializes in seconds on a GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(architecture)
    vocab = fields.setdefault("vocab_size", len(tokenizer))
    if vocab < len(tokenizer):
        raise UserError(f"model.architecture.vocab_size={vocab}: smaller than its tokenizer ({len(tokenizer)} tokens)")
    specials = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    config = AutoConfig.for_model(**{**fields, **specials})
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _random(cfg: ModelCfg, dtype: torch.dtype, texts: list[str]):
    arch = cfg.architecture
    tok = train_tokenizer(texts, arch.get("vocab_size", 32000))
    device = resolve_device(cfg.device)
    model = random_model(arch, tok, seed=0, dtype=dtype, device=device)
    return model, tok, {"kind": "random", "architecture": arch, "init_seed": 0, "init_device": device.type}


def materialize_base(cfg: ModelCfg, out_dir: Path, tokenizer_texts: list[str]) -> dict:
    """Write the base model (float safetensors + tokenizer) into `out_dir`; return its source record.

    `tokenizer_texts` trains the tokenizer of a random-init model and is ignored otherwise.
    """
    dtype = torch_dtype(cfg.dtype)
    if cfg.source == "package":
        model, tok, source = _from_package(cfg, dtype)
    elif cfg.source == "hub":
        model, tok, source = _from_hub(cfg, dtype)
    else:
        model, tok, source = _random(cfg, dtype, tokenizer_texts)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    source["parameters"] = sum(p.numel() for p in model.parameters())
    return source


def model_config(model_dir: str | Path) -> dict:
    """The transformers config.json of a model dir."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"model dir {model_dir} has no config.json; rerun the stage that makes it")
    return json.loads(path.read_text())


def check_seq_len(model_dir: str | Path, seq_len: int, key: str) -> None:
    """Raise a UserError if `seq_len` exceeds the positions the model in `model_dir` was built for."""
    config = model_config(model_dir)
    limit = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    if limit and seq_len > limit:
        raise UserError(f"{key}={seq_len}: the model in {model_dir} allows at most {limit} tokens")


def is_quantized(model_dir: str | Path) -> bool:
    return "quantization_config" in model_config(model_dir)


def set_gptqmodel_workers() -> None:
    """Give GPTQModel its CPU worker count (it refuses to start with fewer cores than it asks for)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 8))))


def quantization_config(qcfg: dict, device: torch.device, training: bool):
    """The transformers config that loads an int-packed checkpoint (GPTQ or AWQ format) with the
    right GPTQModel kernel.

    CUDA: Marlin for inference (GPTQ's only where symmetric), else GPTQModel's Triton kernel for
    GPTQ and its torch kernel for AWQ (whose Triton kernel is fp16-only); all train. CPU: the torch
    kernels. GPTQModel's own CUDA default (Machete) JIT-builds from downloaded sources and fails
    offline, so the choice is always explicit.
    """
    from transformers import AwqConfig, GPTQConfig

    marlin = device.type == "cuda" and not training
    if qcfg.get("quant_method") == "awq":
        return AwqConfig(bits=qcfg["bits"], backend="marlin" if marlin else "torch_awq")
    if marlin and qcfg.get("sym", True):
        return GPTQConfig(bits=qcfg["bits"], backend="marlin")
    return GPTQConfig(bits=qcfg["bits"], backend="triton" if device.type == "cuda" else "torch")


@contextlib.contextmanager
def _unreadable_model_dir(model_dir: Path, *errors: type[Exception]) -> Iterator[None]:
    """A missing, truncated or corrupt file in a model dir (OSError, safetensors' error, `errors`)
    is a UserError naming the dir."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError, *errors) as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"model dir {model_dir} is incomplete or corrupt ({reason}); rerun the stage making it") from e


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    # transformers raises ValueError ("Couldn't instantiate the backend tokenizer") for missing files
    with _unreadable_model_dir(Path(model_dir), ValueError):
        tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, dtype: str, device: torch.device, training: bool = False):
    """Load a float or int-quantized model dir with transformers, on `device`, in `dtype`.

    Quantized dirs (GPTQ or AWQ format, written by GPTQModel) load through transformers with
    GPTQModel's kernels; they compute with exactly their dequantized weights. AWQ dirs always
    load in a half-precision dtype (bf16 for a float32 request).
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = model_config(model_dir)
    kwargs = {"dtype": torch_dtype(dtype)}
    if "quantization_config" in config:
        if device.type == "cpu":
            # GPTQModel's CPU kernel wraps dequantization in torch.compile, which recompiles for
            # every new input shape (stalls of 30 s and more); eager mode is faster here.
            torch._dynamo.config.disable = True
        set_gptqmodel_workers()
        qcfg = config["quantization_config"]
        kwargs["quantization_config"] = quantization_config(qcfg, device, training)
        if qcfg.get("quant_method") == "awq" and kwargs["dtype"] == torch.float32:
            # GPTQModel's AWQ kernels compute in half precision (float32 inputs silently in fp16,
            # which overflows on outlier activations): use bf16, the dtype AWQ quantized in.
            kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": str(device)}
    with warnings.catch_warnings():  # passing a config only to pick the kernel is intended
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        with _unreadable_model_dir(model_dir):
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    if info["missing_keys"]:  # transformers would run them with random weights
        missing = sorted(info["missing_keys"])
        raise UserError(f"model dir {model_dir} lacks {len(missing)} weights of its architecture ({missing[0]}, ...)")
    return model.to(device)


def dir_size(path: str | Path, suffixes: tuple[str, ...] = (".safetensors",)) -> int:
    """Bytes of the weight files in `path` (top level only: subdirs hold records such as AWQ's scales)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.suffix in suffixes)
