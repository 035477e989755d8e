"""Materialize base models, load float model dirs and tokenizers, place them on a device.

Quantized dirs load through their method in `quantorder.quantize`, which calls `load_pretrained`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from quantorder.config import ModelCfg
from quantorder.distributed import claim_gpus, is_worker
from quantorder.errors import UserError
from quantorder.layout import SHARD_SIZE
from quantorder.provenance import hash_file


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
    model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
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


def load_pretrained(model_dir: str | Path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)`, refusing unreadable dirs and
    checkpoints that lack weights of their architecture (transformers would run them random)."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    model_config(model_dir)  # a missing config.json is a UserError naming the dir
    with warnings.catch_warnings():  # passing a quantization config only to pick the kernel is intended
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        with _unreadable_model_dir(model_dir):
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(f"model dir {model_dir} lacks {len(missing)} weights of its architecture ({missing[0]}, ...)")
    return model


def load_float(model_dir: str | Path, dtype: str, device: torch.device):
    """Load a float model dir with transformers, on `device`, in `dtype`."""
    return load_pretrained(model_dir, dtype=torch_dtype(dtype)).to(device)


def float_model_from_state(model, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """A plain float model of `model`'s architecture (no quantization config) holding `state`,
    on `model`'s device; non-persistent buffers (rotary frequencies) are taken from `model`."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    with torch.device("meta"):  # no random init of weights the state replaces
        float_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _, unexpected = float_model.load_state_dict(state, strict=False, assign=True)
    buffers = dict(model.named_buffers())
    for name, buffer in list(float_model.named_buffers()):
        if buffer.is_meta and name in buffers:
            module, _, leaf = name.rpartition(".")
            float_model.get_submodule(module).register_buffer(leaf, buffers[name].clone(), persistent=False)
    if config.tie_word_embeddings:
        float_model.tie_weights()
    # whatever the state left unset is still on the meta device (tied weights are set by now)
    missing = [n for n, t in [*float_model.named_parameters(), *float_model.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise RuntimeError(f"state does not match the float architecture: missing {missing}, unexpected {unexpected}")
    return float_model.to(next(model.parameters()).device)


def dir_size(path: str | Path, suffixes: tuple[str, ...] = (".safetensors", ".gguf")) -> int:
    """Bytes of the weight files in `path` (top level only: subdirs hold records such as AWQ's scales)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.suffix in suffixes)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files `src` has into `dst`, beside a model saved there."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
