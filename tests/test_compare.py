"""`quantorder compare`: experiments from `dvc exp show --json`, aggregated over seeds, with winners."""

from __future__ import annotations

import json

import pytest

from quantorder.compare import from_exp_show, grid, pareto, winners, write
from quantorder.errors import UserError
from quantorder.variants import VARIANTS

# perplexities per algorithm; seed s adds 0.1 * s to every variant (ft too)
PPL = {
    "gptq 4-bit g64": {
        "base": 14.0, "base_q": 15.5, "ft": 7.0, "ft_q": 8.2, "ft_merge_q": 8.3, "q_ft": 7.6,
        "q_ft_merge_q": 12.0, "q_ft_fmerge": 7.3, "q_ft_fmerge_q": 8.0, "qat_merge_q": 7.9,
    },
    "rtn 4-bit g64": {
        "base": 14.0, "base_q": 18.0, "ft": 7.0, "ft_q": 10.5, "ft_merge_q": 10.9, "q_ft": 8.5,
        "q_ft_merge_q": 18.0, "q_ft_fmerge": 7.4, "q_ft_fmerge_q": 11.0, "qat_merge_q": 10.8,
    },
}  # fmt: skip


def _rev(name: str, algo: str, seed: int, ppl: dict | None = None, **settings) -> dict:
    ppl = ppl or {v: p + 0.1 * seed for v, p in PPL[algo].items()}
    params = {"name": algo.split()[0], "bits": 4, "group_size": 64, **settings}
    return {
        "rev": "f" * 40,
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": {"seed": seed, "algo": params}}},
            "metrics": {"metrics/summary.json": {"data": {"algo": algo, "ppl": ppl, "gap_to_ft_significant": {}}}},
        },
    }


def _show(*revs: dict, workspace: dict | None = None) -> list[dict]:
    return [
        workspace or {"rev": "workspace", "data": {}},
        {"rev": "a" * 40, "experiments": [{"revs": [r]} for r in revs]},
    ]


def test_grid_aggregates_seeds_and_names_the_winners(tmp_path):
    revs = [_rev(f"e{a[:1]}{s}", a, s) for a in PPL for s in (0, 1, 2)]
    unfinished = _rev("broken", "gptq 4-bit g64", 3, ppl={"base": 14.0})
    experiments = from_exp_show(_show(*revs, unfinished))
    assert len(experiments) == 6  # the unfinished one is left out
    cells = grid(experiments)
    q_ft = cells["gptq 4-bit g64"]["q_ft"]
    assert q_ft.seeds == [0, 1, 2] and q_ft.ppl == pytest.approx([7.6, 7.7, 7.8])
    assert q_ft.mean == pytest.approx(7.7) and q_ft.sd == pytest.approx(0.1)
    low, high = q_ft.gap_ci95()
    assert low < 100 * (7.7 / 7.1 - 1) < high
    wins = winners(cells)
    assert wins["order"]["gptq 4-bit g64"] == {
        "best": "q_ft",
        "mean_ppl": pytest.approx(7.7),
        "every_seed": True,
        "seeds": [0, 1, 2],
    }
    assert wins["algorithm"]["q_ft"]["best"] == "gptq 4-bit g64" and wins["algorithm"]["q_ft"]["every_seed"]

    data, files = write(experiments, tmp_path)
    assert [f.name for f in files] == ["grid.json", "grid.md", "grid.png"] and all(f.stat().st_size for f in files)
    table = files[1].read_text()
    assert (
        table.count("| gptq 4-bit g64 |") == len(VARIANTS) and "| rtn 4-bit g64 | `q_ft` | 3 | 8.600 | 0.100 |" in table
    )
    assert "`q_ft` is the best quantized variant" in data["verdict"] and "in all 3 seeds" in data["verdict"]
    assert "For `q_ft`, gptq 4-bit g64 has the lowest perplexity (7.700; rtn 4-bit g64 8.600)" in data["verdict"]
    assert json.loads(files[0].read_text())["winners"]["order"]["rtn 4-bit g64"]["best"] == "q_ft"
    # the merge base as a factor: the q_ft adapter folded into the float base vs the dequantized one
    assert (
        "Merge base, float (`q_ft_fmerge_q`) or dequantized (`q_ft_merge_q`): gptq 4-bit g64: `q_ft_fmerge_q` "
        "(8.100 vs 12.100; float base lower in 3/3 seeds)" in data["verdict"]
    )


