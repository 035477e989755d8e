"""LoRA training: loss falls, logs are parseable, runs are reproducible, the quantized base stays frozen."""

from __future__ import annotations

import json

import pytest
import torch

from quantorder.checkpoint import Checkpointer
from quantorder.config import FinetuneCfg, RTNCfg
from quantorder.finetune import mean_loss, setup_data, setup_model, train_loop
from quantorder.models import load_tokenizer
from quantorder.qat import apply_qat
from quantorder.qlora import loftq_init
from quantorder.quantize import load_model
from quantorder.quantize.rtn import RTNQuantizer

from .conftest import TEMPLATE

CPU = torch.device("cpu")


def _train(model_dir, rows, tmp_path, seed=0, steps=30, **settings):
    """Train on 8 examples; return the model, the result (val loss on the same 8), the log, the loss before."""
    cfg = FinetuneCfg(
        r=8, alpha=16, lr=1e-2, batch_size=4, max_steps=steps, warmup_steps=1, max_seq_len=64,
        **{"log_every": 10, "dropout": 0.0, **settings},
    )  # fmt: skip
    tok = load_tokenizer(model_dir)
    train = setup_data(tok, rows[:8], TEMPLATE, cfg.max_seq_len)
    model = setup_model(load_model(model_dir, "float32", CPU), cfg, seed)
    before = mean_loss(model, train, tok.pad_token_id, 4, CPU)
    log = tmp_path / f"log-{seed}-{len(list(tmp_path.iterdir()))}.jsonl"
    result = train_loop(model, train, train, cfg, tok.pad_token_id, seed, log)
    return model, result, [json.loads(line) for line in log.read_text().splitlines()], before


def test_loss_falls_and_log_has_one_line_per_interval(tiny_dir, qa_rows, tmp_path, capsys):
    _, result, records, before = _train(tiny_dir, qa_rows, tmp_path)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert result.val_loss < before - 0.5
    assert {"loss", "lr", "tokens_per_s", "peak_mem_gb"} <= set(records[0])
    assert capsys.readouterr().out.count("step ") == 3
    # LoRA r=8 on 7 projections of 2 layers: r * (in + out) each
    shapes = [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256), (256, 128)]
    assert result.trainable_params == 2 * sum(8 * (i + o) for i, o in shapes)


def test_same_seed_same_losses(tiny_dir, qa_rows, tmp_path):
    _, _, a, _ = _train(tiny_dir, qa_rows, tmp_path, steps=6)
    _, _, b, _ = _train(tiny_dir, qa_rows, tmp_path, steps=6)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_compiled_layers_train_as_eager_ones(tiny_dir, qa_rows, tmp_path, capsys):
    eager, _, a, _ = _train(tiny_dir, qa_rows, tmp_path, steps=6, dropout=0.1, log_every=1)
    compiled, _, b, _ = _train(tiny_dir, qa_rows, tmp_path, steps=6, dropout=0.1, log_every=1, compile=True)
    assert "compiled 2 decoder layers" in capsys.readouterr().out
    layers = compiled.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    # the same dropout masks and arithmetic, fused: losses and adapter weights agree to float32
    # rounding (Inductor's own dropout masks would move the losses by 1e-4)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("base", ["rtn_dir", "awq_dir"])
def test_training_on_quantized_base_keeps_it_frozen(request, base, qa_rows, tmp_path):
    base_dir = request.getfixturevalue(base)
    frozen = {n: b.clone() for n, b in load_model(base_dir, "float32", CPU).named_buffers() if n.endswith("qweight")}
    assert frozen
    model, result, _, before = _train(base_dir, qa_rows, tmp_path)
    after = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): b
        for n, b in model.named_buffers()
        if n.endswith("qweight")
    }
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert result.val_loss < before - 0.5


def test_unknown_target_module_is_a_clear_error(tiny_dir):
    from quantorder.errors import UserError

    with pytest.raises(UserError, match=r"finetune.target_modules=\['qkv_proj'\]"):
        setup_model(load_model(tiny_dir, "float32", CPU), FinetuneCfg(target_modules=["qkv_proj"]), 0)
    # PEFT's own matching: a dotted suffix names a module too
    model = setup_model(load_model(tiny_dir, "float32", CPU), FinetuneCfg(target_modules=["mlp.down_proj"]), 0)
    assert {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n} == {"down_proj"}


class _KilledAfterSaving(Checkpointer):
    """Stands for a kill: the run dies right after writing its first checkpoint."""

    def save(self, state: dict) -> None:
        super().save(state)
        raise KeyboardInterrupt


# plain LoRA; LoRA trained against RTN's grid (qat); on the RTN base, started by LoftQ or as QA-LoRA
@pytest.mark.parametrize("kind", ["lora", "qat", "loftq", "qalora"])
def test_resumed_run_ends_exactly_where_an_uninterrupted_one_does(kind, tiny_dir, rtn_dir, qa_rows, tmp_path, capsys):
    # dropout on and 2-step accumulation: the resume must restore the random stream and the batch order
    cfg = FinetuneCfg(
        r=4,
        alpha=8,
        lr=1e-2,
        batch_size=2,
        grad_accum=2,
        max_steps=9,
        warmup_steps=2,
        max_seq_len=64,
        log_every=2,
        dropout=0.1,
    )
    tok = load_tokenizer(tiny_dir)
    train = setup_data(tok, qa_rows[:12], TEMPLATE, cfg.max_seq_len)

    base = rtn_dir if kind in ("loftq", "qalora") else tiny_dir
    options = {"use_qalora": True, "qalora_group_size": 32} if kind == "qalora" else {}

    def run(checkpoint, log):
        model = setup_model(load_model(base, "float32", CPU), cfg, seed=3, **options)
        if kind == "qat":
            apply_qat(model, RTNQuantizer(RTNCfg(name="rtn", group_size=32)), "merged")
        if kind == "loftq":
            loftq_init(model, tiny_dir, RTNQuantizer)
        result = train_loop(model, train, train[:4], cfg, tok.pad_token_id, 3, tmp_path / log, checkpoint)
        return result, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    clean, clean_weights = run(None, "clean.jsonl")
    folder = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(_KilledAfterSaving(folder, 4, "run-a"), "killed.jsonl")
    assert torch.load(folder / "state.pt", weights_only=False)["step"] == 4
    capsys.readouterr()

    resumed, resumed_weights = run(Checkpointer(folder, 4, "run-a"), "resumed.jsonl")
    assert "resuming after step 4" in capsys.readouterr().out
    assert (resumed.final_loss, resumed.val_loss) == (clean.final_loss, clean.val_loss)
    assert all(torch.equal(clean_weights[n], resumed_weights[n]) for n in clean_weights)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert logged == [json.loads(line)["loss"] for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert (folder / "state.pt").is_file()  # the stage clears it once the adapter is saved, not the loop


def test_checkpoint_of_other_inputs_is_not_resumed(tiny_dir, qa_rows, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    Checkpointer(folder, 2, "run-a").save({"step": 2})
    assert Checkpointer(folder, 2, "run-b").load() is None
    assert "made with other inputs" in capsys.readouterr().out
    assert Checkpointer(folder, 2, "run-a").load()["step"] == 2
