"""LoRA fine-tuning on a float base (`ft`) or on a quantized base (`q_ft`, QLoRA-style).

On a quantized base the frozen layers are GPTQModel's int kernels: the adapter trains against
exactly the dequantized quantized weights that evaluation and merging use.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantorder.checkpoint import Checkpointer, rng_state, set_rng_state
from quantorder.config import FinetuneCfg, as_dict
from quantorder.data import render
from quantorder.distributed import all_gather, all_sum, rank, world_size
from quantorder.errors import UserError
from quantorder.io import write_json
from quantorder.layout import PROVENANCE_FILE
from quantorder.memory import peak_memory_bytes, reset_peak_memory
from quantorder.tokens import Example, encode, pad_batch, token_nll

TRAIN_LOG = "train_log.jsonl"


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    val_loss: float
    trainable_params: int
    total_params: int
    seconds: float
    tokens_per_s: float
    peak_mem_bytes: int
    processes: int  # data-parallel processes (one per GPU)

    def describe(self) -> str:
        """The numbers of the stage's closing line."""
        on = f" on {self.processes} processes" if self.processes > 1 else ""
        return (
            f"{self.steps} steps, loss {self.final_loss:.4f}, val loss {self.val_loss:.4f}, "
            f"{self.trainable_params / 1e6:.2f}M trainable, {self.tokens_per_s:.0f} tok/s{on}, "
            f"peak {self.peak_mem_bytes / 2**30:.2f} GiB"
        )


def apply_liger_kernel(model, fused_loss_only: bool = False) -> bool:
    """Swap in Liger's fused Triton kernels where the model runs on CUDA; True if it did.
    `fused_loss_only`: only the cross-entropy fused with the output layer (under torch.compile,
    which fuses the norms, activations and rotary embeddings itself).

    Raises:
        UserError: liger-kernel is not installed (it is the `gpu` extra).
    """
    if next(model.parameters()).device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise UserError("finetune.liger_kernel=true needs liger-kernel: pip install 'quantorder[gpu]'") from e
    # the same call as transformers' `use_liger_kernel`; it passes on the options the model type takes
    only_loss = {"rope": False, "rms_norm": False, "swiglu": False, "layer_norm": False} if fused_loss_only else {}
    _apply_liger_kernel_to_instance(model=model, **only_loss)
    return True


def compile_layers(model) -> int:
    """torch.compile every decoder layer of `model` in place, as torchtune's recipes do: the layers
    share one compiled graph, compiled in seconds where the whole model takes minutes. Returns how
    many layers were compiled."""
    import torch._inductor.config

    # dropout masks from PyTorch's generator, as in eager mode (and in transformers' Trainer), not
    # from Inductor's own: the same seed trains the same adapter, compiled or not
    torch._inductor.config.fallback_random = True
    names = set(getattr(model, "_no_split_modules", None) or [])  # transformers' decoder-layer classes
    layers = [m for m in model.modules() if type(m).__name__ in names]
    for layer in layers:
        layer.compile()
    return len(layers)


def check_target_modules(model, targets: list[str]) -> None:
    """Raise a UserError naming every target that is no module of `model`. PEFT adapts the targets
    it finds and silently skips the others (Phi-3 fuses q/k/v into `qkv_proj`), which would train
    a fraction of the layers asked for."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists  # PEFT's own name matching

    modules = dict(model.named_modules())

    def found(target: str) -> bool:
        config = LoraConfig(target_modules=[target])
        return any(check_target_module_exists(config, name) for name in modules)

    missing = [t for t in targets if not found(t)]
    if missing:
        leaves = [(n, m) for n, m in modules.items() if not list(m.children())]
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in leaves if hasattr(m, "in_features")})
        raise UserError(
            f"finetune.target_modules={targets}: {', '.join(missing)} not in this model; its linear layers: "
            + ", ".join(linear)
        )


def setup_model(model, cfg: FinetuneCfg, seed: int, **lora_options):
    """Wrap `model` with fresh LoRA adapters (seeded init; `lora_options`: more LoraConfig settings);
    the base stays frozen."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, cfg.target_modules)
    if cfg.liger_kernel and apply_liger_kernel(model, fused_loss_only=cfg.compile):
        print(f"[finetune] Liger kernels on{' (fused loss)' if cfg.compile else ''}", flush=True)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        **lora_options,
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        raise UserError(f"finetune.target_modules={cfg.target_modules}: {e}") from e
    if cfg.grad_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    if cfg.compile:
        print(f"[finetune] compiled {compile_layers(model)} decoder layers", flush=True)
    return peft_model


