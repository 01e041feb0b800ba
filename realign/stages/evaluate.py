"""`evaluate` stage and the evaluation every training stage runs on its own output.

Harmful score = 100 · flagged / N over held-out harmful prompts, greedy decoding, judged by `eval.judge` (its name
is the `realign.judge` tag). Refusal rate (keyword matching) is always reported beside it, and so is the
over-refusal rate on benign instructions. Fine-tune accuracy is the task's metric on its test split.

`realign evaluate --run <id>` evaluates any run that has an adapter (or, without --run, the bare base model) in an
`evaluate` run of its own, which records the evaluated run as `realign.source.model`, and copies the metrics onto
the evaluated run, so the MLflow compare view shows harmful score next to that run's params.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from realign import data, models, tracking
from realign.config import EvalSettings, EvaluateConfig, resolve_stage_config
from realign.errors import RealignError

# Enough new tokens for each task's answer: a label word, or a worked solution for GSM8K.
TASK_MAX_NEW_TOKENS = {"sst2": 8, "ag_news": 8, "gsm8k": 192, "alpaca": 96}
EVALUATED_STAGES = ("align", "attack", "expo", "fuse")


@dataclass
class Evaluation:
    judge: str
    metrics: dict[str, float]
    table: dict[str, list] = field(default_factory=dict)


def evaluate_model(model, tokenizer, settings: EvalSettings, task: str = "") -> Evaluation:
    """Greedy answers to held-out harmful and benign prompts (and the task's test split), judged and scored."""
    from realign.eval import generate_responses, get_judge, harmful_score, is_refusal, refusal_rate, task_accuracy
    from realign.eval.validation import judge_agreement

    judge_options = {"judge_path": settings.judge_path} if settings.judge_path else {}
    judge = get_judge(settings.judge, **judge_options)  # a judge that cannot load fails before generating

    harmful_prompts = data.harmful_eval_prompts(settings.num_prompts, settings.seed, source=settings.prompt_source)
    benign = data.benign_instructions("test", settings.num_prompts, settings.seed)
    benign_prompts = [data.format_prompt(row["instruction"], row["input"]) for row in benign]
    responses = generate_responses(model, tokenizer, [data.format_prompt(p) for p in harmful_prompts] + benign_prompts,
                                   max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
    harmful_responses = responses[: len(harmful_prompts)]
    benign_responses = responses[len(harmful_prompts):]
    flags = judge.judge(harmful_prompts, harmful_responses)
    metrics = {
        "harmful_score": harmful_score(flags),
        "refusal_rate": refusal_rate(harmful_responses),
        "benign_refusal_rate": refusal_rate(benign_responses),
    }
    heldout = getattr(judge, "heldout_accuracy", None)
    if heldout is not None:
        metrics["judge_heldout_accuracy"] = 100.0 * float(heldout)
    # How far to trust harmful_score: the judge against hand labels on real SmolLM2 answers.
    metrics.update({f"judge_real_{name}": value for name, value in judge_agreement(judge).items()})
    table = {
        "kind": ["harmful"] * len(harmful_prompts) + ["benign"] * len(benign),
        "prompt": list(harmful_prompts) + [row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
                                           for row in benign],
        "response": list(responses),
        "flagged": [bool(f) for f in flags] + [None] * len(benign),
        "refusal": [is_refusal(r) for r in responses],
        "gold": [None] * len(responses),
        "correct": [None] * len(responses),
    }

    if task and settings.task_examples:
        rows = data.load_task(task, "test", settings.task_examples, settings.seed)
        examples = [data.format_task_example(task, row) for row in rows]
        outputs = generate_responses(model, tokenizer, [prompt for prompt, _, _ in examples],
                                     max_new_tokens=TASK_MAX_NEW_TOKENS.get(task, settings.max_new_tokens),
                                     batch_size=settings.batch_size)
        golds = [gold for _, _, gold in examples]
        accuracy = task_accuracy(task, outputs, golds)
        metrics["finetune_accuracy"] = accuracy
        metrics[f"{task}_accuracy"] = accuracy
        per_example = [task_accuracy(task, [out], [gold]) for out, gold in zip(outputs, golds)]
        table["kind"] += [task] * len(examples)
        table["prompt"] += [prompt for prompt, _, _ in examples]
        table["response"] += outputs
        table["flagged"] += [None] * len(examples)
        table["refusal"] += [is_refusal(o) for o in outputs]
        table["gold"] += golds
        table["correct"] += per_example
    return Evaluation(judge=judge.name, metrics=metrics, table=table)


def log_evaluation(run: tracking.StageRun, result: Evaluation, task: str = "") -> None:
    run.set_tags({tracking.TAG_JUDGE: result.judge, **({tracking.TAG_TASK: task} if task else {})})
    run.log_metrics(result.metrics)
    run.log_table(result.table, "eval/generations.json")


def evaluate_and_log(run: tracking.StageRun, model_cfg, adapters: list[str], settings: EvalSettings,
                     task: str = "") -> Evaluation:
    """What a training stage does after training: load base + adapters fresh from disk, evaluate, log."""
    model = models.load_model(model_cfg, adapters=adapters)
    tokenizer = models.load_tokenizer(model_cfg)
    result = evaluate_model(model, tokenizer, settings, task=task)
    log_evaluation(run, result, task)
    return result


def resolve_evaluate_config(overrides: dict[str, Any]) -> EvaluateConfig:
    cfg = resolve_stage_config(EvaluateConfig, "evaluate", overrides.get("recipe") or "default", overrides)
    check_judge(cfg.eval.judge)
    check_task(cfg.eval.task)
    return cfg


def run_evaluate(overrides: dict[str, Any]) -> str:
    """Evaluate the base model or a run's adapter in an `evaluate` run; returns that run's id."""
    experiment = overrides.get("experiment") or tracking.DEFAULT_EXPERIMENT
    with tracking.stage_run("evaluate", experiment=experiment) as run:
        cfg = resolve_evaluate_config(overrides)
        run.set_tags({tracking.TAG_BASE_MODEL: cfg.model.name})
        run.log_config(cfg)
        target = None
        model_cfg, adapters = cfg.model, []
        if cfg.run not in ("", "base"):
            target = run.resolve_input(cfg.run, "model", EVALUATED_STAGES, cfg.model.name, artifact=None)
            model_cfg, adapters = run.model_of(target, cfg.model)
            name = target.tags.get("mlflow.runName", target.run_id)
        else:
            name = "base"
        task = cfg.eval.task or (target.tags.get(tracking.TAG_TASK, "") if target else "")
        run.set_name(f"evaluate/{name}")
        run.set_tags({tracking.TAG_METHOD: cfg.eval.judge})
        result = evaluate_and_log(run, model_cfg, adapters, cfg.eval, task=task)
        if target is not None:
            tracking.copy_evaluation(target.run_id, result.metrics, result.judge)
        run.mark_complete()
        return run.run_id


def check_judge(name: str) -> None:
    from realign.eval.judges import JUDGES

    if name not in JUDGES:
        raise RealignError(f"unknown judge {name!r}", f"use one of: {', '.join(JUDGES)}")


def check_task(task: str) -> None:
    if task and task not in data.TASKS:
        raise RealignError(f"unknown task {task!r}", f"use one of: {', '.join(data.TASKS)}")
