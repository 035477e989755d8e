"""llama.cpp GGUF: the checkpoint is llama.cpp's own conversion and quantization, the weights every
stage reads are the ones llama.cpp computes with (same logits), the stored bits are the file's,
and bad types or an interrupted quantization leave nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from quantorder import llama_cpp_runtime as runtime
from quantorder.cli import compose
from quantorder.config import EvalCfg, GGUFCfg
from quantorder.errors import ConfigError, UserError
from quantorder.evaluate import examples_of, perplexity, runtime_perplexity
from quantorder.layout import ADAPTERS_DIR, BASE_DIR, QA_DIR, QUANTIZED_DIR
from quantorder.models import random_model
from quantorder.quantize import bits_per_weight, load_dequantized, load_model, method_of
from quantorder.quantize.gguf import GGUF_FILE, GGUFQuantizer, tensor_types

from ..conftest import LORA_TARGETS, ROOT, TEMPLATE

CPU = torch.device("cpu")
SMOLLM2 = yaml.safe_load((ROOT / "conf/model/smollm2-135m.yaml").read_text())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """The tiny random Llama with SmolLM2's tokenizer: llama.cpp's converter recognizes only the
    pre-tokenizers of published models, not the tiny model's own."""
    from transformers import AutoTokenizer

    from quantorder.models import _package_dir

    tok = AutoTokenizer.from_pretrained(_package_dir(SMOLLM2["package"]), gguf_file=SMOLLM2["gguf_file"])
    arch = yaml.safe_load((ROOT / "conf/model/tiny.yaml").read_text())["architecture"] | {"vocab_size": len(tok)}
    out = tmp_path_factory.mktemp("llama")
    model = random_model(arch, tok, seed=0, dtype=torch.float32, device=CPU)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def q4km_dir(tmp_path_factory, llama_dir):
    out = tmp_path_factory.mktemp("q4km")
    GGUFQuantizer(GGUFCfg(name="gguf", type="Q4_K_M")).quantize(llama_dir, None, out, "float32")
    return out


@pytest.fixture(scope="module")
def q4km_adapter(tmp_path_factory, q4km_dir):
    """A LoRA adapter trained (here: random, non-zero B) on the GGUF's dequantized weights, as q_ft's is."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("q4km_adapter")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(load_model(q4km_dir, "float32", CPU), lora).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def q4km_model(q4km_dir):
    """The evaluator's model of the Q4_K_M checkpoint, loaded once for the tests that only read it."""
    return load_model(q4km_dir, "float32", CPU)


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
    return float(np.mean(lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]))


def test_transformers_reads_the_weights_llama_cpp_computes_with(q4km_dir, q4km_model, llama_dir):
    """The evaluator's model (transformers, GGUF dequantized) and llama.cpp give the same logits on
    the same tokens: max difference 0.012 measured here (llama.cpp rounds activations to f16 / q8),
    negative log-likelihood within 1e-4 relative."""
    from transformers import AutoTokenizer

    assert method_of(q4km_dir) is GGUFQuantizer
    ids = AutoTokenizer.from_pretrained(llama_dir)("def area(r):\n    return sympy.pi * r**2\n" * 4)["input_ids"]
    with torch.no_grad():
        ours = q4km_model(torch.tensor([ids])).logits[0].numpy()
    theirs = runtime.logits(q4km_dir / GGUF_FILE, ids, threads=2)
    assert np.abs(ours - theirs).max() < 0.03
    assert _nll(ours, ids) == pytest.approx(_nll(theirs, ids), rel=1e-4)
    with torch.no_grad():  # llama.cpp computes with the quantized weights, not the float ones
        floats = load_model(llama_dir, "float32", CPU)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).mean() < 0.5 * np.abs(floats - theirs).mean()


# llama.cpp computes with f16 activations and rounds them to 8 bits for the k-quant dot products;
# on the tiny model in float32 its perplexity stays within this of the evaluator's, LoRA or not
PPL_RTOL = 1e-3


