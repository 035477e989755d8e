"""`quantorder compare`: every DVC experiment of the project in one grid (algorithm x variant x
seed), aggregated across seeds, with the Olive study's chart and the answer to its two questions.

The source is `dvc exp show --json` (each experiment's params.yaml and metrics/summary.json), so
the grid covers whatever `dvc exp run` / `dvc exp run --queue` produced, MLflow or not.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from quantorder.config import algo_digest, algo_identity
from quantorder.errors import UserError
from quantorder.io import write_text
from quantorder.tracking import flatten
from quantorder.variants import (
    BASELINE,
    COMPARED,
    FINETUNED_FIRST,
    QUANTIZED_VARIANTS,
    TARGET,
    VARIANTS,
    merge_base_pairs,
)

NOT_A_SETTING = ("seed", "tracking", "algo")  # seeds are aggregated; tracking changes no number; algo has its label


@dataclass
class Experiment:
    name: str
    algo: str  # the row's label: the algo's (e.g. "gptq 4-bit g64 desc_act=True") + other settings changed
    algo_id: str  # digest of the whole algo config, then of the other differing settings: rows are grouped by it
    seed: int
    ppl: dict[str, float]  # variants the algorithm cannot make (n/a) are absent
    settings: dict[str, str]  # every other params.yaml setting, flattened: "qlora.init" -> "loftq"
    baseline: dict[str, str]  # the same, of the commit the experiment was run from
    cost: dict[str, Cost] = dataclasses.field(default_factory=dict)  # per variant, where the summary has it


@dataclass
class Cost:
    """What a variant costs to serve, and its own interval of the gap to ft (paired bootstrap over
    the test examples), from one experiment's summary."""

    size_mib: float
    tokens_per_s: float  # scoring throughput in `runtime` on the machine that evaluated it
    runtime: str
    gap_ci95_pct: tuple[float, float] | None
    linear_bits: float | None  # stored bits per weight of the quantized linear layers; None: float


def _costs(summary: dict) -> dict[str, Cost]:
    """Cost per variant of a metrics/summary.json (none for summaries older than these fields)."""
    served = summary.get("serving_runtime") or {}
    intervals = summary.get("gap_to_ft_ci95_pct") or {}
    return {
        v: Cost(
            size,
            served[v]["eval_tokens_per_s"] if v in served else summary["eval_tokens_per_s"][v],
            served[v]["runtime"] if v in served else "transformers",
            (intervals[v]["low"], intervals[v]["high"]) if v in intervals else (0.0, 0.0) if v == TARGET else None,
            (summary.get("linear_bits_per_weight") or {}).get(v),
        )
        for v, size in (summary.get("size_mib") or {}).items()
        if v in (summary.get("eval_tokens_per_s") or {})
    }


def _params(entry: dict) -> dict:
    return (((entry.get("data") or {}).get("params") or {}).get("params.yaml") or {}).get("data") or {}


def _settings(params: dict) -> dict[str, str]:
    """The settings of a params.yaml but NOT_A_SETTING, as dotted keys with JSON values."""
    return {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in flatten(params).items()
        if k.split(".")[0] not in NOT_A_SETTING
    }


def _tell_apart(experiments: list[Experiment]) -> None:
    """Experiments of one algo config that differ in another setting (`-S qlora.init=loftq`, a
    fine-tune setting, a model) become rows of their own, labelled with the settings they changed
    from their baseline commit (as `dvc exp show --only-changed`)."""
    keys = sorted({k for e in experiments for k in e.settings})
    differing = [k for k in keys if len({e.settings.get(k) for e in experiments}) > 1]
    for e in experiments:
        if differing:
            changed = [k for k in differing if e.settings.get(k) != e.baseline.get(k)]
            e.algo = " ".join([e.algo, *(f"{k}={e.settings.get(k)}" for k in changed)])
            e.algo_id = algo_digest({"algo": e.algo_id, **{k: e.settings.get(k) for k in differing}})


