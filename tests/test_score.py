"""`score` stage on the tiny model: what the run holds (masks read back with plain safetensors, checked against a
direct computation), lineage, the sanity check, every method and target, and bad inputs."""

import os
import re
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from realign import models, tracking
from realign.cli import main
from realign.config import ModelConfig
from realign.errors import RealignError
from realign.ops import masks, selection
from realign.stages.align import run_align
from realign.stages.expo import run_expo
from realign.stages.score import run_score

from conftest import TINY, module_store

TINY_MODEL = ModelConfig(name="tiny", source="tiny")
SCORE = {"model": "tiny", "nsamples": "6", "data.max_length": "96", "eval.enabled": "false"}
SANITY = {"eval.enabled": "true", "eval.judge": "keyword", "eval.num_prompts": "4", "eval.max_new_tokens": "8"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One store for the module: align/sft, align/dpo on it, and a merged-weights expo run (realign.output=model)."""
    with module_store(tmp_path_factory, "score-store") as (folder, uri):
        quiet = {**TINY, "eval.enabled": "false"}
        sft = run_align({**quiet, "method": "sft"})
        dpo = run_align({**quiet, "method": "dpo", "sft_run": sft})
        dpo_base = run_align({**quiet, "method": "dpo", "sft_run": "none"})
        expo_merged = run_expo({"model": "tiny", "aligned_run": dpo_base, "sft_run": sft, "alpha": "0.5",
                                "eval.enabled": "false"})
        yield {"uri": uri, "sft": sft, "dpo": dpo, "expo_merged": expo_merged}


def _masks(run_id):
    """The run's masks/ folder, downloaded by run id: {file name: (tensors, metadata)} read with plain safetensors."""
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="masks"))
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        files[path.name] = (load_file(str(path)), metadata)
    return files


def _score_runs():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return {r.info.run_id: r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "score"}


def _adapter_dir(run_id):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter")


def test_wanda_run_holds_masks_that_a_direct_computation_reproduces(store):
    run_id = run_score({**SCORE, "method": "wanda", "model_run": store["dpo"], "sparsity": "0.05"})

    run = mlflow.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and tags[tracking.TAG_COMPLETE] == "true"
    assert tags["mlflow.runName"] == "score/wanda" and tags[tracking.TAG_STAGE] == "score"
    assert tags[tracking.TAG_METHOD] == "wanda" and tags[tracking.TAG_BASE_MODEL] == "tiny"
    assert tags["realign.source.model"] == store["dpo"]
    assert run.data.params["sparsity"] == "0.05" and run.data.params["target"] == "weights"
    contexts = {d.tags[0].value for d in run.inputs.dataset_inputs}
    assert contexts == {"calibration-safety"}, "wanda uses the safety data only, logged as a run input"

    files = _masks(run_id)
    assert set(files) == {"wanda.safetensors", "wanda.heads.safetensors"}
    region, metadata = files["wanda.safetensors"]
    assert metadata["realign.kind"] == "neurons" and metadata["realign.method"] == "wanda"
    assert metadata["realign.target"] == "weights" and metadata["realign.base_model"] == "tiny"
    model = models.load_model(TINY_MODEL, [_adapter_dir(store["sft"]), _adapter_dir(store["dpo"])])
    assert metadata["realign.architecture"] == masks.architecture_id(model.config)
    state = model.state_dict()
    assert len(region) == 14 and all(key in state for key in region)

    # Recompute Wanda from the same calibration data: each example alone, every input captured whole by hooks.
    from realign.stages.score import calibration_batches, resolve_score_config, safety_calibration

    cfg = resolve_score_config({**SCORE, "method": "wanda"})
    batches = calibration_batches(models.load_tokenizer(TINY_MODEL), safety_calibration(cfg), cfg)
    squares = {key: 0 for key in region}
    handles = [model.get_submodule(key.removesuffix(".weight")).register_forward_hook(
        lambda mod, args, out, key=key: captured.__setitem__(key, args[0][0])) for key in region]
    for batch in batches:
        for row in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[row].sum())
            captured = {}
            with torch.no_grad():
                model(input_ids=batch.input_ids[row:row + 1, :n])
            response = batch.labels[row, :n] != -100
            for key, x in captured.items():
                squares[key] = squares[key] + x[response].double().pow(2).sum(dim=0)
    for handle in handles:
        handle.remove()
    for key, mask in region.items():
        score = state[key].double().abs() * squares[key].sqrt()
        count = int(0.05 * score.numel())
        assert mask.dtype == torch.bool and mask.shape == state[key].shape and int(mask.sum()) == count
        threshold = score.flatten().kthvalue(score.numel() - count + 1).values
        assert bool(mask[score > threshold * (1 + 1e-5)].all()) and not bool(mask[score < threshold * (1 - 1e-5)].any())

    heads, heads_metadata = files["wanda.heads.safetensors"]
    assert heads_metadata["realign.kind"] == "heads"
    assert set(heads) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all(v.dtype == torch.float32 and v.shape == (model.config.num_attention_heads,) for v in heads.values())

    assert metrics["selected_count"] == sum(int(m.sum()) for m in region.values())
    assert metrics["selected_fraction"] == pytest.approx(metrics["selected_count"] / sum(m.numel() for m in region.values()))
    for name in ("layer_0", "layer_1", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert 0.04 < metrics[f"selected_fraction/{name}"] <= 0.05, name
    assert "harmful_score" not in metrics, "eval.enabled=false skips the sanity check"
    figure = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="figures/selection.html")
    assert "plotly" in Path(figure).read_text()[:100_000].lower()


