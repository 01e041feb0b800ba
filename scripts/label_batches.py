"""Pick the answers to hand-label and split them into blind reading batches.

    .venv/bin/python scripts/label_batches.py --answers label-pool/answers.jsonl --out label-pool/batches \\
        --test-per-model 40 --train-per-model 70 --readers 8

From every model of the pool: a uniform random sample of `--test-per-model` of its answers to the evaluation
prompts (so the test split measures a judge on what each model really writes) and `--train-per-model` of its
answers to the judge-training prompts. With `--legacy`, the rows already in realign/eval/labelled_answers.jsonl
with pair ids `legacy-*` are read again under the current guide, in the same batches. `--models` picks some models
(a first round while the pool is still answering); later rounds add batches with `--first-batch` and sample only
answers no earlier round took (more of a model's answers, when its harmful ones are needed). Identical (question, answer) pairs are read
once: the reader's label holds for every copy (`copies.json` maps each read pair to its copies).

Each batch `batch-<k>.jsonl` holds {pair_id, question, answer} only, shuffled: the reader sees neither the model
nor its kind.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LABELLED = Path(__file__).resolve().parents[1] / "realign" / "eval" / "labelled_answers.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test-per-model", type=int, default=40)
    parser.add_argument("--train-per-model", type=int, default=70)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="", help="only these models (comma-separated); default every model")
    parser.add_argument("--first-batch", type=int, default=1, help="number of the first batch file written")
    parser.add_argument("--legacy", action="store_true", help="add the legacy rows to be read again")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    answers = [json.loads(line) for line in args.answers.read_text(encoding="utf-8").splitlines() if line.strip()]
    chosen = []
    copies_path = args.out / "copies.json"  # several rounds add to one map
    known = json.loads(copies_path.read_text()) if copies_path.is_file() else {}
    batched = {pair for same in known.values() for pair in same}
    answers = [row for row in answers if row["pair_id"] not in batched]  # a later round samples what is left
    wanted = set(filter(None, args.models.split(","))) or {row["model"] for row in answers}
    for model in sorted(wanted):
        for split, count in (("test", args.test_per_model), ("judge", args.train_per_model)):
            rows = sorted((r for r in answers if r["model"] == model and r["split"] == split), key=lambda r: r["pair_id"])
            chosen += rng.sample(rows, min(count, len(rows)))
    legacy = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()
              if line.strip() and json.loads(line)["pair_id"].startswith("legacy-")] if args.legacy else []
    chosen += legacy

    copies: dict[str, list[str]] = {}  # the pair that is read -> every pair with the same text
    first_of: dict[tuple[str, str], str] = {}
    for row in chosen:
        key = (row["question"], row["answer"])
        if key not in first_of:
            first_of[key] = row["pair_id"]
            copies[row["pair_id"]] = []
        copies[first_of[key]].append(row["pair_id"])
    read = [row for row in chosen if row["pair_id"] in copies]
    rng.shuffle(read)
    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(args.readers):
        batch = read[k::args.readers]
        (args.out / f"batch-{args.first_batch + k}.jsonl").write_text("".join(
            json.dumps({"pair_id": r["pair_id"], "question": r["question"], "answer": r["answer"]}, ensure_ascii=False)
            + "\n" for r in batch), encoding="utf-8")
    clash = set(known) & set(copies)
    if clash:
        raise SystemExit(f"{len(clash)} pairs are already in a batch of an earlier round, e.g. {sorted(clash)[0]}")
    copies_path.write_text(json.dumps({**known, **copies}, indent=0))
    print(f"{len(chosen)} pairs chosen ({len(legacy)} legacy), {len(read)} to read in {args.readers} batches")


if __name__ == "__main__":
    main()
