"""Stages against a real `mlflow server` over HTTP (127.0.0.1), each command from its own working directory."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
import yaml

from conftest import free_port, wait_for_health

TINY_STEP = {"data.num_examples": 16, "train.max_steps": 2, "train.per_device_train_batch_size": 4,
             "train.max_length": 96, "train.learning_rate": 1e-2, "eval.enabled": False}
TINY_PIPELINE = {
    "experiment": "shared",
    "model": "tiny",
    "steps": {
        "sft": {"stage": "align", "method": "sft", **TINY_STEP},
        "dpo": {"stage": "align", "method": "dpo", "sft_run": "${sft}", **TINY_STEP},
        "attack": {"stage": "attack", "source_run": "${dpo}", "size": 12, "ratio": 0.25,
                   **{k: v for k, v in TINY_STEP.items() if k != "data.num_examples"}},
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, 60)  # the server needs a few seconds to migrate its store and start
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _realign(args, url, cwd):
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "realign.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _run_id(result):
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1].split()[-1]


def test_stages_pull_inputs_by_run_id_from_other_directories(server, tmp_path):
    dirs = [tmp_path / name for name in ("a", "b", "c")]
    for folder in dirs:
        folder.mkdir()
    quiet = ["--model", "tiny", "--sft-run", "none", *[f"{k}={v}" for k, v in TINY_STEP.items()]]
    aligned = _run_id(_realign(["align", "--method", "dpo", *quiet], server, dirs[0]))
    attack_args = ["attack", "--model", "tiny", "--source-run", aligned, "--size", "12", "--ratio", "0.25",
                   "train.max_steps=2", "train.max_length=96", "eval.enabled=false"]
    attacked = _run_id(_realign(attack_args, server, dirs[1]))

    mlflow.set_tracking_uri(server)
    run = mlflow.get_run(attacked)
    assert run.info.status == "FINISHED" and run.data.tags["realign.source.aligned"] == aligned
    os.chdir(dirs[2])
    local = mlflow.artifacts.download_artifacts(run_id=attacked, artifact_path="adapter", dst_path=str(dirs[2]))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(local))
    assert not any(folder.joinpath("mlruns").exists() for folder in dirs), "artifacts go to the server, not cwd"


def test_two_pipelines_at_once_lose_no_run(server, tmp_path):
    spec = tmp_path / "shared.yaml"
    spec.write_text(yaml.safe_dump(TINY_PIPELINE, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    processes = []
    for name in ("p1", "p2"):
        (tmp_path / name).mkdir()
        processes.append(subprocess.Popen([sys.executable, "-m", "realign.cli", "pipeline", "--name", str(spec)],
                                          cwd=tmp_path / name, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-2000:]

    mlflow.set_tracking_uri(server)
    runs = mlflow.search_runs(experiment_names=["shared"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("realign.stage") == "pipeline"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    # Every step of each pipeline points at a finished, complete run: nothing half-made was reused.
    for parent in parents:
        path = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="pipeline/steps.json",
                                                   dst_path=str(tmp_path / parent.info.run_id))
        table = json.loads(open(path).read())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert [row["step"] for row in rows] == ["sft", "dpo", "attack"]
        for run_id in (row["run_id"] for row in rows):
            step_run = mlflow.get_run(run_id)
            assert step_run.info.status == "FINISHED" and step_run.data.tags.get("realign.complete") == "true"
    stage_runs = [r for r in runs if r.data.tags.get("realign.stage") in ("align", "attack")]
    assert all(r.info.status == "FINISHED" for r in stage_runs)
    assert 3 <= len(stage_runs) <= 6  # each step ran once or twice (both started before either finished it)
