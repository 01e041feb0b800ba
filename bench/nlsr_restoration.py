"""Does restoration bring safety back on SmolLM2? NLSR's faithful chain against realign's merged-weight default.

For three attack seeds at p = 0.1 and 0.2 (SST2, n = 100), on one SFT → DPO chain:
- faithful: the attack continues the DPO adapter; EXPO in the seed's form; the region on the EXPO adapter's LoRA
  matrices (lora_actsvd, 0.8 / 20 %, self-calibrated); NLSR's adaptive restore in LoRA coordinates (prune rate
  0.5, ε 0.2, the code's ranking: prefer similar);
- default: the attack trains a new LoRA on the DPO model; EXPO in the paper's form; a Wanda region of 1 % of the
  EXPO model's merged weights; the whole region restored (conf/experiments/default.yaml).
Prints one `name: value` line per measurement and a markdown table: attacked vs restored harmful score (classifier
judge, the default held-out prompts), the paired difference with its 95 % interval and McNemar's p, refusal rate
and fine-tune accuracy, and how much of the attack's update ‖ΔW_attack‖² the restored region covers.

    .venv/bin/python bench/nlsr_restoration.py --workdir /tmp/nlsr-bench     # hours on 2 CPU cores; resumable

Cost, measured on 2 CPU cores (2026-12-02, partly shared with other jobs): SFT 848 s, DPO 820 s, each EXPO ~135 s, the
LoRA region (self-calibrated) 816 s, the Wanda region 436 s, one attack with its evaluation > 1450 s; with 12 attacks
and 12 evaluated restorations the whole bench needs roughly 6-8 h there (a GPU: minutes). It is resumable: run it
again with the same --workdir and every finished cell is reused, as long as realign's code and conf/ are
unchanged (the pipeline reuses only runs of the same `realign.code_version`; after any change it retrains).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEEDS = (0, 1, 2)
RATIOS = (0.1, 0.2)


def experiment() -> dict:
    points = {"seed": list(SEEDS), "ratio": list(RATIOS)}
    attack = {"stage": "attack", "source_run": "${dpo}", "task": "sst2", "size": 100}
    return {
        "experiment": "nlsr-restoration",
        "model": "smollm2-135m",
        "steps": {
            "sft": {"stage": "align", "method": "sft"},
            "dpo": {"stage": "align", "method": "dpo", "sft_run": "${sft}"},
            "expo_seed": {"stage": "expo", "aligned_run": "${dpo}", "sft_run": "${sft}", "alpha": "0.9",
                          "form": "seed"},
            "expo_paper": {"stage": "expo", "aligned_run": "${dpo}", "sft_run": "${sft}", "alpha": "0.9"},
            "region_lora": {"stage": "score", "model_run": "${expo_seed}", "method": "lora_actsvd", "target": "lora",
                            "sparsity": 0.2, "lora_rank_fraction": 0.8, "data.safety_source": "self"},
            "region_wanda": {"stage": "score", "model_run": "${expo_paper}", "method": "wanda", "sparsity": 0.01},
            "attack_continue": {**attack, "adapter": "continue", "grid": points},
            "attack_new": {**attack, "adapter": "new", "grid": points},
            "restore_faithful": {"stage": "fuse", "finetuned_run": "${attack_continue}", "reference_run": "${expo_seed}",
                                 "mask_run": "${region_lora}", "method": "restore", "selection": "adaptive",
                                 "prefer": "similar", "each": points},
            "restore_default": {"stage": "fuse", "finetuned_run": "${attack_new}", "reference_run": "${expo_paper}",
                                "mask_run": "${region_wanda}", "method": "restore", "each": points},
        },
    }


def region_coverage(attack_id: str, fuse_id: str) -> float:
    """Share of ‖ΔW_attack‖² (the attack's own update, in the coordinates the restore works in) that lies in the
    entries the restore changed."""
    import json

    import mlflow
    from safetensors.torch import load_file

    folder = Path(tempfile.mkdtemp())
    attacked = load_file(mlflow.artifacts.download_artifacts(run_id=attack_id,
                                                             artifact_path="adapter/adapter_model.safetensors",
                                                             dst_path=str(folder / "a")))
    tags = mlflow.get_run(fuse_id).data.tags
    if tags.get("realign.output") != "adapter":
        return float("nan")  # a merged-weight fusion: its changed_fraction metric says how much it changed
    fused = load_file(mlflow.artifacts.download_artifacts(run_id=fuse_id, artifact_path="adapter/adapter_model.safetensors",
                                                          dst_path=str(folder / "f")))
    config = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=attack_id, artifact_path="adapter/adapter_config.json",
                                                                 dst_path=str(folder / "c"))).read_text())
    scale = config["lora_alpha"] / config["r"]
    total = changed = 0.0
    for name, a in attacked.items():
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        before = scale * attacked[b_name].float() @ a.float()
        after = scale * fused[b_name].float() @ fused[name].float()
        total += float(before.pow(2).sum())
        changed += float((before - after).pow(2).sum())
    return changed / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nlsr-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    spec = workdir / "nlsr-restoration.yaml"
    spec.write_text(yaml.safe_dump(experiment(), sort_keys=False))

    import mlflow

    from realign import dashboards, tracking
    from realign.stages.compare import paired_differences
    from realign.stages.pipeline import run_pipeline

    parent = run_pipeline({"name": str(spec)})
    experiment_id = mlflow.get_run(parent).info.experiment_id
    steps = mlflow.MlflowClient().load_table(experiment_id, "pipeline/steps.json", run_ids=[parent])
    frame, _ = dashboards.label_measures(dashboards.normalize_runs(tracking.search_runs("nlsr-restoration")))
    paired = paired_differences(frame)
    by_run = {row["run_id"]: row for row in paired.to_dict("records") if row["role"] == "finetuned"}
    metrics = {run_id: mlflow.get_run(run_id).data.metrics for run_id in steps["run_id"]}
    print(f"workdir: {workdir}")
    print("| chain | seed | p | attacked harmful | restored harmful | difference [95 % CI] | McNemar p | "
          "refusal attacked → restored | SST2 attacked → restored | ΔW covered |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for chain, fuse_step, attack_step in (("faithful", "restore_faithful", "attack_continue"),
                                          ("default", "restore_default", "attack_new")):
        fuses = steps[steps["step"] == fuse_step]
        attacks = steps[steps["step"] == attack_step]
        for (_, fuse_row), (_, attack_row) in zip(fuses.iterrows(), attacks.iterrows()):
            point = dict(part.split("=") for part in fuse_row["grid"].split(","))
            pair = by_run.get(fuse_row["run_id"])
            a, f = metrics[attack_row["run_id"]], metrics[fuse_row["run_id"]]
            coverage = region_coverage(attack_row["run_id"], fuse_row["run_id"])
            if pair is None:
                print(f"# {chain} seed {point['seed']} p {point['ratio']}: no paired comparison", file=sys.stderr)
                continue
            nan = float("nan")
            print(f"| {chain} | {point['seed']} | {point['ratio']} | {pair['input_harmful_score']:.1f} | "
                  f"{pair['harmful_score']:.1f} | {pair['difference']:+.1f} [{pair['difference ci95_low']:+.1f}, "
                  f"{pair['difference ci95_high']:+.1f}] | {pair['p_value']:.3g} | "
                  f"{a.get('refusal_rate', nan):.1f} → {f.get('refusal_rate', nan):.1f} | "
                  f"{a.get('finetune_accuracy', nan):.1f} → {f.get('finetune_accuracy', nan):.1f} | {coverage:.3f} |")
            print(f"{chain}_seed{point['seed']}_p{point['ratio']}_difference: {pair['difference']:.2f}",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