@pytest.mark.parametrize("method", ["wanda", "actsvd"])
def test_sanity_check_logs_harmful_scores_with_the_region_and_a_random_one_removed(store, method):
    run_id = run_score({**SCORE, **SANITY, "method": method, "model_run": store["dpo"], "sparsity": "0.2",
                        "rank": "8"})

    run = mlflow.get_run(run_id)
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_JUDGE] == "keyword"
    for name in ("harmful_score", "harmful_score_zeroed_selected", "harmful_score_zeroed_random",
                 "refusal_rate_zeroed_selected", "refusal_rate_zeroed_random"):
        assert 0 <= metrics[name] <= 100, name
    tables = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "eval")}
    assert tables == {"eval/generations.json", "eval/zeroed_selected.json", "eval/zeroed_random.json"}


def test_sanity_check_removes_the_region_and_then_restores_the_model(store, monkeypatch):
    """The evaluations see the region removed, then a random region of the same size, then nothing removed."""
    from realign.stages import score
    from realign.stages.evaluate import Evaluation

    seen = []

    def fake_evaluate(model, tokenizer, settings, task=""):
        seen.append({k: v.clone() for k, v in model.state_dict().items() if k.endswith("_proj.weight")})
        value = float(len(seen))
        return Evaluation("keyword", {"harmful_score": value, "refusal_rate": value, "benign_refusal_rate": value},
                          {"prompt": ["p"], "response": ["r"]})

    monkeypatch.setattr(score, "evaluate_model", fake_evaluate)
    run_id = run_score({**SCORE, **SANITY, "method": "snip", "model_run": store["dpo"], "sparsity": "0.1"})

    region, _ = _masks(run_id)["snip.safetensors"]
    original, selected, random_region = seen
    for key, mask in region.items():
        assert bool((selected[key][mask] == 0).all()) and torch.equal(selected[key][~mask], original[key][~mask])
        zeroed = (random_region[key] == 0) & (original[key] != 0)
        assert int(zeroed.sum()) == int(mask.sum()) and not torch.equal(zeroed, mask)
    model = models.load_model(TINY_MODEL, [_adapter_dir(store["sft"]), _adapter_dir(store["dpo"])])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items()), "scored as loaded"
    metrics = mlflow.get_run(run_id).data.metrics
    assert (metrics["harmful_score"], metrics["harmful_score_zeroed_selected"],
            metrics["harmful_score_zeroed_random"]) == (1.0, 2.0, 3.0)


def test_lora_target_scores_the_runs_own_adapter_with_its_keys(store):
    run_id = run_score({**SCORE, "method": "snip", "model_run": store["dpo"], "target": "lora", "sparsity": "0.1"})

    files = _masks(run_id)
    assert set(files) == {"snip.safetensors"}, "no head file for LoRA matrices"
    region, metadata = files["snip.safetensors"]
    adapter = load_file(os.path.join(_adapter_dir(store["dpo"]), "adapter_model.safetensors"))
    assert metadata["realign.target"] == "lora" and set(region) == set(adapter)
    for key, mask in region.items():
        assert mask.shape == adapter[key].shape and int(mask.sum()) == int(0.1 * mask.numel())
    metrics = mlflow.get_run(run_id).data.metrics
    assert "selected_fraction/q_proj.lora_A" in metrics and "selected_fraction/down_proj.lora_B" in metrics


