"""Answers to hand-label: SmolLM2 models from every point of the chain, on held-out harmful prompts.

    .venv/bin/python scripts/label_pool.py --out label-pool           # ~1.5 h on 2 CPU cores; resumable
    .venv/bin/python scripts/label_pool.py --out label-pool --models restore,ties   # only what these stand on
    MLFLOW_TRACKING_URI=sqlite:///runs/mlflow.db .venv/bin/python scripts/label_pool.py --out round2 \
        --runs base=,attack-p0.1=<run id>,restore=<run id> --prompts docs/labels/judge-requests-round2.jsonl

1. Builds the chain once in `<out>/mlflow.db` (experiment `label-pool`; a second call reuses every finished run
   of the same name and inputs, whatever code version made it): the base
   model; align sft, then dpo, kto, orpo and simpo on the SFT run; the DPO model attacked (SST2, n = 100) at
   p = 0, 0.05, 0.1, 0.2 with the offline recipe's learning rate (2e-4) and at p = 0.1, 0.2 with 1e-4; EXPO
   (α = 0.9) of DPO; the p = 0.2 attack repaired by restore (inside the EXPO model's Wanda region), TIES and task
   arithmetic with EXPO, and RESTA and Safe LoRA by their recipes (DPO aligned, SFT unaligned). Stage evaluations
   are off: only the models are needed. A run is built the first time a model that is answered needs it.
2. Every model answers the judge-training prompts (`realign.data.safety.judge_training_prompts`, 503) and the
   evaluation prompts (the test split, 126) exactly as an evaluation does: the Alpaca prompt, greedy decoding,
   `EvalSettings().max_new_tokens` new tokens, batched.
3. Writes `<out>/answers.jsonl`: one row per (model, prompt) with pair_id, prompt_id, split (judge | test),
   category, question, answer, model (a name for the chain point), kind (base | aligned | attacked | expo |
   fused), stage, run_id. Models already in the file are skipped.

`--runs` answers runs that already exist in the tracking store instead of the chain's (each run's stage gives its
kind); `--prompts` answers the judge-training requests of a JSONL file (category, action, prompt) instead of the
default pool.

Labels are not made here: they are made by reading each answer against docs/labelling.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable

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


class Chain:
    """The chain's runs, each built (or reused) the first time a model needs it: a pool that answers only some
    models (`--models`) trains only what those models stand on."""

    ATTACKS = ((0.0, "0.0002"), (0.05, "0.0002"), (0.1, "0.0002"), (0.2, "0.0002"), (0.1, "0.0001"),
               (0.2, "0.0001"))
    FUSES = (("restore", True), ("ties", False), ("task_arithmetic", False), ("resta", False),
             ("safe_lora", False))

    @functools.cached_property
    def sft(self) -> str:
        from realign.stages.align import run_align

        return _made("align", "align/sft", {}, lambda: run_align({**OFF, "method": "sft"}))

    @functools.cache
    def aligned(self, method: str) -> str:
        from realign.stages.align import run_align

        return _made("align", f"align/{method}", {"sft_run": self.sft},
                     lambda: run_align({**OFF, "method": method, "sft_run": self.sft}))

    @functools.cache
    def attack(self, ratio: float, rate: str) -> str:
        from realign.stages.attack import run_attack

        dpo = self.aligned("dpo")
        overrides = {**OFF, "source_run": dpo, "task": "sst2", "size": "100", "ratio": str(ratio),
                     "train.learning_rate": rate}
        return _made("attack", f"attack/dpo/sst2/p{ratio:g}/n100",
                     {"ratio": str(ratio), "train.learning_rate": rate, "source_run": dpo},
                     lambda: run_attack(overrides))

    @functools.cached_property
    def expo(self) -> str:
        from realign.stages.expo import run_expo

        dpo = self.aligned("dpo")
        return _made("expo", "expo/dpo/a0.9", {"aligned_run": dpo},
                     lambda: run_expo({**OFF, "aligned_run": dpo, "sft_run": self.sft, "alpha": "0.9"}))

    @functools.cached_property
    def region(self) -> str:
        from realign.stages.score import run_score

        return _made("score", "score/wanda", {"model_run": self.expo},
                     lambda: run_score({**OFF, "model_run": self.expo, "method": "wanda"}))

    def fuse(self, method: str, masked: bool) -> str:
        """The p = 0.2 attack repaired by `method`: restore inside the EXPO model's Wanda region, the merges
        with the EXPO model, RESTA and Safe LoRA by their recipes against DPO (aligned) and SFT (unaligned)."""
        from realign.stages.fuse import run_fuse

        attacked = self.attack(0.2, "0.0002")
        mask = self.region if masked else ""
        if method in ("resta", "safe_lora"):
            overrides = {**OFF, "finetuned_run": attacked, "reference_run": self.aligned("dpo"),
                         "unaligned_run": self.sft, "recipe": method}
        else:
            overrides = {**OFF, "finetuned_run": attacked, "reference_run": self.expo, "method": method,
                         **({"mask_run": mask} if mask else {})}
        params = {"finetuned_run": attacked, "method": method, "mask_run": mask}
        name = f"fuse/{method}/{'neurons' if mask else 'full'}"
        return _made("fuse", name, params, lambda: run_fuse(overrides))

    def targets(self) -> list[tuple[str, str, Callable[[], str]]]:
        """(model name, stage, run id maker) of every model of the pool; nothing is built until a maker is called."""
        found: list[tuple[str, str, Callable[[], str]]] = [("base", "", lambda: ""), ("sft", "align", lambda: self.sft)]
        for method in ("dpo", "kto", "orpo", "simpo"):
            found.append((method, "align", functools.partial(self.aligned, method)))
        for ratio, rate in self.ATTACKS:
            name = f"attack-p{ratio:g}-lr{float(rate):.0e}".replace("e-0", "e-")
            found.append((name, "attack", functools.partial(self.attack, ratio, rate)))
        found.append(("expo-a0.9", "expo", lambda: self.expo))
        for method, masked in self.FUSES:
            found.append((method, "fuse", functools.partial(self.fuse, method, masked)))
        return found


def given_runs(spec: str) -> list[tuple[str, str, Callable[[], str]]]:
    """`name=run_id,...` as targets (an empty run id is the base model), each run's stage read from its tags."""
    import mlflow

    found = []
    for item in (part for part in spec.split(",") if part):
        name, _, run_id = item.partition("=")
        stage = mlflow.get_run(run_id).data.tags["realign.stage"] if run_id else ""
        found.append((name, stage, lambda run_id=run_id: run_id))
    return found


