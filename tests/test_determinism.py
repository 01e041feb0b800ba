"""Same config and seed, same results on CPU: metrics and adapter bytes (tiny model)."""

import hashlib

import mlflow

from realign.stages.align import run_align
from realign.stages.attack import run_attack

# Wall-clock numbers the Trainer logs; everything else must repeat exactly.
TIMING_METRICS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")

ATTACK = {"model": "tiny", "size": "12", "ratio": "0.25", "train.max_steps": "2", "train.max_length": "96",
          "train.learning_rate": "1e-2", "eval.judge": "keyword", "eval.num_prompts": "4",
          "eval.task_examples": "4", "eval.max_new_tokens": "8"}


def _adapter_digest(run_id):
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter/adapter_model.safetensors")
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _metrics(run_id):
    return {k: v for k, v in mlflow.get_run(run_id).data.metrics.items() if k not in TIMING_METRICS}


def test_align_then_attack_twice_gives_identical_bytes_and_metrics(tracking_store, tiny_overrides):
    chains = []
    for _ in range(2):
        aligned = run_align({**tiny_overrides, "method": "dpo"})
        attacked = run_attack({**ATTACK, "source_run": aligned})
        chains.append((aligned, attacked))
    (aligned_a, attacked_a), (aligned_b, attacked_b) = chains
    assert _adapter_digest(aligned_a) == _adapter_digest(aligned_b)
    assert _adapter_digest(attacked_a) == _adapter_digest(attacked_b)
    assert _metrics(aligned_a) == _metrics(aligned_b)
    assert _metrics(attacked_a) == _metrics(attacked_b)
    assert "harmful_score" in _metrics(attacked_a) and "loss" in _metrics(aligned_a)


def test_another_seed_gives_another_adapter(tracking_store, tiny_overrides):
    first = run_align({**tiny_overrides, "method": "dpo"})
    other = run_align({**tiny_overrides, "method": "dpo", "seed": "1"})
    assert _adapter_digest(first) != _adapter_digest(other)
