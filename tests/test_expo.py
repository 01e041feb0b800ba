"""`expo` stage on the tiny model: the formula weight by weight, lineage, α sweeps, effect, bad inputs."""

import json
import os
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from realign import models, tracking
from realign.errors import RealignError
from realign.cli import main
from realign.config import ModelConfig
from realign.stages.align import run_align
from realign.stages.expo import run_expo

from conftest import TINY, module_store, stand_in_adapter

TINY_MODEL = ModelConfig(name="tiny", source="tiny")
EXPO = {
    "model": "tiny",
    "eval.judge": "keyword",
    "eval.num_prompts": "4",
    "eval.max_new_tokens": "8",
    "eval.task_examples": "4",
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One store for the module: align/sft, align/dpo on the merged SFT model, and align/dpo on the base."""
    with module_store(tmp_path_factory, "expo-store") as (folder, uri):
        quiet = {**TINY, "eval.enabled": "false"}
        sft = run_align({**quiet, "method": "sft"})
        dpo_on_sft = run_align({**quiet, "method": "dpo", "sft_run": sft})
        dpo_on_base = run_align({**quiet, "method": "dpo", "sft_run": "none"})
        yield {"folder": folder, "uri": uri, "sft": sft, "dpo": dpo_on_sft, "dpo_base": dpo_on_base}


def _expo_runs():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return {r.info.run_id: r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "expo"}


def _adapter(run_id):
    """(state dict, LoRA scaling) of a run's adapter, read straight from its files."""
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter")
    config = json.load(open(f"{folder}/adapter_config.json"))
    return load_file(f"{folder}/adapter_model.safetensors"), config["lora_alpha"] / config["r"], folder


def _lora_deltas(state, scaling):
    """{base weight name: s·B·A}, the closed form of a plain LoRA update, without PEFT."""
    deltas = {}
    for name, a in state.items():
        if ".lora_A." not in name:
            continue
        b = state[name.replace(".lora_A.", ".lora_B.")]
        module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
        deltas[f"{module}.weight"] = scaling * (b @ a)
    return deltas


def _base_weights():
    return load_file(str(Path(models.resolve_model_dir(TINY_MODEL)) / "model.safetensors"))


def _assert_all_weights_equal(actual, expected):
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, rtol=0, atol=1e-6), name


def test_lora_case_is_the_sft_model_plus_one_plus_alpha_times_the_aligned_update(store):
    expo_id = run_expo({**EXPO, "aligned_run": store["dpo"], "sft_run": store["sft"], "alpha": "0.9"})

    run = mlflow.get_run(expo_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags[tracking.TAG_COMPLETE] == "true"
    assert tags["mlflow.runName"] == "expo/dpo/a0.9"
    assert tags[tracking.TAG_STAGE] == "expo" and tags[tracking.TAG_METHOD] == "dpo"
    assert tags["realign.source.aligned"] == store["dpo"] and tags["realign.source.sft"] == store["sft"]
    assert tags[tracking.TAG_ADAPTER_BASE] == store["sft"], "the EXPO adapter sits on the merged SFT model"
    assert tags[tracking.TAG_OUTPUT] == "adapter" and run.data.params["expo.mode"] == "lora"
    assert run.data.params["alpha"] == "0.9"
    assert {"harmful_score", "refusal_rate", "benign_refusal_rate", "finetune_accuracy", "sst2_accuracy"} <= set(
        run.data.metrics)
    assert tags[tracking.TAG_JUDGE] == "keyword"

    # Every weight of base + sft + expo equals θ0 + ΔW_sft + 1.9·ΔW_dpo, from the adapters' own tensors.
    sft_state, sft_scale, sft_dir = _adapter(store["sft"])
    dpo_state, dpo_scale, _ = _adapter(store["dpo"])
    expo_state, _, expo_dir = _adapter(expo_id)
    assert all(torch.equal(expo_state[n], dpo_state[n]) for n in dpo_state if ".lora_A." in n), "A untouched"
    expected = _base_weights()
    for name, delta in _lora_deltas(sft_state, sft_scale).items():
        expected[name] = expected[name] + delta
    for name, delta in _lora_deltas(dpo_state, dpo_scale).items():
        expected[name] = expected[name] + 1.9 * delta
    actual = models.load_model(TINY_MODEL, adapters=[sft_dir, expo_dir]).state_dict()
    _assert_all_weights_equal(actual, expected)


def test_seed_form_scales_every_lora_tensor_by_two_alpha(store):
    expo_id = run_expo({**EXPO, "aligned_run": store["dpo"], "sft_run": store["sft"], "alpha": "0.9",
                        "form": "seed"})
    run = mlflow.get_run(expo_id)
    assert run.data.params["form"] == "seed" and float(run.data.params["expo.update_factor"]) == pytest.approx(3.24)
    dpo_state, _, _ = _adapter(store["dpo"])
    expo_state, _, _ = _adapter(expo_id)
    assert set(expo_state) == set(dpo_state)
    for name, tensor in dpo_state.items():
        assert torch.allclose(expo_state[name], 1.8 * tensor, rtol=0, atol=1e-6), name


def test_seed_form_needs_an_adapter_trained_on_the_sft_model(store):
    with pytest.raises(RealignError, match="form=seed scales the aligned LoRA adapter"):
        run_expo({**EXPO, "aligned_run": store["dpo_base"], "sft_run": store["sft"], "alpha": "0.9",
                  "form": "seed"})


def test_independent_case_is_merged_weights_one_plus_alpha_aligned_minus_alpha_sft(store):
    expo_id = run_expo({**EXPO, "aligned_run": store["dpo_base"], "sft_run": store["sft"], "alpha": "0.5",
                        "eval.enabled": "false"})

    run = mlflow.get_run(expo_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_OUTPUT] == "model" and run.data.params["expo.mode"] == "merged"
    assert run.data.tags[tracking.TAG_ADAPTER_BASE] == ""
    folder = mlflow.artifacts.download_artifacts(run_id=expo_id, artifact_path="model")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in os.listdir(folder)), "safetensors only"

    # θ0 + 1.5·ΔW_dpo − 0.5·ΔW_sft, both updates taken on the base.
    sft_state, sft_scale, _ = _adapter(store["sft"])
    dpo_state, dpo_scale, _ = _adapter(store["dpo_base"])
    expected = _base_weights()
    for name, delta in _lora_deltas(dpo_state, dpo_scale).items():
        expected[name] = expected[name] + 1.5 * delta
    for name, delta in _lora_deltas(sft_state, sft_scale).items():
        expected[name] = expected[name] - 0.5 * delta
    loaded = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no realign
    AutoTokenizer.from_pretrained(folder)
    _assert_all_weights_equal(loaded.state_dict(), expected)


