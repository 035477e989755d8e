"""Bad models, data and runtime conditions: one clear line naming the bad value, exit code 2 from a
stage, and nothing half-written left behind. (Config keys and values: tests/test_config.py.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from quantorder.calibration import draw_windows
from quantorder.config import DataCfg, FinetuneCfg, RTNCfg
from quantorder.data import build_splits, read_jsonl
from quantorder.errors import UserError
from quantorder.finetune import setup_data, setup_model, train_loop
from quantorder.io import atomic_dir
from quantorder.models import check_seq_len, load_tokenizer, resolve_device
from quantorder.quantize import load_model
from quantorder.quantize.rtn import RTNQuantizer
from quantorder.stage import run_stage

from .conftest import TEMPLATE, sympy_calib

CPU = torch.device("cpu")
ROW = {"programming_language": "Python", "prompt": "What does f do?", "response": "It adds one."}


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


# --- a missing or corrupt model dir


def test_truncated_weights(tiny_dir, tmp_path):
    broken = _copy(tiny_dir, tmp_path)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line_error(lambda: load_model(broken, "float32", CPU), rf"model dir {broken} is incomplete or corrupt")


def test_missing_weights(tiny_dir, tmp_path):
    broken = _copy(tiny_dir, tmp_path)
    (broken / "model.safetensors").unlink()
    _one_line_error(lambda: load_model(broken, "float32", CPU), r"incomplete or corrupt \(.*model.safetensors")


def test_weights_missing_from_the_checkpoint(tiny_dir, tmp_path):
    """A checkpoint lacking tensors of its architecture (another layout, a botched export) would
    load with those layers randomly initialized: refused, naming one."""
    from safetensors.torch import load_file, save_file

    broken = _copy(tiny_dir, tmp_path)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(lambda: load_model(broken, "float32", CPU), r"lacks 1 weights .*layers.1.mlp.up_proj.weight")


def test_missing_tokenizer(tiny_dir, tmp_path):
    broken = _copy(tiny_dir, tmp_path)
    for f in broken.glob("tokenizer*"):
        f.unlink()
    _one_line_error(lambda: load_tokenizer(broken), rf"model dir {broken} is incomplete or corrupt")


def test_missing_model_dir(tmp_path):
    _one_line_error(lambda: load_model(tmp_path / "absent", "float32", CPU), r"absent has no config.json; rerun")


def test_sequence_longer_than_the_model_allows(tiny_dir):
    _one_line_error(
        lambda: check_seq_len(tiny_dir, 4096, "finetune.max_seq_len"),
        rf"finetune.max_seq_len=4096: the model in {tiny_dir} allows at most 1024 tokens",
    )
    check_seq_len(tiny_dir, 1024, "finetune.max_seq_len")  # the limit itself is fine


# --- datasets


def _data(path: Path, n: int = 12, **kw) -> DataCfg:
    return DataCfg(
        name="rows", source="jsonl", path=str(path), template=TEMPLATE, n_train=n - 4, n_val=2, n_test=2, **kw
    )


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(lambda: build_splits(_data(empty)), r"data 'rows' has 0 distinct rows, fewer than .*=12")


def test_repeated_rows_are_dropped_and_too_few_distinct_ones_refused(tmp_path):
    repeats = _jsonl(tmp_path / "repeats.jsonl", [ROW] * 20)
    _one_line_error(lambda: build_splits(_data(repeats)), r"data 'rows' has 1 distinct rows, fewer than")
    rows = [{**ROW, "prompt": f"q{i}"} for i in range(12)]
    splits, source = build_splits(_data(_jsonl(tmp_path / "some.jsonl", rows + rows[:5])))
    assert source["repeated_rows_dropped"] == 5 and source["rows_available"] == 12
    prompts = [r["prompt"] for split in splits.values() for r in split]
    assert sorted(prompts) == sorted(r["prompt"] for r in rows)  # no row in two splits


def test_line_that_is_not_json_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROW) + "\n{broken\n")
    _one_line_error(lambda: read_jsonl(bad), rf"{bad}:2: not valid JSON")


def test_line_that_is_not_an_object_is_named(tmp_path):
    bad = tmp_path / "list.jsonl"
    bad.write_text("[1, 2]\n")
    _one_line_error(lambda: read_jsonl(bad), rf"{bad}:1: expected a JSON object per line, got list")


def test_template_naming_an_absent_column(tmp_path):
    rows = _jsonl(tmp_path / "rows.jsonl", [{**ROW, "prompt": f"q{i}"} for i in range(12)])
    cfg = _data(rows)
    cfg.template = "{question} -> {response}"
    _one_line_error(lambda: build_splits(cfg), r"data.template names column\(s\) question absent from 'rows'")


# --- calibration, training, quantization, devices


def test_calibration_text_smaller_than_asked(tiny_dir):
    cfg = sympy_calib(n_samples=50, seq_len=64)
    _one_line_error(
        lambda: draw_windows(load_tokenizer(tiny_dir), "too short a text " * 20, cfg),
        r"calib.n_samples=50: the 'docs' text holds only \d+ windows of calib.seq_len=64 tokens",
    )


def test_diverging_training_stops_at_once(tiny_dir, qa_rows, tmp_path):
    cfg = FinetuneCfg(r=4, alpha=8, lr=1e6, batch_size=2, max_steps=30, warmup_steps=0, max_seq_len=64, dropout=0.0)
    tok = load_tokenizer(tiny_dir)
    train = setup_data(tok, qa_rows[:8], TEMPLATE, cfg.max_seq_len)
    model = setup_model(load_model(tiny_dir, "float32", CPU), cfg, 0)
    message = _one_line_error(
        lambda: train_loop(model, train, train, cfg, tok.pad_token_id, 0, tmp_path / "log.jsonl"),
        r"training loss became (nan|inf) at step \d+; lower finetune.lr=1000000.0",
    )
    assert int(message.split("at step ")[1].split(";")[0]) < 30  # it stopped, not finished


def test_group_size_that_does_not_divide_a_layer(tiny_dir):
    quantizer = RTNQuantizer(RTNCfg(name="rtn", bits=4, group_size=512, sym=True))
    _one_line_error(
        lambda: quantizer.check(load_model(tiny_dir, "float32", CPU)),
        r"algo.group_size=512 does not divide the input width 128 of model.layers.0.self_attn.q_proj",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_cuda_demanded_without_a_gpu():
    _one_line_error(lambda: resolve_device("cuda"), r"model.device=cuda but no CUDA GPU is visible")


# --- the stage contract: exit code 2, one line, nothing half-written


def _stage_exit(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run_stage(main)
    return info.value.code, capsys.readouterr().err


def test_full_disk_while_saving_keeps_the_previous_output(tmp_path, capsys):
    out = tmp_path / "models" / "adapter"
    out.mkdir(parents=True)
    (out / "weights").write_text("the previous, complete output")

    def main() -> str:
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "weights"))

    code, err = _stage_exit(main, capsys)
    assert code == 2 and "Traceback" not in err
    written = out.parent / f".adapter.tmp-{os.getpid()}" / "weights"
    assert err.strip() == f"error: no space left on the device writing {written}; free space and rerun"
    assert (out / "weights").read_text() == "the previous, complete output"
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # the temporary dir is gone


def test_user_error_in_a_stage_is_one_line_and_exit_code_2(tmp_path, capsys):
    out = tmp_path / "metrics"

    def main() -> str:
        with atomic_dir(out):
            raise UserError("eval.batch_size=0: must be > 0")

    code, err = _stage_exit(main, capsys)
    assert (code, err) == (2, "error: eval.batch_size=0: must be > 0\n")
    assert not out.exists() and not list(tmp_path.iterdir())
