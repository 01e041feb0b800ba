"""The field's other post-hoc repairs as `fuse` methods on the tiny model (RESTA, Antidote, Safe LoRA, SafeMERGE, DARE): the
weights each run writes against the papers' formulas computed here from PEFT-merged inputs, and their bad inputs."""

import math

import mlflow
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from realign import tracking
from realign.cli import main
from realign.ops import masks
from realign.stages.align import run_align
from realign.stages.attack import run_attack
from realign.config import ModelConfig
from realign.stages.fuse import run_fuse
from realign.stages.fuse_inputs import model_layout
from realign.stages.score import run_score

from conftest import TINY, module_store
from test_ops_realign_methods import _uniform
from test_fuse import (ATTACK, FUSE, _adapter_dir, _fuse_runs, _fused_weights, _linear_names, _random_masks,
                       _score_run, _weights)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """align/sft → align/dpo on it → an attack on the DPO model (a new LoRA on base + sft + dpo)."""
    with module_store(tmp_path_factory, "repairs-store") as (folder, uri):
        quiet = {**TINY, "eval.enabled": "false"}
        sft = run_align({**quiet, "method": "sft"})
        dpo = run_align({**quiet, "method": "dpo", "sft_run": sft})
        attack = run_attack({**ATTACK, "source_run": dpo})
        # an attack that keeps training the DPO adapter on the SFT model: the DPO adapter shares its base and rank
        continued = run_attack({**ATTACK, "source_run": dpo, "adapter": "continue"})
        _, shapes = model_layout(ModelConfig(name="tiny", source="tiny"))
        yield {"folder": folder, "uri": uri, "sft": sft, "dpo": dpo, "attack": attack, "continued": continued,
               "shapes": shapes}


QUIET_FUSE = {**FUSE, "eval.enabled": "false"}