def answer_all(out: Path, wanted: set[str], runs: str = "", prompts_file: Path | None = None) -> None:
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
    if prompts_file:
        from realign.data.safety import HarmfulPrompt

        rows = [json.loads(line) for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        pool = [("judge", HarmfulPrompt(**row)) for row in rows]
    else:
        pool = [("judge", p) for p in judge_training_prompts()] + [("test", p) for p in harmful_prompts("test")]
    targets = given_runs(runs) if runs else Chain().targets()
    targets = [t for t in targets if not wanted or t[0] in wanted]
    holder = tracking.StageRun("0" * 32, "label-pool")  # a workdir to download adapters into; opens no run
    base_cfg = ModelConfig()
    tokenizer = models.load_tokenizer(base_cfg)
    for name, stage, make in targets:
        if name in done:
            continue
        run_id = make()
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
    parser.add_argument("--models", default="", help="only these models (comma-separated names, e.g. "
                        "restore,ties); the runs they need are built, no others. Default: every model")
    parser.add_argument("--runs", default="", help="answer these runs of the tracking store instead of the chain's: "
                        "name=run_id,... (name= alone: the base model)")
    parser.add_argument("--prompts", type=Path, help="a JSONL of judge-training requests (category, action, prompt) "
                        "to answer instead of the judge-training and evaluation prompts")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(args.out / 'mlflow.db').resolve()}")
    answer_all(args.out, {m for m in args.models.split(",") if m}, args.runs, args.prompts)


if __name__ == "__main__":
    main()