def test_lora_actsvd_is_nlsrs_twenty_percent_of_each_lora_matrix(store):
    run_id = run_score({**SCORE, "method": "lora_actsvd", "model_run": store["dpo"], "target": "lora",
                        "sparsity": "0.2"})

    region, metadata = _masks(run_id)["lora_actsvd.safetensors"]
    assert metadata["realign.kind"] == "neurons" and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in region)
    assert all(int(m.sum()) == int(0.2 * m.numel()) for m in region.values())


def test_set_difference_logs_both_calibration_sets(store):
    run_id = run_score({**SCORE, "method": "set_difference", "model_run": store["dpo"], "top_q": "0.2",
                        "top_p": "0.2", "data.utility": "sst2"})

    run = mlflow.get_run(run_id)
    assert {d.tags[0].value for d in run.inputs.dataset_inputs} == {"calibration-safety", "calibration-utility"}
    region, _ = _masks(run_id)["set_difference.safetensors"]
    assert all(0 < int(m.sum()) <= int(0.2 * m.numel()) for m in region.values())
    assert run.data.metrics["selected_fraction"] < 0.2, "the utility top-p takes some of the safety top-q away"


def test_actsvd_run_holds_orthonormal_safety_and_utility_bases(store):
    run_id = run_score({**SCORE, "method": "actsvd", "model_run": store["dpo"], "rank": "4", "utility_rank": "2"})

    region, metadata = _masks(run_id)["actsvd.safetensors"]
    assert metadata["realign.kind"] == "ranks"
    model = models.load_model(TINY_MODEL)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    masks.check_region_shapes(region, "ranks", shapes)
    safety_keys = [k for k in region if k.endswith("::safety")]
    assert len(safety_keys) == 14
    for key in safety_keys:
        safety, utility = region[key], region[key.replace("::safety", "::utility")]
        assert safety.shape == (shapes[key.split("::")[0]][0], 4) and utility.shape[1] == 2
        assert torch.allclose(safety.T @ safety, torch.eye(4), atol=1e-5)
    assert mlflow.get_run(run_id).data.metrics["selected_count"] == 14 * 4


def test_base_model_and_merged_expo_runs_score_their_weights(store):
    base_id = run_score({**SCORE, "method": "wanda"})
    expo_id = run_score({**SCORE, "method": "wanda", "model_run": store["expo_merged"]})

    assert "realign.source.model" not in mlflow.get_run(base_id).data.tags
    assert mlflow.get_run(expo_id).data.tags["realign.source.model"] == store["expo_merged"]
    base_region, base_meta = _masks(base_id)["wanda.safetensors"]
    expo_region, _ = _masks(expo_id)["wanda.safetensors"]
    assert base_meta["realign.source.model"] == "base"
    assert set(base_region) == set(expo_region)
    assert any(not torch.equal(base_region[k], expo_region[k]) for k in base_region), "different weights, masks"


def test_cli_scores_and_prints_the_run_id(store):
    result = CliRunner().invoke(main, ["score", "--model", "tiny", "--model-run", store["dpo"], "--method", "wanda",
                                       "--sparsity", "0.1", "--nsamples", "4", "--eval.enabled", "false"])
    assert result.exit_code == 0, result.output
    run_id = re.search(r"run ([0-9a-f]{32})\s*$", result.output).group(1)
    assert mlflow.get_run(run_id).data.tags["mlflow.runName"] == "score/wanda"


def _hand_logged_align_run(tmp_path):
    """A finished align run of the tiny model without any weights (no adapter/ artifact)."""
    mlflow.set_experiment("hand-logged")
    with mlflow.start_run() as run:
        mlflow.set_tags({tracking.TAG_STAGE: "align", tracking.TAG_METHOD: "dpo", tracking.TAG_BASE_MODEL: "tiny",
                         tracking.TAG_COMPLETE: "true"})
    return run.info.run_id


