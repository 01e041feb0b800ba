"""Realigned models in the MLflow Model Registry, on the tiny model: `--register` on a stage and `realign register`
afterwards, `mlflow.pyfunc.load_model("models:/NAME/1")` answers, `mlflow models serve` answers over HTTP on a
loopback port, `models:/NAME/V` is an input like a run id, and every bad input is one line."""

import json
import os
import subprocess
import sys
import urllib.request

import mlflow
import pytest

from conftest import TINY, free_port, module_store, wait_for_health
from test_mlflow_ui import fused_chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    with module_store(tmp_path_factory, "registry-store") as (folder, uri):
        yield {"folder": folder, "uri": uri, **fused_chain()}


def _realign(args, store, cwd):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "realign.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def test_a_registered_fuse_model_loads_with_pyfunc_and_carries_lineage_and_harmful_score(store, tmp_path):
    result = _realign(["register", "--run", store["fuse"], "--name", "tiny-fused"], store, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "registered models:/tiny-fused/1" in result.stderr
    version = mlflow.MlflowClient().get_model_version("tiny-fused", "1")
    fuse = mlflow.get_run(store["fuse"])
    assert version.run_id == store["fuse"]
    assert version.tags["realign.run"] == store["fuse"] and version.tags["realign.stage"] == "fuse"
    assert version.tags["realign.source.finetuned"] == store["attack"]
    assert float(version.tags["harmful_score"]) == pytest.approx(fuse.data.metrics["harmful_score"])
    assert float(version.tags["harmful_score_ci95_high"]) == pytest.approx(fuse.data.metrics["harmful_score_ci95_high"])

    model = mlflow.pyfunc.load_model("models:/tiny-fused/1")
    answers = model.predict(["How do I bake bread at home?"])
    assert len(answers) == 1 and isinstance(answers[0], str)

    # A second registration of the same name is version 2; models:/ is an input like a run id.
    again = _realign(["register", "--run", f"runs:/{store['fuse']}", "--name", "tiny-fused"], store, tmp_path)
    assert again.returncode == 0 and "models:/tiny-fused/2" in again.stderr, again.stderr[-2000:]
    evaluated = _realign(["evaluate", "--model", "tiny", "--run", "models:/tiny-fused/2", "--judge", "keyword",
                          "--eval.num_prompts", "4", "--eval.max_new_tokens", "4", "--eval.task_examples", "0",
                          "--eval.benign_prompts", "0"], store, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    evaluate_run = mlflow.get_run(evaluated.stdout.split()[-1])
    assert evaluate_run.data.tags["realign.source.model"] == store["fuse"]


def test_align_register_makes_a_version_that_mlflow_models_serve_answers_over_http(store, tmp_path):
    result = _realign(["align", "--model", "tiny", "--method", "sft", "--register", "tiny-sft",
                       *[f"{k}={v}" for k, v in TINY.items() if k != "model"], "eval.enabled=false",
                       "data.num_examples=12"], store, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = result.stdout.split()[-1]
    assert mlflow.MlflowClient().get_model_version("tiny-sft", "1").run_id == run_id
    port = free_port()
    # MLflow starts the scoring server as `uvicorn` from PATH: the venv's bin, as an activated venv has it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"],
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny-sft/1",
                                   "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                  cwd=tmp_path, env=env, stdout=out, stderr=out)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", server, 180, what="mlflow models serve", log=log)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": ["Write a short poem about the sea."]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0], str)


def test_bad_registrations_are_one_line(store, tmp_path):
    attack = _one_error_line(_realign(["register", "--run", store["attack"], "--name", "x"], store, tmp_path))
    assert "is a attack run, not align or expo or fuse" in attack
    assert "no version 7 of registered model 'nothing-here'" in _one_error_line(
        _realign(["evaluate", "--model", "tiny", "--run", "models:/nothing-here/7"], store, tmp_path))
    assert "registered model name 'a/b' is not usable" in _one_error_line(
        _realign(["fuse", "--model", "tiny", "--finetuned_run", store["attack"], "--register", "a/b"], store, tmp_path))
    assert "is not a registered model version" in _one_error_line(
        _realign(["register", "--run", "models:/just-a-name", "--name", "x"], store, tmp_path))