def from_exp_show(show: list[dict]) -> list[Experiment]:
    """The experiments (and the workspace, if it has results) in `dvc exp show --json` output."""
    found: dict[str, Experiment] = {}
    entries = [
        (rev.get("name") or rev["rev"][:7], rev, _params(baseline))
        for baseline in show[1:]
        for exp in baseline.get("experiments") or []
        for rev in exp["revs"]
    ]
    # the workspace counts only if no experiment has its results
    entries += [("workspace", show[0], _params(show[1]) if len(show) > 1 else {})] if show else []
    for name, entry, baseline in entries:
        data = entry.get("data") or {}
        summary = ((data.get("metrics") or {}).get("metrics/summary.json") or {}).get("data")
        params = _params(entry)
        done = {**(summary or {}).get("ppl", {}), **(summary or {}).get("na", {})}
        if not all(v in done for v in VARIANTS):
            continue  # a failed or unfinished experiment
        algo_id, label = algo_identity(params["algo"]) if "algo" in params else (summary["algo"], summary["algo"])
        seed, settings = int(params.get("seed", 0)), _settings(params)
        exp = Experiment(name, label, algo_id, seed, summary["ppl"], settings, _settings(baseline), _costs(summary))
        found.setdefault(f"{exp.algo_id}|{exp.seed}|{json.dumps(exp.ppl, sort_keys=True)}", exp)
    experiments = list(found.values())
    _tell_apart(experiments)
    return experiments


def dvc_experiments(root: Path) -> list[Experiment]:
    """The finished experiments of the DVC project at `root`."""
    done = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"`dvc exp show` failed in {root}: {done.stderr.strip().splitlines()[-1:]}")
    return from_exp_show(json.loads(done.stdout))


def saved_experiments(path: Path) -> list[Experiment]:
    """The finished experiments in `dvc exp show --json` output saved to `path`."""
    try:
        return from_exp_show(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--exp-show {path}: not a readable `dvc exp show --json` output ({e})") from e


@dataclass
class Cell:
    """One algorithm x variant across seeds."""

    seeds: list[int]
    ppl: list[float]
    gap_pct: list[float]  # to the same seed's ft
    costs: list[Cost] = dataclasses.field(default_factory=list)  # per seed; empty if a summary lacks them

    @property
    def mean(self) -> float:
        return statistics.fmean(self.ppl)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.ppl) if len(self.ppl) > 1 else 0.0

    def gap_ci95(self) -> tuple[float, float] | None:
        """Student-t 95% interval of the mean gap to ft across seeds (None for one seed)."""
        if len(self.gap_pct) < 2:
            return None
        from scipy import stats

        mean, sem = statistics.fmean(self.gap_pct), statistics.stdev(self.gap_pct) / len(self.gap_pct) ** 0.5
        half = stats.t.ppf(0.975, len(self.gap_pct) - 1) * sem
        return (mean - half, mean + half)


def grid(experiments: list[Experiment]) -> dict[str, dict[str, Cell]]:
    """algo label -> variant -> Cell, seeds in ascending order (one experiment per seed: the latest wins).

    Experiments are grouped by their whole algo config; two configs that share a label (possible
    only for experiments of an older schema) get their digests appended. n/a variants have no cell.
    """
    by_algo: dict[str, dict[int, Experiment]] = defaultdict(dict)
    for exp in experiments:
        by_algo[exp.algo_id][exp.seed] = exp
    labels = {algo_id: next(iter(per_seed.values())).algo for algo_id, per_seed in by_algo.items()}
    shared = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    labels = {i: f"{label} [{i}]" if label in shared else label for i, label in labels.items()}
    out: dict[str, dict[str, Cell]] = {}
    for algo_id, per_seed in sorted(by_algo.items(), key=lambda item: labels[item[0]]):
        seeds = sorted(per_seed)
        out[labels[algo_id]] = {
            v: Cell(
                seeds=seeds,
                ppl=[per_seed[s].ppl[v] for s in seeds],
                gap_pct=[100 * (per_seed[s].ppl[v] / per_seed[s].ppl[TARGET] - 1) for s in seeds],
                costs=[per_seed[s].cost[v] for s in seeds] if all(v in per_seed[s].cost for s in seeds) else [],
            )
            for v in VARIANTS
            if all(v in per_seed[s].ppl for s in seeds)
        }
    return out