@pytest.mark.parametrize("with_adapter", [False, True], ids=["gguf", "gguf+lora"])
def test_llama_cpp_scores_the_evaluators_perplexity_on_the_same_tokens(
    q4km_dir, q4km_model, q4km_adapter, qa_rows, with_adapter
):
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter = q4km_adapter if with_adapter else None
    cfg, rows = EvalCfg(max_seq_len=96, batch_size=4), qa_rows[:8]
    # PEFT wraps the layers of the model it is given: the adapter gets a fresh load
    model = PeftModel.from_pretrained(load_model(q4km_dir, "float32", CPU), adapter) if adapter else q4km_model
    tokenizer = AutoTokenizer.from_pretrained(q4km_dir)
    ours = perplexity(model, tokenizer, rows, TEMPLATE, cfg)
    examples = examples_of(tokenizer, rows, TEMPLATE, cfg)
    with GGUFQuantizer.serve(q4km_dir, adapter, n_ctx=cfg.max_seq_len, threads=2) as session:
        theirs = runtime_perplexity(session, examples, "llama.cpp")
    assert theirs.n_tokens == ours.n_tokens > 8 * 30
    assert theirs.ppl == pytest.approx(ours.ppl, rel=PPL_RTOL)
    gap = max(abs(a - b) / n for (n, a), (_, b) in zip(ours.per_example, theirs.per_example))
    assert gap < 5e-3  # every example's mean NLL per token, not only the corpus total
    if adapter:  # the LoRA is applied: without it llama.cpp scores another model
        with GGUFQuantizer.serve(q4km_dir, None, n_ctx=cfg.max_seq_len, threads=2) as session:
            bare = runtime_perplexity(session, examples, "llama.cpp")
        assert max(abs(a - b) / n for (n, a), (_, b) in zip(ours.per_example, bare.per_example)) > 5 * gap


def test_llama_cpp_greedy_decoding_continues_as_transformers_does(q4km_dir, q4km_adapter):
    from peft import PeftModel

    prompts = [[1, 504, 3371, 28, 2580], [1, 2000, 77, 12, 9, 431, 80, 5]]
    model = PeftModel.from_pretrained(load_model(q4km_dir, "float32", CPU), q4km_adapter)
    with torch.no_grad():
        ours = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p) :] for p in prompts]
    with GGUFQuantizer.serve(q4km_dir, q4km_adapter, n_ctx=16, n_seq=2, threads=2) as session:
        assert session.greedy(prompts, 6) == [o.tolist() for o in ours]  # both sequences decoded together
        with pytest.raises(ValueError, match="3 prompts: this session holds 2 sequences"):
            session.greedy(prompts + prompts[:1], 1)


@pytest.fixture(scope="module")
def gguf_project(tmp_path_factory, llama_dir, q4km_dir, q4km_adapter, qa_rows):
    """A project whose pipeline ran to base_q and the ft adapter with algo=gguf (the tiny model's own
    tokenizer is not one llama.cpp's converter knows, so the DVC pipeline tests cannot make it)."""
    project = tmp_path_factory.mktemp("gguf_project")
    shutil.copytree(ROOT / "conf", project / "conf")
    compose(["+experiment=tiny", "algo=gguf", "eval.max_seq_len=96"], project / "conf", project / "params.yaml")
    (project / QA_DIR).mkdir(parents=True)
    (project / QA_DIR / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows[:8]))
    (project / QA_DIR / "manifest.json").write_text(json.dumps({"sha256": "data"}))
    made = {BASE_DIR: llama_dir, QUANTIZED_DIR / "base_q": q4km_dir, ADAPTERS_DIR / "ft": q4km_adapter}
    for path, src in made.items():
        shutil.copytree(src, project / path)
    provenance = {"sha256": "base", "seed": 0, "source": {"parameters": 10**6}, "algo": {"name": "gguf"}}
    for path in made:
        (project / path / "quantorder.json").write_text(json.dumps(provenance))
    return project


def test_evaluate_records_the_perplexity_llama_cpp_computes(gguf_project):
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages/evaluate.py"), "ft_q"], cwd=gguf_project, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((gguf_project / "metrics/eval/ft_q.json").read_text())
    served = metrics["serving_runtime"]
    assert served["runtime"] == "llama.cpp" and "llama.cpp b9371" in served["version"]
    assert served["ppl"] == pytest.approx(metrics["ppl"], rel=PPL_RTOL) and served["ppl"] != metrics["ppl"]
    assert abs(served["ppl_rel_diff"]) < PPL_RTOL and served["max_example_nll_per_token_diff"] < 5e-3
    assert f"llama.cpp ppl {served['ppl']:.4f}" in done.stdout


