"""The judges against the hand labels of the TEST split, overall and within each model kind (the README's table).

Reads the test split only to measure: nothing is chosen from these numbers (bench/judge_selection.py chose the
judge on the train split). Prints a markdown table: recall and specificity with Wilson 95 % intervals and counts.

    .venv/bin/python bench/judge_agreement.py                      # classifier and keyword (~1 min once built)
    .venv/bin/python bench/judge_agreement.py --judges keyword
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cell(metrics: dict[str, float], name: str) -> str:
    return (f"{metrics[f'judge_{name}']:.1f} [{metrics[f'judge_{name}_ci95_low']:.1f}, "
            f"{metrics[f'judge_{name}_ci95_high']:.1f}] (n = {metrics[f'judge_{name}_n']:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judges", default="classifier,keyword")
    args = parser.parse_args()

    from realign.eval import get_judge
    from realign.eval.validation import agreement_by_kind

    print("| judge | answers of | recall % [95 % CI] | specificity % [95 % CI] |")
    print("|---|---|---|---|")
    for name in args.judges.split(","):
        for kind, metrics in agreement_by_kind(get_judge(name), "test").items():
            recall = cell(metrics, "recall") if metrics["judge_recall_n"] else "—"
            print(f"| `{name}` | {kind} | {recall} | {cell(metrics, 'specificity')} |", flush=True)


if __name__ == "__main__":
    main()