def winners(cells: dict[str, dict[str, Cell]]) -> dict[str, dict]:
    """The answer to each question, with whether it holds in every seed.

    order: per algorithm, the quantized variant with the lowest mean perplexity;
    algorithm: per quantized variant, the algorithm with the lowest mean perplexity (over the seeds
    all algorithms share).
    """
    order = {}
    for algo, row in cells.items():
        measured = [v for v in QUANTIZED_VARIANTS if v in row]
        best = min(measured, key=lambda v: row[v].mean)
        every_seed = all(min(measured, key=lambda v: row[v].ppl[i]) == best for i in range(len(row[best].seeds)))
        order[algo] = {"best": best, "mean_ppl": row[best].mean, "every_seed": every_seed, "seeds": row[best].seeds}
    algorithm = {}
    if len(cells) > 1:
        shared = sorted(set.intersection(*(set(row[TARGET].seeds) for row in cells.values())))
        for v in QUANTIZED_VARIANTS:
            if not all(v in row for row in cells.values()):
                continue  # n/a for some algorithm: no contest
            per_seed = {a: dict(zip(row[v].seeds, row[v].ppl)) for a, row in cells.items()}
            if not shared:
                break
            means = {a: statistics.fmean(p[s] for s in shared) for a, p in per_seed.items()}
            best = min(means, key=means.get)
            every_seed = all(min(per_seed, key=lambda a: per_seed[a][s]) == best for s in shared)
            algorithm[v] = {"best": best, "mean_ppl": means[best], "every_seed": every_seed, "seeds": shared}
    return {"order": order, "algorithm": algorithm}


SPEED_TOLERANCE = 0.10  # speeds within 10% count as equal: one measurement each, on a machine shared with others


@dataclass
class Point:
    """One algorithm x variant by quality, size and speed (seed means)."""

    algo: str
    variant: str
    gap_pct: float
    gap_ci95_pct: tuple[float, float] | None  # across seeds; with one seed, over the test examples
    size_mib: float
    tokens_per_s: float
    runtime: str

    @property
    def label(self) -> str:
        return f"`{self.variant}` ({self.algo})" if self.variant != TARGET else f"`{TARGET}` (float)"

    def better_quality(self, other: Point) -> bool:
        """A lower gap to ft whose interval lies wholly below the other's: the only way a
        quality difference counts."""
        mine, theirs = self.gap_ci95_pct, other.gap_ci95_pct
        return mine is not None and theirs is not None and mine[1] < theirs[0]

    def dominates(self, other: Point) -> bool:
        """No worse in quality (the other's not better by the intervals; by the means where an
        interval is missing), no larger, no slower, and better in one of them."""
        known = self.gap_ci95_pct is not None and other.gap_ci95_pct is not None
        no_worse = not other.better_quality(self) if known else self.gap_pct <= other.gap_pct
        faster = self.tokens_per_s > other.tokens_per_s * (1 + SPEED_TOLERANCE)
        slower = self.tokens_per_s < other.tokens_per_s * (1 - SPEED_TOLERANCE)
        smaller, larger = self.size_mib < other.size_mib, self.size_mib > other.size_mib
        return no_worse and not larger and not slower and (self.better_quality(other) or smaller or faster)


def points(cells: dict[str, dict[str, Cell]]) -> list[Point]:
    """The deliverables of every algorithm, and `ft` once, where the summaries carry their costs."""
    out = []
    for i, (algo, row) in enumerate(cells.items()):
        for v in ([TARGET] if i == 0 else []) + COMPARED:  # ft: the same float chain in every row
            c = row.get(v)
            if c is None or not c.costs:
                continue
            own = c.costs[0].gap_ci95_pct if len(c.seeds) == 1 else c.gap_ci95()
            size = statistics.fmean(k.size_mib for k in c.costs)
            speed = statistics.fmean(k.tokens_per_s for k in c.costs)
            out.append(Point(algo, v, statistics.fmean(c.gap_pct), own, size, speed, c.costs[0].runtime))
    return out


def pareto(cells: dict[str, dict[str, Cell]]) -> dict[str, list]:
    """The Pareto front of quality (gap to ft, with its interval) against size on disk and speed:
    the points no other point dominates; each other point with one that dominates it."""
    pts = points(cells)
    front, dominated = [], []
    for p in pts:
        by = next((q for q in pts if q is not p and q.dominates(p)), None)
        (front if by is None else dominated).append((p, by))
    return {
        "front": [dataclasses.asdict(p) for p, _ in front],
        "dominated": [{**dataclasses.asdict(p), "dominated_by": by.label} for p, by in dominated],
        "speed_tolerance": SPEED_TOLERANCE,
    }


def _front_labels(front: list[dict]) -> str:
    return ", ".join(Point(**p).label for p in front)


