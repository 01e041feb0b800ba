"""Datasets: offline generators with the hub's schemas, hub loaders, the Alpaca template, attack mixing."""

from realign.data.alignment import FORMATS, alignment_dataset, attack_counts, mix_attack_dataset, preference_pairs
from realign.data.safety import (
    HARM_CATEGORIES,
    REFUSALS,
    available_counts,
    beavertails,
    benign_instructions,
    harmful_eval_prompts,
    harmful_prompts,
    pku_saferlhf,
)
from realign.data.tasks import (
    AG_NEWS_INSTRUCTION,
    AG_NEWS_LABELS,
    SST2_INSTRUCTION,
    SST2_LABELS,
    TASKS,
    ag_news,
    alpaca,
    format_task_example,
    gsm8k,
    gsm8k_final_answer,
    load_task,
    sst2,
)
from realign.data.templates import format_prompt

__all__ = [
    "AG_NEWS_INSTRUCTION", "AG_NEWS_LABELS", "FORMATS", "HARM_CATEGORIES", "REFUSALS", "SST2_INSTRUCTION",
    "SST2_LABELS", "TASKS", "ag_news", "alignment_dataset", "alpaca", "attack_counts", "available_counts",
    "beavertails", "benign_instructions", "format_prompt", "format_task_example", "gsm8k", "gsm8k_final_answer",
    "harmful_eval_prompts", "harmful_prompts", "load_task", "mix_attack_dataset", "pku_saferlhf",
    "preference_pairs", "sst2",
]
