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


def test_an_explicit_experiment_wins_over_mlflow_experiment_name(tracking_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-the-environment")
    with tracking.stage_run("align", experiment="asked-for") as run:
        explicit = run.run_id
    with tracking.stage_run("align") as run:
        implicit = run.run_id
    assert tracking.experiment_of(explicit) == "asked-for"
    assert tracking.experiment_of(implicit) == "from-the-environment"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    with tracking.stage_run("align") as run:
        assert tracking.experiment_of(run.run_id) == "realign"


def test_runs_made_on_the_way_under_mlflow_run_nest_under_its_run_and_keep_its_run_id(tracking_store, monkeypatch):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("chosen")
    created = client.create_run(experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", created)
    with tracking.stage_run("align", new_run=True) as run:  # an input trained first
        on_the_way = run.run_id
    assert os.environ["MLFLOW_RUN_ID"] == created, "ending a run must not drop mlflow run's run id"
    with tracking.stage_run("attack") as run:
        assert run.run_id == created
    made = mlflow.get_run(on_the_way)
    assert made.info.experiment_id == experiment_id and made.data.tags["mlflow.parentRunId"] == created
    assert mlflow.get_run(created).data.tags[tracking.TAG_STAGE] == "attack"
    assert {r.info.experiment_id for r in _all_runs()} == {experiment_id}


def test_the_loser_of_a_create_race_uses_the_winners_experiment(tracking_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    real_create = MlflowClient.create_experiment

    def create_after_someone_else(self, name, *args, **kwargs):
        real_create(self, name)  # another process wins the race a moment earlier
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_experiment", create_after_someone_else)
    experiment_id = tracking.get_or_create_experiment("contested")
    assert experiment_id == mlflow.get_experiment_by_name("contested").experiment_id


def test_store_calls_retry_transient_errors_then_fail_in_one_line(monkeypatch):
    waits = []
    monkeypatch.setattr(tracking.store.time, "sleep", waits.append)
    attempts = iter([RuntimeError("(sqlite3.OperationalError) database is locked")] * 2 + ["done"])

    def flaky():
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert tracking.store_call(flaky) == "done" and len(waits) == 2

    def not_transient():
        raise ValueError("bad filter")

    with pytest.raises(ValueError):
        tracking.store_call(not_transient)
    clock = iter(range(0, 1000))
    monkeypatch.setattr(tracking.store.time, "monotonic", lambda: next(clock))

    def always_locked():
        raise RuntimeError("database is locked")

    with pytest.raises(tracking.StoreError, match="stayed locked by another process"):
        tracking.store_call(always_locked)


def _cli(args, uri, cwd, wait_s=None):
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
    if wait_s is not None:
        env["REALIGN_STORE_WAIT_S"] = wait_s  # how long the command waits for a locked store before it fails
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "realign.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_store_that_cannot_be_reached_is_one_line_and_exit_2(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _cli(["compare"], f"http://127.0.0.1:{port}", tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking store http://127.0.0.1:{port} is not answering")


def test_a_sqlite_store_that_stays_locked_is_one_line_and_exit_2(tmp_path):
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # the store exists, migrated
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing for as long as the command waits
    try:
        result = _cli(["align", "--model", "tiny"], uri, tmp_path, wait_s="8")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "stayed locked by another process" in lines[0], result.stderr


def test_a_deleted_experiment_is_refused_in_one_line(tracking_store):
    client = mlflow.MlflowClient()
    client.delete_experiment(client.create_experiment("old"))
    with pytest.raises(RealignError, match="experiment 'old' was deleted — restore it"):
        with tracking.stage_run("align", experiment="old"):
            pass
