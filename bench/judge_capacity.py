"""Would a bigger offline model, or answer-form features, judge the base model's answers? Grouped CV, TRAIN split only.

The default judge (a MiniLM-L6 cross-encoder) reaches out-of-fold specificity 0.96 overall but only 0.69 on the base
model's harmless answers (bench/judge_selection.py). Those answers are mostly off-topic or looping text with a
compliant shape ("To get the most out of your trip, take a bottle of wine…"), which the guide labels harmless. The
only larger model this machine has offline is SmolLM2-135M-Instruct itself. Candidates, on the same folds
(5 by prompt, seed 0) and the same operating points as bench/judge_selection.py:
- `smollm2-<pool>-L<layers>`: frozen SmolLM2-135M-Instruct hidden states after the given layers (of 30), averaged
  over the answer's tokens (`mean`) or taken at the last token (`last`), the question–answer pair in the chat
  template; a class-balanced L2 logistic regression (realign.eval.classifier.fit_logistic_head).
- `… + cross-encoder`: the average of that probability and the cross-encoder's out-of-fold probability.
- `cross-encoder + answer form`: a logistic regression over the cross-encoder's out-of-fold logit and six features
  of the answer's form (log length, distinct word trigrams, repeated sentences, words shared with the question, the
  longest stretch copied from the question, list lines).
Nothing here reads the test split, and nothing here is a default: a candidate would have to beat the cross-encoder
out of fold on the base model's answers before it is measured on the test split.

    .venv/bin/python bench/judge_selection.py --candidates cross-encoder --scores-out oof.json   # ~60 min
    .venv/bin/python bench/judge_capacity.py --cross-encoder-scores oof.json                     # ~6 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from difflib import SequenceMatcher
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYERS = (12, 20, 30)
FEATURE_SETS = {  # name: (pool, layers)
    "smollm2-mean-L12": ("mean", (12,)),
    "smollm2-mean-L20": ("mean", (20,)),
    "smollm2-mean-L30": ("mean", (30,)),
    "smollm2-last-L20": ("last", (20,)),
    "smollm2-last-L30": ("last", (30,)),
    "smollm2-mean-L12,20,30": ("mean", (12, 20, 30)),
}
L2_VALUES = (0.03, 0.003)  # about sklearn's C = 0.01 and 0.1 at this train size
WORD = re.compile(r"[a-z0-9']+")


def smollm2_features(pairs, batch_size: int = 16) -> dict:
    """{"mean": [n, len(LAYERS), 576], "last": …}: frozen SmolLM2 hidden states, bf16, shortest pairs first."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from realign.models import ensure_smollm2_dir, load_tokenizer

    directory = str(ensure_smollm2_dir())
    tokenizer = load_tokenizer(directory)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    prefixes = [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                              add_generation_prompt=True) for p in pairs]
    texts = [prefix + p.answer for prefix, p in zip(prefixes, pairs)]
    prefix_lengths = torch.tensor([len(tokenizer(prefix).input_ids) for prefix in prefixes])
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = {pool: torch.zeros(len(pairs), len(LAYERS), model.config.hidden_size) for pool in ("mean", "last")}
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="SmolLM2 features", unit="batch", disable=None):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True, truncation=True,
                              max_length=384)
            hidden = model.model(**batch, output_hidden_states=True).hidden_states
            mask = batch.attention_mask.bool()
            answer = mask & (torch.arange(mask.shape[1])[None, :] >= prefix_lengths[rows][:, None])
            answer = torch.where(answer.any(1, keepdim=True), answer, mask)  # an empty answer: the whole pair
            last = batch.attention_mask.sum(1) - 1
            for j, layer in enumerate(LAYERS):
                states = hidden[layer].float()
                out["mean"][rows, j] = (states * answer[..., None]).sum(1) / answer.sum(1, keepdim=True)
                out["last"][rows, j] = states[torch.arange(len(rows)), last]
    return out


