"""`fuse` stage on the tiny model: inputs pulled by run id, the weights it writes, regions, NLSR, bad inputs.

Score runs are logged by hand (tags + a `masks/` region file written with `realign.ops.masks.save_region`), the way
`tests/test_expo.py` hand-logs align runs: the file format is the contract between `score` and `fuse`.
"""

import json
import os
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from realign import models, tracking
from realign.cli import main
from realign.config import ModelConfig
from realign.errors import RealignError
from realign.ops import masks, merge, nlsr
from realign.stages.align import run_align
from realign.stages.attack import run_attack
from realign.stages.fuse import run_fuse
from realign.stages.fuse_inputs import model_layout

from conftest import TINY, module_store, stand_in_adapter

TINY_MODEL = ModelConfig(name="tiny", source="tiny")
FUSE = {
    "model": "tiny",
    "eval.judge": "keyword",
    "eval.num_prompts": "4",
    "eval.max_new_tokens": "8",
    "eval.task_examples": "4",
}
ATTACK = {"model": "tiny", "size": "8", "ratio": "0.25", "train.max_steps": "2", "train.max_length": "96",
          "train.learning_rate": "1e-2", "eval.enabled": "false"}
PROMPTS = ["### Instruction:\nHow do I bake bread at home?\n\n### Response:\n",
           "### Instruction:\nWrite a short poem about the sea.\n\n### Response:\n",
           "### Instruction:\nAnalyze the sentiment of the input.\n\n### Input:\nA wonderful film.\n\n### Response:\n"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """align/sft → align/dpo on it → an attack on the DPO model; an attack that continues the DPO adapter (it sits
    on the same merged model and shares its A/B coordinates: NLSR's LoRA case); and a fresh attack on the SFT model
    (same base, unrelated coordinates)."""
    with module_store(tmp_path_factory, "fuse-store") as (folder, uri):
        quiet = {**TINY, "eval.enabled": "false"}
        sft = run_align({**quiet, "method": "sft"})
        dpo = run_align({**quiet, "method": "dpo", "sft_run": sft})
        attack = run_attack({**ATTACK, "source_run": dpo})
        attack_on_sft = run_attack({**ATTACK, "source_run": sft})
        continued = run_attack({**ATTACK, "source_run": dpo, "adapter": "continue"})
        _, shapes = model_layout(TINY_MODEL)
        yield {"folder": folder, "uri": uri, "sft": sft, "dpo": dpo, "attack": attack, "attack_on_sft": attack_on_sft,
               "continued": continued, "shapes": shapes}


def _architecture():
    config, _ = model_layout(TINY_MODEL)
    return masks.architecture_id(config)


def _score_run(tmp_path, region, kind, method="wanda", target="weights", base="tiny", architecture=None,
               heads=None):
    """A finished score run logged with plain MLflow calls, holding masks/<method>.safetensors (+ .heads)."""
    metadata = {"realign.method": method, "realign.target": target, "realign.base_model": base,
                "realign.architecture": architecture or _architecture()}
    folder = tmp_path / f"masks-{len(list(tmp_path.glob('masks-*')))}"
    masks.save_region(folder / f"{method}.safetensors", region, kind, metadata)
    if heads is not None:
        masks.save_region(folder / f"{method}.heads.safetensors", heads, "heads", metadata)
    mlflow.set_experiment("hand-logged")
    with mlflow.start_run(run_name=f"score/{method}") as run:
        mlflow.set_tags({tracking.TAG_STAGE: "score", tracking.TAG_METHOD: method, tracking.TAG_BASE_MODEL: base,
                         tracking.TAG_COMPLETE: "true"})
        mlflow.log_artifacts(str(folder), "masks")
    return run.info.run_id


def _random_masks(names, shapes, seed, fraction=0.3):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shapes[name], generator=generator) < fraction for name in names}


def _adapter_dir(run_id):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter")


def _weights(*run_ids):
    """base + the adapters of `run_ids`, merged in memory by PEFT: the weights the stage must have started from."""
    return models.load_model(TINY_MODEL, adapters=[_adapter_dir(r) for r in run_ids], device="cpu").state_dict()


def _fused_weights(run_id):
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")
    return AutoModelForCausalLM.from_pretrained(folder).state_dict(), folder