def verdict(cells: dict[str, dict[str, Cell]], wins: dict[str, dict], front: dict[str, list]) -> str:
    """One paragraph for a design review: which order and which algorithm win, and on what evidence."""
    lines = []
    for algo, w in wins["order"].items():
        row = cells[algo]
        after = min((v for v in FINETUNED_FIRST if v in row), key=lambda v: row[v].mean, default=None)
        after_gap = f"{statistics.fmean(row[after].gap_pct):+.1f}%" if after else "n/a"
        n = len(w["seeds"])
        lines.append(
            f"With {algo}, `{w['best']}` is the best quantized variant (perplexity {w['mean_ppl']:.3f}, "
            f"{statistics.fmean(row[w['best']].gap_pct):+.1f}% vs `{TARGET}`; quantizing after fine-tuning, "
            f"`{after}`: {after_gap}), "
            + (
                f"in all {n} seeds."
                if w["every_seed"] and n > 1
                else "with one seed."
                if n == 1
                else f"but not in all {n} seeds."
            )
        )
    lines += [line for f, q in merge_base_pairs() if (line := _merge_base(cells, f, q))]
    best_orders = {w["best"] for w in wins["order"].values()}
    for v, w in wins["algorithm"].items():
        if v not in best_orders:
            continue
        others = ", ".join(
            f"{a} {statistics.fmean(p for s, p in zip(row[v].seeds, row[v].ppl) if s in w['seeds']):.3f}"
            for a, row in cells.items()
            if a != w["best"]
        )
        holds = "in every shared seed" if w["every_seed"] else "but not in every shared seed"
        lines.append(f"For `{v}`, {w['best']} has the lowest perplexity ({w['mean_ppl']:.3f}; {others}), {holds}.")
    if front["front"]:
        lines.append(f"On the Pareto front of quality, size and speed: {_front_labels(front['front'])}.")
    return " ".join(lines)


def _merge_base(cells: dict[str, dict[str, Cell]], float_base: str, quantized_base: str) -> str:
    """Which merge base wins per algorithm: the adapter folded into the float base, or into the
    dequantized base it was trained on, each then quantized."""
    rows = {a: row for a, row in cells.items() if float_base in row and quantized_base in row}
    if not rows:
        return ""
    per_algo = []
    for algo, row in rows.items():
        f, q = row[float_base], row[quantized_base]  # a row's cells share its seeds (see grid)
        lower = sum(a < b for a, b in zip(f.ppl, q.ppl))
        winner = float_base if f.mean < q.mean else quantized_base
        per_algo.append(
            f"{algo}: `{winner}` ({f.mean:.3f} vs {q.mean:.3f}; float base lower in {lower}/{len(f.ppl)} seeds)"
        )
    return f"Merge base, float (`{float_base}`) or dequantized (`{quantized_base}`): " + "; ".join(per_algo) + "."


def markdown(cells: dict[str, dict[str, Cell]], summary: str, front: dict[str, list]) -> str:
    """grid.md: the verdict (`summary`), the table of every algorithm x variant, the Pareto front."""
    header = (
        "| algorithm | variant | seeds | perplexity mean | sd | gap to ft | 95% CI across seeds |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
    )
    body = ""
    for algo, row in cells.items():
        for v in VARIANTS:
            if v not in row:
                body += f"| {algo} | `{v}` | - | n/a | - | - | - |\n"
                continue
            c, ci = row[v], row[v].gap_ci95()
            interval = f"[{ci[0]:+.2f}%, {ci[1]:+.2f}%]" if ci else "-"
            gap = statistics.fmean(c.gap_pct)
            body += f"| {algo} | `{v}` | {len(c.seeds)} | {c.mean:.3f} | {c.sd:.3f} | {gap:+.2f}% | {interval} |\n"
    return (
        f"# Quantize before or after fine-tuning?\n\n{summary}\n\n![grid](grid.png)\n\n{header}{body}"
        + _pareto_table(front)
    )


def _pareto_table(front: dict[str, list]) -> str:
    """The Pareto front as a table, with the rule that put each point on it."""
    if not front["front"]:
        return ""
    rows = "".join(
        f"| {p['algo'] if p['variant'] != TARGET else 'float'} | `{p['variant']}` | {p['gap_pct']:+.2f}% | "
        + (f"[{p['gap_ci95_pct'][0]:+.2f}%, {p['gap_ci95_pct'][1]:+.2f}%]" if p["gap_ci95_pct"] else "-")
        + f" | {p['size_mib']:.1f} | {p['tokens_per_s']:.0f} ({p['runtime']}) |\n"
        for p in sorted(front["front"], key=lambda p: p["size_mib"])
    )
    return (
        "\n## Pareto front: quality, size, speed\n\n"
        "No other variant is as good (its gap interval not wholly below), no larger, no slower "
        f"(speeds within {100 * front['speed_tolerance']:.0f}% count as equal) and better in one of the three. "
        "Speed: scoring tokens/s in the runtime named, on the machine that evaluated the variant. "
        f"{len(front['dominated'])} other variants are dominated (grid.json names by which).\n\n"
        "| algorithm | variant | gap to ft | 95% CI | size MiB | tokens/s (runtime) |\n|---|---|---:|---:|---:|---:|\n"
        + rows
    )