def test_a_conclusion_that_flips_between_seeds_is_flagged():
    flipped = {**PPL["gptq 4-bit g64"], "ft_q": 7.5}  # seed 1: quantizing after fine-tuning wins
    cells = grid(from_exp_show(_show(_rev("a", "gptq 4-bit g64", 0), _rev("b", "gptq 4-bit g64", 1, flipped))))
    order = winners(cells)["order"]["gptq 4-bit g64"]
    assert order["best"] == "q_ft" and not order["every_seed"]


def test_the_workspace_counts_once_and_no_results_is_an_error(tmp_path):
    same = _rev("e1", "rtn 4-bit g64", 0)
    assert [e.name for e in from_exp_show(_show(same, workspace=_rev("workspace", "rtn 4-bit g64", 0)))] == ["e1"]
    with pytest.raises(UserError, match="no finished experiment"):
        write(from_exp_show(_show()), tmp_path)


def test_a_sweep_over_any_algo_setting_keeps_one_row_per_config():
    """Experiments are told apart by their whole algo config, not by a label of a few settings."""
    plain = _rev("plain", "gptq 4-bit g64", 0)
    act_order = _rev("act", "gptq 4-bit g64", 0, ppl={**PPL["gptq 4-bit g64"], "base_q": 15.0}, desc_act=True)
    experiments = from_exp_show(_show(plain, act_order))
    assert len({e.algo_id for e in experiments}) == 2
    cells = grid(experiments)
    assert sorted(cells) == ["gptq 4-bit g64", "gptq 4-bit g64 desc_act=True"]
    assert cells["gptq 4-bit g64 desc_act=True"]["base_q"].ppl == [15.0]
    assert cells["gptq 4-bit g64"]["base_q"].ppl == [15.5]


def test_experiments_that_differ_in_another_setting_are_rows_of_their_own():
    """`-S qlora.init=loftq` on the same algo and seed is another recipe, not another seed or a rerun."""
    rows = []
    for init, shift in (("default", 0.0), ("loftq", -0.3)):
        for seed in (0, 1):
            rev = _rev(f"{init}{seed}", "rtn 4-bit g64", seed)
            rev["data"]["metrics"]["metrics/summary.json"]["data"]["ppl"]["q_ft"] += shift
            params = rev["data"]["params"]["params.yaml"]["data"]
            params |= {"qlora": {"init": init}, "tracking": {"enabled": seed == 0}}
            rows.append(rev)
    show = _show(*rows)
    show[1]["data"] = {"params": {"params.yaml": {"data": {"seed": 0, "qlora": {"init": "default"}}}}}  # the commit
    cells = grid(from_exp_show(show))
    # labelled with what each changed from its commit (as `dvc exp show --only-changed`); tracking makes no row
    assert sorted(cells) == ["rtn 4-bit g64", "rtn 4-bit g64 qlora.init=loftq"]
    assert cells["rtn 4-bit g64 qlora.init=loftq"]["q_ft"].ppl == pytest.approx([8.2, 8.3])
    assert cells["rtn 4-bit g64"]["q_ft"].ppl == pytest.approx([8.5, 8.6])


def test_an_na_variant_has_no_cell_and_no_win(tmp_path):
    """A variant the algorithm cannot make is listed as n/a, never as a number."""
    ppl = {v: p for v, p in PPL["rtn 4-bit g64"].items() if v != "q_ft"}
    rev = _rev("na", "rtn 4-bit g64", 0, ppl=ppl)
    rev["data"]["metrics"]["metrics/summary.json"]["data"]["na"] = {"q_ft": "cannot train on this format"}
    cells = grid(from_exp_show(_show(rev)))
    assert "q_ft" not in cells["rtn 4-bit g64"] and "q_ft_merge_q" in cells["rtn 4-bit g64"]
    assert winners(cells)["order"]["rtn 4-bit g64"]["best"] == "ft_q"
    data, files = write(from_exp_show(_show(rev)), tmp_path)
    assert "| rtn 4-bit g64 | `q_ft` | - | n/a |" in files[1].read_text()