def setup_data(tokenizer, rows: list[dict], template: str, max_len: int) -> list[Example]:
    return [encode(tokenizer, render(template, row), max_len) for row in rows]


def run_record(cfg: FinetuneCfg, seed: int, template: str, dtype: str, base_sha256: str, data_sha256: str) -> dict:
    """Everything that decides the adapter's weights: a checkpoint resumes only a run with the same record."""
    settings = {k: v for k, v in as_dict(cfg).items() if k not in ("checkpoint_every", "log_every")}
    return settings | {
        "seed": seed,
        "template": template,
        "dtype": dtype,
        "base_sha256": base_sha256,
        "data_sha256": data_sha256,
        "processes": world_size(),
    }


def save_adapter(model, out_dir: Path, run: dict, result: TrainResult, **extra) -> None:
    """The adapter (PEFT format) and its provenance: the run record, the result and `extra`."""
    from quantorder.provenance import library_versions

    model.save_pretrained(out_dir)
    write_json(out_dir / PROVENANCE_FILE, {**extra, **run, "result": asdict(result), "versions": library_versions()})


def _batches(n_examples: int, batch_size: int, seed: int):
    """Endless stream of index batches: a new seeded shuffle every epoch."""
    rng, epoch = random.Random(seed), []
    while True:
        if len(epoch) < batch_size:
            order = list(range(n_examples))
            rng.shuffle(order)
            epoch += order
        yield epoch[:batch_size]
        epoch = epoch[batch_size:]


def batch_order(n_examples: int, batch_size: int, seed: int, n_batches: int) -> list[list[int]]:
    """The first `n_batches` index batches that training with this seed draws."""
    return list(itertools.islice(_batches(n_examples, batch_size, seed), n_batches))


