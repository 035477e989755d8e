"""`quantorder grid` on a Ray cluster of two nodes on this machine (a head and a worker node
process), with a bare git remote, a DVC remote directory and an `mlflow server` between them: the
tiny grid of three algorithms runs across both nodes, its float chain once; any clone sees every
experiment after `dvc exp pull`; MLflow holds each run once; a worker node killed mid-grid leaves a
complete grid after Ray's retry."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .project import env, free_port, make_project, run, wait_until_up

pytestmark = pytest.mark.slow
# one GPTQModel method and two of bitsandbytes, whose stages need no GPTQModel import (6 s each)
ALGOS = ["rtn", "nf4", "fp4"]
FLOAT_CHAIN = {"prepare", "calibrate", "finetune@ft", "merge@ft", "evaluate@base", "evaluate@ft"}
# the head notices a dead node after 3 missed checks of 0.5 s (Ray's default is about 15 s)
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}


def _ray(*args: str) -> str:
    return run([str(Path(sys.executable).parent / "ray"), *args], Path.cwd())


@pytest.fixture(scope="module")
def cluster():
    """A Ray head (one CPU) and a worker node (two). Yields the head's address."""
    port = free_port()
    os.environ.update(FAST_HEALTH_CHECKS)
    try:  # three task slots for the three experiments: their stage processes run one thread each
        _ray("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats")
        _ray("start", f"--address=127.0.0.1:{port}", "--num-cpus=2", "--disable-usage-stats")
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
        for key in FAST_HEALTH_CHECKS:
            os.environ.pop(key, None)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The places every host shares: a bare git remote, a DVC remote and an MLflow server."""
    root = tmp_path_factory.mktemp("shared")
    run(["git", "init", "-q", "--bare", "-b", "main", "remote.git"], root)
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(cmd, cwd=root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)
        yield {"git": root / "remote.git", "dvc": root / "dvc-remote", "mlflow": url}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared):
    repo = make_project(tmp_path_factory.mktemp("project"))
    run(["git", "remote", "add", "origin", str(shared["git"])], repo)
    run(["git", "push", "-q", "origin", "HEAD:main"], repo)
    return repo


def _grid(
    project: Path, shared: dict, address: str, name: str, summary: Path, on_line=None, sweeps=()
) -> tuple[int, str]:
    """Run `quantorder grid` (default: of the three algorithms); call `on_line` with each line it prints."""
    cmd = [sys.executable, "-m", "quantorder", "grid", "--ray", address, "-S", "+experiment=tiny"]
    for sweep in sweeps or [f"algo={','.join(ALGOS)}"]:
        cmd += ["-S", sweep]
    cmd += ["--dvc-remote", str(shared["dvc"]), "--mlflow", shared["mlflow"]]
    cmd += ["--name", name, "--summary", str(summary), "--workdir", str(summary.parent / "work")]
    proc = subprocess.Popen(cmd, cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if on_line:
            on_line(line)
    return proc.wait(), "".join(lines)


def _starts(out: str, task: str) -> set[tuple[str, str]]:
    """The (worker process, node) pairs that started `task`. On one machine both nodes' log monitors
    forward each worker's lines, so a line may come twice."""
    return set(re.findall(rf"\(\S+ pid=(\d+)(?:, ip=\S+)?\) \[grid\] {re.escape(task)} started on node (\w+)", out))


def _worker_raylet(address: str) -> tuple[str, int]:
    """The worker node's id and its raylet's pid."""
    script = (
        f"import json, ray; ray.init(address='{address}', log_to_driver=False); "
        "print('WORKER', json.dumps([[n['NodeID'], n['RayletSocketName']] for n in ray.nodes() "
        "if n['Alive'] and not n['Resources'].get('node:__internal_head__')]))"
    )
    out = run([sys.executable, "-c", script], Path.cwd())
    [[node, socket]] = json.loads(next(line for line in out.splitlines() if line.startswith("WORKER "))[7:])
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "raylet" in cmdline and f"--raylet_socket_name={socket} " in cmdline:
            return node, int(pid)
    raise AssertionError(f"no raylet process for {socket}")