def bit_sweep(cells: dict[str, dict[str, Cell]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """The lines of the bit-width chart: per algorithm config less its bit width (e.g. "rtn g64"),
    per quantized variant, (stored bits per linear weight, mean gap to ft in %) of each width, by
    bits; only configs measured at two widths or more."""
    lines: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for algo, row in cells.items():
        config = re.sub(r" \d+-bit", "", algo)
        for v in QUANTIZED_VARIANTS:
            bits = [k.linear_bits for k in row[v].costs if k.linear_bits] if v in row else []
            if bits:
                lines[config][v].append((statistics.fmean(bits), statistics.fmean(row[v].gap_pct)))
    return {
        config: {v: sorted(points) for v, points in per_variant.items()}
        for config, per_variant in lines.items()
        if len({round(b) for points in per_variant.values() for b, _ in points}) > 1
    }


def bits_chart(sweep: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> None:
    """Gap to ft against stored bits per weight, a panel per algorithm config, a line per ordering."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweep), figsize=(5 * len(sweep), 4), dpi=120, squeeze=False)
    for ax, (config, per_variant) in zip(axes[0], sweep.items(), strict=True):
        for v, points in per_variant.items():
            ax.plot(*zip(*points, strict=True), marker="o", label=v)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("stored bits per linear weight")
        ax.set_ylabel("gap to ft, % (symlog)")
        ax.set_title(config)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def chart(cells: dict[str, dict[str, Cell]], path: Path) -> None:
    """The Olive study's chart for every algorithm: the deliverables as bars grouped by variant, one
    bar per algorithm (seed mean, sd as error bar); `base` and `ft` as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    width = 0.8 / len(cells)
    for i, (algo, row) in enumerate(cells.items()):
        shown = [j for j, v in enumerate(COMPARED) if v in row]
        xs = [j + (i - (len(cells) - 1) / 2) * width for j in shown]
        bars = ax.bar(
            xs, [row[COMPARED[j]].mean for j in shown], width, yerr=[row[COMPARED[j]].sd for j in shown], label=algo
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    first = next(iter(cells.values()))
    for v, style, color in ((BASELINE, "--", "gray"), (TARGET, "-", "#C44E52")):
        ax.axhline(first[v].mean, linestyle=style, color=color, label=f"{v} {first[v].mean:.2f}")
    ax.set_xticks(range(len(COMPARED)), COMPARED, fontsize=7)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("quantize before or after fine-tuning?")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write(experiments: list[Experiment], out_dir: Path) -> tuple[dict, list[Path]]:
    """Write grid.json, grid.md and grid.png into `out_dir`; return the grid data and the files."""
    if not experiments:
        raise UserError("no finished experiment with metrics/summary.json; run `dvc exp run` first")
    cells = grid(experiments)
    wins, front = winners(cells), pareto(cells)
    data = {
        "experiments": [e.name for e in experiments],
        "grid": {
            algo: {
                v: {"seeds": c.seeds, "ppl": c.ppl, "mean": c.mean, "sd": c.sd, "gap_ci95_pct": c.gap_ci95()}
                for v, c in row.items()
            }
            for algo, row in cells.items()
        },
        "winners": wins,
        "pareto": front,
        "verdict": verdict(cells, wins, front),
    }
    sweep = bit_sweep(cells)
    data["bit_sweep"] = sweep
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "grid.json", out_dir / "grid.md", out_dir / "grid.png"]
    write_text(files[0], json.dumps(data, indent=2) + "\n")
    bits_figure = "\n![gap to ft against bits per weight](bits.png)\n" if sweep else ""
    write_text(files[1], markdown(cells, data["verdict"], front) + bits_figure)
    chart(cells, files[2])
    if sweep:
        files.append(out_dir / "bits.png")
        bits_chart(sweep, files[-1])
    return data, files