def test_variants_benchmark_decodes_in_llama_cpp_beside_transformers(gguf_project, tmp_path):
    out = tmp_path / "variants.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/variants.py"), "--new-tokens", "64", "--repeats", "3"]
    cmd += ["--batch-sizes", "1", "3", "--variants", "ft_q", "--out", str(out)]
    done = subprocess.run(cmd, cwd=gguf_project, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    for name, r in results["variants"].items():  # base: from its 16-bit conversion; ft_q: the GGUF plus a GGUF LoRA
        assert r["served"]["runtime"] == "llama.cpp", name
        assert set(r["served"]["decode_tokens_per_s"]) == set(r["decode_tokens_per_s"]) == {"1", "3"}
        assert min(r["served"]["decode_tokens_per_s"].values()) > 0
    assert results["algo"] == "gguf Q4_K_M"
    assert "llama.cpp tok/s b1 (vs base 16-bit)" in out.with_suffix(".md").read_text()


def test_the_checkpoint_records_llama_cpps_own_type_mix_and_bits(q4km_dir, q4km_model):
    types = tensor_types(q4km_dir / GGUF_FILE)
    provenance = json.loads((q4km_dir / "config.json").read_text())["quantization_config"]
    assert provenance == {"quant_method": "gguf", "type": "Q4_K_M", "gguf_file": GGUF_FILE}
    # Q4_K_M's mix: Q4_K where the width is a multiple of 256 (down_proj here), a Q6_K for some
    # attn_v / ffn_down, a legacy fallback for the 128-wide inputs
    assert {"Q4_K", "Q6_K"} <= {t for t, _ in types.values()}
    assert types["blk.0.attn_q.weight"][0] in ("Q5_0", "Q4_0", "Q5_1", "Q8_0")
    model = q4km_model
    layers = [m for m in model.modules() if GGUFQuantizer.is_quantized_linear(m)]
    assert len(layers) == 2 * 7  # every projection of both blocks; the tied embedding/head is not counted
    stored = sum(types[k][1] for k in types if k.startswith("blk.") and not k.endswith("norm.weight"))
    weights = sum(m.in_features * m.out_features for m in layers)
    assert bits_per_weight(q4km_dir, model) == pytest.approx(8 * stored / weights)
    assert 4.5 < bits_per_weight(q4km_dir, model) < 8.5


def test_dequantized_model_is_the_evaluated_one(q4km_dir, q4km_model):
    plain = load_dequantized(q4km_dir, "float32", CPU)
    for (name, a), (_, b) in zip(q4km_model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_configured_type_is_the_files_type(tmp_path, llama_dir):
    """algo.type reaches llama-quantize: Q8_0 stores every projection as Q8_0 (norms stay F32)."""
    GGUFQuantizer(GGUFCfg(name="gguf", type="Q8_0")).quantize(llama_dir, None, tmp_path, "float32")
    assert {t for t, _ in tensor_types(tmp_path / GGUF_FILE).values()} == {"Q8_0", "F32"}


def test_an_interrupted_quantization_leaves_no_file(tmp_path, llama_dir, monkeypatch):
    def killed(src, dst, type_name, threads=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime, "quantize", killed)
    with pytest.raises(KeyboardInterrupt):
        GGUFQuantizer(GGUFCfg(name="gguf")).quantize(llama_dir, None, tmp_path / "q", "float32")
    assert not (tmp_path / "q" / GGUF_FILE).exists() and not list(tmp_path.rglob("*.partial"))


def test_a_tokenizer_llama_cpp_does_not_know_is_one_line(tmp_path, tiny_dir):
    with pytest.raises(UserError, match=r"llama.cpp's converter does not recognize .* pre-tokenizer") as info:
        GGUFQuantizer(GGUFCfg(name="gguf")).quantize(tiny_dir, None, tmp_path, "float32")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"type": "Q9_K"}, r"algo.type='Q9_K': unknown GGUF type \(allowed: Q2_K, .*Q4_K_M.*Q8_0\)"),
        ({"type": "IQ2_XS"}, r"algo.type=IQ2_XS: llama.cpp makes it only with an importance matrix"),
        ({"type": "Q4_K_M", "bits": 8}, r"algo.bits=8: algo.type=Q4_K_M stores 4 bits"),
        ({"type": "Q8_0", "group_size": 64}, r"algo.group_size=64: algo.type=Q8_0 has blocks of 32"),
    ],
)
def test_bad_gguf_settings_fail_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        GGUFCfg(name="gguf", **settings)
    assert "\n" not in str(info.value)


def test_the_type_sets_bits_block_and_label():
    cfg = GGUFCfg(name="gguf", type="Q5_K_M")
    assert (cfg.bits, cfg.group_size, cfg.label) == (5, 256, "gguf Q5_K_M")
    assert GGUFCfg(name="gguf", type="Q8_0").digest != GGUFCfg(name="gguf", type="Q4_0").digest


def test_only_the_quantization_aware_chain_is_na():
    from quantorder.availability import na_reason, users
    from quantorder.layout import ADAPTERS_DIR, QUANTIZED_DIR

    unsupported = GGUFQuantizer(GGUFCfg(name="gguf")).unsupported_variants()
    assert "per tensor" in na_reason([], users(ADAPTERS_DIR / "qat"), unsupported)
    for artifact in (ADAPTERS_DIR / "q_ft", QUANTIZED_DIR / "base_q", QUANTIZED_DIR / "q_ft_fmerge_q"):
        assert na_reason([], users(artifact), unsupported) is None
