"""Every MLproject entry point through `mlflow run` on the tiny model, on fresh stores: runs land where MLflow said.

For each entry: the entry's own stage runs in the run `mlflow run` opened (no empty stray run beside it), every run
it made on the way (inputs trained because none existed) is in the same experiment and nested under that run, no
run lacks realign's tags, and no run lands in any other experiment.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from realign import tracking

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"data.num_examples": 16, "train.max_steps": 2, "train.per_device_train_batch_size": 4,
         "train.max_length": 96, "train.learning_rate": 1e-2}
EVAL = {"eval.judge": "keyword", "eval.num_prompts": 4, "eval.max_new_tokens": 8, "eval.task_examples": 4}
ATTACK = {"model": "tiny", "ratio": 0.25, "size": 12, **{k: v for k, v in TRAIN.items() if k != "data.num_examples"},
          **EVAL}
PIPELINE = {
    "experiment": "from-the-file",  # mlflow run's experiment wins over it
    "model": "tiny",
    "steps": {
        "sft": {"stage": "align", "method": "sft", **TRAIN, "eval.enabled": False},
        "dpo": {"stage": "align", "method": "dpo", "sft_run": "${sft}", **TRAIN, "eval.enabled": False},
    },
}


def _mlflow_run(entry, params, uri, cwd, experiment=None):
    """`mlflow run <repo> -e entry -P k=v ...`; returns (the run id MLflow opened, stderr)."""
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    if experiment:
        command += ["--experiment-name", experiment]
    # --env-manager local runs the entry's `realign ...` command with this interpreter's environment.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"=== Run \(ID '([0-9a-f]{32})'\) succeeded ===", result.stderr)
    assert match, result.stderr[-2000:]
    return match.group(1), result.stderr


def _runs():
    return {r.info.run_id: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}


def _check_placement(before, project_id, entry_stage, experiment_name, made_on_the_way=()):
    """The runs new since `before`: the project run is the entry's stage, the others nested under it, all in
    `experiment_name`, every one tagged by realign, FINISHED and complete."""
    now = _runs()
    new = {run_id: run for run_id, run in now.items() if run_id not in before}
    experiment_id = mlflow.get_experiment_by_name(experiment_name).experiment_id
    project = new[project_id]
    assert project.data.tags.get(tracking.TAG_STAGE) == entry_stage
    for run in new.values():
        assert run.info.experiment_id == experiment_id, f"{run.info.run_name} is not in {experiment_name}"
        assert tracking.TAG_STAGE in run.data.tags, f"run {run.info.run_name} has no realign tags"
        assert run.info.status == "FINISHED" and run.data.tags.get(tracking.TAG_COMPLETE) == "true"
    others = sorted(run.data.tags[tracking.TAG_STAGE] + "/" + run.data.tags.get(tracking.TAG_METHOD, "")
                    for run_id, run in new.items() if run_id != project_id)
    assert others == sorted(made_on_the_way)
    for run_id, run in new.items():
        if run_id != project_id and run.data.tags.get("mlflow.parentRunId") not in new:
            raise AssertionError(f"{run.info.run_name} is not nested under the run mlflow run opened")
    return new


@pytest.fixture
def fresh_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri, tmp_path


def test_every_entry_point_lands_in_the_experiment_mlflow_run_chose(fresh_store):
    uri, folder = fresh_store
    x = "chosen-by-mlflow-run"
    # attack on an empty store: the SFT and DPO runs it trains first go under the attack, in x.
    attack_id, _ = _mlflow_run("attack", ATTACK, uri, folder, experiment=x)
    new = _check_placement({}, attack_id, "attack", x, made_on_the_way=["align/sft", "align/dpo"])
    dpo_id = next(i for i, r in new.items() if r.data.tags.get(tracking.TAG_METHOD) == "dpo")
    seen = _runs()

    expo_id, _ = _mlflow_run("expo", {"model": "tiny", **EVAL}, uri, folder, experiment=x)  # finds dpo in x
    _check_placement(seen, expo_id, "expo", x)
    assert mlflow.get_run(expo_id).data.tags["realign.source.aligned"] == dpo_id
    seen = _runs()
    score_id, _ = _mlflow_run("score", {"model": "tiny", "model_run": expo_id, "nsamples": 2,
                                        "data.max_length": 48, "eval.enabled": "false"}, uri, folder, experiment=x)
    _check_placement(seen, score_id, "score", x)
    seen = _runs()
    fuse_id, _ = _mlflow_run("fuse", {"model": "tiny", "finetuned_run": attack_id, "reference_run": expo_id,
                                      "mask_run": score_id, **EVAL}, uri, folder, experiment=x)
    _check_placement(seen, fuse_id, "fuse", x)
    seen = _runs()
    evaluate_id, _ = _mlflow_run("evaluate", {"model": "tiny", "run": fuse_id, "judge": "keyword",
                                              "eval.num_prompts": 4, "eval.max_new_tokens": 8}, uri, folder,
                                 experiment=x)
    _check_placement(seen, evaluate_id, "evaluate", x)
    seen = _runs()
    kto_id, _ = _mlflow_run("align", {"method": "kto", "model": "tiny", **TRAIN, **EVAL}, uri, folder, experiment=x)
    _check_placement(seen, kto_id, "align", x)  # starts from the SFT run already in x: nothing trained first
    seen = _runs()
    compare_id, _ = _mlflow_run("compare", {}, uri, folder, experiment=x)
    _check_placement(seen, compare_id, "compare", x)
    assert mlflow.get_run(compare_id).data.metrics["runs_compared"] >= 7
    seen = _runs()
    spec = folder / "tiny-chain.yaml"
    spec.write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    main_id, err = _mlflow_run("main", {"name": str(spec)}, uri, folder, experiment=x)
    _check_placement(seen, main_id, "pipeline", x, made_on_the_way=["align/sft", "align/dpo"])
    assert "names experiment 'from-the-file'" in err
    assert mlflow.get_experiment_by_name("from-the-file") is None
    assert {r.info.experiment_id for r in _runs().values()} == {mlflow.get_experiment_by_name(x).experiment_id}


def test_without_an_experiment_name_runs_land_in_mlflows_default_and_the_realign_runs_are_pointed_at(fresh_store):
    uri, folder = fresh_store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    quiet = [f"--{k}={v}" for k, v in {**TRAIN, **EVAL}.items()]
    made = subprocess.run([sys.executable, "-m", "realign.cli", "align", "--method", "dpo", "--sft-run", "none",
                           "--model", "tiny", *quiet], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    realign_dpo = made.stdout.strip().splitlines()[-1].split()[-1]
    seen = _runs()

    attack_id, err = _mlflow_run("attack", ATTACK, uri, folder)
    default = mlflow.get_experiment_by_name("Default").name
    _check_placement(seen, attack_id, "attack", default, made_on_the_way=["align/sft", "align/dpo"])
    note = [line for line in err.splitlines() if line.startswith("note:") and "align/dpo" in line]
    assert note and realign_dpo in note[0] and "--experiment-name realign" in note[0], err[-2000:]
    assert mlflow.get_run(attack_id).data.tags["realign.source.aligned"] != realign_dpo


def test_an_explicit_experiment_other_than_mlflow_runs_fails_that_run_in_one_line(fresh_store):
    uri, folder = fresh_store
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "compare", "--env-manager", "local",
               "-P", "experiment=elsewhere", "--experiment-name", "chosen"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "differs from the one `mlflow run` chose ('chosen')" in errors[0], result.stderr
    assert "Traceback" not in result.stderr.split("error:")[0][-2000:]
    (run,) = _runs().values()
    assert run.info.status == "FAILED" and "differs from" in run.data.tags[tracking.TAG_ERROR]