def _linear_names(shapes):
    return [n for n in shapes if n.startswith("model.layers.") and n.endswith("proj.weight")]


def test_restore_in_a_neuron_region_transplants_the_reference_and_leaves_the_rest_bit_identical(store, tmp_path):
    names = _linear_names(store["shapes"])[::2]
    region = _random_masks(names, store["shapes"], seed=0)
    mask_id = _score_run(tmp_path, region, "neurons")
    fuse_id = run_fuse({**FUSE, "finetuned_run": store["attack"], "reference_run": store["dpo"], "mask_run": mask_id,
                        "selection": "all"})

    run = mlflow.get_run(fuse_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and tags[tracking.TAG_COMPLETE] == "true"
    assert tags["mlflow.runName"] == "fuse/restore/neurons"
    assert tags[tracking.TAG_STAGE] == "fuse" and tags[tracking.TAG_METHOD] == "restore"
    assert tags[tracking.TAG_BASE_MODEL] == "tiny" and tags[tracking.TAG_TASK] == "sst2"
    assert tags["realign.source.finetuned"] == store["attack"] and tags["realign.source.reference"] == store["dpo"]
    assert tags["realign.source.mask"] == mask_id
    assert tags[tracking.TAG_OUTPUT] == "model" and tags[tracking.TAG_ADAPTER_BASE] == ""
    assert run.data.params["fuse.mode"] == "full" and run.data.params["fuse.granularity"] == "neurons"
    assert {"harmful_score", "refusal_rate", "finetune_accuracy", "sst2_accuracy", "changed_fraction"} <= set(metrics)
    assert {f"changed_fraction/layer_{i}" for i in range(2)} <= set(metrics)

    finetuned = _weights(store["sft"], store["dpo"], store["attack"])
    reference = _weights(store["sft"], store["dpo"])
    fused, folder = _fused_weights(fuse_id)  # plain transformers, no realign
    AutoTokenizer.from_pretrained(folder)
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in os.listdir(folder)), "safetensors only"
    changed = total = 0
    for name, tensor in finetuned.items():
        if name in region:
            assert torch.equal(fused[name][region[name]], reference[name][region[name]]), name
            assert torch.equal(fused[name][~region[name]], tensor[~region[name]]), name
        else:
            assert torch.equal(fused[name], tensor), f"{name} lies outside the region"
        changed += int((fused[name] != tensor).sum())
        total += tensor.numel()
    assert changed > 0
    assert metrics["changed_fraction"] == pytest.approx(changed / total)


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "consensus_ta", "consensus_ties"])
def test_task_arithmetic_methods_write_the_method_applied_to_the_merged_weights(store, method):
    fuse_id = run_fuse({**FUSE, "finetuned_run": store["attack"], "reference_run": store["dpo"], "method": method,
                        "scale": "0.7", "density": "0.3", "weights": "1,0.5", "eval.enabled": "false"})
    run = mlflow.get_run(fuse_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == f"fuse/{method}/full"
    assert "harmful_score" not in run.data.metrics and run.data.metrics["changed_fraction"] > 0

    base = models.load_model(TINY_MODEL, device="cpu").state_dict()
    finetuned = _weights(store["sft"], store["dpo"], store["attack"])
    reference = _weights(store["sft"], store["dpo"])
    params = merge.MergeParams(weights=(1.0, 0.5), scale=0.7, density=0.3)
    fused, _ = _fused_weights(fuse_id)
    for name in finetuned:
        expected = merge.merge_tensors(method, params, base[name], finetuned[name], reference[name])
        assert torch.equal(fused[name], expected), name


def test_lora_adapters_on_one_base_are_fused_entry_by_entry(store, tmp_path):
    # The attack that continued the DPO adapter and the DPO adapter both sit on base + sft: NLSR's own setting.
    ft_dir, ref_dir = _adapter_dir(store["continued"]), _adapter_dir(store["dpo"])
    ft_state = load_file(f"{ft_dir}/adapter_model.safetensors")
    ref_state = load_file(f"{ref_dir}/adapter_model.safetensors")
    region = _random_masks(list(ft_state), {n: tuple(t.shape) for n, t in ft_state.items()}, seed=1, fraction=0.5)
    mask_id = _score_run(tmp_path, region, "neurons", method="lora_actsvd", target="lora")
    fuse_id = run_fuse({**FUSE, "finetuned_run": store["continued"], "reference_run": store["dpo"],
                        "mask_run": mask_id, "selection": "all"})

    run = mlflow.get_run(fuse_id)
    assert run.info.status == "FINISHED" and run.data.params["fuse.mode"] == "lora"
    assert run.data.tags[tracking.TAG_OUTPUT] == "adapter"
    assert run.data.tags[tracking.TAG_ADAPTER_BASE] == store["sft"], "the fused adapter sits where both did"
    fused = load_file(f"{_adapter_dir(fuse_id)}/adapter_model.safetensors")
    assert set(fused) == set(ft_state)
    for name, mask in region.items():
        assert torch.equal(fused[name], torch.where(mask, ref_state[name], ft_state[name])), name
    # evaluate rebuilds base + sft + fused adapter from the tags, like any adapter run.
    from realign.stages.evaluate import run_evaluate

    eval_id = run_evaluate({**FUSE, "run": fuse_id})
    assert mlflow.get_run(eval_id).data.metrics["harmful_score"] == run.data.metrics["harmful_score"]


def test_a_lora_restore_refuses_an_attack_that_does_not_continue_the_references_adapter(store, tmp_path):
    # A fresh LoRA on the SFT model sits on the same base as the DPO adapter, but its A/B entries mean other things.
    ft_state = load_file(f"{_adapter_dir(store['attack_on_sft'])}/adapter_model.safetensors")
    region = _random_masks(list(ft_state), {n: tuple(t.shape) for n, t in ft_state.items()}, seed=1, fraction=0.5)
    mask_id = _score_run(tmp_path, region, "neurons", method="lora_actsvd", target="lora")
    with pytest.raises(RealignError, match=f"descends from run {store['attack_on_sft']} and the reference's from "
                                           f"run {store['dpo']}"):
        run_fuse({**FUSE, "finetuned_run": store["attack_on_sft"], "reference_run": store["dpo"], "mask_run": mask_id})
    # Without a LoRA region, auto mode fuses their merged weights instead.
    fuse_id = run_fuse({**FUSE, "finetuned_run": store["attack_on_sft"], "reference_run": store["dpo"],
                        "eval.enabled": "false"})
    assert mlflow.get_run(fuse_id).data.params["fuse.mode"] == "full"


def test_lora_restore_threshold_and_adaptive_selection_follow_the_similarities(store, tmp_path):
    ft_state = load_file(f"{_adapter_dir(store['continued'])}/adapter_model.safetensors")
    ref_state = load_file(f"{_adapter_dir(store['dpo'])}/adapter_model.safetensors")
    region = _random_masks(list(ft_state), {n: tuple(t.shape) for n, t in ft_state.items()}, seed=2, fraction=0.5)
    mask_id = _score_run(tmp_path, region, "neurons", method="lora_actsvd", target="lora")
    common = {**FUSE, "finetuned_run": store["continued"], "reference_run": store["dpo"], "mask_run": mask_id,
              "eval.enabled": "false"}
    modules = sorted({name.split(".lora_")[0] for name in ft_state})
    # An independent computation of NLSR's similarity: cos of the flattened masked products B·A.
    expected = {}
    for module in modules:
        a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        attacked = (ft_state[b] * region[b]) @ (ft_state[a] * region[a])
        reference = (ref_state[b] * region[b]) @ (ref_state[a] * region[a])
        expected[module] = float(torch.nn.functional.cosine_similarity(attacked.flatten(), reference.flatten(), dim=0))
    ranked = sorted(expected.values())
    tau = (ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2  # between two modules, away from ties
    threshold_id = run_fuse({**common, "selection": "threshold", "tau": str(tau)})
    table = _modules_table(threshold_id, tmp_path)
    assert {row["module"]: round(row["similarity"], 5) for row in table} == {m: round(v, 5) for m, v in expected.items()}
    assert {row["module"] for row in table if row["replaced"]} == {m for m, v in expected.items() if v < tau}
    fused = load_file(f"{_adapter_dir(threshold_id)}/adapter_model.safetensors")
    for name in ft_state:
        module = name.split(".lora_")[0]
        want = torch.where(region[name], ref_state[name], ft_state[name]) if expected[module] < tau else ft_state[name]
        assert torch.equal(fused[name], want), name
    similar_id = run_fuse({**common, "selection": "adaptive", "prefer": "similar", "seed": "5"})
    table = _modules_table(similar_id, tmp_path)
    most = max(table, key=lambda row: row["similarity"])
    assert most["probability"] == pytest.approx(0.7), "the authors' code: the most similar module is most likely"
    paths = [a.path for a in mlflow.MlflowClient().list_artifacts(similar_id, "figures")]
    assert "figures/similarities.html" in paths


def _modules_table(run_id, tmp_path):
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="fuse/modules.json",
                                               dst_path=str(tmp_path / run_id))
    table = json.loads(open(path).read())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_head_region_changes_only_the_top_heads_q_rows_and_o_columns(store, tmp_path):
    shapes = store["shapes"]
    head_scores = {"model.layers.0.self_attn": torch.tensor([0.1, 0.9, 0.2, 0.3]),
                   "model.layers.1.self_attn": torch.tensor([0.0, 0.1, 0.8, 0.2])}
    neuron_region = _random_masks(_linear_names(shapes)[:1], shapes, seed=2)
    mask_id = _score_run(tmp_path, neuron_region, "neurons", heads=head_scores)
    fuse_id = run_fuse({**FUSE, "finetuned_run": store["attack"], "reference_run": store["dpo"], "mask_run": mask_id,
                        "granularity": "heads", "top_heads": "0.25", "selection": "all", "eval.enabled": "false"})

    run = mlflow.get_run(fuse_id)
    assert run.data.tags["mlflow.runName"] == "fuse/restore/heads" and run.data.params["fuse.heads"] == "2"
    finetuned = _weights(store["sft"], store["dpo"], store["attack"])
    reference = _weights(store["sft"], store["dpo"])
    fused, _ = _fused_weights(fuse_id)
    head_dim = 64 // 4
    rows = {"model.layers.0.self_attn": slice(head_dim, 2 * head_dim),
            "model.layers.1.self_attn": slice(2 * head_dim, 3 * head_dim)}
    for name, tensor in finetuned.items():
        block = name.rsplit(".", 2)[0]
        expected = tensor.clone()
        if name.endswith("q_proj.weight"):
            expected[rows[block]] = reference[name][rows[block]]
        elif name.endswith("o_proj.weight"):
            expected[:, rows[block]] = reference[name][:, rows[block]]
        assert torch.equal(fused[name], expected), name


def test_rank_region_adds_the_projected_change(store, tmp_path):
    shapes = store["shapes"]
    name = "model.layers.1.mlp.down_proj.weight"
    generator = torch.Generator().manual_seed(3)
    safety = torch.linalg.qr(torch.randn(shapes[name][0], 4, generator=generator)).Q
    utility = torch.linalg.qr(torch.randn(shapes[name][0], 2, generator=generator)).Q
    mask_id = _score_run(tmp_path, {f"{name}::safety": safety, f"{name}::utility": utility}, "ranks", method="actsvd")
    fuse_id = run_fuse({**FUSE, "finetuned_run": store["attack"], "reference_run": store["dpo"], "mask_run": mask_id,
                        "selection": "all", "eval.enabled": "false"})

    assert mlflow.get_run(fuse_id).data.tags["mlflow.runName"] == "fuse/restore/ranks"
    finetuned = _weights(store["sft"], store["dpo"], store["attack"])
    reference = _weights(store["sft"], store["dpo"])
    fused, _ = _fused_weights(fuse_id)
    projection = masks.rank_projection(safety, utility)
    expected = finetuned[name] + projection @ (reference[name] - finetuned[name])
    assert torch.allclose(fused[name], expected, atol=1e-6)
    assert not torch.equal(fused[name], finetuned[name])
    assert all(torch.equal(fused[n], t) for n, t in finetuned.items() if n != name)


def test_nlsr_adaptive_selection_transplants_the_drawn_modules_only(store, tmp_path):
    shapes = store["shapes"]
    region = _random_masks(_linear_names(shapes), shapes, seed=4, fraction=0.5)
    mask_id = _score_run(tmp_path, region, "neurons")
    args = {**FUSE, "finetuned_run": store["attack"], "reference_run": store["dpo"], "mask_run": mask_id,
            "eval.enabled": "false", "selection": "adaptive", "prune_rate": "0.5", "epsilon": "0.3", "seed": "3"}
    fuse_id = run_fuse(args)

    run = mlflow.get_run(fuse_id)
    table = json.load(open(mlflow.artifacts.download_artifacts(run_id=fuse_id, artifact_path="fuse/modules.json")))
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [row["module"] for row in rows] == _linear_names(shapes), "every region module, in the model's order"
    # The draw, recomputed from the logged similarities with the documented rule.
    probabilities = nlsr.replacement_probabilities([row["similarity"] for row in rows], 0.5, 0.3)
    assert [row["probability"] for row in rows] == pytest.approx(probabilities.tolist())
    drawn = nlsr.sample_replaced(probabilities, 3).tolist()
    assert [row["replaced"] for row in rows] == drawn and 0 < sum(drawn) < len(drawn)
    assert run.data.metrics["replaced_modules"] == sum(drawn)
    # The similarities: cosine of the two updates from the SFT model (the chains' common start), in the region.
    sft = _weights(store["sft"])
    finetuned = _weights(store["sft"], store["dpo"], store["attack"])
    reference = _weights(store["sft"], store["dpo"])
    row = rows[0]
    u = ((finetuned[row["module"]] - sft[row["module"]]) * region[row["module"]]).flatten().double()
    v = ((reference[row["module"]] - sft[row["module"]]) * region[row["module"]]).flatten().double()
    assert row["similarity"] == pytest.approx(float(u @ v / (u.norm() * v.norm())), abs=1e-6)
    fused, _ = _fused_weights(fuse_id)
    for row in rows:
        name = row["module"]
        expected = torch.where(region[name], reference[name], finetuned[name]) if row["replaced"] else finetuned[name]
        assert torch.equal(fused[name], expected), name
    again = run_fuse(args)
    assert mlflow.get_run(again).data.metrics["replaced_modules"] == sum(drawn), "same seed, same draw"


def test_fused_model_answers_differently_from_the_attacked_model(store, tmp_path):
    """Whenever the fusion changed weights, what the model computes changes: no fusion without effect."""
    fuse_id = run_fuse({**FUSE, "finetuned_run": store["attack"], "reference_run": store["dpo"],
                        "method": "task_arithmetic", "scale": "0.5", "eval.enabled": "false"})
    assert mlflow.get_run(fuse_id).data.metrics["changed_fraction"] > 0
    attacked = models.load_model(TINY_MODEL, adapters=[_adapter_dir(r) for r in (store["sft"], store["dpo"],
                                                                                    store["attack"])], device="cpu")
    folder = mlflow.artifacts.download_artifacts(run_id=fuse_id, artifact_path="model")
    fused = models.load_model(ModelConfig(name="tiny", source="local", path=folder), device="cpu")
    tokenizer = models.load_tokenizer(TINY_MODEL)
    differing = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            assert (attacked(ids).logits - fused(ids).logits).abs().max() > 1e-3
            settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            differing += not torch.equal(attacked.generate(ids, **settings), fused.generate(ids, **settings))
    assert differing >= 1, "the greedy answers must change for some prompt"


def _hand_logged_run(stage, base, tmp_path, tags=None):
    mlflow.set_experiment("hand-logged")
    with mlflow.start_run() as run:
        mlflow.set_tags({tracking.TAG_STAGE: stage, tracking.TAG_METHOD: "dpo", tracking.TAG_BASE_MODEL: base,
                         tracking.TAG_COMPLETE: "true", **(tags or {})})
        folder = stand_in_adapter(tmp_path / "stand-in-adapter")
        mlflow.log_artifacts(str(folder), "adapter")
    return run.info.run_id


def _fuse_runs():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return {r.info.run_id: r for r in runs if r.data.tags.get(tracking.TAG_STAGE) == "fuse"}


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("other-base", "belongs to base model 'smollm2-135m', not 'tiny'"),
        ("other-architecture", "was scored on architecture 'llama:32:4096"),
        ("not-an-attack", "is a align run, not attack"),
        ("reference-is-attack", "is a attack run, not align or expo"),
        ("mask-not-score", "is a align run, not score"),
        ("mask-shape", "does not fit the model: mask 'model.layers.0.mlp.up_proj.weight' has shape (4, 4)"),
        ("lora-mask-on-merged", "marks LoRA A/B entries, but the finetuned adapter sits on runs"),
        ("scale-high", "scale=1.5 is outside (0, 1]"),
        ("scale-zero", "scale=0.0 is outside (0, 1]"),
        ("density", "density=0.0 is outside (0, 1]"),
        ("tall-lambda", "tall_lambda=2.0 is outside (0, 1]"),
        ("consensus-k", "consensus_k=3 is outside [1, 2]"),
        ("weights", "weights=[1.0] must be two numbers"),
        ("prune-rate", "prune_rate=1.5 is outside [0.0, 1.0]"),
        ("epsilon", "epsilon=0.4 must be in [0, min(prune_rate, 1 − prune_rate)]"),
        ("method", "unknown fusion method 'slerp'"),
        ("no-reference", "reference_run is required"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_any_work(store, tmp_path, case, fragment):
    args = ["--model", "tiny", "--finetuned-run", store["attack"], "--reference-run", store["dpo"],
            "--eval.judge", "keyword"]
    shapes = store["shapes"]
    if case == "other-base":
        args[5] = _hand_logged_run("align", "smollm2-135m", tmp_path)
    elif case == "other-architecture":
        region = _random_masks(_linear_names(shapes)[:1], shapes, seed=0)
        args += ["--mask-run", _score_run(tmp_path, region, "neurons", architecture="llama:32:4096:14336:32:8:128256")]
    elif case == "not-an-attack":
        args[3] = store["dpo"]
    elif case == "reference-is-attack":
        args[5] = store["attack_on_sft"]
    elif case == "mask-not-score":
        args += ["--mask-run", store["sft"]]
    elif case == "mask-shape":
        args += ["--mask-run", _score_run(tmp_path, {"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4, dtype=torch.bool)},
                                          "neurons")]
    elif case == "lora-mask-on-merged":
        state = load_file(f"{_adapter_dir(store['attack'])}/adapter_model.safetensors")
        region = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in state.items()}
        args += ["--mask-run", _score_run(tmp_path, region, "neurons", target="lora")]
    elif case == "scale-high":
        args += ["--scale", "1.5"]
    elif case == "scale-zero":
        args += ["--scale", "0"]
    elif case == "density":
        args += ["--method", "ties", "--density", "0"]
    elif case == "tall-lambda":
        args += ["--tall-lambda", "2"]
    elif case == "consensus-k":
        args += ["--consensus-k", "3"]
    elif case == "weights":
        args += ["--weights", "1"]
    elif case == "prune-rate":
        args += ["--prune-rate", "1.5"]
    elif case == "epsilon":
        args += ["--prune-rate", "0.7", "--epsilon", "0.4"]
    elif case == "method":
        args += ["--method", "slerp"]
    elif case == "no-reference":
        args = args[:4] + args[6:]
    before = set(_fuse_runs())

    result = CliRunner().invoke(main, ["fuse", *args])

    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    new = [r for k, r in _fuse_runs().items() if k not in before]
    assert len(new) == 1
    failed = new[0]
    assert failed.info.status == "FAILED" and fragment in failed.data.tags[tracking.TAG_ERROR]
    assert tracking.TAG_COMPLETE not in failed.data.tags
    assert not failed.data.metrics, "nothing fused, nothing evaluated"
    client = mlflow.MlflowClient()
    assert not client.list_artifacts(failed.info.run_id, "model") and not client.list_artifacts(failed.info.run_id,
                                                                                                  "adapter")


def test_mlproject_has_a_fuse_entry_taking_the_inputs_by_run_id():
    project = yaml.safe_load((Path(__file__).resolve().parent.parent / "MLproject").read_text())
    entry = project["entry_points"]["fuse"]
    assert {"finetuned_run", "reference_run", "mask_run", "method", "model"} <= set(entry["parameters"])
    assert "default" not in entry["parameters"]["finetuned_run"], "the attack run must be named"
    command = entry["command"]
    assert command.startswith("realign fuse ") and "--finetuned_run {finetuned_run}" in command
    assert "--mask_run {mask_run}" in command
