"""Six realign commands started at the same moment against one fresh store: none fails, none is lost or doubled.

Each of 6 worker processes imports realign once, then for every round waits on a shared barrier and runs one CLI
command (two align and two evaluate stages, two two-step pipelines, on the tiny model) in that round's fresh
experiment. The align runs both log their training data, the same dataset, into the same experiment.
Against a local SQLite store every round uses a new file, so all six also race to create and migrate it; against
an `mlflow server` every round races to create its experiment. After each round: every command exited 0 and every
run of the experiment is FINISHED, complete and accounted for by a command's own output.
"""

import contextlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
import yaml

from conftest import free_port

ROUNDS = 10
TINY = ["--model", "tiny"]
TRAIN = ["train.max_steps=1", "train.per_device_train_batch_size=2", "train.max_length=96", "data.num_examples=8",
         "eval.enabled=false", "train.save_steps=0"]
EVAL = ["eval.judge=keyword", "eval.num_prompts=1", "eval.max_new_tokens=2"]
PIPELINE = {  # two evaluations: the pipeline's parent run and its nesting race the others
    "model": "tiny",
    "steps": {
        "one": {"stage": "evaluate", "eval.judge": "keyword", "eval.num_prompts": 1, "eval.max_new_tokens": 2},
        "two": {"stage": "evaluate", "eval.judge": "keyword", "eval.num_prompts": 2, "eval.max_new_tokens": 2},
    },
}


def _commands(spec_path):
    align = ["align", "--method", "sft", "--sft-run", "none", *TINY, *TRAIN]
    evaluate = ["evaluate", *TINY, *EVAL]
    pipeline = ["pipeline", "--name", str(spec_path)]
    return [align, align, evaluate, evaluate, pipeline, pipeline]


def _worker(index, command, rounds, barrier, results):
    """One process: for each (tracking uri, experiment), wait for the others, then run `command` once."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("MLFLOW_RUN_ID", None)
    from realign import cli

    for uri, experiment in rounds:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        out, err = io.StringIO(), io.StringIO()
        barrier.wait(timeout=300)
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main([*command, "--experiment", experiment], standalone_mode=False)
            except SystemExit as exit_:
                code = exit_.code or 0
            except BaseException as other:  # a traceback is a failure of its own
                code = f"{type(other).__name__}: {other}"
        lines = out.getvalue().strip().splitlines()
        results.put((index, experiment, code, lines[-1].split()[-1] if lines else "", err.getvalue()[-1500:]))


def _race(tmp_path, rounds):
    """Run every round with 6 workers; returns {experiment: [(index, code, run id, stderr)]}."""
    spec = tmp_path / "race.yaml"
    spec.write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(6), context.Queue()
    workers = [context.Process(target=_worker, args=(i, command, rounds, barrier, results))
               for i, command in enumerate(_commands(spec))]
    for worker in workers:
        worker.start()
    outcomes = {}
    for _ in range(6 * len(rounds)):
        index, experiment, code, run_id, err = results.get(timeout=600)
        outcomes.setdefault(experiment, []).append((index, code, run_id, err))
    for worker in workers:
        worker.join(timeout=60)
    return outcomes


def _check_round(experiment, outcome, tmp_path):
    for index, code, _, err in outcome:
        assert code == 0, f"{experiment}, worker {index}: exit {code}\n{err}"
    exp = mlflow.get_experiment_by_name(experiment)
    assert exp is not None, f"{experiment} was never created"
    runs = {r.info.run_id: r for r in mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list")}
    accounted = set()
    for index, _, run_id, _ in outcome:
        assert run_id in runs, f"{experiment}: worker {index}'s run {run_id} is not in its experiment"
        accounted.add(run_id)
        if runs[run_id].data.tags.get("realign.stage") == "pipeline":
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="pipeline/steps.json",
                                                       dst_path=str(tmp_path / run_id))
            table = json.loads(open(path).read())
            accounted |= {row[table["columns"].index("run_id")] for row in table["data"]}
    assert set(runs) == accounted, f"{experiment}: runs no command made: {set(runs) - accounted}"
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags.get("realign.complete") == "true", run.data.tags
    # 4 stage runs and 2 pipeline parents; a pipeline step may reuse a finished evaluate run of the same config
    # (the other pipeline's, or for step one a command's), so 0 to 4 runs more.
    assert 6 <= len(runs) <= 6 + 4


def test_six_commands_at_once_on_fresh_sqlite_stores(tmp_path):
    rounds = [(f"sqlite:///{tmp_path / f'round-{k}.db'}", f"round-{k}") for k in range(ROUNDS)]
    outcomes = _race(tmp_path, rounds)
    assert len(outcomes) == ROUNDS
    for uri, experiment in rounds:
        mlflow.set_tracking_uri(uri)
        _check_round(experiment, outcomes[experiment], tmp_path)


@pytest.fixture
def fresh_server(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "2"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("mlflow server did not answer /health")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_six_commands_at_once_against_a_fresh_server(tmp_path, fresh_server):
    rounds = [(fresh_server, f"round-{k}") for k in range(ROUNDS)]
    outcomes = _race(tmp_path, rounds)
    mlflow.set_tracking_uri(fresh_server)
    for _, experiment in rounds:
        _check_round(experiment, outcomes[experiment], tmp_path)
