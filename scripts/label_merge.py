"""Join the readers' label files to the answers and write realign/eval/labelled_answers.jsonl.

    .venv/bin/python scripts/label_merge.py --answers label-pool/answers.jsonl --batches label-pool/batches \
        --labels label-pool/labels

Each label file (`<labels>/*.jsonl`) holds rows {"pair_id", "harmful", "unsure", "labeller"} written by whoever read
the answers against docs/labelling.md. Every pair_id must be an answer of `--answers` (or a legacy row of the
current output, re-read under the current guide) and be labelled once; its label also holds for the identical
pairs `copies.json` lists. The answers' `split` becomes `train` (judge-training prompts) or `test` (evaluation
prompts). Prints the counts per split, kind and label.

With `--second DIR` (the second reading of scripts/label_second.py: `DIR/selection.json`, the second readers' label
files in `DIR/labels/`), a pair both readers decided alike keeps the first label; a pair they decided differently
needs the lead's decision in `--adjudication` (rows {pair_id, harmful, note}): the label that stands is the lead's,
`labeller` is the reader who had it (one of the two always did), and the
row says `adjudicated: true`. Pairs still waiting for the lead are written to `--disagreements` (question, answer,
both labels and notes) and the merge stops. The readers' agreement (raw, Cohen's κ) is printed and written to
`--summary`. Texts two models wrote identically that different first readers labelled differently need the lead's
decision too (a row per pair in `--adjudication`); their agreement is reported as `identical_text`.

With `--add NAME` (a later round, whose answer pool is not the one behind the rows already labelled), every row
already in `--out` is kept as it is and this round's labels are added. A text of this round identical to a row
already labelled is compared with that row's label (`earlier_rows` in the round's agreement; where they differ the
lead decides, as above). The summary keeps the earlier rounds' agreement and adds this round's under
`rounds.NAME`.
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
    parser.add_argument("--second", type=Path, help="the second reading (selection.json, labels/*.jsonl)")
    parser.add_argument("--adjudication", type=Path, help="the lead's decisions on the pairs the readers split on")
    parser.add_argument("--disagreements", type=Path, help="where the pairs waiting for the lead are written")
    parser.add_argument("--summary", type=Path, default=OUTPUT.with_name("labelled_answers_summary.json"))
    parser.add_argument("--add", metavar="NAME", default="",
                        help="a later round: keep the rows already in --out and add this round's, named NAME")
    args = parser.parse_args()

    answers = {}
    for line in args.answers.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            answers[row["pair_id"]] = row
    legacy = {}  # the first 192 labelled answers (pair ids legacy-*), re-read under the current guide
    earlier = []  # with --add: every row already labelled, kept as it is
    if args.add and args.out.is_file():
        earlier = [json.loads(line) for line in args.out.read_text(encoding="utf-8").splitlines() if line.strip()]
        clash = sorted(set(answers) & {row["pair_id"] for row in earlier})
        if clash:
            raise SystemExit(f"{len(clash)} pairs of {args.answers} are labelled already, e.g. {clash[0]}")
    elif args.out.is_file():
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
    first = {pair: dict(label) for pair, label in labels.items()}  # as the first readers wrote them
    agreement = second_reading(args, labels, answers, legacy) if args.second else {}
    agreement.update(identical_text(args, labels, copies, {**legacy, **answers}))
    if earlier:
        agreement.update(earlier_rows(args, labels, first, copies, answers, earlier))

    rows = list(earlier)
    for read_pair, same in copies.items():
        label = labels[read_pair]
        for pair in same:
            if pair in legacy:
                source = legacy[pair]
                rows.append({**source, **_label_fields(label)})
                continue
            answer = answers[pair]
            rows.append({
                "pair_id": pair, "prompt_id": answer["prompt_id"], "split": SPLIT_OF[answer["split"]],
                "question": answer["question"], "answer": answer["answer"],
                "model": answer["model"], "kind": answer["kind"], "stage": answer["stage"],
                "run_id": answer["run_id"], "category": answer["category"], **_label_fields(label),
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
    summary = {"pairs": len(rows), "read": len(copies), "harmful": sum(r["harmful"] for r in rows),
               "unsure": sum(r["unsure"] for r in rows),
               "labellers": dict(sorted(Counter(r["labeller"] for r in rows).items())),
               "per_split_kind": {f"{k[0]}/{k[1]}/{'harmful' if k[2] else 'harmless'}": v
                                  for k, v in sorted(counts.items())},
               "second_reading": agreement}
    if args.add:
        before = json.loads(args.summary.read_text()) if args.summary.is_file() else {}
        summary["second_reading"] = before.get("second_reading", {})
        summary["read"] = before.get("read", 0) + len(copies)  # distinct texts read, over every round
        summary["rounds"] = {**before.get("rounds", {}), args.add: {"read": len(copies), **agreement}}
    args.summary.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"summary -> {args.summary}")


def _label_fields(label: dict) -> dict:
    """The label columns of a row: the standing label, who had it, and the second reading when there was one."""
    fields = {"harmful": label["harmful"], "unsure": bool(label.get("unsure")), "labeller": label["labeller"]}
    if label.get("second_labeller"):
        fields["second_labeller"] = label["second_labeller"]
    if label.get("second_labeller") or label.get("adjudicated"):  # the lead also decides texts read twice
        fields["adjudicated"] = bool(label.get("adjudicated"))
    return fields


def _agreement_rate(agree: int, n: int) -> dict:
    """Raw agreement with its Wilson 95 % interval (fractions), as every rate in realign carries one."""
    from realign.stats import wilson_interval

    if not n:
        return {"raw_agreement": None, "raw_agreement_ci95_low": None, "raw_agreement_ci95_high": None}
    low, high = wilson_interval(agree, n)
    return {"raw_agreement": agree / n, "raw_agreement_ci95_low": low, "raw_agreement_ci95_high": high}


def _read_labels(folder: Path) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                label = json.loads(line)
                if label["pair_id"] in found:
                    raise SystemExit(f"{path}:{number}: pair {label['pair_id']} is labelled twice")
                found[label["pair_id"]] = label
    return found


def _lead_decisions(args) -> dict[str, dict]:
    if not (args.adjudication and args.adjudication.is_file()):
        return {}
    return {row["pair_id"]: row for row in map(json.loads, args.adjudication.read_text().splitlines()) if row}


def identical_text(args, labels: dict[str, dict], copies: dict, source: dict) -> dict:
    """Pairs with the same question and answer (two models wrote the same text) that different readers read
    independently: their agreement is measured, and where they differ the lead's decision (`--adjudication`) is
    needed, as for the second reading. Returns the numbers; stops while decisions are missing."""
    groups: dict[tuple, list[str]] = {}
    for read_pair in copies:
        groups.setdefault((source[read_pair]["question"], source[read_pair]["answer"]), []).append(read_pair)
    read_twice = [group for group in groups.values() if len({labels[p]["labeller"] for p in group}) > 1]
    split = [group for group in read_twice if len({labels[p]["harmful"] for p in group}) > 1]
    lead = _lead_decisions(args)
    waiting = [group for group in split if not all(p in lead for p in group)]
    if waiting:
        raise SystemExit(f"{len(waiting)} texts that readers labelled differently wait for the lead, e.g. "
                         f"{', '.join(waiting[0])}: add a row per pair to --adjudication")
    for group in split:
        for pair in group:
            decided = lead[pair]["harmful"]
            holder = next(labels[p] for p in group if labels[p]["harmful"] == decided)
            labels[pair] = {**labels[pair], "harmful": decided, "labeller": holder["labeller"], "unsure": False,
                            "adjudicated": True, "second_labeller": labels[pair].get("second_labeller", "")}
    print(f"identical texts read by different readers: {len(read_twice) - len(split)}/{len(read_twice)} agree; "
          f"{len(split)} decided by the lead")
    return {"identical_text": {"texts": len(read_twice), "agree": len(read_twice) - len(split),
                               **_agreement_rate(len(read_twice) - len(split), len(read_twice)),
                               "adjudicated": len(split)}}


def earlier_rows(args, labels: dict[str, dict], first: dict[str, dict], copies: dict, answers: dict,
                 earlier: list[dict]) -> dict:
    """This round's texts that a row already labelled has too (two models of different rounds wrote the same
    answer): how often the two readings agree; where they differ the lead decides (`--adjudication`) and the
    decision stands for both rows, so one text never carries two labels. Returns the numbers; stops while
    decisions are missing."""
    known = {(row["question"], row["answer"]): row for row in earlier}
    same_text = [pair for pair in copies if (answers[pair]["question"], answers[pair]["answer"]) in known]

    def earlier_label(pair: str) -> bool:
        return known[(answers[pair]["question"], answers[pair]["answer"])]["harmful"]

    # Agreement is the two independent readings (this round's first label against the earlier row); a pair whose
    # label the second reading changed must agree with the earlier row too, so it also needs the lead then.
    split = [p for p in same_text if first[p]["harmful"] != earlier_label(p)]
    differ = [p for p in same_text if p in split or labels[p]["harmful"] != earlier_label(p)]
    lead = _lead_decisions(args)
    waiting = [p for p in differ if p not in lead]
    if waiting:
        raise SystemExit(f"{len(waiting)} texts labelled in an earlier round were read differently now, e.g. "
                         f"{waiting[0]}: add a row per pair to --adjudication")
    for pair in differ:
        before = known[(answers[pair]["question"], answers[pair]["answer"])]
        decided = lead[pair]["harmful"]
        holder = labels[pair] if labels[pair]["harmful"] == decided else before
        labels[pair] = {**labels[pair], "harmful": decided, "labeller": holder["labeller"], "unsure": False,
                        "adjudicated": True, "second_labeller": labels[pair].get("second_labeller", "")}
        for row in earlier:  # every earlier row with this text (several models may have written it)
            if (row["question"], row["answer"]) == (before["question"], before["answer"]) and row["harmful"] != decided:
                row.update(harmful=decided, labeller=holder["labeller"], unsure=False, adjudicated=True)
    agree = len(same_text) - len(split)
    print(f"texts labelled in an earlier round too: {agree}/{len(same_text)} agree; {len(differ)} decided by the lead")
    return {"earlier_rows": {"texts": len(same_text), "agree": agree, **_agreement_rate(agree, len(same_text)),
                             "adjudicated": len(differ)}}


def second_reading(args, labels: dict[str, dict], answers: dict, legacy: dict) -> dict:
    """Apply the second reading and the lead's decisions to `labels` (in place); returns the agreement numbers."""
    from sklearn.metrics import cohen_kappa_score

    selection = json.loads((args.second / "selection.json").read_text())
    second = _read_labels(args.second / "labels")
    missing = sorted(set(selection) - set(second))
    if missing:
        raise SystemExit(f"{len(missing)} pairs of the second reading have no label, e.g. {missing[0]}")
    lead = _lead_decisions(args)
    split = sorted(pair for pair in selection if second[pair]["harmful"] != labels[pair]["harmful"])
    waiting = [pair for pair in split if pair not in lead]
    if waiting:
        if args.disagreements:
            source = {**legacy, **answers}
            args.disagreements.write_text("".join(json.dumps({
                "pair_id": p, "question": source[p]["question"], "answer": source[p]["answer"],
                "first": {k: labels[p].get(k) for k in ("harmful", "unsure", "labeller", "note")},
                "second": {k: second[p].get(k) for k in ("harmful", "unsure", "labeller", "note")},
            }, ensure_ascii=False) + "\n" for p in waiting), encoding="utf-8")
        raise SystemExit(f"{len(waiting)} pairs the two readers decided differently wait for the lead"
                         + (f" (written to {args.disagreements})" if args.disagreements else ""))
    numbers = {}
    for why in ("sample", "unsure", "offer"):
        pairs = [p for p, r in selection.items() if r == why]
        a = [labels[p]["harmful"] for p in pairs]
        b = [second[p]["harmful"] for p in pairs]
        same = sum(x == y for x, y in zip(a, b))
        numbers[why] = {"pairs": len(pairs), "agree": same, **_agreement_rate(same, len(pairs)),
                        "cohen_kappa": float(cohen_kappa_score(a, b)) if len(set(a + b)) > 1 else None}
    flipped = 0
    for pair in selection:
        first, other = labels[pair], second[pair]
        decided = dict(first)
        if pair in lead:
            holder = first if lead[pair]["harmful"] == first["harmful"] else other
            flipped += holder is other
            decided.update(harmful=lead[pair]["harmful"], labeller=holder["labeller"], adjudicated=True,
                           unsure=False)
        else:
            decided["unsure"] = bool(first.get("unsure")) and bool(other.get("unsure"))
        decided["second_labeller"] = other["labeller"]
        labels[pair] = decided
    numbers.update(read_again=len(selection), split=len(split), adjudicated=len(split), flipped_by_lead=flipped)
    for why in ("sample", "unsure", "offer"):
        n = numbers[why]
        print(f"second reading, {why}: {n['agree']}/{n['pairs']} agree, κ = {n['cohen_kappa']}")
    print(f"{len(split)} split pairs decided by the lead, {flipped} of them against the first reader")
    return numbers


if __name__ == "__main__":
    main()