def test_extrapolated_model_answers_differently_from_its_source(store):
    expo_id = run_expo({**EXPO, "aligned_run": store["dpo"], "sft_run": store["sft"], "alpha": "0.9",
                        "eval.enabled": "false"})
    _, _, sft_dir = _adapter(store["sft"])
    _, _, dpo_dir = _adapter(store["dpo"])
    _, _, expo_dir = _adapter(expo_id)
    base = models.load_model(TINY_MODEL, adapters=[sft_dir])
    tokenizer = models.load_tokenizer(TINY_MODEL)
    ids = tokenizer("### Instruction:\nHow do I bake bread at home?\n\n### Response:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        aligned = PeftModel.from_pretrained(base, dpo_dir)(ids).logits
    with torch.no_grad():
        extrapolated = models.load_model(TINY_MODEL, adapters=[sft_dir, expo_dir])(ids).logits
    assert (aligned - extrapolated).abs().max() > 1e-3, "the EXPO adapter must change what the model computes"


def test_attack_and_evaluate_take_an_expo_run_like_an_align_run(store):
    from realign.stages.attack import run_attack
    from realign.stages.evaluate import run_evaluate

    expo_id = run_expo({**EXPO, "aligned_run": store["dpo"], "sft_run": store["sft"], "alpha": "0.9"})
    eval_id = run_evaluate({**EXPO, "run": expo_id, "eval.task": "sst2"})
    # The evaluate stage rebuilds base + sft + expo from the run's tags: the same model, the same numbers.
    expo_metrics, eval_metrics = mlflow.get_run(expo_id).data.metrics, mlflow.get_run(eval_id).data.metrics
    for key in ("harmful_score", "refusal_rate", "benign_refusal_rate", "sst2_accuracy"):
        assert eval_metrics[key] == expo_metrics[key], key
    attack_id = run_attack({"model": "tiny", "source_run": expo_id, "size": "8", "ratio": "0.25",
                            "train.max_steps": "1", "train.max_length": "96", "eval.enabled": "false"})
    attack = mlflow.get_run(attack_id)
    assert attack.info.status == "FINISHED"
    assert attack.data.tags[tracking.TAG_ADAPTER_BASE] == f"{store['sft']},{expo_id}"


def test_evaluate_takes_a_merged_expo_run_from_its_full_weights(store):
    from realign.stages.evaluate import run_evaluate

    expo_id = run_expo({**EXPO, "aligned_run": store["dpo_base"], "sft_run": store["sft"], "alpha": "0.5",
                        "eval.task": "sst2"})
    assert mlflow.get_run(expo_id).data.tags[tracking.TAG_OUTPUT] == "model"
    eval_id = run_evaluate({**EXPO, "run": expo_id, "eval.task": "sst2"})
    expo_metrics, eval_metrics = mlflow.get_run(expo_id).data.metrics, mlflow.get_run(eval_id).data.metrics
    for key in ("harmful_score", "refusal_rate", "benign_refusal_rate", "sst2_accuracy"):
        assert eval_metrics[key] == expo_metrics[key], key


def test_alpha_list_makes_one_child_run_per_alpha_under_a_parent(store):
    before = set(_expo_runs())
    parent_id = run_expo({**EXPO, "aligned_run": store["dpo"], "sft_run": store["sft"], "alpha": "0.1,0.5"})

    new = {k: v for k, v in _expo_runs().items() if k not in before}
    parent = new.pop(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.runName"] == "expo/dpo/sweep"
    assert parent.data.tags[tracking.TAG_SWEEP] == "alpha" and parent.data.params["alpha"] == "0.1,0.5"
    assert not mlflow.MlflowClient().list_artifacts(parent_id, "adapter"), "the parent holds no model"
    children = sorted(new.values(), key=lambda r: float(r.data.params["alpha"]))
    assert [c.data.tags["mlflow.runName"] for c in children] == ["expo/dpo/a0.1", "expo/dpo/a0.5"]
    for child, factor in zip(children, (1.1, 1.5)):
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.data.tags["realign.source.aligned"] == store["dpo"]
        assert float(child.data.params["expo.lora_b_factor"]) == pytest.approx(factor)
        assert "harmful_score" in child.data.metrics
        assert [a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id, "adapter")]
    table = json.load(open(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="expo/sweep.json")))
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [row["alpha"] for row in rows] == [0.1, 0.5]
    assert [row["harmful_score"] for row in rows] == [c.data.metrics["harmful_score"] for c in children]