def test_compare_reads_a_saved_exp_show_from_another_host(tmp_path, monkeypatch, capsys):
    """`dvc exp show --json` saved on a GPU host, compared where the project is: same grid as the library's."""
    from quantorder.cli import main

    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps(_show(_rev("a", "gptq 4-bit g64", 0), _rev("b", "gptq 4-bit g64", 1))))
    monkeypatch.chdir(tmp_path)
    main(["compare", "--no-mlflow", "--exp-show", str(saved), "--out", "grid"])
    data = json.loads((tmp_path / "grid/grid.json").read_text())
    assert data["experiments"] == ["a", "b"]
    assert data["grid"]["gptq 4-bit g64"]["q_ft"]["ppl"] == pytest.approx([7.6, 7.7])
    assert data["verdict"] in capsys.readouterr().out
    saved.write_text("{not json")
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--no-mlflow", "--exp-show", str(saved)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --exp-show {saved}: not a readable `dvc exp show --json` output")


def _summary(ppl: dict, size: dict, speed: dict, ci: dict, served: dict | None = None) -> dict:
    return {
        "ppl": ppl,
        "size_mib": size,
        "eval_tokens_per_s": speed,
        "gap_to_ft_ci95_pct": {v: {"low": low, "high": high} for v, (low, high) in ci.items()},
        "serving_runtime": served or {},
    }


def _as_dvc_reads(summary: dict) -> dict:
    """A summary.json as `dvc exp show` reports it: DVC keeps numbers, strings and dicts of them."""
    from dvc.repo.metrics.show import _extract_metrics

    return _extract_metrics(summary, "metrics/summary.json")


def test_pareto_front_counts_a_quality_difference_only_where_the_intervals_separate():
    """One seed each, so the intervals are the summaries' own (paired bootstrap over examples)."""
    # by default a variant is as large and fast as ft and clearly worse: dominated by ft
    ppl = {v: 7.7 for v in VARIANTS} | {"ft": 7.0, "q_ft": 7.2, "ft_q": 7.5, "ft_merge_q": 7.45, "qat_merge_q": 7.6}
    size = {v: 100.0 for v in VARIANTS} | {"ft_q": 30.0, "ft_merge_q": 30.0, "qat_merge_q": 30.0, "q_ft": 32.0}
    speed = {v: 1000.0 for v in VARIANTS} | {"ft_merge_q": 1050.0, "qat_merge_q": 2000.0}
    ci = {v: [9.5, 10.5] for v in VARIANTS if v != "ft"} | {
        "q_ft": [2.0, 3.7],  # wholly below ft_q's: better quality, but larger
        "ft_q": [6.0, 8.0],
        "ft_merge_q": [5.9, 7.9],  # overlaps ft_q's: a tie; as large, 5% faster: within the tolerance
        "qat_merge_q": [7.5, 9.5],  # overlaps both, as large, twice as fast: dominates them
    }
    summary = _summary(ppl, size, speed, ci)
    rev = _rev("e0", "gptq 4-bit g64", 0, ppl=ppl)
    rev["data"]["metrics"]["metrics/summary.json"]["data"] |= _as_dvc_reads(summary)
    cells = grid(from_exp_show(_show(rev)))
    front = pareto(cells)
    on_front = {p["variant"] for p in front["front"]}
    assert on_front == {"ft", "q_ft", "qat_merge_q"}
    by = {p["variant"]: p["dominated_by"] for p in front["dominated"]}
    assert by["ft_q"] == by["ft_merge_q"] == "`qat_merge_q` (gptq 4-bit g64)"
    assert by["q_ft_fmerge"] == "`ft` (float)"  # float, as large as ft and no better
    ft = next(p for p in front["front"] if p["variant"] == "ft")
    assert ft["gap_ci95_pct"] == (0.0, 0.0) and ft["runtime"] == "transformers"
    # the same grid with qat_merge_q's interval wholly above ft_q's: now ft_q is better in quality
    intervals = rev["data"]["metrics"]["metrics/summary.json"]["data"]["gap_to_ft_ci95_pct"]
    intervals["qat_merge_q"] = {"low": 8.1, "high": 9.9}
    cells = grid(from_exp_show(_show(rev)))
    assert {"ft_q", "ft_merge_q", "qat_merge_q"} <= {p["variant"] for p in pareto(cells)["front"]}


