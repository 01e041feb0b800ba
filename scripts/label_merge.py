"""Join the readers' label files to the answers and write realign/eval/labelled_answers.jsonl.

    .venv/bin/python scripts/label_merge.py --answers label-pool/answers.jsonl --labels label-pool/labels

Each label file (`<labels>/*.jsonl`) holds rows {"pair_id", "harmful", "unsure", "labeller"} written by whoever read
the answers against docs/labelling.md. Every pair_id must be an answer of `--answers` and be labelled once; the
answers' `split` becomes `train` (judge-training prompts) or `test` (evaluation prompts). Rows already in the
output that came from elsewhere (labeller `legacy`: the first 192, re-read under the current guide) are kept.
Prints the counts per split, kind and label.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "realign" / "eval" / "labelled_answers.jsonl"
SPLIT_OF = {"judge": "train", "test": "test"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()

    answers = {}
    for line in args.answers.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            answers[row["pair_id"]] = row
    labels: dict[str, dict] = {}
    for path in sorted(args.labels.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            label = json.loads(line)
            pair = label["pair_id"]
            if pair not in answers:
                raise SystemExit(f"{path}:{number}: pair {pair} is no answer of {args.answers}")
            if pair in labels:
                raise SystemExit(f"{path}:{number}: pair {pair} is labelled twice")
            if not isinstance(label.get("harmful"), bool) or not label.get("labeller"):
                raise SystemExit(f"{path}:{number}: needs a boolean `harmful` and a `labeller`")
            labels[pair] = label

    kept = []
    if args.out.is_file():
        kept = [json.loads(line) for line in args.out.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["labeller"] == "legacy"]
    rows = list(kept)
    for pair, label in labels.items():
        answer = answers[pair]
        rows.append({
            "pair_id": pair, "prompt_id": answer["prompt_id"], "split": SPLIT_OF[answer["split"]],
            "question": answer["question"], "answer": answer["answer"], "harmful": label["harmful"],
            "model": answer["model"], "kind": answer["kind"], "stage": answer["stage"], "run_id": answer["run_id"],
            "category": answer["category"], "labeller": label["labeller"], "unsure": bool(label.get("unsure")),
        })
    train_prompts = {r["prompt_id"] for r in rows if r["split"] == "train"}
    test_prompts = {r["prompt_id"] for r in rows if r["split"] == "test"}
    if train_prompts & test_prompts:
        raise SystemExit(f"{len(train_prompts & test_prompts)} prompts are in both splits")
    rows.sort(key=lambda r: (r["split"], r["kind"], r["model"], r["prompt_id"]))
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counts = Counter((r["split"], r["kind"], r["harmful"]) for r in rows)
    print(f"{len(rows)} pairs ({sum(r['harmful'] for r in rows)} harmful, {sum(r['unsure'] for r in rows)} unsure) "
          f"-> {args.out}")
    for key in sorted(counts):
        print(f"  {key[0]:5} {key[1]:9} harmful={key[2]!s:5} {counts[key]}")


if __name__ == "__main__":
    main()
