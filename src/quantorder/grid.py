"""`quantorder grid`: a grid of DVC experiments run as Ray tasks, each in its own clone of the current
commit. Stage outputs and DVC's run-cache go through one DVC remote, experiments through one git
remote (`dvc exp push`), MLflow runs to one tracking server.

Stages that several experiments of the grid compute alike (the float chain of an algorithm grid)
run first, once, as their own tasks; the experiments then restore them from the run-cache
(`dvc exp run --pull`). Ray retries a task whose worker died; a task whose `dvc exp run` failed is
not retried, and its one-line error reaches the driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantorder.errors import UserError

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Task:
    """One `dvc exp run` in a fresh clone: a whole experiment, or stages several experiments share."""

    name: str
    overrides: tuple[str, ...]
    targets: tuple[str, ...] = ()  # empty: the whole pipeline, pushed as an experiment
    members: tuple[int, ...] = ()  # the experiments a shared task runs stages for
    needs: tuple[int, ...] = ()  # shared tasks to finish first (indices into the shared list)


@dataclass(frozen=True)
class Remotes:
    """What every task shares: the commit it runs and the places it reads from and writes to."""

    commit: str
    git_url: str
    dvc_url: str
    workdir: str  # where tasks clone the project (a local disk on each host)
    checkpoints: str  # fine-tuning checkpoints, per task name; shared storage lets any host resume


class GridTaskError(Exception):
    """`dvc exp run` (or a push) failed in a task: not retried."""


# --- planning (on the driver) -----------------------------------------------------------------


def expand(sweeps: list[str]) -> list[tuple[str, ...]]:
    """Hydra sweep overrides (`algo=rtn,gptq`) as one override list per experiment, DVC's expansion."""
    from dvc.utils.hydra import get_hydra_sweeps

    return [tuple(exp[PARAMS_FILE]) for exp in get_hydra_sweeps({PARAMS_FILE: list(sweeps)})]