def _broken_method(monkeypatch):
    """A registered method whose masks do not fit the model (one row short)."""
    def select(method, model, modules, safety, utility, settings):
        region = selection.Selection("neurons")
        for scored in modules:
            region.tensors[scored.key] = torch.zeros(scored.weight.shape[0] - 1, scored.weight.shape[1],
                                                     dtype=torch.bool)
            region.selected[scored.key], region.totals[scored.key] = 0, scored.weight.numel()
        return region

    broken = selection.ScoreMethod("broken", "neurons", ("weights",), lambda settings: False, "wrong shapes", select)
    monkeypatch.setattr(selection.METHODS, "_entries", {**selection.METHODS._entries, "broken": broken})


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("sparsity-high", "sparsity=1.5 is outside (0, 1)"),
        ("sparsity-zero", "sparsity=0.0 is outside (0, 1)"),
        ("top-q", "top_q=1.0 is outside (0, 1)"),
        ("method", "unknown scoring method 'magnitude'"),
        ("target", "target='adapter' is not one of weights, lora"),
        ("method-target", "method actsvd does not score target=lora"),
        ("no-weights", "has no adapter/ artifact"),
        ("lora-on-base", "the base model has no LoRA adapter to score"),
        ("lora-on-merged", "holds full weights (realign.output=model), no LoRA adapter"),
        ("mask-shape", "method broken: mask 'model.layers.0.self_attn.q_proj.weight' has shape (63, 64)"),
    ],
)
def test_bad_inputs_fail_in_one_line(store, tmp_path, monkeypatch, case, fragment):
    args = ["--model", "tiny", "--model-run", store["dpo"], "--nsamples", "4", "--eval.enabled", "false"]
    extra = {
        "sparsity-high": ["--sparsity", "1.5"],
        "sparsity-zero": ["--sparsity", "0"],
        "top-q": ["--method", "set_difference", "--top-q", "1"],
        "method": ["--method", "magnitude"],
        "target": ["--target", "adapter"],
        "method-target": ["--method", "actsvd", "--target", "lora"],
        "lora-on-merged": ["--target", "lora"],
        "mask-shape": ["--method", "broken"],
    }.get(case, [])
    if case == "no-weights":
        args[3] = _hand_logged_align_run(tmp_path)
    elif case == "lora-on-base":
        args[3], extra = "base", ["--target", "lora"]
    elif case == "lora-on-merged":
        args[3] = store["expo_merged"]
    elif case == "mask-shape":
        _broken_method(monkeypatch)
    before = set(_score_runs())

    result = CliRunner().invoke(main, ["score", *args, *extra])

    assert result.exit_code == 2, result.output
    # Only the mask-shape case gets as far as loading a model (its progress bar is not part of the message).
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    new = [r for k, r in _score_runs().items() if k not in before]
    assert len(new) == 1
    failed = new[0]
    assert failed.info.status == "FAILED" and fragment in failed.data.tags[tracking.TAG_ERROR]
    assert tracking.TAG_COMPLETE not in failed.data.tags
    assert not mlflow.MlflowClient().list_artifacts(failed.info.run_id, "masks"), "no mask was logged"


def test_mlproject_has_a_score_entry_with_the_stage_parameters():
    project = yaml.safe_load((Path(__file__).resolve().parent.parent / "MLproject").read_text())
    entry = project["entry_points"]["score"]
    assert {"model_run", "method", "sparsity", "top_q", "top_p", "rank", "target", "nsamples", "seed"} <= set(
        entry["parameters"])
    assert entry["command"].startswith("realign score ") and "--model_run {model_run}" in entry["command"]


def test_self_calibration_keeps_the_models_own_answers_that_the_judge_calls_safe(store, monkeypatch):
    import json

    import realign.eval

    class EveryOther:  # a judge stand-in: flags the 1st, 3rd, ... answer, so half are kept
        name = "every-other"

        def judge(self, prompts, responses):
            return [i % 2 == 0 for i in range(len(responses))]

    monkeypatch.setattr(realign.eval, "get_judge", lambda name, **options: EveryOther())
    run_id = run_score({**SCORE, "method": "lora_actsvd", "model_run": store["dpo"], "target": "lora",
                        "sparsity": "0.2", "data.safety_source": "self", "eval.max_new_tokens": "6"})
    run = mlflow.get_run(run_id)
    assert run.data.params["data.self_answers"] == "12" and run.data.params["data.self_kept"] == "6"
    (dataset,) = [d for d in run.inputs.dataset_inputs if d.dataset.name == "score-safety-self"]
    assert json.loads(dataset.dataset.profile)["num_rows"] == 6


def test_self_calibration_with_nothing_safe_fails_in_one_line(store):
    # The tiny random model writes no refusal: the keyword judge flags every answer.
    with pytest.raises(RealignError, match="flagged every one of the model's 12 answers"):
        run_score({**SCORE, "method": "lora_actsvd", "model_run": store["dpo"], "target": "lora",
                   "data.safety_source": "self", "eval.judge": "keyword", "eval.max_new_tokens": "4"})
