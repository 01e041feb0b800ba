"""`realign pipeline --executor ray` on the tiny model, against the PostgreSQL-backed server of scripts/server.sh:
a grid of independent cells plus dependants, reuse on the second call, a failed cell that skips its dependants and
fails the parent while the others finish, and a worker killed mid-cell whose run is FAILED and rerun next time.
Each pipeline is its own process (the driver) with a local Ray cluster; skipped where PostgreSQL or Ray is absent."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from realign import tracking

from conftest import free_port, wait_for_health

REPO = Path(__file__).resolve().parents[1]
TINY_STEP = {"data.num_examples": 16, "train.max_steps": 2, "train.per_device_train_batch_size": 4,
             "train.max_length": 96, "train.learning_rate": 1e-2, "eval.enabled": False}
SCORE = {"nsamples": 4, "data.max_length": 64, "eval.enabled": False}


def _postgres_missing() -> str:
    if not (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        return "running as root without the postgres user"
    try:
        import psycopg2  # noqa: F401
        import ray  # noqa: F401
    except ImportError as err:
        return f"{err.name} is not installed (bash scripts/setup.sh --test)"
    return ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    missing = _postgres_missing()
    if missing:
        pytest.skip(f"the Ray executor tests need PostgreSQL and Ray: {missing}")
    folder = tmp_path_factory.mktemp("pg-server")
    port = free_port()
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(["bash", str(REPO / "scripts" / "server.sh"), "--dir", str(folder / "server"),
                                "--port", str(port), "--pg-port", str(free_port())],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "REALIGN_SERVER_WORKERS": "1"},
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:  # PostgreSQL's initdb, then MLflow's schema migration: up to a minute or two
        wait_for_health(url, process, 120, "scripts/server.sh", folder / "server.log")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
        location = folder / "server" / "postgres-location"  # as root the database lives in postgres's home
        if location.exists():
            data = location.read_text().strip()
            for path in (data, f"{data}-socket", f"{data}.log"):
                subprocess.run(["rm", "-rf", path], check=False)


def _experiment_file(tmp_path, name, steps):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"experiment": name, "model": "tiny", "executor": "ray", "steps": steps},
                                   sort_keys=False))
    return str(path)


def _pipeline(path, url, cwd, wait=True):
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "realign.cli", "pipeline", "--name", path]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _runs(url, experiment):
    mlflow.set_tracking_uri(url)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def _stage_runs(url, experiment, stage):
    return [r for r in _runs(url, experiment) if r.data.tags.get(tracking.TAG_STAGE) == stage]


def test_a_grid_runs_as_ray_tasks_with_lineage_and_is_reused_on_the_second_call(server, tmp_path):
    sparsities = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]
    path = _experiment_file(tmp_path, "ray-grid", {
        "sft": {"stage": "align", "method": "sft", **TINY_STEP},
        "region": {"stage": "score", "model_run": "${sft}", "method": "wanda", **SCORE,
                   "grid": {"sparsity": sparsities}},
        "region_snip": {"stage": "score", "model_run": "${sft}", "method": "snip", "sparsity": 0.05, **SCORE},
        "summary": {"stage": "compare"},
    })
    first = _pipeline(path, server, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "submitted" in first.stderr

    runs = _runs(server, "ray-grid")
    parent = next(r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "pipeline")
    stage_runs = [r for r in runs if r.data.tags.get(tracking.TAG_STAGE) in ("align", "score", "compare")]
    assert len(stage_runs) == 1 + 8 + 1 + 1, "one run per cell: none lost, none doubled"
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in stage_runs)
    sft = next(r for r in stage_runs if r.data.tags[tracking.TAG_STAGE] == "align").info.run_id
    scores = [r for r in stage_runs if r.data.tags[tracking.TAG_STAGE] == "score"]
    assert all(r.data.params["model_run"] == sft for r in scores), "every score cell pulled the sft run by id"
    assert sorted(float(r.data.params["sparsity"]) for r in scores if r.data.params["method"] == "wanda") == sparsities
    processes = {r.data.tags[tracking.TAG_PROCESS] for r in scores}
    assert parent.data.tags[tracking.TAG_PROCESS] not in processes, "the cells ran in Ray workers, not the driver"

    second = _pipeline(path, server, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("reused run") == 10 and "summary" in second.stderr
    assert len([r for r in _runs(server, "ray-grid") if r.data.tags.get(tracking.TAG_STAGE) == "score"]) == 9


def test_a_failed_cell_skips_its_dependants_and_fails_the_parent_while_the_others_finish(server, tmp_path):
    missing_run = "f" * 32
    path = _experiment_file(tmp_path, "ray-failure", {
        "sft": {"stage": "align", "method": "sft", **TINY_STEP},
        "bad": {"stage": "score", "model_run": missing_run, **SCORE},
        "after_bad": {"stage": "score", "model_run": "${bad}", **SCORE},
        "good": {"stage": "score", "model_run": "${sft}", **SCORE},
    })
    result = _pipeline(path, server, tmp_path)
    assert result.returncode != 0
    assert "after_bad: skipped, it needs bad (failed)" in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "1 cells failed (bad:" in error_lines[0] and "1 skipped" in error_lines[0]
    parent = _stage_runs(server, "ray-failure", "pipeline")[0]
    assert parent.info.status == "FAILED"
    scores = {r.info.status: r for r in _stage_runs(server, "ray-failure", "score")}
    assert sorted(scores) == ["FAILED", "FINISHED"], "bad failed, good finished, after_bad never ran"
    assert missing_run in scores["FAILED"].data.tags[tracking.TAG_ERROR]
    assert scores["FINISHED"].data.params["model_run"] == _stage_runs(server, "ray-failure", "align")[0].info.run_id


def test_a_worker_killed_mid_cell_leaves_its_run_failed_and_the_rerun_finishes_it(server, tmp_path):
    path = _experiment_file(tmp_path, "ray-kill", {
        "sft": {"stage": "align", "method": "sft", **{**TINY_STEP, "train.max_steps": 400}},
        "region": {"stage": "score", "model_run": "${sft}", **SCORE},
    })
    driver = _pipeline(path, server, tmp_path, wait=False)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and driver.poll() is None:
        for run in _stage_runs(server, "ray-kill", "align"):
            host, _, pid = run.data.tags.get(tracking.TAG_PROCESS, "").rpartition(":")
            if run.info.status == "RUNNING" and pid.isdigit() and host == socket.gethostname():
                os.kill(int(pid), signal.SIGKILL)
                killed = run.info.run_id
                break
        time.sleep(0.3)
    _, stderr = driver.communicate(timeout=300)
    assert killed, f"no align run was seen RUNNING: {stderr[-2000:]}"
    assert driver.returncode != 0 and "sft: failed: its Ray worker died" in stderr
    assert "region: skipped, it needs sft (failed)" in stderr
    assert mlflow.get_run(killed).info.status == "FAILED"

    rerun = _pipeline(path, server, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    aligns = _stage_runs(server, "ray-kill", "align")
    assert sorted(r.info.status for r in aligns) == ["FAILED", "FINISHED"]
    assert [r.info.status for r in _stage_runs(server, "ray-kill", "score")] == ["FINISHED"]


def test_ray_refuses_a_sqlite_store_in_one_line(tmp_path):
    pytest.importorskip("ray")
    path = _experiment_file(tmp_path, "ray-sqlite", {"sft": {"stage": "align", "method": "sft", **TINY_STEP}})
    result = _pipeline(path, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "needs a tracking server" in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists(), "refused before the store was opened"
