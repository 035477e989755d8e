"""Benchmark scripts start and finish on a CPU with a tiny model (their numbers come from a GPU host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import ROOT
from .project import env, make_project


def test_finetune_throughput_benchmark_compares_the_same_training(tmp_path):
    out = tmp_path / "finetune.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/finetune_throughput.py"), "--model", "tiny", "--steps", "4"]
    args = ["--seq-len", "32", "--set", "batch_size=8", "--out", str(out)]
    subprocess.run([*cmd, *args], check=True, capture_output=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    base, ours = result["runs"]["baseline"], result["runs"]["quantorder"]
    assert len(base["losses"]) == len(ours["losses"]) == 4
    # same init, same examples in the same order, same effective batch: the same loss curve on a CPU,
    # also in micro-batches of 8 (x 2 accumulation) instead of the preset's 4 x 4
    assert result["max_loss_gap"] < 1e-3 and base["losses"][0] > 5.0
    assert result["runs"]["quantorder[batch_size=8]"]["max_loss_gap"] < 1e-3
    assert base["tokens_per_s"] > 0 and ours["tokens_per_s"] > 0 and result["speedup"] > 0
    assert result["flops_per_token"] > 4 * 100_000  # 4 x the tiny model's linear weights, at least


def test_finetune_throughput_benchmark_profiles_the_preset(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks/finetune_throughput.py"), "--model", "tiny", "--steps", "2"]
    cmd += ["--seq-len", "32", "--profile"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path)
    table = out.stdout.split("quantorder:\n", 1)[1]
    assert "Self CPU" in table and "aten::mm" in table and "baseline" not in out.stdout


def test_eval_throughput_benchmark_matches_the_naive_loop(tmp_path):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/eval_throughput.py"), "--model", "tiny", "--n", "12"]
    subprocess.run([*cmd, "--seq-len", "48", "--batch-size", "4", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["rows"] == 12 and result["tokens"] > 12 * 10
    assert result["ppl_rel_diff"] < 1e-4 and result["naive"]["ppl"] > 1.0
    assert result["speedup"] > 0 and result["quantorder"]["tokens_per_s"] > 0


def test_quantize_overhead_benchmark_times_both_runs(tmp_path):
    out = tmp_path / "quantize.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/quantize_overhead.py"), "--model", "tiny", "--algo", "gptq"]
    args = ["--n-samples", "8", "--seq-len", "32", "--work", str(tmp_path), "--out", str(out)]
    subprocess.run([*cmd, *args], check=True, capture_output=True, cwd=tmp_path)  # GPTQModel writes ./logs/
    result = json.loads(out.read_text())
    assert result["algo"]["name"] == "gptq" and result["calibration"] == {"n_samples": 8, "seq_len": 32}
    assert result["seconds"]["quantorder"] > 0 and result["seconds"]["minimal"] > 0
    ratio = result["seconds"]["quantorder"] / result["seconds"]["minimal"]
    assert abs(result["overhead"] - (ratio - 1)) < 0.05  # seconds are rounded to 10 ms


def test_finetune_scaling_benchmark_runs_one_and_two_processes(tmp_path):
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/finetune_scaling.py"), "--model", "tiny", "--devices", "1", "2"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    args = ["--steps", "4", "--seq-len", "32", "--out", str(out)]
    subprocess.run([*cmd, *args], check=True, capture_output=True, env=env)
    result = json.loads(out.read_text())
    assert [result["runs"][n]["processes"] for n in ("1", "2")] == [1, 2]
    assert len(result["runs"]["2"]["losses"]) == 4 and result["scaling"]["1"] == 1.0
    # the same micro-batches split over two gloo processes: the same loss curve on a CPU
    assert result["max_loss_gap"]["2"] < 1e-4 and result["runs"]["1"]["losses"][0] > 5.0


def test_ordering_cost_benchmark_trains_every_ordering_from_the_same_start(tmp_path):
    out = tmp_path / "cost.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/ordering_cost.py"), "--model", "tiny", "--algos", "rtn"]
    args = ["--steps", "4", "--seq-len", "32", "--finetune", "lora-cpu", "--out", str(out)]
    subprocess.run([*cmd, *args], check=True, capture_output=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"ft", "q_ft rtn", "q_ft rtn loftq", "q_ft rtn qalora", "qat rtn merged", "qat rtn base"}
    assert all(len(r["losses"]) == 4 and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["ft"]["throughput_vs_ft"] == 1.0 and result["quantize_s"]["rtn"] > 0
    before, after = rows["q_ft rtn loftq"]["prepared"]  # LoftQ's measured error, before and after
    assert after < before
    assert rows["qat rtn merged"]["prepared"] == rows["qat rtn base"]["prepared"] == 14  # adapted layers


def test_decode_rate_leaves_out_the_prompt_and_refuses_a_rate_below_the_noise(monkeypatch):
    import pytest

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import variants

    clock = [0.0]  # a clock that only the fake generate() moves: exact timings
    monkeypatch.setattr(variants.time, "perf_counter", lambda: clock[0])

    def generate(n: int, prompt_s: float = 0.060, token_s: float = 0.005) -> None:
        clock[0] += prompt_s + token_s * (n - 1)  # the prompt and first token, then each further token

    # 4 sequences x 8 tokens in 40 ms: 800 tokens/s (with the prompt counted it would read 320)
    assert variants.decode_rate(generate, batch=4, new_tokens=8, repeats=3) == pytest.approx(800)
    with pytest.raises(SystemExit, match="took no measurable time beyond the noise"):  # decoding costs nothing
        variants.decode_rate(lambda n: generate(n, token_s=0.0), batch=1, new_tokens=8, repeats=3)


def test_compiled_decoding_with_a_static_cache_gives_the_eager_tokens(monkeypatch, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import variants

    # dynamo's tracing and the static cache as on a GPU, without inductor's code generation (slow on a CPU)
    monkeypatch.setattr(variants, "CompileConfig", lambda: CompileConfig(backend="eager", mode=None))
    torch._dynamo.reset()  # no compiled code or spent recompile budget left by earlier tests in this process
    monkeypatch.setattr(torch._dynamo.config, "disable", False)  # loading GPTQ on a CPU turns torch.compile off
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = ["def f(x):\n    return", "Q: what does sympify do?\nA:"]
    with torch.no_grad():
        eager = variants.generation(model, tokenizer, prompts, batch=2, new_tokens=12)(12)
        compiled = variants.generation(model, tokenizer, prompts, batch=2, new_tokens=12, compiled=True)
        breaks_before, graphs_before = variants.graph_breaks(), variants.compiled_graphs()
        with variants.compile_any_format(model):
            first, again = compiled(12), compiled(12)  # the second run starts from the reset cache
    assert eager.shape == (2, first.shape[1]) and eager.shape[1] > 12
    assert torch.equal(first, eager) and torch.equal(again, eager)
    assert variants.compiled_graphs() == graphs_before + 1  # decoding ran compiled: one graph
    assert variants.graph_breaks() == breaks_before  # and no break in it


def test_linear_kernels_table_sums_the_layer_and_the_script_needs_cuda(monkeypatch):
    import pytest

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import linear_kernels

    row = {"module": "m", "kernel": "K", "in": 8, "out": 8, "quantized_eager_us": 1.0, "bf16_eager_us": 1.0}
    linears = [row | {"quantized_graph_us": q, "bf16_graph_us": b} for q, b in ((10.0, 30.0), (30.0, 10.0))]
    table = linear_kernels.markdown({"device": "D", "variant": "base_q", "layer": 0, "batch": 1, "linears": linears})
    assert "| 3.00x |" in table and "| 0.33x |" in table and "| **layer** | | | 40.0 | 40.0 | **1.00x** |" in table
    monkeypatch.setattr(linear_kernels.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["linear_kernels.py"])
    with pytest.raises(SystemExit, match="error: benchmarks/linear_kernels.py times CUDA kernels"):
        linear_kernels.main()


def test_variants_benchmark_runs_tinygemm_on_merged_gptq_format_variants_only(monkeypatch, capsys):
    import pytest

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)  # the project's params.yaml: algo rtn, GPTQ-format
    import variants

    monkeypatch.setattr(sys, "argv", ["variants.py", "--int4-kernel", "tinygemm", "--variants", "base_q", "q_ft"])
    with pytest.raises(SystemExit):
        variants.main()
    assert "--int4-kernel tinygemm: q_ft decode through an adapter; merged variants only" in capsys.readouterr().err


def test_dvc_overhead_benchmark_splits_the_wall_time_and_finds_no_second_copy(tmp_path):
    project, out = make_project(tmp_path / "project"), tmp_path / "dvc.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/dvc_overhead.py"), "-S", "+experiment=tiny", "prepare", "calibrate"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, cwd=project, env=env())
    result = json.loads(out.read_text())
    assert set(result["stages_s"]) == {"prepare", "calibrate"} and min(result["stages_s"].values()) > 0.5
    assert 0 < result["stage_s"] < result["wall_s"]
    assert abs(result["dvc_s"] + result["stage_s"] - result["wall_s"]) < 0.2
    weights = (project / "models/base/model.safetensors").stat().st_size
    assert result["models_bytes"] >= weights > 0 and result["peak_disk_bytes"] >= weights
    # the outputs are hard links into DVC's cache: the cache holds no second copy of them
    assert result["cache_beyond_workspace_bytes"] < 0.1 * result["models_bytes"]


def test_dvc_hashing_benchmark_times_each_case(tmp_path):
    out = tmp_path / "hashing.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/dvc_hashing.py"), "--gb", "0.25", "--shard-mb", "64"]
    subprocess.run([*cmd, "--repeats", "1", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    cases = ["one file, checksum_jobs default", "4 shards, checksum_jobs default"]
    cases += ["one file, checksum_jobs 16", "4 shards, checksum_jobs 16"]  # the project's .dvc/config
    assert sorted(result["dvc_seconds"]) == sorted(cases) and min(result["dvc_seconds"].values()) > 0
