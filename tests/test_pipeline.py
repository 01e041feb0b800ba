"""`pipeline`: experiment files expanded into stage runs, with reuse, on the tiny model."""

import mlflow
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from realign import tracking
from realign.cli import main
from realign.errors import RealignError
from realign.stages.align import run_align
from realign.stages.pipeline import check_cells, load_experiment, run_pipeline

TINY_TRAIN = {"train.max_steps": 2, "train.per_device_train_batch_size": 4, "train.max_length": 96,
              "train.learning_rate": 1e-2}
NO_EVAL = {"eval.enabled": False}

TINY_CHAIN = {
    "experiment": "pipe",
    "model": "tiny",
    "steps": {
        "sft": {"stage": "align", "method": "sft", "data.num_examples": 16, **TINY_TRAIN, **NO_EVAL},
        "dpo": {"stage": "align", "method": "dpo", "sft_run": "${sft}", "data.num_examples": 16, **TINY_TRAIN,
                **NO_EVAL},
        "attack": {"stage": "attack", "source_run": "${dpo}", "size": 12, "ratio": 0.25, **TINY_TRAIN, **NO_EVAL},
    },
}


def _write(tmp_path, spec, name="chain.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _stage_runs(stage):
    return mlflow.search_runs(experiment_names=["pipe"], filter_string=f"tags.`realign.stage` = '{stage}'",
                              output_format="list")


def _steps(parent_id):
    experiment_id = mlflow.get_run(parent_id).info.experiment_id
    table = mlflow.MlflowClient().load_table(experiment_id, "pipeline/steps.json", run_ids=[parent_id])
    return {row.step: (row.run_id, bool(row.reused)) for row in table.itertuples()}


def _cells(parent_id):
    """step -> the run ids of its cells, in order."""
    experiment_id = mlflow.get_run(parent_id).info.experiment_id
    table = mlflow.MlflowClient().load_table(experiment_id, "pipeline/steps.json", run_ids=[parent_id])
    cells = {}
    for row in table.itertuples():
        cells.setdefault(row.step, []).append(row.run_id)
    return cells


def test_second_call_reuses_every_stage_run(tracking_store, tmp_path):
    path = _write(tmp_path, TINY_CHAIN)
    first = _steps(run_pipeline({"name": path}))
    assert not any(reused for _, reused in first.values())
    sft, dpo, attack = (first[s][0] for s in ("sft", "dpo", "attack"))
    # Lineage: each step got the run id of the step it names.
    assert mlflow.get_run(dpo).data.tags["realign.source.sft"] == sft
    assert mlflow.get_run(attack).data.tags["realign.source.aligned"] == dpo
    parent = mlflow.get_run(mlflow.get_run(attack).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["realign.stage"] == "pipeline" and parent.info.status == "FINISHED"

    second_id = run_pipeline({"name": path})
    second = _steps(second_id)
    assert second == {step: (run_id, True) for step, (run_id, _) in first.items()}
    assert len(_stage_runs("align")) == 2 and len(_stage_runs("attack")) == 1


def test_a_changed_param_reruns_that_step_and_reuses_the_rest(tracking_store, tmp_path):
    path = _write(tmp_path, TINY_CHAIN)
    first = _steps(run_pipeline({"name": path}))
    second = _steps(run_pipeline({"name": path, "attack.ratio": "0.5"}))
    assert second["sft"] == (first["sft"][0], True) and second["dpo"] == (first["dpo"][0], True)
    assert second["attack"][1] is False and second["attack"][0] != first["attack"][0]
    assert mlflow.get_run(second["attack"][0]).data.params["ratio"] == "0.5"


@pytest.mark.parametrize("status", ["FAILED", "RUNNING", "KILLED"])
def test_runs_that_did_not_finish_are_never_reused(tracking_store, tmp_path, status):
    path = _write(tmp_path, TINY_CHAIN)
    first = _steps(run_pipeline({"name": path}))
    mlflow.MlflowClient().set_terminated(first["attack"][0], status)
    second = _steps(run_pipeline({"name": path}))
    assert second["dpo"] == (first["dpo"][0], True)
    assert second["attack"][1] is False and second["attack"][0] != first["attack"][0]


def test_runs_of_other_code_are_not_reused(tracking_store, tmp_path, monkeypatch):
    path = _write(tmp_path, {**TINY_CHAIN, "steps": {"sft": TINY_CHAIN["steps"]["sft"]}})
    first = _steps(run_pipeline({"name": path}))
    monkeypatch.setattr(tracking.store, "_CODE_VERSION", "another-version")
    second = _steps(run_pipeline({"name": path}))
    assert second["sft"][1] is False and second["sft"][0] != first["sft"][0]


def test_grid_cells_match_the_cells_they_refer_to(tmp_path):
    spec = {"model": "tiny", "steps": {
        "align": {"stage": "align", "method": "${m}", "sft_run": "none", "each": {"m": ["dpo", "kto"]}},
        "attack": {"stage": "attack", "source_run": "${align}", "each": {"m": ["dpo", "kto"]},
                   "grid": {"ratio": [0.0, 0.1]}},
        "fuse_source": {"stage": "evaluate", "run": "${attack[m=kto,ratio=0.10]}"},
    }}
    experiment = load_experiment(_write(tmp_path, spec))
    labels = [cell.label for cell in experiment.cells]
    assert labels == ["align[m=dpo]", "align[m=kto]", "attack[m=dpo,ratio=0.0]", "attack[m=dpo,ratio=0.1]",
                      "attack[m=kto,ratio=0.0]", "attack[m=kto,ratio=0.1]", "fuse_source"]
    # grid values reach the stage, `each` values only name the cell
    attack = experiment.cells[3]
    assert attack.overrides["ratio"] == 0.1 and "m" not in attack.overrides
    assert experiment.cells[0].overrides["method"] == "${m}"
    # the graph a Ray executor walks: each cell needs the cells its references pick; compare needs all before it
    assert [cell.needs for cell in experiment.cells] == [[], [], [0], [0], [1], [1], [5]]
    spec["steps"]["summary"] = {"stage": "compare", "resources": {"num_cpus": 1}}
    spec["steps"]["attack"]["resources"] = {"num_gpus": 1, "num_cpus": 4}
    experiment = load_experiment(_write(tmp_path, spec))
    assert experiment.cells[-1].needs == list(range(7)) and experiment.cells[2].resources == {"num_gpus": 1.0,
                                                                                             "num_cpus": 4.0}


@pytest.mark.parametrize("steps, fragment", [
    ({"a": {"stage": "align", "sft_run": "${nope}"}}, "refers to ${nope}"),
    ({"a": {"stage": "align", "each": {"m": ["dpo", "kto"]}}, "b": {"stage": "attack", "source_run": "${a}"}},
     "matches 2 runs"),
    ({"a": {"stage": "train"}}, "has no known stage"),
    ({"a": {"stage": "attack", "grid": {"ratio": 0.1}}}, "not lists of values"),
    ({"a": {"stage": "attack", "resources": {"gpus": 1}}}, "has resources {'gpus': 1}"),
    ({"a": {"stage": "attack", "resources": {"num_gpus": -1}}}, "has resources {'num_gpus': -1}"),
])
def test_bad_experiment_files_fail_before_anything_runs(tmp_path, steps, fragment):
    with pytest.raises(RealignError, match=fragment.replace("$", r"\$").replace("{", r"\{").replace("}", r"\}")):
        load_experiment(_write(tmp_path, {"steps": steps}))


def test_an_unknown_executor_or_an_address_without_ray_fails_in_one_line(tmp_path, tracking_store):
    with pytest.raises(RealignError, match="unknown executor 'slurm'"):
        load_experiment(_write(tmp_path, {**TINY_CHAIN, "executor": "slurm"}))
    with pytest.raises(RealignError, match="unknown executor 'dask'"):
        run_pipeline({"name": _write(tmp_path, TINY_CHAIN), "executor": "dask"})
    with pytest.raises(RealignError, match="--address is a Ray cluster's address, and the executor is local"):
        run_pipeline({"name": _write(tmp_path, TINY_CHAIN), "address": "auto"})
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list"), "refused before any run"


def test_override_must_name_a_step(tmp_path):
    with pytest.raises(RealignError, match="names no step"):
        load_experiment(_write(tmp_path, TINY_CHAIN), {"ratio": "0.2"})


def test_shipped_experiments_resolve_every_cell():
    """Every cell of the shipped experiment files resolves to a valid stage config (recipes exist, keys known)."""
    for name in ("default", "nlsr-llama3-8b"):
        check_cells(load_experiment(name))
    assert len(load_experiment("nlsr-llama3-8b").cells) == 218


def test_a_bad_value_in_a_late_cell_fails_before_the_first_runs(tracking_store, tmp_path):
    spec = {**TINY_CHAIN, "steps": {**TINY_CHAIN["steps"], "late": {"stage": "attack", "source_run": "${dpo}",
                                                                    "grid": {"ratio": [0.1, 7]}}}}
    with pytest.raises(RealignError, match=r"step late\[ratio=7\]: ratio"):
        run_pipeline({"name": _write(tmp_path, spec)})
    assert _stage_runs("align") == []


def test_cli_bad_experiment_name_is_one_line(tracking_store):
    result = CliRunner().invoke(main, ["pipeline", "--name", "nope"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "unknown experiment 'nope'" in result.output


def test_default_experiment_runs_end_to_end_on_the_tiny_model(tracking_store):
    """conf/experiments/default.yaml, every step wired to the one before (sft → … → fuse → compare), tiny budgets."""
    train = {f"{step}.{key}": value for step in ("sft", "dpo", "attack") for key, value in TINY_TRAIN.items()}
    quiet_eval = {"eval.judge": "keyword", "eval.num_prompts": "4", "eval.max_new_tokens": "8",
                  "eval.task_examples": "4"}
    overrides = {"name": "default", "model": "tiny", "experiment": "pipe", **train,
                 "sft.data.num_examples": "16", "dpo.data.num_examples": "16", "attack.size": "12",
                 **{f"{step}.eval.enabled": "false" for step in ("sft", "dpo", "attack", "expo", "score")},
                 "score.nsamples": "4", "score.data.max_length": "96",
                 **{f"fuse.{key}": value for key, value in quiet_eval.items()}}
    steps = _steps(run_pipeline(overrides))
    assert list(steps) == ["sft", "dpo", "attack", "expo", "score", "fuse", "compare"]
    fuse = mlflow.get_run(steps["fuse"][0])
    assert fuse.data.tags["realign.source.finetuned"] == steps["attack"][0]
    assert fuse.data.tags["realign.source.reference"] == steps["expo"][0]
    assert fuse.data.tags["realign.source.mask"] == steps["score"][0]
    assert "harmful_score" in fuse.data.metrics
    assert mlflow.get_run(steps["compare"][0]).data.metrics["runs_compared"] >= 6


def test_nlsr_smollm2_experiment_runs_the_faithful_chain_on_the_tiny_model(tracking_store, tmp_path):
    """conf/experiments/nlsr-smollm2.yaml with tiny budgets: continued attacks, a LoRA region of the seed-form EXPO
    adapter, NLSR's adaptive restore in LoRA coordinates (with its drawn-module table) beside the merged path."""
    train = {f"{step}.{key}": value for step in ("sft", "dpo", "attack") for key, value in TINY_TRAIN.items()}
    quiet_eval = {"eval.judge": "keyword", "eval.num_prompts": "4", "eval.max_new_tokens": "8",
                  "eval.task_examples": "4"}
    overrides = {"name": "nlsr-smollm2", "model": "tiny", "experiment": "nlsr", **train,
                 "sft.data.num_examples": "16", "dpo.data.num_examples": "16", "attack.size": "12",
                 **{f"{step}.eval.enabled": "false" for step in ("sft", "dpo", "attack", "expo", "region_merged")},
                 "region.nsamples": "4", "region.data.max_length": "96", "region_merged.nsamples": "4",
                 "region_merged.data.max_length": "96", "region.eval.judge": "keyword",
                 "region.eval.num_prompts": "2", "region.eval.max_new_tokens": "4",
                 **{f"{step}.{key}": value for step in ("restore", "restore_merged") for key, value in quiet_eval.items()}}
    # A random model writes no answer the keyword judge calls safe, so its region calibrates on the builtin safe
    # answers here; the self calibration itself is tested in test_score.
    overrides["region.data.safety_source"] = "builtin"
    steps = _cells(run_pipeline(overrides))
    assert len(steps["attack"]) == 3 and len(steps["restore"]) == 3 and len(steps["restore_merged"]) == 3
    for attack_id in steps["attack"]:
        assert mlflow.get_run(attack_id).data.tags["realign.adapter_init"] == steps["dpo"][0]
    client = mlflow.MlflowClient()
    for restore_id, attack_id in zip(steps["restore"], steps["attack"]):
        run = mlflow.get_run(restore_id)
        assert run.data.params["fuse.mode"] == "lora" and run.data.tags["realign.source.finetuned"] == attack_id
        assert "fuse/modules.json" in [a.path for a in client.list_artifacts(restore_id, "fuse")]
    for restore_id in steps["restore_merged"]:
        assert mlflow.get_run(restore_id).data.params["fuse.mode"] == "full"
    expo = mlflow.get_run(steps["expo"][0])
    assert expo.data.params["form"] == "seed"


REPAIR_STEPS = ("restore_merged", "restore_faithful", "average", "task_arithmetic", "ties", "consensus_ta",
                "consensus_ties", "resta", "safe_lora", "safemerge", "antidote")


def test_realign_methods_experiment_repairs_every_attack_with_every_method_and_ranks_them(tracking_store, tmp_path):
    """conf/experiments/realign-methods.yaml with tiny budgets: 4 attacks × 11 repairs, each run against its own
    attack, and compare's realignment ranking of the methods."""
    train = {f"{step}.{key}": value for step in ("sft", "dpo", "attack", "attack_continue")
             for key, value in TINY_TRAIN.items()}
    quiet_eval = {"eval.judge": "keyword", "eval.num_prompts": "4", "eval.max_new_tokens": "4",
                  "eval.task_examples": "4", "eval.benign_prompts": "2"}
    scores = {f"{step}.{key}": value for step in ("region", "region_lora", "region_antidote")
              for key, value in {"nsamples": "4", "data.max_length": "64", "eval.enabled": "false"}.items()}
    overrides = {"name": "realign-methods", "model": "tiny", "experiment": "methods", **train, **scores,
                 "sft.data.num_examples": "16", "dpo.data.num_examples": "16", "attack.size": "8",
                 "attack_continue.size": "8",
                 **{f"{step}.eval.enabled": "false" for step in ("sft", "dpo", "expo", "expo_seed")},
                 **{f"{step}.{key}": value for step in ("attack", "attack_continue") for key, value in quiet_eval.items()},
                 **{f"{step}.{key}": value for step in REPAIR_STEPS for key, value in quiet_eval.items()},
                 # a random model writes nothing the keyword judge calls safe (see the nlsr-smollm2 test)
                 "region_lora.data.safety_source": "builtin"}
    steps = _cells(run_pipeline(overrides))
    assert len(steps["attack"]) == 4
    for step in REPAIR_STEPS:
        assert len(steps[step]) == 4, step
        attacks = steps["attack_continue"] if step in ("restore_faithful", "safemerge") else steps["attack"]
        for fuse_id, attack_id in zip(steps[step], attacks):
            run = mlflow.get_run(fuse_id)
            assert run.info.status == "FINISHED" and run.data.tags["realign.source.finetuned"] == attack_id, step
            assert "harmful_score" in run.data.metrics, step
    for score_id, attack_id in zip(steps["region_antidote"], steps["attack"]):
        assert mlflow.get_run(score_id).data.tags["realign.source.model"] == attack_id
    compare = steps["compare"][0]
    tables = [a.path for a in mlflow.MlflowClient().list_artifacts(compare, "tables")]
    assert "tables/realignment.csv" in tables
    local = mlflow.artifacts.download_artifacts(run_id=compare, artifact_path="tables/realignment.csv",
                                                dst_path=str(tmp_path))
    ranking = pd.read_csv(local)  # the table compare prints and logs
    assert len(ranking) == len(REPAIR_STEPS) and set(ranking["runs"]) == {4}
    assert {"restore · neurons · full", "restore · neurons · lora", "safe_lora · full · lora",
            "safemerge · full · lora", "antidote · neurons · full"} <= set(ranking["method"])


def test_reuse_is_decided_on_the_inputs_that_would_be_used_now(tracking_store, tmp_path):
    """An expo step with an empty aligned_run means "the newest DPO run": after a newer one exists, the old expo
    run (made from the older DPO run) is not reused; a dpo step with sft_run: auto is reused when nothing changed."""
    quiet = {**TINY_TRAIN, "data.num_examples": 16, **NO_EVAL}
    chain = {"experiment": "pipe", "model": "tiny", "steps": {
        "dpo": {"stage": "align", "method": "dpo", "sft_run": "auto", **quiet},
        "expo": {"stage": "expo", "alpha": "0.5", **NO_EVAL},
    }}
    path = _write(tmp_path, chain)
    first = _steps(run_pipeline({"name": path}))
    assert not first["dpo"][1] and not first["expo"][1]
    second = _steps(run_pipeline({"name": path}))
    assert second["dpo"] == (first["dpo"][0], True), "sft_run: auto resolves to the same SFT run: reused"
    assert second["expo"] == (first["expo"][0], True)

    sft = mlflow.get_run(first["dpo"][0]).data.tags["realign.source.sft"]
    newer = run_align({"model": "tiny", "method": "dpo", "sft_run": sft, "experiment": "pipe", "seed": "1",
                       **{k: str(v) for k, v in quiet.items()}})
    third = _steps(run_pipeline({"name": path}))
    assert third["expo"][1] is False, "the expo made from the older DPO run is stale"
    assert mlflow.get_run(third["expo"][0]).data.tags["realign.source.aligned"] == newer
    assert mlflow.get_run(third["expo"][0]).data.params["aligned_run"] == newer, "the id used is what is logged"
