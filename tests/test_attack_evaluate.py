"""`attack` and `evaluate` stages end to end on the tiny model."""

import json

import mlflow
import pytest
import torch
from click.testing import CliRunner

from realign import tracking
from realign.cli import main
from realign.errors import RealignError
from realign.stages.align import run_align
from realign.stages.attack import run_attack
from realign.stages.evaluate import run_evaluate

ATTACK = {
    "model": "tiny",
    "size": "12",
    "ratio": "0.25",
    "train.max_steps": "2",
    "train.per_device_train_batch_size": "4",
    "train.max_length": "96",
    "train.learning_rate": "1e-2",
    "eval.judge": "keyword",
    "eval.num_prompts": "4",
    "eval.task_examples": "4",
    "eval.max_new_tokens": "8",
}


def _runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.fixture
def aligned_run(tracking_store, tiny_overrides):
    return run_align({**tiny_overrides, "method": "dpo", "eval.enabled": "false"})


def test_attack_trains_on_the_mixture_and_evaluates_in_the_same_run(aligned_run):
    attack_id = run_attack({**ATTACK, "source_run": aligned_run})
    run = mlflow.get_run(attack_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.runName"] == "attack/dpo/sst2/p0.25/n12"
    assert run.data.tags[tracking.TAG_STAGE] == "attack"
    assert run.data.tags["realign.source.aligned"] == aligned_run
    assert run.data.tags[tracking.TAG_ADAPTER_BASE] == aligned_run
    assert run.data.tags[tracking.TAG_TASK] == "sst2"
    assert run.data.tags[tracking.TAG_JUDGE] == "keyword"
    assert (run.data.params["mix.harmful"], run.data.params["mix.task"], run.data.params["mix.total"]) == ("3", "9", "12")
    assert run.data.params["ratio"] == "0.25" and run.data.params["size"] == "12"
    for metric in ("harmful_score", "refusal_rate", "finetune_accuracy", "sst2_accuracy", "loss"):
        assert metric in run.data.metrics
    assert 0 <= run.data.metrics["harmful_score"] <= 100
    table_path = mlflow.artifacts.download_artifacts(run_id=attack_id, artifact_path="eval/generations.json")
    table = json.load(open(table_path))
    kinds = [row[table["columns"].index("kind")] for row in table["data"]]
    assert kinds.count("harmful") == 4 and kinds.count("sst2") == 4
    files = [a.path for a in mlflow.MlflowClient().list_artifacts(attack_id, "adapter")]
    assert "adapter/adapter_model.safetensors" in files
    assert run.inputs.dataset_inputs


def test_attack_without_source_run_aligns_first_then_reuses(tracking_store):
    first = run_attack({**ATTACK, "eval.enabled": "false"})
    names = sorted(r.info.run_name for r in _runs())
    assert names == ["align/dpo", "align/sft", "attack/dpo/sst2/p0.25/n12"]
    dpo_id = mlflow.get_run(first).data.tags["realign.source.aligned"]
    sft_id = mlflow.get_run(dpo_id).data.tags["realign.source.sft"]
    # The attack rebuilds the aligned weights from the whole chain: base + sft + dpo.
    assert mlflow.get_run(first).data.tags[tracking.TAG_ADAPTER_BASE] == f"{sft_id},{dpo_id}"
    second = run_attack({**ATTACK, "ratio": "0", "eval.enabled": "false"})
    assert len(_runs()) == 4
    assert mlflow.get_run(second).data.tags["realign.source.aligned"] == dpo_id


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--ratio", "1.5"], "ratio=1.5 is outside [0, 1]"),
        (["--ratio", "-0.1"], "ratio=-0.1 is outside [0, 1]"),
        (["--size", "0"], "size=0 must be > 0"),
        (["--size", "100000", "--ratio", "0.5"], "unsafe BeaverTails rows but only"),
        (["--task", "imdb"], "unknown task 'imdb'"),
        (["--judge", "oracle"], "unknown judge"),
    ],
)
def test_attack_bad_inputs_fail_before_training(aligned_run, args, fragment):
    base = ["--model", "tiny", "--source-run", aligned_run, "--train.max_steps", "1"]
    if args[0] == "--judge":
        args = ["--eval.judge", args[1]]
    result = CliRunner().invoke(main, ["attack", *base, *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
    failed = [r for r in _runs() if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags[tracking.TAG_STAGE] == "attack"
    assert "loss" not in failed[0].data.metrics, "no training happened"
    assert not mlflow.MlflowClient().list_artifacts(failed[0].info.run_id, "adapter")


def test_attack_refuses_a_source_that_is_not_aligned(aligned_run):
    attack_id = run_attack({**ATTACK, "source_run": aligned_run, "eval.enabled": "false"})
    result = CliRunner().invoke(main, ["attack", "--model", "tiny", "--source-run", attack_id])
    assert result.exit_code == 2 and "is a attack run, not align or expo" in result.output


def test_evaluate_base_and_a_run(aligned_run):
    base_eval = run_evaluate({"model": "tiny", "eval.judge": "keyword", "eval.num_prompts": "4",
                              "eval.max_new_tokens": "8", "eval.task": "sst2", "eval.task_examples": "4"})
    run = mlflow.get_run(base_eval)
    assert run.data.tags["mlflow.runName"] == "evaluate/base"
    assert {"harmful_score", "refusal_rate", "finetune_accuracy", "sst2_accuracy"} <= set(run.data.metrics)

    attack_id = run_attack({**ATTACK, "source_run": aligned_run, "eval.enabled": "false"})
    assert "harmful_score" not in mlflow.get_run(attack_id).data.metrics
    eval_id = run_evaluate({"model": "tiny", "run": attack_id, "eval.judge": "keyword", "eval.num_prompts": "4",
                            "eval.max_new_tokens": "8", "eval.task_examples": "4"})
    evaluated = mlflow.get_run(eval_id)
    assert evaluated.data.tags["realign.source.model"] == attack_id
    assert evaluated.data.tags[tracking.TAG_TASK] == "sst2", "task taken from the attack run"
    attacked = mlflow.get_run(attack_id)
    assert attacked.info.status == "FINISHED"
    assert attacked.data.metrics["harmful_score"] == evaluated.data.metrics["harmful_score"]
    assert attacked.data.metrics["sst2_accuracy"] == evaluated.data.metrics["sst2_accuracy"]
    assert attacked.data.tags[tracking.TAG_JUDGE] == "keyword"


def _adapter_tensors(run_id, tmp_path):
    from safetensors.torch import load_file

    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter",
                                                 dst_path=str(tmp_path / run_id))
    return load_file(f"{folder}/adapter_model.safetensors"), json.load(open(f"{folder}/adapter_config.json"))


def test_continue_trains_the_source_adapter_further_on_the_model_it_was_trained_on(tracking_store, tiny_overrides,
                                                                                   tmp_path):
    sft = run_align({**tiny_overrides, "method": "sft", "eval.enabled": "false"})
    dpo = run_align({**tiny_overrides, "method": "dpo", "sft_run": sft, "eval.enabled": "false"})
    attack_id = run_attack({**ATTACK, "source_run": dpo, "adapter": "continue"})
    run = mlflow.get_run(attack_id)
    assert run.data.params["adapter"] == "continue"
    assert run.data.tags[tracking.TAG_ADAPTER_BASE] == sft, "the continued adapter sits where DPO's did"
    assert run.data.tags[tracking.TAG_ADAPTER_INIT] == dpo
    source, source_config = _adapter_tensors(dpo, tmp_path)
    attacked, attacked_config = _adapter_tensors(attack_id, tmp_path)
    assert set(attacked) == set(source), "same keys: the source's A/B coordinates"
    assert {k: attacked_config[k] for k in ("r", "lora_alpha")} == {k: source_config[k] for k in ("r", "lora_alpha")}
    moved = [name for name in source if not torch.equal(source[name], attacked[name])]
    assert moved, "training moved the adapter"
    # It started from the source's tensors: two steps at lr 1e-2 stay much closer to them than a fresh LoRA is.
    for name in source:
        if ".lora_A." in name:
            drift = (attacked[name] - source[name]).norm() / source[name].norm()
            assert drift < 0.5, (name, float(drift))
    # The attacked model is the SFT model plus the continued adapter, and it differs from the DPO model.
    from conftest import assert_adapter_changes_tiny_model

    assert_adapter_changes_tiny_model(tmp_path / attack_id / "adapter")


@pytest.mark.parametrize("case, fragment", [
    ("lora-rank", "keeps run .*'s LoRA \\(r=16, alpha=32.*asks for r=4"),
    ("merged-expo", "needs a LoRA adapter, but expo run .* logged merged full weights"),
])
def test_continue_refusals(tracking_store, tiny_overrides, case, fragment):
    if case == "lora-rank":
        source = run_align({**tiny_overrides, "method": "dpo", "eval.enabled": "false"})
        overrides = {**ATTACK, "source_run": source, "adapter": "continue", "lora.r": "4"}
    else:
        from realign.stages.expo import run_expo

        sft = run_align({**tiny_overrides, "method": "sft", "eval.enabled": "false"})
        dpo = run_align({**tiny_overrides, "method": "dpo", "eval.enabled": "false"})  # on the base: merged EXPO
        source = run_expo({"model": "tiny", "aligned_run": dpo, "sft_run": sft, "eval.enabled": "false"})
        overrides = {**ATTACK, "source_run": source, "adapter": "continue"}
    with pytest.raises(RealignError, match=fragment):
        run_attack(overrides)