@pytest.mark.parametrize("unaligned", ["sft", "base"])
def test_resta_adds_gamma_times_the_aligned_minus_unaligned_weights(store, unaligned):
    fuse_id = run_fuse({**QUIET_FUSE, "finetuned_run": store["attack"], "reference_run": store["dpo"],
                        "method": "resta", "gamma": "0.6",
                        "unaligned_run": store["sft"] if unaligned == "sft" else "base"})
    run = mlflow.get_run(fuse_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "fuse/resta/full"
    assert run.data.tags.get("realign.source.unaligned", "") == (store["sft"] if unaligned == "sft" else "")
    finetuned = _weights(store["sft"], store["dpo"], store["attack"])
    reference = _weights(store["sft"], store["dpo"])
    theta_un = _weights(store["sft"]) if unaligned == "sft" else _weights()
    fused, _ = _fused_weights(fuse_id)
    moved = 0
    for name, ft in finetuned.items():
        expected = (ft.float() + 0.6 * (reference[name].float() - theta_un[name].float())).to(ft.dtype)
        assert torch.allclose(fused[name], expected, atol=1e-6), name
        moved += not torch.equal(fused[name], ft)
    assert moved > 0


def test_resta_with_dare_drops_the_fine_tuning_delta_by_the_seeded_hash_and_doubles_the_rest(store):
    fuse_id = run_fuse({**QUIET_FUSE, "finetuned_run": store["attack"], "reference_run": store["dpo"],
                        "method": "resta", "gamma": "1", "unaligned_run": store["sft"], "dare_rate": "0.5",
                        "dare_seed": "3"})
    finetuned = _weights(store["sft"], store["dpo"], store["attack"])
    reference = _weights(store["sft"], store["dpo"])
    theta_un = _weights(store["sft"])
    fused, _ = _fused_weights(fuse_id)
    kept = total = 0
    for name, ft in finetuned.items():
        delta = (ft.float() - reference[name].float()).reshape(-1)
        rest = (fused[name].float() - 2 * reference[name].float() + theta_un[name].float()).reshape(-1)
        for index in torch.nonzero(delta.abs() > 1e-4).reshape(-1)[:300].tolist():
            expected = 2 * delta[index] if _uniform(3, name, 0, index) >= 0.5 else 0.0
            assert float(rest[index]) == pytest.approx(float(expected), abs=1e-5), (name, index)
            kept += expected != 0.0
            total += 1
    assert total > 1000 and abs(kept / total - 0.5) < 0.05


def test_antidote_zeroes_the_attacked_models_harmful_wanda_region(store, tmp_path):
    score_id = run_score({"model": "tiny", "model_run": store["attack"], "method": "wanda", "sparsity": "0.1",
                          "comparison": "row", "data.safety_source": "harmful", "nsamples": "4",
                          "eval.enabled": "false"})
    score = mlflow.get_run(score_id)
    assert score.data.tags["realign.source.model"] == store["attack"]
    assert score.data.params["data.safety_source"] == "harmful"
    fuse_id = run_fuse({**QUIET_FUSE, "finetuned_run": store["attack"], "mask_run": score_id, "method": "antidote"})
    run = mlflow.get_run(fuse_id)
    assert run.info.status == "FINISHED" and "realign.source.reference" not in run.data.tags
    region_file = mlflow.artifacts.download_artifacts(run_id=score_id, artifact_path="masks/wanda.safetensors",
                                                      dst_path=str(tmp_path))
    region, _ = masks.load_region(region_file)
    finetuned = _weights(store["sft"], store["dpo"], store["attack"])
    fused, _ = _fused_weights(fuse_id)
    for name, ft in finetuned.items():
        if name in region:
            mask = region[name].bool()
            assert torch.all(fused[name][mask] == 0), name
            assert torch.equal(fused[name][~mask], ft[~mask]), name
            # per output row, the top 10 % (row comparison, as Antidote's code)
            assert int(mask.sum(dim=1).max()) == max(1, int(0.1 * ft.shape[1])), name
        else:
            assert torch.equal(fused[name], ft), name
    assert run.data.metrics["changed_fraction"] > 0


def _safe_lora_expected(a, b, v):
    c = v @ v.T / torch.linalg.matrix_norm(v)
    delta = b @ a
    similarity = torch.nn.functional.cosine_similarity((c @ delta).flatten(), delta.flatten(), dim=0).item()
    return c @ b, similarity


def _safe_lora_per_module(store, attacked):
    """{module: (C·B, similarity)} of an attacked adapter's modules, V = W_dpo − W_sft (PEFT-merged here)."""
    aligned, unaligned = _weights(store["sft"], store["dpo"]), _weights(store["sft"])
    expected = {}
    for key in attacked:
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            weight = module.removeprefix("base_model.model.") + ".weight"
            v = aligned[weight].float() - unaligned[weight].float()
            expected[module] = _safe_lora_expected(attacked[key].float(),
                                                   attacked[f"{module}.lora_B.weight"].float(), v)
    return expected


@pytest.mark.parametrize("select", ["count", "threshold"])
def test_safe_lora_projects_the_least_aligned_modules_b_onto_the_alignment_matrix(store, tmp_path, select):
    options = {"safe_lora_layers": "3"} if select == "count" else {"safe_lora_tau": "0.3"}
    fuse_id = run_fuse({**QUIET_FUSE, "finetuned_run": store["attack"], "reference_run": store["dpo"],
                        "method": "safe_lora", "unaligned_run": store["sft"], "safe_lora_select": select, **options})
    run = mlflow.get_run(fuse_id)
    assert run.data.tags[tracking.TAG_OUTPUT] == "adapter" and run.data.params["fuse.mode"] == "lora"
    assert run.data.tags[tracking.TAG_ADAPTER_BASE] == f"{store['sft']},{store['dpo']}"
    attacked = load_file(f"{_adapter_dir(store['attack'])}/adapter_model.safetensors")
    fused = load_file(f"{_adapter_dir(fuse_id)}/adapter_model.safetensors")
    expected = _safe_lora_per_module(store, attacked)
    similarities = sorted(s for _, s in expected.values())
    cutoff = similarities[2] if select == "count" else 0.3
    projected = 0
    for module, (b_projected, similarity) in expected.items():
        assert torch.equal(fused[f"{module}.lora_A.weight"], attacked[f"{module}.lora_A.weight"])
        b_key = f"{module}.lora_B.weight"
        if similarity <= cutoff:
            assert torch.allclose(fused[b_key].float(), b_projected, atol=1e-5), module
            projected += 1
        else:
            assert torch.equal(fused[b_key], attacked[b_key]), module
    assert projected == (3 if select == "count" else sum(s <= 0.3 for s in similarities))
    table = mlflow.MlflowClient().load_table(run.info.experiment_id, "fuse/modules.json", run_ids=[fuse_id])
    assert sorted(table["similarity"].round(5)) == pytest.approx([round(s, 5) for s in similarities], abs=1e-4)
    assert int(table["replaced"].sum()) == projected


def test_safemerge_merges_the_safety_lora_per_factor_where_the_attacked_update_strays(store):
    import json

    attacked = load_file(f"{_adapter_dir(store['continued'])}/adapter_model.safetensors")
    safety = load_file(f"{_adapter_dir(store['dpo'])}/adapter_model.safetensors")
    config = json.load(open(f"{_adapter_dir(store['continued'])}/adapter_config.json"))
    scale = config["lora_alpha"] / config["r"]  # the same LoRA settings for both (SafeMERGE refuses others)
    similarity = {module: value for module, (_, value) in _safe_lora_per_module(store, attacked).items()}
    ordered = sorted(similarity.values())
    middle = len(ordered) // 2  # about half the modules below τ, none at it (float noise would decide that one)
    tau = (ordered[middle - 1] + ordered[middle]) / 2
    fuse_id = run_fuse({**QUIET_FUSE, "finetuned_run": store["continued"], "reference_run": store["dpo"],
                        "unaligned_run": store["sft"], "safety_run": store["dpo"], "method": "safemerge",
                        "safemerge_tau": str(tau), "safemerge_weights": "0.7,0.3"})
    run = mlflow.get_run(fuse_id)
    assert run.info.status == "FINISHED" and run.data.tags["realign.source.safety"] == store["dpo"]
    assert run.data.params["fuse.mode"] == "lora" and run.data.tags[tracking.TAG_ADAPTER_BASE] == store["sft"]
    fused_dir = _adapter_dir(fuse_id)
    fused = load_file(f"{fused_dir}/adapter_model.safetensors")
    assert json.load(open(f"{fused_dir}/adapter_config.json"))["lora_alpha"] == config["r"], "scale 1, as PEFT"
    merged = 0
    for module, value in similarity.items():
        a_f, b_f = attacked[f"{module}.lora_A.weight"].float(), attacked[f"{module}.lora_B.weight"].float()
        a_s, b_s = safety[f"{module}.lora_A.weight"].float(), safety[f"{module}.lora_B.weight"].float()
        update = fused[f"{module}.lora_B.weight"].float() @ fused[f"{module}.lora_A.weight"].float()
        if value < tau:
            expected = (0.7 * scale * b_f @ a_f + 0.3 * scale * b_s @ a_s
                        + math.sqrt(0.7 * 0.3) * scale * (b_f @ a_s + b_s @ a_f))
            merged += 1
        else:
            expected = scale * b_f @ a_f
        assert torch.allclose(update, expected, atol=1e-5), (module, value < tau)
    assert 0 < merged < len(similarity)
    table = mlflow.MlflowClient().load_table(run.info.experiment_id, "fuse/modules.json", run_ids=[fuse_id])
    assert int(table["replaced"].sum()) == merged


def _antidote_mask(store, tmp_path, model_run, source):
    region = _random_masks(_linear_names(store["shapes"])[:2], store["shapes"], seed=0)
    mask_id = _score_run(tmp_path, region, "neurons")
    client = mlflow.MlflowClient()
    if model_run:
        client.set_tag(mask_id, "realign.source.model", model_run)
    client.log_param(mask_id, "data.safety_source", source)
    return mask_id


@pytest.mark.parametrize("case, fragment", [
    ("antidote-no-mask", "antidote zeroes a region and needs one"),
    ("antidote-reference", "antidote reads no reference"),
    ("antidote-other-model", "scored run"),
    ("antidote-base-model", "scored the base model, not the attacked run"),
    ("antidote-safe-data", "was calibrated on data.safety_source=builtin"),
    ("unaligned-for-restore", "unaligned_run is read by resta, safe_lora and safemerge, not restore"),
    ("gamma", "gamma=0.0 must be > 0"),
    ("dare-rate", "dare_rate=1.0 is outside [0, 1)"),
    ("dare-for-restore", "restore has no task vector to drop"),
    ("safe-lora-tau", "safe_lora_tau=2.0 is outside [-1, 1]"),
    ("safe-lora-layers", "safe_lora_layers=-1 must be >= 0"),
    ("safe-lora-full", "safe_lora works on the attacked adapter's LoRA factors, which full mode cannot"),
    ("resta-lora", "resta adds θ_ref − θ_un to full weights"),
    ("safemerge-no-safety", "safemerge merges a safety LoRA and needs one"),
    ("safety-for-restore", "safety_run is read by safemerge, not restore"),
    ("safemerge-tau", "safemerge_tau=1.5 is outside [-1, 1]"),
    ("safemerge-weights", "safemerge_weights=[0.0, 0.0] must be two numbers >= 0"),
    ("safemerge-other-base", "SafeMERGE merges two LoRAs of one base"),
    ("safemerge-full", "safemerge works on the attacked adapter's LoRA factors, which full mode cannot"),
])
def test_bad_repair_inputs_fail_in_one_line_before_any_work(store, tmp_path, case, fragment):
    args = ["--model", "tiny", "--finetuned-run", store["attack"], "--eval.judge", "keyword"]
    reference = ["--reference-run", store["dpo"]]

    def mask(model_run, source):
        return ["--mask-run", _antidote_mask(store, tmp_path, model_run, source)]

    extra = {
        "antidote-no-mask": ["--method", "antidote"],
        "antidote-reference": lambda: ["--method", "antidote", *reference, *mask(store["attack"], "harmful")],
        "antidote-other-model": lambda: ["--method", "antidote", *mask(store["dpo"], "harmful")],
        "antidote-base-model": lambda: ["--method", "antidote", *mask("", "harmful")],
        "antidote-safe-data": lambda: ["--method", "antidote", *mask(store["attack"], "builtin")],
        "unaligned-for-restore": [*reference, "--unaligned-run", store["sft"]],
        "gamma": [*reference, "--method", "resta", "--gamma", "0"],
        "dare-rate": [*reference, "--method", "resta", "--dare-rate", "1"],
        "dare-for-restore": [*reference, "--dare-rate", "0.3"],
        "safe-lora-tau": [*reference, "--method", "safe_lora", "--safe-lora-tau", "2"],
        "safe-lora-layers": [*reference, "--method", "safe_lora", "--safe-lora-layers", "-1"],
        "safe-lora-full": [*reference, "--method", "safe_lora", "--mode", "full"],
        "resta-lora": [*reference, "--method", "resta", "--mode", "lora"],
        "safemerge-no-safety": [*reference, "--method", "safemerge"],
        "safety-for-restore": [*reference, "--safety-run", store["dpo"]],
        "safemerge-tau": [*reference, "--method", "safemerge", "--safety-run", store["dpo"], "--safemerge-tau", "1.5"],
        "safemerge-weights": [*reference, "--method", "safemerge", "--safety-run", store["dpo"],
                              "--safemerge-weights", "0,0"],
        # the new-LoRA attack sits on sft+dpo, the DPO adapter on sft
        "safemerge-other-base": [*reference, "--method", "safemerge", "--safety-run", store["dpo"]],
        "safemerge-full": [*reference, "--method", "safemerge", "--safety-run", store["dpo"], "--mode", "full"],
    }[case]
    extra = extra() if callable(extra) else extra
    before = set(_fuse_runs())
    result = CliRunner().invoke(main, ["fuse", *args, *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    new = [r for k, r in _fuse_runs().items() if k not in before]
    assert len(new) == 1 and new[0].info.status == "FAILED" and not new[0].data.metrics
    assert tracking.TAG_COMPLETE not in new[0].data.tags
