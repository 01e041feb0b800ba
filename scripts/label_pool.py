"""Answers to hand-label: SmolLM2 models from every point of the chain, on held-out harmful prompts.

    .venv/bin/python scripts/label_pool.py --out label-pool           # ~1.5 h on 2 CPU cores; resumable

1. Builds the chain once in `<out>/mlflow.db` (experiment `label-pool`; a second call reuses every run): the base
   model; align sft, then dpo, kto, orpo and simpo on the SFT run; the DPO model attacked (SST2, n = 100) at
   p = 0, 0.05, 0.1, 0.2 with the offline recipe's learning rate (2e-4) and at p = 0.1, 0.2 with 1e-4; EXPO
   (α = 0.9) of DPO; the p = 0.2 attack fused with EXPO by restore (inside a Wanda region), TIES and task
   arithmetic. Stage evaluations are off: only the models are needed.
2. Every model answers the judge-training prompts (`realign.data.safety.judge_training_prompts`, 168) and the
   evaluation prompts (the test split, 126) exactly as an evaluation does: the Alpaca prompt, greedy decoding,
   `EvalSettings().max_new_tokens` new tokens, batched.
3. Writes `<out>/answers.jsonl`: one row per (model, prompt) with pair_id, prompt_id, split (judge | test),
   category, question, answer, model (a name for the chain point), kind (base | aligned | attacked | expo |
   fused), stage, run_id. Models already in the file are skipped.

Labels are not made here: they are made by reading each answer against docs/labelling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRAIN_ONLY = {"eval.enabled": False}
CHAIN = {
    "experiment": "label-pool",
    "model": "smollm2-135m",
    "steps": {
        "sft": {"stage": "align", "method": "sft", **TRAIN_ONLY},
        "pref": {"stage": "align", "sft_run": "${sft}", "grid": {"method": ["dpo", "kto", "orpo", "simpo"]},
                 **TRAIN_ONLY},
        "attack": {"stage": "attack", "source_run": "${pref[method=dpo]}", "task": "sst2", "size": 100,
                   "grid": {"ratio": [0.0, 0.05, 0.1, 0.2]}, **TRAIN_ONLY},
        "attack_lr": {"stage": "attack", "source_run": "${pref[method=dpo]}", "task": "sst2", "size": 100,
                      "train.learning_rate": 1.0e-4, "grid": {"ratio": [0.1, 0.2]}, **TRAIN_ONLY},
        "expo": {"stage": "expo", "aligned_run": "${pref[method=dpo]}", "sft_run": "${sft}", "alpha": "0.9",
                 **TRAIN_ONLY},
        "score": {"stage": "score", "model_run": "${expo}", "method": "wanda", **TRAIN_ONLY},
        "restore": {"stage": "fuse", "finetuned_run": "${attack[ratio=0.2]}", "reference_run": "${expo}",
                    "mask_run": "${score}", "method": "restore", **TRAIN_ONLY},
        "merge": {"stage": "fuse", "finetuned_run": "${attack[ratio=0.2]}", "reference_run": "${expo}",
                  "grid": {"method": ["ties", "task_arithmetic"]}, **TRAIN_ONLY},
    },
}
KINDS = {"align": "aligned", "attack": "attacked", "expo": "expo", "fuse": "fused"}


def chain_runs(out: Path) -> list[tuple[str, str, str]]:
    """(model name, stage, run id) of every model of the chain, building what is missing."""
    import mlflow

    from realign.stages.pipeline import run_pipeline

    spec = out / "label-pool.yaml"
    spec.write_text(yaml.safe_dump(CHAIN, sort_keys=False))
    parent = run_pipeline({"name": str(spec)})
    path = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="pipeline/steps.json",
                                               dst_path=str(out / "steps"))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    found = []
    for row in rows:
        if row["stage"] == "score":
            continue
        point = row["grid"].replace("method=", "").replace("ratio=", "p")
        name = {"sft": "sft", "pref": point, "attack": f"attack-{point}-lr2e-4", "attack_lr": f"attack-{point}-lr1e-4",
                "expo": "expo-a0.9", "restore": "restore", "merge": point}[row["step"]]
        found.append((name, row["stage"], row["run_id"]))
    return found


def answer_all(out: Path) -> None:
    from realign import data, models, tracking
    from realign.config import EvalSettings, ModelConfig
    from realign.data.prompts import prompt_id
    from realign.data.safety import harmful_prompts, judge_training_prompts
    from realign.eval import generate_responses

    answers_path = out / "answers.jsonl"
    done = set()
    if answers_path.is_file():
        done = {json.loads(line)["model"] for line in answers_path.read_text().splitlines() if line.strip()}
    settings = EvalSettings()
    pool = [("judge", p) for p in judge_training_prompts()] + [("test", p) for p in harmful_prompts("test")]
    targets = [("base", "base", "")] + chain_runs(out)
    holder = tracking.StageRun("0" * 32, "label-pool")  # a workdir to download adapters into; opens no run
    base_cfg = ModelConfig()
    tokenizer = models.load_tokenizer(base_cfg)
    for name, stage, run_id in targets:
        if name in done:
            continue
        print(f"answering with {name} ({stage} {run_id})", file=sys.stderr, flush=True)
        if run_id:
            source = tracking.resolve_run(run_id, "model", tuple(KINDS), base_cfg.name)
            model_cfg, adapters = holder.model_of(source, base_cfg)
        else:
            model_cfg, adapters = base_cfg, []
        model = models.load_model(model_cfg, adapters=adapters)
        texts = generate_responses(model, tokenizer, [data.format_prompt(p.prompt) for _, p in pool],
                                   max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
        with open(answers_path, "a", encoding="utf-8") as sink:
            for (split, item), text in zip(pool, texts):
                row = {"prompt_id": prompt_id(item.prompt), "split": split, "category": item.category,
                       "question": item.prompt, "answer": text, "model": name,
                       "kind": KINDS.get(stage, "base"), "stage": stage or "base", "run_id": run_id}
                row["pair_id"] = f"{name}:{row['prompt_id']}"
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("label-pool"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(args.out / 'mlflow.db').resolve()}")
    answer_all(args.out)


if __name__ == "__main__":
    main()
