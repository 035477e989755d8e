"""`quantorder grid`'s plan, on the project's own dvc.yaml: which stages experiments share, the
names they get, and what it refuses before anything runs. (The grid on a Ray cluster: test_cluster.py.)"""

from __future__ import annotations

import subprocess

import pytest

from quantorder.errors import UserError
from quantorder.grid import (
    check_configs,
    expand,
    experiment_names,
    gpus_per_task,
    resolve_remotes,
    shared_tasks,
    stage_identities,
)

from .conftest import ROOT
from .project import make_project, run

FLOAT_FINETUNE = ("evaluate@ft", "finetune@ft", "merge@ft")


def _plan(sweeps: list[str]):
    grid = expand(["+experiment=tiny", *sweeps, "tracking.enabled=false"])
    names = experiment_names("g", grid)
    params = check_configs(grid, names)
    return names, shared_tasks("g", grid, *stage_identities(ROOT, params))


def test_algorithms_share_the_float_chain(monkeypatch):
    monkeypatch.chdir(ROOT)
    names, shared = _plan(["algo=rtn,gptq,awq"])
    assert names == ["g-algo-rtn", "g-algo-gptq", "g-algo-awq"]
    [chain] = shared
    assert chain.members == (0, 1, 2) and chain.needs == ()
    assert set(chain.targets) == {"prepare", "calibrate", "evaluate@base", *FLOAT_FINETUNE}
    assert chain.overrides[:2] == ("+experiment=tiny", "algo=rtn")  # run with the first member's settings


def test_algorithms_by_seeds_share_what_each_part_leaves_alike(monkeypatch):
    monkeypatch.chdir(ROOT)
    names, shared = _plan(["algo=rtn,gptq", "seed=0,1"])
    assert names == ["g-algo-rtn-seed-0", "g-algo-rtn-seed-1", "g-algo-gptq-seed-0", "g-algo-gptq-seed-1"]
    plan = {(t.members, t.targets, t.needs) for t in shared}
    assert plan == {
        ((0, 1, 2, 3), ("calibrate", "evaluate@base", "prepare"), ()),  # no seed, no algorithm
        ((0, 2), FLOAT_FINETUNE, (0,)),  # seed 0's float fine-tune, after the first set
        ((1, 3), FLOAT_FINETUNE, (0,)),
        ((0, 1), ("evaluate@base_q", "quantize@base_q"), (0,)),  # quantizing the base reads no seed
        ((2, 3), ("evaluate@base_q", "quantize@base_q"), (0,)),
    }
    assert [t.name for t in shared] == [f"g-shared-{k}" for k in range(5)]


def test_one_experiment_shares_nothing(monkeypatch):
    monkeypatch.chdir(ROOT)
    names, shared = _plan(["algo=gptq"])
    assert names == ["g"] and shared == []


def test_bad_configs_stop_the_grid_with_one_line_each(monkeypatch):
    monkeypatch.chdir(ROOT)
    grid = expand(["+experiment=tiny", "algo=rtn,gptq", "algo.bits=5", "tracking.enabled=false"])
    with pytest.raises(UserError) as e:
        check_configs(grid, experiment_names("g", grid))
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("g-algo-rtn: ") and "algo.bits=5" in lines[0]
    # MLflow on without a server: the runs would be lost with each task's clone
    grid = expand(["+experiment=tiny", "algo=rtn"])
    with pytest.raises(UserError, match=r"^g: tracking.uri is unset.*--mlflow URL"):
        check_configs(grid, ["g"])


def test_repeated_experiments_are_refused():
    with pytest.raises(UserError, match="experiments repeat"):
        experiment_names("g", [("algo=rtn",), ("algo=rtn",)])


def test_gpus_per_task():
    params = {"finetune": {"devices": 1}}
    assert gpus_per_task(params, [0, 0]) == 0  # no GPUs in the cluster: CPU tasks
    assert gpus_per_task(params, [4, 8]) == 1
    assert gpus_per_task({"finetune": {"devices": 0}}, [4, 8]) == 8  # 0: a whole node
    with pytest.raises(UserError, match=r"finetune.devices=16: no node of the Ray cluster has more than 8 GPUs"):
        gpus_per_task({"finetune": {"devices": 16}}, [4, 8])


def test_grid_runs_only_a_pushed_clean_commit(tmp_path):
    (tmp_path / "project").mkdir()
    repo = make_project(tmp_path / "project")
    run(["git", "init", "-q", "--bare", "-b", "main", str(tmp_path / "remote.git")], tmp_path)
    run(["git", "remote", "add", "origin", str(tmp_path / "remote.git")], repo)
    with pytest.raises(UserError, match=r"commit \w{8} is no branch or tag of git remote origin: push it first"):
        resolve_remotes(repo, "origin", str(tmp_path / "dvc"), str(tmp_path / "work"), None)
    run(["git", "push", "-q", "origin", "HEAD:main"], repo)
    with pytest.raises(UserError, match=r"^no DVC remote: pass --dvc-remote URL"):
        resolve_remotes(repo, "origin", None, str(tmp_path / "work"), None)
    remotes = resolve_remotes(repo, "origin", str(tmp_path / "dvc"), str(tmp_path / "work"), None)
    assert remotes.git_url == str(tmp_path / "remote.git") and remotes.dvc_url == str(tmp_path / "dvc")
    assert remotes.commit == subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=repo, text=True).strip()
    assert remotes.checkpoints == str(tmp_path / "work" / "checkpoints")
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text() + "\n")
    with pytest.raises(UserError, match=r"uncommitted changes \(M dvc.yaml ...\)"):
        resolve_remotes(repo, "origin", str(tmp_path / "dvc"), str(tmp_path / "work"), None)
