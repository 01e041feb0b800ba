"""`realign search` on the tiny model: a study's trials as nested fuse runs on the search half of the prompts,
conditional parameters, reuse of identical trials, a failed trial that does not stop the search, resuming the
study, the front re-evaluated on the report half, and bad search files refused before the first trial."""

import json

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from realign import tracking
from realign.cli import main
from realign.stages.align import run_align
from realign.stages.attack import run_attack
from realign.stages.search import run_search

from conftest import TINY, module_store
from test_fuse import ATTACK

QUIET_EVAL = {"eval.judge": "keyword", "eval.num_prompts": 8, "eval.max_new_tokens": 4, "eval.task_examples": 4,
              "eval.benign_prompts": 2}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    with module_store(tmp_path_factory, "search-store") as (folder, uri):
        quiet = {**TINY, "eval.enabled": "false"}
        sft = run_align({**quiet, "method": "sft"})
        dpo = run_align({**quiet, "method": "dpo", "sft_run": sft})
        # evaluated, so the front's figure has the unrepaired model as its anchor
        attack = run_attack({**ATTACK, "source_run": dpo, "eval.enabled": "true",
                             **{k: str(v) for k, v in QUIET_EVAL.items()}})
        yield {"folder": folder, "uri": uri, "sft": sft, "dpo": dpo, "attack": attack}


def _search_file(tmp_path, store, space, study="tiny-study", repair=None, **extra):
    spec = {"study": study, "model": "tiny", "experiment": "searches",
            "steps": {"repair": {"stage": "fuse", "finetuned_run": store["attack"], "reference_run": store["dpo"],
                                 "method": "task_arithmetic", **QUIET_EVAL, **(repair or {})}},
            "space": space, "sampler": "random", "seed": 0, **extra}
    path = tmp_path / f"{study}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _runs(stage):
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return [r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == stage]


def _pareto(parent_id):
    """The parent's search/pareto.json (MLflow's table), one dict per trial; NaN cells as None."""
    experiment_id = mlflow.get_run(parent_id).info.experiment_id
    table = mlflow.MlflowClient().load_table(experiment_id, "search/pareto.json", run_ids=[parent_id])
    return [{k: (None if v != v else v) for k, v in row.items()} for row in table.to_dict("records")]


