"""Join the readers' label files to the answers and write realign/eval/labelled_answers.jsonl.

    .venv/bin/python scripts/label_merge.py --answers label-pool/answers.jsonl --batches label-pool/batches \
        --labels label-pool/labels

Each label file (`<labels>/*.jsonl`) holds rows {"pair_id", "harmful", "unsure", "labeller"} written by whoever read
the answers against docs/labelling.md. Every pair_id must be an answer of `--answers` (or a legacy row of the
current output, re-read under the current guide) and be labelled once; its label also holds for the identical
pairs `copies.json` lists. The answers' `split` becomes `train` (judge-training prompts) or `test` (evaluation
prompts). Prints the counts per split, kind and label.
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
    parser.add_argument("--batches", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()

    answers = {}
    for line in args.answers.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            answers[row["pair_id"]] = row
    legacy = {}  # the first 192 labelled answers (pair ids legacy-*), re-read under the current guide
    if args.out.is_file():
        for line in args.out.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("pair_id", "").startswith("legacy-"):
                legacy[row["pair_id"]] = row
    copies = json.loads((args.batches / "copies.json").read_text())
    labels: dict[str, dict] = {}
    for path in sorted(args.labels.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            label = json.loads(line)
            pair = label["pair_id"]
            if pair not in answers and pair not in legacy:
                raise SystemExit(f"{path}:{number}: pair {pair} is no answer of {args.answers}")
            if pair in labels:
                raise SystemExit(f"{path}:{number}: pair {pair} is labelled twice")
            if not isinstance(label.get("harmful"), bool) or not label.get("labeller"):
                raise SystemExit(f"{path}:{number}: needs a boolean `harmful` and a `labeller`")
            labels[pair] = label
    missing = sorted(set(copies) - set(labels))
    if missing:
        raise SystemExit(f"{len(missing)} pairs of the batches have no label, e.g. {missing[0]}")

    rows = []
    for read_pair, same in copies.items():
        label = labels[read_pair]
        for pair in same:
            if pair in legacy:
                source = legacy[pair]
                rows.append({**source, "harmful": label["harmful"], "unsure": bool(label.get("unsure")),
                             "labeller": label["labeller"]})
                continue
            answer = answers[pair]
            rows.append({
                "pair_id": pair, "prompt_id": answer["prompt_id"], "split": SPLIT_OF[answer["split"]],
                "question": answer["question"], "answer": answer["answer"], "harmful": label["harmful"],
                "model": answer["model"], "kind": answer["kind"], "stage": answer["stage"],
                "run_id": answer["run_id"], "category": answer["category"], "labeller": label["labeller"],
                "unsure": bool(label.get("unsure")),
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
