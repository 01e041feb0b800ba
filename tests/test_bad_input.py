"""The bad-input contract across stages (docs/errors.md): one line naming the problem and the fix, exit 2, the run
FAILED with the error as a tag, and no artifact a later stage could take for a result.

Stage-specific cases live beside their stages (test_fuse, test_score, test_expo, test_attack_evaluate,
test_pipeline, test_tracking); this module holds the ones every stage shares: presets, keys and types, input
runs that are missing, unfinished, of another model or with broken artifacts, NaN training, broken files.
"""

import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from conftest import TINY, module_store
from realign import tracking
from realign.cli import main
from realign.stages.align import run_align

TINY_ARGS = ["--model", "tiny", "--eval.judge", "keyword", "--eval.num_prompts", "4", "--eval.max_new_tokens", "8"]
RESULT_ARTIFACTS = ("adapter", "model", "masks")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One finished tiny align/sft run, and hand-made runs shaped like it that are broken in one way each."""
    with module_store(tmp_path_factory, "bad-input") as (folder, uri):
        sft = run_align({**TINY, "method": "sft", "eval.enabled": "false"})
        adapter = mlflow.artifacts.download_artifacts(run_id=sft, artifact_path="adapter",
                                                      dst_path=str(folder / "sft"))
        corrupt = folder / "corrupt"
        shutil.copytree(adapter, corrupt)
        weights = corrupt / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])  # a download cut short
        client = mlflow.MlflowClient()
        experiment_id = mlflow.get_experiment_by_name("realign").experiment_id

        def hand_made(status="FINISHED", base="tiny", artifacts=None):
            run_id = client.create_run(experiment_id).info.run_id
            tags = {tracking.TAG_STAGE: "align", tracking.TAG_METHOD: "sft", tracking.TAG_BASE_MODEL: base}
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            if artifacts:
                client.log_artifacts(run_id, str(artifacts), "adapter")
            if status == "FINISHED":
                client.set_tag(run_id, tracking.TAG_COMPLETE, "true")
            if status != "RUNNING":
                client.set_terminated(run_id, status)
            return run_id

        yield {
            "uri": uri,
            "sft": sft,
            "running": hand_made("RUNNING", artifacts=adapter),
            "failed": hand_made("FAILED", artifacts=adapter),
            "other-base": hand_made(base="smollm2-135m", artifacts=adapter),
            "no-adapter": hand_made(),
            "corrupt": hand_made(artifacts=corrupt),
        }


def _attack(source_key):
    """An attack whose only fault is its source run (the `chain` key)."""
    return ["attack", *TINY_ARGS, "--size", "8", "--train.max_steps", "1", "--source-run", f"<{source_key}>"]


# (case, command, fragment of the one error line, whether a run is opened before the error)
CASES = [
    ("unknown-method", ["align", "--method", "ppo", *TINY_ARGS], "unknown align method 'ppo'", True),
    ("unknown-recipe", ["align", "--method", "dpo", "--recipe", "nope", *TINY_ARGS], "unknown align preset 'nope'", True),
    ("unknown-model-preset", ["align", "--method", "sft", "--model", "gpt9"], "unknown model preset 'gpt9'", True),
    ("unknown-key", ["align", "--method", "sft", *TINY_ARGS, "--train.learnin_rate", "1e-4"],
     "unknown config key 'train.learnin_rate'", True),
    ("wrong-type", ["align", "--method", "sft", *TINY_ARGS, "--train.max_steps", "many"],
     "train.max_steps='many' is not a valid int", True),
    ("negative-save-steps", ["align", "--method", "sft", *TINY_ARGS, "--train.save_steps", "-1"],
     "train.save_steps must be >= 0", True),
    ("attack-ratio", [*_attack("sft"), "--ratio", "1.5"], "ratio=1.5 is outside [0, 1]", True),
    ("attack-size", [*_attack("sft"), "--size", "0"], "size=0 must be > 0", True),
    ("attack-task", [*_attack("sft"), "--task", "imdb"], "unknown task 'imdb'", True),
    ("unknown-judge", ["evaluate", *TINY_ARGS, "--judge", "gpt4"], "unknown judge 'gpt4'", True),
    ("run-not-an-id", _attack("yesterday"), "aligned run 'yesterday' is not a run id", True),
    ("run-missing", _attack("missing"), "does not exist in", True),
    ("run-running", _attack("running"), "is RUNNING, not FINISHED", True),
    ("run-failed", _attack("failed"), "is FAILED, not FINISHED", True),
    ("run-other-base", _attack("other-base"), "belongs to base model 'smollm2-135m', not 'tiny'", True),
    ("artifact-missing", _attack("no-adapter"), "has no adapter/ artifact", True),
    ("artifact-corrupt", _attack("corrupt"), "artifact adapter/adapter_model.safetensors is corrupt", True),
    ("nan-loss", ["align", "--method", "sft", "--sft-run", "none", *TINY_ARGS, "--data.num_examples", "16",
                  "--train.max_steps", "4", "--train.learning_rate", "1e30", "--train.max_length", "96"],
     "training loss became nan", True),
    ("unreadable-experiment-file", ["pipeline", "--name", "<broken.yaml>"], "is not valid YAML", False),
    ("bad-value-in-a-pipeline-cell", ["pipeline", "--name", "<bad-cell.yaml>"],
     "step attack: ratio=2.0 is outside [0, 1]", True),
]


def _substitute(args, chain, tmp_path):
    out = []
    for arg in args:
        if arg == "<missing>":
            arg = "0" * 32
        elif arg == "<broken.yaml>":
            arg = str(tmp_path / "broken.yaml")
            (tmp_path / "broken.yaml").write_text("steps:\n  sft: {stage: align, method: [sft\n")
        elif arg == "<bad-cell.yaml>":
            arg = str(tmp_path / "bad-cell.yaml")
            steps = {"sft": {"stage": "align", "method": "sft"},
                     "attack": {"stage": "attack", "source_run": "${sft}", "ratio": 2.0}}
            (tmp_path / "bad-cell.yaml").write_text(yaml.safe_dump({"model": "tiny", "steps": steps}, sort_keys=False))
        elif arg.startswith("<") and arg.endswith(">"):
            arg = chain[arg[1:-1]] if arg[1:-1] in chain else arg[1:-1]
        out.append(arg)
    return out


def _run_ids():
    return {r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}


@pytest.mark.parametrize("case, args, fragment, opens_run", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_a_failed_run_with_nothing_logged(store, tmp_path, case, args, fragment,
                                                                           opens_run):
    before = _run_ids()

    result = CliRunner().invoke(main, _substitute(args, store, tmp_path))

    assert result.exit_code == 2, result.output
    # Cases that get as far as training show progress bars first; the error is the one last line, no traceback.
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, lines[-5:]
    assert fragment in errors[0] and " — " in errors[0], "the line names the problem, then the fix"
    lines = errors
    new = [mlflow.get_run(run_id) for run_id in _run_ids() - before]
    if not opens_run:
        assert not new
        return
    assert len(new) == 1, [r.data.tags.get("mlflow.runName") for r in new]
    run = new[0]
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_ERROR] == lines[0][len("error: "):]
    assert tracking.TAG_COMPLETE not in run.data.tags
    client = mlflow.MlflowClient()
    assert not [a for a in RESULT_ARTIFACTS if client.list_artifacts(run.info.run_id, a)]


def test_every_case_is_in_the_error_catalogue():
    catalogue = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    missing = [case for case, *_ in CASES if f"`{case}`" not in catalogue]
    assert not missing, f"docs/errors.md lacks {missing}"


def test_a_one_process_stage_launched_as_several_says_so_before_opening_a_run(store, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    before = _run_ids()

    result = CliRunner().invoke(main, ["score", "--model", "tiny", "--model-run", store["sft"]])

    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: the score stage runs as one process, not 2 — run it without accelerate "
                                     "launch; only align, attack train")
    assert _run_ids() == before