def test_grid_runs_across_both_nodes_sharing_one_float_chain(cluster, shared, project, tmp_path):
    code, out = _grid(project, shared, cluster, "g1", tmp_path / "grid.json")
    assert code == 0, out[-3000:]
    summary = json.loads((tmp_path / "grid.json").read_text())
    experiments = summary["experiments"]
    assert [e["name"] for e in experiments] == [f"g1-algo-{a}" for a in ALGOS]
    assert all(e["status"] == "done" for e in experiments), experiments
    [float_chain] = summary["shared"]
    assert set(float_chain["targets"]) == FLOAT_CHAIN and float_chain["members"] == [0, 1, 2]
    tasks = [float_chain, *experiments]
    assert {t["node"] for t in tasks} == set(summary["nodes"]) and len(summary["nodes"]) == 2  # both nodes worked
    assert all(len(_starts(out, t["name"])) == 1 for t in tasks), out[-3000:]
    ran = [stage for t in tasks for stage in t["ran"]]
    for stage in FLOAT_CHAIN:  # the float chain ran once, in its own task; the experiments restored it
        assert ran.count(stage) == 1, (stage, [(t["name"], t["ran"]) for t in tasks])
    assert all(set(e["ran"]).isdisjoint(FLOAT_CHAIN) and "quantize@base_q" in e["ran"] for e in experiments)

    # any clone sees all three after `dvc exp pull`, with their metrics from the DVC remote
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(shared["git"]), str(clone)], tmp_path)
    run(["dvc", "remote", "add", "-d", "--local", "shared", str(shared["dvc"])], clone)
    run(["dvc", "exp", "pull", "origin"], clone)
    verdict = run([sys.executable, "-m", "quantorder", "compare", "--no-mlflow"], clone)
    grid = json.loads((clone / "reports/compare/grid.json").read_text())
    assert sorted(label.split()[0] for label in grid["grid"]) == sorted(ALGOS), verdict
    assert len({row["ft"]["mean"] for row in grid["grid"].values()}) == 1  # one float chain

    # the MLflow server holds each experiment's runs once
    import mlflow

    parents = mlflow.MlflowClient(shared["mlflow"]).search_runs(
        [mlflow.MlflowClient(shared["mlflow"]).get_experiment_by_name("quantorder").experiment_id],
        "tags.kind = 'experiment'",
    )
    assert sorted(r.info.run_name for r in parents) == [f"g1-algo-{a}" for a in sorted(ALGOS)]


def test_worker_killed_mid_grid_leaves_a_complete_grid(cluster, shared, project, tmp_path):
    """Two of the grid's experiments again (every stage but the report comes back from the
    run-cache); the worker node is killed as soon as a task starts on it: Ray reruns that task on
    the head."""
    node, raylet = _worker_raylet(cluster)
    killed = []

    def kill_on_first_start(line: str) -> None:
        if not killed and (started := re.search(r"\[grid\] (\S+) started on node (\w+)", line)):
            if started[2] == node:
                os.kill(raylet, signal.SIGKILL)
                killed.append(started[1])

    code, out = _grid(project, shared, cluster, "g2", tmp_path / "grid.json", kill_on_first_start, ["algo=rtn,nf4"])
    assert killed, f"no task started on the worker node {node}: {out[-3000:]}"
    assert code == 0, out[-3000:]
    summary = json.loads((tmp_path / "grid.json").read_text())
    assert all(e["status"] == "done" and e["node"] != node for e in summary["experiments"])
    assert len(_starts(out, killed[0])) == 2, out[-3000:]  # the first try, then the retry on the head
    reports = [e["ran"] for e in summary["experiments"]]
    assert all(ran == ["report"] for ran in reports), reports


def test_a_failing_experiment_is_not_retried_and_its_error_reaches_the_driver(cluster, shared, project, tmp_path):
    """Longer windows than the model has positions: a valid config the evaluate stage rejects."""
    code, out = _grid(project, shared, cluster, "g3", tmp_path / "grid.json", sweeps=["eval.max_seq_len=4096"])
    assert code == 1
    [failed] = json.loads((tmp_path / "grid.json").read_text())["experiments"]
    assert failed["status"] == "failed"
    assert re.match(
        r"g3: error: eval.max_seq_len=4096: the model in models/\S+ allows at most 1024 tokens", failed["error"]
    )
    assert f"[grid] g3: FAILED: {failed['error']}" in out
    assert len(_starts(out, "g3")) == 1  # not retried
