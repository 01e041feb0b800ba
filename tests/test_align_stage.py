"""The align stage end to end on the tiny model: all five methods, lineage, and bad inputs."""

import json
import subprocess
import sys

import mlflow
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import assert_adapter_changes_tiny_model
from realign import models, tracking
from realign.cli import main
from realign.config import ModelConfig
from realign.stages.align import ALIGN_METHODS, run_align


def _runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _artifact_paths(run_id, path=""):
    return [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)]


@pytest.mark.parametrize("method", sorted(ALIGN_METHODS))
def test_each_method_trains_a_reloadable_adapter(tracking_store, tiny_overrides, method):
    run_id = run_align({**tiny_overrides, "method": method})

    runs = _runs()
    assert [r.info.run_id for r in runs] == [run_id], "exactly one run per stage"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.runName"] == f"align/{method}"
    assert run.data.tags[tracking.TAG_STAGE] == "align"
    assert run.data.tags[tracking.TAG_METHOD] == method
    assert run.data.tags[tracking.TAG_BASE_MODEL] == "tiny"
    assert run.data.tags[tracking.TAG_COMPLETE] == "true"
    assert run.data.params["method"] == method and run.data.params["train.max_steps"] == "2"
    assert "loss" in run.data.metrics, "trainer loss must land in the stage run"
    assert {"harmful_score", "refusal_rate", "benign_refusal_rate"} <= set(run.data.metrics)
    assert "config.yaml" in _artifact_paths(run_id)
    assert run.inputs.dataset_inputs, "training data logged as a run input"

    adapter = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter")
    weights = load_file(f"{adapter}/adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero; training must move it"
    config = json.load(open(f"{adapter}/adapter_config.json"))
    assert config["r"] == 16 and set(config["target_modules"]) == set(models.DEFAULT_TARGET_MODULES)

    assert_adapter_changes_tiny_model(adapter)


def test_preference_method_starts_from_an_sft_run(tracking_store, tiny_overrides):
    sft_id = run_align({**tiny_overrides, "method": "sft"})
    dpo_id = run_align({**tiny_overrides, "method": "dpo", "sft_run": f"runs:/{sft_id}/adapter"})
    tags = mlflow.get_run(dpo_id).data.tags
    assert tags["realign.source.sft"] == sft_id
    assert tags[tracking.TAG_ADAPTER_BASE] == sft_id

    # The DPO adapter sits on the merged SFT model: base + sft + dpo differs from base + sft.
    sft_dir = mlflow.artifacts.download_artifacts(run_id=sft_id, artifact_path="adapter")
    dpo_dir = mlflow.artifacts.download_artifacts(run_id=dpo_id, artifact_path="adapter")
    tiny = ModelConfig(name="tiny", source="tiny")
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        sft_logits = models.load_model(tiny, adapters=[sft_dir])(ids).logits
        dpo_logits = models.load_model(tiny, adapters=[sft_dir, dpo_dir])(ids).logits
    assert not torch.allclose(sft_logits, dpo_logits)


def _cli(args):
    result = CliRunner().invoke(main, ["align", *args], catch_exceptions=False)
    return result


def _only_failed_run_without_adapter():
    runs = _runs()
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1
    run = failed[0]
    assert run.data.tags[tracking.TAG_ERROR]
    assert tracking.TAG_COMPLETE not in run.data.tags
    assert "adapter" not in _artifact_paths(run.info.run_id)
    return run


TINY_ARGS = ["--model", "tiny", "--train.max_steps", "1", "--data.num_examples", "8", "--eval.enabled", "false"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "rlhf"], "unknown align method 'rlhf'"),
        (["--model", "gpt-9"], "unknown model preset 'gpt-9'"),
        (["--recipe", "nope"], "unknown align preset 'nope'"),
        (["--train.lr", "1"], "unknown config key 'train.lr'"),
        (["--method", "dpo", "--sft-run", "0" * 32], "does not exist"),
        (["--model.source", "local", "--model.path", "/no/such/dir"], "does not exist"),
    ],
)
def test_bad_inputs_fail_in_one_line(tracking_store, args, fragment):
    result = _cli([*TINY_ARGS, *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    _only_failed_run_without_adapter()


def test_sft_run_of_wrong_stage_or_base_is_refused(tracking_store, tiny_overrides):
    kto_id = run_align({**tiny_overrides, "method": "kto", "eval.enabled": "false"})
    result = _cli([*TINY_ARGS, "--method", "dpo", "--sft-run", kto_id])
    assert result.exit_code == 2 and "is align/kto, not align/sft" in result.output

    mlflow.MlflowClient().set_tag(kto_id, tracking.TAG_METHOD, "sft")
    mlflow.MlflowClient().set_tag(kto_id, tracking.TAG_BASE_MODEL, "smollm2-135m")
    result = _cli([*TINY_ARGS, "--method", "dpo", "--sft-run", kto_id])
    assert result.exit_code == 2 and "belongs to base model 'smollm2-135m', not 'tiny'" in result.output


def test_unwritable_store_exits_nonzero_with_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{locked}/x/mlflow.db", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "realign.cli", "align", *TINY_ARGS], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "is not writable" in proc.stderr and "MLFLOW_TRACKING_URI" in proc.stderr


def test_sft_run_auto_trains_sft_first_then_reuses_it(tracking_store, tiny_overrides):
    first_dpo = run_align({**tiny_overrides, "method": "dpo", "sft_run": "auto"})
    runs = {r.info.run_id: r for r in _runs()}
    assert len(runs) == 2
    sft_id = mlflow.get_run(first_dpo).data.tags["realign.source.sft"]
    assert runs[sft_id].data.tags[tracking.TAG_METHOD] == "sft"
    assert runs[sft_id].data.tags["mlflow.runName"] == "align/sft"

    second_dpo = run_align({**tiny_overrides, "method": "kto", "sft_run": "auto"})
    assert len(_runs()) == 3, "the finished SFT run is reused, not retrained"
    assert mlflow.get_run(second_dpo).data.tags["realign.source.sft"] == sft_id


def test_bf16_trains_on_a_cpu_only_machine(tracking_store, tiny_overrides):
    """The Trainer refuses bf16 without a GPU unless told use_cpu ("Your setup doesn't support bf16/gpu")."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: use_cpu is not asked for")
    run_id = run_align({**tiny_overrides, "method": "sft", "train.bf16": "true", "eval.enabled": "false"})
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.bf16"] == "true"
