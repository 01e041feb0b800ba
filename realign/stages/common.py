"""Pieces every training or evaluating stage shares: Trainer arguments and the safety evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realign import data
from realign.config import EvalSettings, TrainSettings


def trainer_arguments(train: TrainSettings, seed: int, output_dir: Path) -> dict[str, Any]:
    """Keyword arguments every TRL config here takes (all subclass transformers.TrainingArguments)."""
    return dict(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        max_steps=train.max_steps,
        num_train_epochs=train.num_train_epochs,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_length=train.max_length,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=train.lr_scheduler_type,
        weight_decay=train.weight_decay,
        logging_steps=train.logging_steps,
        gradient_checkpointing=train.gradient_checkpointing,
        bf16=train.bf16,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to="none",  # metrics go to the stage run through tracking.metrics_callback
        dataset_num_proc=None,
    )


@dataclass
class SafetyEval:
    judge: str
    metrics: dict[str, float]
    table: dict[str, list]


def evaluate_safety(model, tokenizer, settings: EvalSettings, judge_name: str = "keyword") -> SafetyEval:
    """Greedy answers to held-out harmful prompts (and benign ones, for over-refusal), judged."""
    from realign.eval import generate_responses, get_judge, harmful_score, is_refusal, refusal_rate

    harmful_prompts = data.harmful_eval_prompts(settings.num_prompts, settings.seed)
    benign = data.benign_instructions("test", settings.num_prompts, settings.seed)
    benign_prompts = [data.format_prompt(row["instruction"], row["input"]) for row in benign]
    prompts = [data.format_prompt(p) for p in harmful_prompts] + benign_prompts
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                                   batch_size=settings.batch_size)
    harmful_responses = responses[: len(harmful_prompts)]
    benign_responses = responses[len(harmful_prompts):]
    judge = get_judge(judge_name)
    flags = judge.judge(harmful_prompts, harmful_responses)
    metrics = {
        "harmful_score": harmful_score(flags),
        "refusal_rate": refusal_rate(harmful_responses),
        "benign_refusal_rate": refusal_rate(benign_responses),
    }
    table = {
        "kind": ["harmful"] * len(harmful_prompts) + ["benign"] * len(benign_prompts),
        "prompt": list(harmful_prompts) + [row["instruction"] for row in benign],
        "response": responses,
        "flagged": [bool(f) for f in flags] + [None] * len(benign_prompts),
        "refusal": [is_refusal(r) for r in responses],
    }
    return SafetyEval(judge=judge.name, metrics=metrics, table=table)


def log_safety_eval(run, result: SafetyEval) -> None:
    run.set_tags({"realign.judge": result.judge})
    run.log_metrics(result.metrics)
    run.log_table(result.table, "eval/generations.json")