def mean_loss(model, examples: list[Example], pad_id: int, batch_size: int, device: torch.device) -> float:
    """Token-weighted mean loss of `model` over `examples` (no gradients)."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(examples[i : i + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, n = token_nll(logits, batch["labels"])
            total, count = total + nll.sum().item(), count + n.sum().item()
    return total / max(count, 1)


def train_loop(
    model,
    train: list[Example],
    val: list[Example],
    cfg: FinetuneCfg,
    pad_id: int,
    seed: int,
    log_path: Path,
    checkpoint: Checkpointer | None = None,
) -> TrainResult:
    """AdamW with linear warmup and cosine decay for `cfg.max_steps` optimizer steps.

    Prints one line per `cfg.log_every` steps and appends the same numbers to `log_path` (JSONL).
    With a `checkpoint`, saves the run's state every `checkpoint.every` steps and first resumes from
    the last one saved; the resumed run takes exactly the steps the uninterrupted one would.
    Under torchrun the model trains data-parallel (DDP): each optimizer step draws the same
    `cfg.grad_accum` micro-batches as one process would, and process r takes every W-th of them;
    the losses, tokens and gradients are summed over the processes, so the step is the same.
    """
    from torch.nn.parallel import DistributedDataParallel
    from transformers import get_cosine_schedule_with_warmup

    device = next(model.parameters()).device
    world, me = world_size(), rank()
    if cfg.grad_accum % world:
        raise UserError(f"finetune.grad_accum={cfg.grad_accum}: must be a multiple of the {world} processes")
    local_accum = cfg.grad_accum // world
    # the frozen (possibly int-packed) base is loaded identically everywhere: only adapters sync
    ddp = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(trainable.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    batches = _batches(len(train), cfg.batch_size, seed)
    # Mixed precision on CUDA, as transformers' Trainer does: PEFT keeps the adapters in float32, and
    # autocast runs their matmuls (and saves their activations) in the half-precision base's dtype.
    half = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)
    autocast = torch.autocast(device.type, dtype=half, enabled=device.type == "cuda" and half != torch.float32)
    first_step, tokens, done_seconds, loss_value, records = 1, 0, 0.0, float("nan"), []
    if checkpoint and (state := checkpoint.load()):
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(state["adapter"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"][me], device)
        for _ in range(state["step"] * cfg.grad_accum):  # the batches the finished steps drew
            next(batches)
        first_step, tokens, done_seconds = state["step"] + 1, state["tokens"], state["seconds"]
        loss_value, records = state["loss"], state["log"]
        if me == 0:
            print(f"[finetune] resuming after step {state['step']} from {checkpoint.path}", flush=True)
    reset_peak_memory(device)
    start, window_tokens, window_start = time.perf_counter() - done_seconds, 0, time.perf_counter()
    model.train()
    with log_path.open("w") as log:
        log.writelines(json.dumps(r) + "\n" for r in records)
        for step in range(first_step, cfg.max_steps + 1):
            mine = [next(batches) for _ in range(cfg.grad_accum)][me::world]
            # the loss adds up on the device (in float64, as Python would): reading it back once a
            # step, not once a micro-batch, lets the host queue the next micro-batch's kernels early
            step_loss, step_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
            for j, indices in enumerate(mine):
                batch = pad_batch([train[i] for i in indices], pad_id)
                step_tokens += int(batch["attention_mask"].sum())
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                # gradients are all-reduced once per step, after this process's last micro-batch
                sync = world == 1 or j == local_accum - 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with autocast:
                        loss = ddp(**batch).loss / local_accum
                    loss.backward()
                step_loss += loss.detach().double() / world
            step_loss, step_tokens = all_sum([step_loss.item(), step_tokens], device)
            tokens, window_tokens = tokens + step_tokens, window_tokens + step_tokens
            if not math.isfinite(step_loss):
                raise UserError(f"training loss became {step_loss} at step {step}; lower finetune.lr={cfg.lr}")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = step_loss
            if me == 0 and (step % cfg.log_every == 0 or step == cfg.max_steps):
                now = time.perf_counter()
                record = {
                    "step": step,
                    "loss": round(loss_value, 6),
                    "lr": schedule.get_last_lr()[0],
                    "tokens_per_s": round(window_tokens / (now - window_start), 1),
                    "seconds": round(now - start, 3),
                    "peak_mem_gb": round(peak_memory_bytes(device) / 2**30, 3),
                }
                print(
                    f"step {step}/{cfg.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                    f"tok/s {record['tokens_per_s']:.0f} | peak_mem {record['peak_mem_gb']:.2f} GB",
                    flush=True,
                )
                log.write(json.dumps(record) + "\n")
                records.append(record)
                window_tokens, window_start = 0, now
            if checkpoint and checkpoint.due(step, cfg.max_steps):
                rngs = all_gather(rng_state(device))  # each process's dropout stream
                if me == 0:
                    checkpoint.save(
                        {
                            "step": step,
                            "adapter": {name: p.detach() for name, p in trainable.items()},
                            "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(),
                            "rng": rngs,
                            "tokens": tokens,
                            "seconds": time.perf_counter() - start,
                            "loss": loss_value,
                            "log": records,
                        }
                    )
    seconds = time.perf_counter() - start
    val_loss = mean_loss(model, val, pad_id, cfg.batch_size, device)
    return TrainResult(
        steps=cfg.max_steps,
        final_loss=loss_value,
        val_loss=val_loss,
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in model.parameters()),
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        peak_mem_bytes=peak_memory_bytes(device),
        processes=world,
    )
