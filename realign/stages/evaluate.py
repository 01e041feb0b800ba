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
from realign.config import EvalSettings, resolve_stage_config
from realign.stage_configs import EvaluateConfig
from realign.stages.base import Input, Stage, register, run_stage

# Enough new tokens for each task's answer: a label word, or a worked solution for GSM8K.
TASK_MAX_NEW_TOKENS = {"sst2": 8, "ag_news": 8, "gsm8k": 192, "alpaca": 96}
EVALUATED_STAGES = ("align", "attack", "expo", "fuse")
RATE_TASKS = ("sst2", "ag_news", "gsm8k")  # per-example correct/incorrect; alpaca is scored by ROUGE-L


@dataclass
class Evaluation:
    judge: str
    metrics: dict[str, float]
    table: dict[str, list] = field(default_factory=dict)
    # What makes two harmful scores comparable (realign.judge*, realign.prompts*, realign.decoding tags).
    identity: dict[str, str] = field(default_factory=dict)
    prompt_file: str = ""  # the file the harmful prompts came from, logged as a run input dataset


@dataclass(frozen=True)
class PromptSet:
    name: str  # builtin:test, hub:<id> or file:<path>[#column]
    prompts: list[str]
    path: str = ""  # the file, when they came from one


def harmful_prompt_set(settings: EvalSettings) -> PromptSet:
    """The held-out harmful prompts an evaluation answers: a seeded sample of `num_prompts` from the builtin
    test split, a hub dataset's test split, or a prompt file (`eval.prompts`); with `prompt_split` search or
    report, the half of them that split holds (`split_prompts`)."""
    chosen = _chosen_prompts(settings)
    if settings.prompt_split == "all":
        return chosen
    return PromptSet(f"{chosen.name}:{settings.prompt_split}", split_prompts(chosen.prompts, settings.prompt_split),
                     path=chosen.path)


def split_prompts(prompts: list[str], split: str) -> list[str]:
    """The prompts of one half: `search` those whose prompt id ends in an even hex digit, `report` the others.
    A prompt's half depends on its text alone, so it never moves between halves as the set grows."""
    from realign.data.prompts import prompt_id

    wanted = 0 if split == "search" else 1
    return [p for p in prompts if int(prompt_id(p)[-1], 16) % 2 == wanted]


def _chosen_prompts(settings: EvalSettings) -> PromptSet:
    import random

    from realign.data.prompts import read_prompt_file
    from realign.data.sampling import sample

    if settings.prompts:
        prompts, column = read_prompt_file(settings.prompts, settings.prompts_column)
        chosen = sample(prompts, settings.num_prompts, random.Random(settings.seed), f"prompts of {settings.prompts}")
        suffix = f"#{column}" if column else ""
        return PromptSet(f"file:{settings.prompts}{suffix}", list(chosen), path=settings.prompts)
    prompts = data.harmful_eval_prompts(settings.num_prompts, settings.seed, source=settings.prompt_source)
    name = "builtin:test" if settings.prompt_source == "builtin" else f"hub:{settings.prompt_source}"
    return PromptSet(name, prompts)


def decoding_label(settings: EvalSettings) -> str:
    precision = ",bf16-autocast" if settings.bf16 else ""  # fp32 (or the weights' own dtype) has no suffix
    return f"greedy,max_new_tokens={settings.max_new_tokens}{precision}"


def generation_precision(model, settings: EvalSettings):
    """The context generation runs in: bf16 autocast with `eval.bf16`, else the weights' own dtype."""
    import contextlib

    import torch

    if not settings.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)


def evaluate_model(model, tokenizer, settings: EvalSettings, task: str = "") -> Evaluation:
    """Greedy answers to held-out harmful and benign prompts (and the task's test split), judged and scored.

    Every rate comes with its Wilson interval and count (`<metric>_ci95_low`, `_ci95_high`, `_n`), every table
    row with the `prompt_id` of its prompt, so two runs compare prompt by prompt.
    """
    from realign.data.prompts import prompt_set_digest
    from realign.eval import get_judge
    from realign.eval.validation import judge_agreement

    judge_options = {"judge_path": settings.judge_path} if settings.judge_path else {}
    judge = get_judge(settings.judge, **judge_options)  # a judge that cannot load fails before generating
    prompt_set = harmful_prompt_set(settings)
    metrics, table = _safety_part(model, tokenizer, settings, judge, prompt_set.prompts)
    # How far to trust harmful_score: the judge against hand labels on real SmolLM2 answers.
    metrics.update(judge_agreement(judge))
    if task and settings.task_examples:
        task_metrics, task_rows = _task_part(model, tokenizer, settings, task)
        metrics.update(task_metrics)
        for column, values in task_rows.items():
            table[column] += values
    identity = {
        tracking.TAG_JUDGE: judge.name,
        tracking.TAG_JUDGE_HASH: judge.content_hash(),
        tracking.TAG_JUDGE_THRESHOLD: "" if judge.threshold is None else f"{judge.threshold:g}",
        tracking.TAG_PROMPTS: prompt_set.name,
        tracking.TAG_PROMPTS_DIGEST: prompt_set_digest(prompt_set.prompts),
        tracking.TAG_DECODING: decoding_label(settings),
    }
    return Evaluation(judge=judge.name, metrics=metrics, table=table, identity=identity,
                      prompt_file=prompt_set.path)


