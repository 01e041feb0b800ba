"""Training sets for the align and attack stages, in TRL's dataset formats.

Alignment data mixes harmful prompts (answered with refusals) and benign instructions (answered helpfully),
because a model trained on refusals alone learns to refuse everything. Attack data mixes unsafe BeaverTails
answers into a downstream task, as in the harmful fine-tuning papers (ratio p of size n).
"""

import math
import random
from dataclasses import dataclass

from datasets import Dataset

from realign.data import hub, safety, tasks
from realign.data.templates import format_prompt
from realign.errors import RealignError

FORMATS = ("prompt_completion", "preference", "unpaired")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str  # already wrapped in the Alpaca template
    chosen: str
    rejected: str
    harmful: bool


def _harmful_pairs(n: int, seed: int, source: str, split: str) -> list[PreferencePair]:
    """Harmful prompt -> chosen refusal, rejected compliance."""
    if n == 0:
        return []
    if source == "builtin":
        rows = safety.pku_saferlhf(split, n, seed)
        return [PreferencePair(format_prompt(row["prompt"]), row[f"response_{row['safer_response_id']}"],
                               row[f"response_{1 - row['safer_response_id']}"], harmful=True) for row in rows]
    hub_id = hub.SAFERLHF_ID if source == "hub" else source
    rows = hub.load_safety_pairs(hub_id, split, n, seed)
    return [PreferencePair(format_prompt(row["prompt"]), row["safe_response"], row["unsafe_response"], harmful=True)
            for row in rows]


def _benign_pairs(n: int, seed: int, split: str) -> list[PreferencePair]:
    """Benign instruction -> chosen helpful answer, rejected unnecessary refusal (penalises over-refusal)."""
    if n == 0:
        return []
    rng = random.Random(seed)
    rows = safety.benign_instructions(split, n, seed)
    return [PreferencePair(format_prompt(row["instruction"], row["input"]), row["output"],
                           rng.choice(safety.REFUSALS), harmful=False) for row in rows]


def preference_pairs(n: int, seed: int, benign_fraction: float = 0.3, source: str = "builtin",
                     split: str = "train") -> list[PreferencePair]:
    """round(n * benign_fraction) benign pairs and the rest harmful, shuffled with the seed."""
    if not 0.0 <= benign_fraction <= 1.0:
        raise RealignError(f"benign_fraction must lie in [0, 1], got {benign_fraction}",
                           "pass a fraction such as 0.3")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise RealignError(f"the alignment dataset size must be a positive integer, got {n!r}", "pass n > 0")
    n_benign = round(n * benign_fraction)
    pairs = _harmful_pairs(n - n_benign, seed, source, split) + _benign_pairs(n_benign, seed, split)
    random.Random(seed).shuffle(pairs)
    return pairs


def alignment_dataset(fmt: str, n: int, seed: int, benign_fraction: float = 0.3, source: str = "builtin",
                      split: str = "train") -> Dataset:
    """An alignment set in one of TRL's formats.

    prompt_completion: prompt, completion (refusal for harmful prompts, helpful answer for benign ones).
    preference: prompt, chosen, rejected.
    unpaired: prompt, completion, label (KTO); each of the n preference pairs gives a desirable and an
    undesirable row (TRL's unpairing), so it has 2n rows.
    """
    if fmt not in FORMATS:
        raise RealignError(f"unknown alignment data format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    pairs = preference_pairs(n, seed, benign_fraction, source, split)
    if fmt == "prompt_completion":
        return Dataset.from_dict({"prompt": [p.prompt for p in pairs], "completion": [p.chosen for p in pairs]})
    if fmt == "preference":
        return Dataset.from_dict({"prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
                                  "rejected": [p.rejected for p in pairs]})
    rows = [(p.prompt, p.chosen, True) for p in pairs] + [(p.prompt, p.rejected, False) for p in pairs]
    random.Random(seed).shuffle(rows)
    return Dataset.from_dict({"prompt": [r[0] for r in rows], "completion": [r[1] for r in rows],
                              "label": [r[2] for r in rows]})


def attack_counts(size: int, ratio: float) -> dict[str, int]:
    """How many harmful and task examples an attack of this size and ratio uses: harmful = floor(ratio * size)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise RealignError(f"attack size must be a positive integer, got {size!r}", "pass size > 0, e.g. 1000")
    if not 0.0 <= ratio <= 1.0:
        raise RealignError(f"harmful ratio must lie in [0, 1], got {ratio}", "pass a ratio such as 0.1")
    # round() first so that float noise (0.29 * 100 = 28.999...) does not lose an example to floor()
    n_harmful = math.floor(round(ratio * size, 9))
    return {"harmful": n_harmful, "task": size - n_harmful, "total": size}


def mix_attack_dataset(task: str, size: int, ratio: float, seed: int, harmful_source: str = "builtin",
                       task_source: str = "builtin") -> tuple[Dataset, dict[str, int]]:
    """Harmful fine-tuning data: floor(ratio * size) unsafe BeaverTails answers plus task examples, shuffled.

    Returns the dataset (prompt, completion) and the counts {"harmful", "task", "total"}.
    """
    tasks.get_task(task)  # fail on an unknown task before generating anything
    counts = attack_counts(size, ratio)
    rows: list[tuple[str, str]] = []
    if counts["harmful"]:
        if harmful_source == "builtin":
            harmful = safety.beavertails("train", counts["harmful"], seed, unsafe_only=True)
        else:
            hub_id = hub.BEAVERTAILS_ID if harmful_source == "hub" else harmful_source
            if hub_id != hub.BEAVERTAILS_ID:
                raise RealignError(f"harmful_source {harmful_source!r} has no unsafe question-answer rows",
                                   f"use 'builtin', 'hub' or {hub.BEAVERTAILS_ID!r}")
            harmful = hub.load_hub_dataset(hub_id, "train", counts["harmful"], seed, unsafe_only=True)
        rows += [(format_prompt(row["prompt"]), row["response"]) for row in harmful]
    if counts["task"]:
        for row in tasks.load_task(task, "train", counts["task"], seed, source=task_source):
            prompt, completion, _gold = tasks.format_task_example(task, row)
            rows.append((prompt, completion))
    random.Random(seed).shuffle(rows)
    return Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]}), counts