def answer_form(question: str, answer: str) -> list[float]:
    words = WORD.findall(answer.lower())
    trigrams = [tuple(words[i:i + 3]) for i in range(max(len(words) - 2, 0))]
    sentences = [s.strip() for s in re.split(r"[.!?\n]+", answer.lower()) if s.strip()]
    copied = SequenceMatcher(None, question.lower(), answer.lower()[:2 * len(question)]).find_longest_match().size
    list_lines = sum(bool(re.match(r"\s*(\d+[.)]|[-*•])\s", line)) for line in answer.splitlines())
    return [
        math.log1p(len(words)),
        len(set(trigrams)) / len(trigrams) if trigrams else 1.0,
        1 - len(set(sentences)) / len(sentences) if sentences else 0.0,
        len(set(words) & set(WORD.findall(question.lower()))) / max(len(set(words)), 1),
        copied / max(len(question), 1),
        math.log1p(list_lines),
    ]


def out_of_fold(features, labels, folds, l2: float) -> list[float]:
    import torch

    from realign.eval.classifier import fit_logistic_head

    scores = torch.zeros(len(labels))
    for held_out in folds:
        train = torch.ones(len(labels), dtype=torch.bool)
        train[held_out] = False
        head = fit_logistic_head(features[train], labels[train], l2)
        with torch.no_grad():
            scores[held_out] = torch.sigmoid(head(features[held_out]))
    return scores.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cross-encoder-scores", type=Path,
                        help="bench/judge_selection.py --scores-out JSON; without it only the SmolLM2 rows")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    import torch
    from judge_selection import TARGET_SPECIFICITY, auc, folds_by_group, operating_point_by_kind

    from realign.eval.classifier import CLASSIFIER_SETTINGS, real_pairs
    from realign.eval.validation import split_rows

    torch.set_num_threads(os.cpu_count() or 1)
    pairs = real_pairs("train")
    rows = split_rows("train")
    kinds = [row.kind for row in rows]
    labels = torch.tensor([float(p.harmful) for p in pairs])
    folds = folds_by_group(pairs, args.folds, CLASSIFIER_SETTINGS["seed"])
    candidates: dict[str, list[float]] = {}
    cross_encoder = None
    if args.cross_encoder_scores:
        kept = json.loads(args.cross_encoder_scores.read_text())["cross-encoder"]
        if [k["pair_id"] for k in kept] != [row.pair_id for row in rows]:
            sys.exit(f"{args.cross_encoder_scores}: its pairs are not this train split's; rerun "
                     "bench/judge_selection.py --candidates cross-encoder --scores-out on this checkout")
        cross_encoder = torch.tensor([k["score"] for k in kept])
        candidates["cross-encoder"] = cross_encoder.tolist()

    started = time.perf_counter()
    features = smollm2_features(pairs)
    print(f"smollm2_feature_seconds: {time.perf_counter() - started:.0f}", flush=True)
    for name, (pool, layers) in FEATURE_SETS.items():
        x = torch.cat([features[pool][:, LAYERS.index(layer)] for layer in layers], dim=1)
        for l2 in L2_VALUES:
            scores = out_of_fold(x, labels, folds, l2)
            candidates[f"{name} l2={l2}"] = scores
            if cross_encoder is not None:
                candidates[f"{name} l2={l2} + cross-encoder"] = ((torch.tensor(scores) + cross_encoder) / 2).tolist()
    if cross_encoder is not None:
        logit = torch.logit(cross_encoder.clamp(1e-6, 1 - 1e-6))
        form = torch.tensor([answer_form(p.question, p.answer) for p in pairs])
        candidates["cross-encoder + answer form"] = out_of_fold(torch.cat([logit[:, None], form], 1), labels, folds,
                                                                1e-3)

    truth = [bool(y) for y in labels.tolist()]
    print("\n| candidate | out-of-fold AUC | rule | threshold | recall | specificity | base recall "
          "| base specificity | attacked specificity |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, scores in candidates.items():
        area = auc(scores, truth)
        for rule, min_negatives in (("overall", None), ("in_every_kind", 10)):
            threshold, at = operating_point_by_kind(scores, truth, kinds, TARGET_SPECIFICITY, min_negatives)
            print(f"| {name} | {area:.3f} | {rule} | {threshold:.3f} | {at['all'][0]:.3f} | {at['all'][1]:.3f} "
                  f"| {at['base'][0]:.3f} | {at['base'][1]:.3f} | {at['attacked'][1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
