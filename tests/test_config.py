"""Every shipped config composes and validates; every validation rule rejects with its message."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantorder.cli import compose
from quantorder.config import load_config, parse_config
from quantorder.errors import ConfigError, UserError

from .conftest import ROOT

CONF = ROOT / "conf"
GROUPS = ["model", "data", "calib", "algo", "finetune", "eval"]


def _compose(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "params.yaml"
    compose(list(overrides), conf_dir=CONF, out=out)
    return yaml.safe_load(out.read_text())


@pytest.fixture(scope="module")
def default_params(tmp_path_factory) -> dict:
    return _compose(tmp_path_factory.mktemp("conf"))


def test_committed_params_yaml_matches_conf(default_params):
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == default_params, "params.yaml is stale: run `quantorder compose`"


@pytest.mark.parametrize("group,choice", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_choice_composes_and_validates(tmp_path, group, choice):
    overrides = [f"{group}={choice}"]
    if (group, choice) == ("data", "jsonl"):
        overrides.append("data.path=/data/rows.jsonl")
    params = _compose(tmp_path, *overrides)  # compose validates the result
    chosen = yaml.safe_load((CONF / group / f"{choice}.yaml").read_text())
    if group in ("finetune", "eval"):
        assert params[group] == chosen
    else:
        assert params[group]["name"] == chosen["name"] == choice


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_and_validates(tmp_path, preset):
    params = _compose(tmp_path, f"+experiment={preset}")
    if preset.startswith("olive"):
        effective_batch = params["finetune"]["batch_size"] * params["finetune"]["grad_accum"]
        assert effective_batch == 16 and params["finetune"]["max_steps"] == 100
        assert params["finetune"]["max_seq_len"] == 1024 and params["model"]["dtype"] == "bfloat16"
        assert params["data"]["name"] == "tiny-codes" and params["calib"]["name"] == "wikitext2"
        assert params["calib"]["n_samples"] == 128


def test_group_size_follows_the_model(tmp_path):
    assert _compose(tmp_path)["algo"]["group_size"] == 64  # SmolLM2 is stored on a g32 grid
    assert _compose(tmp_path, "model=tiny")["algo"]["group_size"] == 32
    assert _compose(tmp_path, "model=phi-3.5-mini")["algo"]["group_size"] == 128
    assert _compose(tmp_path, "algo.group_size=128")["algo"]["group_size"] == 128  # explicit override wins


@pytest.mark.parametrize(
    "override,message",
    [
        ("algo=gtpq", "algo/gtpq"),
        ("algo.gropu_size=64", "gropu_size"),
        ("model=phi4", "model/phi4"),
    ],
)
def test_compose_rejects_unknown_choice_or_key_in_one_line(tmp_path, override, message):
    with pytest.raises(UserError, match=message) as info:
        _compose(tmp_path, override)
    assert "\n" not in str(info.value)
    if override.startswith("algo="):
        assert "rtn" in str(info.value)  # the allowed choices are listed


def _mutated(default_params: dict, path: str, value) -> dict:
    params = copy.deepcopy(default_params)
    *parents, key = path.split(".")
    node = params
    for p in parents:
        node = node[p]
    node[key] = value
    return params


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("algo.bits", 5, r"algo.bits=5: allowed for rtn: 2, 3, 4, 8"),
        ("algo.group_size", 0, r"algo.group_size=0: must be -1 or a power of two"),
        ("algo.group_size", 48, r"algo.group_size=48"),
        (
            "algo.name",
            "gtpq",
            r"algo.name='gtpq': unknown algorithm \(allowed: awq, fp4, fp8, gguf, gptq, int8-bnb, int8-d",
        ),
        ("algo.gropu_size", 64, r"algo.gropu_size: unknown key \(known: name, bits, group_size, sym, dynamic\)"),
        ("finetune.lr", -1e-4, r"finetune.lr=-0.0001: must be > 0"),
        ("finetune.r", 0, r"finetune.r=0: must be > 0"),
        ("finetune.max_steps", "ten", r"finetune.max_steps='ten': expected an integer"),
        ("finetune.dropout", 1.5, r"finetune.dropout=1.5: must be in \[0, 1\)"),
        ("finetune.target_modules", [], r"finetune.target_modules: must name at least one module"),
        ("finetune.devices", -1, r"finetune.devices=-1: must be >= 0 \(0: every visible GPU\)"),
        ("qat.weight", "lora", r"qat.weight='lora': allowed: merged, base"),
        ("qlora.init", "pissa", r"qlora.init='pissa': allowed: default, loftq"),
        ("eval.max_seq_len", 4, r"eval.max_seq_len=4: must be >= 8"),
        ("eval.answer_only", "yes", r"eval.answer_only='yes': expected bool"),
        ("model.dtype", "int8", r"model.dtype='int8': allowed: bfloat16, float16, float32"),
        ("model.source", "hub", r"model.source=hub needs model.hub_id"),
        ("model.source", "random", r"model.source=random needs model.architecture with a model_type"),
        ("model.architecture", [4096], r"model.architecture=\[4096\]: expected dict"),
        ("data.package_version", None, r"data.source=package needs data.package and data.package_version"),
        ("data.source", "jsonl", r"data.source=jsonl needs data.path"),
        ("data.n_test", 0, r"data.n_test=0: must be > 0"),
        ("calib.n_samples", -3, r"calib.n_samples=-3: must be > 0"),
        ("seed", 1.5, r"seed=1.5: expected an integer"),
        ("modle", {}, r"modle: unknown section"),
    ],
)
def test_validation_names_the_bad_value_and_what_is_allowed(default_params, path, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(_mutated(default_params, path, value))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "algo,qlora,message",
    [
        ({"name": "awq"}, {"qalora": True}, r"qalora=true with algo=awq: QA-LoRA needs a GPTQ-format base \(rtn, gptq"),
        ({"name": "nf4"}, {"qalora": True}, r"with algo=nf4: QA-LoRA needs a GPTQ-format base"),
        ({"name": "rtn", "group_size": -1}, {"qalora": True}, r"group_size=-1: QA-LoRA pools over quantization groups"),
        ({"name": "gptq", "desc_act": True}, {"qalora": True}, r"desc_act=true: act-order groups are not contiguous"),
        ({"name": "gptq"}, {"qalora": True, "init": "loftq"}, r"qlora.init=loftq with qlora.qalora=true: .*one"),
    ],
)
def test_qlora_options_the_base_cannot_take_fail_at_validation(default_params, algo, qlora, message):
    params = copy.deepcopy(default_params) | {"algo": algo, "qlora": qlora}
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(params)
    assert "\n" not in str(info.value)


def test_qalora_is_valid_on_gptq_format_bases(default_params):
    for algo in ({"name": "rtn", "group_size": 64}, {"name": "gptq", "desc_act": False}):
        assert parse_config(default_params | {"algo": algo, "qlora": {"qalora": True}}).qlora.qalora


def test_all_problems_are_reported_together(default_params):
    params = _mutated(_mutated(default_params, "algo.bits", 5), "finetune.lr", 0)
    with pytest.raises(ConfigError) as info:
        parse_config(params)
    assert "algo.bits=5" in str(info.value) and "finetune.lr=0" in str(info.value)


def test_answer_only_needs_the_answer_marker_in_the_template(default_params):
    params = _mutated(_mutated(default_params, "eval.answer_only", True), "data.template", "Q: {prompt}\nA: {response}")
    with pytest.raises(ConfigError) as info:
        parse_config(params)
    message = str(info.value)
    assert "\n" not in message and "eval.answer_only=true needs data.template to contain '### Answer:'" in message
    assert "'Q: {prompt}\\nA: {response}'" in message
    assert parse_config(_mutated(default_params, "eval.answer_only", True)).eval.answer_only  # the shipped template


def test_validating_params_is_a_leaf_that_loads_neither_torch_nor_a_backend():
    """config.py imports no other quantorder module but errors, and validating params.yaml stays light."""
    source = (ROOT / "src/quantorder/config.py").read_text()
    imported = {
        line.split()[1] for line in source.splitlines() if line.startswith(("from quantorder", "import quantorder"))
    }
    assert imported == {"quantorder.errors"}
    code = (
        "import sys; from quantorder.config import load_config; load_config(sys.argv[1]); "
        "heavy = {'torch', 'gptqmodel', 'transformers', 'quantorder.quantize'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT / "params.yaml")], check=True)
    cli = subprocess.run([sys.executable, "-m", "quantorder", "validate"], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0 and cli.stdout.strip() == "params.yaml is valid"


def test_algo_label_and_digest_tell_every_setting_apart():
    gptq = parse_config(
        yaml.safe_load((ROOT / "params.yaml").read_text()) | {"algo": {"name": "gptq", "group_size": 64}}
    )
    assert gptq.algo.label == "gptq 4-bit g64"
    act = parse_config(
        yaml.safe_load((ROOT / "params.yaml").read_text())
        | {"algo": {"name": "gptq", "group_size": 64, "desc_act": True}}
    )
    assert act.algo.label == "gptq 4-bit g64 desc_act=True" and act.algo.digest != gptq.algo.digest


def test_load_config_reads_the_committed_params():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.algo.name == "rtn" and cfg.model.source == "package"


def test_missing_params_file_says_how_to_make_it(tmp_path):
    with pytest.raises(ConfigError, match="quantorder compose"):
        load_config(tmp_path / "params.yaml")


@pytest.mark.parametrize("model,billions", [("llama-3.1-8b", 8.030), ("phi-3.5-mini", 3.821)])
def test_hub_models_architectures_have_the_hub_checkpoints_sizes(tmp_path, model, billions):
    """`model.source=random` on a hub model's config builds a model of that checkpoint's shape."""
    import torch

    from quantorder.models import random_model, train_tokenizer

    cfg = parse_config(_compose(tmp_path, f"model={model}", "model.source=random"))
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 4, 1000)
    meta = random_model(cfg.model.architecture, tok, seed=0, dtype=torch.bfloat16, device=torch.device("meta"))
    assert round(sum(p.numel() for p in meta.parameters()) / 1e9, 3) == billions


@pytest.mark.parametrize("preset", ["olive-llama31-8b", "olive-phi35"])
def test_olive_presets_adapt_every_linear_layer_of_their_model(tmp_path, preset):
    """The study trains LoRA on all linear layers; Phi-3 names them differently (fused qkv_proj)."""
    import torch

    from quantorder.finetune import check_target_modules
    from quantorder.models import random_model, train_tokenizer

    cfg = parse_config(_compose(tmp_path, f"+experiment={preset}", "model.source=random"))
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 4, 1000)
    meta = random_model(cfg.model.architecture, tok, seed=0, dtype=torch.bfloat16, device=torch.device("meta"))
    check_target_modules(meta, cfg.finetune.target_modules)
    linear = {n.rsplit(".", 1)[-1] for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear - {"lm_head"} == set(cfg.finetune.target_modules)
    if preset == "olive-phi35":  # Llama's names would train o_proj and down_proj alone: refused
        llama_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        with pytest.raises(UserError, match=r"q_proj, k_proj, v_proj, gate_proj, up_proj not in this model"):
            check_target_modules(meta, llama_names)