def _safety_part(model, tokenizer, settings: EvalSettings, judge, harmful_prompts: list[str]):
    """(metrics, table) of the harmful prompts (judged, refusals) and the benign ones (over-refusal)."""
    from realign.data.prompts import prompt_id
    from realign.eval import generate_responses, is_refusal
    from realign.stats import rate_metrics

    benign = data.benign_instructions("test", settings.benign_prompts, settings.seed) if settings.benign_prompts else []
    benign_prompts = [data.format_prompt(row["instruction"], row["input"]) for row in benign]
    with generation_precision(model, settings):
        responses = generate_responses(model, tokenizer,
                                       [data.format_prompt(p) for p in harmful_prompts] + benign_prompts,
                                       max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
    flags = [bool(flag) for flag in judge.judge(harmful_prompts, responses[: len(harmful_prompts)])]
    refusals = [is_refusal(r) for r in responses]
    metrics = {**rate_metrics("harmful_score", flags), **rate_metrics("refusal_rate", refusals[: len(harmful_prompts)])}
    if benign:
        metrics.update(rate_metrics("benign_refusal_rate", refusals[len(harmful_prompts):]))
    benign_texts = [row["instruction"] + (f"\n{row['input']}" if row["input"] else "") for row in benign]
    table = {
        "kind": ["harmful"] * len(harmful_prompts) + ["benign"] * len(benign),
        "prompt_id": [prompt_id(p) for p in harmful_prompts] + [prompt_id(p) for p in benign_texts],
        "prompt": list(harmful_prompts) + benign_texts,
        "response": list(responses),
        "flagged": flags + [None] * len(benign),
        "refusal": refusals,
        "gold": [None] * len(responses),
        "correct": [None] * len(responses),
    }
    return metrics, table


def _task_part(model, tokenizer, settings: EvalSettings, task: str):
    """(metrics, table columns) of the task's test examples: finetune_accuracy and <task>_accuracy."""
    from realign.data.prompts import prompt_id
    from realign.eval import generate_responses, is_refusal, task_accuracy
    from realign.stats import mean_metrics, rate_metrics

    rows = data.load_task(task, "test", settings.task_examples, settings.seed)
    examples = [data.format_task_example(task, row) for row in rows]
    with generation_precision(model, settings):
        outputs = generate_responses(model, tokenizer, [prompt for prompt, _, _ in examples],
                                     max_new_tokens=TASK_MAX_NEW_TOKENS.get(task, settings.max_new_tokens),
                                     batch_size=settings.batch_size)
    golds = [gold for _, _, gold in examples]
    per_example = [task_accuracy(task, [out], [gold]) / 100.0 for out, gold in zip(outputs, golds)]
    metrics: dict[str, float] = {}
    for name in ("finetune_accuracy", f"{task}_accuracy"):
        # A rate (label word, final answer) gets a Wilson interval; alpaca's ROUGE-L is a mean score.
        metrics.update(rate_metrics(name, [score == 1.0 for score in per_example]) if task in RATE_TASKS
                       else mean_metrics(name, per_example))
    columns = {"kind": [task] * len(examples), "prompt_id": [prompt_id(prompt) for prompt, _, _ in examples],
               "prompt": [prompt for prompt, _, _ in examples], "response": outputs,
               "flagged": [None] * len(examples), "refusal": [is_refusal(o) for o in outputs], "gold": golds,
               "correct": per_example}
    return metrics, columns


def log_evaluation(run: tracking.StageRun, result: Evaluation, task: str = "") -> None:
    run.set_tags({**result.identity, **({tracking.TAG_TASK: task} if task else {})})
    run.log_metrics(result.metrics)
    run.log_table(result.table, "eval/generations.json")
    # Every prompt set the evaluation read, as a run input: the harmful prompts (from their file, or the built-in
    # held-out pool), the benign instructions, the task's test examples.
    kinds = result.table["kind"]
    for kind in dict.fromkeys(kinds):
        prompts = [prompt for k, prompt in zip(kinds, result.table["prompt"]) if k == kind]
        if kind == "harmful":
            run.log_prompt_set(prompts, result.identity[tracking.TAG_PROMPTS], path=result.prompt_file,
                               origin="realign.data.harmful_eval_prompts")
        elif kind == "benign":
            run.log_prompt_set(prompts, "builtin:benign-test", origin="realign.data.benign_instructions")
        else:
            run.log_prompt_set(prompts, f"{kind}-test", origin="realign.data.load_task")


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
    return cfg


def evaluate_body(run: tracking.StageRun, cfg: EvaluateConfig) -> None:
    """Evaluate the base model or a run's model; copy the numbers onto the evaluated run (unless copy_to_run is
    false)."""
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
    if target is not None and cfg.copy_to_run:
        tracking.copy_evaluation(target.run_id, result.metrics, result.identity)


EVALUATE = register(Stage(
    "evaluate", EvaluateConfig, resolve_evaluate_config, evaluate_body,
    inputs=(Input("run", "model", EVALUATED_STAGES, absent=("", "base")),),
    summary="Harmful score (judged), refusal rate and fine-tune accuracy of a run's model, or of the base.",
    shortcuts={"judge": "eval.judge", "judge_path": "eval.judge_path", "task": "eval.task"},
))


def run_evaluate(overrides: dict[str, Any]) -> str:
    """Evaluate the base model or a run's adapter in an `evaluate` run; returns that run's id."""
    return run_stage(EVALUATE, overrides)


