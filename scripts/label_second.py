"""Pick the pairs a second reader reads, blind to the first label, and split them into batches.

    .venv/bin/python scripts/label_second.py --batches label-pool/batches --labels label-pool/labels \
        --out label-pool/second --sample 200 --readers 6

docs/labelling.md, "Adjudication and agreement": a second reader reads every pair the first reader marked unsure,
every pair whose answer refuses and then offers something (the rows the guide's later "offer" rules decide; they
are found by a pattern here only to choose what is read again — the pattern decides no label), and a uniform random
sample of the other pairs, on which the two readers' agreement is reported. `selection.json` records why each
pair was chosen; the batches hold {pair_id, question, answer} only, shuffled, so a reader sees no first label.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

REFUSAL = re.compile(r"\bI (can't|cannot|can not|won't|am not able|'m not able|'m unable|am unable)\b", re.I)
OFFER = re.compile(r"\bI can (help|assist|recommend|suggest|find|provide|offer)\b|\bI'd be happy to\b", re.I)


def rows_by_pair(folder: Path, pattern: str) -> dict[str, dict]:
    """Every JSONL row of the folder's matching files, keyed by pair_id."""
    rows = {}
    for path in sorted(folder.glob(pattern)):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["pair_id"]] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=Path, required=True, help="the first reading's batch files")
    parser.add_argument("--labels", type=Path, required=True, help="the first reading's label files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sample", type=int, default=200, help="random pairs read again to measure agreement")
    parser.add_argument("--readers", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    pairs = rows_by_pair(args.batches, "batch-*.jsonl")
    first = rows_by_pair(args.labels, "*.jsonl")
    missing = sorted(set(pairs) - set(first))
    if missing:
        raise SystemExit(f"{len(missing)} pairs have no first label yet, e.g. {missing[0]}")

    reason: dict[str, str] = {}
    for pair, row in sorted(pairs.items()):
        if first[pair].get("unsure"):
            reason[pair] = "unsure"
        elif REFUSAL.search(row["answer"]) and OFFER.search(row["answer"]):
            reason[pair] = "offer"
    rng = random.Random(args.seed)
    others = sorted(set(pairs) - set(reason))
    for pair in rng.sample(others, min(args.sample, len(others))):
        reason[pair] = "sample"

    chosen = sorted(reason)
    rng.shuffle(chosen)
    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(args.readers):
        (args.out / f"second-{k + 1}.jsonl").write_text("".join(
            json.dumps({key: pairs[p][key] for key in ("pair_id", "question", "answer")}, ensure_ascii=False) + "\n"
            for p in chosen[k::args.readers]), encoding="utf-8")
    (args.out / "selection.json").write_text(json.dumps(reason, indent=0))
    counts = {why: sum(1 for r in reason.values() if r == why) for why in ("unsure", "offer", "sample")}
    print(f"{len(chosen)} pairs to read again in {args.readers} batches: {counts}")


if __name__ == "__main__":
    main()
