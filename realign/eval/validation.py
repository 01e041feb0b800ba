"""How well a judge agrees with hand labels on real model answers.

``labelled_answers.jsonl`` holds answers that SmolLM2-135M-Instruct models from every point of realign's chain
actually wrote (base; SFT, DPO, KTO, ORPO, SimPO aligned; attacked; EXPO; fused), each labelled harmful or not by
reading it against docs/labelling.md (the `labeller` field says who read it). Every row keeps its model, kind,
stage, run and prompt id. Rows are split by prompt:

- ``train``: answers to the judge-training prompts (realign/data/builtin/judge_requests.jsonl), which no
  evaluation uses. The offline judge learns from these only.
- ``test``: answers to the evaluation prompts (the held-out harmful prompts harmful_score is measured on). They
  measure a judge: `judge_agreement` logs recall and specificity on them, with Wilson intervals, next to every
  harmful score. Nothing is tuned on them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

LABELLED_ANSWERS = Path(__file__).with_name("labelled_answers.jsonl")
SPLITS = ("train", "test")
KINDS = ("base", "aligned", "attacked", "expo", "fused")


@dataclass(frozen=True)
class LabelledAnswer:
    pair_id: str
    prompt_id: str
    split: str  # train | test
    question: str
    answer: str
    harmful: bool
    model: str  # the chain point that wrote it: base, sft, dpo, attack-p0.1-lr2e-4, expo-a0.9, restore, ...
    kind: str  # base | aligned | attacked | expo | fused
    stage: str
    run_id: str
    category: str
    labeller: str
    unsure: bool = False
    second_labeller: str = ""  # who read it again, blind to the first label ("" = read once)
    adjudicated: bool = False  # the two readers differed and the lead decided


@lru_cache(maxsize=1)
def labelled_answers() -> tuple[LabelledAnswer, ...]:
    with open(LABELLED_ANSWERS, encoding="utf-8") as rows:
        return tuple(LabelledAnswer(**json.loads(line)) for line in rows if line.strip())


def split_rows(split: str) -> tuple[LabelledAnswer, ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
    return tuple(row for row in labelled_answers() if row.split == split)


def agreement(flags: list[bool], labels: list[bool]) -> dict[str, float]:
    """Accuracy, recall (harmful answers flagged), specificity (harmless answers not flagged) and their mean
    (balanced accuracy), in percent. Recall matters most for a harmful score: 1 - recall is the share of harmful
    answers it misses."""
    if len(flags) != len(labels) or not labels:
        raise ValueError(f"{len(flags)} verdicts for {len(labels)} labels")
    positives = sum(labels)
    negatives = len(labels) - positives
    caught = sum(flag and label for flag, label in zip(flags, labels))
    cleared = sum(not flag and not label for flag, label in zip(flags, labels))
    recall = 100.0 * caught / positives if positives else float("nan")
    specificity = 100.0 * cleared / negatives if negatives else float("nan")
    return {
        "accuracy": 100.0 * (caught + cleared) / len(labels),
        "recall": recall,
        "specificity": specificity,
        "balanced_accuracy": (recall + specificity) / 2,
    }


def agreement_metrics(prefix: str, flags: list[bool], labels: list[bool]) -> dict[str, float]:
    """`<prefix>_recall` and `<prefix>_specificity` with Wilson intervals and counts, plus accuracy and
    balanced accuracy, in percent."""
    from realign.stats import rate_metrics

    result = {f"{prefix}_{name}": value for name, value in agreement(flags, labels).items()
              if name in ("accuracy", "balanced_accuracy")}
    result.update(rate_metrics(f"{prefix}_recall", [f for f, label in zip(flags, labels) if label]))
    result.update(rate_metrics(f"{prefix}_specificity", [not f for f, label in zip(flags, labels) if not label]))
    return result


def test_split_verdicts(judge) -> list[bool]:
    """The judge's verdicts on the test split, judged once per judge (name, content) and labelled set: cached on
    disk (realign's cache, `judges/verdicts-<key>.json`), so every stage of a pipeline need not judge them again."""
    import hashlib

    from realign.cache import cache_dir

    rows = split_rows("test")
    labelled = hashlib.sha256(LABELLED_ANSWERS.read_bytes()).hexdigest()[:16]
    key = hashlib.sha256(f"{judge.name}:{judge.content_hash()}:{labelled}".encode()).hexdigest()[:16]
    path = cache_dir() / "judges" / f"verdicts-{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if len(cached) == len(rows):
            return [bool(flag) for flag in cached]
    flags = [bool(flag) for flag in judge.judge([row.question for row in rows], [row.answer for row in rows])]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(flags))
    os.replace(temporary, path)  # atomic: a concurrent reader sees the whole list or none
    return flags


def judge_agreement(judge) -> dict[str, float]:
    """The judge against the hand labels of the test split, as `judge_real_*` metrics (recall and specificity
    with their Wilson intervals and counts, accuracy, balanced accuracy)."""
    rows = split_rows("test")
    return agreement_metrics("judge_real", test_split_verdicts(judge), [row.harmful for row in rows])


def agreement_by_kind(judge, split: str = "test") -> dict[str, dict[str, float]]:
    """`agreement_metrics` of the judge on one split, overall (`all`) and within each model kind."""
    rows = split_rows(split)
    flags = [bool(f) for f in judge.judge([row.question for row in rows], [row.answer for row in rows])]
    result = {"all": agreement_metrics("judge", flags, [row.harmful for row in rows])}
    for kind in KINDS:
        picked = [(flag, row.harmful) for flag, row in zip(flags, rows) if row.kind == kind]
        if picked:
            result[kind] = agreement_metrics("judge", [f for f, _ in picked], [label for _, label in picked])
    return result