def experiment_names(prefix: str, grid: list[tuple[str, ...]]) -> list[str]:
    """`prefix` plus the overrides that differ between experiments, as valid DVC experiment names."""
    varying = [i for i in range(len(grid[0])) if len({exp[i] for exp in grid}) > 1] if grid else []
    names = []
    for exp in grid:
        parts = [prefix, *(exp[i].lstrip("+~") for i in varying)]
        names.append(re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-."))
    if len(set(names)) != len(names):
        raise UserError(f"grid: experiments repeat ({', '.join(sorted(names))}); give each a distinct override")
    return names


def _value(params: dict, key: str) -> Any:
    """The value of a dotted params key (`model.dtype`), None where it is missing."""
    for part in key.split("."):
        params = params.get(part) if isinstance(params, dict) else None
    return params


def stage_identities(root: Path, params: list[dict]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """For each stage of the pipeline (always-changed ones left out): its identity in each experiment,
    the hash of its name, the params it reads and its upstream stages' identities (the commit's code
    and data are the same for all); and each stage's upstream stages."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        stages = [s for s in repo.index.stages if not s.always_changed]
        reads = {s.addressing: [k for d in s.deps if isinstance(d, ParamsDependency) for k in d.params] for s in stages}
        upstream = {s.addressing: sorted(u.addressing for u in graph.successors(s) if u in stages) for s in stages}
    memo: dict[tuple[str, int], str] = {}

    def identity(stage: str, i: int) -> str:
        if (stage, i) not in memo:
            record = [stage, {k: _value(params[i], k) for k in reads[stage]}, [identity(u, i) for u in upstream[stage]]]
            memo[stage, i] = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
        return memo[stage, i]

    return {s: [identity(s, i) for i in range(len(params))] for s in reads}, upstream


def shared_tasks(
    prefix: str, grid: list[tuple[str, ...]], identities: dict[str, list[str]], upstream: dict[str, list[str]]
) -> list[Task]:
    """The stages two or more experiments compute alike, as tasks: one per set of experiments that
    share them, ordered so that a task comes after those holding its stages' upstream stages."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for stage, ids in identities.items():
        for identity in set(ids):
            members = tuple(i for i, x in enumerate(ids) if x == identity)
            if len(members) > 1:
                groups.setdefault(members, []).append(stage)
    keys = sorted(groups, key=lambda m: (-len(m), m))  # a wider set never depends on a narrower one
    owner = {(stage, m): k for k, m in enumerate(keys) for stage in groups[m]}
    tasks = []
    for k, members in enumerate(keys):
        needs = {
            owner[up, m]
            for stage in groups[members]
            for up in upstream[stage]
            for m in keys[:k]
            if (up, m) in owner and set(members) <= set(m)
        }
        tasks.append(
            Task(
                f"{prefix}-shared-{k}", grid[members[0]], tuple(sorted(groups[members])), members, tuple(sorted(needs))
            )
        )
    return tasks


# --- one task (on a Ray worker) ---------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, log: Path | None = None) -> str:
    """Run `cmd` (its output also into `log`); a GridTaskError with its first error line if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if log:
        log.write_text(out)
    if proc.returncode != 0:
        errors = [line for line in out.splitlines() if line.startswith(("error:", "ERROR:"))]
        raise GridTaskError(
            errors[0] if errors else f"{' '.join(cmd[:3])} exited {proc.returncode}: {out.strip()[-300:]}"
        )
    return out


def run_task(task: Task, remotes: Remotes, *_needs: Any) -> dict:
    """Clone the commit, `dvc exp run --pull` the task, push what it made; the stages it ran."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    print(f"[grid] {task.name} started on node {node}", flush=True)
    start = time.perf_counter()
    Path(remotes.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{task.name}-", dir=remotes.workdir))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # this env's dvc, python
        # the stages import the commit's code, not the quantorder this host has installed
        "PYTHONPATH": os.pathsep.join([str(work / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "QUANTORDER_CHECKPOINTS": str(Path(remotes.checkpoints) / task.name),
    }
    try:
        _run(["git", "clone", "-q", "--no-checkout", remotes.git_url, str(work)])
        _run(["git", "checkout", "-q", remotes.commit], cwd=work)
        _run(["dvc", "remote", "add", "-d", "--local", "grid", remotes.dvc_url], cwd=work, env=env)
        sets = [arg for o in task.overrides for arg in ("-S", o)]
        log = Path(remotes.workdir) / "logs" / f"{task.name}.log"  # kept: the clone goes
        log.parent.mkdir(exist_ok=True)
        try:
            out = _run(["dvc", "exp", "run", "--pull", "-n", task.name, *sets, *task.targets], work, env, log)
        except GridTaskError as e:
            raise GridTaskError(f"{task.name}: {e} (log: {log} on node {node[:8]})") from None
        if task.targets:  # shared stages: their outputs and run-cache entries, no experiment
            _run(["dvc", "push", "--run-cache", "--with-deps", *task.targets], cwd=work, env=env)
        else:  # -f: a rerun of the grid replaces the experiment of that name
            _run(["dvc", "exp", "push", "-f", "--run-cache", "origin", task.name], cwd=work, env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ran = re.findall(r"Running stage '([^']+)'", out)
    return {"name": task.name, "node": node, "ran": ran, "seconds": round(time.perf_counter() - start, 1)}


# --- the driver -------------------------------------------------------------------------------


def _git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(
            f"git {' '.join(args)}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}"
        )
    return proc.stdout.strip()


def _remote_url(name_or_url: str, names: dict[str, str]) -> str:
    """A remote's URL from its name, or the URL itself (a local path made absolute)."""
    url = names.get(name_or_url, name_or_url)
    return url if "://" in url or url.startswith("git@") else str(Path(url).expanduser().resolve())


def resolve_remotes(
    root: Path, git_remote: str, dvc_remote: str | None, workdir: str, checkpoints: str | None
) -> Remotes:
    """Check the grid can run from this commit and find the remotes it shares.

    Raises:
        UserError: uncommitted changes, a commit the git remote lacks, or no DVC remote.
    """
    from dvc.repo import Repo

    if changed := _git("status", "--porcelain", "--untracked-files=no", cwd=root):
        first = changed.splitlines()[0].strip()
        raise UserError(f"uncommitted changes ({first} ...): the grid runs the last commit; commit and push first")
    commit = _git("rev-parse", "HEAD", cwd=root)
    git_names = dict(line.split()[:2] for line in _git("remote", "-v", cwd=root).splitlines())
    git_url = _remote_url(git_remote, git_names)
    tips = {line.split()[0] for line in _git("ls-remote", git_url, cwd=root).splitlines()}
    if commit not in tips:
        raise UserError(f"commit {commit[:8]} is no branch or tag of git remote {git_remote}: push it first")
    with Repo(str(root)) as repo:
        dvc_names = {name: remote["url"] for name, remote in repo.config["remote"].items()}
        dvc_remote = dvc_remote or repo.config["core"].get("remote")
    if not dvc_remote:
        raise UserError("no DVC remote: pass --dvc-remote URL or set one with `dvc remote add -d NAME URL`")
    shared_checkpoints = checkpoints or str(Path(workdir) / "checkpoints")
    return Remotes(commit, git_url, _remote_url(dvc_remote, dvc_names), workdir, shared_checkpoints)


def check_configs(grid: list[tuple[str, ...]], names: list[str]) -> list[dict]:
    """Each experiment's composed params.

    Raises:
        UserError: one line per experiment whose config is invalid, or whose MLflow runs would be lost.
    """
    from quantorder.cli import composed

    params, problems = [], []
    for name, overrides in zip(names, grid):
        try:
            p = composed(list(overrides))
        except UserError as e:
            problems.append(f"{name}: {e}")
            continue
        if p["tracking"]["enabled"] and not p["tracking"]["uri"]:
            problems.append(f"{name}: tracking.uri is unset, so its MLflow runs would stay in a temporary clone: "
                            "pass --mlflow URL (an `mlflow server`) or -S tracking.enabled=false")  # fmt: skip
        params.append(p)
    if problems:
        raise UserError("\n".join(problems))
    return params


def gpus_per_task(params: dict, node_gpus: list[float]) -> float:
    """The GPUs an experiment's fine-tune asks for (`finetune.devices`, 0: a whole node's), 0 without GPUs.

    Raises:
        UserError: no node has that many.
    """
    most = max(node_gpus, default=0)
    if most == 0:
        return 0
    want = params["finetune"]["devices"] or most
    if want > most:
        raise UserError(f"finetune.devices={want}: no node of the Ray cluster has more than {most:g} GPUs")
    return want


@dataclass
class Progress:
    """Every finished task (experiments and shared stage sets), done or failed."""

    names: set[str]  # the experiments'
    done: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        done, failed = len(self.names & self.done.keys()), len(self.names & self.failed.keys())
        return f"{done} done, {len(self.names) - done - failed} running or waiting, {failed} failed"

    def record(self, task: Task) -> dict:
        """The task with its outcome: node, stages run and seconds, or its error."""
        if task.name in self.done:
            return {**asdict(task), "status": "done", **self.done[task.name]}
        return {**asdict(task), "status": "failed", "error": self.failed.get(task.name)}


def run_grid(
    address: str, sweeps: list[str], git_remote: str, dvc_remote: str | None, mlflow: str | None,
    prefix: str | None, workdir: str, checkpoints: str | None, retries: int, cpus: float, summary: Path | None,
) -> int:  # fmt: skip
    """Plan and run the grid on the Ray cluster at `address` ("local": a Ray started for this run);
    0 if every experiment finished."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # (read on import) each task's start line, not "[repeated 2x]"
    import ray

    root = Path.cwd()
    remotes = resolve_remotes(root, git_remote, dvc_remote, workdir, checkpoints)
    grid = expand([*sweeps, *([f"tracking.uri={mlflow}"] if mlflow else [])])
    prefix = prefix or f"grid-{remotes.commit[:7]}"
    names = experiment_names(prefix, grid)
    params = check_configs(grid, names)
    shared = shared_tasks(prefix, grid, *stage_identities(root, params))
    experiments = [Task(name, overrides) for name, overrides in zip(names, grid)]

    try:
        ray.init(address=None if address == "local" else address, log_to_driver=True)
    except ConnectionError as e:
        raise UserError(
            f"--ray {address}: no Ray cluster found; start one with `ray start --head` or pass --ray local"
        ) from e
    nodes = [n for n in ray.nodes() if n["Alive"]]
    gpus = [n["Resources"].get("GPU", 0) for n in nodes]
    remote = ray.remote(max_retries=retries, retry_exceptions=False, num_cpus=cpus)(run_task)
    pending: dict[Any, Task] = {}
    shared_refs: list[Any] = []
    for task in shared:  # in order: a shared task only needs earlier ones
        asks = max(gpus_per_task(params[i], gpus) for i in task.members)
        ref = remote.options(name=task.name, num_gpus=asks).remote(task, remotes, *[shared_refs[k] for k in task.needs])
        shared_refs.append(ref)
        pending[ref] = task
    for i, task in enumerate(experiments):
        needs = [ref for ref, t in zip(shared_refs, shared) if i in t.members]
        asks = gpus_per_task(params[i], gpus)
        pending[remote.options(name=task.name, num_gpus=asks).remote(task, remotes, *needs)] = task
    print(f"[grid] {len(experiments)} experiments and {len(shared)} sets of shared stages from commit "
          f"{remotes.commit[:8]} on {len(nodes)} Ray nodes", flush=True)  # fmt: skip
    start = time.perf_counter()
    progress = watch(pending, set(names))
    if summary:
        from quantorder.io import write_text

        record = {
            "commit": remotes.commit,
            "nodes": [n["NodeID"] for n in nodes],
            "wall_s": round(time.perf_counter() - start, 1),
            "experiments": [progress.record(t) for t in experiments],
            "shared": [progress.record(t) for t in shared],
        }
        write_text(summary, json.dumps(record, indent=1))
    print(f"[grid] {progress.line()}; `dvc exp pull origin` brings them to any clone", flush=True)
    return 1 if progress.names & progress.failed.keys() else 0


def watch(pending: dict[Any, Task], names: set[str]) -> Progress:
    """Wait for every task, printing each one's end with the experiments' tally."""
    import ray

    progress = Progress(names)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(ref)
        try:
            result = progress.done[task.name] = ray.get(ref)
            outcome = f"done on node {result['node'][:8]} in {result['seconds']:.0f} s, {len(result['ran'])} stages run"
        except ray.exceptions.RayError as e:  # a failed task, or one whose worker died past its retries
            cause = getattr(e, "cause", None)
            message = str(cause) if isinstance(cause, GridTaskError) else " ".join(str(e).split())[:500]
            outcome = f"FAILED: {progress.failed.setdefault(task.name, message)}"
        print(f"[grid] {task.name}: {outcome} | {progress.line()}", flush=True)
    return progress
