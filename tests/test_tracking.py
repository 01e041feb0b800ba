"""The tracking layer: run lifecycle, resume under `mlflow run`, input resolution and refusals."""

import os

import mlflow
import pytest

from conftest import stand_in_adapter
from realign import tracking
from realign.errors import RealignError


def _all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _fake_stage_run(stage="align", method="sft", base="tiny", status="FINISHED", adapter=True, tmp_path=None):
    """A run shaped like a finished stage, made with plain MLflow calls."""
    mlflow.set_experiment("realign")
    with mlflow.start_run() as run:
        mlflow.set_tags({tracking.TAG_STAGE: stage, tracking.TAG_METHOD: method, tracking.TAG_BASE_MODEL: base})
        if adapter:
            folder = stand_in_adapter(tmp_path / f"adapter-{run.info.run_id}")
            mlflow.log_artifacts(str(folder), "adapter")
        if status == "FINISHED":
            mlflow.set_tag(tracking.TAG_COMPLETE, "true")
    if status != "FINISHED":
        mlflow.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_stage_run_finishes_with_tags(tracking_store):
    with tracking.stage_run("align", run_name="align/dpo") as run:
        run.set_tags({tracking.TAG_METHOD: "dpo"})
        run_id = run.run_id
    info = mlflow.get_run(run_id)
    assert info.info.status == "FINISHED"
    assert info.data.tags[tracking.TAG_STAGE] == "align"
    assert info.data.tags["mlflow.runName"] == "align/dpo"
    assert len(_all_runs()) == 1


def test_stage_run_marks_failure_with_error_tag(tracking_store):
    with pytest.raises(RealignError):
        with tracking.stage_run("align") as run:
            run_id = run.run_id
            raise RealignError("bad thing", "do the other thing")
    info = mlflow.get_run(run_id)
    assert info.info.status == "FAILED"
    assert info.data.tags[tracking.TAG_ERROR] == "bad thing — do the other thing"


def test_resumes_the_run_mlflow_run_created(tracking_store, monkeypatch):
    mlflow.set_experiment("realign")
    created = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("realign").experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    with tracking.stage_run("align") as run:
        assert run.run_id == created.info.run_id
    assert len(_all_runs()) == 1
    assert mlflow.get_run(created.info.run_id).info.status == "FINISHED"


def test_resolve_input_downloads_adapter_and_records_lineage(tracking_store, tmp_path):
    sft_id = _fake_stage_run(tmp_path=tmp_path)
    with tracking.stage_run("align") as run:
        found = run.resolve_input(f"runs:/{sft_id}/adapter", "sft", ("align",), "tiny", methods=("sft",))
        assert found.run_id == sft_id
        assert (found.local_dir / "adapter_config.json").is_file()
        run_id = run.run_id
    assert mlflow.get_run(run_id).data.tags["realign.source.sft"] == sft_id


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("missing", "does not exist"),
        ("not-an-id", "is not a run id"),
        ("wrong-stage", "is a attack run, not align"),
        ("wrong-method", "is align/dpo, not align/sft"),
        ("other-base", "belongs to base model 'smollm2-135m', not 'tiny'"),
        ("failed", "is FAILED, not FINISHED"),
        ("no-adapter", "has no adapter/ artifact"),
    ],
)
def test_resolve_input_refusals(tracking_store, tmp_path, kind, fragment):
    ref = {
        "missing": lambda: "0" * 32,
        "not-an-id": lambda: "last-week",
        "wrong-stage": lambda: _fake_stage_run(stage="attack", tmp_path=tmp_path),
        "wrong-method": lambda: _fake_stage_run(method="dpo", tmp_path=tmp_path),
        "other-base": lambda: _fake_stage_run(base="smollm2-135m", tmp_path=tmp_path),
        "failed": lambda: _fake_stage_run(status="FAILED", tmp_path=tmp_path),
        "no-adapter": lambda: _fake_stage_run(adapter=False, tmp_path=tmp_path),
    }[kind]()
    with pytest.raises(RealignError, match=fragment):
        with tracking.stage_run("align") as run:
            run.resolve_input(ref, "sft", ("align",), "tiny", methods=("sft",))


def test_latest_run_picks_newest_finished(tracking_store, tmp_path):
    first = _fake_stage_run(method="dpo", tmp_path=tmp_path)
    second = _fake_stage_run(method="dpo", tmp_path=tmp_path)
    _fake_stage_run(method="dpo", status="FAILED", tmp_path=tmp_path)
    assert tracking.latest_run("align", "tiny", "dpo") == second != first
    assert tracking.latest_run("align", "tiny", "kto") is None


def test_unwritable_store_is_one_line(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{locked}/sub/mlflow.db")
    with pytest.raises(RealignError, match="is not writable"):
        with tracking.stage_run("align"):
            pass


def test_metrics_callback_logs_into_the_stage_run(tracking_store):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    with tracking.stage_run("align") as run:
        callback = tracking.metrics_callback(run.run_id)
        state = TrainerState()
        state.global_step = 3
        callback.on_log(TrainingArguments(output_dir=str(run.workdir), report_to="none"), state, TrainerControl(),
                        logs={"loss": 1.5, "rewards/chosen": 0.25, "note": "text"})
        run_id = run.run_id
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.value, m.step) for m in history] == [(1.5, 3)]
    assert mlflow.get_run(run_id).data.metrics["rewards/chosen"] == 0.25


def test_a_stage_start_marks_running_runs_of_dead_processes_failed(tracking_store):
    import socket
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("realign")
    host = socket.gethostname()
    owners = {"dead": f"{host}:{dead_pid}", "alive": f"{host}:{os.getpid()}", "elsewhere": f"other-host:{dead_pid}"}
    runs = {}
    for name, process in owners.items():
        runs[name] = client.create_run(experiment_id).info.run_id
        client.set_tag(runs[name], tracking.TAG_PROCESS, process)

    with tracking.stage_run("align") as run:
        assert mlflow.get_run(run.run_id).data.tags[tracking.TAG_PROCESS] == f"{host}:{os.getpid()}"

    dead = mlflow.get_run(runs["dead"])
    assert dead.info.status == "FAILED" and "died before the run ended" in dead.data.tags[tracking.TAG_ERROR]
    assert mlflow.get_run(runs["alive"]).info.status == "RUNNING"
    assert mlflow.get_run(runs["elsewhere"]).info.status == "RUNNING", "another machine's process is not judged"