def test_pareto_front_reads_the_serving_runtimes_speed_and_is_in_the_table(tmp_path):
    ppl = PPL["gptq 4-bit g64"]
    size = {v: 100.0 for v in VARIANTS} | {v: 25.0 for v in ("base_q", "ft_q", "ft_merge_q", "q_ft_fmerge_q")}
    speed = {v: 500.0 for v in VARIANTS}
    ci = {v: [100 * (p / 7.0 - 1) - 0.5, 100 * (p / 7.0 - 1) + 0.5] for v, p in ppl.items() if v != "ft"}
    served = {"ft_q": {"runtime": "llama.cpp", "eval_tokens_per_s": 3000.0}}
    rev = _rev("e0", "gptq 4-bit g64", 0, ppl=ppl)
    rev["data"]["metrics"]["metrics/summary.json"]["data"] |= _as_dvc_reads(_summary(ppl, size, speed, ci, served))
    data, files = write(from_exp_show(_show(rev)), tmp_path)
    front = {p["variant"]: p for p in data["pareto"]["front"]}
    assert front["ft_q"]["runtime"] == "llama.cpp" and front["ft_q"]["tokens_per_s"] == 3000.0
    assert "q_ft_fmerge_q" in front  # better quality than ft_q at the same size, though slower
    assert "On the Pareto front of quality, size and speed: `ft` (float)" in data["verdict"]
    table = files[1].read_text()
    assert "## Pareto front: quality, size, speed" in table
    assert "| gptq 4-bit g64 | `ft_q` | +17.14% | [+16.64%, +17.64%] | 25.0 | 3000 (llama.cpp) |" in table


def test_bit_sweep_draws_a_line_per_ordering_across_widths(tmp_path):
    """rtn at 2, 3, 4 and 8 bits (one seed each): per ordering, the gap to ft by stored bits per weight."""
    revs = []
    for bits, gap in ((2, 3.0), (3, 0.6), (4, 0.2), (8, 0.01)):
        ppl = {v: 7.0 * (1 + gap) if v != "ft" else 7.0 for v in VARIANTS}
        ppl["q_ft"] = 7.0 * (1 + gap / 2)  # the ordering effect grows as the bits fall
        rev = _rev(f"b{bits}", "rtn 4-bit g64", 0, ppl=ppl, bits=bits)
        linear_bits = {v: bits + 0.5 for v in VARIANTS if v not in ("base", "ft", "q_ft_fmerge")}
        rev["data"]["metrics"]["metrics/summary.json"]["data"] |= {
            "size_mib": {v: 10.0 * bits for v in VARIANTS},
            "eval_tokens_per_s": {v: 100.0 for v in VARIANTS},
            "linear_bits_per_weight": linear_bits,
        }
        revs.append(rev)
    data, files = write(from_exp_show(_show(*revs)), tmp_path)
    sweep = data["bit_sweep"]
    assert list(sweep) == ["rtn g64"]  # one config, four widths
    assert [b for b, _ in sweep["rtn g64"]["q_ft"]] == [2.5, 3.5, 4.5, 8.5]
    assert [round(g, 1) for _, g in sweep["rtn g64"]["q_ft"]] == [150.0, 30.0, 10.0, 0.5]
    assert [round(g, 1) for _, g in sweep["rtn g64"]["ft_q"]] == [300.0, 60.0, 20.0, 1.0]
    assert "q_ft_fmerge" not in sweep["rtn g64"]  # a float variant has no bits
    assert files[-1].name == "bits.png" and files[-1].stat().st_size > 10_000
    assert "![gap to ft against bits per weight](bits.png)" in files[1].read_text()
