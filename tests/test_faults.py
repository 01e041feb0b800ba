"""Faults: a stage killed with SIGKILL mid-training, then the same command again; several processes of one stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from safetensors.torch import load_file

from conftest import assert_adapter_changes_tiny_model
from realign import tracking

# Long enough to be killed after its first checkpoint, short enough to finish in seconds once resumed.
ALIGN = ["align", "--method", "sft", "--sft-run", "none", "--model", "tiny", "--data.num_examples", "32",
         "--train.max_steps", "150", "--train.save_steps", "3", "--train.per_device_train_batch_size", "4",
         "--train.max_length", "96", "--train.learning_rate", "1e-3", "--eval.enabled", "false"]


def _env(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "REALIGN_CHECKPOINT_DIR": str(tmp_path / "checkpoints")}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _checkpoints(tmp_path):
    return [p for p in (tmp_path / "checkpoints").glob("align-*/checkpoint-*") if (p / "trainer_state.json").is_file()]


def _align_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{tracking.TAG_STAGE}` = 'align'")


def test_a_stage_killed_mid_training_is_never_reused_and_the_same_command_resumes(tmp_path):
    env = _env(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "realign.cli", *ALIGN], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _checkpoints(tmp_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the stage must still be training when it is killed"
    checkpoint = max(_checkpoints(tmp_path), key=lambda p: int(p.name.split("-")[1]))
    saved_step = int(checkpoint.name.split("-")[1])

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (killed,) = _align_runs()
    assert killed.info.status == "RUNNING" and tracking.TAG_COMPLETE not in killed.data.tags
    assert not mlflow.MlflowClient().list_artifacts(killed.info.run_id, "adapter")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        assert tracking.latest_run("align", "tiny", "sft") is None, "a killed run is never an input"
        params = {k: v for k, v in killed.data.params.items() if not k.startswith(("lora.trainable", "model.par"))}
        assert tracking.find_reusable_run("align", params, "realign") is None, "a killed run is never reused"
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")

    rerun = subprocess.run([sys.executable, "-m", "realign.cli", *ALIGN], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed_id = rerun.stdout.strip().splitlines()[-1].split()[-1]
    resumed = mlflow.get_run(resumed_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags[tracking.TAG_COMPLETE] == "true"
    assert resumed.data.tags[tracking.TAG_RESUMED_FROM] == f"{killed.info.run_id}/checkpoint-{saved_step}"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(resumed_id, "loss")]
    assert min(steps) == saved_step + 1 and max(steps) == 150, "training went on from the checkpoint"
    dead = mlflow.get_run(killed.info.run_id)
    assert dead.info.status == "FAILED" and resumed_id in dead.data.tags[tracking.TAG_ERROR]
    assert not list((tmp_path / "checkpoints").glob("align-*/checkpoint-*")), "a finished run leaves no checkpoint"
    adapter = mlflow.artifacts.download_artifacts(run_id=resumed_id, artifact_path="adapter",
                                                  dst_path=str(tmp_path / "adapter"))
    assert any(t.abs().sum() > 0 for k, t in load_file(f"{adapter}/adapter_model.safetensors").items()
               if "lora_B" in k)


def test_two_processes_under_accelerate_launch_make_one_run_with_a_working_adapter(tmp_path):
    """DPO on an SFT run under `accelerate launch` with the shipped DDP config, 2 CPU processes (gloo).

    Both processes read the SFT input and the merged start weights the main process wrote; rank 0 alone logs.
    """
    config = Path(__file__).resolve().parent.parent / "conf" / "accelerate" / "ddp.yaml"
    env = _env(tmp_path)
    budget = ["--model", "tiny", "--data.num_examples", "16", "--train.max_steps", "2",
              "--train.per_device_train_batch_size", "4", "--train.max_length", "96", "--train.learning_rate", "1e-2",
              "--eval.judge", "keyword", "--eval.num_prompts", "4", "--eval.max_new_tokens", "8"]
    sft = subprocess.run([sys.executable, "-m", "realign.cli", "align", "--method", "sft", "--sft-run", "none",
                          *budget, "--eval.enabled", "false"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert sft.returncode == 0, sft.stderr[-2000:]
    sft_id = sft.stdout.strip().splitlines()[-1].split()[-1]
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                             "--num_processes", "2", "-m", "realign.cli", "align", "--method", "dpo",
                             "--sft-run", sft_id, *budget],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = {line.split()[-1] for line in result.stdout.splitlines() if line.startswith("run ")}

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            if r.info.run_id != sft_id]
    assert len(runs) == 1, "only the main process opens a run"
    run = runs[0]
    assert printed == {run.info.run_id}, "every process reports the main process's run"
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_COMPLETE] == "true"
    assert run.data.tags["realign.source.sft"] == sft_id
    # 16 pairs, 4 per process, 2 steps: one epoch only if both processes trained on their own half.
    assert run.data.metrics["epoch"] == pytest.approx(1.0)
    assert "harmful_score" in run.data.metrics, "the main process evaluated"
    adapter = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter",
                                                  dst_path=str(tmp_path / "adapter"))
    assert json.loads(Path(adapter, "adapter_config.json").read_text())["r"] == 16
    assert_adapter_changes_tiny_model(adapter)
