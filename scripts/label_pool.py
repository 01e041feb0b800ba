"""Answers to hand-label: SmolLM2 models from every point of the chain, on held-out harmful prompts.

    .venv/bin/python scripts/label_pool.py --out label-pool           # ~1.5 h on 2 CPU cores; resumable

1. Builds the chain once in `<out>/mlflow.db` (experiment `label-pool`; a second call reuses every finished run
   of the same name and inputs, whatever code version made it): the base
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OFF = {"eval.enabled": "false", "experiment": "label-pool"}
KINDS = {"align": "aligned", "attack": "attacked", "expo": "expo", "fuse": "fused"}


def _find(stage: str, name: str, params: dict[str, str]) -> str | None:
    """A finished, complete run of the pool with this name and these params (whatever code made it: a pool built
    over several sessions keeps its models)."""
    import mlflow

    experiment = mlflow.get_experiment_by_name("label-pool")
    if experiment is None:
        return None
    query = (f"tags.`realign.stage` = '{stage}' and tags.`mlflow.runName` = '{name}' and "
             "tags.`realign.complete` = 'true' and attributes.status = 'FINISHED'")
    for run in mlflow.MlflowClient().search_runs([experiment.experiment_id], query):
        if all(run.data.params.get(k) == v for k, v in params.items()):
            return run.info.run_id
    return None


def _made(stage: str, name: str, params: dict[str, str], make) -> str:
    found = _find(stage, name, params)
    if found:
        print(f"reusing {name} {found}", file=sys.stderr, flush=True)
        return found
    return make()


def chain_runs(out: Path) -> list[tuple[str, str, str]]:
    """(model name, stage, run id) of every model of the chain, building what the pool does not have yet."""
    from realign.stages.align import run_align
    from realign.stages.attack import run_attack
    from realign.stages.expo import run_expo
    from realign.stages.fuse import run_fuse
    from realign.stages.score import run_score

    found: list[tuple[str, str, str]] = []
    sft = _made("align", "align/sft", {}, lambda: run_align({**OFF, "method": "sft"}))
    found.append(("sft", "align", sft))
    aligned = {}
    for method in ("dpo", "kto", "orpo", "simpo"):
        aligned[method] = _made("align", f"align/{method}", {"sft_run": sft},
                                lambda m=method: run_align({**OFF, "method": m, "sft_run": sft}))
        found.append((method, "align", aligned[method]))
    attacks = {}
    for ratio, rate in ((0.0, "0.0002"), (0.05, "0.0002"), (0.1, "0.0002"), (0.2, "0.0002"),
                        (0.1, "0.0001"), (0.2, "0.0001")):
        overrides = {**OFF, "source_run": aligned["dpo"], "task": "sst2", "size": "100", "ratio": str(ratio),
                     "train.learning_rate": rate}
        run_id = _made("attack", f"attack/dpo/sst2/p{ratio:g}/n100",
                       {"ratio": str(ratio), "train.learning_rate": rate, "source_run": aligned["dpo"]},
                       lambda o=overrides: run_attack(o))
        attacks[(ratio, rate)] = run_id
        found.append((f"attack-p{ratio:g}-lr{float(rate):.0e}".replace("e-0", "e-"), "attack", run_id))
    expo = _made("expo", "expo/dpo/a0.9", {"aligned_run": aligned["dpo"]},
                 lambda: run_expo({**OFF, "aligned_run": aligned["dpo"], "sft_run": sft, "alpha": "0.9"}))
    found.append(("expo-a0.9", "expo", expo))
    score = _made("score", "score/wanda", {"model_run": expo},
                  lambda: run_score({**OFF, "model_run": expo, "method": "wanda"}))
    attacked = attacks[(0.2, "0.0002")]
    for method, mask in (("restore", score), ("ties", ""), ("task_arithmetic", "")):
        params = {"finetuned_run": attacked, "method": method, "mask_run": mask}
        name = f"fuse/{method}/{'neurons' if mask else 'full'}"
        overrides = {**OFF, "finetuned_run": attacked, "reference_run": expo, "method": method,
                     **({"mask_run": mask} if mask else {})}
        found.append((method, "fuse", _made("fuse", name, params, lambda o=overrides: run_fuse(o))))
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