def test_defaults_pick_the_newest_dpo_run_and_the_sft_run_it_was_trained_on(store):
    newest_dpo = store["dpo_base"]  # trained last, from the base: its SFT model is the newest align/sft run
    expo_id = run_expo({**EXPO, "eval.enabled": "false"})
    tags = mlflow.get_run(expo_id).data.tags
    assert tags["realign.source.aligned"] == newest_dpo and tags["realign.source.sft"] == store["sft"]


def _hand_logged_align_run(method, base, tmp_path, adapter=True):
    """A finished align run logged with plain MLflow calls (stand-in adapter files, or none), for the checks
    that must refuse it before any model is loaded.

    In an experiment of its own, so that the default-run lookups in experiment realign never see it.
    """
    mlflow.set_experiment("hand-logged")
    with mlflow.start_run() as run:
        mlflow.set_tags({tracking.TAG_STAGE: "align", tracking.TAG_METHOD: method, tracking.TAG_BASE_MODEL: base,
                         tracking.TAG_COMPLETE: "true"})
        if adapter:
            folder = stand_in_adapter(tmp_path / "stand-in-adapter")
            mlflow.log_artifacts(str(folder), "adapter")
    return run.info.run_id


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("negative", "alpha=-0.1 is negative"),
        ("unparsable", "alpha='0.1,abc' is not a list of numbers"),
        ("aligned-is-sft", "is align/sft, not align/"),
        ("other-base", "belongs to base model 'smollm2-135m', not 'tiny'"),
        ("no-adapter", "has no adapter/ artifact"),
        ("no-aligned-run", "no finished align/dpo run of tiny in experiment empty"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_any_work(store, tmp_path, case, fragment):
    args = ["--model", "tiny", "--aligned-run", store["dpo"], "--sft-run", store["sft"], "--eval.judge", "keyword"]
    if case == "negative":
        args += ["--alpha", "-0.1"]
    elif case == "unparsable":
        args += ["--alpha", "0.1,abc"]
    elif case == "aligned-is-sft":
        args[3] = store["sft"]
    elif case == "other-base":
        args[5] = _hand_logged_align_run("sft", "smollm2-135m", tmp_path)
    elif case == "no-adapter":
        args[3] = _hand_logged_align_run("dpo", "tiny", tmp_path, adapter=False)
    elif case == "no-aligned-run":
        args = ["--model", "tiny", "--experiment", "empty", "--sft-run", store["sft"]]
    before = set(_expo_runs())

    result = CliRunner().invoke(main, ["expo", *args])

    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    new = [r for k, r in _expo_runs().items() if k not in before]
    assert len(new) == 1, "one run, no children"
    failed = new[0]
    assert failed.info.status == "FAILED" and fragment in failed.data.tags[tracking.TAG_ERROR]
    assert tracking.TAG_COMPLETE not in failed.data.tags
    assert not failed.data.metrics, "nothing evaluated"
    assert not mlflow.MlflowClient().list_artifacts(failed.info.run_id, "adapter")
    assert not mlflow.MlflowClient().list_artifacts(failed.info.run_id, "model")


def test_mlproject_has_an_expo_entry_with_the_stage_parameters():
    project = yaml.safe_load((Path(__file__).resolve().parent.parent / "MLproject").read_text())
    entry = project["entry_points"]["expo"]
    assert {"aligned_run", "sft_run", "alpha", "method", "seed", "model"} <= set(entry["parameters"])
    assert entry["parameters"]["alpha"]["default"] == "0.9"
    assert entry["command"].startswith("realign expo ") and "--alpha {alpha}" in entry["command"]