def test_trials_are_nested_fuse_runs_on_the_search_half_and_the_front_is_reported_on_the_other(store, tmp_path):
    space = {"repair.method": {"type": "categorical", "choices": ["task_arithmetic", "ties"]},
             "repair.scale": {"type": "float", "low": 0.2, "high": 1.0},
             "repair.density": {"type": "float", "low": 0.1, "high": 0.9, "when": {"repair.method": ["ties"]}}}
    path = _search_file(tmp_path, store, space)
    parent = run_search({"name": path, "n_trials": 4, "storage": f"sqlite:///{tmp_path / 'study.db'}"})
    parent_run = mlflow.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["mlflow.runName"] == "search/tiny-study"
    assert parent_run.data.metrics["search_seconds_per_trial"] > 0
    rows = _pareto(parent)
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows)
    first = mlflow.get_run(rows[0]["run_id"])
    search_n, search_digest = first.data.metrics["harmful_score_n"], first.data.tags[tracking.TAG_PROMPTS_DIGEST]
    evaluation = next(r for r in _runs("evaluate"))
    assert evaluation.data.tags[tracking.TAG_PROMPTS_DIGEST] != search_digest, "the report half is other prompts"
    for row in rows:
        params = json.loads(row["params"])
        assert ("repair.density" in params) == (params["repair.method"] == "ties"), "density only where ties"
        run = mlflow.get_run(row["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["realign.study"] == "tiny-study"
        assert run.data.params["eval.prompt_split"] == "search"
        assert run.data.metrics["harmful_score"] == pytest.approx(row["harmful_score"])
        # the report evaluation leaves the trial's own search-half numbers (n prompts, prompt digest) as they were
        assert run.data.metrics["harmful_score_n"] == search_n
        assert run.data.tags[tracking.TAG_PROMPTS_DIGEST] == search_digest
        if row["on_front"]:
            assert row["report_harmful_score"] is not None and "report_harmful_score" in run.data.metrics
        else:
            assert row["report_harmful_score"] is None
    evaluations = _runs("evaluate")
    assert evaluations and all(r.data.params["eval.prompt_split"] == "report" for r in evaluations)
    assert sum(r["on_front"] for r in rows) == len(evaluations)

    figure_file = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="figures/pareto.html",
                                                      dst_path=str(tmp_path / "figure"))
    page = open(figure_file).read()
    assert "attacked (unrepaired) (all prompts)" in page  # the reference (dpo) was not evaluated here: no anchor
    assert "safety reference (all prompts)" not in page
    assert "Pareto front (search half)" in page

    again = run_search({"name": path, "n_trials": 2, "storage": f"sqlite:///{tmp_path / 'study.db'}"})
    assert len(_pareto(again)) == 6, "the second call adds 2 trials to the same study"


def test_an_identical_trial_reuses_the_finished_run(store, tmp_path):
    path = _search_file(tmp_path, store, {"repair.method": {"type": "categorical", "choices": ["average"]}},
                        study="one-point")
    before = len(_runs("fuse"))
    parent = run_search({"name": path, "n_trials": 3, "storage": f"sqlite:///{tmp_path / 'one.db'}"})
    rows = _pareto(parent)
    assert len({r["run_id"] for r in rows}) == 1 and len(_runs("fuse")) == before + 1


def test_trials_that_differ_only_in_sparsity_select_from_the_first_trials_scores(store, tmp_path):
    spec = {"study": "kept-scores", "model": "tiny", "experiment": "searches",
            "steps": {"region": {"stage": "score", "model_run": store["dpo"], "method": "wanda", "nsamples": 4,
                                 "data.max_length": 64, "eval.enabled": False},
                      "repair": {"stage": "fuse", "finetuned_run": store["attack"], "reference_run": store["dpo"],
                                 "mask_run": "${region}", "method": "restore", "selection": "all", **QUIET_EVAL}},
            "space": {"region.sparsity": {"type": "float", "low": 0.01, "high": 0.3}},
            "sampler": "random", "seed": 0}
    path = tmp_path / "kept-scores.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    parent = run_search({"name": str(path), "n_trials": 3, "storage": f"sqlite:///{tmp_path / 'kept.db'}"})
    regions = sorted((r for r in _runs("score") if r.data.tags.get("mlflow.parentRunId") == parent),
                     key=lambda r: int(r.data.tags["realign.trial"]))
    assert len(regions) == 3 and all(r.info.status == "FINISHED" for r in regions)
    first = regions[0]
    assert "realign.scores_from" not in first.data.tags
    assert [r.data.tags.get("realign.scores_from") for r in regions[1:]] == [first.info.run_id] * 2
    fractions = [r.data.metrics["selected_fraction"] for r in regions]
    sparsities = [float(r.data.params["sparsity"]) for r in regions]
    assert fractions == pytest.approx(sparsities, abs=0.01), "each trial selects its own fraction"

    without = _search_file(tmp_path, store, spec["space"], study="no-kept-scores", kept_scores_gb=0)
    raw = yaml.safe_load(open(without))
    raw["steps"] = {**spec["steps"], "region": {**spec["steps"]["region"], "nsamples": 3}}
    open(without, "w").write(yaml.safe_dump(raw, sort_keys=False))
    parent = run_search({"name": without, "n_trials": 2, "storage": f"sqlite:///{tmp_path / 'kept.db'}"})
    regions = [r for r in _runs("score") if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(regions) == 2 and not any("realign.scores_from" in r.data.tags for r in regions)


def test_a_failed_trial_is_failed_in_mlflow_and_the_study_and_the_search_goes_on(store, tmp_path):
    # lora mode cannot fuse an attack on the DPO model with the DPO adapter (different bases): that trial fails
    space = {"repair.mode": {"type": "categorical", "choices": ["full", "lora"]}}
    path = _search_file(tmp_path, store, space, study="with-failures")
    parent = run_search({"name": path, "n_trials": 6, "storage": f"sqlite:///{tmp_path / 'fail.db'}"})
    rows = _pareto(parent)
    states = {json.loads(r["params"])["repair.mode"]: r["state"] for r in rows}
    assert states == {"full": "COMPLETE", "lora": "FAIL"}
    failed = [r for r in _runs("fuse") if r.data.tags.get("realign.study") == "with-failures"
              and r.info.status == "FAILED"]
    assert failed and "mode=lora needs adapters on one base" in failed[0].data.tags[tracking.TAG_ERROR]


@pytest.mark.parametrize("space, extra, fragment", [
    ({"repair.no_such_option": {"type": "float", "low": 0, "high": 1}}, {}, "fuse has no option 'no_such_option'"),
    ({"repair.scale": {"type": "float", "low": 0.5, "high": 0.5}}, {}, "has an empty range [0.5, 0.5]"),
    ({"repair.scale": {"type": "log-float", "low": 0, "high": 1}}, {}, "needs low > 0"),
    ({"repair.method": {"type": "categorical", "choices": []}}, {}, "has no choices"),
    ({"repair.scale": {"type": "float", "low": 0.1, "high": 1}}, {"sampler": "grid-of-doom"}, "unknown sampler"),
    ({"repair.scale": {"type": "float", "low": 0.1, "high": 1}},
     {"objectives": [{"metric": "happiness", "direction": "maximize"}]}, "objective 'happiness' is not a metric"),
    ({"repair.density": {"type": "float", "low": 0.1, "high": 1, "when": {"repair.method": ["ties"]}},
      "repair.method": {"type": "categorical", "choices": ["ties"]}}, {}, "not a parameter listed before it"),
    ({"nostep.scale": {"type": "float", "low": 0.1, "high": 1}}, {}, "parameter 'nostep.scale' names no step"),
    ({"repair.scale": {"type": "float", "low": 0.1, "high": 1}}, {"kept_scores_gb": -1},
     "kept_scores_gb=-1 is not a number >= 0"),
])
def test_a_bad_search_file_fails_in_one_line_before_the_first_trial(store, tmp_path, space, extra, fragment):
    path = _search_file(tmp_path, store, space, study="bad", **extra)
    before, parents = len(_runs("fuse")), len(_runs("search"))
    result = CliRunner().invoke(main, ["search", "--name", path, "--storage", f"sqlite:///{tmp_path / 'bad.db'}"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert len(_runs("fuse")) == before and len(_runs("search")) == parents, "no trial, no parent run"


def test_compare_shows_the_front_of_every_search(store, tmp_path):
    from realign.stages.compare import run_compare

    space = {"repair.scale": {"type": "float", "low": 0.2, "high": 1.0}}
    for study in ("front-a", "front-b"):
        run_search({"name": _search_file(tmp_path, store, space, study=study), "n_trials": 2,
                    "storage": f"sqlite:///{tmp_path / 'fronts.db'}"})
    compare_id = run_compare({"experiment": "searches"})
    folder = mlflow.artifacts.download_artifacts(run_id=compare_id, dst_path=str(tmp_path / "compare"))
    import pandas as pd

    table = pd.read_csv(f"{folder}/tables/search_fronts.csv")
    assert {"front-a", "front-b"} <= set(table["study"]), "every search of the experiment, not only the newest"
    assert table["report_harmful_score"].notna().all(), "every front trial carries its report-half numbers"
    for name in ("harmful_score", "report_harmful_score"):
        assert (table[f"{name} ci95_low"] <= table[name]).all() and (table[name] <= table[f"{name} ci95_high"]).all()
    for study in ("front-a", "front-b"):
        figure = json.load(open(f"{folder}/figures/search_{study}.json"))
        assert "Pareto front (search half)" in {trace.get("name") for trace in figure["data"]}


def test_a_search_step_of_a_pipeline_fills_its_study_once_and_nests_under_the_pipeline(store, tmp_path):
    from realign.stages.pipeline import run_pipeline

    path = _search_file(tmp_path, store, {"repair.scale": {"type": "float", "low": 0.2, "high": 1.0}},
                        study="in-pipeline", seed=7)  # points no other test's study samples: no reuse
    experiment_file = tmp_path / "with-search.yaml"
    experiment_file.write_text(yaml.safe_dump({"experiment": "searches", "model": "tiny", "steps": {
        "sweep": {"stage": "search", "name": path, "n_trials": 2, "storage": f"sqlite:///{tmp_path / 'p.db'}",
                  "repair.finetuned_run": store["attack"]}}}))
    first = run_pipeline({"name": str(experiment_file)})
    (search_parent,) = [r for r in _runs("search") if r.data.tags.get("realign.study") == "in-pipeline"]
    assert search_parent.data.tags["mlflow.parentRunId"] == first
    rows = _pareto(search_parent.info.run_id)
    assert len(rows) == 2 and all(mlflow.get_run(r["run_id"]).data.tags["mlflow.parentRunId"]
                                  == search_parent.info.run_id for r in rows)
    run_pipeline({"name": str(experiment_file)})
    assert len([r for r in _runs("search") if r.data.tags.get("realign.study") == "in-pipeline"]) == 1, \
        "the study already holds n_trials: the second pipeline call reuses the search"
    bad = tmp_path / "bad-search.yaml"
    bad.write_text(yaml.safe_dump({"experiment": "searches", "model": "tiny", "steps": {
        "sweep": {"stage": "search", "name": path, "nostep.scale": 1}}}))
    result = CliRunner().invoke(main, ["pipeline", "--name", str(bad)])
    assert result.exit_code == 2 and "override 'nostep.scale' names no step" in result.output, result.output


def _cli_env(store):
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _study_trials(storage, study):
    import optuna

    return optuna.load_study(study_name=study, storage=storage).trials


def test_a_search_killed_mid_trial_loses_only_that_trial_and_resumes(store, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    # a longer evaluation, so that a trial is in flight for long enough to be caught
    path = _search_file(tmp_path, store, {"repair.scale": {"type": "float", "low": 0.2, "high": 1.0}},
                        study="killed", repair={"eval.num_prompts": 32, "eval.max_new_tokens": 32}, seed=8)
    storage = f"sqlite:///{tmp_path / 'killed.db'}"
    command = [sys.executable, "-m", "realign.cli", "search", "--name", path, "--n-trials", "20", "--storage", storage]
    in_flight = None
    # Killed as soon as a trial is seen RUNNING; a run still RUNNING after its process died was in flight when it
    # died. Should the trial have ended in the moment between, the search starts again and is killed again.
    # (Never SIGSTOP a writer instead: frozen inside a transaction, it would hold the store locked.)
    for _attempt in range(3):
        process = subprocess.Popen(command, cwd=tmp_path, env=_cli_env(store), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline, running = time.monotonic() + 300, []
        while not running and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            running = [r for r in _runs("fuse") if r.data.tags.get("realign.study") == "killed"
                       and r.info.status == "RUNNING"]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        killed_at = time.monotonic()
        if running and mlflow.get_run(running[0].info.run_id).info.status == "RUNNING":
            in_flight = running[0]
            break
    assert in_flight is not None, "a trial must be in flight when the search is killed"
    killed_trial = int(in_flight.data.tags["realign.trial"])
    finished_before = [t for t in _study_trials(storage, "killed") if t.state.name == "COMPLETE"]
    time.sleep(max(0.0, killed_at + 16 - time.monotonic()))  # Optuna's grace period for a silent heartbeat

    parent = run_search({"name": path, "n_trials": 2, "storage": storage})
    trials = {t.number: t.state.name for t in _study_trials(storage, "killed")}
    assert trials[killed_trial] == "FAIL", "the trial in flight is failed, not left running"
    assert sorted(trials) == list(range(len(trials))) and set(trials.values()) <= {"COMPLETE", "FAIL"}
    assert sum(state == "COMPLETE" for state in trials.values()) == len(finished_before) + 2
    assert sum(state == "FAIL" for state in trials.values()) <= _attempt + 1, "only trials in flight at a kill"
    assert mlflow.get_run(in_flight.info.run_id).info.status == "FAILED"
    killed_parent = mlflow.get_run(in_flight.data.tags["mlflow.parentRunId"])
    assert killed_parent.info.status == "FAILED" and killed_parent.info.run_id != parent
    assert len(_pareto(parent)) == len(trials)


def test_two_processes_share_one_study_and_lose_or_double_no_trial(store, tmp_path):
    import subprocess
    import sys

    path = _search_file(tmp_path, store, {"repair.scale": {"type": "float", "low": 0.2, "high": 1.0}},
                        study="shared", seed=9)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    command = [sys.executable, "-m", "realign.cli", "search", "--name", path, "--n-trials", "3", "--storage", storage]
    processes = [subprocess.Popen(command, cwd=tmp_path, env=_cli_env(store), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
    trials = _study_trials(storage, "shared")
    assert sorted(t.number for t in trials) == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["repair.scale"] for t in trials}) == 6, "the two processes sample different points"
    run_ids = [t.user_attrs["run:repair"] for t in trials]
    assert len(set(run_ids)) == 6
    fuse_runs = [r for r in _runs("fuse") if r.data.tags.get("realign.study") == "shared"]
    assert sorted(r.info.run_id for r in fuse_runs) == sorted(run_ids), "one run per trial, none extra"
    assert all(r.info.status == "FINISHED" for r in fuse_runs)
    parents = {r.data.tags["mlflow.parentRunId"] for r in fuse_runs}
    assert len(parents) == 2, "each process's trials nest under its own search run"
